"""The synthetic anytime task, its verifier, and its local tokenizer."""

from __future__ import annotations

import random
import re
import threading
from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from trainer.budgets import ANSWER_OPENER, TRUNCATION_MARK, Delimiters
from trainer.checkpoint import save_checkpoint
from trainer.components import build
from trainer.config import load_config
from trainer.data import INSTRUCTION, build_prompts, format_prompt, load_problems
from trainer.models import load_model
from trainer.synthetic import (
    ArithmeticProblem,
    generate_problem,
    generate_rows,
    save_rows,
    synthetic_reward,
    teacher_summary,
    teacher_thinking,
)
from trainer.tokenizer import EOS, build_tokenizer, byte_level_spelling, save_tokenizer

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "tiny-cpu.yaml"

PROBLEM = ArithmeticProblem(start=37, steps=(("add", 15), ("multiply", 3), ("subtract", 60)))


def solve_text(text: str) -> int:
    """An independent solver that reads the problem text: start value, then each operation, modulo 100."""
    value = int(re.match(r"Start at (\d+)\.", text).group(1))
    for verb, operand in re.findall(r"(Add|Subtract|Multiply by) (\d+)\.", text):
        operand = int(operand)
        value = {"Add": value + operand, "Subtract": value - operand, "Multiply by": value * operand}[verb] % 100
    return value


class TestTask:
    def test_hand_computed_problem(self):
        assert PROBLEM.text == "Start at 37. Add 15. Multiply by 3. Subtract 60. What is the result modulo 100?"
        assert PROBLEM.partial_results() == [52, 56, 96]  # 37+15, 52*3=156 -> 56, 56-60=-4 -> 96
        assert PROBLEM.answer == 96

    def test_terse_and_verbose_teacher_thinking(self):
        rng = random.Random(0)
        assert teacher_thinking(PROBLEM, 0.0, rng) == "37 + 15 = 52\n52 * 3 = 56\n56 - 60 = 96\n</think>"
        assert teacher_thinking(PROBLEM, 1.0, rng) == (
            "37 + 15 = 52\ncheck: 37 + 15 = 52\n52 * 3 = 56\ncheck: 52 * 3 = 56\n56 - 60 = 96\ncheck: 56 - 60 = 96\n</think>"
        )
        with pytest.raises(ValueError, match="check_prob"):
            teacher_thinking(PROBLEM, 1.5, rng)

    def test_rows_match_an_independent_solver(self):
        rows = generate_rows(200, seed=3)
        assert rows == generate_rows(200, seed=3)
        assert rows != generate_rows(200, seed=4)
        for row in rows:
            answer = solve_text(row["problem"])
            assert row["answer"] == str(answer)
            thinking, _, summary = row["solution"].partition(ANSWER_OPENER)
            assert summary == f"\\boxed{{{answer}}}"
            # The last line of thinking carries the final partial result.
            assert thinking.endswith(f"= {answer}\n</think>")

    def test_traces_vary_in_length_and_step_count(self):
        rows = generate_rows(200, seed=1, min_steps=2, max_steps=8)
        lengths = {len(row["solution"]) for row in rows}
        steps = {len(re.findall(r"(Add|Subtract|Multiply by) ", row["problem"])) for row in rows}
        assert steps == set(range(2, 9))
        assert len(lengths) > 50
        verbose = generate_rows(50, seed=1, check_probs=(1.0,))
        terse = generate_rows(50, seed=1, check_probs=(0.0,))
        for long_row, short_row in zip(verbose, terse, strict=True):
            assert long_row["problem"] == short_row["problem"]
            assert long_row["solution"].count("\n") == 2 * short_row["solution"].count("\n") - 3

    def test_argument_checks(self):
        with pytest.raises(ValueError, match="min_steps"):
            generate_problem(random.Random(0), min_steps=3, max_steps=2)
        with pytest.raises(ValueError, match="num_problems"):
            generate_rows(-1)

    def test_excluded_problems_are_never_drawn(self):
        # One step, modulus 2, operand 1, multiplier 2: the whole space is 2 starts x 3 operations.
        small = dict(min_steps=1, max_steps=1, modulus=2, max_operand=1, max_multiplier=2)
        space = {f"Start at {start}. {operation} What is the result modulo 2?" for start in (0, 1)
                 for operation in ("Add 1.", "Subtract 1.", "Multiply by 2.")}  # fmt: skip
        assert {row["problem"] for row in generate_rows(200, seed=0, **small)} == space
        kept = "Start at 1. Multiply by 2. What is the result modulo 2?"
        rows = generate_rows(20, seed=0, exclude=space - {kept}, **small)
        assert [row["problem"] for row in rows] == [kept] * 20 and {row["answer"] for row in rows} == {"0"}
        with pytest.raises(ValueError, match="excluded problems for 0 of the 3 asked"):
            generate_rows(3, seed=0, exclude=space, **small)

    def test_the_demo_evaluates_on_problems_it_never_trains_on(self, tmp_path):
        """``make train``'s held-out problems: 24 of 256 were training problems before they were
        drawn apart (the demo's 2-step chains of modulus 10 are a space of 6760 problems)."""
        parts = build(load_config(DEMO_CONFIG, ["train.steps=0", "logging.progress=false"]), tmp_path)
        train = {prompt.problem.problem for prompt in parts.train_prompts}
        held_out = [prompt.problem.problem for prompt in parts.eval_sets["eval"]]
        assert len(train) > 10_000 and len(held_out) == 256
        assert [problem for problem in held_out if problem in train] == []


