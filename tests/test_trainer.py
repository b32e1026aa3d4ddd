"""The trainer end to end on a tiny model, and its hand-offs: scoring, alignment, checkpoints."""

import json
import math
import random

import pytest
import torch
import yaml
from fixtures.rewards import LENGTH_REWARD
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from anytime_kernels import pack_response_trees, token_advantages
from trainer.batches import score_rollouts
from trainer.config import load_config
from trainer.data import DataError
from trainer.evaluate import EvalResult
from trainer.evaluate import main as eval_main
from trainer.learner import Learner
from trainer.loop import Trainer
from trainer.metrics import training_series
from trainer.models import load_tokenizer
from trainer.rollout import GenerationRequest, SamplingParams, SummaryBatch
from trainer.synthetic import synthetic_reward
from trainer.tokenizer import build_tokenizer

TINY = [
    "model.tokenizer=synthetic",
    "model.config={hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, num_attention_heads: 4, "
    "num_key_value_heads: 2, max_position_embeddings: 512}",
    "data.synthetic={num_train: 32, num_eval: 4, min_steps: 1, max_steps: 2, modulus: 10, max_operand: 9}",
    "method.preset=ar_linear",
    "method.b_max=16",
    "method.num_summaries=2",
    "rollout.group_size=2",
    "rollout.summary_max_new_tokens=4",
    "optim.lr=1e-3",
    "train.steps=2",
    "train.prompts_per_step=4",
    "train.ppo_mini_batch_prompts=2",
    "train.micro_batch_tokens=512",
    "train.device=cpu",
    "sft.steps=2",
    "sft.batch_size=4",
    "eval.samples_per_problem=1",
    "logging.progress=false",
]


def test_score_rollouts_reads_what_the_authors_read():
    tokenizer = build_tokenizer()

    def ids(text):
        return tokenizer.encode(text, add_special_tokens=False)

    eos, think_end = tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("</think>")
    truncated, closed = ids("...\n\n...\n\n</think>\n\n**Final Answer**\n"), ids("\n\n**Final Answer**\n")
    answer, wrong, bad_format = [*ids("\\boxed{4}"), eos], [*ids("\\boxed{5}"), eos], ids("</think>\\boxed{4}")
    # Trace 0 ended with EOS after 6 tokens; trace 1 closed its thinking with </think> at 6 tokens.
    thinking = [[*ids("1+3=4"), eos], [*ids("1+3=4"), think_end]]
    batch = SummaryBatch(
        prompt_ids=[ids("Q"), ids("Q")],
        thinking_ids=thinking,
        cut_lens=torch.tensor([[3, 6], [3, 6]]),
        inserted_ids=[[tuple(truncated), tuple(truncated)], [tuple(truncated), tuple(closed)]],
        summary_ids=[[[answer], [answer]], [[wrong], [bad_format]]],
        summary_finish=[[["stop"], ["stop"]], [["stop"], ["length"]]],
    )
    scored = score_rollouts(batch, ["4", "4"], tokenizer, synthetic_reward, think_end_id=think_end,
                            eos_token_ids=[eos], group_size=2)  # fmt: skip
    # Trace 0: the early cut scores normally; only the cut that holds the EOS scores 0.
    # Trace 1: a wrong answer, then a summary with a second </think> token (format rule).
    assert scored.scores[:, :, 0].tolist() == [[1.0, 0.0], [0.0, 0.0]]
    assert scored.eos_in_cut.tolist() == [[False, True], [False, False]]
    assert scored.format_ok[:, :, 0].tolist() == [[True, True], [True, False]]
    assert scored.completions[0][0][0] == "1+3...\n\n...\n\n</think>\n\n**Final Answer**\n\\boxed{4}"  # EOS dropped
    assert scored.completions[1][1][0] == "1+3=4</think>\n\n**Final Answer**\n</think>\\boxed{4}"


