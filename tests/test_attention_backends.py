"""The backend table of tree attention, proven on CPU.

flash-attn and xformers need CUDA, so these tests install stand-ins with the libraries' calling
conventions (``flash_attn_varlen_func``; xformers' ``BlockDiagonalCausalFromBottomRightMask``,
its ``[B, M, H, D]`` layout and its grouped ``[B, M, G, H, D]`` one, which has no backward) that
compute attention with plain loops, and check that the glue feeds them what the real libraries
need: K/V gathered *before* any grouped-query expansion (``Hkv`` heads), one attention bias per
micro-batch (not per layer) on the model's device, one dtype for q/k/v, and for flash-attn half
precision. The end-to-end reference is the dense-mask SDPA backend.
"""

import copy
import dataclasses
import itertools
import sys
import types

import pytest
import torch
from test_policy_tree import random_rollouts, tiny_model

from anytime_kernels import pack_response_trees
from anytime_kernels.attention import dense_tree_mask
from anytime_kernels.backends import BackendUnavailableError
from trainer import attention
from trainer.attention import BACKENDS, resolve_backend
from trainer.policy import TreePolicy


def segment_attention(q, k, v, scale):
    """Bottom-right causal attention of one segment. ``q [Lq, Hq, D]``, ``k``/``v [Lk, Hkv, D]``."""
    groups = q.shape[1] // k.shape[1]
    out = torch.empty(q.shape, dtype=torch.float32)
    offset = k.shape[0] - q.shape[0]
    for head in range(q.shape[1]):
        kv_head = head // groups
        for i in range(q.shape[0]):
            keys = k[: offset + i + 1, kv_head].float()
            weights = torch.softmax(keys @ q[i, head].float() * scale, dim=0)
            out[i, head] = weights @ v[: offset + i + 1, kv_head].float()
    return out.to(q.dtype)


def fake_flash_attn(calls):
    def flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=None, causal=False):
        assert causal and q.dim() == k.dim() == 3
        calls.append({"q_heads": q.shape[1], "kv_heads": k.shape[1], "dtypes": {q.dtype, k.dtype, v.dtype}})
        cu_q, cu_k = cu_q.tolist(), cu_k.tolist()
        assert max_q == max(b - a for a, b in itertools.pairwise(cu_q))
        pieces = [
            segment_attention(
                q[cu_q[i] : cu_q[i + 1]], k[cu_k[i] : cu_k[i + 1]], v[cu_k[i] : cu_k[i + 1]], softmax_scale
            )
            for i in range(len(cu_q) - 1)
        ]
        return torch.cat(pieces)

    return types.SimpleNamespace(flash_attn_varlen_func=flash_attn_varlen_func)


def fake_xformers(calls):
    class BlockDiagonalCausalFromBottomRightMask:
        def __init__(self, q_lens, k_lens):
            self.q_lens, self.k_lens = list(q_lens), list(k_lens)

        @classmethod
        def from_seqlens(cls, q_seqlen, kv_seqlen, *, device=None):
            calls["bias"] += 1
            calls["bias_devices"].add(str(device))  # xformers' default is the current CUDA device
            return cls(q_seqlen, kv_seqlen)

    def memory_efficient_attention(query, key, value, attn_bias=None, scale=None):
        calls["attend"] += 1
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
        if query.dim() == 5:  # grouped layout [B, M, G, H, D]: forward only (xformers 0.0.35)
            if needs_grad:
                raise NotImplementedError(
                    "No operator found for `memory_efficient_attention_backward`: operator does not support BMGHK format"
                )
            calls["layouts"].add("BMGHK")
            assert key.shape[2:] == query.shape[2:]
            assert key.stride(3) == 0 and value.stride(3) == 0, "GQA must be a stride-0 expand, not a copy"
            _, length, kv_heads, groups, dim = query.shape
            q = query[0].reshape(length, kv_heads * groups, dim)
            k, v = key[0, :, :, 0], value[0, :, :, 0]
        else:  # [B, M, H, D]: K/V with the query's heads
            calls["layouts"].add("BMHK")
            assert query.dim() == 4 and key.shape[2:] == query.shape[2:] == value.shape[2:]
            _, length, heads, dim = query.shape
            kv_heads, groups = heads, 1
            q, k, v = query[0], key[0], value[0]
        pieces, q_start, k_start = [], 0, 0
        for q_len, k_len in zip(attn_bias.q_lens, attn_bias.k_lens, strict=True):
            pieces.append(
                segment_attention(
                    q[q_start : q_start + q_len], k[k_start : k_start + k_len], v[k_start : k_start + k_len], scale
                )
            )
            q_start, k_start = q_start + q_len, k_start + k_len
        out = torch.cat(pieces)
        return out.reshape(1, length, kv_heads, groups, dim) if query.dim() == 5 else out[None]

    fmha = types.SimpleNamespace(
        attn_bias=types.SimpleNamespace(BlockDiagonalCausalFromBottomRightMask=BlockDiagonalCausalFromBottomRightMask),
        memory_efficient_attention=memory_efficient_attention,
    )
    return types.SimpleNamespace(ops=types.SimpleNamespace(fmha=fmha)), types.SimpleNamespace(fmha=fmha)


