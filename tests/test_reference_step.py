"""The trainer's RL step against one written apart from it (``tests/reference_step.py``).

A hand-made rollout (two prompts, G=2, S=2, A=2; traces that close their thinking, run out of
budget, and end with EOS; summaries right, wrong, unboxed, unclosed, with a second ``</think>``)
goes through the trainer's own path (``score_rollouts`` -> ``build_train_batch`` -> ``Learner``
with ``TreePolicy``) and through the reference; the scores, advantages and trained parameters
must agree. The AdamW epsilon is large, so an update is about ``lr * gradient / eps`` and a wrong
gradient scale (a divisor, a skipped clip) shows, where at transformers' 1e-8 the first Adam
step would move every weight by ``lr * sign(gradient)`` whatever the scale.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
from reference_step import StepSettings, Trace, cuts, inserted_ids, reference_step

from trainer.batches import build_train_batch, score_rollouts
from trainer.budgets import BudgetSchedule
from trainer.config import LossConfig, OptimConfig
from trainer.learner import Learner, make_optimizer
from trainer.policy import TreePolicy
from trainer.rollout import SummaryBatch
from trainer.sft import sft_loss_layout
from trainer.synthetic import synthetic_reward
from trainer.tiny import tiny_causal_lm
from trainer.tokenizer import build_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

B_MAX, SLOTS = 8, 2


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def hand_made_rollout(tokenizer) -> list[Trace]:
    """Two prompts x G=2 traces, budgets 4 and 8, A=2 summaries per slot."""

    def ids(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    eos, think_end = tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("</think>")

    def summary(text: str, stop: bool = True) -> list[int]:
        return ids(text) + ([eos] if stop else [])

    first, second = ids("Start at 2. Add 2."), ids("Start at 3. Add 4.")
    return [
        # Closes its thinking at 4 tokens: both slots share the cut, the header alone is inserted.
        Trace(first, [*ids("2+2"), think_end], "4",
              [[summary("\\boxed{4}"), summary("\\boxed{5}")], [summary("\\boxed{4}", stop=False), summary("so \\boxed{4}")]]),
        # Runs out of budget: truncated at 4 and at 8.
        Trace(first, ids("1+1+1+1+"), "4",
              [[summary("\\boxed{4}"), summary("4")], [summary("\\boxed{4}</think>"), summary("\\boxed{4}")]]),
        # Ends with EOS at 6 tokens: the cut at 4 scores, the cut that holds the EOS does not.
        Trace(second, [*ids("3+4=7"), eos], "7",
              [[summary("\\boxed{7}"), summary("\\boxed{7")], [summary("\\boxed{7}"), summary("\\boxed{7}")]]),
        # Closes at 6 tokens: truncated at 4, closed at 6.
        Trace(second, [*ids("3+4=7"), think_end], "7",
              [[summary("\\boxed{7}"), summary("\\boxed{1}")], [summary("\\boxed{7}"), summary("\\boxed{{7}}")]]),
    ]  # fmt: skip


def trainer_learner(model, ref_model, traces: list[Trace], settings: StepSettings, tokenizer, micro_batch_tokens=48):
    """The trainer's path up to the update: (a Learner of a copy of ``model``, ScoredBatch, TrainBatch)."""
    per_trace_cuts = [cuts(t, settings.budgets) for t in traces]
    rollouts = SummaryBatch(
        prompt_ids=[t.prompt for t in traces],
        thinking_ids=[t.thinking for t in traces],
        cut_lens=torch.tensor(per_trace_cuts),
        inserted_ids=[
            [tuple(inserted_ids(t, c, tokenizer)) for c in sorted(set(trace_cuts))]
            for t, trace_cuts in zip(traces, per_trace_cuts, strict=True)
        ],
        summary_ids=[t.summaries for t in traces],
        summary_finish=[[["stop"] * len(per_slot) for per_slot in t.summaries] for t in traces],
    )
    scored = score_rollouts(
        rollouts, [t.answer for t in traces], tokenizer, synthetic_reward,
        think_end_id=tokenizer.convert_tokens_to_ids("</think>"), eos_token_ids=[tokenizer.eos_token_id],
        group_size=settings.group_size,
    )  # fmt: skip
    schedule = BudgetSchedule(B_MAX, SLOTS, tuple(settings.probs))
    batch = build_train_batch(
        scored, schedule, variance_reduction=settings.variance_reduction, summary_method=settings.summary_method
    )
    model = copy.deepcopy(model)
    policy = TreePolicy(model, attention_backend="sdpa", micro_batch_tokens=micro_batch_tokens)
    reference = TreePolicy(copy.deepcopy(ref_model), attention_backend="sdpa", micro_batch_tokens=micro_batch_tokens)
    optim = OptimConfig(lr=settings.lr, weight_decay=settings.weight_decay, beta1=settings.betas[0],
                        beta2=settings.betas[1], eps=settings.eps, grad_clip=settings.grad_clip)  # fmt: skip
    num_prompts = len(traces) // settings.group_size
    updates = settings.epochs * -(-num_prompts // settings.mini_batch_prompts)
    optimizer, scheduler = make_optimizer(model, optim, total_steps=updates)
    loss = LossConfig(clip_low=settings.clip_low, clip_high=settings.clip_high, dual_clip=settings.dual_clip,
                      aggregation=settings.aggregation, norm_length=settings.norm_length, kl_coef=settings.kl_coef,
                      kl_estimator=settings.kl_estimator, entropy_coef=settings.entropy_coef)  # fmt: skip
    learner = Learner(policy, optimizer, scheduler, loss, grad_clip=settings.grad_clip,
                      norm_length=settings.norm_length, temperature=settings.temperature,
                      reference=reference if settings.kl_coef > 0 else None, seed=settings.seed)  # fmt: skip
    return learner, scored, batch


def trainer_step(model, ref_model, traces: list[Trace], settings: StepSettings, tokenizer):
    """The trainer's own step on the same rollout: (trained model, its ScoredBatch, its TrainBatch)."""
    learner, scored, batch = trainer_learner(model, ref_model, traces, settings, tokenizer)
    metrics = learner.update(batch, settings.mini_batch_prompts, settings.epochs)
    updates = settings.epochs * -(-(len(traces) // settings.group_size) // settings.mini_batch_prompts)
    assert metrics["train/updates"] == updates and metrics["train/skipped_updates"] == 0
    return learner.policy.model, scored, batch


BASE = StepSettings(budgets=[4, 8], probs=[1 / 3, 2 / 3], group_size=2, temperature=0.7, norm_length=40)
CONFIGS = {
    "token-sum-norm, 2 mini-batches": dict(mini_batch_prompts=1),
    "token-sum-norm, 2 epochs x 2 mini-batches, clipped, decay": dict(epochs=2, grad_clip=0.05, weight_decay=0.1),
    "token-mean, kl k3, 1 mini-batch": dict(aggregation="token-mean", kl_coef=0.5, mini_batch_prompts=2),
    "seq-mean-token-mean, kl k1, entropy, 2 epochs": dict(aggregation="seq-mean-token-mean", kl_coef=0.3,
                                                          kl_estimator="k1", entropy_coef=0.05, epochs=2),
    "seq-mean-token-sum-norm, kl k2, dual clip": dict(aggregation="seq-mean-token-sum-norm", kl_coef=0.3,
                                                      kl_estimator="k2", dual_clip=1.5, clip_low=0.1),
    "token-sum-norm, v2only + grpo summaries, entropy": dict(variance_reduction="v2only", summary_method="grpo",
                                                            entropy_coef=0.1, clip_high=0.3),
    "token-sum-norm, v1only, uniform prior, 1 mini-batch x 2 epochs": dict(variance_reduction="v1only",
                                                                         probs=[0.5, 0.5], mini_batch_prompts=2,
                                                                         epochs=2),
}  # fmt: skip


@pytest.fixture(scope="module")
def models(tokenizer):
    vocab = len(tokenizer)
    policy = tiny_causal_lm(vocab, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, init_scale=0.3, seed=0)
    reference = tiny_causal_lm(vocab, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, init_scale=0.3, seed=1)
    return policy, reference


@pytest.mark.parametrize("name", list(CONFIGS))
def test_the_trainers_step_is_the_reference_step(models, tokenizer, name):
    settings = dataclasses.replace(BASE, **CONFIGS[name])
    policy, ref_model = models
    traces = hand_made_rollout(tokenizer)
    expected, r, thinking_adv, summary_adv = reference_step(policy, ref_model, traces, settings, tokenizer)
    got, scored, batch = trainer_step(policy, ref_model, traces, settings, tokenizer)
    torch.testing.assert_close(scored.scores.double(), r, rtol=0, atol=0)
    torch.testing.assert_close(batch.thinking_adv.double(), thinking_adv, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(batch.summary_adv.double(), summary_adv, rtol=1e-6, atol=1e-7)
    before = dict(policy.named_parameters())
    moved = 0.0
    for (key, value), reference_value in zip(got.named_parameters(), expected.parameters(), strict=True):
        delta, reference_delta = value - before[key], reference_value - before[key]
        scale = float(reference_delta.detach().abs().max())
        moved = max(moved, scale)
        # fp32 forwards on both sides (the fused log-probs accumulate in fp32): compare the updates.
        torch.testing.assert_close(delta, reference_delta, rtol=2e-3, atol=2e-3 * scale + 1e-7, msg=key)
    assert moved > 1e-3, "the step did not move the weights: the comparison would be vacuous"


def test_the_rollout_covers_every_rule(tokenizer):
    """The hand-made rollout exercises what the reference checks: a right answer, each way to be
    wrong, the EOS cut, shared and distinct cuts; its scores by hand."""
    traces = hand_made_rollout(tokenizer)
    r = reference_step.__globals__["scores"](traces, BASE, tokenizer)
    assert r.tolist() == [
        [[1.0, 0.0], [1.0, 1.0]],  # right, wrong; right without EOS, right after text
        [[1.0, 0.0], [0.0, 1.0]],  # right, no box; a second </think>, right
        [[1.0, 0.0], [0.0, 0.0]],  # right, unclosed box; the cut holds the EOS
        [[1.0, 0.0], [1.0, 0.0]],  # right, wrong; right, "{7}"
    ]
    assert [cuts(t, BASE.budgets) for t in traces] == [[4, 4], [4, 8], [4, 6], [4, 6]]


# -- SFT ------------------------------------------------------------------------------------------


def reference_sft(model, examples, steps: int, lr: float, warmup: int, weight_decay: float, beta2: float):
    """SFT by hand: per-sequence forwards, the mean NLL over every solution token of the batch (the
    prompt's tokens untrained), the norm clipped at 1, AdamW (decay on matrices only) at a linear
    warm-up then cosine decay to 10% of ``lr``. The batch is every example, every step."""
    model = copy.deepcopy(model).train()
    parameters = list(model.parameters())
    state: dict = {}
    for step in range(steps):
        factor = (
            (step + 1) / warmup
            if step < warmup
            else 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / (steps - warmup)))
        )
        model.zero_grad(set_to_none=True)
        total = sum(len(solution) for _, solution in examples)
        loss = 0.0
        for prompt, solution in examples:
            logits = model(input_ids=torch.tensor([prompt + solution])).logits[0].double()
            logp = torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1)
            loss = loss - logp[torch.arange(len(solution)), torch.tensor(solution)].sum()
        (loss / total).backward()
        grads = [p.grad.double() for p in parameters]
        norm = math.sqrt(sum(float((g**2).sum()) for g in grads))
        if norm > 1.0:
            grads = [g / (norm + 1e-6) for g in grads]
        with torch.no_grad():
            for p, g in zip(parameters, grads, strict=True):
                m, v = state.get(id(p), (torch.zeros_like(g), torch.zeros_like(g)))
                m, v = 0.9 * m + 0.1 * g, beta2 * v + (1 - beta2) * g * g
                state[id(p)] = (m, v)
                m_hat, v_hat = m / (1 - 0.9 ** (step + 1)), v / (1 - beta2 ** (step + 1))
                decay = weight_decay if p.dim() >= 2 else 0.0
                p.copy_(p.double() * (1 - lr * factor * decay) - lr * factor * m_hat / (v_hat.sqrt() + 1e-8))
    return model


def test_sft_warmup_is_the_reference_sft(models, tokenizer):
    """Packed sequences (micro-batches of several whole examples), the prompt masked out of the loss."""
    from trainer.config import SFTConfig
    from trainer.sft import sft_warmup

    def ids(text):
        return tokenizer.encode(text, add_special_tokens=False)

    eos = tokenizer.eos_token_id
    examples = [(ids(f"Start at {a}. Add {b}."), [*ids(f"{a}+{b}={a + b}</think>\\boxed{{{a + b}}}"), eos])
                for a, b in ((1, 2), (3, 4), (2, 5), (6, 1))]  # fmt: skip
    policy, _ = models
    config = SFTConfig(steps=3, batch_size=len(examples), lr=1e-2, warmup_steps=1, weight_decay=0.1, beta2=0.95)
    trained = copy.deepcopy(policy)
    tree_policy = TreePolicy(trained, attention_backend="sdpa", micro_batch_tokens=48)
    assert len(tree_policy.micro_batches(sft_loss_layout(examples))) < len(examples)  # several per micro-batch
    sft_warmup(tree_policy, examples, config, seed=0)
    expected = reference_sft(policy, examples, steps=3, lr=1e-2, warmup=1, weight_decay=0.1, beta2=0.95)
    # SFT's AdamW keeps torch's eps of 1e-8, so an element moves by about lr * sign(its gradient):
    # where a gradient is at the level of fp32 rounding the two sides may step opposite ways. Allow
    # one element in a thousand to be further than 3% of lr; a real difference moves most of them
    # (a trained prompt: 20386 of 22336 by more than that).
    far, total = 0, 0
    for value, reference_value in zip(trained.parameters(), expected.parameters(), strict=True):
        far += int(((value - reference_value).abs() > 0.03 * config.lr).sum())
        total += value.numel()
    assert far <= total // 1000, f"{far} of {total} parameters differ from the reference SFT"


# -- evaluation -----------------------------------------------------------------------------------


class ScriptedEngine:
    """An engine that returns a fixed rollout: for the evaluation's own statistics, nothing sampled."""

    def __init__(self, thinking, rollouts, tokenizer):
        from trainer.budgets import Delimiters

        self.thinking, self.rollouts = thinking, rollouts
        self.delimiters = Delimiters.from_tokenizer(tokenizer)

    def rollout(self, prompt_ids, group_size, b_max, schedule, num_summaries, sampling, cap, window=0):
        assert num_summaries == 1 and group_size == self.thinking.group_size
        return self.thinking, self.rollouts


def test_evaluation_statistics_are_the_reference(tokenizer):
    """Three problems x two samples, budgets 4 and 8, one summary per (trace, budget): accuracy per
    budget, the anytime score with the eval prior's weights and standard errors over problems
    (sqrt(n)), every sample credited to its own problem; budgets that share a cut share their
    summaries (the authors pool them)."""
    from trainer.evaluate import eval_result, evaluate_samples
    from trainer.rollout import ThinkingBatch

    def ids(text):
        return tokenizer.encode(text, add_special_tokens=False)

    eos, think_end = tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("</think>")
    answers = ["1", "2", "3"]
    # (thinking, [summary at budget 4, summary at budget 8]) of each problem's two samples.
    plan = [
        [(ids("a+b+c+d+"), ["\\boxed{1}", "\\boxed{1}"]), ([*ids("ab"), think_end], ["\\boxed{1}", "\\boxed{9}"])],
        [(ids("a+b+c+d+"), ["\\boxed{5}", "\\boxed{5}"]), (ids("abcdef"), ["\\boxed{2}", "\\boxed{5}"])],
        [(ids("a+b+c+d+"), ["\\boxed{3}", "\\boxed{0}"]), ([*ids("abcde"), eos], ["\\boxed{3}", "\\boxed{3}"])],
    ]  # fmt: skip
    prompts = [ids(f"Q{p}") for p in range(3)]
    traces = [(p, thinking, summaries) for p, samples in enumerate(plan) for thinking, summaries in samples]
    cut_lens = torch.tensor([[min(4, len(t)), min(8, len(t))] for _, t, _ in traces])
    thinking = ThinkingBatch([prompts[p] for p, _, _ in traces], [t for _, t, _ in traces],
                             ["length"] * len(traces), group_size=2)  # fmt: skip
    rollouts = SummaryBatch(
        prompt_ids=thinking.prompt_ids, thinking_ids=thinking.thinking_ids, cut_lens=cut_lens,
        inserted_ids=[[tuple(inserted_ids(Trace(prompts[p], t, "", []), c, tokenizer)) for c in sorted(set(cuts_))]
                      for (p, t, _), cuts_ in zip(traces, cut_lens.tolist(), strict=True)],
        summary_ids=[[[[*ids(text), eos]] for text in summaries] for _, _, summaries in traces],
        summary_finish=[[["stop"]] * 2 for _ in traces],
    )  # fmt: skip
    schedule = BudgetSchedule.from_budgets([4, 8], [1.0, 3.0])
    samples = evaluate_samples(
        ScriptedEngine(thinking, rollouts, tokenizer), prompts, answers, tokenizer, synthetic_reward,
        schedule=schedule, temperature=0.6, samples_per_problem=2, summary_max_new_tokens=8,
        eos_token_ids=[eos], seed=0,
    )  # fmt: skip
    # By hand, per (problem, sample): [score at 4, score at 8].
    # Problem 0: sample 0 right at both; sample 1 closed at 3 tokens, so both budgets share the cut
    # and its two summaries (right, wrong): 0.5 at each.
    # Problem 1: wrong, wrong; sample 1 (6 tokens, never closed): right at 4, wrong at 8.
    # Problem 2: right at 4, wrong at 8; sample 1 ended with EOS at 6 tokens: right at 4, and the cut
    # at 8 holds the EOS: 0.
    by_hand = torch.tensor([[[1, 1], [0.5, 0.5]], [[0, 0], [1, 0]], [[1, 0], [1, 0]]], dtype=torch.float64)
    per_problem = by_hand.mean(dim=1)  # [[0.75, 0.75], [0.5, 0], [1, 0]]
    torch.testing.assert_close(samples.per_problem, per_problem)
    result = eval_result([samples], schedule, samples_per_problem=2, temperature=0.6)
    weights = torch.tensor([0.25, 0.75], dtype=torch.float64)
    anytime = per_problem @ weights  # [0.75, 0.125, 0.25]
    assert result.weights == {4: 0.25, 8: 0.75}
    assert result.accuracy == pytest.approx({4: 0.75, 8: 0.25})
    assert result.anytime_score == pytest.approx(float(anytime.mean()))
    assert result.stderr == pytest.approx(float(anytime.std(unbiased=True)) / math.sqrt(3))
    for s, budget in enumerate((4, 8)):
        assert result.stderr_by_budget[budget] == pytest.approx(float(per_problem[:, s].std(unbiased=True)) / 3**0.5)
    assert result.num_problems == 3 and result.samples_per_problem == 2


def test_a_trainer_evaluation_weighs_budgets_by_the_eval_prior(tmp_path):
    """eval.prior, not the training prior, weighs the anytime score; eval.budgets are its budgets."""
    from test_trainer import TINY

    from trainer.config import load_config
    from trainer.loop import Trainer

    config = load_config(None, [*TINY, "sft.steps=0", "method.prior=linear", "eval.budgets=[8, 16]",
                                "eval.prior=[3, 1]"])  # fmt: skip
    trainer = Trainer(config, tmp_path)
    result = trainer.evaluate("start", step=0)
    trainer.metrics.close()
    assert result.weights == {8: 0.75, 16: 0.25}
    assert result.anytime_score == pytest.approx(0.75 * result.accuracy[8] + 0.25 * result.accuracy[16])


@pytest.mark.parametrize("where", ["gradient", "loss"])
def test_an_update_with_a_non_finite_gradient_or_loss_is_skipped(models, tokenizer, where):
    """Either one non-finite skips the optimizer step: the weights stay, the skip is counted."""
    policy, ref_model = models
    settings = dataclasses.replace(BASE, mini_batch_prompts=2)
    learner, _, batch = trainer_learner(policy, ref_model, hand_made_rollout(tokenizer), settings, tokenizer)
    model = learner.policy.model
    before = [p.detach().clone() for p in model.parameters()]
    if where == "gradient":  # a finite loss whose gradient overflows in one layer
        model.model.norm.weight.register_hook(lambda grad: grad * float("inf"))
    else:  # a NaN advantage: the loss is NaN
        batch.advantages[batch.layout.loss_mask.nonzero()[0]] = float("nan")
    metrics = learner.update(batch, settings.mini_batch_prompts, settings.epochs)
    assert metrics["train/skipped_updates"] == 1.0
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
