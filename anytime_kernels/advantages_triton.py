"""Triton kernels for the BRPO advantages (rules: ARCHITECTURE.md; readable version: advantages_reference.py).

``_group_advantages_kernel``: one program per group of G traces holds the group's ``[G, S, A]``
scores in registers and computes in one pass the mean scores, the returns R_s, V1_s, V2_s, the
thinking advantages and the summary baselines. S and A are small (S, A <= 16 in practice), so the
reverse cumulative sums over slots are done as masked ``[G, S, S]`` reductions.

``_token_advantages_kernel``: one program per ``BLOCK`` packed tokens gathers each token's
advantage from the per-token layout fields; it is a pure streaming kernel (13 bytes read and 4
written per token, the gathered tables stay in cache).

Inputs are validated by ``anytime_kernels.advantages`` before these launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from anytime_kernels._interpreter import LAUNCH_OPTIONS, patch_interpreter
from anytime_kernels.constants import TokenKind

VARIANCE_REDUCTION_CODES = {"brpo": 0, "v1only": 1, "v2only": 2, "none": 3}
SUMMARY_METHOD_CODES = {"brpo": 0, "grpo": 1}
TOKEN_BLOCK = 1024
patch_interpreter()


@triton.jit
def _group_advantages_kernel(
    scores_ptr,  # [N, S, A] fp32
    cut_lens_ptr,  # [N, S] int64
    probs_ptr,  # [S] fp32, normalised
    thinking_ptr,  # [N, S] fp32 out
    summary_ptr,  # [N, S, A] fp32 out
    G: tl.constexpr,
    S: tl.constexpr,
    A: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_A: tl.constexpr,
    VARIANCE_REDUCTION: tl.constexpr,
    SUMMARY_METHOD: tl.constexpr,
):
    group = tl.program_id(0)
    g = tl.arange(0, BLOCK_G)
    s = tl.arange(0, BLOCK_S)
    a = tl.arange(0, BLOCK_A)
    n = group.to(tl.int64) * G + g  # [BG] trace index
    g_ok = g < G
    s_ok = s < S
    a_ok = a < A

    score_offsets = n[:, None, None] * (S * A) + s[None, :, None] * A + a[None, None, :]
    score_mask = g_ok[:, None, None] & s_ok[None, :, None] & a_ok[None, None, :]
    r = tl.load(scores_ptr + score_offsets, mask=score_mask, other=0.0)  # [BG, BS, BA]
    p = tl.load(probs_ptr + s, mask=s_ok, other=0.0)  # [BS]
    rbar = tl.sum(r, axis=2) / A  # [BG, BS]

    # k indexes the summed slot, s the output slot: [BS(k), BS(s)] masks.
    k2 = s[:, None]
    s2 = s[None, :]
    at_or_after = (k2 >= s2) & (k2 < S)
    before = k2 < s2
    # R_s = sum_{k>=s} p_k rbar_k
    returns = tl.sum(tl.where(at_or_after[None, :, :], (rbar * p[None, :])[:, :, None], 0.0), axis=1)
    tail_prob = tl.sum(tl.where(at_or_after, p[:, None], 0.0), axis=0)  # [BS]
    # V1_s: 2^(k-s)-weighted mean of rbar_k over k < s (the 2^-s factor cancels), times tail_prob.
    discount = tl.where(before, tl.exp2((k2 - s2).to(tl.float32)), 0.0)  # [BS(k), BS(s)]
    earlier = tl.sum(rbar[:, :, None] * discount[None, :, :], axis=1)  # [BG, BS]
    earlier_weight = tl.sum(discount, axis=0)  # [BS]
    v1 = tl.where(s[None, :] > 0, earlier / tl.maximum(earlier_weight, 1e-30)[None, :] * tail_prob[None, :], 0.0)
    # V2_s: group mean of R_s.
    if G > 1:
        v2 = tl.sum(tl.where(g_ok[:, None], returns, 0.0), axis=0)[None, :] / G
    else:
        v2 = tl.zeros([1, BLOCK_S], dtype=tl.float32)
    s_float = s[None, :].to(tl.float32)
    if VARIANCE_REDUCTION == 0:
        baseline = (s_float * v1 + (S - s_float) * v2) / S
    elif VARIANCE_REDUCTION == 1:
        baseline = v1
    elif VARIANCE_REDUCTION == 2:
        baseline = v2
    else:
        baseline = 0.0
    thinking = returns - baseline
    gs_mask = g_ok[:, None] & s_ok[None, :]
    tl.store(thinking_ptr + n[:, None] * S + s[None, :], thinking, mask=gs_mask)

    if A == 1:
        # Group mean of r[., s, 0].
        first = tl.sum(r, axis=2)  # [BG, BS], the only summary
        summary_baseline = tl.sum(first, axis=0)[None, :] / G  # [1, BS]
    else:
        # Mean of rbar over the slots sharing this slot's distinct cut.
        cuts = tl.load(cut_lens_ptr + n[:, None] * S + s[None, :], mask=gs_mask, other=-1)  # [BG, BS]
        same = (cuts[:, :, None] == cuts[:, None, :]) & s_ok[None, None, :]  # [BG, BS(s), BS(k)]
        shared = tl.sum(tl.where(same, rbar[:, None, :], 0.0), axis=2)
        count = tl.sum(same.to(tl.float32), axis=2)
        summary_baseline = shared / tl.maximum(count, 1.0)
    summary = r - summary_baseline[:, :, None]
    if SUMMARY_METHOD == 1:
        last = (s[None, :, None] == S - 1) & (a[None, None, :] == A - 1)
        summary = tl.where(last, summary, 0.0)
    tl.store(summary_ptr + score_offsets, summary, mask=score_mask)


@triton.jit
def _token_advantages_kernel(
    seq_ids_ptr,  # [T] int32
    token_kind_ptr,  # [T] int8
    slot_ptr,  # [T] int32
    summary_index_ptr,  # [T] int32
    thinking_ptr,  # [N, S] fp32
    summary_ptr,  # [N, S, A] fp32
    out_ptr,  # [T] fp32
    num_tokens,
    S: tl.constexpr,
    A: tl.constexpr,
    THINKING: tl.constexpr,
    SUMMARY: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = offsets < num_tokens
    trace = tl.load(seq_ids_ptr + offsets, mask=in_range, other=0).to(tl.int64)
    kind = tl.load(token_kind_ptr + offsets, mask=in_range, other=0)
    slot = tl.load(slot_ptr + offsets, mask=in_range, other=-1).to(tl.int64)
    summary_index = tl.load(summary_index_ptr + offsets, mask=in_range, other=0).to(tl.int64)
    is_thinking = in_range & (kind == THINKING) & (slot >= 0)
    is_summary = in_range & (kind == SUMMARY)
    thinking = tl.load(thinking_ptr + trace * S + slot, mask=is_thinking, other=0.0)
    summary = tl.load(summary_ptr + (trace * S + slot) * A + summary_index, mask=is_summary, other=0.0)
    tl.store(out_ptr + offsets, tl.where(is_summary, summary, thinking), mask=in_range)


def brpo_advantages_triton(
    scores: torch.Tensor,
    cut_lens: torch.Tensor,
    group_size: int,
    budget_probs: torch.Tensor,
    variance_reduction: str,
    summary_method: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``scores [N, S, A]``, ``cut_lens [N, S]``, ``budget_probs [S]`` -> ``([N, S], [N, S, A])`` fp32."""
    num_traces, num_slots, num_summaries = scores.shape
    scores = scores.float().contiguous()
    cut_lens = cut_lens.long().contiguous()
    probs = budget_probs.double()
    probs = (probs / probs.sum()).float().contiguous()
    thinking_adv = torch.empty(num_traces, num_slots, dtype=torch.float32, device=scores.device)
    summary_adv = torch.empty_like(scores)
    _group_advantages_kernel[(num_traces // group_size,)](
        scores,
        cut_lens,
        probs,
        thinking_adv,
        summary_adv,
        G=group_size,
        S=num_slots,
        A=num_summaries,
        BLOCK_G=triton.next_power_of_2(group_size),
        BLOCK_S=triton.next_power_of_2(num_slots),
        BLOCK_A=triton.next_power_of_2(num_summaries),
        VARIANCE_REDUCTION=VARIANCE_REDUCTION_CODES[variance_reduction],
        SUMMARY_METHOD=SUMMARY_METHOD_CODES[summary_method],
        **LAUNCH_OPTIONS,
    )
    return thinking_adv, summary_adv


def token_advantages_triton(
    seq_ids: torch.Tensor,
    token_kind: torch.Tensor,
    slot: torch.Tensor,
    summary_index: torch.Tensor,
    thinking_adv: torch.Tensor,
    summary_adv: torch.Tensor,
) -> torch.Tensor:
    """Per-token fields ``[T]`` and advantage tables ``[N, S]``, ``[N, S, A]`` -> advantages ``[T]`` fp32."""
    num_tokens = seq_ids.numel()
    out = torch.empty(num_tokens, dtype=torch.float32, device=seq_ids.device)
    if num_tokens == 0:
        return out
    _token_advantages_kernel[(triton.cdiv(num_tokens, TOKEN_BLOCK),)](
        seq_ids.to(torch.int32).contiguous(),
        token_kind.to(torch.int8).contiguous(),
        slot.to(torch.int32).contiguous(),
        summary_index.to(torch.int32).contiguous(),
        thinking_adv.float().contiguous(),
        summary_adv.float().contiguous(),
        out,
        num_tokens,
        S=thinking_adv.shape[1],
        A=summary_adv.shape[2],
        THINKING=int(TokenKind.THINKING),
        SUMMARY=int(TokenKind.SUMMARY),
        BLOCK=TOKEN_BLOCK,
        **LAUNCH_OPTIONS,
    )
    return out
