"""A synthetic anytime task: chained arithmetic modulo 100, where a thinking budget cuts into the work.

A problem chains a few operations on a start value (``Start at 37. Add 15. Multiply by 3. ...``);
the answer is the result modulo 100. A teacher's thinking carries the running partial result one
line per step (``37 + 15 = 52``), so a trace cut after k steps holds the partial result of step k
and the summary must finish the rest unaided: accuracy grows with the thinking budget. Teacher
traces vary in verbosity (redundant ``check:`` lines that recompute a step), which gives the SFT
warm-up traces of many lengths for the same problem. The verifier applies the math reward's rule
(format, final-answer paragraph, box) with exact integer comparison, in-process: no pool needed.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from trainer.rewards.answer import final_answer, has_valid_format, zero_eos_ended

MODULUS = 100
INSTRUCTION_FREE_QUESTION = "What is the result modulo 100?"
_OPERATIONS = {
    "add": ("Add {}.", "+", lambda value, operand: value + operand),
    "subtract": ("Subtract {}.", "-", lambda value, operand: value - operand),
    "multiply": ("Multiply by {}.", "*", lambda value, operand: value * operand),
}


@dataclass(frozen=True)
class ArithmeticProblem:
    """One chained-arithmetic problem: ``start`` then ``steps`` of (operation, operand), all modulo 100."""

    start: int
    steps: tuple[tuple[str, int], ...]

    @property
    def text(self) -> str:
        operations = " ".join(_OPERATIONS[name][0].format(operand) for name, operand in self.steps)
        return f"Start at {self.start}. {operations} {INSTRUCTION_FREE_QUESTION}"

    def partial_results(self) -> list[int]:
        """The running result after each step, ``[r_1, ..., r_K]`` (modulo 100)."""
        value, results = self.start, []
        for name, operand in self.steps:
            value = _OPERATIONS[name][2](value, operand) % MODULUS
            results.append(value)
        return results

    @property
    def answer(self) -> int:
        return self.partial_results()[-1]


def generate_problem(rng: random.Random, min_steps: int = 2, max_steps: int = 8) -> ArithmeticProblem:
    """A random problem with between ``min_steps`` and ``max_steps`` operations."""
    if not 1 <= min_steps <= max_steps:
        raise ValueError(f"expected 1 <= min_steps <= max_steps, got min_steps={min_steps}, max_steps={max_steps}")
    steps = []
    for _ in range(rng.randint(min_steps, max_steps)):
        name = rng.choice(tuple(_OPERATIONS))
        operand = rng.randint(2, 9) if name == "multiply" else rng.randint(1, 99)
        steps.append((name, operand))
    return ArithmeticProblem(start=rng.randint(0, MODULUS - 1), steps=tuple(steps))


def teacher_thinking(problem: ArithmeticProblem, check_prob: float, rng: random.Random) -> str:
    """A teacher's thinking: one line per step with the running result, each followed by a redundant
    ``check:`` line with probability ``check_prob``, closed by ``</think>``."""
    if not 0.0 <= check_prob <= 1.0:
        raise ValueError(f"check_prob must be in [0, 1], got {check_prob}")
    lines, value = [], problem.start
    for (name, operand), result in zip(problem.steps, problem.partial_results(), strict=True):
        line = f"{value} {_OPERATIONS[name][1]} {operand} = {result}"
        lines.append(line)
        if rng.random() < check_prob:
            lines.append(f"check: {line}")
        value = result
    return "\n".join(lines) + "\n</think>"


def teacher_summary(answer: int | str) -> str:
    """The summary after a closed trace: the inserted ``\\n\\n**Final Answer**\\n`` is not part of it."""
    return f"\\boxed{{{answer}}}"


def generate_rows(
    num_problems: int,
    *,
    seed: int = 0,
    min_steps: int = 2,
    max_steps: int = 8,
    check_probs: Sequence[float] = (0.0, 0.25, 0.5, 1.0),
) -> list[dict]:
    """Rows in the authors' data format: ``problem``, ``answer`` (a string) and ``solution``.

    ``solution`` is a teacher trace plus its summary (thinking, ``\\n\\n**Final Answer**\\n``, box),
    its verbosity drawn from ``check_probs``: the SFT warm-up's target text.
    """
    if num_problems < 0:
        raise ValueError(f"num_problems must be >= 0, got {num_problems}")
    rng = random.Random(seed)
    rows = []
    for _ in range(num_problems):
        problem = generate_problem(rng, min_steps, max_steps)
        thinking = teacher_thinking(problem, rng.choice(tuple(check_probs)), rng)
        solution = thinking + "\n\n**Final Answer**\n" + teacher_summary(problem.answer)
        rows.append({"problem": problem.text, "answer": str(problem.answer), "solution": solution})
    return rows


def save_rows(rows: Sequence[dict], path: str | Path) -> Path:
    """Write rows as JSONL, a file ``trainer.data`` loads like any data set."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def _as_int(text: str | None) -> int | None:
    try:
        return int(text.strip()) if text is not None else None
    except ValueError:
        return None


def synthetic_reward(
    completions: Sequence[str], answers: Sequence[object], *, eos_ended: Sequence[bool] | None = None
) -> tuple[list[float], dict[str, float]]:
    """The verifier: the math reward's rule with exact integer comparison.

    completions: [B] decoded texts after the prompt; answers: [B] integers (or their strings) -> scores [B].
    """
    if len(completions) != len(answers):
        raise ValueError(f"got {len(completions)} completions and {len(answers)} answers; expected one answer each")
    truths = []
    for index, answer in enumerate(answers):
        truth = answer if isinstance(answer, int) and not isinstance(answer, bool) else _as_int(str(answer))
        if truth is None:
            raise ValueError(f"answers[{index}] = {answer!r} is not an integer")
        truths.append(truth)
    formatted = [has_valid_format(completion) for completion in completions]
    boxed = [final_answer(completion) for completion in completions]
    scores = [
        1.0 if ok and _as_int(box) == truth else 0.0 for ok, box, truth in zip(formatted, boxed, truths, strict=True)
    ]
    scores = zero_eos_ended(scores, eos_ended)
    count = max(len(scores), 1)
    metrics = {
        "reward/mean": sum(scores) / count,
        "reward/format_ok": sum(formatted) / count,
        "reward/boxed": sum(box is not None for box in boxed) / count,
        "reward/eos_ended": (sum(bool(flag) for flag in eos_ended) / count) if eos_ended is not None else 0.0,
    }
    return scores, metrics
