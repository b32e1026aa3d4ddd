"""BRPO advantages: every backend against a plain loop over the rules, hand-computed cases, bad input.

``loop_advantages`` and ``loop_token_advantages`` are written here from ARCHITECTURE.md ("The
method in one page") with Python floats and lists; they share no code with the package.
"""

import math
import random
from fractions import Fraction

import pytest
import torch

from anytime_kernels import advantage_stats, brpo_advantages, pack_response_trees, token_advantages
from anytime_kernels._extension import ops
from anytime_kernels.backends import BackendUnavailableError
from trainer.budgets import budget_prior, budget_support, cut_lengths

BACKENDS = ("cpp", "triton", "reference")
VARIANCE_REDUCTIONS = ("brpo", "v1only", "v2only", "none")
SUMMARY_METHODS = ("brpo", "grpo")


def loop_advantages(scores, cut_lens, group_size, budget_probs, variance_reduction, summary_method):
    """The rules, one trace, slot and summary at a time (nested lists in, nested lists out)."""
    num_traces, num_slots, num_summaries = len(scores), len(scores[0]), len(scores[0][0])
    total = sum(budget_probs)
    p = [w / total for w in budget_probs]
    rbar = [[sum(scores[n][s]) / num_summaries for s in range(num_slots)] for n in range(num_traces)]
    returns = [
        [sum(p[k] * rbar[n][k] for k in range(s, num_slots)) for s in range(num_slots)] for n in range(num_traces)
    ]
    thinking, summary = [], []
    for n in range(num_traces):
        first = n // group_size * group_size
        group = range(first, first + group_size)
        row = []
        for s in range(num_slots):
            v2 = sum(returns[m][s] for m in group) / group_size if group_size > 1 else 0.0
            if s == 0:
                v1 = 0.0
            else:
                discounted = sum(2**k * rbar[n][k] for k in range(s)) / sum(2**k for k in range(s))
                v1 = discounted * sum(p[k] for k in range(s, num_slots))
            baseline = {
                "brpo": (s * v1 + (num_slots - s) * v2) / num_slots,
                "v1only": v1,
                "v2only": v2,
                "none": 0.0,
            }[variance_reduction]
            row.append(returns[n][s] - baseline)
        thinking.append(row)
        per_trace = []
        for s in range(num_slots):
            per_slot = []
            for a in range(num_summaries):
                if num_summaries == 1:
                    baseline = sum(scores[m][s][0] for m in group) / group_size
                else:
                    shared = [
                        scores[n][k][b]
                        for k in range(num_slots)
                        if cut_lens[n][k] == cut_lens[n][s]
                        for b in range(num_summaries)
                    ]
                    baseline = sum(shared) / len(shared)
                advantage = scores[n][s][a] - baseline
                last = s == num_slots - 1 and a == num_summaries - 1
                per_slot.append(advantage if summary_method == "brpo" or last else 0.0)
            per_trace.append(per_slot)
        summary.append(per_trace)
    return thinking, summary


def random_case(seed, group_size, num_slots, num_summaries, prior, num_groups=3, b_max=40):
    """Scores, cuts from random trace lengths (many end before the later budgets) and the prior."""
    generator = torch.Generator().manual_seed(seed)
    num_traces = group_size * num_groups
    budgets = budget_support(b_max, num_slots)
    lengths = torch.randint(1, b_max + 1, (num_traces,), generator=generator)
    cuts = cut_lengths(lengths, budgets)
    if seed % 2:
        scores = torch.randint(0, 2, (num_traces, num_slots, num_summaries), generator=generator).float()
    else:
        scores = torch.rand(num_traces, num_slots, num_summaries, generator=generator) * 2 - 0.5
    return scores, cuts, budget_prior(prior, budgets)


