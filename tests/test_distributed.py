"""Data parallelism with FSDP2 on CPU (gloo, 2 processes): one update equals the one-process update,
and a checkpoint written by 2 ranks resumes on 1."""

import copy
import json
import os
import random
import socket
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from fixtures.rewards import LENGTH_REWARD
from test_policy_tree import random_rollouts, tiny_model
from test_trainer import TINY

from anytime_kernels import pack_response_trees
from trainer.budgets import BudgetSchedule
from trainer.components import make_engine
from trainer.config import load_config
from trainer.distributed import Distributed, fsdp_param_dtype, split_rows
from trainer.evaluate import EvalResult, eval_result, evaluate_samples
from trainer.loop import Trainer
from trainer.policy import TreePolicy
from trainer.rollout import SummaryBatch

ROOT = Path(__file__).resolve().parent.parent
# Two optimizer updates of 2 prompts x G=2; a reward with signal so the update is not empty.
STEP = [*TINY, "sft.steps=0", "logging.tensorboard=false", "rollout.reward=length_reward:reward"]


def worker_env(*paths) -> dict[str, str]:
    """The environment of a torchrun job: ``paths`` importable, one thread per rank, Python stacks on
    a crash, and without the Triton interpreter that conftest sets (the workers run the CPU
    backends, and with it set more gloo ranks abort in interpreter finalization)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(p) for p in paths), "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONFAULTHANDLER"] = "1"
    return env


def run_ranks(nproc: int, script: str, paths: list, args: list, timeout: int = 280) -> None:
    """``torchrun --nproc_per_node nproc tests/<script> args...`` on this machine; fails the test
    with the job's output unless every rank exits 0."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
               "127.0.0.1", "--master_port", str(free_port()), str(ROOT / "tests" / script), *map(str, args)]  # fmt: skip
    done = subprocess.run(command, env=worker_env(*paths), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_resumed_finished_run_reuses_its_final_evaluation_only_when_every_rank_reads_it(tmp_path):
    """``--resume auto`` of a finished 2-rank run (every rank samples its share of the evaluation):
    with eval/final.json readable on every rank, no rank evaluates; when one rank cannot read it
    (a lagging node's folder), every rank evaluates again, to the same result. Had only that rank
    evaluated, it would wait in the evaluation's collectives until the timeout."""
    (tmp_path / "length_reward.py").write_text(LENGTH_REWARD)
    config = [
        *STEP,
        "train.steps=1",
        "train.save_every=0",
        "rollout.every_rank=true",
        "data.synthetic.num_eval=16",
        "train.dist_timeout_minutes=1",
    ]  # a rank left waiting fails the job in a minute

    def run(hiding_rank: int) -> list[list[str]]:
        run_ranks(2, "distributed_worker.py", [ROOT, tmp_path], [tmp_path, "--run-hiding-evals-on-rank", hiding_rank, *config])  # fmt: skip
        return [json.loads((tmp_path / f"evaluated{rank}.json").read_text()) for rank in (0, 1)]

    assert run(hiding_rank=-1) == [["start", "final"]] * 2
    final = (tmp_path / "run" / "eval" / "final.json").read_text()
    assert run(hiding_rank=-1) == [[], []]
    assert run(hiding_rank=1) == [["final"], ["final"]]
    assert json.loads((tmp_path / "run" / "eval" / "final.json").read_text()) == json.loads(final)


def test_a_stop_signal_on_one_rank_stops_every_rank_after_the_same_step(tmp_path, monkeypatch):
    """SIGUSR1 reaches rank 1 alone during the first RL step: the ranks agree at the step's end
    (on the signal too), write one checkpoint of step 1 together and stop. With bf16 autocast
    every rank's engine holds bf16 weights, yet the checkpoint's export holds the learner's fp32
    weights: what its sharded state loads into one process."""
    from safetensors.torch import load_file

    (tmp_path / "length_reward.py").write_text(LENGTH_REWARD)
    monkeypatch.syspath_prepend(str(tmp_path))
    tied = ("model.config={hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, num_attention_heads: 4, "
            "num_key_value_heads: 2, max_position_embeddings: 512, tie_word_embeddings: true}")  # fmt: skip
    config = [*STEP, tied, "train.steps=3", "train.save_every=0", "model.autocast=bfloat16", "rollout.every_rank=true"]
    run_ranks(2, "distributed_worker.py", [ROOT, tmp_path], [tmp_path, "--stop-on-rank", "1", *config])
    records = [json.loads((tmp_path / f"stopped{rank}.json").read_text()) for rank in (0, 1)]
    assert records == [{"signal": "SIGUSR1", "step": 1, "checkpoint": "step1"}] * 2
    checkpoint = tmp_path / "run" / "checkpoints" / "step1"
    assert (checkpoint / "dcp").is_dir() and json.loads((checkpoint / "trainer_state.json").read_text())["step"] == 1
    assert not (tmp_path / "run" / "checkpoints" / "final").exists()
    exported = load_file(checkpoint / "model.safetensors")
    assert "lm_head.weight" not in exported  # tied to the embeddings: saved once, as one process saves it
    resumed = Trainer(load_config(None, config), tmp_path / "resumed", resume=checkpoint)
    state = resumed.parts.policy.model.state_dict()
    assert set(state) - set(exported) == {"lm_head.weight"}
    for name, tensor in exported.items():
        assert tensor.dtype == torch.float32 and torch.equal(state[name], tensor), name
    resumed.metrics.close()


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

    run_ranks(2, "distributed_worker.py", [ROOT, tmp_path], [str(tmp_path / "ranks"), *STEP], timeout=280)
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
def test_every_rank_rolls_out_its_share_and_the_update_trains_on_all(tmp_path, monkeypatch):
    """rollout.every_rank, 2 ranks: rank k's engine (seed + k) samples the k-th half of the step's
    prompts, exactly what a one-process engine with that seed samples for them; rank 0 trains on
    the halves in prompt order, as one process would on the same rollouts; the metrics count both
    halves; the checkpoint keeps each rank's sampling stream."""
    (tmp_path / "length_reward.py").write_text(LENGTH_REWARD)
    monkeypatch.syspath_prepend(str(tmp_path))
    run_ranks(
        2,
        "distributed_worker.py",
        [ROOT, tmp_path],
        [str(tmp_path / "ranks"), *STEP, "rollout.every_rank=true"],
        timeout=280,
    )
    result = torch.load(tmp_path / "ranks" / "result.pt", weights_only=False)

    torch.manual_seed(0)
    single = Trainer(load_config(None, STEP), tmp_path / "single")
    c, p = single.config, single.parts
    prompts = p.sampler.batch(0)
    assert len(prompts) == 4
    engines = [p.engine, make_engine(c, copy.deepcopy(p.engine.model), p.tokenizer, tmp_path, seed=c.train.seed + 1)]
    halves = [
        engine.rollout([q.token_ids for q in prompts[2 * k : 2 * k + 2]], c.rollout.group_size, c.method.b_max, p.schedule,
                       c.method.num_summaries, single.sampling, c.rollout.summary_max_new_tokens)[1]
        for k, engine in enumerate(engines)
    ]  # fmt: skip
    expected = SummaryBatch.concatenate(halves)
    got = result["rollouts"]
    for field in ("prompt_ids", "thinking_ids", "inserted_ids", "summary_ids", "summary_finish"):
        assert getattr(got, field) == getattr(expected, field), field
    assert torch.equal(got.cut_lens, expected.cut_lens)
    assert result["traces"].thinking_ids == expected.thinking_ids
    stats = [engine.reset_stats() for engine in engines]
    sampled = sum(s.think.generated_tokens + s.summarize.generated_tokens for s in stats)
    assert result["metrics"]["rollout/sampled_tokens"] == sampled > 0

    rng = torch.load(tmp_path / "ranks" / "run" / "checkpoints" / "step1" / "rng.pt", weights_only=False)
    assert len(rng["engine_ranks"]) == 2
    for rank, engine in enumerate(engines):
        assert torch.equal(rng["engine_ranks"][rank], engine._generator.get_state()), rank

    monkeypatch.setattr(p.engine, "rollout", lambda *args, **kwargs: (result["traces"], result["rollouts"]))
    update = single.rl_step(0)
    assert result["loss"] == pytest.approx(update["train/loss"], rel=1e-5, abs=1e-7)
    for name, tensor in single.parts.policy.model.state_dict().items():
        torch.testing.assert_close(result["weights"]["model." + name], tensor, rtol=1e-5, atol=1e-6, msg=name)


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
    run_ranks(
        3,
        "distributed_worker.py",
        [ROOT, tmp_path],
        [str(tmp_path / "ranks"), *step, "train.dist_timeout_minutes=1"],
        timeout=280,
    )
    result = torch.load(tmp_path / "ranks" / "result.pt", weights_only=False)
    assert result["world_size"] == 3
    assert result["loss"] == pytest.approx(expected["train/loss"], rel=1e-5, abs=1e-7)
    # Four Adam steps of lr 1e-3 over 3-way gradient sums in another order: ~2e-6 apart (0.2% of a step).
    for name, tensor in single.parts.policy.model.state_dict().items():
        torch.testing.assert_close(result["weights"]["model." + name], tensor, rtol=1e-5, atol=1e-5, msg=name)


def test_fsdp_param_dtype_setting():
    assert fsdp_param_dtype("auto", torch.bfloat16) == torch.bfloat16  # gather in the autocast dtype
    assert fsdp_param_dtype("auto", None) is None
    assert fsdp_param_dtype("float32", torch.bfloat16) is None
    assert fsdp_param_dtype("bfloat16", None) == torch.bfloat16
    with pytest.raises(ValueError, match="'fp8'"):
        fsdp_param_dtype("fp8", None)
    with pytest.raises(ValueError, match=r"train\.fsdp_param_dtype"):
        load_config(None, [*TINY, "train.fsdp_param_dtype=half"])


def one_process_step(param_dtype: torch.dtype) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """What tests/fsdp_worker.py runs, in one process without FSDP: the parameters (not the
    buffers, such as RoPE's frequencies) cast to ``param_dtype``, gradients read back in fp32."""
    layout = pack_response_trees(*random_rollouts(seed=3))
    model = tiny_model("qwen2")
    for parameter in model.parameters():
        parameter.data = parameter.data.to(param_dtype)
    result = TreePolicy(model, attention_backend="sdpa", autocast_dtype=torch.bfloat16).forward(layout)
    weights = torch.randn(result.logprobs.numel(), generator=torch.Generator().manual_seed(0))
    (result.logprobs * weights).sum().backward()
    return result.logprobs.detach(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.timeout(200)
def test_fsdp_mixed_precision_gathers_bf16_weights_and_reduces_fp32_gradients(tmp_path):
    """shard_policy(param_dtype=bf16): layers compute with bf16 copies of the weights, the
    gradients land in fp32 shards, and forward and gradients equal one process running bf16
    parameters (fp32 buffers). Without it, they equal one process with fp32 parameters."""
    run_ranks(2, "fsdp_worker.py", [ROOT, ROOT / "tests"], [tmp_path / "out.pt"], timeout=180)
    results = torch.load(tmp_path / "out.pt", weights_only=False)
    expected = {"None": one_process_step(torch.float32), "torch.bfloat16": one_process_step(torch.bfloat16)}
    for key, compute in (("None", "torch.float32"), ("torch.bfloat16", "torch.bfloat16")):
        got = results[key]
        assert got["compute_dtype"] == compute, key
        assert got["shard_dtypes"] == {"torch.float32"} and got["grad_dtypes"] == {"torch.float32"}, key
        logprobs, grads = expected[key]
        torch.testing.assert_close(got["logprobs"], logprobs, rtol=1e-6, atol=1e-6, msg=key)
        assert got["grads"].keys() == grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(got["grads"][name], grad, rtol=1e-5, atol=1e-6, msg=f"{key} {name}")
    # The two references differ far beyond those tolerances, so each run matched its own.
    (fp32_logprobs, fp32_grads), (bf16_logprobs, bf16_grads) = expected.values()
    assert (fp32_logprobs - bf16_logprobs).abs().max() > 1e-4
    assert max(float((fp32_grads[n] - bf16_grads[n]).norm() / fp32_grads[n].norm()) for n in fp32_grads) > 1e-3


@pytest.mark.timeout(300)
def test_every_rank_evaluates_its_share_of_the_problems(tmp_path):
    """rollout.every_rank, 2 ranks: rank k samples the k-th half of the eval problems at seed
    train.seed + 1 + k; rank 0's statistics are those of both halves together, as one process
    computes them from the same samples."""
    problems = ["data.synthetic={num_train: 32, num_eval: 6, min_steps: 1, max_steps: 2, modulus: 10, max_operand: 9}",
                "eval.samples_per_problem=2"]  # fmt: skip
    config = [*STEP, *problems, "rollout.every_rank=true"]
    run_ranks(
        2,
        "distributed_worker.py",
        [ROOT],
        [str(tmp_path / "ranks"), "--evaluate", *config, "rollout.reward=synthetic"],
        timeout=280,
    )
    got = EvalResult.from_json(tmp_path / "ranks" / "run" / "eval" / "start.json")

    single = Trainer(load_config(None, [*config, "rollout.reward=synthetic"]), tmp_path / "single")
    c, p = single.config, single.parts
    schedule = BudgetSchedule.from_budgets(c.eval.budgets or p.schedule.budgets, c.eval.prior)
    prompts = p.eval_sets["eval"]
    assert len(prompts) == 6

    def sample(share, seed):
        return evaluate_samples(
            p.engine, [q.token_ids for q in share], [q.answer for q in share], p.tokenizer, p.reward,
            schedule=schedule, temperature=c.eval.temperature, samples_per_problem=2,
            summary_max_new_tokens=c.eval.summary_max_new_tokens or c.rollout.summary_max_new_tokens,
            eos_token_ids=p.eos_token_ids, seed=seed,
        )  # fmt: skip

    halves = [sample(prompts[3 * k : 3 * k + 3], c.train.seed + 1 + k) for k in (0, 1)]
    expected = eval_result(halves, schedule, 2, c.eval.temperature)
    assert got == expected
    assert got.num_problems == 6
    # The halves were sampled with their own seeds: one seed for both would give other traces.
    same_seed = sample(prompts[3:], c.train.seed + 1)
    assert same_seed.thinking_lens != halves[1].thinking_lens


def test_every_rank_resume_gives_each_rank_its_own_sampling_stream():
    """A checkpoint of rollout.every_rank holds every rank's engine state: rank k restores the k-th;
    one written by another number of ranks leaves ranks > 0 on their seeded streams."""

    def rank_view(rank: int, world_size: int):
        generator = torch.Generator().manual_seed(100 + rank)
        parts = types.SimpleNamespace(engine=types.SimpleNamespace(_generator=generator),
                                      learner=types.SimpleNamespace(rng=random.Random(0)))  # fmt: skip
        return types.SimpleNamespace(every_rank=True, context=Distributed(rank, world_size), parts=parts)

    streams = [torch.Generator().manual_seed(seed).get_state() for seed in (7, 8)]
    states = {"torch": torch.get_rng_state(), "python": random.getstate(), "learner": random.Random(1).getstate(),
              "engine": streams[0], "engine_device": "cpu", "engine_ranks": streams}  # fmt: skip
    for rank in (0, 1):
        view = rank_view(rank, 2)
        Trainer._restore_random_states(view, states)
        assert torch.equal(view.parts.engine._generator.get_state(), streams[rank]), rank
    seeded = torch.Generator().manual_seed(101).get_state()
    view = rank_view(1, 3)  # saved by 2 ranks, resumed on 3: rank 1 keeps its own seeded stream
    Trainer._restore_random_states(view, states)
    assert torch.equal(view.parts.engine._generator.get_state(), seeded)
    view = rank_view(0, 3)  # rank 0 continues the run's stream
    Trainer._restore_random_states(view, states)
    assert torch.equal(view.parts.engine._generator.get_state(), streams[0])


def test_every_rank_needs_the_embedded_engine():
    with pytest.raises(ValueError, match=r"rollout\.every_rank"):
        load_config(None, [*TINY, "rollout.every_rank=true", "rollout.engine=sglang", "rollout.urls=[http://h:1]"])
    assert load_config(None, [*TINY, "rollout.every_rank=true"]).rollout.every_rank is True
