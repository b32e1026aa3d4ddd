"""Paged attention: every backend against the reference, the reference against dense attention, bad input.

The dense side is written here and shares no code with the package: each row's keys and values
are drawn as contiguous ``[L, Hkv, D]`` tensors, laid into a pool through a shuffled block table
by plain Python assignment, and attended to with ``softmax(q k^T) v`` in float64. Pool slots that
no row owns, and block-table entries past a row's length, hold poison (NaN blocks, out-of-range
ids), so a backend that reads past a row's keys fails the comparison.
"""

import json
import math
import os
import random
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from anytime_kernels import paged_attention_triton, paged_decode_attention, paged_prefill_attention, write_paged_kv
from anytime_kernels._extension import ops
from anytime_kernels.backends import BackendUnavailableError
from anytime_kernels.paged_attention_reference import (
    paged_decode_attention_reference,
    paged_prefill_attention_reference,
)

FAST_BACKENDS = ("torch", "triton")  # every op's
DECODE_BACKENDS = ("cpp", *FAST_BACKENDS)  # the compiled CPU op is decode-only
# Query heads, kv heads: GQA 7:1 (Qwen2-0.5B), 4:1, 1:1.
HEADS = ((14, 2), (8, 2), (2, 2))
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 3e-2}


@dataclass
class Pool:
    key_cache: torch.Tensor  # [num_blocks, block_size, Hkv, D]
    value_cache: torch.Tensor
    block_tables: torch.Tensor  # [rows, width] int32
    seq_lens: torch.Tensor  # [rows] int32
    keys: list  # per row, the contiguous [L, Hkv, D] keys (fp32, rounded to the pool dtype)
    values: list


