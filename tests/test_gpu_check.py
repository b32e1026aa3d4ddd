"""The GPU check's dry run on a machine without CUDA: it must exit 0 and end in its report, with
every GPU step listed as skipped and why, and nothing aborted (the same script runs on the GPU)."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(sys.platform != "linux", reason="the check is a bash script for Linux GPU machines")
def test_dry_run_ends_in_its_report(tmp_path):
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("CUDA is visible: the check itself runs on this machine's GPU, not as a dry run")
    env = dict(os.environ, PYTHON=sys.executable, GPU_CHECK_SITE=str(tmp_path / "site"))
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.rstrip().splitlines()[0].startswith("== preflight")
    assert "# GPU check report" in done.stdout and (tmp_path / "out" / "report.md").exists()
    with open(tmp_path / "out" / "steps.tsv", newline="") as handle:
        steps = {row["step"]: row for row in csv.DictReader(handle, delimiter="\t")}
    assert steps["preflight"]["status"] == "ok" and steps["gpu_tests"]["status"] == "ok"
    benches = sorted(path.stem for path in (ROOT / "benchmarks").glob("bench_*.py"))
    assert sorted(name for name in steps if name.startswith("bench_")) == benches
    for name in benches:
        assert steps[name]["status"] == "skipped" and steps[name]["note"], name
    assert (tmp_path / "out" / "env.json").exists()
    assert "skipped" in (tmp_path / "out" / "gpu_tests.log").read_text()