RANDOM_CASES = [
    # (group_size, num_slots, num_summaries, prior)
    (8, 4, 4, "uniform"),
    (4, 4, 4, "linear"),
    (1, 4, 4, "uniform"),
    (4, 1, 1, "base"),
    (3, 3, 1, "linear"),
    (2, 5, 3, [0.1, 0.0, 2.0, 0.5, 1.0]),
    (5, 2, 2, "base"),
    (6, 1, 3, "uniform"),
    (16, 8, 2, "linear"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", range(len(RANDOM_CASES)))
def test_matches_loop_on_random_inputs(backend, case):
    group_size, num_slots, num_summaries, prior = RANDOM_CASES[case]
    scores, cuts, probs = random_case(case, group_size, num_slots, num_summaries, prior)
    for variance_reduction in VARIANCE_REDUCTIONS:
        for summary_method in SUMMARY_METHODS:
            thinking, summary = brpo_advantages(
                scores,
                cuts,
                group_size,
                probs,
                variance_reduction=variance_reduction,
                summary_method=summary_method,
                backend=backend,
            )
            expected_thinking, expected_summary = loop_advantages(
                scores.tolist(), cuts.tolist(), group_size, probs.tolist(), variance_reduction, summary_method
            )
            assert thinking.dtype == summary.dtype == torch.float32
            torch.testing.assert_close(thinking, torch.tensor(expected_thinking), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(summary, torch.tensor(expected_summary), rtol=1e-5, atol=1e-6)


def test_random_cases_cover_shared_cuts():
    shared = 0
    for case, (group_size, num_slots, num_summaries, prior) in enumerate(RANDOM_CASES):
        _, cuts, _ = random_case(case, group_size, num_slots, num_summaries, prior)
        shared += int((cuts[:, 1:] == cuts[:, :-1]).any(dim=1).sum())
    assert shared >= 10


def as_float(rows):
    return torch.tensor([[float(x) for x in row] for row in rows])


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_computed_two_traces(backend):
    # G=2, S=2, A=2, p = [1/2, 1/2], distinct cuts.
    # rbar: trace 0 = [(1+0)/2, (1+1)/2] = [1/2, 1]; trace 1 = [0, (1+0)/2] = [0, 1/2]
    # R_1 = p_1 rbar_1: [1/2, 1/4];  R_0 = p_0 rbar_0 + R_1: [1/4 + 1/2, 0 + 1/4] = [3/4, 1/4]
    # V2: slot 0 (3/4 + 1/4)/2 = 1/2; slot 1 (1/2 + 1/4)/2 = 3/8
    # V1: slot 0 = 0; slot 1 = rbar_0 * p_1: [1/4, 0]
    # brpo baseline: slot 0 (0*V1 + 2*V2)/2 = 1/2; slot 1 (V1 + V2)/2: [(1/4+3/8)/2, (0+3/8)/2] = [5/16, 3/16]
    # advantages: trace 0 [3/4-1/2, 1/2-5/16] = [1/4, 3/16]; trace 1 [1/4-1/2, 1/4-3/16] = [-1/4, 1/16]
    scores = torch.tensor([[[1.0, 0.0], [1.0, 1.0]], [[0.0, 0.0], [1.0, 0.0]]])
    cuts = torch.tensor([[2, 4], [2, 3]])
    expected = {
        "brpo": [[0.25, 0.1875], [-0.25, 0.0625]],
        "v1only": [[0.75, 0.5 - 0.25], [0.25, 0.25]],  # R - V1
        "v2only": [[0.25, 0.125], [-0.25, -0.125]],  # R - V2
        "none": [[0.75, 0.5], [0.25, 0.25]],  # R
    }
    for variance_reduction, rows in expected.items():
        thinking, summary = brpo_advantages(
            scores, cuts, 2, [1.0, 1.0], variance_reduction=variance_reduction, backend=backend
        )
        torch.testing.assert_close(thinking, torch.tensor(rows))
    # Summaries (A=2, each cut its own): minus the slot's mean. trace 0: slot 0 mean 1/2 -> [1/2, -1/2],
    # slot 1 mean 1 -> [0, 0]; trace 1: slot 0 mean 0 -> [0, 0], slot 1 mean 1/2 -> [1/2, -1/2].
    torch.testing.assert_close(summary, torch.tensor([[[0.5, -0.5], [0.0, 0.0]], [[0.0, 0.0], [0.5, -0.5]]]))
    # grpo keeps only summary (s=1, a=1): trace 0 -> 0, trace 1 -> -1/2.
    _, summary = brpo_advantages(scores, cuts, 2, [0.5, 0.5], summary_method="grpo", backend=backend)
    torch.testing.assert_close(summary, torch.tensor([[[0.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, -0.5]]]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_computed_shared_cut_linear_prior(backend):
    # G=1, S=3, A=2, budgets [4, 8, 12], a trace that closed its thinking at 5 tokens:
    # cuts [4, 5, 5] (slots 1 and 2 share one distinct cut). linear prior p = [4, 8, 12]/24 = [1/6, 1/3, 1/2].
    # rbar = [1/2, 1, 1/2]; R_2 = 1/4, R_1 = 1/3 + 1/4 = 7/12, R_0 = 1/12 + 7/12 = 2/3.
    # V2 = 0 (G = 1). V1_1 = rbar_0 * (1/3 + 1/2) = 5/12; V1_2 = (1*1/2 + 2*1)/3 * 1/2 = 5/12.
    # brpo baseline: [0, (1*5/12 + 2*0)/3, (2*5/12 + 1*0)/3] = [0, 5/36, 10/36]
    # advantage: [2/3, 7/12 - 5/36, 1/4 - 10/36] = [2/3, 4/9, -1/36]
    scores = torch.tensor([[[0.0, 1.0], [1.0, 1.0], [0.0, 1.0]]])
    cuts = cut_lengths([5], budget_support(12, 3))
    assert cuts.tolist() == [[4, 5, 5]]
    probs = budget_prior("linear", budget_support(12, 3))
    thinking, summary = brpo_advantages(scores, cuts, 1, probs, backend=backend)
    expected = [Fraction(2, 3), Fraction(4, 9), Fraction(-1, 36)]
    torch.testing.assert_close(thinking, as_float([expected]))
    # Summaries: slot 0 alone at cut 4, mean 1/2 -> [-1/2, 1/2]; slots 1 and 2 share cut 5, scores
    # {1, 1, 0, 1}, mean 3/4 -> slot 1 [1/4, 1/4], slot 2 [-3/4, 1/4].
    torch.testing.assert_close(summary, torch.tensor([[[-0.5, 0.5], [0.25, 0.25], [-0.75, 0.25]]]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_computed_grpo_preset(backend):
    # GRPO = (S=1, A=1, base, v2only, grpo), G=4, scores [1, 0, 0, 1]: R = r, V2 = 1/2, both advantages r - 1/2.
    scores = torch.tensor([1.0, 0.0, 0.0, 1.0]).view(4, 1, 1)
    cuts = torch.tensor([[8], [3], [8], [5]])
    probs = budget_prior("base", [8])
    thinking, summary = brpo_advantages(
        scores, cuts, 4, probs, variance_reduction="v2only", summary_method="grpo", backend=backend
    )
    torch.testing.assert_close(thinking, torch.tensor([[0.5], [-0.5], [-0.5], [0.5]]))
    torch.testing.assert_close(summary, torch.tensor([0.5, -0.5, -0.5, 0.5]).view(4, 1, 1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_summary_uses_group_mean_not_shared_cut(backend):
    # A=1, G=2, S=2; trace 0 has one cut [3, 3] for both slots. The baseline is the group mean of
    # r[., s, 0]: slot 0 (1 + 0)/2 = 1/2 -> [1/2, -1/2]; slot 1 (0 + 0)/2 = 0 -> [0, 0].
    # (The shared-cut mean would have given trace 0 [1/2, -1/2] instead of [1/2, 0].)
    scores = torch.tensor([[[1.0], [0.0]], [[0.0], [0.0]]])
    cuts = torch.tensor([[3, 3], [3, 6]])
    _, summary = brpo_advantages(scores, cuts, 2, [0.5, 0.5], backend=backend)
    torch.testing.assert_close(summary, torch.tensor([[[0.5], [0.0]], [[-0.5], [0.0]]]))


def random_rollouts(rng: random.Random, num_traces: int, num_slots: int, num_summaries: int, min_inserted: int = 0):
    b_max = rng.randint(num_slots, 20)
    budgets = budget_support(b_max, num_slots)
    prompts, thinking, cuts, inserted, summaries = [], [], [], [], []
    for _ in range(num_traces):
        length = rng.randint(0, b_max)
        trace_cuts = [min(b, length) for b in budgets]
        prompts.append([rng.randrange(100) for _ in range(rng.randint(1, 4))])
        thinking.append([rng.randrange(100) for _ in range(length)])
        cuts.append(trace_cuts)
        inserted.append(
            [[rng.randrange(100) for _ in range(rng.randint(min_inserted, 3))] for _ in sorted(set(trace_cuts))]
        )
        summaries.append(
            [[[rng.randrange(100) for _ in range(rng.randint(0, 4))] for _ in range(num_summaries)] for _ in budgets]
        )
    return prompts, thinking, cuts, inserted, summaries


def loop_token_advantages(rollouts, thinking_adv, summary_adv):
    """Walk the rollouts in packing order: prompt, thinking, then per slot and summary the branch."""
    prompts, thinking, cuts, inserted, summaries = rollouts
    out = []
    for n in range(len(prompts)):
        out += [0.0] * len(prompts[n])
        for j in range(len(thinking[n])):
            slots = [s for s, cut in enumerate(cuts[n]) if j < cut]
            out.append(thinking_adv[n][slots[0]] if slots else 0.0)
        distinct = sorted(set(cuts[n]))
        for s, per_slot in enumerate(summaries[n]):
            for a, summary in enumerate(per_slot):
                out += [0.0] * len(inserted[n][distinct.index(cuts[n][s])])
                out += [summary_adv[n][s][a]] * len(summary)
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("group_size", "num_slots", "num_summaries"), [(4, 4, 4), (1, 1, 1), (2, 3, 1), (3, 1, 2)])
def test_token_advantages_match_loop(backend, group_size, num_slots, num_summaries):
    rng = random.Random(group_size * 100 + num_slots * 10 + num_summaries)
    rollouts = random_rollouts(rng, 2 * group_size, num_slots, num_summaries)
    layout = pack_response_trees(*rollouts)
    scores = torch.tensor(
        [[[rng.random() for _ in range(num_summaries)] for _ in range(num_slots)] for _ in rollouts[0]]
    )
    thinking_adv, summary_adv = brpo_advantages(scores, layout.cut_lens, group_size, [1.0] * num_slots)
    token_adv = token_advantages(layout, thinking_adv, summary_adv, backend=backend)
    expected = loop_token_advantages(rollouts, thinking_adv.tolist(), summary_adv.tolist())
    assert token_adv.dtype == torch.float32
    assert token_adv.shape == (layout.num_tokens,)
    torch.testing.assert_close(token_adv, torch.tensor(expected, dtype=torch.float32), rtol=0, atol=0)


def test_token_advantages_align_with_loss_mask():
    # With nonzero advantages everywhere, the tokens that get one are exactly the trained targets:
    # the target predicted at t (loss_mask[t]) sits at t + 1, so token_adv[1:] != 0 is loss_mask[:-1].
    # (Needs non-empty delimiters: after an empty one the first summary token has no predictor.)
    rollouts = random_rollouts(random.Random(7), 6, 3, 2, min_inserted=1)
    layout = pack_response_trees(*rollouts)
    thinking_adv = torch.arange(1, 1 + 6 * 3, dtype=torch.float32).view(6, 3)
    summary_adv = -torch.arange(1, 1 + 6 * 3 * 2, dtype=torch.float32).view(6, 3, 2)
    token_adv = token_advantages(layout, thinking_adv, summary_adv)
    assert bool(layout.loss_mask.any())
    assert torch.equal(token_adv[1:] != 0, layout.loss_mask[:-1])
    assert token_adv[0] == 0


@pytest.mark.parametrize("backend", ("cpp", "reference"))
def test_advantage_stats_match_loop(backend):
    scores, cuts, probs = random_case(11, 4, 4, 4, "uniform", num_groups=4)
    stats = advantage_stats(scores, cuts, 4, probs, backend=backend)
    torch.testing.assert_close(stats.mean_score, scores.mean(dim=(0, 2)))
    returns, _ = loop_advantages(scores.tolist(), cuts.tolist(), 4, probs.tolist(), "none", "brpo")

    def variance(values):
        mean = sum(values) / len(values)
        return sum((v - mean) ** 2 for v in values) / len(values)

    for name in VARIANCE_REDUCTIONS:
        thinking, _ = loop_advantages(scores.tolist(), cuts.tolist(), 4, probs.tolist(), name, "brpo")
        expected = [variance([row[s] for row in thinking]) / variance([row[s] for row in returns]) for s in range(4)]
        torch.testing.assert_close(stats.variance_ratio[name], torch.tensor(expected), rtol=1e-4, atol=1e-6)
        numerators = [variance([row[s] for row in thinking]) for s in range(4)]
        torch.testing.assert_close(stats.advantage_variance[name], torch.tensor(numerators), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(
        stats.return_variance,
        torch.tensor([variance([row[s] for row in returns]) for s in range(4)]),
        rtol=1e-4,
        atol=1e-6,
    )
    assert stats.variance_ratio["none"].tolist() == pytest.approx([1.0] * 4)
    metrics = stats.metrics()
    assert metrics["advantages/variance_ratio/brpo/slot2"] == pytest.approx(float(stats.variance_ratio["brpo"][2]))


def test_advantage_stats_nan_where_return_constant():
    scores = torch.ones(4, 2, 2)
    stats = advantage_stats(scores, torch.tensor([[1, 2]] * 4), 2, [1.0, 1.0])
    assert all(math.isnan(v) for v in stats.variance_ratio["brpo"].tolist())


GOOD = {
    "scores": torch.zeros(4, 2, 2),
    "cut_lens": torch.tensor([[1, 2]] * 4),
    "group_size": 2,
    "budget_probs": [0.5, 0.5],
}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"scores": torch.tensor([0.0, math.nan, 0.0, 0.0]).view(4, 1, 1).expand(4, 2, 2).clone()},
            r"scores\[1, 0, 0\] = nan",
        ),
        ({"scores": torch.full((4, 2, 2), math.inf)}, r"finite.*inf"),
        ({"group_size": 3}, "not divisible by group_size=3"),
        ({"group_size": 0}, "group_size must be"),
        ({"budget_probs": [0.5, -0.1]}, r"budget_probs must be finite and >= 0, got \[0.5, -0.1\]"),
        ({"budget_probs": [0.0, 0.0]}, "must not all be zero"),
        ({"budget_probs": [0.5, 0.2, 0.3]}, r"budget_probs must have shape \[S=2\]"),
        ({"cut_lens": torch.tensor([[1, 2], [1, 2], [3, 2], [1, 2]])}, r"trace 2 has cut_lens\[2, 0\] = 3 then"),
        ({"cut_lens": torch.tensor([[1, 2]] * 3)}, r"cut_lens must have shape \[N=4, S=2\]"),
        ({"cut_lens": torch.tensor([[-1, 2]] * 4)}, r"cut_lens\[0, 0\] = -1"),
        ({"cut_lens": torch.tensor([[1.0, 2.0]] * 4)}, "integer tensor"),
        ({"scores": torch.zeros(4, 2)}, r"scores must have shape \[N, S, A\]"),
        ({"scores": torch.zeros(4, 2, 2, dtype=torch.long)}, "floating-point"),
    ],
)
def test_bad_input_raises(change, message):
    with pytest.raises(ValueError, match=message):
        brpo_advantages(**{**GOOD, **change})


def test_bad_names_raise(monkeypatch):
    with pytest.raises(ValueError, match="variance_reduction must be one of"):
        brpo_advantages(**GOOD, variance_reduction="v3")
    with pytest.raises(ValueError, match="summary_method must be one of"):
        brpo_advantages(**GOOD, summary_method="ppo")
    with pytest.raises(ValueError, match="backend must be one of"):
        brpo_advantages(**GOOD, backend="cuda")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(BackendUnavailableError, match="brpo_advantages: backend 'triton' needs CUDA tensors"):
        brpo_advantages(**GOOD, backend="triton")


def test_token_advantages_bad_shapes_raise():
    layout = pack_response_trees(*random_rollouts(random.Random(3), 2, 2, 2))
    with pytest.raises(ValueError, match=r"thinking_adv must have shape \[2, 2\]"):
        token_advantages(layout, torch.zeros(2, 3), torch.zeros(2, 2, 2))
    with pytest.raises(ValueError, match=r"summary_adv must have shape \[2, 2, 2\]"):
        token_advantages(layout, torch.zeros(2, 2), torch.zeros(2, 2, 1))


@pytest.mark.gpu
def test_cuda_triton_matches_cpu_op():
    scores, cuts, probs = random_case(5, 8, 4, 4, "linear", num_groups=64, b_max=8000)
    rollouts = random_rollouts(random.Random(5), 64, 4, 4)
    layout = pack_response_trees(*rollouts)
    for variance_reduction in VARIANCE_REDUCTIONS:
        for summary_method in SUMMARY_METHODS:
            kwargs = {"variance_reduction": variance_reduction, "summary_method": summary_method}
            expected = brpo_advantages(scores, cuts, 8, probs, backend="cpp", **kwargs)
            got = brpo_advantages(scores.cuda(), cuts.cuda(), 8, probs.cuda(), **kwargs)
            torch.testing.assert_close(got[0].cpu(), expected[0], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(got[1].cpu(), expected[1], rtol=1e-5, atol=1e-6)
    thinking_adv, summary_adv = brpo_advantages(scores[:64], layout.cut_lens, 8, probs)
    expected = token_advantages(layout, thinking_adv, summary_adv, backend="cpp")
    got = token_advantages(layout.to("cuda"), thinking_adv.cuda(), summary_adv.cuda())
    torch.testing.assert_close(got.cpu(), expected, rtol=0, atol=0)


def test_cpu_op_rejects_cuts_beyond_the_trace():
    layout = pack_response_trees(*random_rollouts(random.Random(4), 2, 2, 1))
    bad_cuts = layout.cut_lens.clone()
    bad_cuts[1, 1] = int(layout.thinking_lens[1]) + 1
    with pytest.raises(ValueError, match=r"trace 1: cut_lens\[1\]"):
        ops.token_advantages(
            layout.cu_seqlens,
            layout.prompt_lens,
            layout.thinking_lens,
            bad_cuts,
            layout.token_kind,
            layout.slot,
            layout.summary_index,
            layout.branch_start,
            torch.zeros(2, 2),
            torch.zeros(2, 2, 1),
        )