def test_an_advantage_reaches_the_position_that_predicts_its_token():
    rng = random.Random(0)
    prompts = [[rng.randrange(50) for _ in range(3)] for _ in range(2)]
    thinking = [[rng.randrange(50) for _ in range(7)], [rng.randrange(50) for _ in range(4)]]
    cuts = [[4, 7], [4, 4]]
    inserted = [[[90], [91, 92]], [[93]]]
    summaries = [[[[60, 61], [62]], [[63], [64, 65, 66]]], [[[67], [68]], [[69], [70]]]]
    layout = pack_response_trees(prompts, thinking, cuts, inserted, summaries)
    thinking_adv = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    summary_adv = torch.arange(8, dtype=torch.float32).view(2, 2, 2) * 10 + 10
    own = token_advantages(layout, thinking_adv, summary_adv)
    predicting = token_advantages(layout, thinking_adv, summary_adv, align="predicting")
    for t in range(layout.num_tokens):
        if layout.loss_mask[t]:
            # The target of position t is the token at t + 1, and so is its advantage.
            assert layout.labels[t] == layout.input_ids[t + 1]
            assert predicting[t] == own[t + 1]
        else:
            assert predicting[t] == 0
    # By hand: trace 0's last prompt token predicts z_0 (segment 0: 1.0). Its branch (s=1, a=0) is
    # inserted [91, 92] + summary [63]: 91 predicts an inserted token (untrained), 92 predicts the
    # summary token (its advantage, 30), 63 predicts nothing.
    assert predicting[2] == 1.0
    branch = ((layout.slot == 1) & (layout.summary_index == 0) & (layout.seq_ids == 0)).nonzero().flatten()
    assert layout.input_ids[branch].tolist() == [91, 92, 63]
    assert predicting[branch].tolist() == [0.0, 30.0, 0.0]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    torch.manual_seed(0)
    run_dir = tmp_path_factory.mktemp("run")
    config = load_config(None, TINY)
    trainer = Trainer(config, run_dir)
    before = {name: p.detach().clone() for name, p in trainer.parts.policy.model.named_parameters()}
    evaluations = trainer.run()
    return run_dir, trainer, before, evaluations


def test_two_step_run_trains_and_writes_everything(finished_run):
    run_dir, trainer, before, evaluations = finished_run
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for record in steps:
        assert math.isfinite(record["train/loss"]) and record["train/trained_tokens"] > 0
        assert record["train/updates"] == 2.0  # 4 prompts per step, mini-batches of 2
        assert 0.0 <= record["rollout/reward_mean"] <= 1.0 and "rollout/accuracy@16" in record
        assert {"time/think_s", "time/summarize_s", "time/update_s", "time/tokens_per_s"} <= set(record)
    assert any(r.get("sft/loss") is not None for r in records)
    changed = [n for n, p in trainer.parts.policy.model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert changed, "no parameter changed"
    assert set(evaluations) == {"sft", "final"}
    for name in ("sft", "final"):
        result = EvalResult.from_json(run_dir / "eval" / f"{name}.json")
        assert 0.0 <= result.anytime_score <= 1.0 and result.num_problems == 4
        assert sorted(result.accuracy) == [4, 8, 12, 16]
        expected = sum(result.weights[b] * result.accuracy[b] for b in result.accuracy)
        assert result.anytime_score == pytest.approx(expected)
    assert (run_dir / "budget_accuracy.png").stat().st_size > 1000
    assert "anytime score" in (run_dir / "report.md").read_text()
    assert yaml.safe_load((run_dir / "run_config.yaml").read_text()) == trainer.config.to_dict()
    (start,) = json.loads((run_dir / "environment.json").read_text())
    assert start["torch"] == torch.__version__ and start["start_step"] == 0 and start["devices"] == ["cpu"]
    # training_curves.png draws the RL steps' own records and the evaluations, read back from metrics.jsonl.
    assert (run_dir / "training_curves.png").stat().st_size > 1000
    panels = training_series(records)
    assert panels["loss"]["policy loss"] == ([1, 2], [r["train/loss"] for r in steps])
    assert panels["anytime score"]["evaluation"] == (
        [0, 2],
        [evaluations["sft"].anytime_score, evaluations["final"].anytime_score],
    )
    assert list(panels["rollout accuracy by budget"]) == ["accuracy@4", "accuracy@8", "accuracy@12", "accuracy@16"]
    assert panels["seconds per step"]["update"][1] == [r["time/update_s"] for r in steps]
    assert any((run_dir / "tensorboard").iterdir())
    # The engine's copy was synced with the learner's after the last update.
    engine_state = trainer.parts.engine.model.state_dict()
    for name, tensor in trainer.parts.policy.model.state_dict().items():
        assert torch.equal(engine_state[name], tensor), name


def test_checkpoint_loads_in_transformers_and_anytime_eval(finished_run, tmp_path):
    run_dir, trainer, _, _ = finished_run
    checkpoint = run_dir / "checkpoints" / "final"
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    # The synthetic task's tokenizer is a generic `tokenizers` one: load it as such (AutoTokenizer
    # would pick Qwen2Tokenizer from config.json, which splits the text differently).
    tokenizer = PreTrainedTokenizerFast.from_pretrained(checkpoint)
    for text in ("Start at 3. Add 4. What is the result modulo 10?", "7 + 4 = 1\ncheck: 7 + 4 = 1\n</think>"):
        expected = trainer.parts.tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.encode(text, add_special_tokens=False) == expected
        assert load_tokenizer(load_config(checkpoint / "run_config.yaml", [f"model.path={checkpoint}",
                              "model.tokenizer=model"]).model).encode(text, add_special_tokens=False) == expected  # fmt: skip
    for name, tensor in trainer.parts.policy.model.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], tensor, msg=name)
    ids = tokenizer.encode("Start at 3. Add 4.", add_special_tokens=False)
    assert model(torch.tensor([ids])).logits.shape == (1, len(ids), len(tokenizer))
    eval_main([str(checkpoint), "--out", str(tmp_path), "--name", "again", "logging.progress=false",
               "logging.tensorboard=false"])  # fmt: skip
    again = EvalResult.from_json(tmp_path / "eval" / "again.json")
    assert again.num_problems == 4 and sorted(again.accuracy) == [4, 8, 12, 16]
    eval_main(["--compare", str(run_dir / "eval" / "sft.json"), str(run_dir / "eval" / "final.json"), "--out",
               str(tmp_path / "cmp")])  # fmt: skip
    assert (tmp_path / "cmp" / "compare.png").exists() and "acc@16" in (tmp_path / "cmp" / "compare.md").read_text()


