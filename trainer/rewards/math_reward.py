"""The math reward: the format rule and the final-answer box in the trainer process, the grader in the pool.

Two graders (``reward.grader``): ``math-verify`` (the default: equal values in any form) and
``authors`` (the authors' exact rule, ``trainer.rewards.authors_grader``, for a replication that
must match their numbers). Only distinct (answer, ground truth) pairs that plain text cannot settle
travel to the pool: the summaries of one prompt repeat the same few answers across traces, slots
and samples, and most math answers are integers, so a step grades far fewer pairs than it has
summaries.
"""

from __future__ import annotations

import atexit
import threading
import time
from collections.abc import Sequence

from trainer.rewards.answer import grade_completions
from trainer.rewards.authors_grader import (
    AUTHORS_TIMEOUT_S,
    authors_answer,
    authors_ground_truths,
    authors_settle,
    require_pylatexenc,
)
from trainer.rewards.math_grading import exact_grade, normalize_ground_truth

Metrics = dict[str, float]
Pair = tuple[str, tuple[str, ...]]

GRADERS = ("math-verify", "authors")
MATH_VERIFY_TIMEOUT_S = 5.0


def _check_grader(grader: str) -> None:
    if grader not in GRADERS:
        raise ValueError(f"grader {grader!r} is not one of {GRADERS}")


def read_ground_truths(answer: object, grader: str = "math-verify") -> tuple[str, ...]:
    """A row's acceptable answers as ``grader`` reads them (``normalize_ground_truth`` for math-verify,
    ``authors_ground_truths`` for authors, where a row without an answer gives ``()``)."""
    _check_grader(grader)
    return authors_ground_truths(answer) if grader == "authors" else normalize_ground_truth(answer)


class MathReward:
    """A reward callable ``(completions, answers) -> (scores, metrics)`` that owns a grading pool.

    ``completions[i]`` is the decoded text after the prompt (cut thinking, inserted delimiter,
    summary); ``answers[i]`` its ground truth (a string, a number, or a list of acceptable answers;
    with the authors' grader also None or ``()`` for none, which scores 0). The rule is
    ``trainer.rewards.answer.grade_completions`` (``format_ok``/``eos_in_cut`` from the trainer's
    token ids); ``grader`` picks how a box is read and compared (see the module docstring).
    Distinct (answer, ground truths) pairs are graded once. With ``exact_shortcut``, pairs that plain
    text settles (identical strings, integer literals) skip the pool; the authors' grader also
    settles every pair its MATH normalisation matches here, as their code does before sympy.
    ``timeout_s`` bounds one pool item (None: 5 s for math-verify, the authors' 10 s for authors);
    past it the answer is wrong. Metrics count the pairs settled each way and the pool's timeouts,
    errors and crashes.
    """

    def __init__(
        self,
        *,
        grader: str = "math-verify",
        num_workers: int | None = None,
        timeout_s: float | None = None,
        hard_timeout_s: float | None = None,
        exact_shortcut: bool = True,
    ):
        _check_grader(grader)
        from trainer.rewards.pool import GradingPool  # imports pebble

        self.grader = grader
        self.exact_shortcut = exact_shortcut
        if grader == "authors":
            require_pylatexenc()
            from trainer.rewards.authors_sympy import init_worker, sympy_agrees

            grade_fn, default_timeout, preload = sympy_agrees, AUTHORS_TIMEOUT_S, ("sympy", "pylatexenc.latex2text")
        else:
            from trainer.rewards.math_grading import grade_answer, init_worker

            grade_fn, default_timeout, preload = grade_answer, MATH_VERIFY_TIMEOUT_S, ("math_verify",)
        self.pool = GradingPool(
            grade_fn,
            num_workers=num_workers,
            timeout_s=default_timeout if timeout_s is None else timeout_s,
            hard_timeout_s=hard_timeout_s,
            initializer=init_worker,
            preload=preload,
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
        authors = self.grader == "authors"
        if authors and lenient:
            raise ValueError("lenient=True selects the lenient parser of grader math-verify; the authors read one way")
        truths = []
        for index, answer in enumerate(answers):
            try:
                truths.append(read_ground_truths(answer, self.grader))
            except ValueError as error:
                raise ValueError(f"answers[{index}]: {error}") from error
        scores, metrics = grade_completions(
            completions, truths, self.compare, format_ok=format_ok, eos_in_cut=eos_in_cut, lenient=lenient,
            extract=authors_answer if authors else None,
        )  # fmt: skip
        if authors:
            metrics["reward/no_ground_truth"] = sum(not truth for truth in truths) / max(len(truths), 1)
        return scores, metrics

    def _settle(self, answer: str, truths: tuple[str, ...]) -> float | None:
        if self.grader == "authors":
            return authors_settle(answer, truths, integer_shortcut=self.exact_shortcut)
        return exact_grade(answer, truths) if self.exact_shortcut else None

    def _pool_items(self, answer: str, truths: tuple[str, ...]) -> list[tuple]:
        """math-verify takes all ground truths at once; the authors' sympy check one at a time (10 s each)."""
        if self.grader == "authors":
            return [(answer, truth) for truth in truths]
        return [(answer, truths)]

    def compare(self, boxed: list[str], truths: list[tuple[str, ...]]) -> tuple[list[float], Metrics]:
        """Grade each distinct (answer, ground truths) pair once: plain text first, then the pool."""
        start = time.perf_counter()
        pair_scores: dict[Pair, float | None] = {}
        for pair in zip(boxed, truths, strict=True):
            if pair not in pair_scores:
                pair_scores[pair] = self._settle(*pair)
        to_grade = [pair for pair, score in pair_scores.items() if score is None]
        items, owners = [], []
        for owner, pair in enumerate(to_grade):
            for item in self._pool_items(*pair):
                items.append(item)
                owners.append(owner)
        outcomes = self.pool.grade(items)
        best = [0.0] * len(to_grade)
        for owner, outcome in zip(owners, outcomes, strict=True):
            best[owner] = max(best[owner], outcome.score)  # right when any ground truth accepts it
        pair_scores.update(zip(to_grade, best, strict=True))
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


_shared: dict[tuple[str, float | None], MathReward] = {}
_shared_lock = threading.Lock()


def shared_math_reward(grader: str = "math-verify", timeout_s: float | None = None) -> MathReward:
    """The process's one ``MathReward`` for these settings (started on first use, closed at exit)."""
    _check_grader(grader)
    key = (grader, None if timeout_s is None else float(timeout_s))
    with _shared_lock:
        if key not in _shared:
            reward = MathReward(grader=grader, timeout_s=timeout_s)
            atexit.register(reward.close)
            _shared[key] = reward
        return _shared[key]


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
    reward = shared_math_reward()
    return reward(completions, answers, format_ok=format_ok, eos_in_cut=eos_in_cut, lenient=lenient)