class TestVerifier:
    def test_reward_rule(self):
        thinking = teacher_thinking(PROBLEM, 0.0, random.Random(0))
        completions = [
            thinking + ANSWER_OPENER + teacher_summary(96),  # closed, correct
            thinking + ANSWER_OPENER + teacher_summary(95),  # wrong number
            "37 + 15 = 52" + TRUNCATION_MARK + ANSWER_OPENER + "\\boxed{ 96 }",  # cut, correct
            thinking + ANSWER_OPENER + "96",  # no box
            thinking + "</think>" + ANSWER_OPENER + teacher_summary(96),  # two </think>
            thinking + ANSWER_OPENER + teacher_summary(96),  # correct text, EOS-ended trace
            thinking + ANSWER_OPENER + "\\boxed{ninety-six}",  # not an integer
        ]
        eos_in_cut = [False] * 5 + [True, False]
        scores, metrics = synthetic_reward(completions, [96, "96", "96", 96, 96, 96, 96], eos_in_cut=eos_in_cut)
        assert scores == [1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0]
        assert metrics["reward/mean"] == pytest.approx(2 / 7)
        assert metrics["reward/format_ok"] == pytest.approx(6 / 7)
        assert metrics["reward/boxed"] == pytest.approx(6 / 7)

    def test_bad_answers(self):
        with pytest.raises(ValueError, match="is not an integer"):
            synthetic_reward(["x"], ["1/2"])
        with pytest.raises(ValueError, match="1 completions and 2 answers"):
            synthetic_reward(["x"], [1, 2])


