"""``reward.grader: authors``: the authors' acceptance rule, for a replication that must match their numbers.

Written anew from a description of what their trainer (sail-sg/AnytimeReasoner, ``brpo.py`` and
``math_utils.py`` of their verl fork) accepts; math-verify (the default grader) is the better judge.

- **The box.** In the answer step (``trainer.rewards.answer.answer_step``) the last ``\\boxed`` of
  any spelling is the answer, and it must be spelled ``\\boxed{...}`` and closed: a last ``\\boxed 5``
  or ``\\boxed {5}`` after an earlier ``\\boxed{4}`` is no answer (the default rule reads the 4).
  ``\\fbox{3}`` is no answer either (their finder falls back to ``\\fbox`` only in text without
  ``\\boxed``, and their extractor never hands it such text). The box's content is not stripped and
  may be empty.
- **Ground truths** are read as strings (``142.0`` stays ``"142.0"``); one that holds ``\\boxed`` is
  reduced to its box by the same rule, or dropped when that finds none. A row left with no ground
  truth scores 0 (it stays in the batch). An empty ground truth counts as none (their code would
  accept an empty box for it).
- **Equal** when the answer and a ground truth agree after Hendrycks' MATH normalisation
  (``hendrycks_normalize``, checked here in the trainer process), or when the sympy check agrees
  (``trainer.rewards.authors_sympy.sympy_agrees``), which runs in the grading pool under the
  authors' 10 s limit: a check that runs out of time is wrong.

What math-verify accepts and this rule rejects: ``\\frac{2}{4}`` for ``\\frac{1}{2}`` (unreduced
fractions), ``\\{1,2\\}`` for ``\\{2,1\\}`` (sets in another order), ``1000`` for ``10^{3}`` (powers
are not evaluated against integers), ``a=2,b=3`` for ``(2,3)``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from trainer.rewards.answer import answer_step, last_boxed

AUTHORS_TIMEOUT_S = 10.0

_ANY_BOX = "\\boxed"
_BRACED_BOX = "\\boxed{"
# Integer literals whose float is exact: the sympy check compares such a pair by value.
_SHORT_INTEGER = re.compile(r"[+-]?[0-9]{1,15}")


def authors_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed`` of ``text`` when that box is ``\\boxed{...}`` and closed, else None."""
    if text.rfind(_ANY_BOX) != text.rfind(_BRACED_BOX):
        return None
    return last_boxed(text)


def authors_answer(completion: str) -> str | None:
    """The answer the authors' rule reads from a completion (unstripped, possibly empty), or None."""
    step = answer_step(completion)
    return None if step is None else authors_boxed(step)


def authors_ground_truths(answer: object) -> tuple[str, ...]:
    """A row's acceptable answers as the authors' grader reads them; ``()`` for a row without one.

    ``answer`` is None, a string, a number or a (nested) list of them. Numbers become their ``str``
    (``142.0`` -> ``"142.0"``); a ground truth holding ``\\boxed`` becomes its box's content
    (``authors_boxed``) or is dropped; empty ones are dropped. Raises ValueError for other types.
    """
    if answer is None:
        return ()
    if isinstance(answer, (list, tuple)):
        return tuple(truth for item in answer for truth in authors_ground_truths(item))
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        raise ValueError(
            f"the answer {answer!r} is a {type(answer).__name__}; expected a string, a number or a list of them"
        )
    truth = str(answer)
    if _ANY_BOX in truth:
        truth = authors_boxed(truth)
    return (truth,) if truth is not None and truth.strip() else ()


# -- Hendrycks' MATH normalisation ----------------------------------------------------------------

_TEXT_WRAPPED = re.compile(r"\\text\{(?P<inner>.+?)\}$")
# Literal rewrites, in this order (a doubled backslash is halved before `\left` is looked for).
_HENDRYCKS_REWRITES = (
    ("\n", ""),
    ("\\!", ""),
    ("\\\\", "\\"),
    ("tfrac", "frac"),
    ("dfrac", "frac"),
    ("\\left", ""),
    ("\\right", ""),
    ("^{\\circ}", ""),
    ("^\\circ", ""),
    ("\\$", ""),
)
_UNITS_MARK = "\\text{ "


def unwrap_text(text: str) -> str:
    """``\\text{X}`` spanning the whole string -> ``X``; anything else unchanged."""
    match = _TEXT_WRAPPED.match(text)
    return text if match is None else match.group("inner")


