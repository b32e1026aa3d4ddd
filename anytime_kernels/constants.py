"""Constants shared with the C++ ops: the Python mirror of ``csrc/constants.h`` (a test checks they agree)."""

import enum

# Label of a position whose next token is not trained (torch's cross-entropy convention).
IGNORE_INDEX = -100


class TokenKind(enum.IntEnum):
    """Kind of a packed token."""

    PROMPT = 0
    THINKING = 1
    INSERTED = 2
    SUMMARY = 3


# The outputs of pack_response_trees, in order.
PACKED_FIELDS = (
    "input_ids",
    "position_ids",
    "labels",
    "loss_mask",
    "cu_seqlens",
    "seq_ids",
    "token_kind",
    "slot",
    "summary_index",
    "prefix_end",
    "branch_start",
)