def available_on_cpu(monkeypatch, name):
    """The stand-in runs on CPU in any dtype (the real flash-attn needs fp16/bf16: tested below)."""
    entry = dataclasses.replace(BACKENDS[name], available=lambda device: True, serves_dtype=lambda dtype: True)
    monkeypatch.setitem(BACKENDS, name, entry)


def policies(backend, micro_batch_tokens):
    model = tiny_model("qwen2")  # 4 query heads over 2 key/value heads
    reference = TreePolicy(copy.deepcopy(model), attention_backend="sdpa", micro_batch_tokens=micro_batch_tokens)
    candidate = TreePolicy(copy.deepcopy(model), attention_backend=backend, micro_batch_tokens=micro_batch_tokens)
    return reference, candidate


def check_same_logprobs_and_grads(reference, candidate, layout):
    outputs = [p.forward(layout) for p in (reference, candidate)]
    torch.testing.assert_close(outputs[1].logprobs, outputs[0].logprobs, rtol=1e-5, atol=1e-5)
    for policy, output in zip((reference, candidate), outputs, strict=True):
        policy.model.zero_grad()
        output.logprobs.sum().backward()
    grads = [{n: p.grad for n, p in policy.model.named_parameters()} for policy in (reference, candidate)]
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-4, atol=1e-5, msg=name)


def test_flash_attn_gets_keys_gathered_before_the_gqa_expansion(monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "flash_attn", fake_flash_attn(calls))
    available_on_cpu(monkeypatch, "flash_attn")
    layout = pack_response_trees(*random_rollouts(seed=11, num_traces=3))
    reference, candidate = policies("flash_attn", micro_batch_tokens=10**6)
    check_same_logprobs_and_grads(reference, candidate, layout)
    assert calls and all(call["q_heads"] == 4 and call["kv_heads"] == 2 for call in calls)


def test_xformers_builds_its_bias_once_per_micro_batch(monkeypatch):
    """One bias per micro-batch, on the model's device; [B, M, H, D] with K/V repeated after the
    gather, in training (xformers has no backward for its grouped layout) and in scoring alike."""
    calls = {"bias": 0, "attend": 0, "layouts": set(), "bias_devices": set()}
    xformers, ops = fake_xformers(calls)
    monkeypatch.setitem(sys.modules, "xformers", xformers)
    monkeypatch.setitem(sys.modules, "xformers.ops", ops)
    available_on_cpu(monkeypatch, "xformers")
    layout = pack_response_trees(*random_rollouts(seed=12, num_traces=4))
    reference, candidate = policies("xformers", micro_batch_tokens=40)
    num_micro_batches = len(candidate.micro_batches(layout))
    assert num_micro_batches > 1
    check_same_logprobs_and_grads(reference, candidate, layout)
    num_layers = candidate.model.config.num_hidden_layers
    assert (calls["bias"], calls["attend"]) == (num_micro_batches, num_micro_batches * num_layers)
    assert calls["layouts"] == {"BMHK"} and calls["bias_devices"] == {"cpu"}
    with torch.no_grad():
        scored = candidate.forward(layout).logprobs
        torch.testing.assert_close(scored, reference.forward(layout).logprobs, rtol=1e-5, atol=1e-5)
    assert calls["layouts"] == {"BMHK"}


def test_flash_attn_needs_half_precision_and_auto_skips_it_otherwise(monkeypatch):
    """flash-attn refuses fp32 q/k/v ("only support fp16 and bf16"): naming flash_attn for an fp32
    model fails before any layer runs, and ``auto`` passes over it."""
    monkeypatch.setitem(
        BACKENDS, "flash_attn", dataclasses.replace(BACKENDS["flash_attn"], available=lambda device: True)
    )
    cuda = torch.device("cuda")
    assert resolve_backend("flash_attn", cuda, head_dim=8, dtype=torch.bfloat16) == "flash_attn"
    with pytest.raises(BackendUnavailableError, match=r"with head_dim 8 and float32 q/k/v: it needs .*fp16/bf16"):
        resolve_backend("flash_attn", cuda, head_dim=8, dtype=torch.float32)
    assert resolve_backend("auto", cuda, head_dim=8, dtype=torch.bfloat16) == "flash_attn"  # flex needs >= 16
    assert resolve_backend("auto", cuda, head_dim=8, dtype=torch.float32) != "flash_attn"
    with pytest.raises(BackendUnavailableError, match="head_dim 512"):
        resolve_backend("flash_attn", cuda, head_dim=512, dtype=torch.bfloat16)


