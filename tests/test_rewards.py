"""The reward rule's text side, the math grading of equivalent forms, and the reward registry."""

from __future__ import annotations

import pytest

from trainer.budgets import ANSWER_OPENER, TRUNCATION_MARK
from trainer.rewards import (
    MathReward,
    answer_step,
    available_rewards,
    ended_with_eos,
    exact_grade,
    extract_boxed,
    final_answer,
    get_reward,
    grade_answer,
    has_valid_format,
    last_boxed,
    math_reward,
    normalize_ground_truth,
    register_reward,
    strict_answer,
    think_end_count,
)
from trainer.rewards import registry as registry_module
from trainer.synthetic import synthetic_reward


def closed(thinking: str, summary: str) -> str:
    """A completion whose trace closed its thinking: thinking ends in </think>, then the closed delimiter."""
    return thinking + "</think>" + ANSWER_OPENER + summary


def truncated(thinking: str, summary: str) -> str:
    """A completion whose trace was cut: the truncation mark (which holds the </think>), then the summary."""
    return thinking + TRUNCATION_MARK + ANSWER_OPENER + summary


@pytest.fixture(scope="module")
def reward():
    math_reward = MathReward(num_workers=2, timeout_s=5.0)
    yield math_reward
    math_reward.close()


class TestAnswerText:
    """The authors' rule (strict, the default) and the lenient parser (an option)."""

    def test_answer_step_is_the_first_piece_after_the_cut_that_starts_with_the_header(self):
        text = closed("work", "The answer is \\boxed{7}.\n\nLater text \\boxed{8}")
        assert answer_step(text) == "**Final Answer**\nThe answer is \\boxed{7}."
        assert strict_answer(text) == "7"
        # A header piece inside the thinking (before the cut) is not read.
        text = "**Final Answer**\n\\boxed{1}\n\n</think>\n\n**Final Answer**\n\\boxed{2}"
        assert strict_answer(text) == "2" and final_answer(text) == "2"

    def test_blank_line_after_the_header_means_no_answer_step(self):
        text = "x</think>\n\n**Final Answer**\n\n\\boxed{5}"
        assert answer_step(text) is None and strict_answer(text) is None
        assert final_answer(text) == "5"  # the lenient parser skips the blank line

    def test_whitespace_only_line_is_not_a_separator(self):
        # "\n \n" is not "\n\n": the answer step runs on, so the later box is its last one.
        text = closed("x", "\\boxed{3}\n \n\\boxed{4}")
        assert strict_answer(text) == "4"
        assert final_answer(text) == "3"  # lenient: a whitespace-only line ends the paragraph

    def test_only_the_exact_box_spelling_counts(self):
        assert strict_answer(closed("x", "\\boxed {5}")) is None
        assert final_answer(closed("x", "\\boxed {5}")) == "5"
        assert last_boxed(r"\boxed{\frac{1}{2}} done") == r"\frac{1}{2}"
        assert last_boxed(r"\boxed{\left\{1,\{2\}\right\}}") == r"\left\{1,\{2\}\right\}"

    def test_unclosed_last_box_means_no_answer(self):
        text = closed("x", "\\boxed{4} or maybe \\boxed{5")
        assert last_boxed("\\boxed{4} or maybe \\boxed{5") is None
        assert strict_answer(text) is None
        assert final_answer(text) == "4"  # lenient: falls back to the earlier closed box

    def test_header_inside_a_line_does_not_start_a_step(self):
        text = "x</think>\n\nSo the **Final Answer** is \\boxed{5}"
        assert strict_answer(text) is None and final_answer(text) is None
        # The header with its newline, but inside a piece: still no answer step.
        text = "x</think>\n\nSo the **Final Answer**\n\\boxed{5}"
        assert answer_step(text) is None and strict_answer(text) is None

    def test_box_outside_the_answer_step_is_ignored(self):
        assert strict_answer(closed("I get \\boxed{3}", "no box")) is None
        assert strict_answer("x</think>\n\n\\boxed{3}") is None
        assert extract_boxed(r"\boxed{1} then \boxed {2}") == "2"

    def test_format_rule_from_text_counts_think_ends(self):
        assert has_valid_format(closed("a", "\\boxed{1}"))
        assert has_valid_format(truncated("a", "\\boxed{1}"))
        assert not has_valid_format("a\\boxed{1}")
        assert not has_valid_format(closed("a</think>b", "\\boxed{1}"))

    def test_format_rule_from_token_ids(self):
        think_end = 2
        assert think_end_count([5, 6, think_end], [9], [7, 8], think_end) == 1  # closed trace
        assert think_end_count([5, 6], [9, think_end, 9], [7], think_end) == 1  # cut: the mark holds it
        assert think_end_count([5, 6], [9, think_end, 9], [7, think_end], think_end) == 2

    def test_ended_with_eos(self):
        assert ended_with_eos([5, 6, 2], 2)
        assert ended_with_eos([5, 6, 3], [2, 3])  # any of the model's EOS ids
        assert not ended_with_eos([5, 2, 7], 2)
        assert not ended_with_eos([], 2)

    def test_ground_truth_normalisation(self):
        assert normalize_ground_truth(142.0) == ("142",)
        assert normalize_ground_truth(0.25) == ("0.25",)
        assert normalize_ground_truth(7) == ("7",)
        assert normalize_ground_truth(["9.6\n", "9.60"]) == ("9.6", "9.60")
        for bad in ("", "  ", [], None, True, {"a": 1}, float("nan")):
            with pytest.raises(ValueError):
                normalize_ground_truth(bad)