def test_resume_continues_from_the_checkpoint(finished_run, tmp_path):
    run_dir, trainer, _, _ = finished_run
    checkpoint = run_dir / "checkpoints" / "final"
    config = load_config(None, [*TINY, "train.steps=3", "logging.tensorboard=false"])
    resumed = Trainer(config, tmp_path, resume=checkpoint)
    assert resumed.start_step == 2 and resumed.sft_done
    for name, tensor in trainer.parts.policy.model.state_dict().items():
        torch.testing.assert_close(resumed.parts.policy.model.state_dict()[name], tensor, msg=name)
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert resumed.parts.learner.optimizer.state_dict()["state"].keys() == saved["optimizer"]["state"].keys()
    assert resumed.parts.learner.scheduler.last_epoch == saved["scheduler"]["last_epoch"] == 4  # 2 steps x 2 updates
    evaluations = resumed.run()
    assert set(evaluations) == {"final"}  # no SFT and no start evaluation on resume
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
             if "train/loss" in line]  # fmt: skip
    assert steps == [3]


@pytest.mark.parametrize("epochs", [1, 2, 3])
def test_the_first_update_uses_the_current_logprobs_as_the_old_ones(tmp_path, monkeypatch, epochs):
    """Only the trees outside the first update are scored before it (it is on-policy), and the step
    ends with the parameters of scoring every tree first, with any number of PPO epochs (a later
    epoch trains the first update's trees again, against the log-probs they had before it)."""
    (tmp_path / "length_reward.py").write_text(LENGTH_REWARD)  # a reward with signal: the update is not empty
    monkeypatch.syspath_prepend(str(tmp_path))
    config = load_config(
        None,
        [*TINY, "sft.steps=0", "logging.tensorboard=false", "rollout.reward=length_reward:reward",
         f"train.ppo_epochs={epochs}"],
    )  # fmt: skip
    scored_rows = []
    original = Learner._positions_logprobs

    def recording(self, policy, batch, rows=None):
        scored_rows.append(list(range(batch.layout.num_traces)) if rows is None else list(rows))
        return original(self, policy, batch, rows)

    torch.manual_seed(0)
    fast = Trainer(config, tmp_path / "fast")
    initial = [p.detach().clone() for p in fast.parts.policy.model.parameters()]
    monkeypatch.setattr(Learner, "_positions_logprobs", recording)
    fast.rl_step(0)
    # 4 prompts x G=2 in mini-batches of 2 prompts: the second mini-batch's 4 trees only.
    assert [len(rows) for rows in scored_rows] == [4]

    def score_everything(self, batch, num_updates, first_rows=None):
        batch.old_logprobs = original(self, self.policy, batch)

    original_step = Learner._optimizer_step
    monkeypatch.setattr(Learner, "fill_logprobs", score_everything)
    monkeypatch.setattr(Learner, "_optimizer_step", lambda self, *args: original_step(self, *args[:4], False))
    torch.manual_seed(0)
    full = Trainer(config, tmp_path / "full")
    full.rl_step(0)
    for (name, got), expected in zip(
        fast.parts.policy.model.named_parameters(), full.parts.policy.model.parameters(), strict=True
    ):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6, msg=name)
    assert any(not torch.equal(p, q) for p, q in zip(fast.parts.policy.model.parameters(), initial, strict=True))


