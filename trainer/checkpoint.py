"""Checkpoints in Hugging Face format: ``transformers``, SGLang and ``anytime-eval`` load them as they are.

A checkpoint folder holds the model (``config.json`` + safetensors), the tokenizer, the run's
config (``run_config.yaml``) and, for resuming, ``trainer_state.json`` (step, SFT flag, how many
lines of ``metrics.jsonl`` it covers), ``optimizer.pt`` (optimizer and LR schedule) and
``rng.pt`` (every random state of the run). It is written into ``<name>.partial`` and renamed into
place, so a crash mid-save leaves only a ``.partial`` folder, which ``latest_checkpoint`` ignores.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import yaml
from transformers.utils import logging as hf_logging

from trainer.config import RunConfig


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file and a rename: a kill mid-write leaves
    the old file (or none), never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # one per process: ranks may write at once
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)
    return path


def save_checkpoint(
    path: Path,
    model: torch.nn.Module,
    tokenizer,
    config: RunConfig,
    *,
    step: int,
    sft_done: bool = True,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler=None,
    rng_state: dict | None = None,
    metrics_lines: int | None = None,
    reuse_partial: bool = False,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write the checkpoint atomically (temporary folder, then rename) and return its path.

    ``reuse_partial``: the ``.partial`` folder already holds parts written by every rank (``dcp/``).
    ``state_dict``: the weights to export instead of ``model``'s own (``model`` gives the config).
    """
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    if not reuse_partial:
        shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True, exist_ok=True)
    # The learner's copy runs the tree attention; the saved config names an ordinary one.
    implementation, dtype = model.config._attn_implementation, model.config.dtype
    # The config names the dtype of the weights it is saved with (from_pretrained loads in it).
    exported = {t.dtype for t in (state_dict or {}).values() if t.is_floating_point()}
    model.config._attn_implementation = "sdpa"
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a bar per checkpoint would cut into the run's own
    try:
        model.save_pretrained(partial, safe_serialization=True, state_dict=state_dict)
        if len(exported) == 1 and exported != {model.dtype}:
            model.config.dtype = exported.pop()
            model.config.save_pretrained(partial)
    finally:
        model.config._attn_implementation, model.config.dtype = implementation, dtype
        if bars:
            hf_logging.enable_progress_bar()
    tokenizer.save_pretrained(partial)
    (partial / "run_config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    if rng_state is not None:
        torch.save(rng_state, partial / "rng.pt")
    state = {}
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    if state:
        torch.save(state, partial / "optimizer.pt")
    # Written last: a folder with trainer_state.json is a complete checkpoint.
    trainer_state = {"step": step, "sft_done": sft_done, "metrics_lines": metrics_lines}
    (partial / "trainer_state.json").write_text(json.dumps(trainer_state) + "\n")
    if path.exists():
        shutil.rmtree(path)
    partial.rename(path)
    return path


def load_trainer_state(path: Path, optimizer: torch.optim.Optimizer | None = None, scheduler=None) -> dict:
    """The saved step (and SFT flag); restores the optimizer's (and LR schedule's) state when saved."""
    state_path = Path(path) / "trainer_state.json"
    if not state_path.is_file():
        raise FileNotFoundError(f"{path} is not a training checkpoint: it has no trainer_state.json")
    state = json.loads(state_path.read_text())
    optimizer_path = Path(path) / "optimizer.pt"
    if optimizer is not None and optimizer_path.is_file():
        saved = torch.load(optimizer_path, map_location="cpu", weights_only=True)
        if "optimizer" in saved:  # distributed runs keep it sharded in dcp/ instead
            optimizer.load_state_dict(saved["optimizer"])
        if scheduler is not None and "scheduler" in saved:
            scheduler.load_state_dict(saved["scheduler"])
    return state


def load_rng_state(path: Path) -> dict | None:
    """The random states saved with a checkpoint (None for one written without them)."""
    rng_path = Path(path) / "rng.pt"
    return torch.load(rng_path, weights_only=False) if rng_path.is_file() else None


def latest_checkpoint(checkpoints_dir: Path) -> Path | None:
    """The complete checkpoint with the highest step in ``checkpoints_dir`` (``.partial`` ones ignored)."""
    best: tuple[int, float, Path] | None = None
    if not Path(checkpoints_dir).is_dir():
        return None
    for folder in Path(checkpoints_dir).iterdir():
        state = folder / "trainer_state.json"
        if folder.name.endswith(".partial") or not state.is_file():
            continue
        try:
            step = int(json.loads(state.read_text())["step"])
        except (ValueError, KeyError, json.JSONDecodeError):
            continue
        key = (step, state.stat().st_mtime, folder)
        if best is None or key[:2] > best[:2]:
            best = key
    return None if best is None else best[2]


def prune_checkpoints(checkpoints_dir: Path, keep: int) -> list[Path]:
    """Remove all but the newest ``keep`` complete periodic checkpoints (``step<N>``); returns what went."""
    periodic = sorted(
        (
            folder
            for folder in Path(checkpoints_dir).glob("step*")
            if folder.name[4:].isdigit() and (folder / "trainer_state.json").is_file()
        ),
        key=lambda folder: int(folder.name[4:]),
    )
    removed = periodic[: max(len(periodic) - keep, 0)]
    for folder in removed:
        shutil.rmtree(folder, ignore_errors=True)
    return removed
