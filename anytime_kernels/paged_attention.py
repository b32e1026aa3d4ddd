"""Attention over a paged KV pool (the rollout engine's decode and prefill): argument checks and dispatch.

The pool holds, per layer, ``key_cache`` and ``value_cache`` ``[num_blocks, block_size, Hkv, D]``
in the engine dtype; a token's slot is ``block * block_size + offset``; row b's block table lists
the physical block of each of its logical blocks, so rows that share a prefix share its blocks.

Backends (``backend=``): ``triton`` (CUDA; CPU tensors under ``TRITON_INTERPRET=1``), ``cpp``
(decode only: the compiled CPU op, which reads the pool in place), ``torch`` (vectorized gathers +
matmul/SDPA), ``reference`` (plain loops, for tests). ``auto`` is ``triton`` on CUDA; on the CPU it
is ``cpp`` for the decode (the rollout engine's hot path) and ``torch`` for the prefill and the write.

Checks. Types, shapes, dtypes and devices are checked before anything runs. Values (lengths,
block ids, slots) are checked only for CPU tensors, where reading them costs no sync, and only
with ``check_values=True`` (the default; a caller that builds them itself, like the rollout
engine, may skip the few tensor passes). On CUDA a check would be a host sync per call, which
neither the decode loop's budget nor a CUDA graph allows, so CUDA callers own their values. An
out-of-range block id or slot that is not checked is an out-of-bounds memory access.
"""

from __future__ import annotations

import itertools
import math

import torch

from anytime_kernels._extension import ops
from anytime_kernels.backends import resolve_backend
from anytime_kernels.paged_attention_reference import (
    paged_decode_attention_reference,
    paged_prefill_attention_reference,
    write_paged_kv_reference,
)
from anytime_kernels.paged_attention_torch import (
    paged_decode_attention_torch,
    paged_prefill_attention_torch,
    write_paged_kv_torch,
)

PAGED_BACKENDS = ("auto", "triton", "cpp", "torch", "reference")
_CACHE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_INDEX_DTYPES = (torch.int32, torch.int64)


def resolve_paged_backend(
    op: str,
    backend: str,
    device: torch.device,
    supports: tuple[str, ...] = ("triton", "torch", "reference"),
    dtype: torch.dtype | None = None,
) -> str:
    """The concrete backend of ``op`` for tensors on ``device`` (``backends.resolve_backend`` with ``torch``).

    ``supports`` lists the op's concrete backends; ``auto`` is triton on CUDA, else cpp where the op
    has it, else torch. float64 (the tests' exact models) runs on torch and reference only.
    """
    if dtype == torch.float64 and backend in ("triton", "cpp") and backend in supports:
        raise ValueError(f"{op}: backend {backend!r} takes float32/bfloat16/float16; float64 runs on torch")
    chosen = resolve_backend(op, backend, device, supports, names=PAGED_BACKENDS, host_order=("cpp", "torch"))
    return "torch" if dtype == torch.float64 and chosen in ("triton", "cpp") else chosen


def _check_tensor(op: str, name: str, value, dims: int, layout: str, dtypes: tuple[torch.dtype, ...]) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a tensor {layout}, got {type(value).__name__}")
    if value.dim() != dims:
        raise ValueError(f"{op}: {name} must have shape {layout}, got {tuple(value.shape)}")
    if value.dtype not in dtypes:
        raise ValueError(f"{op}: {name} must have dtype in {dtypes}, got {value.dtype}")


def _check_cache(op: str, key_cache, value_cache) -> None:
    layout = "[num_blocks, block_size, num_kv_heads, head_dim]"
    _check_tensor(op, "key_cache", key_cache, 4, layout, _CACHE_DTYPES)
    _check_tensor(op, "value_cache", value_cache, 4, layout, _CACHE_DTYPES)
    if value_cache.shape != key_cache.shape or value_cache.dtype != key_cache.dtype:
        raise ValueError(
            f"{op}: value_cache {tuple(value_cache.shape)} {value_cache.dtype} must match key_cache "
            f"{tuple(key_cache.shape)} {key_cache.dtype}"
        )
    if value_cache.device != key_cache.device:
        raise ValueError(f"{op}: value_cache is on {value_cache.device} but key_cache is on {key_cache.device}")
    if min(key_cache.shape) < 1:
        raise ValueError(f"{op}: key_cache must have every dimension >= 1, got {tuple(key_cache.shape)}")
    for name, cache in (("key_cache", key_cache), ("value_cache", value_cache)):
        if cache.stride(3) != 1:
            raise ValueError(f"{op}: {name} must be contiguous along head_dim, got strides {cache.stride()}")


