"""One RL step on every rank of a ``torchrun`` job, for tests/test_distributed.py (not a test itself).

    python -m torch.distributed.run --nproc_per_node 2 tests/distributed_worker.py OUT_DIR [key=value ...]

Rank 0 writes ``OUT_DIR/result.pt`` (the loss, the step's metrics, the traces and rollouts it
trained on, and the full updated weights) after the step, and the job writes a distributed
checkpoint into ``OUT_DIR/run/checkpoints/step1``.

    python -m torch.distributed.run --nproc_per_node 2 tests/distributed_worker.py OUT_DIR --evaluate [key=value ...]

runs only ``Trainer.evaluate("start", 0)`` on every rank instead (rank 0 writes
``OUT_DIR/run/eval/start.json``).

    python -m torch.distributed.run --nproc_per_node 2 tests/distributed_worker.py OUT_DIR --stop-on-rank K [key=value ...]

runs ``Trainer.run()``; rank K sends itself SIGUSR1 during the first RL step, and every rank writes
``OUT_DIR/stopped<rank>.json`` with what its ``RunStopped`` says.

    python -m torch.distributed.run --nproc_per_node 2 tests/distributed_worker.py OUT_DIR --run-hiding-evals-on-rank K [key=value ...]

runs ``Trainer(resume="auto").run()``, on rank K as if no evaluation file could be read, and every
rank writes the evaluations it ran into ``OUT_DIR/evaluated<rank>.json``.
"""

import json
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from trainer.config import load_config
from trainer.distributed import full_state_dict
from trainer.loop import Trainer
from trainer.stopping import RunStopped


def run_until_signalled(out: Path, signal_rank: int, overrides: list[str]) -> None:
    trainer = Trainer(load_config(None, overrides), out / "run")
    rl_step = trainer.rl_step

    def signalling(step):
        if step == 0 and trainer.context.rank == signal_rank:
            os.kill(os.getpid(), signal.SIGUSR1)  # handled at the end of this step
            time.sleep(0.2)  # the watcher thread takes it in while the step has not ended
        return rl_step(step)

    trainer.rl_step = signalling
    try:
        trainer.run()
    except RunStopped as stopped:
        record = {"signal": stopped.signal_name, "step": stopped.step, "checkpoint": stopped.checkpoint.name}
        (out / f"stopped{trainer.context.rank}.json").write_text(json.dumps(record))
    dist.barrier()
    dist.destroy_process_group()


def run_hiding_evaluations(out: Path, hiding_rank: int, overrides: list[str]) -> None:
    trainer = Trainer(load_config(None, overrides), out / "run", resume="auto")
    evaluated = []
    evaluate = trainer.evaluate

    def recording(name, step):
        evaluated.append(name)
        return evaluate(name, step)

    trainer.evaluate = recording
    if trainer.context.rank == hiding_rank:
        trainer._load_evaluation = lambda name, as_name=None: None  # e.g. a node whose folder lags behind
    trainer.run()
    (out / f"evaluated{trainer.context.rank}.json").write_text(json.dumps(evaluated))
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    out = Path(sys.argv[1])
    if sys.argv[2:3] == ["--stop-on-rank"]:
        run_until_signalled(out, int(sys.argv[3]), sys.argv[4:])
        return
    if sys.argv[2:3] == ["--run-hiding-evals-on-rank"]:
        run_hiding_evaluations(out, int(sys.argv[3]), sys.argv[4:])
        return
    evaluate_only = sys.argv[2:3] == ["--evaluate"]
    trainer = Trainer(load_config(None, sys.argv[3:] if evaluate_only else sys.argv[2:]), out / "run")
    if evaluate_only:
        trainer.evaluate("start", step=0)
        trainer.metrics.close()
        # Ranks > 0 leave evaluate() right after sending their share; tearing gloo down before rank 0
        # has received it aborts the process ("terminate called without an active exception").
        dist.barrier()
        dist.destroy_process_group()
        return
    seen = {}
    rollout_metrics = trainer._rollout_metrics

    def recording(traces, scored, batch, engine_stats):  # rank 0: what the step trained on
        seen.update(traces=traces, rollouts=scored.rollouts)
        return rollout_metrics(traces, scored, batch, engine_stats)

    trainer._rollout_metrics = recording
    metrics = trainer.rl_step(0)
    weights = full_state_dict(trainer.parts.policy.module, trainer.context)
    if trainer.context.is_main:
        torch.save({"loss": metrics["train/loss"], "metrics": metrics, "weights": weights,
                    "world_size": trainer.context.world_size, **seen}, out / "result.pt")  # fmt: skip
    trainer.save("step1", 1)
    trainer.metrics.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # The results are on disk and the process group is gone: skip interpreter finalization, where a
    # few percent of gloo ranks abort ("terminate called without an active exception") after a
    # clean run, which would fail the job for nothing the tests check.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
