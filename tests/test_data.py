"""Data loading from every supported source and layout, malformed rows, and prompt construction."""

from __future__ import annotations

import json
import logging

import datasets
import pyarrow
import pyarrow.parquet
import pytest

from trainer.data import (
    INSTRUCTION,
    DataConfig,
    DataError,
    Problem,
    build_prompts,
    format_prompt,
    load_problems,
    load_prompts,
    read_rows,
)
from trainer.tokenizer import build_tokenizer

ROWS = [
    {"problem": "What is $1+1$?", "answer": "2", "solution": "$1+1=2$."},
    {"problem": "Convert $0.5$ to a fraction.", "answer": "\\frac{1}{2}"},
    {"problem": "Compute $3+\\frac{1}{3}$ numerator plus denominator.", "answer": 13.0},
    {"problem": "A speed in m/s.", "answer": ["9.6\n", "9.60"], "solution": None},
]
EXPECTED = [
    Problem("What is $1+1$?", ("2",), "$1+1=2$."),
    Problem("Convert $0.5$ to a fraction.", ("\\frac{1}{2}",)),
    Problem("Compute $3+\\frac{1}{3}$ numerator plus denominator.", ("13",)),
    Problem("A speed in m/s.", ("9.6", "9.60")),
]


def content(problems: list[Problem]) -> list[tuple]:
    return [(problem.problem, problem.answer, problem.solution) for problem in problems]


def expected_content() -> list[tuple]:
    return content(EXPECTED)


def write_json(path, rows):
    path.write_text(json.dumps(rows))
    return path


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_parquet(path, rows):
    # Parquet columns have one type: the mixed answers travel as JSON-free lists of strings.
    table = pyarrow.Table.from_pylist([{**row, "answer": [str(a) for a in _as_list(row["answer"])]} for row in rows])
    pyarrow.parquet.write_table(table, path)
    return path


def _as_list(answer):
    return answer if isinstance(answer, list) else [answer]


class TestFormats:
    def test_json(self, tmp_path):
        problems, bad_rows = load_problems(write_json(tmp_path / "set.json", ROWS))
        assert content(problems) == expected_content() and bad_rows == 0
        assert [problem.index for problem in problems] == [0, 1, 2, 3]
        assert problems[0].source == str(tmp_path / "set.json")

    def test_jsonl(self, tmp_path):
        problems, _ = load_problems(write_jsonl(tmp_path / "set.jsonl", ROWS))
        assert content(problems) == expected_content()

    def test_parquet(self, tmp_path):
        problems, _ = load_problems(write_parquet(tmp_path / "set.parquet", ROWS))
        assert [problem.answer for problem in problems] == [("2",), ("\\frac{1}{2}",), ("13.0",), ("9.6", "9.60")]
        assert [problem.problem for problem in problems] == [row["problem"] for row in ROWS]

    def test_datasets_saved_to_disk(self, tmp_path):
        rows = [{"problem": row["problem"], "answer": str(_as_list(row["answer"])[0])} for row in ROWS]
        datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "saved"))
        problems, _ = load_problems(tmp_path / "saved", split="test")
        assert [problem.answer[0] for problem in problems] == ["2", "\\frac{1}{2}", "13.0", "9.6"]
        with pytest.raises(DataError, match="no split 'train'"):
            load_problems(tmp_path / "saved")

    def test_datasets_local_folder(self, tmp_path, monkeypatch):
        monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
        folder = tmp_path / "folder"
        folder.mkdir()
        write_jsonl(folder / "train.jsonl", [{"problem": row["problem"], "answer": "7"} for row in ROWS])
        problems, _ = load_problems(folder)
        assert [problem.problem for problem in problems] == [row["problem"] for row in ROWS]

    def test_deepscaler_verl_layout(self, tmp_path):
        rows = [
            {
                "data_source": "",
                "prompt": [{"role": "user", "content": f"{row['problem']} {INSTRUCTION}"}],
                "ability": "math",
                "reward_model": {"style": "rule", "ground_truth": str(_as_list(row["answer"])[0])},
                "extra_info": {"split": "train", "index": index},
            }
            for index, row in enumerate(ROWS)
        ]
        problems, _ = load_problems(write_parquet_plain(tmp_path / "train.parquet", rows))
        assert [problem.problem for problem in problems] == [row["problem"] for row in ROWS]
        assert [problem.answer for problem in problems] == [("2",), ("\\frac{1}{2}",), ("13.0",), ("9.6",)]

    def test_column_mapping(self, tmp_path):
        rows = [{"question": "Q1", "result": {"value": 3}, "notes": "n"}, {"question": "Q2", "result": {"value": 4}}]
        path = write_json(tmp_path / "custom.json", rows)
        problems, _ = load_problems(
            path, columns={"problem": "question", "answer": "result.value", "solution": "notes"}
        )
        assert content(problems) == [("Q1", ("3",), "n"), ("Q2", ("4",), None)]
        with pytest.raises(ValueError, match="unknown fields"):
            load_problems(path, columns={"question": "problem"})

    def test_unknown_sources(self, tmp_path):
        with pytest.raises(FileNotFoundError, match="does not exist"):
            read_rows(tmp_path / "missing.json")
        (tmp_path / "set.csv").write_text("problem,answer\n")
        with pytest.raises(DataError, match=r"unknown file type '\.csv'"):
            read_rows(tmp_path / "set.csv")
        with pytest.raises(DataError, match="expected a list of rows"):
            read_rows(write_json(tmp_path / "dict.json", {"problem": "p"}))
        (tmp_path / "broken.jsonl").write_text('{"problem": "p", "answer": "1"}\n{oops\n')
        with pytest.raises(DataError, match="line 2 is not valid JSON"):
            read_rows(tmp_path / "broken.jsonl")


