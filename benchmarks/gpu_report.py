"""The GPU check's report: the step table, the test summary and every benchmark's rows.

    python benchmarks/gpu_report.py OUT_DIR

Reads what ``gpu_check.sh`` left in OUT_DIR (``steps.tsv``, ``env.json``, ``gpu_tests.log``,
``bench_*.csv``), prints the report and writes ``OUT_DIR/report.md``. Uses only the standard
library, so it runs even where torch or rich do not import.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def shown(value: str) -> str:
    try:
        number = float(value)
    except ValueError:
        return value
    return f"{number:.4g}" if abs(number) < 1e6 else f"{number:.4e}"


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def environment_lines(out_dir: Path) -> list[str]:
    env_path = out_dir / "env.json"
    if not env_path.exists():
        return ["(no env.json: the preflight did not run)"]
    env = json.loads(env_path.read_text())
    gpu = env.get("gpu", {})
    packages = env.get("packages", {})
    versions = ", ".join(f"{name} {p.get('version', '')}".strip() for name, p in packages.items() if p.get("ok"))
    missing = ", ".join(name for name, p in packages.items() if not p.get("ok"))
    return [
        f"- python {env.get('python')}; GPU: {gpu.get('name', 'none')} (cc {gpu.get('capability', '-')}, "
        f"{gpu.get('memory_gib', '-')} GiB), torch CUDA {gpu.get('torch_cuda')}, nvcc: {gpu.get('nvcc_version', 'none')}",
        f"- imports: {versions}",
        f"- missing: {missing or 'nothing'}",
    ]


def test_summary(out_dir: Path) -> str:
    log = out_dir / "gpu_tests.log"
    if not log.exists():
        return "(gpu tests did not run)"
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    summary = [line for line in lines if " passed" in line or " failed" in line or " skipped" in line]
    return summary[-1] if summary else (lines[-1] if lines else "(empty log)")


def main() -> None:
    out_dir = Path(sys.argv[1])
    lines = ["# GPU check report", "", *environment_lines(out_dir), "", "## Steps", ""]
    steps_path = out_dir / "steps.tsv"
    if steps_path.exists():
        with open(steps_path, newline="") as handle:
            steps = list(csv.DictReader(handle, delimiter="\t"))
        header = ["step", "status", "seconds", "limit_s", "note"]
        lines += markdown_table(header, [[step[key] for key in header] for step in steps])
        total = sum(float(step["seconds"]) for step in steps)
        lines += ["", f"total {total:.0f} s over {len(steps)} steps"]
    lines += ["", "## GPU tests", "", test_summary(out_dir)]
    for csv_path in sorted(out_dir.glob("bench_*.csv")):
        rows = read_rows(csv_path)
        lines += ["", f"## {csv_path.stem}", ""]
        lines += markdown_table(
            ["case", "provider", "metric", "value", "unit"],
            [[row["case"], row["provider"], row["metric"], shown(row["value"]), row["unit"]] for row in rows],
        )
    for notes_path in sorted(out_dir.glob("bench_*.targets.txt")):
        lines += ["", f"## {notes_path.stem}", "", *notes_path.read_text().splitlines()]
    text = "\n".join(lines) + "\n"
    (out_dir / "report.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