def test_run_settings_reach_their_parts_and_bf16_weights_are_warned_about(tmp_path, caplog):
    """rollout.kv_budget_tokens reaches the embedded engine, which drops its cached traces before the
    update; bf16 weights draw a warning (AdamW steps of lr 1e-6 round away); a sampling RNG state of
    another device type is skipped with a warning instead of failing the resume."""
    from trainer.config import ConfigError

    with caplog.at_level("WARNING"):
        trainer = Trainer(load_config(None, [*TINY, "rollout.kv_budget_tokens=64", "model.dtype=bfloat16"]), tmp_path)
    assert "model.dtype=bfloat16" in caplog.text and "model.dtype=float32" in caplog.text
    engine = trainer.parts.engine
    assert engine.kv_budget_tokens == 64
    engine.think([[5, 6, 7]], 1, 4, SamplingParams(temperature=0))
    assert engine.cached_sequences == 1
    engine.release_memory()
    assert engine.cached_sequences == 0
    states = trainer._random_states()
    assert states["engine_device"] == "cpu"
    caplog.clear()
    with caplog.at_level("WARNING"):
        trainer._restore_random_states({**states, "engine": torch.zeros(3, dtype=torch.uint8), "engine_device": "cuda"})
    assert "sampling continues from a fresh stream" in caplog.text
    with pytest.raises(ConfigError, match=r"train\.dist_timeout_minutes: 0\.0 is not allowed"):
        load_config(None, [*TINY, "train.dist_timeout_minutes=0"])


def test_resume_and_checkpoint_evaluation_push_the_checkpoints_weights_to_the_engine(tmp_path, monkeypatch):
    """Servers restarted after a crash hold the base model: resuming (and anytime-eval of a
    checkpoint) syncs the loaded weights to the engine before anything is sampled."""
    from trainer.loop import evaluate_checkpoint
    from trainer.rollout import EmbeddedEngine

    first = Trainer(load_config(None, [*TINY, "sft.steps=0"]), tmp_path / "run")
    checkpoint = first.save("step0", 0)
    first.metrics.close()
    synced = []
    real = EmbeddedEngine.update_weights

    def recording(self, model):
        synced.append(model)
        return real(self, model)

    monkeypatch.setattr(EmbeddedEngine, "update_weights", recording)
    resumed = Trainer(load_config(None, [*TINY, "sft.steps=0"]), tmp_path / "run", resume=checkpoint)
    assert synced == [resumed.parts.policy.model]
    resumed.metrics.close()
    evaluate_checkpoint(checkpoint, None, ["data.synthetic.num_eval=2"], tmp_path / "eval", "again")
    assert len(synced) == 2


