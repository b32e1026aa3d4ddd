"""The math reward: the format rule and the final-answer box in the trainer process, math-verify in the pool.

Only distinct (answer, ground truth) pairs that plain text cannot settle travel to the pool: the
summaries of one prompt repeat the same few answers across traces, slots and samples, and most
math answers are integers, so a step grades far fewer pairs than it has summaries.
"""

from __future__ import annotations

import atexit
import threading
import time
from collections.abc import Sequence

from trainer.rewards.answer import final_answer, has_valid_format, zero_eos_ended
from trainer.rewards.math_grading import exact_grade, grade_answer, init_worker, normalize_ground_truth
from trainer.rewards.pool import GradingPool, count_statuses

Metrics = dict[str, float]


class MathReward:
    """A reward callable ``(completions, answers) -> (scores, metrics)`` that owns a grading pool.

    ``completions[i]`` is the decoded text after the prompt (thinking, inserted delimiter, summary);
    ``answers[i]`` its ground truth (a string, a number, or a list of acceptable answers).
    ``eos_ended[i]`` (optional) marks a trace that stopped at EOS: it scores 0 whatever it says.
    Distinct (answer, ground truth) pairs are graded once; with ``exact_shortcut`` those that plain
    text settles (identical strings, integer literals) skip the pool. Metrics count the pairs
    settled each way and the pool's timeouts, errors and crashes.
    """

    def __init__(
        self,
        *,
        num_workers: int | None = None,
        timeout_s: float = 5.0,
        hard_timeout_s: float | None = None,
        exact_shortcut: bool = True,
    ):
        self.exact_shortcut = exact_shortcut
        self.pool = GradingPool(
            grade_answer,
            num_workers=num_workers,
            timeout_s=timeout_s,
            hard_timeout_s=hard_timeout_s,
            initializer=init_worker,
            preload=("math_verify",),
        )

    def __call__(
        self,
        completions: Sequence[str],
        answers: Sequence[object],
        *,
        eos_ended: Sequence[bool] | None = None,
    ) -> tuple[list[float], Metrics]:
        if len(completions) != len(answers):
            raise ValueError(f"got {len(completions)} completions and {len(answers)} answers; expected one answer each")
        for index, completion in enumerate(completions):
            if not isinstance(completion, str):
                raise TypeError(f"completions[{index}] is a {type(completion).__name__}; expected decoded text (str)")
        truths = []
        for index, answer in enumerate(answers):
            try:
                truths.append(normalize_ground_truth(answer))
            except ValueError as error:
                raise ValueError(f"answers[{index}]: {error}") from error
        start = time.perf_counter()
        formatted = [has_valid_format(completion) for completion in completions]
        boxed = [final_answer(completion) for completion in completions]
        pair_scores: dict[tuple[str, tuple[str, ...]], float | None] = {}
        for ok, box, truth in zip(formatted, boxed, truths, strict=True):
            if ok and box is not None and (box, truth) not in pair_scores:
                pair_scores[(box, truth)] = exact_grade(box, truth) if self.exact_shortcut else None
        to_grade = [pair for pair, score in pair_scores.items() if score is None]
        outcomes = self.pool.grade(to_grade)
        pair_scores.update((pair, outcome.score) for pair, outcome in zip(to_grade, outcomes, strict=True))
        scores = []
        for ok, box, truth in zip(formatted, boxed, truths, strict=True):
            scores.append(pair_scores[(box, truth)] if ok and box is not None else 0.0)
        scores = zero_eos_ended(scores, eos_ended)
        count = max(len(scores), 1)
        statuses = count_statuses(outcomes)
        metrics = {
            "reward/mean": sum(scores) / count,
            "reward/format_ok": sum(formatted) / count,
            "reward/boxed": sum(box is not None for box in boxed) / count,
            "reward/eos_ended": (sum(bool(flag) for flag in eos_ended) / count) if eos_ended is not None else 0.0,
            "reward/exact_pairs": float(len(pair_scores) - len(to_grade)),
            "reward/graded_pairs": float(len(to_grade)),
            "reward/timeouts": float(statuses["timeout"]),
            "reward/errors": float(statuses["error"]),
            "reward/crashes": float(statuses["crash"]),
            "reward/grading_s": time.perf_counter() - start,
        }
        return scores, metrics

    def close(self) -> None:
        self.pool.close()

    def __enter__(self) -> MathReward:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


_default: MathReward | None = None
_default_lock = threading.Lock()


def _default_reward() -> MathReward:
    global _default
    with _default_lock:
        if _default is None:
            _default = MathReward()
            atexit.register(_default.close)
        return _default


def math_reward(
    completions: Sequence[str], answers: Sequence[object], *, eos_ended: Sequence[bool] | None = None
) -> tuple[list[float], Metrics]:
    """Math reward with the shared default pool (one worker per core, 5 s per answer); see ``MathReward``.

    completions: [B] decoded texts after the prompt; answers: [B] ground truths -> scores [B] in {0, 1}.
    """
    return _default_reward()(completions, answers, eos_ended=eos_ended)