def _check_same_device(op: str, reference: torch.Tensor, **tensors: torch.Tensor) -> None:
    for name, tensor in tensors.items():
        if tensor.device != reference.device:
            raise ValueError(f"{op}: {name} is on {tensor.device} but key_cache is on {reference.device}")


def _check_query(op: str, query, key_cache: torch.Tensor, layout: str) -> None:
    _check_tensor(op, "query", query, 3, layout, _CACHE_DTYPES)
    _, _, num_kv_heads, head_dim = key_cache.shape
    if query.dtype != key_cache.dtype:
        raise ValueError(f"{op}: query dtype {query.dtype} must match the cache dtype {key_cache.dtype}")
    if query.shape[2] != head_dim:
        raise ValueError(f"{op}: query head_dim {query.shape[2]} must match the cache head_dim {head_dim}")
    if query.shape[1] < 1 or query.shape[1] % num_kv_heads:
        raise ValueError(
            f"{op}: num_q_heads {query.shape[1]} must be a positive multiple of num_kv_heads {num_kv_heads}"
        )


def _check_scale(op: str, scale, head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, int | float) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"{op}: scale must be a finite float > 0 or None, got {scale!r}")
    return float(scale)


def _check_tables(op: str, block_tables, seq_lens, rows: int, key_cache: torch.Tensor, check_values: bool) -> None:
    _check_tensor(op, "block_tables", block_tables, 2, "[rows, max_blocks_per_row]", _INDEX_DTYPES)
    _check_tensor(op, "seq_lens", seq_lens, 1, "[rows]", _INDEX_DTYPES)
    if block_tables.shape[0] != rows or seq_lens.shape[0] != rows:
        raise ValueError(
            f"{op}: block_tables {tuple(block_tables.shape)} and seq_lens {tuple(seq_lens.shape)} must both have "
            f"{rows} rows (one per query row / request)"
        )
    _check_same_device(op, key_cache, block_tables=block_tables, seq_lens=seq_lens)
    if not check_values or key_cache.device.type != "cpu" or rows == 0:
        return
    num_blocks, block_size = key_cache.shape[:2]
    capacity = block_tables.shape[1] * block_size
    bad = (seq_lens < 0) | (seq_lens > capacity)
    if bool(bad.any()):
        row = int(bad.nonzero()[0])
        raise ValueError(
            f"{op}: seq_lens[{row}] = {int(seq_lens[row])} must be in [0, {capacity}] "
            f"(max_blocks_per_row {block_tables.shape[1]} x block_size {block_size})"
        )
    used = torch.arange(block_tables.shape[1])[None, :] * block_size < seq_lens[:, None]
    bad = used & ((block_tables < 0) | (block_tables >= num_blocks))
    if bool(bad.any()):
        row, column = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"{op}: block_tables[{row}, {column}] = {int(block_tables[row, column])} is used by a row of length "
            f"{int(seq_lens[row])} and must be a block id in [0, {num_blocks})"
        )


