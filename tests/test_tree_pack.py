"""Response-tree packing: hand-built cases, the C++ op against the Python reference, the mask rule."""

import random

import pytest
import torch

from anytime_kernels import (
    IGNORE_INDEX,
    TokenKind,
    pack_response_trees,
    tree_mask_mod,
)
from anytime_kernels.attention import dense_tree_mask
from anytime_kernels.constants import PACKED_FIELDS

BACKENDS = ("cpp", "reference")
FIELDS = (
    *PACKED_FIELDS,
    "cut_lens",
    "prompt_lens",
    "thinking_lens",
)
X = IGNORE_INDEX
P, T, I, S = (int(k) for k in TokenKind)


def random_batch(rng: random.Random, num_traces: int, num_slots: int, num_summaries: int):
    """Ragged rollouts; some traces end before the later budgets (shared distinct cuts)."""
    b_max = rng.randint(1, 24)
    budgets = [max(1, b_max * (s + 1) // num_slots) for s in range(num_slots)]
    if rng.random() < 0.3:
        budgets[0] = 0  # a cut of 0: the summary reads the prompt alone
    prompts, thinking, cuts, inserted, summaries = [], [], [], [], []
    for _ in range(num_traces):
        # Past b_max now and then: thinking beyond the last cut (ingested traces), never trained.
        length = rng.randint(0, b_max + 6)
        trace_cuts = [min(b, length) for b in budgets]
        prompts.append([rng.randrange(1000) for _ in range(rng.randint(1, 6))])
        thinking.append([rng.randrange(1000) for _ in range(length)])
        cuts.append(trace_cuts)
        inserted.append([[rng.randrange(1000) for _ in range(rng.randint(1, 4))] for _ in sorted(set(trace_cuts))])
        summaries.append(
            [
                [[rng.randrange(1000) for _ in range(rng.randint(0, 5))] for _ in range(num_summaries)]
                for _ in range(num_slots)
            ]
        )
    return prompts, thinking, cuts, inserted, summaries


def assert_layouts_equal(a, b):
    for name in FIELDS:
        left, right = getattr(a, name), getattr(b, name)
        assert left.dtype == right.dtype, name
        assert torch.equal(left, right), f"{name}: {left.tolist()} != {right.tolist()}"
    assert a.num_summaries == b.num_summaries


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_built_two_slots_two_distinct_cuts(backend):
    # prompt [1, 2]; z = [10, 11, 12, 13]; cuts (2, 4); A = 1.
    layout = pack_response_trees(
        [[1, 2]], [[10, 11, 12, 13]], [[2, 4]], [[[90], [91, 92]]], [[[[50, 51]], [[60]]]], backend=backend
    )
    assert layout.input_ids.tolist() == [1, 2, 10, 11, 12, 13, 90, 50, 51, 91, 92, 60]
    assert layout.position_ids.tolist() == [0, 1, 2, 3, 4, 5, 4, 5, 6, 6, 7, 8]
    assert layout.labels.tolist() == [X, 10, 11, 12, 13, X, 50, 51, X, X, 60, X]
    assert layout.loss_mask.tolist() == [label != X for label in layout.labels.tolist()]
    assert layout.token_kind.tolist() == [P, P, T, T, T, T, I, S, S, I, I, S]
    assert layout.slot.tolist() == [-1, -1, 0, 0, 1, 1, 0, 0, 0, 1, 1, 1]
    assert layout.summary_index.tolist() == [-1] * 6 + [0] * 6
    assert layout.prefix_end.tolist() == [0] * 6 + [4, 4, 4, 6, 6, 6]
    assert layout.branch_start.tolist() == [0] * 6 + [6, 6, 6, 9, 9, 9]
    assert layout.cu_seqlens.tolist() == [0, 12]
    assert layout.prompt_lens.tolist() == [2] and layout.thinking_lens.tolist() == [4]


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_built_trace_that_closed_early_shares_one_cut(backend):
    # z ends (with </think> = 7) before both budgets: one distinct cut of 2 for both slots, A = 2.
    # Second trace: prompt only, empty thinking, one empty summary.
    layout = pack_response_trees(
        [[5], [6, 6]],
        [[20, 7], []],
        [[2, 2], [0, 0]],
        [[[30]], [[31]]],
        [[[[40], [41]], [[42], []]], [[[43], [44]], [[], [45, 46]]]],
        backend=backend,
    )
    row0 = layout.row_slice(0)
    assert layout.input_ids[row0].tolist() == [5, 20, 7, 30, 40, 30, 41, 30, 42, 30]
    assert layout.position_ids[row0].tolist() == [0, 1, 2, 3, 4, 3, 4, 3, 4, 3]
    assert layout.labels[row0].tolist() == [20, 7, X, 40, X, 41, X, 42, X, X]
    assert layout.slot[row0].tolist() == [-1, 0, 0, 0, 0, 0, 0, 1, 1, 1]
    assert layout.summary_index[row0].tolist() == [-1, -1, -1, 0, 0, 1, 1, 0, 0, 1]
    assert layout.prefix_end[row0].tolist() == [0, 0, 0] + [3] * 7
    assert layout.branch_start[row0].tolist() == [0, 0, 0, 3, 3, 5, 5, 7, 7, 9]
    row1 = layout.row_slice(1)
    assert layout.input_ids[row1].tolist() == [6, 6, 31, 43, 31, 44, 31, 31, 45, 46]
    assert layout.position_ids[row1].tolist() == [0, 1, 2, 3, 2, 3, 2, 2, 3, 4]
    assert layout.labels[row1].tolist() == [X, X, 43, X, 44, X, X, 45, 46, X]
    assert layout.prefix_end[row1].tolist() == [10, 10] + [12] * 8
    assert layout.seq_ids.tolist() == [0] * 10 + [1] * 10
    assert layout.cu_seqlens.tolist() == [0, 10, 20]


@pytest.mark.parametrize(
    "num_traces,num_slots,num_summaries",
    [(1, 1, 1), (7, 4, 4), (16, 4, 1), (5, 1, 3), (9, 3, 2), (0, 2, 2)],
)
def test_cpp_matches_python_reference_on_random_batches(num_traces, num_slots, num_summaries):
    rng = random.Random(num_traces * 100 + num_slots * 10 + num_summaries)
    for _ in range(5):
        batch = random_batch(rng, num_traces, num_slots, num_summaries)
        assert_layouts_equal(
            pack_response_trees(*batch, backend="cpp"), pack_response_trees(*batch, backend="reference")
        )


def test_random_batches_cover_the_edge_cases():
    """The random batches above include thinking beyond the last cut and a cut of 0 with thinking."""
    beyond = zero_cut = 0
    for seed in range(8):
        _, thinking, cuts, _, _ = random_batch(random.Random(seed), 6, 4, 3)
        beyond += sum(len(z) > c[-1] for z, c in zip(thinking, cuts, strict=True))
        zero_cut += sum(c[0] == 0 and len(z) > 0 for z, c in zip(thinking, cuts, strict=True))
    assert beyond >= 5 and zero_cut >= 5


def test_tensor_inputs_match_list_inputs():
    batch = random_batch(random.Random(3), 6, 4, 2)
    prompts, thinking, cuts, inserted, summaries = batch
    as_tensor = (
        [torch.tensor(p, dtype=torch.int32) for p in prompts],
        [torch.tensor(z, dtype=torch.long) for z in thinking],
        torch.tensor(cuts),
        [[torch.tensor(d, dtype=torch.long) for d in per] for per in inserted],
        [[[torch.tensor(x, dtype=torch.long) for x in slot] for slot in per] for per in summaries],
    )
    assert_layouts_equal(pack_response_trees(*batch), pack_response_trees(*as_tensor))


@pytest.mark.parametrize("seed", range(4))
def test_every_branch_sees_exactly_its_standalone_sequence(seed):
    """Reading a branch's visible keys in order reproduces prompt + z[:c] + inserted + summary, with
    position ids 0.. as if it were its own sequence; the trunk sees the trace causally."""
    prompts, thinking, cuts, inserted, summaries = random_batch(random.Random(seed), 6, 4, 3)
    layout = pack_response_trees(prompts, thinking, cuts, inserted, summaries)
    for n in range(len(prompts)):
        rows = layout.row_slice(n)
        # The SDPA path's mask of this tree alone (offsets made row-relative).
        mask = dense_tree_mask(
            torch.zeros(rows.stop - rows.start, dtype=torch.int32),
            layout.prefix_end[rows] - rows.start,
            layout.branch_start[rows] - rows.start,
        )
        ids, positions = layout.input_ids[rows], layout.position_ids[rows]
        kinds, slots, summary_index = layout.token_kind[rows], layout.slot[rows], layout.summary_index[rows]
        distinct = sorted(set(cuts[n]))
        for q in range(rows.stop - rows.start):
            visible = mask[q].nonzero().flatten()
            if kinds[q] in (TokenKind.PROMPT, TokenKind.THINKING):
                expected = (prompts[n] + thinking[n])[: q + 1]
            else:
                s, a = int(slots[q]), int(summary_index[q])
                cut = cuts[n][s]
                standalone = prompts[n] + thinking[n][:cut] + inserted[n][distinct.index(cut)] + summaries[n][s][a]
                expected = standalone[: len(visible)]
                assert positions[q] == len(visible) - 1
                assert len(visible) >= len(prompts[n]) + cut + 1
            assert ids[visible].tolist() == expected
            assert positions[visible].tolist() == list(range(len(expected)))


def test_mask_mod_matches_block_diagonal_dense_masks():
    layout = pack_response_trees(*random_batch(random.Random(11), 4, 3, 2))
    total = layout.num_tokens
    padded = total + 5
    mask_mod = tree_mask_mod(layout, padded_len=padded)
    q = torch.arange(padded).view(-1, 1)
    k = torch.arange(padded).view(1, -1)
    got = mask_mod(0, 0, q, k)
    # The rule written out token by token: k <= q, same tree, and k in q's branch or visible trunk prefix.
    expected = torch.zeros(padded, padded, dtype=torch.bool)
    for n in range(layout.num_traces):
        rows = layout.row_slice(n)
        for q in range(rows.start, rows.stop):
            for k in range(rows.start, q + 1):
                expected[q, k] = k >= layout.branch_start[q] or k < layout.prefix_end[q]
    expected[total:, total:] = torch.eye(5, dtype=torch.bool)
    assert torch.equal(got, expected)


def test_thinking_beyond_last_cut_is_not_trained():
    layout = pack_response_trees([[1]], [[10, 11, 12, 13]], [[1, 2]], [[[90], [91]]], [[[[50]], [[51]]]])
    trunk = layout.labels[:5].tolist()
    assert trunk == [10, 11, X, X, X]
    assert layout.slot[:5].tolist() == [-1, 0, 1, -1, -1]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda b: b[2].__setitem__(1, [1, 9]), r"trace 1: cut_lens\[1\] = 9 is beyond the thinking length 3"),
        (lambda b: b[2].__setitem__(1, [3, 1]), r"trace 1: cut_lens decrease at slot 1 \(3 then 1\)"),
        (lambda b: b[2].__setitem__(1, [-1, 2]), r"trace 1: cut_lens\[0\] = -1 is negative"),
        (lambda b: b[1].__setitem__(1, [4, -5, 6]), r"trace 1: token id -5 is negative"),
        (
            lambda b: b[3].__setitem__(1, [[7]]),
            r"trace 1: got 1 inserted delimiters, expected one per distinct cut \(2\)",
        ),
        (lambda b: b[4].__setitem__(1, [[[1]]]), r"trace 1: summary_ids has 1 slots, expected 2"),
        (lambda b: b[4][1].__setitem__(1, [[1], [2], [3]]), r"trace 1: summary_ids\[1\] has 3 summaries, expected A=2"),
        (lambda b: b[4][1].__setitem__(0, [1, 2]), r"trace 1: summary_ids\[0\]\[0\] must be a sequence"),
        (lambda b: b[1].pop(), r"thinking_ids has 1 traces, prompt_ids has 2"),
        (lambda b: b[2].__setitem__(1, [1, 2, 3]), r"trace 1: has 3 budget slots in cut_lens, trace 0 has 2"),
    ],
)
def test_bad_input_raises_value_error_naming_trace_and_value(backend, mutate, message):
    batch = (
        [[1], [2, 3]],
        [[4, 5], [6, 7, 8]],
        [[1, 2], [1, 3]],
        [[[9], [10]], [[11], [12]]],
        [[[[13], [14]], [[15], [16]]], [[[17], [18]], [[19], [20]]]],
    )
    mutate(batch)
    with pytest.raises(ValueError, match=message):
        pack_response_trees(*batch, backend=backend)


def test_float_tokens_and_bad_backend_are_rejected():
    with pytest.raises(ValueError, match=r"integer token ids, got dtype torch\.float32"):
        pack_response_trees([torch.ones(2)], [[1]], [[1]], [[[1]]], [[[[1]]]])
    with pytest.raises(ValueError, match="backend must be"):
        pack_response_trees([[1]], [[1]], [[1]], [[[1]]], [[[[1]]]], backend="triton")