class TestMathGrading:
    @pytest.mark.parametrize(
        ("given", "truth"),
        [
            ("0.5", r"\frac{1}{2}"),
            (r"\dfrac{1}{2}", r"\frac{1}{2}"),
            (r"\frac12", "0.5"),
            (r"\{3, 1, 2\}", r"\{1, 2, 3\}"),
            (r"\left( 3, \frac{\pi}{2} \right)", r"(3, \pi/2)"),
            ("142", 142.0),
            (r"2\sqrt{3}", r"\sqrt{12}"),
            ("9.60", ["9.6\n", "9.7"]),
            ("9.7", ["9.6\n", "9.7"]),
        ],
    )
    def test_equivalent_forms_grade_correct(self, reward, given, truth):
        scores, metrics = reward([closed("thinking", f"\\boxed{{{given}}}")], [truth])
        assert scores == [1.0], (given, truth, metrics)

    @pytest.mark.parametrize(
        ("given", "truth"),
        [("0.6", r"\frac{1}{2}"), (r"\{1, 2\}", r"\{1, 2, 3\}"), ("143", 142.0), ("(3, 2)", "(2, 3)")],
    )
    def test_different_answers_grade_wrong(self, reward, given, truth):
        scores, _ = reward([closed("thinking", f"\\boxed{{{given}}}")], [truth])
        assert scores == [0.0]

    def test_rule_violations_score_zero(self, reward):
        completions = [
            closed("thinking", "\\boxed{5}"),  # correct
            closed("thinking", "5"),  # missing box
            closed("thinking </think> again", "\\boxed{5}"),  # a second </think>
            "thinking without close\n\n**Final Answer**\n\\boxed{5}",  # no </think> at all
            truncated("cut short", "\\boxed{5}"),  # cut trace, correct
            truncated("cut short", "\\boxed{5}"),  # same text, but the trace ended with EOS
        ]
        eos_in_cut = [False, False, False, False, False, True]
        scores, metrics = reward(completions, ["5"] * 6, eos_in_cut=eos_in_cut)
        assert scores == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        assert metrics["reward/format_ok"] == pytest.approx(4 / 6)
        assert metrics["reward/boxed"] == pytest.approx(5 / 6)
        assert metrics["reward/eos_in_cut"] == pytest.approx(1 / 6)
        assert metrics["reward/mean"] == pytest.approx(2 / 6)
        # Only distinct (answer, truth) pairs that pass the format and EOS rules are graded: one, an exact match.
        assert metrics["reward/exact_pairs"] == 1.0 and metrics["reward/graded_pairs"] == 0.0

    def test_agrees_with_the_synthetic_verifier_on_integers(self, reward):
        completions = [closed("t", "\\boxed{12}"), closed("t", "\\boxed{13}"), truncated("t", "\\boxed{7}")]
        answers = ["12", "12", "7"]
        assert reward(completions, answers)[0] == synthetic_reward(completions, answers)[0] == [1.0, 0.0, 1.0]

    @pytest.mark.parametrize(
        ("given", "truths", "expected"),
        [
            ("5", ("5",), 1.0),
            (" 5 ", ("5",), 1.0),
            ("05", ("5",), 1.0),
            ("+3", ("3",), 1.0),
            ("-3", ("3",), 0.0),
            ("6", ("4", "5"), 0.0),
            ("5", ("4", "5"), 1.0),
            (r"\frac{1}{2}", (r"\frac{1}{2}",), 1.0),
            ("5", ("5.0",), None),
            ("0.5", (r"\frac{1}{2}",), None),
            ("5", ("4", "x"), None),
        ],
    )
    def test_exact_shortcut_agrees_with_math_verify(self, given, truths, expected):
        assert exact_grade(given, truths) == expected
        if expected is not None:
            assert grade_answer(given, truths) == expected

    @pytest.mark.parametrize(
        ("given", "truth", "expected"),
        [
            (r"4.5 \times 10^{33}", "4.5e33", 1.0),  # Minerva's gold in e-notation, the model's in LaTeX
            ("4.5e33", r"4.5 \times 10^{33}", 1.0),
            (r"4.6 \times 10^{33}", "4.5e33", 0.0),
            ("10^{-5}", "1e-5", 1.0),
            ("17000", "1.70e4", 1.0),
            ("3", "1e-5", 0.0),
            ("2e", "2e", 1.0),  # Euler's number is still e outside e-notation
            ("0.003''", r"0.003^{\prime \prime}", 1.0),
            ("y'+ry-rx(t)=0", r"y^{\prime}+ry-rx(t)=0", 1.0),
        ],
    )
    def test_e_notation_and_primes_mean_what_minerva_means(self, given, truth, expected):
        """math-verify reads ``4.5e33`` as 4.5 * e * 33 and ``\\prime`` as a symbol: without a rewrite
        a model's ``4.5 \\times 10^{33}`` scored 0 against 11 of the eval sets' gold answers."""
        assert grade_answer(given, (truth,)) == expected

    def test_exact_shortcut_can_be_turned_off(self):
        with MathReward(num_workers=1, exact_shortcut=False) as reward:
            scores, metrics = reward([closed("t", "\\boxed{5}"), closed("t", "\\boxed{6}")], ["5", "5"])
        assert scores == [1.0, 0.0]
        assert metrics["reward/graded_pairs"] == 2.0 and metrics["reward/exact_pairs"] == 0.0

    def test_input_validation(self, reward):
        with pytest.raises(ValueError, match="2 completions and 1 answers"):
            reward(["a", "b"], ["1"])
        with pytest.raises(TypeError, match=r"completions\[0\] is a list"):
            reward([[1, 2]], ["1"])
        with pytest.raises(ValueError, match=r"answers\[0\]: the answer is an empty string"):
            reward([closed("t", "\\boxed{1}")], [""])


