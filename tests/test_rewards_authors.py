"""``reward.grader: authors``: the authors' acceptance rule, beside math-verify (the default) where they differ.

Expected values are worked out by hand from the rule's description (trainer/rewards/authors_grader.py);
each case that tells the graders apart is also run through the default grader, which gives the
other answer.
"""

from __future__ import annotations

import json
import logging
import re

import pytest
from test_trainer import TINY

from trainer.budgets import ANSWER_OPENER
from trainer.components import build
from trainer.config import ConfigError, load_config
from trainer.data import DataError, load_problems
from trainer.rewards import (
    MathReward,
    authors_answer,
    authors_boxed,
    authors_ground_truths,
    get_reward,
    hendrycks_normalize,
    math_reward,
    normalize_ground_truth,
    strict_answer,
)
from trainer.rewards.authors_sympy import sympy_agrees, sympy_normalize

# Four factors of degree 9 against the same with one degree 8: sympy's simplify works on the
# difference for about 15 s on the 2-core CI machine (sympy 1.14), in Python code the pool's soft
# deadline interrupts; every guard of the authors' check lets it through (two letters, exponent 9).
SLOW_GIVEN = "(x+y+1)^9*(x-y+2)^9*(x+2y+3)^9*(2x-y+1)^9"
SLOW_TRUTH = "(x+y+1)^9*(x-y+2)^9*(x+2y+3)^9*(2x-y+1)^8"


def closed(summary: str) -> str:
    return "thinking</think>" + ANSWER_OPENER + summary


def boxed(answer: str) -> str:
    return closed(f"\\boxed{{{answer}}}")


@pytest.fixture(scope="module")
def authors():
    with MathReward(grader="authors", num_workers=2) as reward:
        yield reward


# The pairs math-verify accepts and the authors' rule rejects (unreduced fraction, set order, a power
# against an integer, named values against a tuple), each in both orders.
MATH_VERIFY_ONLY = [
    (r"\frac{2}{4}", r"\frac{1}{2}"),
    (r"\{1,2\}", r"\{2,1\}"),
    ("1000", "10^{3}"),
    ("a=2,b=3", "(2,3)"),
]


@pytest.mark.parametrize(("given", "truth"), MATH_VERIFY_ONLY + [(truth, given) for given, truth in MATH_VERIFY_ONLY])
def test_math_verify_accepts_what_the_authors_reject(authors, given, truth):
    assert math_reward([boxed(given)], [truth])[0] == [1.0]
    assert authors([boxed(given)], [truth])[0] == [0.0]


@pytest.mark.parametrize(
    ("given", "truth"),
    [
        (r"\dfrac{1}{2}", r"\frac12"),  # the MATH normalisation: dfrac -> frac, \frac12 -> \frac{1}{2}
        ("0.5", r"\frac{1}{2}"),  # ... and its 0.5 special case
        (r"\frac{2}{4}", "0.5"),  # sympy: 2/4 - 0.5 simplifies to 0 (only two fraction literals must match as text)
        (r"\text{(A)}", "(A)"),
        (r"\text{(C)}", "C"),  # sympy side: (c) is a one-item tuple c
        ("10", "10.0"),
        ("10.0", "10"),
        ("(1, 0.5)", r"(1, \frac{1}{2})"),  # a tuple, item by item, in order
        ("1,000", "1000"),  # thousands commas
        ("x = 5", "5"),
        (r"90^\circ", "90"),
        (r"5\text{ cm}", "5"),
        ("05", "5"),  # integer literals by value (settled in the trainer process, as sympy would)
    ],
)
def test_forms_the_authors_accept(authors, given, truth):
    assert authors([boxed(given)], [truth])[0] == [1.0]


@pytest.mark.parametrize(
    ("given", "truth"), [("(2, 1)", "(1, 2)"), ("[1, 2)", "(1, 2)"), ("6", "5"), ("-5", "5"), ("0.6", r"\frac{1}{2}")]
)
def test_forms_the_authors_reject(authors, given, truth):
    assert authors([boxed(given)], [truth])[0] == [0.0]


