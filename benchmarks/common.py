"""Shared benchmark plumbing: the command line, timing, peak memory, the table and the CSV.

Every ``benchmarks/bench_<name>.py`` follows one convention::

    python benchmarks/bench_<name>.py [--quick] [--device cpu|cuda] [--out DIR]

It prints a table and writes ``DIR/bench_<name>.csv`` in long format with the columns
``benchmark, case, provider, metric, value, unit``. Times are medians of repeated runs after
warm-up; peak memory is in MiB (CUDA: the caching allocator's peak; CPU: the growth of the
process's resident set, read from the kernel's high-water mark after resetting it, with glibc
told to map every large allocation afresh for the duration of the measurement).
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import os
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

COLUMNS = ("benchmark", "case", "provider", "metric", "value", "unit")
_REPO_ROOT = Path(__file__).resolve().parent.parent
if str(_REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(_REPO_ROOT))


def parse_args(name: str, description: str, extra: Callable[[argparse.ArgumentParser], None] | None = None):
    parser = argparse.ArgumentParser(prog=f"bench_{name}.py", description=description)
    parser.add_argument("--quick", action="store_true", help="reduced case set (under a minute on CPU)")
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", choices=("cpu", "cuda"), default=default_device)
    parser.add_argument("--out", type=Path, default=Path("bench_out"), help="folder for the CSV")
    if extra is not None:
        extra(parser)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda was asked for but torch sees no CUDA device")
    return args


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def _glibc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], object], device: str, warmup: int = 2, repeat: int = 5) -> float:
    """Median wall time of ``fn`` in milliseconds (CUDA: synchronised before and after each run)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    samples = []
    for _ in range(repeat):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def _proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as status:
        match = re.search(rf"^{key}:\s+(\d+) kB", status.read(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {key} line")
    return int(match.group(1))


def peak_memory_mb(fn: Callable[[], object], device: str) -> float:
    """Peak memory that ``fn`` adds on top of what is live when it starts, in MiB."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    libc = _glibc()
    if libc is not None:
        # glibc keeps freed buffers in its heap and serves later allocations from there, where they
        # never show in the resident set: for the measurement, give every allocation of 64 KiB or
        # more its own mapping and hand free heap pages back first.
        libc.mallopt(_M_MMAP_THRESHOLD, 64 * 1024)
        libc.mallopt(_M_TRIM_THRESHOLD, 128 * 1024)
        libc.malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # resets VmHWM, the resident-set high-water mark
        base = _proc_status_kib("VmRSS")
        fn()
        return max(0, _proc_status_kib("VmHWM") - base) / 1024
    finally:
        if libc is not None:
            # Back to what a warmed-up default glibc converges to (its dynamic maximum), so timings
            # taken after this call see buffer reuse as an ordinary process does.
            libc.mallopt(_M_MMAP_THRESHOLD, 32 * 1024 * 1024)
            libc.mallopt(_M_TRIM_THRESHOLD, 64 * 1024 * 1024)


@dataclass
class Results:
    """Long-format rows of one benchmark run; ``finish`` prints the table.

    With ``out_dir`` the CSV is rewritten after every row, so a run stopped by a time limit (the
    GPU check gives every step one) still leaves the rows it measured.
    """

    benchmark: str
    out_dir: Path | None = None
    rows: list[dict] = field(default_factory=list)

    @property
    def path(self) -> Path | None:
        return None if self.out_dir is None else self.out_dir / f"bench_{self.benchmark}.csv"

    def add(self, case: str, provider: str, metric: str, value: float, unit: str) -> None:
        self.rows.append(
            {
                "benchmark": self.benchmark,
                "case": case,
                "provider": provider,
                "metric": metric,
                "value": float(value),
                "unit": unit,
            }
        )
        if self.out_dir is not None:
            self._write(self.out_dir)

    def _write(self, out_dir: Path) -> Path:
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"bench_{self.benchmark}.csv"
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(self.rows)
        return path

    def value(self, case: str, provider: str, metric: str) -> float | None:
        for row in self.rows:
            if (row["case"], row["provider"], row["metric"]) == (case, provider, metric):
                return row["value"]
        return None

    def finish(self, out_dir: Path, title: str | None = None, notes: list[str] = ()) -> Path:
        """Write the CSV (and ``notes``, e.g. target verdicts, beside it), then print the table."""
        path = self._write(out_dir)
        if notes:
            (out_dir / f"bench_{self.benchmark}.targets.txt").write_text("\n".join(notes) + "\n")
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title or f"bench_{self.benchmark}")
        for column in COLUMNS[1:]:
            table.add_column(column, justify="right" if column == "value" else "left")
        for row in self.rows:
            value = row["value"]
            shown = f"{value:.4g}" if abs(value) < 1e6 else f"{value:.4e}"
            table.add_row(row["case"], row["provider"], row["metric"], shown, row["unit"])
        Console(width=140).print(table)
        for line in notes:
            print(line)
        print(f"wrote {path}")
        return path


def environment_line(device: str) -> str:
    """One line naming the machine, for the top of a benchmark's output."""
    if device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        name = f"CPU x{os.cpu_count()} ({torch.get_num_threads()} torch threads)"
    return f"torch {torch.__version__} on {name}"
