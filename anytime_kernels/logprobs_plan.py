"""How the Triton log-probs paths cut their work: row blocks, vocabulary chunks, the tile budget, and
the power-of-two scale that keeps fp16 gradient tiles out of the subnormal range.

Both paths (``logprobs_triton``, ``logprobs_epilogue``) take rows in blocks and, in the backward
(and the cuBLAS path's forward), the vocabulary in chunks; one (row block x chunk) tile of
``dL/dlogits`` in the input dtype (plus the fp32 logits on the cuBLAS path) is the memory the
op adds beyond ``O(M)`` statistics, the fp32 ``[M, H]`` gradient of the hidden states and one fp32
``[chunk, H]`` buffer of the LM head's gradient. ``plan`` keeps that tile within the budget
(``tile_bytes``): chunks are at least ``MIN_CHUNK`` wide (a wide GEMM N) and the rows of a block
shrink when the budget cannot hold ``ROW_BLOCK`` rows of them.
"""

from __future__ import annotations

import itertools
import math
import os

import torch

# Bytes of one (row block x vocabulary chunk) tile: fp32 logits (cuBLAS path) plus their gradient in the input dtype.
CHUNK_BYTES = 768 * 2**20
# Rows per block at most: bounds the tile whatever the number of tokens.
ROW_BLOCK = 16384
# Narrowest vocabulary chunk (a wide GEMM N and few masked lanes), unless the vocabulary or the budget is smaller.
MIN_CHUNK = 4096
# fp16 gradient tiles are scaled so their largest possible entry is about this (fp16's largest finite is 65504).
FP16_GRADIENT_PEAK = 2.0**14


def tile_bytes() -> int:
    """The tile budget in bytes: ``ANYTIME_LOGPROBS_TILE_MB`` (MiB, > 0) when set, else CHUNK_BYTES.

    Read when a forward starts; its backward keeps the same budget (``logprobs._backend_module``).
    """
    value = os.environ.get("ANYTIME_LOGPROBS_TILE_MB", "").strip()
    if not value:
        return CHUNK_BYTES
    try:
        megabytes = float(value)
    except ValueError:
        megabytes = float("nan")
    if not megabytes > 0 or megabytes == float("inf"):
        raise ValueError(f"ANYTIME_LOGPROBS_TILE_MB must be a number of MiB > 0, got {value!r}")
    return int(megabytes * 2**20)


def row_blocks(num_rows: int, max_rows: int | None = None) -> list[tuple[int, int]]:
    """``[start, end)`` of balanced row blocks of at most ``max_rows`` (default ROW_BLOCK) rows.

    Balanced: 16385 rows give two blocks of 8193 and 8192, not 16384 and a 1-row block that would
    pay a launch (and a narrow GEMM) per vocabulary chunk for one row.
    """
    max_rows = ROW_BLOCK if max_rows is None else max_rows
    if num_rows <= 0:
        return []
    count = -(-num_rows // max(max_rows, 1))
    size, longer = divmod(num_rows, count)  # the first ``longer`` blocks take one row more
    starts = [index * size + min(index, longer) for index in range(count + 1)]
    return list(itertools.pairwise(starts))


def _floor_power_of_two(value: int) -> int:
    return 1 << (max(value, 1).bit_length() - 1)


def plan(
    num_rows: int, vocab: int, element_size: int, budget: int | None = None, stores_logits: bool = True
) -> tuple[list[tuple[int, int]], int]:
    """Row blocks and the vocabulary chunk width whose tile fits ``budget`` bytes (default ``tile_bytes()``).

    A tile element costs its fp32 logit (unless ``stores_logits`` is False: the epilogue path keeps
    logits in registers) plus its gradient in the input dtype. The chunk is the whole vocabulary
    when it fits, else a power of two (the autotuning keys take a handful of values however M
    varies) of at least ``MIN_CHUNK``; a budget too small for ``ROW_BLOCK`` rows of ``MIN_CHUNK``
    columns gets fewer rows per block. Only a budget below one row of ``MIN_CHUNK`` columns narrows
    the chunk further; ``rows x chunk x bytes <= budget`` always holds (down to one 1-column tile).

    Returns:
        ``(row_blocks, chunk_vocab)``: balanced ``[start, end)`` blocks (empty for no rows) and the width.
    """
    budget = tile_bytes() if budget is None else budget
    per_element = (4 if stores_logits else 0) + element_size
    narrowest = min(vocab, MIN_CHUNK)
    max_rows = max(1, min(max(num_rows, 1), ROW_BLOCK, budget // (narrowest * per_element)))
    blocks = row_blocks(num_rows, max_rows)
    rows = max((end - start for start, end in blocks), default=max_rows)
    columns = budget // (rows * per_element)
    chunk = vocab if columns >= vocab else _floor_power_of_two(columns)
    return blocks, chunk


def gradient_scale(
    grad_logprobs: torch.Tensor, grad_entropy: torch.Tensor | None, vocab: int, temperature: float
) -> torch.Tensor:
    """0-d fp32 power of two ``c`` for fp16 gradient tiles, on the device, with no host sync.

    ``dL/dlogits = (g_lp * (onehot - p) - g_ent * p * (z - mean_z)) / T`` has entries of size
    ``|g| * p``: with a token-sum-norm upstream gradient (1/16384 per token) and p ~ 1/V they lie
    below fp16's smallest subnormal (6e-8) and round to zero. The tile is linear in ``(g_lp,
    g_ent)``, so the backward scales both by ``c`` and divides the fp32 accumulations by ``c``
    (exact: a power of two). Each entry is at most ``(|g_lp| + |g_ent| * (log V + 1)) / T``
    (``p |z - mean_z| <= max(1/e, entropy)`` and the entropy is at most log V), so ``c`` puts the
    largest row's bound near ``FP16_GRADIENT_PEAK``.

    Args:
        grad_logprobs: ``[M]`` fp32, M > 0. grad_entropy: ``[M]`` fp32 or None.
    """
    bound = grad_logprobs.abs()
    if grad_entropy is not None:
        bound = bound + grad_entropy.abs() * (math.log(vocab) + 1.0)
    peak = bound.max() / temperature
    # An all-zero gradient gives log2(inf): any finite scale serves; the clamp also keeps c finite in fp32.
    exponent = torch.floor(torch.log2(FP16_GRADIENT_PEAK / peak)).clamp(-100.0, 100.0)
    return torch.exp2(exponent)
