"""The reward rule's text side: the format rule and the boxed answer of the final-answer paragraph.

ARCHITECTURE.md: a summary scores 1 when the ``\\boxed{}`` answer in the paragraph that starts with
``**Final Answer**`` matches the ground truth (no box: wrong) and the sequence (thinking + inserted
delimiter + summary) holds exactly one ``</think>``; a trace that ended with EOS instead of closing
its thinking scores 0 at every cut. Everything here is plain string work, cheap enough to run in the
trainer process before the costly grading is shipped to the pool.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

THINK_END = "</think>"
FINAL_ANSWER_HEADER = "**Final Answer**"

# A paragraph starts at the beginning of the text or after a blank line.
_HEADER = re.compile(r"(?:\A|\n[ \t]*\n)[ \t]*" + re.escape(FINAL_ANSWER_HEADER))
_BLANK_LINE = re.compile(r"\n[ \t]*\n")
_BOXED = re.compile(r"\\boxed\s*\{")


def has_valid_format(completion: str) -> bool:
    """The format rule: the completion (thinking + inserted delimiter + summary) holds exactly one ``</think>``."""
    return completion.count(THINK_END) == 1


def final_answer_paragraph(completion: str) -> str | None:
    """The first paragraph after ``</think>`` (or in the whole text without one) that starts with ``**Final Answer**``.

    The paragraph runs from the header to the next blank line; blank lines right after the header
    are skipped, so ``**Final Answer**\\n\\n\\boxed{5}`` still counts. Returns the text after the header.
    """
    _, think_end, after = completion.partition(THINK_END)
    text = after if think_end else completion
    header = _HEADER.search(text)
    if header is None:
        return None
    body = text[header.end() :].lstrip()
    blank = _BLANK_LINE.search(body)
    return body if blank is None else body[: blank.start()]


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` in ``text`` with nested braces matched; None without a closed box."""
    matches = list(_BOXED.finditer(text))
    for match in reversed(matches):
        depth = 1
        for index in range(match.end(), len(text)):
            char = text[index]
            if char == "{":
                depth += 1
            elif char == "}":
                depth -= 1
                if depth == 0:
                    return text[match.end() : index].strip()
    return None


def final_answer(completion: str) -> str | None:
    """The boxed answer of the final-answer paragraph, or None (no paragraph, no box, or an empty box)."""
    paragraph = final_answer_paragraph(completion)
    if paragraph is None:
        return None
    boxed = extract_boxed(paragraph)
    return boxed or None


def zero_eos_ended(scores: Sequence[float], eos_ended: Sequence[bool] | None) -> list[float]:
    """Scores with every EOS-ended trace set to 0 (``eos_ended[i]``: trace i stopped at EOS, not ``</think>``)."""
    if eos_ended is None:
        return [float(score) for score in scores]
    if len(eos_ended) != len(scores):
        raise ValueError(f"eos_ended has {len(eos_ended)} flags for {len(scores)} scores; expected one per completion")
    return [0.0 if ended else float(score) for score, ended in zip(scores, eos_ended, strict=True)]


def ended_with_eos(thinking_ids: Sequence[int], eos_token_id: int) -> bool:
    """True when a thinking trace stopped at EOS instead of closing its thinking (its last token is EOS)."""
    return len(thinking_ids) > 0 and int(thinking_ids[-1]) == int(eos_token_id)