def test_a_dataset_with_its_own_column_names_through_the_run_config(tmp_path):
    """data.columns maps roles to a file's columns: the same problems under other names give the
    same prompts and answers as the synthetic layout; an unknown role stops before any work."""
    from trainer.config import ConfigError
    from trainer.synthetic import generate_rows

    rows = generate_rows(8, seed=5, min_steps=1, max_steps=2, modulus=10, max_operand=9)
    plain, renamed = tmp_path / "plain.jsonl", tmp_path / "renamed.jsonl"
    plain.write_text("".join(json.dumps(row) + "\n" for row in rows))
    renamed.write_text("".join(json.dumps({"question": r["problem"], "final": r["answer"]}) + "\n" for r in rows))
    base = [*TINY, "sft.steps=0"]
    expected = Trainer(load_config(None, [*base, f"data.source={plain}"]), tmp_path / "a").parts
    mapped = Trainer(
        load_config(None, [*base, f"data.source={renamed}", "data.columns={problem: question, answer: final}"]),
        tmp_path / "b",
    ).parts
    assert [q.token_ids for q in mapped.train_prompts] == [q.token_ids for q in expected.train_prompts]
    assert [q.answer for q in mapped.train_prompts] == [q.answer for q in expected.train_prompts]
    with pytest.raises(ConfigError, match=r"data\.columns"):
        load_config(None, [*base, "data.columns={question: q}"])


# The paper's precision (fp32 weights, bf16 autocast) on each device; on CUDA head_dim 16, so the
# tree forward runs flex attention (auto falls back to SDPA below 16) and the Triton log-probs.
PAPER_PRECISION = {
    "cpu": ["train.device=cpu"],
    "cuda": [
        "train.device=cuda",
        "model.config={hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2, num_attention_heads: 4, "
        "num_key_value_heads: 2, max_position_embeddings: 512}",
    ],
}


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_rollout_dtype_gives_the_embedded_engine_a_bf16_copy_that_follows_the_learner(tmp_path, monkeypatch, device):
    """rollout.dtype=auto samples in the learner's autocast dtype: the engine holds the learner's
    weights rounded to bf16 (before and after an update), keeps RoPE's fp32 inv_freq and caches K/V
    in bf16; without autocast (or with float32) it keeps fp32 weights.
    On CUDA this is also one whole RL step of the paper's precision setup."""
    from trainer.config import ConfigError

    (tmp_path / "length_reward.py").write_text(LENGTH_REWARD)  # a reward with signal: the update moves weights
    monkeypatch.syspath_prepend(str(tmp_path))
    overrides = ["sft.steps=0", "model.autocast=bfloat16", "rollout.reward=length_reward:reward"]
    trainer = Trainer(load_config(None, [*TINY, *overrides, *PAPER_PRECISION[device]]), tmp_path / "bf16")
    engine, learner_model = trainer.parts.engine, trainer.parts.policy.model

    def assert_engine_holds_learner_weights_in_bf16():
        engine_parameters = dict(engine.model.named_parameters())
        for name, parameter in learner_model.named_parameters():
            assert parameter.dtype == torch.float32, name
            assert engine_parameters[name].dtype == torch.bfloat16, name
            assert torch.equal(engine_parameters[name], parameter.detach().to(torch.bfloat16)), name

    assert_engine_holds_learner_weights_in_bf16()
    inv_freq = engine.model.model.rotary_emb.inv_freq
    assert inv_freq.dtype == torch.float32 and torch.equal(inv_freq, learner_model.model.rotary_emb.inv_freq)
    before = [p.detach().clone() for p in learner_model.parameters()]
    metrics = trainer.rl_step(0)
    assert metrics["train/trained_tokens"] > 0 and math.isfinite(metrics["train/loss"]), metrics
    assert next(learner_model.parameters()).device.type == device
    assert any(not torch.equal(p, q) for p, q in zip(learner_model.parameters(), before, strict=True))
    assert_engine_holds_learner_weights_in_bf16()
    request = GenerationRequest((5, 6, 7), n=1, max_new_tokens=4, stop_token_ids=(), sampling=SamplingParams(),
                                cache_output=True)  # fmt: skip
    engine.generate([request])
    assert engine.cached_sequences == 1 and engine._pool.storage.dtype == torch.bfloat16  # its K/V blocks
    trainer.metrics.close()

    for name, overrides in (
        ("fp32", ["model.autocast=null"]),
        ("forced", ["model.autocast=bfloat16", "rollout.dtype=float32"]),
    ):
        other = Trainer(
            load_config(None, [*TINY, "sft.steps=0", *PAPER_PRECISION[device], *overrides]), tmp_path / name
        )
        assert {p.dtype for p in other.parts.engine.model.parameters()} == {torch.float32}
        other.metrics.close()
    with pytest.raises(ConfigError, match=r"rollout\.dtype: 'float16'"):
        load_config(None, [*TINY, "rollout.dtype=float16"])
    with pytest.raises(ConfigError, match=r"rollout\.dtype: 'bfloat16'.*auto unless rollout\.engine is embedded"):
        load_config(None, [*TINY, "rollout.engine=sglang", "rollout.urls=[http://x:1]", "rollout.dtype=bfloat16"])