def write_paged_kv(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    backend: str = "auto",
    check_values: bool = True,
) -> None:
    """Write T tokens' keys and values into their pool slots, in place.

    Args:
        key_cache, value_cache: ``[num_blocks, block_size, Hkv, D]`` pool of one layer.
        keys, values: ``[T, Hkv, D]`` in the pool's dtype, on its device.
        slot_mapping: ``[T]`` int32/int64 slot ``block * block_size + offset`` of each token; slots < 0
            are skipped (the padding rows of a CUDA-graph bucket). Valid slots must be distinct.
        backend: ``auto`` (triton on CUDA: graph-safe; torch on the CPU), ``triton``, ``torch``
            (on CUDA it drops the -1 slots with a host sync), ``reference``.
        check_values: on CPU tensors, check that valid slots are in range and distinct.
    """
    op = "write_paged_kv"
    _check_cache(op, key_cache, value_cache)
    _, _, num_kv_heads, head_dim = key_cache.shape
    for name, tensor in (("keys", keys), ("values", values)):
        _check_tensor(op, name, tensor, 3, "[T, num_kv_heads, head_dim]", _CACHE_DTYPES)
        if tensor.shape[1:] != (num_kv_heads, head_dim) or tensor.dtype != key_cache.dtype:
            raise ValueError(
                f"{op}: {name} must be [T, {num_kv_heads}, {head_dim}] in {key_cache.dtype} like the cache, got "
                f"{tuple(tensor.shape)} {tensor.dtype}"
            )
    _check_tensor(op, "slot_mapping", slot_mapping, 1, "[T]", _INDEX_DTYPES)
    if values.shape[0] != keys.shape[0] or slot_mapping.shape[0] != keys.shape[0]:
        raise ValueError(
            f"{op}: keys {tuple(keys.shape)}, values {tuple(values.shape)} and slot_mapping "
            f"{tuple(slot_mapping.shape)} must have the same T"
        )
    _check_same_device(op, key_cache, keys=keys, values=values, slot_mapping=slot_mapping)
    if check_values and key_cache.device.type == "cpu":
        num_slots = key_cache.shape[0] * key_cache.shape[1]
        too_big = slot_mapping >= num_slots
        if bool(too_big.any()):
            token = int(too_big.nonzero()[0])
            raise ValueError(
                f"{op}: slot_mapping[{token}] = {int(slot_mapping[token])} must be < num_blocks x block_size = "
                f"{num_slots} (or < 0 to skip the token)"
            )
        written = slot_mapping[slot_mapping >= 0]
        if written.unique().numel() != written.numel():
            raise ValueError(f"{op}: slot_mapping writes some slot twice: {written.tolist()}")
    chosen = resolve_paged_backend(op, backend, key_cache.device, dtype=key_cache.dtype)
    if keys.shape[0] == 0:
        return
    if chosen == "reference":
        write_paged_kv_reference(key_cache, value_cache, keys, values, slot_mapping)
    elif chosen == "torch":
        write_paged_kv_torch(key_cache, value_cache, keys, values, slot_mapping)
    else:
        from anytime_kernels.paged_attention_triton import write_paged_kv_triton

        write_paged_kv_triton(key_cache, value_cache, keys, values, slot_mapping)


def paged_decode_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    scale: float | None = None,
    num_splits: int | None = None,
    return_lse: bool = False,
    backend: str = "auto",
    check_values: bool = True,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """One new token per row attends to its row's first ``seq_lens[b]`` positions through the block table.

    Args:
        query: ``[B, Hq, D]``, the new token of each row (its K/V already written to the pool).
        key_cache, value_cache: ``[num_blocks, block_size, Hkv, D]`` in the query's dtype; query head h
            reads kv head ``h // (Hq // Hkv)``.
        block_tables: ``[B, max_blocks_per_row]`` int32/int64; entries past a row's length are never read.
        seq_lens: ``[B]`` int32/int64 keys per row (including the current token); 0 (a padding row)
            gives a zero output and LSE -inf.
        scale: multiplies ``q . k``; default ``1 / sqrt(D)``.
        num_splits: split-K count of the Triton kernel (default: from the shapes only, so a captured
            CUDA graph stays valid); the result does not depend on it beyond rounding.
        return_lse: also return the natural-log LSE of ``scale * q . k`` over each row's keys.
        backend: ``auto``, ``triton``, ``cpp``, ``torch`` or ``reference``.
        check_values: on CPU tensors, check ``seq_lens`` against the table width and the block ids a
            row reads against the pool.

    Returns:
        ``out [B, Hq, D]`` in the query dtype, and ``lse [B, Hq]`` fp32 when ``return_lse``.
    """
    op = "paged_decode_attention"
    _check_cache(op, key_cache, value_cache)
    _check_query(op, query, key_cache, "[B, num_q_heads, head_dim]")
    _check_same_device(op, key_cache, query=query)
    _check_tables(op, block_tables, seq_lens, query.shape[0], key_cache, check_values)
    scale = _check_scale(op, scale, key_cache.shape[3])
    if num_splits is not None and (isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 1):
        raise ValueError(f"{op}: num_splits must be an int >= 1 or None, got {num_splits!r}")
    chosen = resolve_paged_backend(
        op, backend, key_cache.device, ("triton", "cpp", "torch", "reference"), dtype=key_cache.dtype
    )
    args = (query, key_cache, value_cache, block_tables, seq_lens, scale)
    if chosen == "reference":
        out, lse = paged_decode_attention_reference(*args)
    elif chosen == "cpp":
        out, lse = ops.paged_decode_attention(*args)
    elif chosen == "torch":
        out, lse = paged_decode_attention_torch(*args)
    else:
        from anytime_kernels.paged_attention_triton import paged_decode_attention_triton

        out, lse = paged_decode_attention_triton(*args, num_splits=num_splits)
    return (out, lse) if return_lse else out


