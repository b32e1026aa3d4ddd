"""Pure-torch reference of the BRPO advantage rules (ARCHITECTURE.md, "The method in one page").

Readable on purpose: each line is one rule. Tests check the C++ op and the Triton kernels against
independent loops and against this; it computes in float64 and returns float32 like the kernels.
Inputs are assumed valid (``anytime_kernels.advantages`` checks them).

Notation: n trace (G consecutive traces form a group), s budget slot (0-based), a summary.
"""

from __future__ import annotations

import torch

from anytime_kernels.constants import TokenKind


def brpo_advantages_reference(
    scores: torch.Tensor,
    cut_lens: torch.Tensor,
    group_size: int,
    budget_probs: torch.Tensor,
    variance_reduction: str = "brpo",
    summary_method: str = "brpo",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Thinking and summary advantages.

    Args:
        scores: ``[N, S, A]`` summary scores r[n, s, a].
        cut_lens: ``[N, S]`` non-decreasing cut lengths c_s (slots with equal cuts share a cut).
        group_size: G, traces per prompt; N is a multiple of G.
        budget_probs: ``[S]`` prior weights p_s (normalised here).
        variance_reduction: ``brpo``, ``v1only``, ``v2only`` or ``none``.
        summary_method: ``brpo`` or ``grpo``.

    Returns:
        ``thinking_adv [N, S]`` and ``summary_adv [N, S, A]``, float32.
    """
    num_traces, num_slots, num_summaries = scores.shape
    r = scores.double()
    p = budget_probs.double().to(r.device)
    p = p / p.sum()
    slot = torch.arange(num_slots, device=r.device, dtype=torch.float64)

    rbar = r.mean(dim=2)  # [N, S]
    # R_s = sum_{k>=s} p_k rbar_k, a reverse cumulative sum over the slots.
    returns = (rbar * p).flip(1).cumsum(1).flip(1)
    tail_prob = p.flip(0).cumsum(0).flip(0)  # sum_{k>=s} p_k

    # V2_s: mean of R_s over the group (0 without a group to average over).
    if group_size > 1:
        group_mean = returns.view(-1, group_size, num_slots).mean(dim=1, keepdim=True)
        v2 = group_mean.expand(-1, group_size, -1).reshape(num_traces, num_slots)
    else:
        v2 = torch.zeros_like(returns)

    # V1_s: 2^k-weighted mean of rbar_k over the earlier slots k < s, times the remaining mass.
    weight = 2.0**slot
    earlier_sum = (rbar * weight).cumsum(1) - rbar * weight  # sum_{k<s} 2^k rbar_k
    earlier_weight = weight.cumsum(0) - weight  # sum_{k<s} 2^k
    v1 = torch.where(slot > 0, earlier_sum / earlier_weight.clamp_min(1.0) * tail_prob, torch.zeros_like(rbar))

    if variance_reduction == "brpo":
        baseline = (slot * v1 + (num_slots - slot) * v2) / num_slots
    elif variance_reduction == "v1only":
        baseline = v1
    elif variance_reduction == "v2only":
        baseline = v2
    elif variance_reduction == "none":
        baseline = torch.zeros_like(returns)
    else:
        raise ValueError(f"unknown variance_reduction {variance_reduction!r}")
    thinking_adv = returns - baseline

    if num_summaries == 1:
        # One summary per slot: the baseline is the group mean of r[., s, 0].
        first = r[:, :, 0].view(-1, group_size, num_slots).mean(dim=1, keepdim=True)
        summary_baseline = first.expand(-1, group_size, -1).reshape(num_traces, num_slots, 1)
    else:
        # Mean of every summary score sharing the slot's distinct cut; each slot holds A of them,
        # so it is the mean of rbar over the slots with an equal cut.
        same_cut = (cut_lens[:, :, None] == cut_lens[:, None, :]).double()  # [N, S, S]
        shared_mean = (same_cut * rbar[:, None, :]).sum(2) / same_cut.sum(2)
        summary_baseline = shared_mean[:, :, None]
    summary_adv = r - summary_baseline
    if summary_method == "grpo":
        keep = torch.zeros_like(summary_adv)
        keep[:, -1, -1] = 1.0
        summary_adv = summary_adv * keep
    elif summary_method != "brpo":
        raise ValueError(f"unknown summary_method {summary_method!r}")
    return thinking_adv.float(), summary_adv.float()


def token_advantages_reference(
    seq_ids: torch.Tensor,
    token_kind: torch.Tensor,
    slot: torch.Tensor,
    summary_index: torch.Tensor,
    thinking_adv: torch.Tensor,
    summary_adv: torch.Tensor,
) -> torch.Tensor:
    """Per-token advantages ``[T]`` float32 from the layout's per-token fields.

    Thinking token of slot s in trace n -> ``thinking_adv[n, s]`` (0 beyond the last cut, slot -1);
    summary token of branch (s, a) -> ``summary_adv[n, s, a]``; prompt and inserted tokens -> 0.
    """
    n = seq_ids.long()
    s = slot.long().clamp_min(0)
    a = summary_index.long().clamp_min(0)
    thinking = (token_kind == TokenKind.THINKING) & (slot >= 0)
    summary = token_kind == TokenKind.SUMMARY
    out = torch.zeros(seq_ids.shape, dtype=torch.float32, device=seq_ids.device)
    out[thinking] = thinking_adv.float()[n[thinking], s[thinking]]
    out[summary] = summary_adv.float()[n[summary], s[summary], a[summary]]
    return out
