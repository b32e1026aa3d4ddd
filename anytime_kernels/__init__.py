"""Kernels for anytime reasoning: response-tree packing, fused log-probs, BRPO advantages.

Every op has a public function here that checks its arguments and dispatches to a Triton kernel
(CUDA), the compiled C++ op (CPU) or a pure-torch reference (``backend=`` forces one).
"""

from anytime_kernels.advantages import (
    AdvantageStats,
    advantage_stats,
    brpo_advantages,
    token_advantages,
)
from anytime_kernels.constants import IGNORE_INDEX, TokenKind
from anytime_kernels.logprobs import fused_logprobs
from anytime_kernels.paged_attention import paged_decode_attention, paged_prefill_attention, write_paged_kv
from anytime_kernels.tree import (
    ResponseTreeLayout,
    pack_response_trees,
    tree_mask_mod,
)

__all__ = [
    "IGNORE_INDEX",
    "AdvantageStats",
    "ResponseTreeLayout",
    "TokenKind",
    "advantage_stats",
    "brpo_advantages",
    "fused_logprobs",
    "pack_response_trees",
    "paged_decode_attention",
    "paged_prefill_attention",
    "token_advantages",
    "tree_mask_mod",
    "write_paged_kv",
]
__version__ = "0.1.0"
