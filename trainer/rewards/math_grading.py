"""Worker side of math grading: math-verify's ``parse``/``verify`` on one answer against its ground truths.

Runs inside the grading pool's worker processes. math-verify's own ``signal.alarm`` timeouts are
switched off (``parsing_timeout=None``, ``timeout_seconds=None``): the pool's soft deadline owns
SIGALRM, and a nested alarm would cancel it.
"""

from __future__ import annotations

import functools
import logging
import math
import re
from collections.abc import Sequence

PARSE_CACHE_SIZE = 1 << 16
_INTEGER = re.compile(r"[+-]?\d+")


def init_worker() -> None:
    """Pool initializer: import math-verify and silence its per-call warnings about disabled timeouts."""
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    _parse_boxed("0")


_E_NOTATION = re.compile(r"\s*([+-]?(?:\d+\.?\d*|\.\d+))[eE]([+-]?\d+)\s*")
_PRIMES = ((re.compile(r"\^\{\s*\\prime\s*\\prime\s*\}"), "''"), (re.compile(r"\^\{\s*\\prime\s*\}"), "'"),
           (re.compile(r"\^\\prime\b"), "'"))  # fmt: skip


def latex_friendly(text: str) -> str:
    """What math-verify's LaTeX parser reads as intended: ``4.5e33`` -> ``4.5\\times 10^{33}`` (it
    reads ``e`` as Euler's number), ``x^{\\prime}`` -> ``x'`` and ``^{\\prime\\prime}`` -> ``''`` (it
    reads ``\\prime`` as a symbol). Minerva writes such gold answers; models write the other form."""
    match = _E_NOTATION.fullmatch(text)
    if match:
        return f"{match.group(1)}\\times 10^{{{int(match.group(2))}}}"
    for pattern, replacement in _PRIMES:
        text = pattern.sub(replacement, text)
    return text


@functools.lru_cache(maxsize=PARSE_CACHE_SIZE)
def _parse_boxed(text: str) -> tuple:
    from math_verify import parse

    return tuple(parse("\\boxed{" + latex_friendly(text) + "}", parsing_timeout=None))


def grade_answer(answer: str, ground_truths: Sequence[str]) -> float:
    """1.0 when ``answer`` (a boxed answer's content) matches any of ``ground_truths`` under math-verify, else 0.0."""
    from math_verify import verify

    predicted = _parse_boxed(answer)
    if not predicted:
        return 0.0
    for truth in ground_truths:
        gold = _parse_boxed(truth)
        if gold and verify(list(gold), list(predicted), timeout_seconds=None):
            return 1.0
    return 0.0


def exact_grade(answer: str, ground_truths: Sequence[str]) -> float | None:
    """The score when plain text settles it, else None (math-verify must decide).

    1.0 when ``answer`` is one of ``ground_truths`` character for character; when the answer and
    every ground truth are integer literals, 1.0 or 0.0 by value. Both agree with math-verify, and
    integers are most answers of AIME, AMC and DeepScaleR, so most pairs never reach the pool.
    """
    answer = answer.strip()
    if answer in ground_truths:
        return 1.0
    if _INTEGER.fullmatch(answer) and all(_INTEGER.fullmatch(truth) for truth in ground_truths):
        return 1.0 if any(int(answer) == int(truth) for truth in ground_truths) else 0.0
    return None


def normalize_ground_truth(answer: object) -> tuple[str, ...]:
    """The acceptable answers of a row as strings: a string, a number (``142.0`` -> ``"142"``) or a list of them.

    Raises ValueError for anything else, an empty answer included.
    """
    if isinstance(answer, (list, tuple)):
        if not answer:
            raise ValueError("the answer is an empty list; expected at least one acceptable answer")
        return tuple(truth for item in answer for truth in normalize_ground_truth(item))
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        raise ValueError(f"the answer {answer!r} is a {type(answer).__name__}; expected a string, a number or a list")
    if isinstance(answer, float):
        if not math.isfinite(answer):
            raise ValueError(f"the answer {answer!r} is not a finite number")
        text = str(int(answer)) if answer.is_integer() else repr(answer)
    else:
        text = str(answer).strip()
    if not text:
        raise ValueError("the answer is an empty string")
    return (text,)
