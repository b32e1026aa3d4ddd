"""Thinking budgets: support points, priors, cut lengths and the inserted delimiters.

The rules (ARCHITECTURE.md, "The method in one page"):

- support points ``b_s = b_max * s / S`` for s = 1..S;
- priors ``uniform`` (1/S), ``linear`` (b_s / sum b), ``base`` (all mass on b_S) or an explicit
  list, normalised to sum 1;
- a trace of length L is cut at ``c_s = min(b_s, L)``; slots with equal cuts share one
  *distinct cut*;
- the summary prompt of a cut appends ``"...\\n\\n...\\n\\n</think>" + "\\n\\n**Final Answer**\\n"``
  when the trace was cut short or never closed its thinking, and only
  ``"\\n\\n**Final Answer**\\n"`` when the trace closed its thinking (ends in ``</think>``) inside
  the cut.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from trainer.text_markers import ANSWER_OPENER, THINK_END, TRUNCATION_MARK

PRIOR_PRESETS = ("uniform", "linear", "base")


def budget_support(b_max: int, num_slots: int) -> list[int]:
    """Support points ``[b_1, ..., b_S]`` with ``b_s = b_max * s / S`` (integer division)."""
    if num_slots < 1:
        raise ValueError(f"num_slots must be >= 1, got {num_slots}")
    if b_max < num_slots:
        raise ValueError(f"b_max={b_max} must be at least num_slots={num_slots} for distinct budgets")
    return [b_max * s // num_slots for s in range(1, num_slots + 1)]


def budget_prior(prior: str | Sequence[float], budgets: Sequence[int]) -> torch.Tensor:
    """Normalised prior ``p [S]`` (float64) over the budgets: a preset name or explicit weights."""
    num_slots = len(budgets)
    if isinstance(prior, str):
        if prior == "uniform":
            weights = torch.ones(num_slots, dtype=torch.float64)
        elif prior == "linear":
            weights = torch.tensor(list(budgets), dtype=torch.float64)
        elif prior == "base":
            weights = torch.zeros(num_slots, dtype=torch.float64)
            weights[-1] = 1.0
        else:
            raise ValueError(f"unknown budget prior {prior!r}; expected one of {PRIOR_PRESETS} or a list")
    else:
        weights = torch.as_tensor(list(prior), dtype=torch.float64)
        if weights.shape != (num_slots,):
            raise ValueError(f"explicit budget prior has {weights.numel()} weights, expected {num_slots}")
        if not torch.isfinite(weights).all() or (weights < 0).any():
            raise ValueError(f"budget prior weights must be finite and >= 0, got {weights.tolist()}")
        if weights.sum() <= 0:
            raise ValueError(f"budget prior weights must not all be zero, got {weights.tolist()}")
    return weights / weights.sum()


def cut_lengths(thinking_lens: Sequence[int] | torch.Tensor, budgets: Sequence[int]) -> torch.Tensor:
    """Cut lengths ``[N, S]`` int64: ``c[n, s] = min(b_s, L_n)``."""
    lens = torch.as_tensor(thinking_lens, dtype=torch.long).reshape(-1)
    if (lens < 0).any():
        raise ValueError(f"thinking lengths must be >= 0, got {lens.tolist()}")
    support = torch.as_tensor(list(budgets), dtype=torch.long)
    return torch.minimum(lens[:, None], support[None, :])


def distinct_cuts(cuts: Sequence[int]) -> list[int]:
    """The distinct cuts of one trace, in order (slots whose cut is the whole trace share one)."""
    return sorted(set(int(c) for c in cuts))


@dataclass(frozen=True)
class BudgetSchedule:
    """Budgets and prior of a run: ``b_max``, S slots and the normalised prior ``probs [S]``.

    The budgets are the support points ``b_max * s / S``, or ``support`` when given (evaluation
    budgets such as 2000/4000/6000/8000: increasing, the last one ``b_max``).
    """

    b_max: int
    num_slots: int
    prior: str | tuple[float, ...] = "uniform"
    support: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.support is not None:
            support = [int(b) for b in self.support]
            if len(support) != self.num_slots or support != sorted(set(support)) or support[0] < 1:
                raise ValueError(f"support must be {self.num_slots} increasing positive budgets, got {support}")
            if support[-1] != self.b_max:
                raise ValueError(f"the last budget of support {support} must be b_max={self.b_max}")

    @classmethod
    def from_budgets(cls, budgets: Sequence[int], prior: str | Sequence[float] = "uniform") -> BudgetSchedule:
        """A schedule over explicit budgets (``b_max`` is the last one)."""
        budgets = tuple(int(b) for b in budgets)
        if not budgets:
            raise ValueError("at least one budget is needed")
        prior = prior if isinstance(prior, str) else tuple(float(w) for w in prior)
        return cls(budgets[-1], len(budgets), prior, budgets)

    @property
    def budgets(self) -> list[int]:
        if self.support is not None:
            return list(self.support)
        return budget_support(self.b_max, self.num_slots)

    @property
    def probs(self) -> torch.Tensor:
        return budget_prior(self.prior, self.budgets)

    def cuts(self, thinking_lens: Sequence[int] | torch.Tensor) -> torch.Tensor:
        return cut_lengths(thinking_lens, self.budgets)


@dataclass(frozen=True)
class Delimiters:
    """Token ids of the two inserted delimiters, encoded with the policy's tokenizer.

    ``truncated`` follows a trace that was cut short or never closed its thinking; ``closed``
    follows a trace that ended in ``</think>`` inside the cut.
    """

    truncated: tuple[int, ...]
    closed: tuple[int, ...]
    think_end_id: int

    @classmethod
    def from_tokenizer(cls, tokenizer) -> Delimiters:
        def encode(text: str) -> tuple[int, ...]:
            return tuple(tokenizer.encode(text, add_special_tokens=False))

        think_end = encode(THINK_END)
        if len(think_end) != 1:
            raise ValueError(f"the tokenizer must have {THINK_END!r} as one token, it encodes to {list(think_end)}")
        return cls(
            truncated=encode(TRUNCATION_MARK + ANSWER_OPENER),
            closed=encode(ANSWER_OPENER),
            think_end_id=think_end[0],
        )

    def closed_within(self, thinking_ids: Sequence[int], cut: int) -> bool:
        """True when the trace ends in ``</think>`` and the cut keeps all of it."""
        return len(thinking_ids) > 0 and cut == len(thinking_ids) and int(thinking_ids[-1]) == self.think_end_id

    def inserted(self, thinking_ids: Sequence[int], cut: int) -> tuple[int, ...]:
        """Inserted delimiter ids after ``z[:cut]``."""
        if not 0 <= cut <= len(thinking_ids):
            raise ValueError(f"cut {cut} is outside the trace of length {len(thinking_ids)}")
        return self.closed if self.closed_within(thinking_ids, cut) else self.truncated

    def inserted_per_distinct_cut(self, thinking_ids: Sequence[int], cuts: Sequence[int]) -> list[tuple[int, ...]]:
        """Inserted delimiter ids for every distinct cut of a trace, in order."""
        return [self.inserted(thinking_ids, cut) for cut in distinct_cuts(cuts)]