class TestRegistry:
    def test_builtins(self):
        assert get_reward("synthetic") is synthetic_reward
        assert get_reward("math") is math_reward
        # The default math reward owns a shared pool, started on first use.
        scores, metrics = math_reward([closed("t", "\\boxed{\\frac{2}{4}}"), closed("t", "\\boxed{3}")], ["0.5", "4"])
        assert scores == [1.0, 0.0]
        assert metrics["reward/graded_pairs"] == 1.0 and metrics["reward/exact_pairs"] == 1.0
        assert {"math", "synthetic"} <= set(available_rewards())

    def test_register_and_import_path(self, monkeypatch):
        monkeypatch.setattr(registry_module, "_REGISTERED", {})

        @register_reward("always_one")
        def always_one(completions, answers):
            return [1.0] * len(completions), {}

        assert get_reward("always_one") is always_one
        assert get_reward("always_one")(["x", "y"], ["1", "2"]) == ([1.0, 1.0], {})
        with pytest.raises(ValueError, match="already registered"):
            register_reward("always_one", always_one)
        with pytest.raises(ValueError, match="already registered"):
            register_reward("math", always_one)
        assert get_reward("trainer.synthetic:synthetic_reward") is synthetic_reward

    def test_grader_settings_give_one_shared_math_reward_per_setting(self):
        """``reward.grader``/``reward.timeout_s`` reach the math reward (the authors' grader: test_rewards_authors.py)."""
        reward = get_reward("math", timeout_s=7.0)
        assert isinstance(reward, MathReward) and reward.grader == "math-verify" and reward.pool.timeout_s == 7.0
        assert get_reward("math", timeout_s=7.0) is reward
        assert get_reward("math", grader="authors") is not reward
        with pytest.raises(ValueError, match="grader 'nope' is not one of"):
            get_reward("math", grader="nope")

    def test_unknown_names(self):
        with pytest.raises(ValueError, match="unknown reward 'nope'"):
            get_reward("nope")
        with pytest.raises(ValueError, match="names no callable"):
            get_reward("trainer.synthetic:not_there")
        with pytest.raises(ValueError, match="must not contain ':'"):
            register_reward("a:b", synthetic_reward)
