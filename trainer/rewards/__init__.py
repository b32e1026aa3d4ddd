"""Rewards: plain callables ``(completions, answers, *, format_ok, eos_in_cut) -> (scores, metrics)``.

``grade_completions`` is the reward rule every reward shares; ``math_reward`` compares answers
with math-verify in a process pool, ``MathReward(grader="authors")`` with the authors' exact rule
(``authors_grader``); the synthetic task's verifier lives beside the task (``trainer.synthetic``).
``get_reward(name)`` finds either, or one registered with ``register_reward``. The pool (and its
``pebble`` dependency) is imported on first use.
"""

from trainer.rewards.answer import (
    answer_step,
    ended_with_eos,
    extract_boxed,
    final_answer,
    final_answer_paragraph,
    grade_completions,
    has_valid_format,
    last_boxed,
    strict_answer,
    think_end_count,
)
from trainer.rewards.authors_grader import authors_answer, authors_boxed, authors_ground_truths, hendrycks_normalize
from trainer.rewards.math_grading import exact_grade, grade_answer, normalize_ground_truth
from trainer.rewards.math_reward import GRADERS, MathReward, math_reward, read_ground_truths, shared_math_reward
from trainer.rewards.registry import available_rewards, get_reward, register_reward


def __getattr__(name: str):
    if name in ("GradeOutcome", "GradingPool"):
        from trainer.rewards import pool

        return getattr(pool, name)
    raise AttributeError(f"module 'trainer.rewards' has no attribute {name!r}")


__all__ = [
    "GRADERS",
    "GradeOutcome",
    "GradingPool",
    "MathReward",
    "answer_step",
    "authors_answer",
    "authors_boxed",
    "authors_ground_truths",
    "available_rewards",
    "ended_with_eos",
    "exact_grade",
    "extract_boxed",
    "final_answer",
    "final_answer_paragraph",
    "get_reward",
    "grade_answer",
    "grade_completions",
    "has_valid_format",
    "hendrycks_normalize",
    "last_boxed",
    "math_reward",
    "normalize_ground_truth",
    "read_ground_truths",
    "register_reward",
    "shared_math_reward",
    "strict_answer",
    "think_end_count",
]
