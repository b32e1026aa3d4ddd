"""Paged attention in vectorized torch (``backend="torch"``): the CPU prefill, and a decode for any device.

The CPU decode of the rollout engine is the compiled op (``csrc/paged_attention.cpp``), which reads
the pool in place; this decode gathers first and runs at about a third of its speed on the CPU.

Every row's keys and values are gathered at once into padded ``[B, L, Hkv, D]`` tensors (one
``index_select`` per cache over the flattened slots; the pool itself is never copied), positions
past a row's length are masked out, and the attention is batched matmuls over all rows, one pair
per KV head (decode, which also needs the LSE), or one SDPA call (prefill). No Python loop runs
per row.

A masked position gathers the row's first key and value instead of whatever its table entry
points at: those are always written when the row has a key, so the gathered tensors never hold
uninitialised pool memory (possibly NaN, and 0 * NaN is NaN) and need no zeroing pass.

On the CPU the padded length is cut to the longest row (reading ``seq_lens`` costs nothing there);
on CUDA it stays the block table's width, so the decode is free of host syncs and can be captured
in a CUDA graph. ``write_paged_kv_torch`` drops the ``-1`` slots with a boolean index, a host sync
on CUDA (the Triton backend has a graph-safe write kernel).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Bytes of gathered fp32 K and V per decode chunk of rows: bounds the padded copies at long contexts.
GATHER_BYTES = 256 * 2**20


def write_paged_kv_torch(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write ``keys``, ``values`` ``[T, Hkv, D]`` to their slots ``[T]`` in place; slots < 0 are skipped."""
    block_size = key_cache.shape[1]
    valid = slot_mapping >= 0
    slots = slot_mapping[valid].long()
    blocks, offsets = slots // block_size, slots % block_size
    key_cache[blocks, offsets] = keys[valid]
    value_cache[blocks, offsets] = values[valid]