def _brace_single_arguments(text: str, command: str, *, two: bool) -> str | None:
    """``\\sqrt3`` -> ``\\sqrt{3}`` (``two=False``), ``\\frac12`` -> ``\\frac{1}{2}`` and ``\\frac1{b}`` ->
    ``\\frac{1}{b}`` (``two=True``). None where the MATH normaliser fails (a command at the very end);
    ``text`` unchanged where it gives up (a ``\\frac`` followed by one character)."""
    head, *tails = text.split(command)
    pieces = [head]
    for tail in tails:
        if not tail:
            return None
        if tail[0] == "{":
            pieces.append(tail)
        elif not two:
            pieces.append("{" + tail[0] + "}" + tail[1:])
        elif len(tail) < 2:
            return text
        elif tail[1] == "{":
            pieces.append("{" + tail[0] + "}" + tail[1:])
        else:
            pieces.append("{" + tail[0] + "}{" + tail[1] + "}" + tail[2:])
    return command.join(pieces)


def _slash_fraction(text: str) -> str:
    """``3/4`` -> ``\\frac{3}{4}`` when both sides are integers written the way ``str(int)`` writes them."""
    sides = text.split("/")
    if len(sides) != 2:
        return text
    try:
        numerator, denominator = int(sides[0]), int(sides[1])
    except ValueError:
        return text
    return f"\\frac{{{numerator}}}{{{denominator}}}" if f"{numerator}/{denominator}" == text else text


def _hendrycks_canonical(text: str) -> str | None:
    """The MATH normaliser's form of ``text``, or None where it fails (the caller keeps ``text``)."""
    for old, new in _HENDRYCKS_REWRITES:
        text = text.replace(old, new)
    with_units = text.split(_UNITS_MARK)
    if len(with_units) > 2:
        return None
    text = with_units[0].replace("\\%", "")
    text = text.replace(" .", " 0.").replace("{.", "{0.")
    if not text:
        return text
    if text[0] == ".":
        text = "0" + text
    sides = text.split("=")
    if len(sides) == 2 and len(sides[0]) <= 2:  # "x = 5", "k=5"
        text = sides[1]
    text = _brace_single_arguments(text, "\\sqrt", two=False)
    if text is None:
        return None
    text = _brace_single_arguments(text.replace(" ", ""), "\\frac", two=True)
    if text is None:
        return None
    if text == "0.5":
        return "\\frac{1}{2}"
    return _slash_fraction(text)


def hendrycks_normalize(answer: str) -> str:
    """``answer`` under Hendrycks' MATH string normalisation (``\\dfrac`` -> ``\\frac``, ``\\frac12`` ->
    ``\\frac{1}{2}``, ``0.5`` -> ``\\frac{1}{2}``, no spaces, units and ``x =`` dropped, ...)."""
    text = unwrap_text(answer.strip()).strip()
    canonical = _hendrycks_canonical(text)
    return text if canonical is None else canonical


def hendrycks_equal(answer: str, truth: str) -> bool:
    return hendrycks_normalize(answer) == hendrycks_normalize(truth)


def authors_settle(answer: str, truths: Sequence[str], *, integer_shortcut: bool = True) -> float | None:
    """The score when the trainer process can decide it, else None (the sympy check must, per ground truth).

    0.0 without ground truths; 1.0 when the MATH normalisation matches one; with
    ``integer_shortcut``, when the answer and every ground truth are integer literals of at most 15
    digits, their values decide (the sympy check reads such literals as exact floats and nothing else).
    """
    if not truths:
        return 0.0
    if any(hendrycks_equal(answer, truth) for truth in truths):
        return 1.0
    if integer_shortcut and all(_SHORT_INTEGER.fullmatch(text) for text in (answer, *truths)):
        return float(any(int(answer) == int(truth) for truth in truths))
    return None


def require_pylatexenc() -> None:
    """Raise a clear ImportError when pylatexenc (the authors' LaTeX reader) is not installed."""
    try:
        import pylatexenc.latex2text  # noqa: F401
    except ImportError as error:
        raise ImportError(
            "reward.grader authors needs the pylatexenc package, which the authors' sympy check uses to read "
            "LaTeX: pip install pylatexenc (or this package's [authors-grader] extra)"
        ) from error
