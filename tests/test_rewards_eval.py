"""Math grading on the four evaluation sets (885 problems), read by path from ``<repo>/../shared/data/math-eval``.

The gold answer written as a model would grades correct, and a perturbed answer grades wrong, each
for at least 99% of the problems. Both passes go through one reward call, as a training step would.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from trainer.data import load_problems
from trainer.rewards import MathReward

EVAL_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "math-eval"
EVAL_SETS = ("aime", "amc", "math", "minerva")


def perturb(answer: str) -> str:
    """A different answer: the first integer in it plus one, or ``+1`` appended when it has no digit."""
    match = re.search(r"\d+", answer)
    if match is None:
        return answer + "+1"
    return answer[: match.start()] + str(int(match.group()) + 1) + answer[match.end() :]


def as_model_would_write(answer: str) -> str:
    return f"Some reasoning.\n</think>\n\n**Final Answer**\n\\boxed{{{answer}}}"


@pytest.fixture(scope="module")
def problems():
    missing = [name for name in EVAL_SETS if not (EVAL_DIR / f"{name}.json").is_file()]
    if missing:
        # The data sets ship beside the project in its workspace, never inside the repository.
        pytest.skip(
            f"evaluation sets {missing} (AIME, AMC, MATH-500, Minerva in the authors' JSON format) are read from "
            f"{EVAL_DIR}, which this checkout does not have; place them there to run these tests"
        )
    loaded = []
    for name in EVAL_SETS:
        rows, bad_rows = load_problems(EVAL_DIR / f"{name}.json")
        assert bad_rows == 0
        loaded.extend(rows)
    return loaded


def test_perturb():
    assert perturb(r"\frac{14}{3}") == r"\frac{15}{3}"
    assert perturb("p - q") == "p - q+1"


@pytest.mark.slow
def test_gold_grades_correct_and_perturbed_grades_wrong(problems):
    assert len(problems) == 885
    gold = [as_model_would_write(problem.answer[0]) for problem in problems]
    perturbed = [as_model_would_write(perturb(problem.answer[0])) for problem in problems]
    answers = [problem.answer for problem in problems]
    # Without the exact-match shortcut: math-verify grades every pair, the gold ones included.
    with MathReward(timeout_s=5.0, exact_shortcut=False) as reward:
        scores, metrics = reward(gold + perturbed, answers + answers)
    gold_scores, perturbed_scores = scores[: len(problems)], scores[len(problems) :]
    gold_wrong = [problem.answer for problem, score in zip(problems, gold_scores, strict=True) if score != 1.0]
    perturbed_right = [
        problem.answer for problem, score in zip(problems, perturbed_scores, strict=True) if score != 0.0
    ]
    assert sum(gold_scores) >= 0.99 * len(problems), (gold_wrong, metrics)
    assert len(perturbed_right) <= 0.01 * len(problems), (perturbed_right, metrics)
    assert metrics["reward/crashes"] == 0.0