def _table_width(block_tables: torch.Tensor, seq_lens: torch.Tensor, block_size: int) -> int:
    """Block-table columns to read: all of them on CUDA (no sync), enough for the longest row on the CPU."""
    width = block_tables.shape[1]
    if seq_lens.device.type != "cpu" or seq_lens.numel() == 0:
        return width
    return min(width, -(-int(seq_lens.max()) // block_size))


def _positions(
    block_tables: torch.Tensor, seq_lens: torch.Tensor, num_blocks: int, block_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(blocks, offsets, valid)``, each ``[B, L]``: where each row's padded position is read, and whether it counts."""
    width = _table_width(block_tables, seq_lens, block_size)
    positions = torch.arange(width * block_size, device=block_tables.device)
    valid = positions[None, :] < seq_lens[:, None]
    # Entries past a row's length may hold anything: clamp them to a real block, then read the row's
    # first key there instead (see the module docstring).
    tables = block_tables[:, :width].long().clamp(0, num_blocks - 1)
    blocks = torch.where(valid, tables[:, positions // block_size], tables[:, :1])
    offsets = torch.where(valid, positions % block_size, 0)
    return blocks, offsets, valid


def _gather(cache: torch.Tensor, blocks: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``cache [num_blocks, block_size, Hkv, D]`` at ``(blocks, offsets)`` ``[B, L]`` -> ``[B, L, Hkv, D]``."""
    num_blocks, block_size, num_kv_heads, head_dim = cache.shape
    if not cache.is_contiguous():  # a strided view of a larger pool: indexing reads it in place, only slower
        return cache[blocks, offsets]
    slots = (blocks * block_size + offsets).reshape(-1)
    flat = cache.view(num_blocks * block_size, num_kv_heads, head_dim)
    return flat.index_select(0, slots).view(*blocks.shape, num_kv_heads, head_dim)


def paged_decode_attention_torch(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``query [B, Hq, D]`` over each row's first ``seq_lens[b]`` positions -> ``(out [B, Hq, D], lse [B, Hq] fp32)``."""
    batch, num_q_heads, head_dim = query.shape
    num_blocks, block_size, num_kv_heads, _ = key_cache.shape
    group = num_q_heads // num_kv_heads
    blocks, offsets, valid = _positions(block_tables, seq_lens, num_blocks, block_size)
    compute = torch.promote_types(query.dtype, torch.float32)
    length = blocks.shape[1]
    out = torch.empty(batch, num_q_heads, head_dim, dtype=query.dtype, device=query.device)
    lse = torch.empty(batch, num_q_heads, dtype=torch.float32, device=query.device)
    rows_per_chunk = max(1, GATHER_BYTES // max(1, 2 * 4 * length * num_kv_heads * head_dim))
    for start in range(0, batch, rows_per_chunk):
        rows = slice(start, start + rows_per_chunk)
        keys = _gather(key_cache, blocks[rows], offsets[rows]).to(compute)  # [b, L, Hkv, D]
        values = _gather(value_cache, blocks[rows], offsets[rows]).to(compute)
        bias = torch.where(valid[rows], 0.0, float("-inf")).to(compute)[:, None, :]  # [b, 1, L]
        grouped = query[rows].to(compute).view(-1, num_kv_heads, group, head_dim)
        # A loop over KV heads only (2 for Qwen2-0.5B): each step is one batched matmul over all rows,
        # on strided views of the gathered tensors (no transposing copy).
        for kv_head in range(num_kv_heads):
            heads = slice(kv_head * group, (kv_head + 1) * group)
            logits = torch.baddbmm(bias, grouped[:, kv_head], keys[:, :, kv_head].transpose(1, 2), alpha=scale)
            row_max = logits.amax(dim=-1, keepdim=True)  # [b, G, 1]
            # An empty row has max -inf: subtract 0 there (exp(-inf) = 0), and its sum stays 0.
            probs = logits.sub_(torch.where(torch.isinf(row_max), 0.0, row_max)).exp_()
            total = probs.sum(dim=-1, keepdim=True)
            head_out = torch.bmm(probs, values[:, :, kv_head]).div_(torch.where(total > 0, total, 1.0))
            # An empty row read an arbitrary block (perhaps NaN): its output is 0 and its LSE -inf.
            out[rows, heads] = torch.where(total > 0, head_out, 0.0).to(query.dtype)
            lse[rows, heads] = torch.where(total > 0, row_max + total.log(), float("-inf")).squeeze(-1)
    return out, lse


def paged_prefill_attention_torch(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Packed new tokens ``query [T, Hq, D]`` of R requests, causal over prefix + new -> ``out [T, Hq, D]``.

    The requests are padded to the longest new-token count and the longest context and run as one
    SDPA call with a boolean mask (the CPU's fused SDPA never holds the ``[R, Hq, Q, L]`` scores).
    """
    num_tokens, num_q_heads, head_dim = query.shape
    num_blocks, block_size, num_kv_heads, _ = key_cache.shape
    num_requests = seq_lens.shape[0]
    device = query.device
    if num_tokens == 0:
        return torch.empty_like(query)
    starts = query_start_loc.long()
    query_lens = starts[1:] - starts[:-1]  # [R]
    request_of = torch.repeat_interleave(torch.arange(num_requests, device=device), query_lens, output_size=num_tokens)
    index_in_request = torch.arange(num_tokens, device=device) - starts[request_of]  # [T]
    max_query_len = int(query_lens.max())
    blocks, offsets, valid = _positions(block_tables, seq_lens, num_blocks, block_size)
    length = blocks.shape[1]

    padded = query.new_zeros(num_requests, max_query_len, num_q_heads, head_dim)
    padded[request_of, index_in_request] = query
    # Position of padded query i of request r; rows past a request's count are cut away afterwards.
    query_positions = (seq_lens.long() - query_lens)[:, None] + torch.arange(max_query_len, device=device)  # [R, Q]
    key_positions = torch.arange(length, device=device)
    mask = (key_positions[None, None, :] <= query_positions[:, :, None]) & valid[:, None, :]  # [R, Q, L]
    keys = _gather(key_cache, blocks, offsets)  # [R, L, Hkv, D]
    values = _gather(value_cache, blocks, offsets)
    out = F.scaled_dot_product_attention(
        padded.transpose(1, 2),
        keys.transpose(1, 2),
        values.transpose(1, 2),
        attn_mask=mask[:, None],
        scale=scale,
        enable_gqa=num_q_heads != num_kv_heads,
    )  # [R, Hq, Q, D]
    return out.transpose(1, 2)[request_of, index_in_request]