def test_named_evaluation_sets_are_each_evaluated_as_alone_and_averaged(tmp_path):
    """data.eval_source={a: ..., b: ...}: each set's result equals a run evaluating that set alone
    (same weights and seed), the run's result is their mean with independent standard errors, and
    every set has its JSON, metrics, report rows and curve."""
    from trainer.synthetic import generate_rows, save_rows

    files = {name: save_rows(generate_rows(n, seed=seed, min_steps=1, max_steps=2, max_operand=9), tmp_path / f"{name}.jsonl")
             for name, n, seed in (("a", 3, 11), ("b", 5, 12))}  # fmt: skip
    base = [*TINY, "sft.steps=0", "train.steps=1", "eval.samples_per_problem=2"]
    named = Trainer(
        load_config(None, [*base, f"data.eval_source={{a: {files['a']}, b: {files['b']}}}"]), tmp_path / "r"
    )
    evaluations = named.run()
    alone = {}
    for name, path in files.items():
        trainer = Trainer(load_config(None, [*base, f"data.eval_source={path}"]), tmp_path / f"alone_{name}")
        alone[name] = trainer.evaluate("start", step=0)
        trainer.metrics.close()
    run_dir = tmp_path / "r"
    for name in files:
        assert EvalResult.from_json(run_dir / "eval" / "start" / f"{name}.json") == alone[name]
        assert named.set_results["start"][name] == alone[name]
    a, b = alone["a"], alone["b"]
    start = evaluations["start"]
    assert EvalResult.from_json(run_dir / "eval" / "start.json") == start
    assert start.num_problems == 8 and start.sets == {"a": a.anytime_score, "b": b.anytime_score}
    assert start.anytime_score == pytest.approx((a.anytime_score + b.anytime_score) / 2)
    assert start.stderr == pytest.approx(math.hypot(a.stderr, b.stderr) / 2)
    for budget in a.accuracy:
        assert start.accuracy[budget] == pytest.approx((a.accuracy[budget] + b.accuracy[budget]) / 2)
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any(row.get("eval/b/anytime_score") == pytest.approx(b.anytime_score) for row in logged)
    assert any(row.get("eval/anytime_score") == pytest.approx(start.anytime_score) for row in logged)
    report = (run_dir / "report.md").read_text()
    assert "| start a |" in report and "| final b |" in report
    assert (run_dir / "budget_accuracy_by_set.png").stat().st_size > 0
    final_b = EvalResult.from_json(run_dir / "eval" / "final" / "b.json")
    # anytime-eval of the final checkpoint (its saved config names the sets) reproduces every set's
    # final evaluation: the same weights, problems and seeds.
    eval_main([str(run_dir / "checkpoints" / "final"), "--out", str(tmp_path / "again"), "--name", "again"])
    for name in files:
        again = EvalResult.from_json(tmp_path / "again" / "eval" / "again" / f"{name}.json")
        assert again == EvalResult.from_json(run_dir / "eval" / "final" / f"{name}.json"), name
    # anytime-eval --compare of two such evaluations: the means, then a row and a panel per set.
    eval_main(["--compare", str(run_dir / "eval" / "start.json"), str(run_dir / "eval" / "final.json"),
               "--out", str(tmp_path / "cmp")])  # fmt: skip
    table = (tmp_path / "cmp" / "compare.md").read_text()
    assert f"| r/final b | {final_b.accuracy[min(final_b.accuracy)]:.3f} ±" in table and "| start a |" in table
    assert (tmp_path / "cmp" / "compare_by_set.png").stat().st_size > 0
    (run_dir / "eval" / "final" / "a.json").unlink()
    with pytest.raises(FileNotFoundError, match="its set 'a' has no"):
        eval_main(["--compare", str(run_dir / "eval" / "final.json"), "--out", str(tmp_path / "cmp2")])


