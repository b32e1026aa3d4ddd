"""Rewards: plain callables ``(completions, answers) -> (scores, metrics)``.

``math_reward`` grades the final-answer box with math-verify in a process pool; the synthetic
task's verifier lives beside the task (``trainer.synthetic``). ``get_reward(name)`` finds either,
or one a user registered with ``register_reward``.
"""

from trainer.rewards.answer import (
    FINAL_ANSWER_HEADER,
    THINK_END,
    ended_with_eos,
    extract_boxed,
    final_answer,
    final_answer_paragraph,
    has_valid_format,
    zero_eos_ended,
)
from trainer.rewards.math_grading import exact_grade, grade_answer, normalize_ground_truth
from trainer.rewards.math_reward import MathReward, math_reward
from trainer.rewards.pool import GradeOutcome, GradingPool
from trainer.rewards.registry import available_rewards, get_reward, register_reward

__all__ = [
    "FINAL_ANSWER_HEADER",
    "THINK_END",
    "GradeOutcome",
    "GradingPool",
    "MathReward",
    "available_rewards",
    "ended_with_eos",
    "exact_grade",
    "extract_boxed",
    "final_answer",
    "final_answer_paragraph",
    "get_reward",
    "grade_answer",
    "has_valid_format",
    "math_reward",
    "normalize_ground_truth",
    "register_reward",
    "zero_eos_ended",
]
