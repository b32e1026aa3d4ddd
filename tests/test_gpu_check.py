"""The GPU check's dry run on a machine without CUDA: it must exit 0 and end in its report, with
every GPU step listed as skipped and why, the never-measured steps before the measured ones, a
step skipped (not started) when less than its measured need is left, and the import probes in the
total; and the kept GPU runs' reports regenerate byte for byte from their files."""

import csv
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# No kept run (docs/gpu_runs/) has measured these; the check runs them before the others.
NEVER_MEASURED = ["bench_rollout", "bench_tree_attention", "bench_tree_forward", "bench_advantages", "bench_decode",
                  "bench_paged_attention", "bench_tree_pack"]  # fmt: skip
MEASURED = ["gpu_tests", "bench_logprobs", "bench_e2e"]


def dry_run(tmp_path, **env_overrides):
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("CUDA is visible: the check itself runs on this machine's GPU, not as a dry run")
    env = dict(os.environ, PYTHON=sys.executable, GPU_CHECK_SITE=str(tmp_path / "site"), **env_overrides)
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with open(tmp_path / "out" / "steps.tsv", newline="") as handle:
        steps = list(csv.DictReader(handle, delimiter="\t"))
    return done, steps


@pytest.mark.skipif(sys.platform != "linux", reason="the check is a bash script for Linux GPU machines")
def test_dry_run_ends_in_its_report(tmp_path):
    done, rows = dry_run(tmp_path)
    steps = {row["step"]: row for row in rows}
    assert done.stdout.rstrip().splitlines()[0].startswith("== preflight")
    assert "# GPU check report" in done.stdout and (tmp_path / "out" / "report.md").exists()
    assert steps["preflight"]["status"] == "ok" and steps["gpu_tests"]["status"] == "ok"
    benches = {path.stem for path in (ROOT / "benchmarks").glob("bench_*.py")}
    # Every benchmark has a step; the new decode benches' steps wait for their scripts.
    assert {name for name in steps if name.startswith("bench_")} == benches | {"bench_decode", "bench_paged_attention"}
    for name in steps:
        if name.startswith("bench_"):
            assert steps[name]["status"] == "skipped" and steps[name]["note"], name
        if name.startswith("bench_") and name not in benches:
            assert steps[name]["note"] == f"benchmarks/{name}.py does not exist in this checkout yet"
    order = [row["step"] for row in rows]
    assert [name for name in order if name in NEVER_MEASURED + MEASURED] == NEVER_MEASURED + MEASURED
    assert (tmp_path / "out" / "env.json").exists()
    assert "skipped" in (tmp_path / "out" / "gpu_tests.log").read_text()
    # The probes between steps (CUDA, imports) are a row of their own, and the total counts them.
    assert order[-1] == "import_probes" and float(steps["import_probes"]["seconds"]) > 0
    total = sum(float(row["seconds"]) for row in rows)
    report = (tmp_path / "out" / "report.md").read_text()
    assert f"total {total:.0f} s over {len(rows)} steps" in report


@pytest.mark.skipif(sys.platform != "linux", reason="the check is a bash script for Linux GPU machines")
def test_a_step_is_skipped_when_less_than_its_measured_need_is_left(tmp_path):
    """gpu_tests took 121 s in the first H100 run: with a 40 s budget it is skipped with that reason,
    not started with a limit it cannot finish in."""
    _, rows = dry_run(tmp_path, GPU_CHECK_BUDGET_S="40", GPU_CHECK_STEPS="gpu_tests")
    steps = {row["step"]: row for row in rows}
    assert steps["gpu_tests"]["status"] == "skipped"
    assert re.fullmatch(r"needs 121 s \(measured\), \d+ s of the budget left", steps["gpu_tests"]["note"])
    assert not (tmp_path / "out" / "gpu_tests.log").exists()


@pytest.mark.parametrize("run", sorted(path.name for path in (ROOT / "docs" / "gpu_runs").glob("20*")))
def test_kept_runs_regenerate_their_reports_byte_for_byte(tmp_path, run):
    """Every kept run's report.md is what gpu_report.py makes of the files kept beside it."""
    folder = tmp_path / run
    shutil.copytree(ROOT / "docs" / "gpu_runs" / run, folder)
    kept = (folder / "report.md").read_bytes()
    (folder / "report.md").unlink()
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_report.py"), str(folder)], check=True, capture_output=True
    )
    assert (folder / "report.md").read_bytes() == kept
