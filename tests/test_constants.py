"""The constants of the C++ ops (csrc/constants.h) and their Python mirror agree."""

import re
from pathlib import Path

from anytime_kernels.constants import IGNORE_INDEX, PACKED_FIELDS, TokenKind

HEADER = (Path(__file__).resolve().parent.parent / "csrc" / "constants.h").read_text()


def constant(name: str) -> int:
    match = re.search(rf"constexpr int\d+_t {name} = (-?\d+);", HEADER)
    assert match is not None, f"{name} is not declared in csrc/constants.h"
    return int(match.group(1))


def test_ignore_index_and_token_kinds_agree():
    assert constant("kIgnoreIndex") == IGNORE_INDEX
    for kind in TokenKind:
        assert constant("k" + kind.name.title()) == int(kind), kind.name
    assert len(re.findall(r"constexpr int8_t k\w+ = ", HEADER)) == len(TokenKind)


def test_packed_field_order_agrees():
    block = re.search(r"kPackedFields\[\] = \{(.*?)\};", HEADER, re.DOTALL).group(1)
    assert tuple(re.findall(r'"(\w+)"', block)) == PACKED_FIELDS
