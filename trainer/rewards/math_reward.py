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

from trainer.rewards.answer import grade_completions
from trainer.rewards.math_grading import exact_grade, grade_answer, init_worker, normalize_ground_truth

Metrics = dict[str, float]


class MathReward:
    """A reward callable ``(completions, answers) -> (scores, metrics)`` that owns a grading pool.

    ``completions[i]`` is the decoded text after the prompt (cut thinking, inserted delimiter,
    summary); ``answers[i]`` its ground truth (a string, a number, or a list of acceptable answers).
    The rule is ``trainer.rewards.answer.grade_completions`` (``format_ok``/``eos_in_cut`` from the
    trainer's token ids). Distinct (answer, ground truth) pairs are graded once; with
    ``exact_shortcut`` those that plain text settles (identical strings, integer literals) skip the
    pool. Metrics count the pairs settled each way and the pool's timeouts, errors and crashes.
    """

    def __init__(
        self,
        *,
        num_workers: int | None = None,
        timeout_s: float = 5.0,
        hard_timeout_s: float | None = None,
        exact_shortcut: bool = True,
    ):
        from trainer.rewards.pool import GradingPool  # imports pebble

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
        format_ok: Sequence[bool] | None = None,
        eos_in_cut: Sequence[bool] | None = None,
        lenient: bool = False,
    ) -> tuple[list[float], Metrics]:
        """completions: [B] ``z[:c] + inserted + summary`` texts; answers: [B] ground truths -> scores [B]."""
        if len(completions) != len(answers):
            raise ValueError(f"got {len(completions)} completions and {len(answers)} answers; expected one answer each")
        truths = []
        for index, answer in enumerate(answers):
            try:
                truths.append(normalize_ground_truth(answer))
            except ValueError as error:
                raise ValueError(f"answers[{index}]: {error}") from error
        return grade_completions(
            completions, truths, self.compare, format_ok=format_ok, eos_in_cut=eos_in_cut, lenient=lenient
        )

    def compare(self, boxed: list[str], truths: list[tuple[str, ...]]) -> tuple[list[float], Metrics]:
        """Grade each distinct (answer, ground truths) pair once: plain text first, then the pool."""
        start = time.perf_counter()
        pair_scores: dict[tuple[str, tuple[str, ...]], float | None] = {}
        for pair in zip(boxed, truths, strict=True):
            if pair not in pair_scores:
                pair_scores[pair] = exact_grade(*pair) if self.exact_shortcut else None
        to_grade = [pair for pair, score in pair_scores.items() if score is None]
        outcomes = self.pool.grade(to_grade)
        pair_scores.update((pair, outcome.score) for pair, outcome in zip(to_grade, outcomes, strict=True))
        from trainer.rewards.pool import count_statuses

        statuses = count_statuses(outcomes)
        metrics = {
            "reward/exact_pairs": float(len(pair_scores) - len(to_grade)),
            "reward/graded_pairs": float(len(to_grade)),
            "reward/timeouts": float(statuses["timeout"]),
            "reward/errors": float(statuses["error"]),
            "reward/crashes": float(statuses["crash"]),
            "reward/grading_s": time.perf_counter() - start,
        }
        return [pair_scores[pair] for pair in zip(boxed, truths, strict=True)], metrics

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
    completions: Sequence[str],
    answers: Sequence[object],
    *,
    format_ok: Sequence[bool] | None = None,
    eos_in_cut: Sequence[bool] | None = None,
    lenient: bool = False,
) -> tuple[list[float], Metrics]:
    """Math reward with the shared default pool (one worker per core, 5 s per answer); see ``MathReward``.

    completions: [B] decoded texts after the prompt; answers: [B] ground truths -> scores [B] in {0, 1}.
    """
    return _default_reward()(completions, answers, format_ok=format_ok, eos_in_cut=eos_in_cut, lenient=lenient)