def test_hendrycks_normalisation_by_hand():
    assert hendrycks_normalize(r"\dfrac{1}{2}") == hendrycks_normalize(r"\frac12") == r"\frac{1}{2}"
    assert hendrycks_normalize("0.5") == hendrycks_normalize(".5") == r"\frac{1}{2}"
    assert hendrycks_normalize(r" x = \sqrt3 ") == r"\sqrt{3}"
    assert hendrycks_normalize(r"\frac1{72}") == r"\frac{1}{72}"
    assert hendrycks_normalize("3/4") == r"\frac{3}{4}"
    assert hendrycks_normalize("03/4") == "03/4"  # not written as str(int) writes it
    assert hendrycks_normalize(r"\left( 1, 2 \right)") == "(1,2)"
    assert hendrycks_normalize(r"\text{Evelyn}") == "Evelyn"
    # Where the MATH normaliser fails or gives up, the stripped text is kept as it is.
    assert hendrycks_normalize(r"1\text{ a}\text{ b}") == r"1\text{ a}\text{ b}"
    assert hendrycks_normalize(r"2\sqrt") == r"2\sqrt"
    assert hendrycks_normalize(r" \frac1 ") == r"\frac1"


def test_sympy_side_by_hand():
    assert sympy_normalize(r"\text{(A)}") == "(a)"
    assert sympy_normalize("1,000") == "1000"
    assert sympy_normalize("10.0") == "10"
    assert sympy_normalize(r"\$5.00") == "5"
    assert sympy_normalize("7 3/4") == "7+3/4"
    assert sympy_normalize("3 hours") == "3"
    assert sympy_normalize(r"\frac{2}{4}") == "2/4"
    assert sympy_agrees(r"\frac{1}{2}", r"\frac{2}{4}") == 0.0  # two fraction literals: text must match
    assert sympy_agrees("(1, 0.5)", r"(1, \frac{1}{2})") == 1.0
    assert sympy_agrees("k=142.0", "142") == 0.0  # an integer ground truth wants an integer


# (summary, ground truth, authors' score, the default rule's score)
BOX_CASES = [
    (r"\boxed{4} or rather \boxed 5", "4", 0.0, 1.0),  # the last \boxed is not \boxed{: no answer
    (r"\boxed{4} or rather \boxed {5}", "4", 0.0, 1.0),
    (r"\fbox{3}", "3", 0.0, 0.0),
    (r"\boxed{3} then \fbox{4}", "3", 1.0, 1.0),
    (r"\boxed{4} then \boxed{5", "4", 0.0, 0.0),  # unclosed last box: no answer under both
]


@pytest.mark.parametrize(("summary", "truth", "authors_score", "default_score"), BOX_CASES)
def test_box_cases(authors, summary, truth, authors_score, default_score):
    assert authors([closed(summary)], [truth])[0] == [authors_score]
    assert math_reward([closed(summary)], [truth])[0] == [default_score]


def test_box_reading():
    assert authors_answer(closed(r"\boxed{4} or rather \boxed 5")) is None
    assert strict_answer(closed(r"\boxed{4} or rather \boxed 5")) == "4"
    assert authors_answer(closed(r"\fbox{3}")) is None
    assert authors_answer(closed(r"\boxed{ 5 }")) == " 5 "  # not stripped
    assert authors_answer(closed(r"\boxed{}")) == ""  # graded, where the default finds no answer
    assert strict_answer(closed(r"\boxed{}")) is None
    assert authors_boxed(r"\boxed{\frac{1}{2}} and \boxed{x^{2}}") == "x^{2}"


@pytest.mark.parametrize(
    ("truth", "authors_score", "default_score"),
    [
        (r"\boxed{7}", 1.0, 1.0),  # a boxed ground truth is read as its box
        (r"The answer is \boxed{7}.", 1.0, 1.0),
        (r"\boxed 7", 0.0, 1.0),  # no \boxed{...}: the ground truth is dropped, the row has none
        ([r"\boxed 7", "7"], 1.0, 1.0),
    ],
)
def test_boxed_ground_truths(authors, truth, authors_score, default_score):
    assert authors([boxed("7")], [truth])[0] == [authors_score]
    assert math_reward([boxed("7")], [truth])[0] == [default_score]


def test_ground_truths_are_read_as_the_authors_read_them(authors):
    assert authors_ground_truths(142.0) == ("142.0",)
    assert normalize_ground_truth(142.0) == ("142",)
    assert authors_ground_truths([r"\boxed{7}", 3, [0.25]]) == ("7", "3", "0.25")
    for empty in (None, "", "  ", [], [None, r"\boxed 7"]):
        assert authors_ground_truths(empty) == ()
    for bad in (True, {"a": 1}):
        with pytest.raises(ValueError, match="expected a string, a number or a list"):
            authors_ground_truths(bad)
    # "142.0" matters: their MATH normalisation drops "k=" and matches the float's text, which "142" would not.
    assert authors([boxed("k=142.0")], [142.0])[0] == [1.0]
    assert authors([boxed("k=142.0")], ["142"])[0] == [0.0]


