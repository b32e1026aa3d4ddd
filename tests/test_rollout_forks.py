"""Radix index, fork planning and dealing, budgets and delimiters, against hand-computed cases."""

import random

import pytest
import torch

from anytime_kernels import pack_response_trees
from trainer.budgets import BudgetSchedule, Delimiters
from trainer.rollout import GenerationOutput, RadixIndex, RolloutEngine, SamplingParams, ThinkingBatch
from trainer.rollout.forks import plan_forks

THINK_END, EOS = 2, 0
TRUNCATED, CLOSED = (90, 91, THINK_END, 92), (92,)


def test_radix_index_matches_the_longest_shared_prefix_by_brute_force():
    rng = random.Random(0)
    index = RadixIndex()
    stored = {}
    for value in range(40):
        tokens = tuple(rng.choice([1, 2, 3]) for _ in range(rng.randint(1, 12)))
        index.insert(tokens, value)
        stored[value] = tokens
    for _ in range(300):
        query = [rng.choice([1, 2, 3]) for _ in range(rng.randint(0, 14))]

        def shared(tokens, query=query):
            n = 0
            while n < min(len(tokens), len(query)) and tokens[n] == query[n]:
                n += 1
            return n

        best = max(shared(tokens) for tokens in stored.values())
        value, length = index.match(query)
        assert length == best
        if best:
            assert stored[value][:best] == tuple(query[:best])
        else:
            assert value is None
    index.clear()
    assert index.match([1, 2, 3]) == (None, 0)


class RecordingEngine(RolloutEngine):
    """Answers every request with distinct fake samples ``[request index, sample index, EOS]``."""

    def __init__(self):
        super().__init__(Delimiters(truncated=TRUNCATED, closed=CLOSED, think_end_id=THINK_END), EOS)
        self.requests = []

    def generate(self, requests):
        base = len(self.requests)
        self.requests.extend(requests)
        return [
            GenerationOutput(
                output_ids=[[base + i, k, EOS] for k in range(r.n)],
                finish_reasons=["stop"] * r.n,
                prompt_tokens=len(r.input_ids),
                cached_tokens=[0] * r.n,
                prefilled_tokens=len(r.input_ids),
            )
            for i, r in enumerate(requests)
        ]

    def update_weights(self, model):
        raise NotImplementedError

    def flush_cache(self):
        raise NotImplementedError


def test_summary_forks_follow_the_budget_rules():
    prompt = [50, 51]
    closed = [10, 11, 12, THINK_END]  # closed its thinking at length 4
    truncated = [20, 21, 22, 23, 24, 25, 26, 27]  # reached b_max = 8
    never_closed = [30, 31, 32, EOS]  # stopped at EOS without closing
    traces = ThinkingBatch([prompt] * 3, [closed, truncated, never_closed], ["think_end", "length", "eos"], 3)
    engine = RecordingEngine()
    batch = engine.summarize(traces, BudgetSchedule(8, 4), num_summaries=2, sampling=SamplingParams(temperature=0))

    assert batch.cut_lens.tolist() == [[2, 4, 4, 4], [2, 4, 6, 8], [2, 4, 4, 4]]
    sent = [(list(r.input_ids), r.n, r.max_new_tokens, r.stop_token_ids) for r in engine.requests]
    t, c = list(TRUNCATED), list(CLOSED)
    assert (
        sent
        == [
            (prompt + closed[:2] + t, 2, 118, (EOS,)),
            (prompt + closed + c, 6, 118, (EOS,)),  # closed inside the cut: only the answer opener
            (prompt + truncated[:2] + t, 2, 118, (EOS,)),
            (prompt + truncated[:4] + t, 2, 118, (EOS,)),
            (prompt + truncated[:6] + t, 2, 118, (EOS,)),
            (prompt + truncated + t, 2, 118, (EOS,)),
            (prompt + never_closed[:2] + t, 2, 118, (EOS,)),
            (prompt + never_closed + t, 6, 118, (EOS,)),  # ended in EOS: truncation mark
        ]
    )
    assert batch.inserted_ids == [[TRUNCATED, CLOSED], [TRUNCATED] * 4, [TRUNCATED, TRUNCATED]]
    # A cut shared by 3 slots got 3 * A samples, dealt A per slot in order.
    assert batch.summary_ids[0] == [[[0, 0, EOS], [0, 1, EOS]], [[1, 0, EOS], [1, 1, EOS]],
                                    [[1, 2, EOS], [1, 3, EOS]], [[1, 4, EOS], [1, 5, EOS]]]  # fmt: skip
    assert [s[0] for s in batch.summary_ids[1]] == [[2, 0, EOS], [3, 0, EOS], [4, 0, EOS], [5, 0, EOS]]
    assert batch.summary_finish[2][3] == ["stop", "stop"]

    layout = pack_response_trees(*batch.pack_arguments())
    # Row = prompt + trace + every branch (inserted + 3-token summary), A=2 branches per slot.
    assert layout.row_lens.tolist() == [6 + 2 * (4 + 3) + 6 * (1 + 3), 10 + 8 * (4 + 3), 6 + 8 * (4 + 3)]


def test_plan_forks_rejects_inconsistent_inputs():
    delimiters = Delimiters(truncated=TRUNCATED, closed=CLOSED, think_end_id=THINK_END)
    with pytest.raises(ValueError, match="cut 5 is longer than the trace"):
        plan_forks([[1]], [[3, 4]], torch.tensor([[1, 5]]), delimiters, 1)
    with pytest.raises(ValueError, match=r"cut_lens must have shape \[N=2, S\]"):
        plan_forks([[1], [1]], [[3], [4]], torch.tensor([[1]]), delimiters, 1)
    with pytest.raises(ValueError, match="num_summaries must be >= 1"):
        RecordingEngine().summarize(
            ThinkingBatch([[1]], [[3]], ["length"], 1), BudgetSchedule(2, 2), 0, SamplingParams()
        )


def test_think_requests_stop_at_think_end_and_eos_and_classify_the_finish():
    engine = RecordingEngine()
    traces = engine.think([[5, 6], [7]], group_size=3, max_tokens=16, sampling=SamplingParams(seed=3))
    assert [(list(r.input_ids), r.n, r.max_new_tokens, r.stop_token_ids, r.cache_output) for r in engine.requests] == [
        ([5, 6], 3, 16, (THINK_END, EOS), True),
        ([7], 3, 16, (THINK_END, EOS), True),
    ]
    assert traces.prompt_ids == [[5, 6]] * 3 + [[7]] * 3
    assert traces.finish == ["eos"] * 6
    assert engine._trace_finish([1, THINK_END]) == "think_end" and engine._trace_finish([1, 3]) == "length"
    assert engine.stats.think.samples == 6 and engine.stats.think.generated_tokens == 18
