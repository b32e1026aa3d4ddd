"""The policy loss: PPO clip (separate low/high epsilon, optional dual clip), KL to a reference,
entropy bonus, and the aggregation of token losses over a mini-batch.

Every function works on the trained positions of a mini-batch (``M`` targets). Aggregation is a
per-token weight computed once per mini-batch (``token_weights``), so summing
``weight * token_loss`` over its micro-batches gives exactly the mini-batch loss, whatever the
micro-batch split.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trainer.config import AGGREGATIONS, KL_ESTIMATORS


def token_weights(
    aggregation: str, lineage_ids: torch.Tensor, num_traces: int, norm_length: int | None = None
) -> torch.Tensor:
    """``[M]`` float32 weight of each trained token in its mini-batch's loss.

    Args:
        aggregation: ``token-sum-norm`` (the authors': sum of token losses / (traces x
            ``norm_length``), a constant), ``token-mean`` (mean over tokens), ``seq-mean-token-mean``
            (mean over sequences of their token mean), ``seq-mean-token-sum-norm`` (mean over
            sequences of their token sum / ``norm_length``). A sequence is one lineage: the
            thinking of a trace, or one summary branch.
        lineage_ids: ``[M]`` int64 sequence id of every trained token (``layout.lineage_ids()``).
        num_traces: traces in the mini-batch.
        norm_length: the constant of the ``*-norm`` modes.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    count = lineage_ids.numel()
    if count == 0:
        return torch.zeros(0, device=lineage_ids.device)
    if aggregation in ("token-sum-norm", "seq-mean-token-sum-norm") and (norm_length is None or norm_length < 1):
        raise ValueError(f"aggregation {aggregation!r} needs norm_length >= 1, got {norm_length!r}")
    if aggregation == "token-sum-norm":
        return torch.full((count,), 1.0 / (num_traces * norm_length), device=lineage_ids.device)
    if aggregation == "token-mean":
        return torch.full((count,), 1.0 / count, device=lineage_ids.device)
    _, inverse, lengths = torch.unique(lineage_ids, return_inverse=True, return_counts=True)
    num_sequences = lengths.numel()
    if aggregation == "seq-mean-token-mean":
        return 1.0 / (num_sequences * lengths[inverse].float())
    return torch.full((count,), 1.0 / (num_sequences * norm_length), device=lineage_ids.device)


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi (Schulman's k1, k2, k3).

    With ``log_r = ref_logprobs - logprobs``: k1 = -log_r, k2 = log_r^2 / 2, k3 = exp(log_r) - 1 - log_r.
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")
    log_ratio = ref_logprobs - logprobs
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.square()
    return torch.expm1(log_ratio) - log_ratio


@dataclass
class LossTerms:
    """The weighted loss of some trained tokens and the sums behind the step's metrics.

    Attributes:
        loss: scalar, ``sum(weight * token_loss)``; differentiable.
        sums: detached 0-d tensor sums over the tokens (``tokens``, ``clipped``, ``ratio``,
            ``approx_kl``, ``kl``, ``entropy``, ``pg_loss``), kept on the device so the step does
            not sync per micro-batch; the caller divides by ``tokens``.
    """

    loss: torch.Tensor
    sums: dict[str, torch.Tensor]


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    weights: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
) -> LossTerms:
    """PPO-clip loss of ``M`` trained tokens.

    Args:
        logprobs: ``[M]`` fp32 under the current policy (differentiable).
        old_logprobs: ``[M]`` under the policy that sampled (detached).
        advantages: ``[M]`` per-token advantages (BRPO thinking/summary advantages).
        weights: ``[M]`` aggregation weights (``token_weights``).
        clip_low, clip_high: the ratio is clipped to ``[1 - clip_low, 1 + clip_high]``.
        dual_clip: c > 1: for negative advantages the loss is at most ``-c * A`` (None: off).
        ref_logprobs: ``[M]`` under the frozen reference, for the KL term (``kl_coef > 0``).
        entropy: ``[M]`` per-position entropy, for the bonus (``entropy_coef > 0``).

    Per token: ``max(-A r, -A clip(r))`` (then ``min(., -c A)`` where A < 0 with dual clip)
    ``+ kl_coef * KL - entropy_coef * H``.
    """
    shapes = {t.shape for t in (logprobs, old_logprobs, advantages, weights)}
    if len(shapes) != 1 or logprobs.dim() != 1:
        raise ValueError(f"logprobs, old_logprobs, advantages and weights must be [M] alike, got shapes {shapes}")
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    token_loss = torch.maximum(unclipped, clipped)
    if dual_clip is not None:
        token_loss = torch.where(advantages < 0, torch.minimum(token_loss, -dual_clip * advantages), token_loss)
    pg_loss = token_loss
    sums = {
        "tokens": torch.tensor(float(logprobs.numel()), device=logprobs.device),
        "clipped": (clipped > unclipped).sum().float(),
        "ratio": ratio.detach().sum(),
        "approx_kl": (0.5 * log_ratio.detach().square()).sum(),
        "pg_loss": pg_loss.detach().sum(),
    }
    if kl_coef > 0:
        if ref_logprobs is None:
            raise ValueError("kl_coef > 0 needs ref_logprobs")
        kl = kl_penalty(logprobs, ref_logprobs, kl_estimator)
        token_loss = token_loss + kl_coef * kl
        sums["kl"] = kl.detach().sum()
    if entropy is not None:
        sums["entropy"] = entropy.detach().sum()
        if entropy_coef > 0:
            token_loss = token_loss - entropy_coef * entropy
    return LossTerms((weights * token_loss).sum(), sums)