def test_rule_violations_still_score_zero(authors):
    completions = [boxed("5"), closed("5"), "thinking </think> again</think>" + ANSWER_OPENER + r"\boxed{5}"]
    completions.append(boxed("5"))
    scores, metrics = authors(completions, ["5"] * 4, eos_in_cut=[False, False, False, True])
    assert scores == [1.0, 0.0, 0.0, 0.0]
    assert metrics["reward/format_ok"] == 0.75 and metrics["reward/boxed"] == 0.75
    with pytest.raises(ValueError, match="lenient"):
        authors([boxed("5")], ["5"], lenient=True)


def test_slow_sympy_check_is_wrong_after_the_timeout():
    """One pool item runs past its 0.5 s; it scores 0 and is counted, and the others are graded."""
    with MathReward(grader="authors", num_workers=2, timeout_s=0.5, hard_timeout_s=5.0) as reward:
        completions = [boxed(SLOW_GIVEN), boxed("(1, 0.5)"), boxed("7")]
        scores, metrics = reward(completions, [SLOW_TRUTH, r"(1, \frac{1}{2})", "8"])
    assert scores == [0.0, 1.0, 0.0]
    assert metrics["reward/timeouts"] == 1.0 and metrics["reward/graded_pairs"] == 2.0
    assert metrics["reward/errors"] == metrics["reward/crashes"] == 0.0


ROWS = [
    {"problem": "What is 2 + 3?", "answer": "5"},
    {"problem": "No answer field."},
    {"problem": "An empty answer.", "answer": ""},
    {"problem": "A null answer.", "answer": None},
]


def test_rows_without_an_answer_load_and_score_zero_in_authors_mode(tmp_path, authors, caplog):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    with caplog.at_level(logging.WARNING, logger="trainer.data"):
        problems, bad_rows = load_problems(path, grader="authors")
    assert [problem.answer for problem in problems] == [("5",), (), (), ()] and bad_rows == 0
    assert "3 rows have no answer" in caplog.text
    scores, metrics = authors([boxed("5")] * 4, [problem.answer for problem in problems])
    assert scores == [1.0, 0.0, 0.0, 0.0] and metrics["reward/no_ground_truth"] == 0.75
    # The default grader refuses them, or skips them with skip_bad_rows.
    with pytest.raises(DataError, match="row 1: missing field 'answer'"):
        load_problems(path)
    problems, bad_rows = load_problems(path, skip_bad_rows=True)
    assert [problem.answer for problem in problems] == [("5",)] and bad_rows == 3
    with pytest.raises(ValueError, match="empty list"):
        math_reward([boxed("5")], [()])


def test_config_key_end_to_end(tmp_path):
    """The reward the trainer builds for reward.grader=authors reads boxes by the authors' rule."""
    completion = closed(r"\boxed{4} or rather \boxed 5")  # settled in the trainer process: no pool starts
    parts = build(load_config(None, [*TINY, "rollout.reward=math", "reward.grader=authors"]), tmp_path)
    assert parts.reward.grader == "authors" and parts.reward.pool.timeout_s == 10.0
    assert parts.reward([completion], ["4"])[0] == [0.0]
    assert get_reward("math")([completion], ["4"])[0] == [1.0]  # the default grader reads the earlier box
    assert get_reward("math", grader="authors", timeout_s=None) is parts.reward
    with pytest.raises(ConfigError, match=re.escape("reward.grader: 'authors' is not allowed; expected math-verify")):
        load_config(None, [*TINY, "reward.grader=authors"])  # TINY's reward is synthetic
    with pytest.raises(ConfigError, match=re.escape("reward.grader: 'sympy' is not allowed")):
        load_config(None, [*TINY, "rollout.reward=math", "reward.grader=sympy"])
    with pytest.raises(ConfigError, match=re.escape("reward.timeout_s: 0.0 is not allowed")):
        load_config(None, [*TINY, "rollout.reward=math", "reward.timeout_s=0"])
    with pytest.raises(ValueError, match="configure the built-in math reward"):
        get_reward("synthetic", grader="authors")


def test_missing_pylatexenc_is_a_clear_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_pylatexenc(name, *args, **kwargs):
        if name.startswith("pylatexenc"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pylatexenc)
    with pytest.raises(ImportError, match="needs the pylatexenc package"):
        MathReward(grader="authors", num_workers=1)
