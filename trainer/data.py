"""Prompts from data files: JSON, JSONL, parquet and Hugging Face ``datasets``, into chat-formatted prompts.

Row layouts understood without configuration:

- the authors' (and raw DeepScaleR's): ``problem``, ``answer`` (a string, a number, or a list of
  acceptable answers), optional ``solution``;
- DeepScaleR's verl-processed parquet: ``prompt`` (a list of chat messages whose last user message
  is the problem, the instruction suffix already appended) and ``reward_model.ground_truth``.

Any other layout: ``columns`` maps ``problem``/``answer``/``solution`` to column names (a dotted
name reaches into nested records, ``reward_model.ground_truth``). A malformed row (missing field,
wrong type, empty answer) raises ``DataError`` naming the source and the row, or is skipped and
counted with ``skip_bad_rows``. For ``grader="authors"`` (``reward.grader``) answers are read as the
authors' code reads them, and a row without one loads with ``answer == ()``: it scores 0 and stays
in the batch, as in their trainer.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from trainer.rewards.math_reward import read_ground_truths
from trainer.text_markers import INSTRUCTION, THINK_START

logger = logging.getLogger(__name__)

THINKING_OPENER = THINK_START + "\n"
FIELDS = ("problem", "answer", "solution")
_FILE_FORMATS = {".json": "json", ".jsonl": "jsonl", ".parquet": "parquet"}
_SAVED_DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


class DataError(ValueError):
    """A data source or one of its rows is not usable; the message names the source and the row."""


@dataclass(frozen=True)
class Problem:
    """One row: the problem text, its acceptable answers, the optional reference solution, and where it came from."""

    problem: str
    answer: tuple[str, ...]
    solution: str | None = None
    source: str = ""
    index: int = -1


@dataclass(frozen=True)
class Prompt:
    """A chat-formatted prompt ready for rollout: its text, token ids [P] and the problem it asks."""

    text: str
    token_ids: tuple[int, ...]
    problem: Problem

    @property
    def answer(self) -> tuple[str, ...]:
        return self.problem.answer


@dataclass
class PromptSet:
    """Prompts kept, and how many were dropped for length or skipped as malformed rows."""

    prompts: list[Prompt]
    num_too_long: int = 0
    num_bad_rows: int = 0
    too_long: list[Problem] = field(default_factory=list)


@dataclass
class DataConfig:
    """Where prompts come from and how they are built (the ``data`` section of a run's config)."""

    source: str
    split: str = "train"
    columns: dict[str, str] = field(default_factory=dict)
    skip_bad_rows: bool = False
    max_prompt_tokens: int | None = None
    instruction: str = INSTRUCTION
    thinking_opener: str | None = "auto"
    limit: int | None = None
    grader: str = "math-verify"


def read_rows(source: str | Path, *, split: str = "train") -> list[dict]:
    """Raw rows of a JSON/JSONL/parquet file, a saved or local ``datasets`` folder, or a hub dataset name."""
    path = Path(source)
    if path.is_file():
        kind = _FILE_FORMATS.get(path.suffix.lower())
        if kind is None:
            raise DataError(f"{path}: unknown file type {path.suffix!r}; expected one of {sorted(_FILE_FORMATS)}")
        return _read_file(path, kind)
    if path.is_dir():
        return _read_datasets_folder(path, split)
    if path.suffix.lower() in _FILE_FORMATS or str(source).startswith((".", "/", "~")):
        where = "" if path.is_absolute() else f" (relative paths are read from the current directory, {Path.cwd()})"
        raise FileNotFoundError(f"data source {str(source)!r} does not exist{where}")
    return _read_hub_dataset(str(source), split)


def _read_file(path: Path, kind: str) -> list[dict]:
    if kind == "parquet":
        import pyarrow.parquet

        return pyarrow.parquet.read_table(path).to_pylist()
    text = path.read_text(encoding="utf-8")
    if kind == "jsonl":
        return [_json_line(path, number, line) for number, line in enumerate(text.splitlines(), 1) if line.strip()]
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(rows, list):
        raise DataError(f"{path}: the top level is a {type(rows).__name__}; expected a list of rows")
    return rows


def _json_line(path: Path, number: int, line: str) -> dict:
    try:
        return json.loads(line)
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: line {number} is not valid JSON ({error})") from error


def _read_datasets_folder(path: Path, split: str) -> list[dict]:
    import datasets

    if any((path / marker).exists() for marker in _SAVED_DATASET_MARKERS):
        dataset = datasets.load_from_disk(str(path))
        if isinstance(dataset, datasets.DatasetDict):
            if split not in dataset:
                raise DataError(f"{path}: no split {split!r}; it has {sorted(dataset)}")
            dataset = dataset[split]
        return dataset.to_list()
    return datasets.load_dataset(str(path), split=split).to_list()


def _read_hub_dataset(name: str, split: str) -> list[dict]:
    import datasets

    return datasets.load_dataset(name, split=split).to_list()


def _lookup(row: Mapping, column: str):
    value = row
    for key in column.split("."):
        if not isinstance(value, Mapping) or key not in value:
            raise KeyError(column)
        value = value[key]
    return value


def _last_user_message(messages: Sequence, instruction: str) -> str:
    users = [message for message in messages if isinstance(message, Mapping) and message.get("role") == "user"]
    if not users or not isinstance(users[-1].get("content"), str):
        raise ValueError("the 'prompt' messages hold no user message with text content")
    content = users[-1]["content"].strip()
    if instruction and content.endswith(instruction):
        content = content[: -len(instruction)].rstrip()
    return content


def _columns_for(row: Mapping, columns: Mapping[str, str]) -> dict[str, str]:
    if "problem" not in row and "prompt" in row and "reward_model" in row:
        layout = {"problem": "prompt", "answer": "reward_model.ground_truth", "solution": "solution"}
    else:
        layout = {name: name for name in FIELDS}
    return {**layout, **columns}


def row_to_problem(
    row: object, *, source: str, index: int, columns: Mapping[str, str] | None = None, instruction: str = INSTRUCTION,
    grader: str = "math-verify",
) -> Problem:  # fmt: skip
    """One raw row as a ``Problem``; raises ``DataError`` naming ``source`` and the row ``index`` when malformed."""
    where = f"{source}: row {index}"
    if not isinstance(row, Mapping):
        raise DataError(f"{where}: is a {type(row).__name__}; expected a record (a mapping of columns)")
    layout = _columns_for(row, columns or {})
    values = {}
    for name in FIELDS:
        try:
            values[name] = _lookup(row, layout[name])
        except KeyError:
            if name == "solution" or (name == "answer" and grader == "authors"):
                values[name] = None
                continue
            raise DataError(f"{where}: missing field {layout[name]!r} (for {name!r}); it has {sorted(row)}") from None
    problem = values["problem"]
    try:
        if isinstance(problem, list):
            problem = _last_user_message(problem, instruction)
        if not isinstance(problem, str) or not problem.strip():
            raise ValueError(f"the problem {problem!r} is not a non-empty string")
        answer = read_ground_truths(values["answer"], grader)
        solution = values["solution"]
        if isinstance(solution, list) and solution and all(isinstance(text, str) for text in solution):
            solution = solution[0]  # OlympiadBench lists reference solutions, each complete: the first
        if solution is not None and not isinstance(solution, str):
            raise ValueError(f"the solution is a {type(solution).__name__}; expected a string, a list of strings "
                             "(the first is used) or nothing")  # fmt: skip
    except ValueError as error:
        raise DataError(f"{where}: {error}") from error
    return Problem(problem=problem.strip(), answer=answer, solution=solution, source=source, index=index)


def load_problems(
    source: str | Path,
    *,
    split: str = "train",
    columns: Mapping[str, str] | None = None,
    skip_bad_rows: bool = False,
    instruction: str = INSTRUCTION,
    grader: str = "math-verify",
) -> tuple[list[Problem], int]:
    """Problems of a data source and the number of malformed rows skipped (always 0 unless ``skip_bad_rows``)."""
    unknown = set(columns or {}) - set(FIELDS)
    if unknown:
        raise ValueError(f"columns maps unknown fields {sorted(unknown)}; expected keys among {FIELDS}")
    name = str(source)
    problems, bad_rows = [], 0
    for index, row in enumerate(read_rows(source, split=split)):
        try:
            problems.append(row_to_problem(row, source=name, index=index, columns=columns, instruction=instruction,
                                           grader=grader))  # fmt: skip
        except DataError as error:
            if not skip_bad_rows:
                raise
            bad_rows += 1
            logger.debug("skipping %s", error)
    if bad_rows:
        logger.warning("%s: skipped %d malformed rows of %d", name, bad_rows, bad_rows + len(problems))
    unanswered = sum(not problem.answer for problem in problems)
    if unanswered:
        logger.warning("%s: %d rows have no answer; they load and score 0 (grader %s)", name, unanswered, grader)
    return problems, bad_rows


def _wants_opener(text: str, tokenizer, thinking_opener: str | None) -> str | None:
    if thinking_opener is None:
        return None
    if thinking_opener == "auto":
        ids = tokenizer.encode(THINKING_OPENER.strip(), add_special_tokens=False)
        if len(ids) != 1:
            return None
        thinking_opener = THINKING_OPENER
    return None if text.rstrip().endswith(thinking_opener.strip()) else thinking_opener


def format_prompt(
    problem: str, tokenizer, *, instruction: str = INSTRUCTION, thinking_opener: str | None = "auto"
) -> str:
    """The chat-formatted prompt text: one user turn ``problem + " " + instruction``, the generation prompt, and
    the thinking opener when the template leaves it out.

    ``thinking_opener``: ``"auto"`` appends ``<think>\\n`` when the tokenizer has ``<think>`` as one token;
    a string appends that string; None appends nothing. Nothing is appended when the prompt already ends with it.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{type(tokenizer).__name__} has no chat template; set tokenizer.chat_template first")
    content = f"{problem} {instruction}" if instruction else problem
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )
    opener = _wants_opener(text, tokenizer, thinking_opener)
    return text + opener if opener else text


def build_prompts(
    problems: Sequence[Problem],
    tokenizer,
    *,
    max_prompt_tokens: int | None = None,
    instruction: str = INSTRUCTION,
    thinking_opener: str | None = "auto",
) -> PromptSet:
    """Chat-formatted, tokenized prompts; those longer than ``max_prompt_tokens`` are dropped and counted."""
    if max_prompt_tokens is not None and max_prompt_tokens < 1:
        raise ValueError(f"max_prompt_tokens must be >= 1 or None, got {max_prompt_tokens}")
    prompts, too_long = [], []
    for problem in problems:
        text = format_prompt(problem.problem, tokenizer, instruction=instruction, thinking_opener=thinking_opener)
        token_ids = tuple(tokenizer.encode(text, add_special_tokens=False))
        if max_prompt_tokens is not None and len(token_ids) > max_prompt_tokens:
            too_long.append(problem)
            continue
        prompts.append(Prompt(text=text, token_ids=token_ids, problem=problem))
    if too_long:
        logger.warning(
            "dropped %d of %d prompts longer than %d tokens", len(too_long), len(problems), max_prompt_tokens
        )
    return PromptSet(prompts=prompts, num_too_long=len(too_long), too_long=too_long)


def load_prompts(config: DataConfig, tokenizer) -> PromptSet:
    """Problems of ``config.source`` (the first ``config.limit``) turned into prompts with ``tokenizer``."""
    problems, bad_rows = load_problems(
        config.source,
        split=config.split,
        columns=config.columns,
        skip_bad_rows=config.skip_bad_rows,
        instruction=config.instruction,
        grader=config.grader,
    )
    if config.limit is not None:
        problems = problems[: config.limit]
    prompt_set = build_prompts(
        problems,
        tokenizer,
        max_prompt_tokens=config.max_prompt_tokens,
        instruction=config.instruction,
        thinking_opener=config.thinking_opener,
    )
    prompt_set.num_bad_rows = bad_rows
    return prompt_set
