"""Budget support points, priors, cut lengths and delimiters, against hand-computed values."""

import pytest
import torch

from trainer.budgets import (
    ANSWER_OPENER,
    TRUNCATION_MARK,
    BudgetSchedule,
    Delimiters,
    budget_prior,
    budget_support,
    cut_lengths,
    distinct_cuts,
)


def test_support_points_and_priors_match_the_paper_presets():
    budgets = budget_support(8000, 4)
    assert budgets == [2000, 4000, 6000, 8000]
    assert budget_prior("uniform", budgets).tolist() == [0.25] * 4
    assert budget_prior("linear", budgets).tolist() == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert budget_prior("base", budgets).tolist() == [0.0, 0.0, 0.0, 1.0]
    assert budget_prior([1, 1, 2, 0], budgets).tolist() == [0.25, 0.25, 0.5, 0.0]
    assert BudgetSchedule(16000, 1, "base").budgets == [16000]


def test_cut_lengths_share_the_whole_trace():
    cuts = cut_lengths([8000, 4500, 100, 0], [2000, 4000, 6000, 8000])
    assert cuts.tolist() == [
        [2000, 4000, 6000, 8000],
        [2000, 4000, 4500, 4500],
        [100, 100, 100, 100],
        [0, 0, 0, 0],
    ]
    assert distinct_cuts(cuts[1].tolist()) == [2000, 4000, 4500]


@pytest.mark.parametrize(
    "prior,message",
    [
        ("cosine", "unknown budget prior 'cosine'"),
        ([1.0, 2.0], "has 2 weights, expected 4"),
        ([1.0, -1.0, 1.0, 1.0], "finite and >= 0"),
        ([0, 0, 0, 0], "must not all be zero"),
        ([float("nan"), 1, 1, 1], "finite and >= 0"),
    ],
)
def test_bad_priors_raise(prior, message):
    with pytest.raises(ValueError, match=message):
        budget_prior(prior, [1, 2, 3, 4])


def test_bad_support_raises():
    with pytest.raises(ValueError, match="b_max=3 must be at least num_slots=4"):
        budget_support(3, 4)
    with pytest.raises(ValueError, match="thinking lengths must be >= 0"):
        cut_lengths([-1], [4])


class CharTokenizer:
    """One id per character, and '</think>' as one token (id 1000)."""

    def encode(self, text, add_special_tokens=False):
        ids, i = [], 0
        while i < len(text):
            if text.startswith("</think>", i):
                ids.append(1000)
                i += len("</think>")
            else:
                ids.append(ord(text[i]))
                i += 1
        return ids


def test_delimiters_truncated_versus_closed_trace():
    delimiters = Delimiters.from_tokenizer(CharTokenizer())
    tok = CharTokenizer()
    assert list(delimiters.truncated) == tok.encode("...\n\n...\n\n</think>\n\n**Final Answer**\n")
    assert list(delimiters.closed) == tok.encode("\n\n**Final Answer**\n")
    assert TRUNCATION_MARK + ANSWER_OPENER == "...\n\n...\n\n</think>\n\n**Final Answer**\n"
    closed_trace = [5, 6, 1000]
    open_trace = [5, 6, 7]
    # Closed inside the cut: only the answer opener. Cut short of the close: truncation mark.
    assert delimiters.inserted(closed_trace, 3) == delimiters.closed
    assert delimiters.inserted(closed_trace, 2) == delimiters.truncated
    assert delimiters.inserted(open_trace, 3) == delimiters.truncated
    assert delimiters.inserted_per_distinct_cut(closed_trace, [2, 3, 3]) == [delimiters.truncated, delimiters.closed]
    with pytest.raises(ValueError, match="cut 4 is outside the trace of length 3"):
        delimiters.inserted(open_trace, 4)


def test_think_end_must_be_one_token():
    class Split(CharTokenizer):
        def encode(self, text, add_special_tokens=False):
            return [ord(c) for c in text]

    with pytest.raises(ValueError, match="'</think>' as one token"):
        Delimiters.from_tokenizer(Split())


def test_schedule_cuts_tensor():
    schedule = BudgetSchedule(12, 3, "linear")
    assert torch.equal(schedule.cuts(torch.tensor([5])), torch.tensor([[4, 5, 5]]))
    assert schedule.probs.tolist() == pytest.approx([4 / 24, 8 / 24, 12 / 24])
