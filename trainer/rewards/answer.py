"""The reward rule's text side, exactly as the authors' code reads a summary, and the grading skeleton.

A completion is the text ``z[:c] + inserted delimiter + summary`` (EOS dropped). The rule
(ARCHITECTURE.md): split the text after the thinking cut (after the first ``</think>``: the closed
trace's own, or the one inside the truncation mark) on ``"\\n\\n"``; the first piece that starts
with ``"**Final Answer**\\n"`` is the answer step (none: wrong); its last ``\\boxed{`` (exactly that
spelling; an unclosed last box means no answer, no fallback to an earlier one) must match the
ground truth; and the cut thinking plus the summary must hold exactly one ``</think>`` token (the
trainer counts token ids; text alone falls back to counting the string). A cut that contains an
EOS scores 0. ``lenient=True`` selects a forgiving parser (blank lines after the header,
``\\boxed {``, an earlier closed box), never the default.

``grade_completions`` is the one skeleton every reward shares (format, answer step, box, EOS,
metrics); a reward supplies only the comparison of extracted answers with ground truths.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from trainer.text_markers import ANSWER_STEP_HEADER, FINAL_ANSWER_HEADER, THINK_END

Metrics = dict[str, float]
# compare(answers, truths) -> (scores, metrics): answers[i] is an extracted box, truths[i] its ground truth.
CompareFn = Callable[[list[str], list[object]], tuple[list[float], Metrics]]

_BOXED_STRICT = "\\boxed{"
# Lenient parser: a paragraph starts at the beginning of the text or after a blank line.
_HEADER = re.compile(r"(?:\A|\n[ \t]*\n)[ \t]*" + re.escape(FINAL_ANSWER_HEADER))
_BLANK_LINE = re.compile(r"\n[ \t]*\n")
_BOXED_LENIENT = re.compile(r"\\boxed\s*\{")


def _after_cut(completion: str) -> str:
    _, think_end, after = completion.partition(THINK_END)
    return after if think_end else completion


def answer_step(completion: str) -> str | None:
    """The authors' answer step: the first ``"\\n\\n"``-separated piece after the thinking cut that
    starts with ``"**Final Answer**\\n"`` (header included), or None."""
    for piece in _after_cut(completion).split("\n\n"):
        if piece.startswith(ANSWER_STEP_HEADER):
            return piece
    return None


def _matched_box(text: str, start: int) -> str | None:
    """Content from ``start`` (just after an opening brace) to its matching ``}``, or None if unclosed."""
    depth = 1
    for index in range(start, len(text)):
        char = text[index]
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[start:index]
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{`` (exactly that spelling); None without one or when it is unclosed."""
    start = text.rfind(_BOXED_STRICT)
    if start < 0:
        return None
    return _matched_box(text, start + len(_BOXED_STRICT))


def strict_answer(completion: str) -> str | None:
    """The boxed answer under the authors' rule (stripped), or None (no answer step, no closed last box, empty)."""
    step = answer_step(completion)
    if step is None:
        return None
    boxed = last_boxed(step)
    if boxed is None:
        return None
    return boxed.strip() or None


def final_answer_paragraph(completion: str) -> str | None:
    """Lenient: the first paragraph after ``</think>`` that starts with ``**Final Answer**``, blank lines
    right after the header skipped; the text after the header, up to the next blank line."""
    text = _after_cut(completion)
    header = _HEADER.search(text)
    if header is None:
        return None
    body = text[header.end() :].lstrip()
    blank = _BLANK_LINE.search(body)
    return body if blank is None else body[: blank.start()]


def extract_boxed(text: str) -> str | None:
    """Lenient: the last *closed* ``\\boxed{...}`` (``\\boxed {`` too), falling back to earlier boxes."""
    for match in reversed(list(_BOXED_LENIENT.finditer(text))):
        content = _matched_box(text, match.end())
        if content is not None:
            return content.strip()
    return None


