"""Per-token log-probs with the full ``[M, V]`` logits: the plain-torch reference.

Tests compare every backend of ``fused_logprobs`` with this function, and the benchmark times it
as the baseline. It is what a trainer without fused kernels writes: one matmul in the input dtype
(fp32 accumulation inside the GEMM), logits upcast to fp32, ``log_softmax``, gather.
"""

from __future__ import annotations

import torch

from anytime_kernels.constants import IGNORE_INDEX


def fused_logprobs_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    rows: torch.Tensor | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of every target (and the entropy of its distribution), differentiable.

    Args:
        hidden: ``[N, H]`` hidden states.
        weight: ``[V, H]`` LM head.
        targets: ``[M]`` int64 token ids; ``IGNORE_INDEX`` (-100) gives log-prob 0 and entropy 0.
        rows: ``[M]`` int64 hidden row that predicts each target (default: row i, with M == N).
        temperature: logits are divided by it before the softmax.
        return_entropy: also return the entropy of each distribution.

    Returns:
        ``logprobs [M]`` fp32, and ``entropy [M]`` fp32 when ``return_entropy``.
    """
    selected = hidden if rows is None else hidden.index_select(0, rows)
    logits = (selected @ weight.T).float() / temperature
    log_probs = torch.log_softmax(logits, dim=-1)
    valid = targets != IGNORE_INDEX
    safe_targets = torch.where(valid, targets, 0)
    picked = log_probs.gather(1, safe_targets.unsqueeze(1)).squeeze(1)
    logprobs = torch.where(valid, picked, 0.0)
    if not return_entropy:
        return logprobs
    entropy = -(log_probs.exp() * log_probs).sum(dim=-1)
    return logprobs, torch.where(valid, entropy, 0.0)
