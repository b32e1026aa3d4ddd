"""Paged attention in plain torch, one row (or token) and one head at a time: the reference.

A KV pool holds, per layer, ``key_cache`` and ``value_cache`` of shape
``[num_blocks, block_size, num_kv_heads, head_dim]``; a token's slot is ``block * block_size + offset``
and a row's block table lists the physical block of each of its logical blocks. These functions
follow those definitions literally (Python loops over rows, tokens and heads, fp32 math), so the
fast backends (``paged_attention_torch``, ``paged_attention_triton``) have something obviously
right to be compared with. Inputs are validated by ``anytime_kernels.paged_attention``.
"""

from __future__ import annotations

import torch


def write_paged_kv_reference(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write token t's ``keys[t]``, ``values[t]`` (``[T, Hkv, D]``) to slot ``slot_mapping[t]``; skip slots < 0."""
    block_size = key_cache.shape[1]
    for token, slot in enumerate(slot_mapping.tolist()):
        if slot < 0:
            continue
        key_cache[slot // block_size, slot % block_size] = keys[token]
        value_cache[slot // block_size, slot % block_size] = values[token]


def gather_row_kv(
    key_cache: torch.Tensor, value_cache: torch.Tensor, block_table: torch.Tensor, length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of positions ``0..length-1`` of one row, ``([length, Hkv, D], [length, Hkv, D])`` fp32."""
    block_size = key_cache.shape[1]
    positions = torch.arange(length, device=key_cache.device)
    blocks = block_table.long()[positions // block_size]
    offsets = positions % block_size
    return key_cache[blocks, offsets].float(), value_cache[blocks, offsets].float()


def _attend(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> tuple[torch.Tensor, float]:
    """One query ``[D]`` over ``keys``, ``values`` ``[L, D]`` (fp32): (output ``[D]``, natural-log LSE)."""
    if keys.shape[0] == 0:
        return torch.zeros_like(query), float("-inf")
    logits = (keys @ query) * scale
    lse = torch.logsumexp(logits, dim=0)
    return torch.exp(logits - lse) @ values, float(lse)


def paged_decode_attention_reference(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One new token per row attends to positions ``0..seq_lens[b]-1`` of its row.

    Args:
        query: ``[B, Hq, D]``.
        key_cache, value_cache: ``[num_blocks, block_size, Hkv, D]``.
        block_tables: ``[B, max_blocks]`` int.
        seq_lens: ``[B]`` int; 0 gives a zero output and LSE -inf.
        scale: multiplies ``q . k`` before the softmax.

    Returns:
        ``out [B, Hq, D]`` in the query dtype and ``lse [B, Hq]`` fp32 (natural log).
    """
    batch, num_q_heads, _ = query.shape
    group = num_q_heads // key_cache.shape[2]
    out = torch.zeros(query.shape, dtype=torch.float32, device=query.device)
    lse = torch.full((batch, num_q_heads), float("-inf"), dtype=torch.float32, device=query.device)
    for row in range(batch):
        keys, values = gather_row_kv(key_cache, value_cache, block_tables[row], int(seq_lens[row]))
        for head in range(num_q_heads):
            kv_head = head // group
            out[row, head], lse[row, head] = _attend(
                query[row, head].float(), keys[:, kv_head], values[:, kv_head], scale
            )
    return out.to(query.dtype), lse


def paged_prefill_attention_reference(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """New tokens of R requests, packed, attend causally over their request's cached prefix and themselves.

    Args:
        query: ``[T, Hq, D]``, request r's new tokens at ``query_start_loc[r]:query_start_loc[r + 1]``.
        key_cache, value_cache: ``[num_blocks, block_size, Hkv, D]``, the new tokens' K/V already written.
        block_tables: ``[R, max_blocks]`` int.
        seq_lens: ``[R]`` int, context length after the new tokens (prefix + new).
        query_start_loc: ``[R + 1]`` int cumulative new-token counts.
        scale: multiplies ``q . k`` before the softmax.

    Returns:
        ``out [T, Hq, D]`` in the query dtype.
    """
    num_q_heads = query.shape[1]
    group = num_q_heads // key_cache.shape[2]
    out = torch.zeros(query.shape, dtype=torch.float32, device=query.device)
    starts = query_start_loc.tolist()
    for request, length in enumerate(seq_lens.tolist()):
        keys, values = gather_row_kv(key_cache, value_cache, block_tables[request], length)
        first, last = starts[request], starts[request + 1]
        for index, token in enumerate(range(first, last)):
            position = length - (last - first) + index
            for head in range(num_q_heads):
                kv_head = head // group
                out[token, head], _ = _attend(
                    query[token, head].float(),
                    keys[: position + 1, kv_head],
                    values[: position + 1, kv_head],
                    scale,
                )
    return out.to(query.dtype)
