"""Command-line entry points: ``anytime-train``, ``anytime-eval`` (``trainer.evaluate``), ``anytime-bench``.

anytime-train --config configs/tiny-cpu.yaml --out runs/demo [--max-steps N] [--resume CKPT] [key=value ...]
anytime-bench [--quick] [--device cpu|cuda] [--out DIR] [name ...]
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from trainer.config import ConfigError, describe, load_config

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def train_main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="anytime-train", description="Train a policy for anytime reasoning (BRPO).")
    parser.add_argument("--config", help="run config YAML (configs/*.yaml)")
    parser.add_argument("--out", type=Path, help="run folder (default: runs/<name>)")
    parser.add_argument("--max-steps", type=int, help="stop after N RL steps (the SFT warm-up shrinks in proportion)")
    parser.add_argument("--resume", help="checkpoint folder to resume from, or 'auto' (the run folder's newest)")
    parser.add_argument("--help-config", action="store_true", help="list every config key with its default and help")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. optim.lr=3e-4")
    args = parser.parse_args(argv)
    if args.help_config:
        print("\n".join(describe()))
        return
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as error:
        parser.error(str(error))
    if args.max_steps is not None and args.max_steps < 1:
        parser.error(f"--max-steps must be >= 1, got {args.max_steps}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from trainer.loop import train
    from trainer.stopping import RunStopped

    run_dir = args.out or Path("runs") / config.name
    try:
        train(config, run_dir, max_steps=args.max_steps, resume=args.resume)
    except RunStopped as stopped:
        if os.environ.get("RANK", "0") == "0":
            print(f"run folder: {run_dir}: {stopped}")
        sys.exit(stopped.exit_code)
    if os.environ.get("RANK", "0") == "0":  # torchrun: once, from rank 0
        print(
            f"run folder: {run_dir} (report.md, metrics.jsonl, eval/, checkpoints/final, budget_accuracy.png, training_curves.png)"
        )


def eval_main(argv: Sequence[str] | None = None) -> None:
    from trainer.evaluate import main

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    main(argv)


def bench_main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="anytime-bench", description="Run the benchmark scripts (benchmarks/).")
    parser.add_argument("names", nargs="*", help="benchmarks to run (default: all), e.g. logprobs tree_pack")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", choices=("cpu", "cuda"))
    parser.add_argument("--out", default="bench_out")
    args = parser.parse_args(argv)
    if not BENCHMARKS.is_dir():
        parser.error(f"the benchmark scripts ship with the repository ({BENCHMARKS} is missing)")
    available = sorted(path.stem.removeprefix("bench_") for path in BENCHMARKS.glob("bench_*.py"))
    unknown = sorted(set(args.names) - set(available))
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; available: {available}")
    failed = []
    for name in args.names or available:
        command = [sys.executable, str(BENCHMARKS / f"bench_{name}.py"), "--out", args.out]
        command += ["--quick"] if args.quick else []
        command += ["--device", args.device] if args.device else []
        if subprocess.run(command, check=False).returncode != 0:
            failed.append(name)
    if failed:
        sys.exit(f"benchmarks failed: {failed}")


if __name__ == "__main__":
    train_main()
