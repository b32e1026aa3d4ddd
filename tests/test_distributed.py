"""Data parallelism with FSDP2 on CPU (gloo, 2 processes): one update equals the one-process update,
and a checkpoint written by 2 ranks resumes on 1."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fixtures.rewards import LENGTH_REWARD
from test_trainer import TINY

from trainer.config import load_config
from trainer.distributed import split_rows
from trainer.loop import Trainer

ROOT = Path(__file__).resolve().parent.parent
# Two optimizer updates of 2 prompts x G=2; a reward with signal so the update is not empty.
STEP = [*TINY, "sft.steps=0", "logging.tensorboard=false", "rollout.reward=length_reward:reward"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_split_rows_balances_tokens_and_keeps_order():
    shares = split_rows([5, 1, 9, 3, 3, 2], [0, 1, 2, 3, 4, 5], 2)
    assert sorted(r for share in shares for r in share) == [0, 1, 2, 3, 4, 5]
    loads = [sum([5, 1, 9, 3, 3, 2][r] for r in share) for share in shares]
    assert abs(loads[0] - loads[1]) <= 1 and all(share == sorted(share) for share in shares)
    assert split_rows([4], [0], 3) == [[0], [], []]


@pytest.mark.timeout(300)
def test_two_ranks_update_like_one_process_and_their_checkpoint_resumes_on_one(tmp_path, monkeypatch):
    (tmp_path / "length_reward.py").write_text(LENGTH_REWARD)
    monkeypatch.syspath_prepend(str(tmp_path))
    torch.manual_seed(0)
    single = Trainer(load_config(None, STEP), tmp_path / "single")
    expected = single.rl_step(0)
    expected_weights = single.parts.policy.model.state_dict()
    initial = Trainer(load_config(None, STEP), tmp_path / "initial").parts.policy.model.state_dict()
    assert any(not torch.equal(expected_weights[k], initial[k]) for k in initial), "the update changed nothing"

    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{tmp_path}", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), str(ROOT / "tests" / "distributed_worker.py"),
               str(tmp_path / "ranks"), *STEP]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = torch.load(tmp_path / "ranks" / "result.pt", weights_only=False)
    assert result["world_size"] == 2
    assert result["loss"] == pytest.approx(expected["train/loss"], rel=1e-5, abs=1e-7)
    for name, tensor in expected_weights.items():
        torch.testing.assert_close(result["weights"]["model." + name], tensor, rtol=1e-5, atol=1e-6, msg=name)

    checkpoint = tmp_path / "ranks" / "run" / "checkpoints" / "step1"
    assert (checkpoint / "dcp").is_dir() and (checkpoint / "model.safetensors").is_file()
    resumed = Trainer(load_config(None, [*STEP, "train.steps=2"]), tmp_path / "resumed", resume=checkpoint)
    assert resumed.start_step == 1
    for name, tensor in expected_weights.items():
        torch.testing.assert_close(resumed.parts.policy.model.state_dict()[name], tensor, rtol=1e-5, atol=1e-6)
    # The Adam moments of the 2-rank run, resharded onto one process, equal the one-process ones.
    single_state = single.parts.learner.optimizer.state_dict()["state"]
    resumed_state = resumed.parts.learner.optimizer.state_dict()["state"]
    assert single_state.keys() == resumed_state.keys()
    for key in single_state:
        torch.testing.assert_close(resumed_state[key]["exp_avg"], single_state[key]["exp_avg"], rtol=1e-4, atol=1e-7)
    resumed.rl_step(1)  # and training goes on


@pytest.mark.timeout(300)
def test_a_rank_without_trees_of_its_own_keeps_step_with_the_others(tmp_path, monkeypatch):
    """3 ranks and mini-batches of 2 trees: one rank runs filler forwards only, yet joins every
    collective (FSDP all-gathers and the metric all-reduces) and the step equals one process's."""
    (tmp_path / "length_reward.py").write_text(LENGTH_REWARD)
    monkeypatch.syspath_prepend(str(tmp_path))
    torch.manual_seed(0)
    step = [*STEP, "train.ppo_mini_batch_prompts=1"]  # 4 updates of 1 prompt x G=2: 2 trees for 3 ranks
    single = Trainer(load_config(None, step), tmp_path / "single")
    expected = single.rl_step(0)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{tmp_path}", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "3", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), str(ROOT / "tests" / "distributed_worker.py"),
               str(tmp_path / "ranks"), *step, "train.dist_timeout_minutes=1"]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = torch.load(tmp_path / "ranks" / "result.pt", weights_only=False)
    assert result["world_size"] == 3
    assert result["loss"] == pytest.approx(expected["train/loss"], rel=1e-5, abs=1e-7)
    # Four Adam steps of lr 1e-3 over 3-way gradient sums in another order: ~2e-6 apart (0.2% of a step).
    for name, tensor in single.parts.policy.model.state_dict().items():
        torch.testing.assert_close(result["weights"]["model." + name], tensor, rtol=1e-5, atol=1e-5, msg=name)
