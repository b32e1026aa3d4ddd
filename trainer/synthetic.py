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
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

from trainer.checkpoint import write_text_atomic
from trainer.rewards.answer import grade_completions

MODULUS = 100
_OPERATIONS = {
    "add": ("Add {}.", "+", lambda value, operand: value + operand),
    "subtract": ("Subtract {}.", "-", lambda value, operand: value - operand),
    "multiply": ("Multiply by {}.", "*", lambda value, operand: value * operand),
}


@dataclass(frozen=True)
class ArithmeticProblem:
    """One chained-arithmetic problem: ``start`` then ``steps`` of (operation, operand), all modulo ``modulus``."""

    start: int
    steps: tuple[tuple[str, int], ...]
    modulus: int = MODULUS

    @property
    def text(self) -> str:
        operations = " ".join(_OPERATIONS[name][0].format(operand) for name, operand in self.steps)
        return f"Start at {self.start}. {operations} What is the result modulo {self.modulus}?"

    def partial_results(self) -> list[int]:
        """The running result after each step, ``[r_1, ..., r_K]`` (modulo ``modulus``)."""
        value, results = self.start, []
        for name, operand in self.steps:
            value = _OPERATIONS[name][2](value, operand) % self.modulus
            results.append(value)
        return results

    @property
    def answer(self) -> int:
        return self.partial_results()[-1]


def generate_problem(
    rng: random.Random,
    min_steps: int = 2,
    max_steps: int = 8,
    *,
    modulus: int = MODULUS,
    max_operand: int = 99,
    max_multiplier: int = 9,
) -> ArithmeticProblem:
    """A random problem with between ``min_steps`` and ``max_steps`` operations: add/subtract an
    operand in ``[1, max_operand]`` or multiply by ``[2, max_multiplier]``, modulo ``modulus``."""
    if not 1 <= min_steps <= max_steps:
        raise ValueError(f"expected 1 <= min_steps <= max_steps, got min_steps={min_steps}, max_steps={max_steps}")
    if modulus < 2 or max_operand < 1 or max_multiplier < 2:
        raise ValueError(
            f"expected modulus >= 2, max_operand >= 1, max_multiplier >= 2; got {modulus}, {max_operand}, {max_multiplier}"
        )
    steps = []
    for _ in range(rng.randint(min_steps, max_steps)):
        name = rng.choice(tuple(_OPERATIONS))
        operand = rng.randint(2, max_multiplier) if name == "multiply" else rng.randint(1, max_operand)
        steps.append((name, operand))
    return ArithmeticProblem(start=rng.randint(0, modulus - 1), steps=tuple(steps), modulus=modulus)


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
    modulus: int = MODULUS,
    max_operand: int = 99,
    max_multiplier: int = 9,
    exclude: Collection[str] = frozenset(),
) -> list[dict]:
    """Rows in the authors' data format: ``problem``, ``answer`` (a string) and ``solution``.

    ``solution`` is a teacher trace plus its summary (thinking, ``\\n\\n**Final Answer**\\n``, box),
    its verbosity drawn from ``check_probs``: the SFT warm-up's target text. ``exclude``: problem
    texts never to return (a held-out set excludes the training problems); a draw of one is
    replaced by the next draw.
    """
    if num_problems < 0:
        raise ValueError(f"num_problems must be >= 0, got {num_problems}")
    rng, excluded = random.Random(seed), frozenset(exclude)
    rows, excluded_draws = [], 0
    # Short chains of a small modulus are a small space; a draw limit turns an exhausted one into an error.
    max_excluded_draws = 1000 + 100 * num_problems
    while len(rows) < num_problems:
        problem = generate_problem(
            rng, min_steps, max_steps, modulus=modulus, max_operand=max_operand, max_multiplier=max_multiplier
        )
        if problem.text in excluded:
            excluded_draws += 1
            if excluded_draws > max_excluded_draws:
                raise ValueError(
                    f"drew {excluded_draws} excluded problems for {len(rows)} of the {num_problems} asked: the "
                    f"{len(excluded)} excluded problems cover nearly all problems of min_steps={min_steps}, "
                    f"max_steps={max_steps}, modulus={modulus}; exclude fewer or widen the problem space"
                )
            continue
        thinking = teacher_thinking(problem, rng.choice(tuple(check_probs)), rng)
        solution = thinking + "\n\n**Final Answer**\n" + teacher_summary(problem.answer)
        rows.append({"problem": problem.text, "answer": str(problem.answer), "solution": solution})
    return rows


def save_rows(rows: Sequence[dict], path: str | Path) -> Path:
    """Write rows as JSONL, a file ``trainer.data`` loads like any data set.

    Atomically (a file of this process, then renamed): every rank of a distributed run writes the
    same rows into the shared run folder, and none may read another's half-written file.
    """
    return write_text_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))


def _as_int(text: str | None) -> int | None:
    try:
        return int(text.strip()) if text is not None else None
    except ValueError:
        return None


def _compare_integers(boxed: list[str], truths: list[tuple[int, ...]]) -> tuple[list[float], dict[str, float]]:
    return [1.0 if _as_int(box) in truth else 0.0 for box, truth in zip(boxed, truths, strict=True)], {}


def _integer_truths(answer: object, index: int) -> tuple[int, ...]:
    """The acceptable integers of an answer: an int, its string, or a list/tuple of either."""
    options = answer if isinstance(answer, (list, tuple)) else [answer]
    truths = []
    for option in options:
        truth = option if isinstance(option, int) and not isinstance(option, bool) else _as_int(str(option))
        if truth is None:
            raise ValueError(f"answers[{index}] = {answer!r} is not an integer")
        truths.append(truth)
    if not truths:
        raise ValueError(f"answers[{index}] is empty")
    return tuple(truths)


def synthetic_reward(
    completions: Sequence[str],
    answers: Sequence[object],
    *,
    format_ok: Sequence[bool] | None = None,
    eos_in_cut: Sequence[bool] | None = None,
    lenient: bool = False,
) -> tuple[list[float], dict[str, float]]:
    """The verifier: the reward rule (``grade_completions``) with exact integer comparison.

    completions: [B] ``z[:c] + inserted + summary`` texts; answers: [B] integers (their strings, or
    lists of acceptable ones) -> scores [B] in {0, 1} and metrics.
    """
    if len(completions) != len(answers):
        raise ValueError(f"got {len(completions)} completions and {len(answers)} answers; expected one answer each")
    truths = [_integer_truths(answer, index) for index, answer in enumerate(answers)]
    return grade_completions(
        completions, truths, _compare_integers, format_ok=format_ok, eos_in_cut=eos_in_cut, lenient=lenient
    )