def build_pool(lengths, block_size, num_kv_heads, head_dim, dtype, forks=(), seed=0) -> Pool:
    """A pool holding one row per length; ``forks`` lists (child, parent, shared_tokens): the child's
    logical blocks that lie wholly in its first shared_tokens positions are the parent's physical
    blocks (and its K/V there the parent's), as a fork shares its prefix's full blocks."""
    generator = torch.Generator().manual_seed(seed)
    shuffle = random.Random(seed)
    shared = {child: (parent, tokens // block_size) for child, parent, tokens in forks}
    keys, values = [], []
    for row, length in enumerate(lengths):
        row_keys = torch.randn(length, num_kv_heads, head_dim, generator=generator).to(dtype).float()
        row_values = torch.randn(length, num_kv_heads, head_dim, generator=generator).to(dtype).float()
        if row in shared:
            parent, count = shared[row]
            prefix = count * block_size
            assert prefix <= min(length, lengths[parent])
            row_keys[:prefix], row_values[:prefix] = keys[parent][:prefix], values[parent][:prefix]
        keys.append(row_keys)
        values.append(row_values)
    own_blocks = sum(-(-length // block_size) - shared.get(row, (0, 0))[1] for row, length in enumerate(lengths))
    num_blocks = own_blocks + 3  # spare blocks stay NaN
    free = list(range(num_blocks))
    shuffle.shuffle(free)
    width = max(-(-length // block_size) for length in lengths) + 2
    # Entries past a row's length: out-of-range ids and spare (NaN) blocks, never to be read.
    tables = [[num_blocks + 5 if column % 2 else free[-1] for column in range(width)] for _ in lengths]
    for row, length in enumerate(lengths):
        parent, count = shared.get(row, (None, 0))
        for column in range(-(-length // block_size)):
            tables[row][column] = tables[parent][column] if column < count else free.pop(0)
    key_cache = torch.full((num_blocks, block_size, num_kv_heads, head_dim), float("nan"), dtype=dtype)
    value_cache = key_cache.clone()
    for row, length in enumerate(lengths):
        for position in range(length):
            block, offset = tables[row][position // block_size], position % block_size
            key_cache[block, offset] = keys[row][position].to(dtype)
            value_cache[block, offset] = values[row][position].to(dtype)
    return Pool(
        key_cache,
        value_cache,
        torch.tensor(tables, dtype=torch.int32),
        torch.tensor(lengths, dtype=torch.int32),
        keys,
        values,
    )


def dense_attention(query, keys, values, scale, causal_offset=None):
    """``query [Q, Hq, D]`` over contiguous ``keys``, ``values`` ``[L, Hkv, D]`` in float64.

    Query i sees keys ``0..causal_offset + i`` (all L keys when ``causal_offset`` is None). Returns
    ``(out [Q, Hq, D], lse [Q, Hq])``; no keys gives zeros and -inf.
    """
    num_queries, num_q_heads, _ = query.shape
    length = keys.shape[0]
    if length == 0:
        return torch.zeros(query.shape, dtype=torch.float64), torch.full((num_queries, num_q_heads), -math.inf)
    group = num_q_heads // keys.shape[1]
    keys = keys.double().repeat_interleave(group, dim=1)  # [L, Hq, D]
    values = values.double().repeat_interleave(group, dim=1)
    logits = torch.einsum("qhd,lhd->qhl", query.double(), keys) * scale
    if causal_offset is not None:
        visible = torch.arange(length)[None, :] <= causal_offset + torch.arange(num_queries)[:, None]
        logits = logits.masked_fill(~visible[:, None, :], -math.inf)
    weights = torch.softmax(logits, dim=-1)
    return torch.einsum("qhl,lhd->qhd", weights, values), torch.logsumexp(logits, dim=-1)


def decode_case(num_q_heads, num_kv_heads, head_dim, dtype, block_size=16, seed=0):
    # Rows end inside a block (37, 5, 70), on its boundary (16, 48), hold one key, or are padding (0);
    # rows 3 and 6 fork rows 1 and 5 and share their first blocks.
    lengths = [37, 48, 0, 51, 1, 16, 70, 5]
    forks = [(3, 1, 48), (6, 5, 16)]
    pool = build_pool(lengths, block_size, num_kv_heads, head_dim, dtype, forks, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    query = torch.randn(len(lengths), num_q_heads, head_dim, generator=generator).to(dtype)
    return pool, query


def dense_decode(pool: Pool, query: torch.Tensor, scale: float):
    outs, lses = zip(
        *(
            dense_attention(query[row : row + 1].float(), pool.keys[row], pool.values[row], scale)
            for row in range(len(pool.keys))
        ),
        strict=True,
    )
    return torch.cat(outs), torch.cat(lses)


@pytest.mark.parametrize(("num_q_heads", "num_kv_heads"), HEADS)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_decode_reference_equals_dense_attention(num_q_heads, num_kv_heads, head_dim):
    pool, query = decode_case(num_q_heads, num_kv_heads, head_dim, torch.float32)
    scale = 1 / math.sqrt(head_dim)
    out, lse = paged_decode_attention_reference(
        query, pool.key_cache, pool.value_cache, pool.block_tables, pool.seq_lens, scale
    )
    expected_out, expected_lse = dense_decode(pool, query, scale)
    torch.testing.assert_close(out.double(), expected_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), expected_lse, atol=1e-5, rtol=1e-5)
    assert (out[2] == 0).all() and (lse[2] == -math.inf).all()


def _check_decode(backend, num_q_heads, num_kv_heads, head_dim, dtype, num_splits, block_size=16):
    pool, query = decode_case(num_q_heads, num_kv_heads, head_dim, dtype, block_size)
    args = (query, pool.key_cache, pool.value_cache, pool.block_tables, pool.seq_lens)
    out, lse = paged_decode_attention(*args, num_splits=num_splits, return_lse=True, backend=backend)
    expected_out, expected_lse = paged_decode_attention(*args, return_lse=True, backend="reference")
    assert out.dtype == dtype and out.shape == query.shape
    assert lse.dtype == torch.float32 and lse.shape == query.shape[:2]
    tolerance = TOLERANCE[dtype]
    torch.testing.assert_close(out.float(), expected_out.float(), atol=tolerance, rtol=tolerance)
    torch.testing.assert_close(lse, expected_lse, atol=tolerance, rtol=tolerance)
    assert (out[2] == 0).all() and (lse[2] == -math.inf).all()


@pytest.mark.parametrize("backend", DECODE_BACKENDS)
@pytest.mark.parametrize(("num_q_heads", "num_kv_heads"), HEADS)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_equals_reference_fp32(backend, num_q_heads, num_kv_heads, head_dim, num_splits):
    """Values and per-row LSE over shared blocks, GQA 7:1/4:1/1:1, ragged rows, one and several splits."""
    _check_decode(backend, num_q_heads, num_kv_heads, head_dim, torch.float32, num_splits)


@pytest.mark.parametrize("backend", DECODE_BACKENDS)
@pytest.mark.parametrize(
    ("num_q_heads", "num_kv_heads", "head_dim", "num_splits"), [(14, 2, 64, 4), (8, 2, 128, 1), (2, 2, 64, None)]
)
def test_decode_equals_reference_bf16(backend, num_q_heads, num_kv_heads, head_dim, num_splits):
    _check_decode(backend, num_q_heads, num_kv_heads, head_dim, torch.bfloat16, num_splits)


@pytest.mark.parametrize("block_size", [1, 128])
def test_decode_triton_other_block_sizes_and_more_splits_than_blocks(block_size):
    """Blocks of 1 key (a key tile spans many blocks) and of 128 (a tile lies inside one block; the other
    tests use 16); 6 splits leave most splits of short rows empty."""
    _check_decode("triton", 14, 2, 64, torch.float32, 6, block_size=block_size)


def test_decode_result_does_not_depend_on_num_splits():
    pool, query = decode_case(14, 2, 64, torch.float32)
    args = (query, pool.key_cache, pool.value_cache, pool.block_tables, pool.seq_lens)
    one, lse_one = paged_decode_attention(*args, num_splits=1, return_lse=True, backend="triton")
    for splits in (5, None):
        out, lse = paged_decode_attention(*args, num_splits=splits, return_lse=True, backend="triton")
        torch.testing.assert_close(out, one, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse, lse_one, atol=1e-5, rtol=1e-5)


def test_decode_scale_and_default_backend():
    """An explicit scale reaches every backend; ``auto`` on CPU tensors is the compiled op."""
    pool, query = decode_case(8, 2, 64, torch.float32)
    args = (query, pool.key_cache, pool.value_cache, pool.block_tables, pool.seq_lens)
    expected_out, expected_lse = dense_decode(pool, query, 0.3)
    for backend in ("auto", "reference", *DECODE_BACKENDS):
        out, lse = paged_decode_attention(*args, scale=0.3, return_lse=True, backend=backend)
        torch.testing.assert_close(out.double(), expected_out, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse.double(), expected_lse, atol=1e-5, rtol=1e-5)
    assert torch.equal(paged_decode_attention(*args), paged_decode_attention(*args, backend="cpp"))


def interleaved_pool(pool: Pool):
    """K and V in one allocation ``[blocks, 2, block_size, Hkv, D]``: the caches are views whose block
    stride is twice their size."""
    joint = torch.stack([pool.key_cache, pool.value_cache], dim=1)
    return joint, joint[:, 0], joint[:, 1]


@pytest.mark.parametrize("backend", ("reference", *DECODE_BACKENDS))
def test_decode_strided_pool_views_and_query(backend):
    """Caches that are views of one K/V allocation, a query whose head_dim is not its
    last-contiguous axis, and int64 block tables and lengths."""
    pool, query = decode_case(8, 2, 64, torch.float32)
    _, key_cache, value_cache = interleaved_pool(pool)
    strided_query = query.transpose(1, 2).contiguous().transpose(1, 2)
    args = (key_cache, value_cache, pool.block_tables.long(), pool.seq_lens.long())
    out, lse = paged_decode_attention(strided_query, *args, num_splits=2, return_lse=True, backend=backend)
    expected_out, expected_lse = dense_decode(pool, query, 1 / 8)
    torch.testing.assert_close(out.double(), expected_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), expected_lse, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ("reference", *FAST_BACKENDS))
def test_write_into_strided_pool_views(backend):
    pool, _ = decode_case(8, 2, 64, torch.float32)
    joint, key_cache, value_cache = interleaved_pool(pool)
    tokens = torch.randn(3, 2, 64, generator=torch.Generator().manual_seed(5))
    expected = joint.clone()
    expected[0, 0, 5], expected[2, 0, 8] = tokens[0], tokens[2]
    expected[0, 1, 5], expected[2, 1, 8] = -tokens[0], -tokens[2]
    write_paged_kv(key_cache, value_cache, tokens, -tokens, torch.tensor([5, -1, 40]), backend=backend)
    assert torch.equal(joint.nan_to_num(7.0), expected.nan_to_num(7.0))


def prefill_case(num_q_heads, num_kv_heads, head_dim, dtype, seed=0):
    """(cached prefix, new tokens) per request: no prefix, a prefix ending inside and on a block
    boundary, one new token, many new tokens; request 3 forks request 1 (two shared blocks)."""
    requests = [(0, 5), (19, 13), (32, 1), (32, 20), (7, 16)]
    lengths = [prefix + new for prefix, new in requests]
    pool = build_pool(lengths, 16, num_kv_heads, head_dim, dtype, [(3, 1, 32)], seed)
    generator = torch.Generator().manual_seed(seed + 1)
    query = torch.randn(sum(new for _, new in requests), num_q_heads, head_dim, generator=generator).to(dtype)
    starts = [0]
    for _, new in requests:
        starts.append(starts[-1] + new)
    return pool, query, torch.tensor(starts, dtype=torch.int32), requests


@pytest.mark.parametrize(("num_q_heads", "num_kv_heads"), HEADS)
def test_prefill_reference_equals_dense_causal_attention(num_q_heads, num_kv_heads):
    pool, query, starts, requests = prefill_case(num_q_heads, num_kv_heads, 64, torch.float32)
    scale = 0.125
    out = paged_prefill_attention_reference(
        query, pool.key_cache, pool.value_cache, pool.block_tables, pool.seq_lens, starts, scale
    )
    for request, (prefix, _) in enumerate(requests):
        tokens = slice(int(starts[request]), int(starts[request + 1]))
        expected, _ = dense_attention(query[tokens], pool.keys[request], pool.values[request], scale, prefix)
        torch.testing.assert_close(out[tokens].double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize(
    ("num_q_heads", "num_kv_heads", "head_dim", "dtype"),
    [(14, 2, 64, torch.float32), (8, 2, 128, torch.float32), (2, 2, 64, torch.float32), (14, 2, 64, torch.bfloat16)],
)
def test_prefill_equals_reference(backend, num_q_heads, num_kv_heads, head_dim, dtype):
    pool, query, starts, _ = prefill_case(num_q_heads, num_kv_heads, head_dim, dtype)
    args = (query, pool.key_cache, pool.value_cache, pool.block_tables, pool.seq_lens, starts)
    out = paged_prefill_attention(*args, backend=backend)
    expected = paged_prefill_attention(*args, backend="reference")
    assert out.dtype == dtype and out.shape == query.shape
    torch.testing.assert_close(out.float(), expected.float(), atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


def test_triton_group_wider_than_16_and_head_dim_not_a_power_of_two():
    """32 query heads on one KV head (a 32-row group tile) and head_dim 80 (masked lanes to 128)."""
    _check_decode("triton", 32, 1, 80, torch.float32, 3)
    pool, query, starts, _ = prefill_case(32, 1, 80, torch.float32)
    args = (query, pool.key_cache, pool.value_cache, pool.block_tables, pool.seq_lens, starts)
    expected = paged_prefill_attention(*args, backend="reference")
    torch.testing.assert_close(paged_prefill_attention(*args, backend="triton"), expected, atol=2e-5, rtol=2e-5)


def test_prefill_of_whole_prompts_equals_decode_of_their_last_token():
    """A prompt's last token in prefill and the same token in decode see the same keys."""
    pool, query, starts, _ = prefill_case(8, 2, 64, torch.float32)
    args = (pool.key_cache, pool.value_cache, pool.block_tables, pool.seq_lens)
    prefill = paged_prefill_attention(query, *args, starts, backend="triton")
    last = starts[1:].long() - 1
    decode = paged_decode_attention(query[last], *args, backend="triton")
    torch.testing.assert_close(prefill[last], decode, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ("reference", *FAST_BACKENDS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_paged_kv_writes_slots_and_skips_negative_ones(backend, dtype):
    num_blocks, block_size, num_kv_heads, head_dim = 5, 4, 2, 8
    generator = torch.Generator().manual_seed(3)
    key_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=generator).to(dtype)
    value_cache = torch.randn(key_cache.shape, generator=generator).to(dtype)
    keys = torch.randn(6, num_kv_heads, head_dim, generator=generator).to(dtype)
    values = torch.randn(6, num_kv_heads, head_dim, generator=generator).to(dtype)
    slots = [13, -1, 0, 19, -1, 6]
    expected_keys, expected_values = key_cache.clone(), value_cache.clone()
    for token, slot in enumerate(slots):
        if slot >= 0:
            expected_keys[slot // block_size, slot % block_size] = keys[token]
            expected_values[slot // block_size, slot % block_size] = values[token]
    for index_dtype in (torch.int64, torch.int32):
        written_keys, written_values = key_cache.clone(), value_cache.clone()
        write_paged_kv(
            written_keys, written_values, keys, values, torch.tensor(slots, dtype=index_dtype), backend=backend
        )
        assert torch.equal(written_keys, expected_keys) and torch.equal(written_values, expected_values)


def test_written_tokens_are_what_decode_reads():
    """write_paged_kv then decode equals dense attention over the written tokens (the engine's order)."""
    num_blocks, block_size, num_kv_heads, head_dim = 6, 4, 2, 64
    generator = torch.Generator().manual_seed(4)
    key_cache = torch.full((num_blocks, block_size, num_kv_heads, head_dim), float("nan"))
    value_cache = key_cache.clone()
    keys = torch.randn(7, num_kv_heads, head_dim, generator=generator)
    values = torch.randn(7, num_kv_heads, head_dim, generator=generator)
    table = [4, 1]
    slots = torch.tensor([table[p // block_size] * block_size + p % block_size for p in range(7)])
    write_paged_kv(key_cache, value_cache, keys, values, slots, backend="triton")
    query = torch.randn(1, 8, head_dim, generator=generator)
    out = paged_decode_attention(
        query, key_cache, value_cache, torch.tensor([table], dtype=torch.int32), torch.tensor([7], dtype=torch.int32),
        backend="triton",
    )  # fmt: skip
    expected, _ = dense_attention(query, keys, values, 1 / 8)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


def _decode_inputs():
    pool, query = decode_case(14, 2, 64, torch.float32)
    return [query, pool.key_cache, pool.value_cache, pool.block_tables, pool.seq_lens]


@pytest.mark.parametrize(
    ("position", "bad", "error", "message"),
    [
        (0, lambda q: q.to(torch.int32), ValueError, "query must have dtype"),
        (0, lambda q: q.bfloat16(), ValueError, "query dtype torch.bfloat16 must match the cache dtype"),
        (0, lambda q: q[..., :32], ValueError, "query head_dim 32 must match the cache head_dim 64"),
        (0, lambda q: q[:, :13], ValueError, "num_q_heads 13 must be a positive multiple of num_kv_heads 2"),
        (0, lambda q: q.to("meta"), ValueError, "query is on meta but key_cache is on cpu"),
        (1, lambda k: k[:, :, :, :32], ValueError, "value_cache .* must match key_cache"),
        (1, lambda k: k.transpose(2, 3), ValueError, "value_cache .* must match key_cache"),
        (3, lambda t: t.float(), ValueError, "block_tables must have dtype"),
        (3, lambda t: t[:-1], ValueError, "must both have 8 rows"),
        (4, lambda s: s.unsqueeze(1), ValueError, r"seq_lens must have shape \[rows\]"),
        (4, lambda s: s + 200, ValueError, r"seq_lens\[0\] = 237 must be in \[0, 112\]"),
        (3, lambda t: torch.where(t == t[0, 1], -3, t), ValueError, r"block_tables\[0, 1\] = -3 is used by a row"),
        (0, lambda q: q.numpy(), TypeError, "query must be a tensor"),
    ],
)
def test_decode_rejects_bad_input(position, bad, error, message):
    inputs = _decode_inputs()
    inputs[position] = bad(inputs[position])
    with pytest.raises(error, match=message):
        paged_decode_attention(*inputs)


def test_bad_backend_scale_splits_and_write_and_prefill_input():
    inputs = _decode_inputs()
    with pytest.raises(ValueError, match=r"backend must be one of .*, got 'fast'"):
        paged_decode_attention(*inputs, backend="fast")
    with pytest.raises(ValueError, match=r"scale must be a finite float > 0 or None, got -1\.0"):
        paged_decode_attention(*inputs, scale=-1.0)
    with pytest.raises(ValueError, match="num_splits must be an int >= 1 or None, got 0"):
        paged_decode_attention(*inputs, num_splits=0)
    key_cache, value_cache = inputs[1], inputs[2]
    keys = torch.zeros(3, 2, 64)
    with pytest.raises(ValueError, match=r"keys must be \[T, 2, 64\] in torch.float32"):
        write_paged_kv(key_cache, value_cache, keys[:, :1], keys, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"slot_mapping\[1\] = 9999 must be < num_blocks x block_size"):
        write_paged_kv(key_cache, value_cache, keys, keys, torch.tensor([0, 9999, 2]))
    with pytest.raises(ValueError, match="writes some slot twice"):
        write_paged_kv(key_cache, value_cache, keys, keys, torch.tensor([5, -1, 5]))
    with pytest.raises(ValueError, match="slot_mapping must have dtype"):
        write_paged_kv(key_cache, value_cache, keys, keys, torch.tensor([0.0, 1.0, 2.0]))
    pool, query, starts, _ = prefill_case(8, 2, 64, torch.float32)
    args = [query, pool.key_cache, pool.value_cache, pool.block_tables, pool.seq_lens, starts]
    with pytest.raises(ValueError, match=r"query_start_loc must rise from 0 to T = 55"):
        paged_prefill_attention(*args[:5], starts.flip(0))
    with pytest.raises(ValueError, match=r"request 0 has 5 new tokens but seq_lens\[0\] = 4"):
        paged_prefill_attention(*args[:4], pool.seq_lens - 1, starts)
    with pytest.raises(ValueError, match="query_start_loc must have R \\+ 1 = 6 entries"):
        paged_prefill_attention(*args[:5], starts[:-1])
    with pytest.raises(
        ValueError, match=r"backend must be one of \('auto', 'triton', 'torch', 'reference'\), got 'cpp'"
    ):
        paged_prefill_attention(*args, backend="cpp")
    with pytest.raises(ValueError, match=r"backend must be one of .*, got 'cpp'"):
        write_paged_kv(key_cache, value_cache, keys, keys, torch.tensor([0, 1, 2]), backend="cpp")


def test_check_values_false_skips_only_the_value_checks():
    """The engine builds its own tables and slots: check_values=False skips the CPU value passes
    (here a repeated slot that writes the same token twice), never the shape checks."""
    inputs = _decode_inputs()
    key_cache, value_cache = inputs[1], inputs[2]
    keys = torch.ones(2, 2, 64)
    write_paged_kv(key_cache, value_cache, keys, keys, torch.tensor([5, 5]), check_values=False)
    assert (key_cache[0, 5] == 1).all() and (value_cache[0, 5] == 1).all()
    with pytest.raises(ValueError, match=r"keys must be \[T, 2, 64\]"):
        write_paged_kv(key_cache, value_cache, keys[:, :1], keys, torch.tensor([5, 5]), check_values=False)


def test_the_compiled_op_guards_itself_and_runs_on_cpu_only():
    """Called directly, the C++ op refuses a shape the wrapper would have refused; the wrapper refuses
    ``cpp`` for tensors off the CPU (meta tensors stand in for CUDA ones)."""
    query, key_cache, value_cache, tables, seq_lens = _decode_inputs()
    with pytest.raises(ValueError, match=r"query must be \[B, Hq, D\]"):
        ops.paged_decode_attention(query[0], key_cache, value_cache, tables, seq_lens, 0.125)
    meta = [tensor.to("meta") for tensor in (query, key_cache, value_cache, tables, seq_lens)]
    with pytest.raises(BackendUnavailableError, match="backend 'cpp' runs on CPU tensors, got tensors on meta"):
        paged_decode_attention(*meta, backend="cpp")


def test_triton_backend_needs_cuda_or_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(BackendUnavailableError, match="backend 'triton' needs CUDA tensors"):
        paged_decode_attention(*_decode_inputs(), backend="triton")


# Shared memory one H100 block may use (227 KiB); a config above it compiles but fails at launch.
H100_SHARED_PER_BLOCK = 232448


def test_every_paged_kernel_compiles_for_hopper():
    """Every paged kernel, with the argument types and constexprs its wrapper passes, compiles for sm_90
    (no GPU needed; the interpreter accepts code the compiler refuses) within an H100 block's shared
    memory, with FMA contraction and without register spills; the decode loop's gathered K/V loads
    are pipelined (cp.async)."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    script = Path(__file__).parent / "fixtures" / "compile_sm90_paged.py"
    done = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in done.stdout.splitlines()]
    kernels = {name for name in dir(paged_attention_triton) if name.endswith("_kernel")}
    assert {record["kernel"] for record in records} == kernels
    for record in records:
        assert record["shared"] <= H100_SHARED_PER_BLOCK, record
        assert record["enable_fp_fusion"] is True, record
        # No register spills, but for the fp32 prefill under triton 3.6 (sm_90): a 16-byte stack,
        # the tolerance of the log-probs kernels' compile test (none under triton 3.9).
        assert record["stack"] == 0 or (record["stack"] <= 16 and "*fp32" in record["pointer_types"]), record
    decode = [record for record in records if record["kernel"] == "_decode_split_kernel"]
    assert {record["constexprs"]["SINGLE_SPLIT"] for record in decode} == {False, True}
    assert all(record["cp_async"] > 0 for record in decode)


@pytest.mark.gpu
@pytest.mark.parametrize("num_splits", [None, 1])
def test_triton_decode_and_prefill_on_cuda_at_the_qwen2_shape(num_splits):
    """bf16, 14 query / 2 kv heads, head_dim 64, block 16, 32 rows of ragged contexts up to ~1k."""
    lengths = [1 + (97 * row) % 1000 for row in range(32)]
    lengths[5] = 0
    pool = build_pool(lengths, 16, 2, 64, torch.bfloat16, [(1, 0, 0), (9, 3, 160)], seed=7)
    query = torch.randn(32, 14, 64, generator=torch.Generator().manual_seed(8)).bfloat16()
    cuda = [t.cuda() for t in (query, pool.key_cache, pool.value_cache, pool.block_tables, pool.seq_lens)]
    out, lse = paged_decode_attention(*cuda, num_splits=num_splits, return_lse=True, backend="triton")
    expected_out, expected_lse = paged_decode_attention(*cuda, return_lse=True, backend="reference")
    torch.testing.assert_close(out.float(), expected_out.float(), atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(lse, expected_lse, atol=3e-2, rtol=3e-2)
    pool, query, starts, _ = prefill_case(14, 2, 64, torch.bfloat16)
    cuda = [t.cuda() for t in (query, pool.key_cache, pool.value_cache, pool.block_tables, pool.seq_lens, starts)]
    out = paged_prefill_attention(*cuda, backend="triton")
    expected = paged_prefill_attention(*cuda, backend="reference")
    torch.testing.assert_close(out.float(), expected.float(), atol=3e-2, rtol=3e-2)


@pytest.mark.gpu
def test_triton_decode_and_write_replay_in_a_cuda_graph():
    """The write and the decode (split count derived from shapes) captured once, replayed on new
    inputs copied into the same buffers, give what eager calls give on those inputs."""
    # No row crosses into a new block within the two steps (entries past a row's blocks are poison).
    pool = build_pool([40, 17, 0, 60], 16, 2, 64, torch.bfloat16, [(1, 0, 16)], seed=9)
    key_cache, value_cache, tables = (t.cuda() for t in (pool.key_cache, pool.value_cache, pool.block_tables))
    generator = torch.Generator().manual_seed(10)
    seq_lens = pool.seq_lens.cuda()
    query = torch.zeros(4, 14, 64, dtype=torch.bfloat16, device="cuda")
    new_keys = torch.zeros(4, 2, 64, dtype=torch.bfloat16, device="cuda")
    slots = torch.full((4,), -1, dtype=torch.int64, device="cuda")

    def step():
        write_paged_kv(key_cache, value_cache, new_keys, new_keys, slots, backend="triton")
        return paged_decode_attention(
            query, key_cache, value_cache, tables, seq_lens, return_lse=True, backend="triton"
        )

    step()  # compile before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse = step()
    for _ in range(2):
        # Rows 0, 1, 3 get one more token at their next position; row 2 stays padding.
        lengths = seq_lens.tolist()
        next_slots = [int(tables[row, n // 16]) * 16 + n % 16 if n else -1 for row, n in enumerate(lengths)]
        seq_lens.copy_(torch.tensor([n + 1 if n else 0 for n in lengths], dtype=torch.int32))
        slots.copy_(torch.tensor(next_slots))
        new_keys.copy_(torch.randn(4, 2, 64, generator=generator).bfloat16())
        query.copy_(torch.randn(4, 14, 64, generator=generator).bfloat16())
        eager_key_cache, eager_value_cache = key_cache.clone(), value_cache.clone()
        write_paged_kv(eager_key_cache, eager_value_cache, new_keys, new_keys, slots, backend="reference")
        expected_out, expected_lse = paged_decode_attention(
            query, eager_key_cache, eager_value_cache, tables, seq_lens, return_lse=True, backend="reference"
        )
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(key_cache.nan_to_num(7.0), eager_key_cache.nan_to_num(7.0))
        assert torch.equal(value_cache.nan_to_num(7.0), eager_value_cache.nan_to_num(7.0))
        torch.testing.assert_close(out.float(), expected_out.float(), atol=3e-2, rtol=3e-2)
        torch.testing.assert_close(lse, expected_lse, atol=3e-2, rtol=3e-2)


def test_float64_runs_on_torch_and_is_refused_by_name_by_the_compiled_backends():
    """The rollout tests' exact float64 models decode through the torch path (``auto`` picks it); the
    C++ and Triton kernels take 16/32-bit pools only and say so."""
    torch.manual_seed(0)
    key_cache = torch.randn(4, 4, 2, 8, dtype=torch.float64)
    value_cache = torch.randn_like(key_cache)
    query = torch.randn(2, 4, 8, dtype=torch.float64)
    tables = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    lens = torch.tensor([6, 3], dtype=torch.int32)
    out = paged_decode_attention(query, key_cache, value_cache, tables, lens)
    assert out.dtype == torch.float64
    for row, length in enumerate(lens.tolist()):
        keys = key_cache[tables[row].long()].reshape(-1, 2, 8)[:length]
        values = value_cache[tables[row].long()].reshape(-1, 2, 8)[:length]
        for head in range(4):
            weights = torch.softmax(keys[:, head // 2] @ query[row, head] / 8**0.5, dim=0)
            torch.testing.assert_close(out[row, head], weights @ values[:, head // 2], rtol=1e-12, atol=1e-12)
    for backend in ("cpp", "triton"):
        with pytest.raises(ValueError, match=f"backend '{backend}' takes float32/bfloat16/float16"):
            paged_decode_attention(query, key_cache, value_cache, tables, lens, backend=backend)
