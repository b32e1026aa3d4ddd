"""Markdown tables from benchmark CSVs, so the docs paste a run's figures instead of retyping them.

    .venv/bin/python benchmarks/results.py bench_out/bench_logprobs.csv --case 'fwd_bwd_N16384_H1536' \\
        --metric time_ms peak_mem_mb --ratio-to bare_gemms
    .venv/bin/python benchmarks/results.py docs/gpu_runs/2026-11-27-h100-run2      # every CSV of a folder

Each CSV is the long format of ``benchmarks/common.py`` (``benchmark, case, provider, metric, value,
unit``). A table has one row per (case, provider) (the case column is left out when one case is
selected) and one column per metric, values with their unit; ``--ratio-to P`` adds each row's time
over provider P's in the same case. Every table ends with the file it came from.

A doc embeds a table after a marker that names the arguments, ``<!-- results.py ARGS -->``;
``tests/test_docs.py`` regenerates every marked table and compares.
"""

from __future__ import annotations

import argparse
import csv
import re
from collections.abc import Sequence
from pathlib import Path


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    missing = {"benchmark", "case", "provider", "metric", "value", "unit"} - set(rows[0] if rows else {})
    if rows and missing:
        raise ValueError(f"{path}: not a benchmark CSV (columns {sorted(missing)} are missing)")
    return rows


def _format(value: str, unit: str) -> str:
    number = float(value)
    if number != 0 and (abs(number) < 1e-2 or abs(number) >= 1e5):
        text = f"{number:.2e}"
    elif abs(number) >= 100:
        text = f"{number:.0f}"
    elif abs(number) >= 10:
        text = f"{number:.1f}"
    else:
        text = f"{number:.3g}"
    return f"{text} {unit}".strip() if unit not in ("", "ratio", "x") else text


def table(
    rows: Sequence[dict[str, str]],
    source: str,
    *,
    case: str | None = None,
    metrics: Sequence[str] | None = None,
    providers: Sequence[str] | None = None,
    ratio_to: str | None = None,
) -> str:
    """The markdown table of ``rows`` (one CSV's), filtered by a ``case`` regex, ``metrics`` and
    ``providers`` (their order is the table's); empty when nothing is left."""
    chosen = [r for r in rows if case is None or re.search(case, r["case"])]
    chosen = [r for r in chosen if providers is None or r["provider"] in providers]
    metric_names = list(metrics) if metrics else list(dict.fromkeys(r["metric"] for r in chosen))
    chosen = [r for r in chosen if r["metric"] in metric_names]
    if not chosen:
        return ""
    cells: dict[tuple[str, str], dict[str, str]] = {}
    for row in chosen:
        cells.setdefault((row["case"], row["provider"]), {})[row["metric"]] = _format(row["value"], row["unit"])
    keys = list(cells)
    if providers is not None:
        keys.sort(key=lambda key: (list(dict.fromkeys(k[0] for k in cells)).index(key[0]), providers.index(key[1])))
    cases = list(dict.fromkeys(key[0] for key in keys))
    header = ([] if len(cases) == 1 else ["case"]) + ["provider", *metric_names]
    if ratio_to is not None:
        header.append(f"time / {ratio_to}")
    times = {(r["case"], r["provider"]): float(r["value"]) for r in chosen if r["metric"] == "time_ms"}
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for key in keys:
        line = ([] if len(cases) == 1 else [key[0]]) + [key[1]] + [cells[key].get(m, "-") for m in metric_names]
        if ratio_to is not None:
            base = times.get((key[0], ratio_to))
            line.append(f"{times[key] / base:.2f}" if base and key in times else "-")
        lines.append("| " + " | ".join(line) + " |")
    title = f"{cases[0]}: " if len(cases) == 1 else ""
    return "\n".join([*lines, "", f"{title}from `{source}`."])


def csv_files(paths: Sequence[Path]) -> list[Path]:
    files = []
    for path in paths:
        if path.is_dir():
            files += sorted(path.glob("*.csv"))
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"{path} is neither a CSV file nor a folder of them")
    return files


def render(argv: Sequence[str]) -> str:
    """The tables ``results.py ARGV`` prints, as one string (what a doc pastes after its marker)."""
    parser = argparse.ArgumentParser(prog="results.py", description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", type=Path, help="benchmark CSVs, or folders of them")
    parser.add_argument("--case", help="a regular expression the case names must match")
    parser.add_argument("--metric", nargs="+", help="metrics to show, in order (default: every one)")
    parser.add_argument("--providers", nargs="+", help="providers to show, in order (default: every one)")
    parser.add_argument("--ratio-to", help="add each row's time_ms over this provider's (same case)")
    args = parser.parse_args(argv)
    tables = [
        table(read_rows(path), path.as_posix(), case=args.case, metrics=args.metric, providers=args.providers,
              ratio_to=args.ratio_to)
        for path in csv_files(args.paths)
    ]  # fmt: skip
    return "\n\n".join(text for text in tables if text)


def main(argv: Sequence[str] | None = None) -> None:
    import sys

    print(render(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