class TestTokenizer:
    def test_round_trip_and_single_token_pieces(self):
        tokenizer = build_tokenizer()
        assert isinstance(tokenizer, PreTrainedTokenizerFast)
        for row in generate_rows(20, seed=0):
            text = row["problem"] + "\n" + row["solution"] + EOS
            ids = tokenizer.encode(text, add_special_tokens=False)
            assert tokenizer.decode(ids) == text
            assert ids[-1] == tokenizer.eos_token_id
        for piece in ("</think>", "<think>", "...", "\n\n", "**Final Answer**", "\\boxed{", "}", EOS, INSTRUCTION):
            assert len(tokenizer.encode(piece, add_special_tokens=False)) == 1, piece
        assert tokenizer.decode(tokenizer.encode("a\n\n\nb", add_special_tokens=False)) == "a\n\n\nb"

    def test_delimiters_from_tokenizer(self):
        tokenizer = build_tokenizer()
        delimiters = Delimiters.from_tokenizer(tokenizer)
        assert delimiters.think_end_id == tokenizer.convert_tokens_to_ids("</think>")
        assert tokenizer.decode(list(delimiters.truncated)) == TRUNCATION_MARK + ANSWER_OPENER
        assert tokenizer.decode(list(delimiters.closed)) == ANSWER_OPENER
        thinking = tokenizer.encode(teacher_thinking(PROBLEM, 0.0, random.Random(0)), add_special_tokens=False)
        assert delimiters.inserted(thinking, len(thinking)) == delimiters.closed
        assert delimiters.inserted(thinking, 5) == delimiters.truncated

    def test_saved_tokenizer_loads_offline(self, tmp_path, monkeypatch):
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        tokenizer = build_tokenizer()
        loaded = AutoTokenizer.from_pretrained(str(save_tokenizer(tmp_path / "tokenizer")))
        text = generate_rows(1, seed=0)[0]["solution"]
        assert loaded.encode(text, add_special_tokens=False) == tokenizer.encode(text, add_special_tokens=False)
        assert loaded.eos_token_id == tokenizer.eos_token_id and loaded.chat_template == tokenizer.chat_template

    def test_byte_level_spelling(self):
        assert [byte_level_spelling(character) for character in " \nA~"] == ["\u0120", "\u010a", "A", "~"]

    def test_a_checkpoint_loads_through_auto_tokenizer_and_round_trips(self, tmp_path, monkeypatch):
        """A demo checkpoint written as the trainer writes it (a Qwen2 model): plain ``AutoTokenizer``
        (which returns ``Qwen2Tokenizer`` for it) encodes the demo's texts to the training ids and
        decodes them back to the same text."""
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        config = load_config(DEMO_CONFIG, [])
        tokenizer = build_tokenizer()
        model = load_model(config.model, tokenizer, "cpu")
        loaded = AutoTokenizer.from_pretrained(str(save_checkpoint(tmp_path / "sft", model, tokenizer, config, step=0)))
        assert loaded.decode(loaded.encode("Start at 7. Multiply by 3.", add_special_tokens=False)) == (
            "Start at 7. Multiply by 3."
        )
        s = config.data.synthetic
        rows = generate_rows(50, seed=s.seed, min_steps=s.min_steps, max_steps=s.max_steps, modulus=s.modulus,
                             max_operand=s.max_operand, max_multiplier=s.max_multiplier,
                             check_probs=tuple(s.check_probs))  # fmt: skip
        texts = [format_prompt(row["problem"], tokenizer) + row["solution"] + EOS for row in rows]
        texts.append("7 * 3 = 1\ncheck: 7" + TRUNCATION_MARK + ANSWER_OPENER + "\\boxed{1}" + EOS)
        for text in texts:
            ids = tokenizer.encode(text, add_special_tokens=False)
            assert loaded.encode(text, add_special_tokens=False) == ids
            assert loaded.decode(ids) == text
        assert (loaded.eos_token_id, loaded.pad_token_id) == (tokenizer.eos_token_id, tokenizer.pad_token_id)
        assert loaded.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False,
                                          add_generation_prompt=True) == "<|user|>\nx\n<|assistant|>\n<think>\n"  # fmt: skip

    def test_prompts_from_synthetic_rows(self, tmp_path):
        problems, _ = load_problems(save_rows(generate_rows(8, seed=2), tmp_path / "data" / "synthetic.jsonl"))
        prompt_set = build_prompts(problems, build_tokenizer())
        assert len(prompt_set.prompts) == 8
        for prompt in prompt_set.prompts:
            assert prompt.text.endswith("<|assistant|>\n<think>\n")
            assert solve_text(prompt.problem.problem) == int(prompt.answer[0])


def test_save_rows_is_atomic_for_concurrent_readers(tmp_path):
    """Every rank of a distributed run writes the same rows into the shared run folder: a reader
    must never see a truncated or half-written file while another process rewrites it."""
    rows = generate_rows(400, seed=0)
    path = save_rows(rows, tmp_path / "train.jsonl")
    expected = path.read_text(encoding="utf-8")
    torn, stop = [], threading.Event()

    def read() -> None:
        while not stop.is_set():
            text = path.read_text(encoding="utf-8")
            if text != expected:
                torn.append(len(text))

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for _ in range(300):
            save_rows(rows, path)
    finally:
        stop.set()
        reader.join()
    assert torn == []
    assert [p.name for p in tmp_path.iterdir()] == ["train.jsonl"]  # no partial file left behind
