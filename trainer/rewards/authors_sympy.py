"""Worker side of ``reward.grader: authors``: the authors' sympy check of one answer against one ground truth.

Written anew from a description of their check (see ``trainer.rewards.authors_grader``). Both
strings are normalised (``\\text{}``, units, ``$``/``%`` and thousands commas dropped, LaTeX read to
plain text with pylatexenc, lower case); equal forms agree. Otherwise both are split into tuple
items (a ground truth in brackets must be answered in the same brackets, item for item, in order),
and items agree when they are the same fraction literal (``2/4`` is not ``1/2``), or when neither
or both read as integers and sympy simplifies their difference to 0. Expressions with more than
two distinct letters, braced or parenthesised exponents, chained or multi-digit exponents are
never handed to sympy (the authors' guard against hangs, and against ``parse_expr``'s ``eval``
seeing names).

Runs in the grading pool's workers: the pool's deadline (the authors' 10 s) interrupts sympy with
an exception this module never catches (``except Exception`` only), and the answer scores 0.
"""

from __future__ import annotations

import functools
import logging
import re

from trainer.rewards.authors_grader import unwrap_text

logger = logging.getLogger(__name__)

_UNIT_WORDS = ("degree", "cm", "centimeter", "meter", "mile", "second", "minute", "hour", "day", "week", "month",
               "year", "foot", "feet", "inch", "yard")  # fmt: skip
# Each unit is removed in turn, in this order (removing one can expose another).
_UNITS = tuple(re.compile(word + r"(es)?(s)? *(\^[0-9]+)?") for word in _UNIT_WORDS)
_DEGREES = re.compile(r"\^ *\\circ")
_THIN_SPACE_AFTER_COMMA = re.compile(r",\\! *")
_MINUS_SPACE = re.compile(r"- *")
_MIXED_NUMBER = re.compile(r"([0-9]) +([0-9])")  # "7 3/4" -> "7+3/4"
_THOUSANDS_COMMA = re.compile(r"(\d)(,)(\d\d\d)($|\D)")
_FRACTION_LITERAL = re.compile(r"-?[0-9]+.?/0*[1-9][0-9]*.?$")
_WORD_SCALES = (("million", "*10^6"), ("billion", "*10^9"), ("trillion", "*10^12"))
_PLAIN_SYMBOLS = (("√", "sqrt"), ("π", "pi"), ("∞", "inf"), ("∪", "U"), ("·", "*"), ("×", "*"))
_BRACKETS = "()[]"
_RISKY_POWERS = (re.compile(r"\^[0-9]+\^"), re.compile(r"\^[0-9][0-9]+"))
_MAX_LETTERS = 2
_MAX_INTEGER_DIGITS = 100


def init_worker() -> None:
    """Pool initializer: import sympy and pylatexenc and fill their caches before the first answer.

    pylatexenc warns on every ``\\frac`` without two arguments (which models write); the reading
    is still the authors', so the warnings are silenced."""
    logging.getLogger("pylatexenc").setLevel(logging.ERROR)
    sympy_agrees("\\frac{1}{2}", "x^2")


@functools.cache
def _latex_reader():
    from pylatexenc.latex2text import LatexNodes2Text

    return LatexNodes2Text()


def _latex_to_plain(text: str) -> str:
    """LaTeX read as plain text (``\\frac{1}{2}`` -> ``1/2``, ``\\sqrt{3}`` -> ``sqrt(3)``); ``text`` unchanged
    when pylatexenc cannot read it."""
    reader = _latex_reader()  # outside the try: a missing pylatexenc is an error, not a wrong answer
    spaced = text.replace("\\tfrac", "\\frac").replace("\\dfrac", "\\frac").replace("\\frac", " \\frac")
    try:
        plain = reader.latex_to_text(spaced)
    except Exception:
        return text
    for symbol, name in _PLAIN_SYMBOLS:
        plain = plain.replace(symbol, name)
    return plain.strip()


def _drop_thousands_commas(text: str) -> str:
    """``1,000,000`` -> ``1000000``, leaving tuple commas (``1,2``) alone."""
    while True:
        stripped = _THOUSANDS_COMMA.sub(r"\1\3\4", text)
        if stripped == text:
            return text
        text = stripped


