"""Checkpoints in Hugging Face format: ``transformers``, SGLang and ``anytime-eval`` load them as they are.

A checkpoint folder holds the model (``config.json`` + safetensors), the tokenizer, the run's
config (``run_config.yaml``) and, for resuming, ``trainer_state.json`` and ``optimizer.pt``. It is
written into a temporary folder and renamed into place, so a crash mid-save never leaves a torn one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import yaml

from trainer.config import RunConfig


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
) -> Path:
    """Write the checkpoint atomically (temporary folder, then rename) and return its path."""
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    # The learner's copy runs the tree attention; the saved config names an ordinary one.
    implementation = model.config._attn_implementation
    model.config._attn_implementation = "sdpa"
    try:
        model.save_pretrained(partial, safe_serialization=True)
    finally:
        model.config._attn_implementation = implementation
    tokenizer.save_pretrained(partial)
    (partial / "run_config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    (partial / "trainer_state.json").write_text(json.dumps({"step": step, "sft_done": sft_done}) + "\n")
    if optimizer is not None:
        state = {"optimizer": optimizer.state_dict()}
        if scheduler is not None:
            state["scheduler"] = scheduler.state_dict()
        torch.save(state, partial / "optimizer.pt")
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
        optimizer.load_state_dict(saved["optimizer"])
        if scheduler is not None and "scheduler" in saved:
            scheduler.load_state_dict(saved["scheduler"])
    return state
