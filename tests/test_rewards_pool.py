"""The grading pool: soft and hard timeouts, errors and crashes score 0, are counted, and block nothing else.

The grading functions below run in spawned workers, which import this module by name.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from trainer.rewards import GradeOutcome, GradingPool, MathReward
from trainer.rewards.pool import count_statuses

# sympy's simplify runs for minutes on this pair (math-verify 0.9, sympy 1.14), in Python code
# the soft deadline can interrupt.
PATHOLOGICAL_GIVEN = r"x = \frac{e^{t}}{4} + ce^{-2t}"
PATHOLOGICAL_TRUTH = r"x = \frac{e^{t}}{3} + ce^{-2t}"


def double_or_fail(value: int) -> float:
    """Doubles ``value``; negative values exercise each failure path."""
    if value == -1:
        raise ValueError("a grader bug")
    if value == -2:
        time.sleep(60)  # interruptible: the soft deadline fires
    if value == -3:
        # SIGALRM blocked, as in a C call that never returns to the interpreter: only the hard kill helps.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
        time.sleep(60)
    if value == -4:
        os._exit(3)
    return 2.0 * value


def sleep_then_one(seconds: float) -> float:
    time.sleep(seconds)
    return 1.0


@pytest.fixture(scope="module")
def pool():
    with GradingPool(double_or_fail, num_workers=2, timeout_s=0.5, hard_timeout_s=3.0) as grading_pool:
        yield grading_pool


def test_grades_in_order(pool):
    outcomes = pool.grade([(value,) for value in range(7)])
    assert outcomes == [GradeOutcome(2.0 * value, "ok") for value in range(7)]
    assert pool.grade([]) == []


@pytest.mark.parametrize(("value", "status"), [(-1, "error"), (-2, "timeout"), (-3, "timeout"), (-4, "crash")])
def test_failures_score_zero_and_leave_the_rest_graded(pool, value, status):
    items = [(1,), (value,), (2,), (3,), (4,)]
    outcomes = pool.grade(items)
    assert outcomes == [
        GradeOutcome(2.0, "ok"),
        GradeOutcome(0.0, status),
        GradeOutcome(4.0, "ok"),
        GradeOutcome(6.0, "ok"),
        GradeOutcome(8.0, "ok"),
    ]
    assert count_statuses(outcomes) == {"ok": 4, "timeout": 0, "error": 0, "crash": 0} | {status: 1}
    # The pool replaced a killed or dead worker and keeps grading.
    assert pool.grade([(5,)]) == [GradeOutcome(10.0, "ok")]


def test_deadlines_count_from_the_start_of_each_answer_not_from_the_call():
    # 12 answers of 0.2 s queue behind one worker for 2.4 s, longer than the hard timeout.
    with GradingPool(sleep_then_one, num_workers=1, timeout_s=0.5, hard_timeout_s=1.5) as single_worker:
        outcomes = single_worker.grade([(0.2,)] * 12)
    assert outcomes == [GradeOutcome(1.0, "ok")] * 12


def test_pathological_expression_times_out_without_blocking_others():
    with MathReward(num_workers=2, timeout_s=1.0) as reward:
        completions = [f"t</think>\n\n**Final Answer**\n\\boxed{{{PATHOLOGICAL_GIVEN}}}"]
        completions += [f"t</think>\n\n**Final Answer**\n\\boxed{{{value}}}" for value in range(6)]
        answers = [PATHOLOGICAL_TRUTH] + [str(value) for value in (0, 1, 2, 3, 4, 9)]
        scores, metrics = reward(completions, answers)
    assert scores == [0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0]
    assert metrics["reward/timeouts"] == 1.0
    assert metrics["reward/errors"] == metrics["reward/crashes"] == 0.0


def test_argument_checks():
    with pytest.raises(ValueError, match="num_workers must be >= 1"):
        GradingPool(double_or_fail, num_workers=0)
    with pytest.raises(ValueError, match="timeout_s must be > 0"):
        GradingPool(double_or_fail, timeout_s=0)
    with pytest.raises(ValueError, match="must exceed timeout_s"):
        GradingPool(double_or_fail, timeout_s=2.0, hard_timeout_s=1.0)


SCRIPT = """
print("top-level ran")
from trainer.rewards import math_reward
scores, _ = math_reward(["x</think>\\n\\n**Final Answer**\\n\\\\boxed{\\\\frac{1}{2}}", "x</think>\\n\\n**Final Answer**\\n\\\\boxed{3}"],
                        ["0.5", "4"])
print("scores", scores)
"""


@pytest.mark.parametrize("how", ["script without a main guard", "python -c", "standard input"])
def test_math_reward_works_from_quick_scripts(how, tmp_path):
    """The workers never re-run the caller's main module (which would start pools of its own)."""
    import subprocess
    import sys

    path = tmp_path / "quick.py"
    path.write_text(SCRIPT)
    command = {
        "script without a main guard": ([sys.executable, str(path)], None),
        "python -c": ([sys.executable, "-c", SCRIPT], None),
        "standard input": ([sys.executable, "-"], SCRIPT),
    }[how]
    done = subprocess.run(command[0], input=command[1], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("top-level ran") == 1
    assert "scores [1.0, 0.0]" in done.stdout