def _nearest_integer(value: float) -> int | None:
    """``value`` as an integer when it is within 1e-7 of one (None for inf, nan and the rest)."""
    try:
        nearest = round(value)
    except (OverflowError, ValueError):
        return None
    return nearest if abs(value - nearest) <= 1e-7 else None


def _reads_as_integer(text: str) -> bool:
    try:
        value = float(_drop_thousands_commas(text))
    except ValueError:
        return False
    return _nearest_integer(value) is not None


def sympy_normalize(text: str) -> str:
    """The authors' sympy-side normal form of an answer (see the module docstring)."""
    text = unwrap_text(text)
    text = text.replace("\\%", "%").replace("\\$", "$").replace("$", "").replace("%", "")
    text = text.replace(" or ", " , ").replace(" and ", " , ")
    for word, power in _WORD_SCALES:
        text = text.replace(word, power)
    for unit in _UNITS:
        text = unit.sub("", text)
    text = _DEGREES.sub("", text)
    if text.startswith("{") and text.endswith("}"):
        text = text[1:-1]
    text = _THIN_SPACE_AFTER_COMMA.sub("", text)
    try:
        integer = _nearest_integer(float(text))
    except ValueError:
        integer = None
    if integer is not None:
        text = str(integer)
    if "\\" in text:
        text = _latex_to_plain(text)
    text = _MINUS_SPACE.sub("-", text)
    text = _MIXED_NUMBER.sub(r"\1+\2", text)
    text = text.replace(" ", "").replace("{", "").replace("}", "").lower()
    if _reads_as_integer(text):
        # int(float(...)) truncates, as the authors write it (a value within 1e-7 below an integer drops by 1).
        text = str(int(float(text.replace(",", ""))))
    return text


def _tuple_items(text: str) -> list[str]:
    """``(1,2)`` / ``[1,2)`` -> ``["1", "2"]`` when no bracket is nested; anything else is one item."""
    text = _drop_thousands_commas(text)
    if not text:
        return []
    inner = text[1:-1]
    if len(text) > 2 and text[0] in _BRACKETS and text[-1] in _BRACKETS and not any(c in inner for c in _BRACKETS):
        return [item.strip() for item in inner.split(",")]
    return [text]


def _safe_for_sympy(expression: str) -> bool:
    letters = {char for char in expression.replace("sqrt", "").replace("frac", "") if char.isalpha()}
    if len(letters) > _MAX_LETTERS or "^{" in expression or "^(" in expression:
        return False
    return not any(pattern.search(expression) for pattern in _RISKY_POWERS)


def _sympy_says_equal(truth: str, given: str) -> bool:
    difference = f"({truth})-({given})"
    if not _safe_for_sympy(difference):
        return False
    import sympy
    from sympy.parsing import sympy_parser

    transformations = (*sympy_parser.standard_transformations, sympy_parser.implicit_multiplication_application)
    try:
        expression = sympy_parser.parse_expr(difference.replace("^", "**"), transformations=transformations)
        for term in expression.args:
            if isinstance(term, sympy.Integer) and len(str(term.p)) > _MAX_INTEGER_DIGITS:
                logger.debug("not simplifying %r: an integer of %d digits may hang sympy", difference, len(str(term.p)))
                return False
        return sympy.simplify(expression) == 0
    except Exception as error:
        logger.debug("sympy could not compare %r: %r", difference, error)
        return False


def _items_agree(truth: str, given: str) -> bool:
    if _FRACTION_LITERAL.match(truth) and _FRACTION_LITERAL.match(given):
        return truth == given  # unreduced fractions are not the same answer
    if _reads_as_integer(truth) != _reads_as_integer(given):
        return False  # an integer ground truth wants an integer, not an expression worth as much
    return _sympy_says_equal(truth, given)


def sympy_agrees(given: str, truth: str) -> float:
    """1.0 when the authors' sympy check accepts ``given`` (a box's content) for ``truth``, else 0.0."""
    truth_form, given_form = sympy_normalize(truth), sympy_normalize(given)
    if truth_form == given_form:
        return 1.0
    if not given_form:
        return 0.0
    truth_items, given_items = _tuple_items(truth_form), _tuple_items(given_form)
    if len(truth_items) > 1 and (truth_form[0] != given_form[0] or truth_form[-1] != given_form[-1]):
        return 0.0
    if len(truth_items) != len(given_items):
        return 0.0
    return float(all(_items_agree(t, g) for t, g in zip(truth_items, given_items, strict=True)))