def test_mean_over_sets_by_hand_and_refusals(tmp_path):
    from trainer.config import ConfigError
    from trainer.evaluate import mean_over_sets

    def result(score, stderr, accuracy, problems, weights=None):
        return EvalResult(anytime_score=score, stderr=stderr, num_problems=problems, samples_per_problem=4,
                          accuracy=accuracy, stderr_by_budget={8: 0.3, 16: 0.4}, weights=weights or {8: 0.5, 16: 0.5},
                          mean_thinking_tokens=10.0 * problems, closed_share=0.5, temperature=0.6)  # fmt: skip

    mean = mean_over_sets({"x": result(0.2, 0.03, {8: 0.1, 16: 0.3}, 2), "y": result(0.6, 0.04, {8: 0.5, 16: 0.7}, 6)})
    assert mean.anytime_score == pytest.approx(0.4) and mean.stderr == pytest.approx(0.025)  # sqrt(.03²+.04²)/2
    assert mean.accuracy == pytest.approx({8: 0.3, 16: 0.5}) and mean.stderr_by_budget[8] == pytest.approx(0.3 / 2**0.5)
    assert mean.num_problems == 8 and mean.mean_thinking_tokens == pytest.approx(40.0)
    assert mean.sets == {"x": 0.2, "y": 0.6}
    mean.to_json(tmp_path / "mean.json")
    assert EvalResult.from_json(tmp_path / "mean.json") == mean
    with pytest.raises(ValueError, match="'z' has other budgets"):
        mean_over_sets(
            {
                "x": result(0.2, 0.0, {8: 0.1, 16: 0.3}, 2),
                "z": result(0.2, 0.0, {8: 0.1, 16: 0.3}, 2, {8: 1.0, 16: 0.0}),
            }
        )
    for bad in ("{}", "{'a b': x.json}", "{a: 3}"):
        with pytest.raises(ConfigError, match=r"data\.eval_source"):
            load_config(None, [*TINY, f"data.eval_source={bad}"])
    with pytest.raises(ConfigError, match=r"eval\.num_problems: 0 is not allowed"):
        load_config(None, [*TINY, "eval.num_problems=0"])
    # A set with no problem left stops every rank at build, before any rank waits in a collective.
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="evaluation set 'b' has no problem left"):
        Trainer(load_config(None, [*TINY, f"data.eval_source={{b: {tmp_path / 'empty.jsonl'}}}"]), tmp_path / "run")


def test_evaluation_streams_problems_in_windows_without_changing_greedy_results(tmp_path, monkeypatch):
    """rollout.stream_window also windows the evaluation: greedy results equal the all-at-once
    evaluation, while the engine holds at most two windows' traces instead of every trace (each
    window's traces are dropped once their summaries are sampled)."""
    from trainer.rollout import EmbeddedEngine

    peak = {}
    original = EmbeddedEngine._store

    def recording(self, *args):
        original(self, *args)
        peak[self.window] = max(peak.get(self.window, 0), self.cached_sequences)

    monkeypatch.setattr(EmbeddedEngine, "_store", recording)
    base = [*TINY, "sft.steps=0", "eval.temperature=0", "eval.samples_per_problem=2", "data.synthetic.num_eval=6"]
    results = {}
    for window in (0, 1):
        trainer = Trainer(load_config(None, [*base, f"rollout.stream_window={window}"]), tmp_path / str(window))
        trainer.parts.engine.window = window
        results[window] = trainer.evaluate("start", step=0)
        assert trainer.parts.engine.cached_sequences == 0
        trainer.metrics.close()
    assert results[1] == results[0] and results[0].num_problems == 6
    # Greedy samples of a problem are one stored sequence: 6 problems at once; two windows of 1 problem.
    assert peak == {0: 6, 1: 2}


