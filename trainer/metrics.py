"""Run metrics: ``metrics.jsonl`` (one object per step, flushed at once, so a crash loses nothing),
TensorBoard events in the run folder, Weights & Biases when installed and enabled, and a rich live
display of the step's phases with an ETA.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


class MetricsLogger:
    """Writes every step's metrics to ``metrics.jsonl``, TensorBoard and (optionally) wandb."""

    def __init__(self, run_dir: Path, *, tensorboard: bool = True, wandb: bool = False, project: str = "", config=None):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.lines = len(self.path.read_text(encoding="utf-8").splitlines()) if self.path.exists() else 0
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115  (closed in close())
        self._writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))
        self._wandb = None
        if wandb:
            try:
                import wandb as wandb_module
            except ImportError:
                logger.warning("logging.wandb is on but wandb is not installed; skipping wandb")
            else:
                self._wandb = wandb_module.init(project=project, dir=str(run_dir), config=config)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        record = {"step": step, **{k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                                    for k, v in metrics.items()}}  # fmt: skip
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        self.lines += 1
        if self._writer is not None:
            for name, value in metrics.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self._writer.add_scalar(name, value, step)
            self._writer.flush()
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)

    def close(self) -> None:
        self._file.close()
        if self._writer is not None:
            self._writer.close()
        if self._wandb is not None:
            self._wandb.finish()


class NullMetrics:
    """What ranks other than 0 log to: nothing (rank 0 logs the run)."""

    lines = 0

    def log(self, step: int, metrics: dict[str, float]) -> None:
        return None

    def close(self) -> None:
        return None


def _synchronize() -> None:
    """Wait for this process's queued CUDA work (a few times per step; nothing without CUDA)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class PhaseTimer:
    """Seconds per phase of a step (``with timer.phase("think"): ...``), shown live when a display is given."""

    def __init__(self, display: Display | None = None) -> None:
        self.seconds: dict[str, float] = {}
        self.display = display

    @contextlib.contextmanager
    def phase(self, name: str):
        if self.display is not None:
            self.display.phase(name)
        _synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            _synchronize()  # CUDA work queued in this phase counts here, not in the next one
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def metrics(self) -> dict[str, float]:
        return {f"time/{name}_s": value for name, value in self.seconds.items()}


class Display:
    """A rich progress bar over the run's steps: the current phase, ETA, and the latest key figures."""

    def __init__(self, total: int, description: str, enabled: bool = True) -> None:
        self.enabled = enabled
        self._progress = None
        if not enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[phase]}"),
            TextColumn("{task.fields[figures]}"),
        )
        self._progress.start()
        self._task = self._progress.add_task(description, total=total, phase="", figures="")

    def phase(self, name: str) -> None:
        if self._progress is not None:
            self._progress.update(self._task, phase=f"[cyan]{name}")

    def advance(self, figures: str = "") -> None:
        if self._progress is not None:
            self._progress.update(self._task, advance=1, figures=figures, phase="")

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()


def environment() -> dict:
    """What a run ran on: versions, the code's git commit (when it is a checkout), devices, the
    command line and the start time (``environment.json`` in the run folder)."""
    import platform
    import subprocess
    import sys

    import transformers
    import triton

    import anytime_kernels

    commit = None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        root = Path(anytime_kernels.__file__).resolve().parent.parent
        git = ["git", "--no-optional-locks", "-C", str(root)]
        done = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if done.returncode == 0:
            dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=10).stdout.strip()  # fmt: skip
            commit = done.stdout.strip() + ("+uncommitted changes" if dirty else "")
    cuda = torch.cuda.is_available()
    return {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "argv": sys.argv,
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": getattr(triton, "__version__", None),
        "transformers": getattr(transformers, "__version__", None),
        "anytime_kernels": getattr(anytime_kernels, "__version__", None),
        "git_commit": commit,
        "cuda": torch.version.cuda if cuda else None,
        "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else ["cpu"],
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
    }


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a ``metrics.jsonl`` in order (missing values read as None)."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def training_series(records: list[dict]) -> dict[str, dict[str, tuple[list[int], list[float]]]]:
    """What :func:`plot_training_curves` draws: panel -> line -> (steps, values), from the RL
    steps' records (``train/loss`` present; SFT records have steps <= 0) and the evaluations'."""
    steps = [r for r in records if "train/loss" in r and r["step"] > 0]

    def series(key: str, rows: list[dict]) -> tuple[list[int], list[float]]:
        points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        return [s for s, _ in points], [v for _, v in points]

    budgets = sorted({key for r in steps for key in r if key.startswith("rollout/accuracy@")},
                     key=lambda key: int(key.rsplit("@", 1)[1]))  # fmt: skip
    phases = sorted(
        {key for r in steps for key in r if key.startswith("time/") and key.endswith("_s")}
        - {"time/step_s", "time/tokens_per_s"}
    )
    panels = {
        "anytime score": {"rollouts": series("rollout/anytime_score", steps),
                          "evaluation": series("eval/anytime_score", [r for r in records if "train/loss" not in r])},
        "rollout accuracy by budget": {key.removeprefix("rollout/"): series(key, steps) for key in budgets},
        "thinking tokens": {"mean per trace": series("rollout/thinking_tokens", steps)},
        "loss": {"policy loss": series("train/loss", steps)},
        "gradient norm": {"before clipping": series("train/grad_norm", steps)},
        "seconds per step": {"whole step": series("time/step_s", steps),
                             **{key.removeprefix("time/").removesuffix("_s"): series(key, steps) for key in phases}},
    }  # fmt: skip
    return {name: {label: line for label, line in lines.items() if line[0]} for name, lines in panels.items()}


def plot_training_curves(metrics_path: str | Path, out_path: str | Path, title: str = "") -> Path | None:
    """``training_curves.png``: a panel per quantity of the RL steps (see :func:`training_series`);
    None when there is no RL step to draw."""
    panels = {name: lines for name, lines in training_series(read_metrics(metrics_path)).items() if lines}
    if not any(name != "anytime score" for name in panels):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = 3
    rows = -(-len(panels) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.2 * rows), dpi=110, squeeze=False)
    for axis, (name, lines) in zip(axes.flat, panels.items(), strict=False):
        for label, (x, y) in lines.items():
            marker = "o" if len(x) < 30 or label == "evaluation" else None
            axis.plot(x, y, marker=marker, markersize=3, label=label)
        axis.set_title(name)
        axis.set_xlabel("RL step")
        axis.grid(alpha=0.3)
        if len(lines) > 1:
            axis.legend(fontsize="small")
    for axis in list(axes.flat)[len(panels) :]:
        axis.set_visible(False)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    out_path = Path(out_path)
    figure.savefig(out_path)
    plt.close(figure)
    return out_path
