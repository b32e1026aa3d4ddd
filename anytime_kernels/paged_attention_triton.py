"""Triton kernels of the paged attention (definitions: ``paged_attention_reference``).

``_decode_split_kernel`` (flash-decoding): grid (row, kv head, split). A row's blocks are cut into
``num_splits`` contiguous ranges; each program walks its range ``BLOCK_N`` keys at a time, reading
each key's physical block from the block table, and holds all ``Hq / Hkv`` query heads of its KV
head as the rows of one ``[BLOCK_G, D]`` tile (padded with masked rows to at least 16, the MMA
minimum), so each K/V tile is loaded once for the whole group. Scores, the running max and sum
and the output accumulate in fp32 (online softmax, base 2). With one split the program writes the
output and the LSE itself; otherwise it writes its normalised partial output and LSE, and
``_merge_splits_kernel`` (grid (row, q head)) combines the splits by log-sum-exp.

``_prefill_kernel``: grid (query block, request, kv head). The tile's rows are (new token, query
head of the group) pairs, ``BLOCK_M // G`` tokens per program, so GQA wastes no rows; keys run from
position 0 (the cached prefix, read through the block table) to the program's last token, masked
causally. Programs past a request's new tokens return at once: on CUDA the grid is sized from T,
not from the longest request, so the launch reads nothing on the host.

``_write_kv_kernel``: one program per token copies its K and V rows into their slot; slot < 0
writes nothing.

No launch syncs with the host: each is CUDA-graph capturable given fixed shapes and a
``num_splits`` derived from shapes (``default_num_splits``). No autotuning either (it would time
configs at the first call, inside a capture if that came first). fp32 pools multiply in fp32
(``ieee``), 16-bit ones on tensor cores. Under ``TRITON_INTERPRET=1`` 16-bit tiles are upcast to
fp32 before ``tl.dot`` (the interpreter's bf16 dot is wrong). Inputs are validated by
``anytime_kernels.paged_attention``.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from anytime_kernels._interpreter import INTERPRET as _INTERPRET
from anytime_kernels._interpreter import LAUNCH_OPTIONS, patch_interpreter

# Programs per SM the default split count aims for (decode is bandwidth-bound: keep every SM busy).
PROGRAMS_PER_SM = 2
# Fewest keys worth a split of their own, and the most splits (bounds the partials and the merge).
MIN_KEYS_PER_SPLIT = 256
MAX_SPLITS = 32
KEY_TILE_BYTES = 8192
LOG2_E = 1.0 / math.log(2.0)
LN_2 = tl.constexpr(math.log(2.0))
patch_interpreter()


@functools.cache
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def default_num_splits(batch: int, num_kv_heads: int, max_blocks_per_row: int, block_size: int, device) -> int:
    """Split-K count from shapes alone: enough programs to fill the GPU, at least ``MIN_KEYS_PER_SPLIT`` keys each."""
    device = torch.device(device)
    processors = _multiprocessors(device.index or 0) if device.type == "cuda" else 4
    wanted = -(-PROGRAMS_PER_SM * processors // max(1, batch * num_kv_heads))
    useful = max(1, max_blocks_per_row * block_size // MIN_KEYS_PER_SPLIT)
    return max(1, min(wanted, useful, MAX_SPLITS))


@triton.jit
def _write_kv_kernel(
    key_cache_ptr, value_cache_ptr, keys_ptr, values_ptr, slot_mapping_ptr,
    stride_cache_block, stride_cache_token, stride_cache_head, stride_src_token, stride_src_head, block_size,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot >= 0:
        heads = tl.arange(0, BLOCK_H)
        dims = tl.arange(0, BLOCK_D)
        mask = (heads < NUM_KV_HEADS)[:, None] & (dims < HEAD_DIM)[None, :]
        source = token * stride_src_token + heads[:, None] * stride_src_head + dims[None, :]
        block = slot // block_size
        target = (
            block * stride_cache_block
            + (slot - block * block_size) * stride_cache_token
            + heads[:, None] * stride_cache_head
            + dims[None, :]
        )
        tl.store(key_cache_ptr + target, tl.load(keys_ptr + source, mask=mask), mask=mask)
        tl.store(value_cache_ptr + target, tl.load(values_ptr + source, mask=mask), mask=mask)


@triton.jit
def _attend_tile(
    q, m_i, l_i, acc, key_cache_ptr, value_cache_ptr, table_row_ptr, positions, in_range, visible, dims, dims_ok,
    kv_head, stride_cache_block, stride_cache_token, stride_cache_head, block_size, scale_log2,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """One online-softmax step of ``q [BM, BD]`` over the keys at ``positions [BN]``.

    Only keys with ``in_range [BN]`` are read; row i sees key j where ``visible [BM, BN]`` is True.
    """
    block = tl.load(table_row_ptr + positions // block_size, mask=in_range, other=0).to(tl.int64)
    offsets = (
        block * stride_cache_block + (positions - (positions // block_size) * block_size) * stride_cache_token
    ) + kv_head * stride_cache_head
    kv_mask = in_range[:, None] & dims_ok[None, :]
    keys = tl.load(key_cache_ptr + offsets[:, None] + dims[None, :], mask=kv_mask, other=0.0)  # [BN, BD]
    values = tl.load(value_cache_ptr + offsets[:, None] + dims[None, :], mask=kv_mask, other=0.0)
    if UPCAST:
        keys = keys.to(tl.float32)
        values = values.to(tl.float32)
    scores = tl.dot(q, tl.trans(keys), input_precision=PRECISION) * scale_log2  # [BM, BN], log2 units
    scores = tl.where(visible, scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    # A row that has seen no key yet keeps max -inf; subtract 0 there instead (exp2(-inf) = 0, no NaN).
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    probs = tl.exp2(scores - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(probs, axis=1)
    acc = acc * alpha[:, None] + tl.dot(probs.to(values.dtype), values, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def _decode_split_kernel(
    query_ptr, key_cache_ptr, value_cache_ptr, block_tables_ptr, seq_lens_ptr, out_ptr, lse_ptr,
    stride_q_row, stride_q_head, stride_cache_block, stride_cache_token, stride_cache_head, stride_table_row,
    scale_log2, block_size, num_splits,
    NUM_Q_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    SINGLE_SPLIT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Attention of one row's query heads of one KV head over one split of the row's blocks."""
    row = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + row)
    blocks_per_split = tl.cdiv(tl.cdiv(seq_len, block_size), num_splits)
    start = split * blocks_per_split * block_size
    end = tl.minimum(start + blocks_per_split * block_size, seq_len)

    group = tl.arange(0, BLOCK_G)
    dims = tl.arange(0, BLOCK_D)
    group_ok = group < GROUP
    dims_ok = dims < HEAD_DIM
    heads = kv_head * GROUP + group
    q_mask = group_ok[:, None] & dims_ok[None, :]
    q = tl.load(query_ptr + row * stride_q_row + heads[:, None] * stride_q_head + dims[None, :], mask=q_mask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    table_row_ptr = block_tables_ptr + row * stride_table_row
    for first in range(start, end, BLOCK_N):
        positions = first + tl.arange(0, BLOCK_N)
        in_range = positions < end
        visible = tl.broadcast_to(in_range[None, :], (BLOCK_G, BLOCK_N))
        m_i, l_i, acc = _attend_tile(
            q, m_i, l_i, acc, key_cache_ptr, value_cache_ptr, table_row_ptr, positions, in_range, visible, dims,
            dims_ok, kv_head, stride_cache_block, stride_cache_token, stride_cache_head, block_size, scale_log2,
            UPCAST, PRECISION,
        )  # fmt: skip

    # An empty split (or a padding row) has l = 0: output 0, LSE -inf.
    has_keys = l_i > 0.0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    lse = tl.where(has_keys, (m_i + tl.log2(tl.where(has_keys, l_i, 1.0))) * LN_2, float("-inf"))
    row_head = row * NUM_Q_HEADS + heads  # [BG]
    if SINGLE_SPLIT:
        tl.store(out_ptr + row_head[:, None] * HEAD_DIM + dims[None, :], out.to(out_ptr.dtype.element_ty), mask=q_mask)
        tl.store(lse_ptr + row_head, lse, mask=group_ok)
    else:
        part = row_head * num_splits + split
        tl.store(out_ptr + part[:, None] * HEAD_DIM + dims[None, :], out, mask=q_mask)
        tl.store(lse_ptr + part, lse, mask=group_ok)


@triton.jit
def _merge_splits_kernel(
    part_out_ptr, part_lse_ptr, out_ptr, lse_ptr, num_splits,
    NUM_Q_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """out = sum_s exp(lse_s - lse) out_s with lse = log sum_s exp(lse_s), for one (row, query head)."""
    row_head = tl.program_id(0).to(tl.int64) * NUM_Q_HEADS + tl.program_id(1)
    splits = tl.arange(0, BLOCK_S)
    dims = tl.arange(0, BLOCK_D)
    splits_ok = splits < num_splits
    part = row_head * num_splits + splits
    part_lse = tl.load(part_lse_ptr + part, mask=splits_ok, other=float("-inf"))
    top = tl.max(part_lse, axis=0)
    top_safe = tl.where(top == float("-inf"), 0.0, top)
    weights = tl.exp(part_lse - top_safe)  # 0 for empty splits
    total = tl.sum(weights, axis=0)
    mask = splits_ok[:, None] & (dims < HEAD_DIM)[None, :]
    parts = tl.load(part_out_ptr + part[:, None] * HEAD_DIM + dims[None, :], mask=mask, other=0.0)
    out = tl.sum(weights[:, None] * parts, axis=0) / tl.where(total > 0.0, total, 1.0)
    tl.store(out_ptr + row_head * HEAD_DIM + dims, out.to(out_ptr.dtype.element_ty), mask=dims < HEAD_DIM)
    tl.store(lse_ptr + row_head, tl.where(total > 0.0, top_safe + tl.log(tl.where(total > 0.0, total, 1.0)), top))


@triton.jit
def _prefill_kernel(
    query_ptr, key_cache_ptr, value_cache_ptr, block_tables_ptr, seq_lens_ptr, query_start_loc_ptr, out_ptr,
    stride_q_token, stride_q_head, stride_cache_block, stride_cache_token, stride_cache_head, stride_table_row,
    scale_log2, block_size,
    NUM_Q_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, TOKENS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """``TOKENS`` new tokens of one request, the query heads of one KV head, causal over the request's keys."""
    request = tl.program_id(1).to(tl.int64)
    kv_head = tl.program_id(2)
    query_start = tl.load(query_start_loc_ptr + request).to(tl.int64)
    query_len = (tl.load(query_start_loc_ptr + request + 1) - query_start).to(tl.int32)
    first_token = tl.program_id(0) * TOKENS
    if first_token < query_len:
        seq_len = tl.load(seq_lens_ptr + request)
        context_start = seq_len - query_len
        rows = tl.arange(0, BLOCK_M)
        dims = tl.arange(0, BLOCK_D)
        dims_ok = dims < HEAD_DIM
        tokens = first_token + rows // GROUP
        heads = kv_head * GROUP + rows % GROUP
        rows_ok = (rows < TOKENS * GROUP) & (tokens < query_len)
        q_mask = rows_ok[:, None] & dims_ok[None, :]
        q_offsets = (query_start + tokens)[:, None] * stride_q_token + heads[:, None] * stride_q_head + dims[None, :]
        q = tl.load(query_ptr + q_offsets, mask=q_mask, other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        query_positions = tl.where(rows_ok, context_start + tokens, -1)  # [BM]; a masked row sees no key
        end = tl.minimum(context_start + first_token + TOKENS, seq_len)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        table_row_ptr = block_tables_ptr + request * stride_table_row
        for first in range(0, end, BLOCK_N):
            positions = first + tl.arange(0, BLOCK_N)
            in_range = positions < end
            visible = (positions[None, :] <= query_positions[:, None]) & in_range[None, :]
            m_i, l_i, acc = _attend_tile(
                q, m_i, l_i, acc, key_cache_ptr, value_cache_ptr, table_row_ptr, positions, in_range, visible, dims,
                dims_ok, kv_head, stride_cache_block, stride_cache_token, stride_cache_head, block_size, scale_log2,
                UPCAST, PRECISION,
            )  # fmt: skip
        out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
        out_offsets = ((query_start + tokens) * NUM_Q_HEADS + heads)[:, None] * HEAD_DIM + dims[None, :]
        tl.store(out_ptr + out_offsets, out.to(out_ptr.dtype.element_ty), mask=q_mask)


def _precision(dtype: torch.dtype) -> str:
    # fp32 pools get fp32 products (TF32 would cost ~1e-3 relative error for no gain: decode is bandwidth-bound).
    return "ieee" if dtype == torch.float32 else "tf32"


def _key_tile(head_dim: int, dtype: torch.dtype) -> int:
    """Keys per loop step: 8 KiB of K per tile (64 bf16 keys of head_dim 64), so that the K and V
    tiles of a step stay in registers on sm_90 (no spills: ``tests/fixtures/compile_sm90_paged.py``)."""
    row_bytes = triton.next_power_of_2(head_dim) * dtype.itemsize
    return min(64, max(16, KEY_TILE_BYTES // row_bytes))


def write_paged_kv_triton(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """``keys``, ``values`` ``[T, Hkv, D]`` into the pool at ``slot_mapping [T]`` (slots < 0 skipped), in place."""
    num_tokens, num_kv_heads, head_dim = keys.shape
    keys = keys.contiguous()
    values = values.contiguous()
    _write_kv_kernel[(num_tokens,)](
        key_cache, value_cache, keys, values, slot_mapping.contiguous(),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2), keys.stride(0), keys.stride(1),
        key_cache.shape[1],
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
        BLOCK_H=triton.next_power_of_2(num_kv_heads), BLOCK_D=triton.next_power_of_2(head_dim),
        **LAUNCH_OPTIONS,
    )  # fmt: skip


def paged_decode_attention_triton(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    num_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``query [B, Hq, D]`` -> ``(out [B, Hq, D] in the query dtype, lse [B, Hq] fp32)``; see ``paged_attention``."""
    batch, num_q_heads, head_dim = query.shape
    _, block_size, num_kv_heads, _ = key_cache.shape
    group = num_q_heads // num_kv_heads
    if num_splits is None:
        num_splits = default_num_splits(batch, num_kv_heads, block_tables.shape[1], block_size, query.device)
    query = query.contiguous()
    block_tables = block_tables.contiguous()
    out = torch.empty_like(query)
    lse = torch.empty(batch, num_q_heads, dtype=torch.float32, device=query.device)
    if batch == 0:
        return out, lse
    single = num_splits == 1
    if single:
        split_out, split_lse = out, lse
    else:
        split_out = torch.empty(batch, num_q_heads, num_splits, head_dim, dtype=torch.float32, device=query.device)
        split_lse = torch.empty(batch, num_q_heads, num_splits, dtype=torch.float32, device=query.device)
    block_d = max(16, triton.next_power_of_2(head_dim))
    _decode_split_kernel[(batch, num_kv_heads, num_splits)](
        query, key_cache, value_cache, block_tables, seq_lens.contiguous(), split_out, split_lse,
        query.stride(0), query.stride(1), key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        block_tables.stride(0), scale * LOG2_E, block_size, num_splits,
        NUM_Q_HEADS=num_q_heads, GROUP=group, HEAD_DIM=head_dim,
        BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_D=block_d, BLOCK_N=_key_tile(head_dim, query.dtype),
        SINGLE_SPLIT=single, UPCAST=_INTERPRET and query.dtype != torch.float32, PRECISION=_precision(query.dtype),
        num_warps=4, num_stages=2, **LAUNCH_OPTIONS,
    )  # fmt: skip
    if not single:
        _merge_splits_kernel[(batch, num_q_heads)](
            split_out, split_lse, out, lse, num_splits,
            NUM_Q_HEADS=num_q_heads, HEAD_DIM=head_dim, BLOCK_S=triton.next_power_of_2(num_splits), BLOCK_D=block_d,
            num_warps=1, **LAUNCH_OPTIONS,
        )  # fmt: skip
    return out, lse


def paged_prefill_attention_triton(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Packed ``query [T, Hq, D]`` of R requests -> ``out [T, Hq, D]``; see ``paged_attention``."""
    num_tokens, num_q_heads, head_dim = query.shape
    _, block_size, num_kv_heads, _ = key_cache.shape
    group = num_q_heads // num_kv_heads
    num_requests = seq_lens.shape[0]
    query = query.contiguous()
    block_tables = block_tables.contiguous()
    out = torch.empty_like(query)
    if num_tokens == 0 or num_requests == 0:
        return out
    # fp32 dots run on FMA units, not tensor cores, and hold more registers: half the rows.
    block_m = max(32 if query.dtype == torch.float32 else 64, triton.next_power_of_2(group))
    tokens = block_m // group
    # The longest request is free to read on the CPU; on CUDA that would be a sync, so T bounds it.
    on_cpu = query.device.type == "cpu"
    longest = int((query_start_loc[1:] - query_start_loc[:-1]).max()) if on_cpu else num_tokens
    _prefill_kernel[(triton.cdiv(longest, tokens), num_requests, num_kv_heads)](
        query, key_cache, value_cache, block_tables, seq_lens.contiguous(), query_start_loc.contiguous(), out,
        query.stride(0), query.stride(1), key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        block_tables.stride(0), scale * LOG2_E, block_size,
        NUM_Q_HEADS=num_q_heads, GROUP=group, HEAD_DIM=head_dim, TOKENS=tokens,
        BLOCK_M=block_m, BLOCK_D=max(16, triton.next_power_of_2(head_dim)), BLOCK_N=_key_tile(head_dim, query.dtype),
        UPCAST=_INTERPRET and query.dtype != torch.float32, PRECISION=_precision(query.dtype),
        num_warps=4, num_stages=2, **LAUNCH_OPTIONS,
    )  # fmt: skip
    return out