def _check_query_start_loc(
    op: str, query_start_loc, seq_lens: torch.Tensor, num_tokens: int, key_cache: torch.Tensor, check_values: bool
) -> None:
    _check_tensor(op, "query_start_loc", query_start_loc, 1, "[R + 1]", _INDEX_DTYPES)
    num_requests = seq_lens.shape[0]
    if query_start_loc.shape[0] != num_requests + 1:
        raise ValueError(
            f"{op}: query_start_loc must have R + 1 = {num_requests + 1} entries, got {query_start_loc.shape[0]}"
        )
    _check_same_device(op, key_cache, query_start_loc=query_start_loc)
    if not check_values or query_start_loc.device.type != "cpu":
        return
    starts = query_start_loc.tolist()
    if starts[0] != 0 or starts[-1] != num_tokens or any(b < a for a, b in itertools.pairwise(starts)):
        raise ValueError(f"{op}: query_start_loc must rise from 0 to T = {num_tokens} without decreasing, got {starts}")
    for request, (first, last, length) in enumerate(zip(starts[:-1], starts[1:], seq_lens.tolist(), strict=True)):
        if last - first > length:
            raise ValueError(
                f"{op}: request {request} has {last - first} new tokens but seq_lens[{request}] = {length}; the "
                f"context must include the new tokens"
            )


def paged_prefill_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    *,
    scale: float | None = None,
    backend: str = "auto",
    check_values: bool = True,
) -> torch.Tensor:
    """New tokens of R requests (packed) attend causally over their request's cached prefix and themselves.

    Args:
        query: ``[T, Hq, D]``; request r's new tokens are ``query[query_start_loc[r]:query_start_loc[r + 1]]``.
        key_cache, value_cache: ``[num_blocks, block_size, Hkv, D]``, the new tokens' K/V already written.
        block_tables: ``[R, max_blocks_per_row]`` int32/int64.
        seq_lens: ``[R]`` int32/int64 context after the new tokens (cached prefix + new); new token i of
            request r sits at position ``seq_lens[r] - q_len_r + i`` and sees positions up to its own.
        query_start_loc: ``[R + 1]`` int32/int64 cumulative new-token counts, from 0 to T.
        scale: multiplies ``q . k``; default ``1 / sqrt(D)``.
        backend: ``auto``, ``triton``, ``torch`` or ``reference``.
        check_values: on CPU tensors, check ``query_start_loc``, ``seq_lens`` and the block ids read.

    Returns:
        ``out [T, Hq, D]`` in the query dtype.
    """
    op = "paged_prefill_attention"
    _check_cache(op, key_cache, value_cache)
    _check_query(op, query, key_cache, "[T, num_q_heads, head_dim]")
    _check_same_device(op, key_cache, query=query)
    _check_tensor(op, "seq_lens", seq_lens, 1, "[R]", _INDEX_DTYPES)
    _check_tables(op, block_tables, seq_lens, seq_lens.shape[0], key_cache, check_values)
    _check_query_start_loc(op, query_start_loc, seq_lens, query.shape[0], key_cache, check_values)
    scale = _check_scale(op, scale, key_cache.shape[3])
    chosen = resolve_paged_backend(op, backend, key_cache.device, dtype=key_cache.dtype)
    args = (query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, scale)
    if chosen == "reference":
        return paged_prefill_attention_reference(*args)
    if chosen == "torch":
        return paged_prefill_attention_torch(*args)
    from anytime_kernels.paged_attention_triton import paged_prefill_attention_triton

    return paged_prefill_attention_triton(*args)