def final_answer(completion: str) -> str | None:
    """Lenient: the boxed answer of the final-answer paragraph, or None."""
    paragraph = final_answer_paragraph(completion)
    if paragraph is None:
        return None
    return extract_boxed(paragraph) or None


def has_valid_format(completion: str) -> bool:
    """The format rule read from text: exactly one ``</think>`` (the trainer counts token ids instead)."""
    return completion.count(THINK_END) == 1


def think_end_count(cut_thinking_ids: Sequence[int], inserted_ids: Sequence[int], summary_ids: Sequence[int],
                    think_end_id: int) -> int:  # fmt: skip
    """``</think>`` tokens in the cut thinking, the inserted delimiter and the summary (the format rule wants 1)."""
    return sum(
        1 for ids in (cut_thinking_ids, inserted_ids, summary_ids) for token in ids if int(token) == think_end_id
    )


def ended_with_eos(thinking_ids: Sequence[int], eos_token_ids: int | Sequence[int]) -> bool:
    """True when a thinking trace stopped at EOS (its last token is one of the EOS ids)."""
    eos = {int(eos_token_ids)} if isinstance(eos_token_ids, int) else {int(t) for t in eos_token_ids}
    return len(thinking_ids) > 0 and int(thinking_ids[-1]) in eos


def _flags(name: str, flags: Sequence[bool] | None, count: int) -> list[bool] | None:
    if flags is None:
        return None
    if len(flags) != count:
        raise ValueError(f"{name} has {len(flags)} flags for {count} completions; expected one per completion")
    return [bool(flag) for flag in flags]


def grade_completions(
    completions: Sequence[str],
    truths: Sequence[object],
    compare: CompareFn,
    *,
    format_ok: Sequence[bool] | None = None,
    eos_in_cut: Sequence[bool] | None = None,
    lenient: bool = False,
    extract: Callable[[str], str | None] | None = None,
) -> tuple[list[float], Metrics]:
    """Scores ``[B]`` in {0, 1} and metrics of completions under the reward rule.

    Args:
        completions: ``[B]`` decoded ``z[:c] + inserted + summary`` (EOS dropped).
        truths: ``[B]`` ground truths, already normalised by the reward.
        compare: the reward's comparison, called once with the extracted answers of the
            completions that pass the format rule and the ground truths they are graded against.
        format_ok: ``[B]`` the one-``</think>``-token rule from token ids (None: read from text).
        eos_in_cut: ``[B]`` the cut contains the trace's EOS (such a completion scores 0).
        lenient: the forgiving parser instead of the authors' rule.
        extract: a completion's answer (None: no answer) in place of both parsers (the authors'
            grader reads its own box, ``trainer.rewards.authors_grader.authors_answer``).
    """
    count = len(completions)
    if len(truths) != count:
        raise ValueError(f"got {count} completions and {len(truths)} answers; expected one answer each")
    for index, completion in enumerate(completions):
        if not isinstance(completion, str):
            raise TypeError(f"completions[{index}] is a {type(completion).__name__}; expected decoded text (str)")
    formatted = _flags("format_ok", format_ok, count) or [has_valid_format(c) for c in completions]
    eos_flags = _flags("eos_in_cut", eos_in_cut, count) or [False] * count
    extract = extract or (final_answer if lenient else strict_answer)
    boxed = [extract(completion) for completion in completions]
    graded = [i for i in range(count) if formatted[i] and not eos_flags[i] and boxed[i] is not None]
    scores = [0.0] * count
    metrics: Metrics = {}
    if graded:
        graded_scores, metrics = compare([boxed[i] for i in graded], [truths[i] for i in graded])
        for i, score in zip(graded, graded_scores, strict=True):
            scores[i] = float(score)
    total = max(count, 1)
    return scores, {
        "reward/mean": sum(scores) / total,
        "reward/format_ok": sum(formatted) / total,
        "reward/boxed": sum(box is not None for box in boxed) / total,
        "reward/eos_in_cut": sum(eos_flags) / total,
        **metrics,
    }