def write_parquet_plain(path, rows):
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), path)
    return path


BAD_ROWS = [
    ({"problem": "p"}, "missing field 'answer'"),
    ({"answer": "1"}, "missing field 'problem'"),
    ({"problem": "p", "answer": ""}, "empty string"),
    ({"problem": "p", "answer": []}, "empty list"),
    ({"problem": "p", "answer": {"value": 1}}, "is a dict"),
    ({"problem": "p", "answer": None}, "is a NoneType"),
    ({"problem": 5, "answer": "1"}, "not a non-empty string"),
    ({"problem": "  ", "answer": "1"}, "not a non-empty string"),
    ({"problem": "p", "answer": "1", "solution": 3}, "the solution is a int"),
    ({"problem": "p", "answer": "1", "solution": ["a", 3]}, "the solution is a list; expected a string, a list of"),
    (["p", "1"], "is a list; expected a record"),
]


def test_an_olympiadbench_row_lists_its_answer_and_solutions(tmp_path):
    """OlympiadBench (the authors' test/olympiad_bench.json) gives the answer and the reference
    solutions as lists: the answer list is its acceptable answers, the first solution is the text."""
    row = {"id": 1, "problem": "Find $x$.", "answer": ["$\\frac{1}{2}$"], "solution": ["First.", "Second."],
           "is_multiple_answer": False, "unit": None}  # fmt: skip
    (problem,), bad_rows = load_problems(write_json(tmp_path / "olympiad_bench.json", [row]))
    assert bad_rows == 0
    assert (problem.problem, problem.answer, problem.solution) == ("Find $x$.", ("$\\frac{1}{2}$",), "First.")


class TestMalformedRows:
    @pytest.mark.parametrize(("bad_row", "message"), BAD_ROWS)
    def test_error_names_the_file_and_the_row(self, tmp_path, bad_row, message):
        path = write_json(tmp_path / "set.json", [ROWS[0], bad_row, ROWS[1]])
        with pytest.raises(DataError, match=message) as error:
            load_problems(path)
        assert f"{path}: row 1:" in str(error.value)

    def test_skip_bad_rows_counts_them(self, tmp_path, caplog):
        rows = [ROWS[0]] + [bad for bad, _ in BAD_ROWS] + [ROWS[1]]
        path = write_jsonl(tmp_path / "set.jsonl", rows)
        with caplog.at_level(logging.WARNING, logger="trainer.data"):
            problems, bad_rows = load_problems(path, skip_bad_rows=True)
        assert content(problems) == expected_content()[:2]
        assert [problem.index for problem in problems] == [0, len(BAD_ROWS) + 1]
        assert bad_rows == len(BAD_ROWS)
        assert f"skipped {len(BAD_ROWS)} malformed rows of {len(rows)}" in caplog.text


NO_OPENER_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


class TestPrompts:
    def test_template_with_opener_is_not_doubled(self):
        tokenizer = build_tokenizer()
        text = format_prompt("Start at 3. Add 4.", tokenizer)
        assert text == f"<|user|>\nStart at 3. Add 4. {INSTRUCTION}\n<|assistant|>\n<think>\n"

    def test_opener_is_added_when_the_template_leaves_it_out(self):
        tokenizer = build_tokenizer(chat_template=NO_OPENER_TEMPLATE)
        expected_head = f"<|user|>\nStart at 3. {INSTRUCTION}\n<|assistant|>\n"
        assert format_prompt("Start at 3.", tokenizer) == expected_head + "<think>\n"
        assert format_prompt("Start at 3.", tokenizer, thinking_opener=None) == expected_head
        assert format_prompt("Start at 3.", tokenizer, thinking_opener="<go>") == expected_head + "<go>"
        assert (
            format_prompt("Start at 3.", tokenizer, instruction="") == "<|user|>\nStart at 3.\n<|assistant|>\n<think>\n"
        )

    def test_no_chat_template_is_an_error(self):
        tokenizer = build_tokenizer()
        tokenizer.chat_template = None
        with pytest.raises(ValueError, match="no chat template"):
            format_prompt("p", tokenizer)

    def test_long_prompts_are_dropped_and_counted(self, caplog):
        tokenizer = build_tokenizer()
        problems = [Problem("Add 1.", ("1",)), Problem("Add 1. " * 30, ("2",)), Problem("Add 22.", ("3",))]
        limit = len(tokenizer.encode(format_prompt("Add 22.", tokenizer), add_special_tokens=False))
        with caplog.at_level(logging.WARNING, logger="trainer.data"):
            prompt_set = build_prompts(problems, tokenizer, max_prompt_tokens=limit)
        assert [prompt.answer for prompt in prompt_set.prompts] == [("1",), ("3",)]
        assert prompt_set.num_too_long == 1
        assert f"dropped 1 of 3 prompts longer than {limit} tokens" in caplog.text
        for prompt in prompt_set.prompts:
            assert tokenizer.decode(list(prompt.token_ids)) == prompt.text
            assert len(prompt.token_ids) <= limit
        with pytest.raises(ValueError, match="max_prompt_tokens must be >= 1"):
            build_prompts(problems, tokenizer, max_prompt_tokens=0)

    def test_load_prompts_from_config(self, tmp_path):
        path = write_jsonl(tmp_path / "set.jsonl", [ROWS[0], {"problem": "p"}, ROWS[1], ROWS[2]])
        config = DataConfig(source=str(path), skip_bad_rows=True, limit=2)
        prompt_set = load_prompts(config, build_tokenizer())
        assert [prompt.problem.problem for prompt in prompt_set.prompts] == [ROWS[0]["problem"], ROWS[1]["problem"]]
        assert prompt_set.num_bad_rows == 1 and prompt_set.num_too_long == 0