def test_mixed_qkv_dtypes_are_unified_before_the_library_call(monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "flash_attn", fake_flash_attn(calls))
    available_on_cpu(monkeypatch, "flash_attn")
    layout = pack_response_trees(*random_rollouts(seed=13, num_traces=2))
    spec = attention.prepare_tree_attention(layout.seq_ids, layout.prefix_end, layout.branch_start, "flash_attn")
    length = layout.num_tokens
    query, key = (torch.randn(1, heads, length, 8) for heads in (4, 2))  # fp32, as RoPE leaves q/k
    value = torch.randn(1, 2, length, 8, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = attention.tree_attention_forward(None, query, key, value, None, tree_attention=spec)
    assert calls[0]["dtypes"] == {torch.bfloat16} and out.dtype == torch.bfloat16


def test_auto_skips_flex_for_heads_it_cannot_serve():
    cuda = torch.device("cuda")  # resolution only reads the device type: no GPU needed
    assert resolve_backend("auto", cuda, head_dim=64) == "flex"
    fallback = resolve_backend("auto", cuda, head_dim=8)
    assert fallback in ("flash_attn", "xformers", "sdpa") and fallback != "flex"
    with pytest.raises(BackendUnavailableError, match="'flex' is not available on cuda with head_dim 8"):
        resolve_backend("flex", cuda, head_dim=8)


def test_select_trees_equals_packing_those_trees_alone():
    rollouts = random_rollouts(seed=14, num_traces=5)
    layout = pack_response_trees(*rollouts)
    rows = [3, 0, 4]
    alone = pack_response_trees(*([part[r] for r in rows] for part in rollouts))
    selected = layout.select_trees(rows)
    for field in dataclasses.fields(alone):
        expected, got = getattr(alone, field.name), getattr(selected, field.name)
        if isinstance(expected, torch.Tensor):
            assert got.dtype == expected.dtype and torch.equal(got, expected), field.name
        else:
            assert got == expected, field.name
    index = layout.tree_token_index(rows)
    assert torch.equal(layout.input_ids[index], alone.input_ids)
    with pytest.raises(IndexError, match="row 5 is out of range for a layout of 5 traces"):
        layout.select_trees([1, 5])


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["flex", "sdpa"])
def test_training_micro_batch_has_no_device_sync(backend):
    """One micro-batch forward + backward on CUDA with sync debugging set to raise."""
    layout = pack_response_trees(*random_rollouts(seed=15, num_traces=4))
    policy = TreePolicy(tiny_model("qwen2", hidden_size=64).cuda(), attention_backend=backend)
    micro_batch = policy.micro_batches(layout)[0]
    policy.logprobs(micro_batch).logprobs.sum().backward()  # compile and warm up outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        policy.logprobs(micro_batch).logprobs.sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def attend_with_grads(backend, layout, q, k, v):
    spec = attention.prepare_tree_attention(layout.seq_ids, layout.prefix_end, layout.branch_start, backend)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = BACKENDS[backend].attend(spec.state, *leaves, 0.3)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    return spec.state, out, torch.autograd.grad((out * weights).sum(), leaves)


def test_sdpa_tree_by_tree_equals_the_varlen_reference_forward_and_backward():
    """Twelve trees packed: SDPA runs one padded row per tree (12 T^2 of work instead of L^2), and
    its output and q/k/v gradients are the gather-plan reference's (K/V heads 2, query heads 4)."""
    layout = pack_response_trees(*random_rollouts(seed=21, num_traces=12))
    length = layout.seq_ids.numel()
    q, k, v = torch.randn(1, 4, length, 8), torch.randn(1, 2, length, 8), torch.randn(1, 2, length, 8)
    state, out, grads = attend_with_grads("sdpa", layout, q, k, v)
    assert isinstance(state, attention.TreeBlocks) and state.index.shape[0] == 12
    _, expected, expected_grads = attend_with_grads("reference_varlen", layout, q, k, v)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_sdpa_keeps_the_dense_mask_where_trees_are_not_one_run_each():
    """Sixteen runs of 4 tokens alternating between two sequences: rows per run would be cheap but
    wrong (a run would not see its sequence's earlier runs), so the dense mask is kept."""
    seq_ids = torch.arange(16).repeat_interleave(4) % 2
    starts = torch.zeros(64, dtype=torch.long)  # plain causal sequences: no prefix, one branch from 0
    state = attention.prepare_tree_attention(seq_ids, starts, starts, "sdpa").state
    assert not isinstance(state, attention.TreeBlocks)
    torch.testing.assert_close(state[0, 0], dense_tree_mask(seq_ids, starts, starts))
    assert bool(state[0, 0, 8, 0]) and not bool(state[0, 0, 8, 4])  # run 2 sees run 0, not run 1