def test_a_restart_in_the_same_folder_names_the_config_keys_it_changed(tmp_path, caplog):
    base = [*TINY, "sft.steps=0"]
    Trainer(load_config(None, base), tmp_path).metrics.close()
    with caplog.at_level("WARNING"):
        Trainer(load_config(None, base), tmp_path).metrics.close()
    assert "config differs" not in caplog.text
    with caplog.at_level("WARNING"):
        Trainer(load_config(None, [*base, "optim.lr=2e-3", "rollout.group_size=3"]), tmp_path).metrics.close()
    assert "optim.lr (0.001 -> 0.002), rollout.group_size (2 -> 3)" in caplog.text
    assert len(json.loads((tmp_path / "environment.json").read_text())) == 3
    # A file torn by a kill mid-write is read as absent (with a warning), not a crash.
    (tmp_path / "environment.json").write_text('[{"started": ')
    with caplog.at_level("WARNING"):
        Trainer(load_config(None, base), tmp_path).metrics.close()
    assert "environment.json cannot be read" in caplog.text
    assert len(json.loads((tmp_path / "environment.json").read_text())) == 1
    # --resume auto without a checkpoint starts over: the records of the attempt that left none go.
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 4  # one data record per start
    Trainer(load_config(None, base), tmp_path, resume="auto").metrics.close()
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1


def test_train_epochs_sets_the_run_length_with_drop_last(tmp_path):
    """train.epochs=2 over 10 prompts at 4 per step: 2 steps per epoch (the last 2 prompts of each
    shuffle dropped, as verl's drop_last), 4 steps; within an epoch no prompt repeats, and the LR
    schedule spans the 4 steps."""
    config = load_config(None, [*TINY, "sft.steps=0", "data.synthetic.num_train=10", "train.steps=null",
                                "train.epochs=2", "optim.schedule=linear", "logging.tensorboard=false"])  # fmt: skip
    trainer = Trainer(config, tmp_path)
    sampler = trainer.parts.sampler
    assert trainer.parts.rl_steps == 4 and sampler.steps_per_epoch == 2
    for epoch in range(2):
        seen = [q.token_ids for step in (2 * epoch, 2 * epoch + 1) for q in sampler.batch(step)]
        assert len(seen) == 8 and len({tuple(ids) for ids in seen}) == 8
    # 4 steps x 2 updates: the linear decay reaches 0 at the last update.
    updates = [trainer.parts.learner.scheduler.lr_lambdas[0](k) for k in range(8)]
    assert updates[0] == 1.0 and updates[-1] == pytest.approx(1 / 8)
    trainer.run(evaluate_start=False)
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
             if "train/loss" in line]  # fmt: skip
    assert steps == [1, 2, 3, 4]
    with pytest.raises(ValueError, match=r"3 training prompts are fewer than train\.prompts_per_step=4"):
        Trainer(load_config(None, [*TINY, "sft.steps=0", "data.synthetic.num_train=3"]), tmp_path / "few")
    # An SFT-only run (train.steps=0) needs no full batch.
    Trainer(load_config(None, [*TINY, "train.steps=0", "data.synthetic.num_train=3"]), tmp_path / "sft").metrics.close()


def test_periodic_evaluations_run_the_periodic_sets_and_samples(tmp_path):
    """eval.periodic_sets and eval.periodic_samples_per_problem shape the step<N> evaluations (the
    authors validate on AIME and AMC during training); the final one runs every set."""
    from trainer.synthetic import generate_rows, save_rows

    files = {name: save_rows(generate_rows(2, seed=seed, min_steps=1, max_steps=2, max_operand=9),
                             tmp_path / f"{name}.jsonl") for name, seed in (("a", 11), ("b", 12))}  # fmt: skip
    config = load_config(None, [*TINY, "sft.steps=0", "train.steps=2", "eval.every=1", "eval.samples_per_problem=1",
                                f"data.eval_source={{a: {files['a']}, b: {files['b']}}}", "eval.periodic_sets=[b]",
                                "eval.periodic_samples_per_problem=3", "logging.tensorboard=false"])  # fmt: skip
    trainer = Trainer(config, tmp_path / "run")
    trainer.run(evaluate_start=False)
    periodic = EvalResult.from_json(tmp_path / "run" / "eval" / "step1.json")
    final = EvalResult.from_json(tmp_path / "run" / "eval" / "final.json")
    assert set(periodic.sets) == {"b"} and periodic.samples_per_problem == 3 and periodic.num_problems == 2
    assert set(final.sets) == {"a", "b"} and final.samples_per_problem == 1 and final.num_problems == 4
    from trainer.config import ConfigError

    with pytest.raises(ConfigError, match=r"eval\.periodic_sets: \['c'\] is not allowed"):
        load_config(None, [*TINY, f"data.eval_source={{a: {files['a']}}}", "eval.periodic_sets=[c]"])
