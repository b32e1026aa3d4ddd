"""BRPO advantages over segmented budget prefixes: argument checks and dispatch.

The rules are ARCHITECTURE.md's ("The method in one page"); ``advantages_reference`` spells them
out in plain torch. ``backend="auto"`` runs Triton on CUDA and the compiled C++ op on the CPU;
``triton`` also runs on CPU tensors under ``TRITON_INTERPRET=1``; ``reference`` is the plain-torch
version. Every input is checked here, before any kernel launches.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from anytime_kernels._extension import ops
from anytime_kernels.advantages_reference import brpo_advantages_reference, token_advantages_reference
from anytime_kernels.backends import resolve_backend
from anytime_kernels.tree import ResponseTreeLayout

VARIANCE_REDUCTIONS = ("brpo", "v1only", "v2only", "none")
SUMMARY_METHODS = ("brpo", "grpo")


def _check_scores(scores: torch.Tensor) -> None:
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"scores must be a tensor [N, S, A], got {type(scores).__name__}")
    if scores.dim() != 3 or min(scores.shape) < 1:
        raise ValueError(f"scores must have shape [N, S, A] with N, S, A >= 1, got {tuple(scores.shape)}")
    if not scores.dtype.is_floating_point:
        raise ValueError(f"scores must be a floating-point tensor, got dtype {scores.dtype}")
    finite = torch.isfinite(scores)
    if not bool(finite.all()):
        n, s, a = (int(i) for i in (~finite).nonzero()[0])
        raise ValueError(f"scores must be finite; scores[{n}, {s}, {a}] = {scores[n, s, a].item()}")


def _check_cut_lens(cut_lens: torch.Tensor, scores: torch.Tensor) -> None:
    num_traces, num_slots, _ = scores.shape
    if not isinstance(cut_lens, torch.Tensor):
        raise TypeError(f"cut_lens must be an integer tensor [N, S], got {type(cut_lens).__name__}")
    if tuple(cut_lens.shape) != (num_traces, num_slots):
        raise ValueError(
            f"cut_lens must have shape [N={num_traces}, S={num_slots}] to match scores, got {tuple(cut_lens.shape)}"
        )
    if cut_lens.dtype.is_floating_point or cut_lens.dtype.is_complex or cut_lens.dtype == torch.bool:
        raise ValueError(f"cut_lens must be an integer tensor, got dtype {cut_lens.dtype}")
    if cut_lens.device != scores.device:
        raise ValueError(f"cut_lens is on {cut_lens.device} but scores is on {scores.device}")
    negative = cut_lens < 0
    if bool(negative.any()):
        n, s = (int(i) for i in negative.nonzero()[0])
        raise ValueError(f"cut_lens must be >= 0; cut_lens[{n}, {s}] = {int(cut_lens[n, s])}")
    decreasing = cut_lens[:, 1:] < cut_lens[:, :-1]
    if bool(decreasing.any()):
        n, s = (int(i) for i in decreasing.nonzero()[0])
        raise ValueError(
            f"cut_lens must be non-decreasing over the slots; trace {n} has cut_lens[{n}, {s}] = "
            f"{int(cut_lens[n, s])} then cut_lens[{n}, {s + 1}] = {int(cut_lens[n, s + 1])}"
        )


def _check_budget_probs(budget_probs: torch.Tensor | Sequence[float], num_slots: int, device) -> torch.Tensor:
    probs = torch.as_tensor(budget_probs, dtype=torch.float64, device=device)
    if probs.shape != (num_slots,):
        raise ValueError(f"budget_probs must have shape [S={num_slots}], got {tuple(probs.shape)}")
    values = probs.tolist()
    if not all(math.isfinite(v) and v >= 0 for v in values):
        raise ValueError(f"budget_probs must be finite and >= 0, got {values}")
    if sum(values) <= 0:
        raise ValueError(f"budget_probs must not all be zero, got {values}")
    return probs


def _check_inputs(
    scores: torch.Tensor,
    cut_lens: torch.Tensor,
    group_size: int,
    budget_probs: torch.Tensor | Sequence[float],
    variance_reduction: str,
    summary_method: str,
) -> torch.Tensor:
    if variance_reduction not in VARIANCE_REDUCTIONS:
        raise ValueError(f"variance_reduction must be one of {VARIANCE_REDUCTIONS}, got {variance_reduction!r}")
    if summary_method not in SUMMARY_METHODS:
        raise ValueError(f"summary_method must be one of {SUMMARY_METHODS}, got {summary_method!r}")
    _check_scores(scores)
    num_traces = scores.shape[0]
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be an int >= 1, got {group_size!r}")
    if num_traces % group_size:
        raise ValueError(f"N={num_traces} traces is not divisible by group_size={group_size}")
    _check_cut_lens(cut_lens, scores)
    return _check_budget_probs(budget_probs, scores.shape[1], scores.device)


def brpo_advantages(
    scores: torch.Tensor,
    cut_lens: torch.Tensor,
    group_size: int,
    budget_probs: torch.Tensor | Sequence[float],
    *,
    variance_reduction: str = "brpo",
    summary_method: str = "brpo",
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Thinking and summary advantages of every trace and budget slot.

    Args:
        scores: ``[N, S, A]`` float summary scores r[n, s, a]; the G traces of a prompt are consecutive.
        cut_lens: ``[N, S]`` int cut lengths c_s, non-decreasing over s (equal cuts share one distinct cut).
        group_size: G, traces per prompt; must divide N.
        budget_probs: ``[S]`` prior weights p_s, >= 0, normalised here.
        variance_reduction: thinking baseline, one of ``brpo``, ``v1only``, ``v2only``, ``none``.
        summary_method: ``brpo`` (every summary) or ``grpo`` (only the last summary of the last slot).
        backend: ``auto``, ``triton``, ``cpp`` or ``reference``.

    Returns:
        ``thinking_adv [N, S]`` (for the thinking tokens of segment [c_{s-1}, c_s)) and
        ``summary_adv [N, S, A]``, float32 on the device of ``scores``.

    Raises:
        ValueError: non-finite scores, N not divisible by G, negative or all-zero probabilities,
            negative or decreasing cut lengths, mismatched shapes or devices, unknown names.
    """
    probs = _check_inputs(scores, cut_lens, group_size, budget_probs, variance_reduction, summary_method)
    chosen = resolve_backend("brpo_advantages", backend, scores.device)
    if chosen == "reference":
        return brpo_advantages_reference(scores, cut_lens, group_size, probs, variance_reduction, summary_method)
    if chosen == "cpp":
        thinking_adv, summary_adv = ops.brpo_advantages(
            scores, cut_lens, group_size, probs, variance_reduction, summary_method
        )
        return thinking_adv, summary_adv
    from anytime_kernels.advantages_triton import brpo_advantages_triton

    return brpo_advantages_triton(scores, cut_lens, group_size, probs, variance_reduction, summary_method)


def token_advantages(
    layout: ResponseTreeLayout,
    thinking_adv: torch.Tensor,
    summary_adv: torch.Tensor,
    *,
    align: str = "token",
    backend: str = "auto",
) -> torch.Tensor:
    """Advantage of every packed token, ``[T]`` float32 on the layout's device.

    Thinking tokens of segment [c_{s-1}, c_s) of trace n get ``thinking_adv[n, s]`` (thinking
    beyond the last cut gets 0), summary tokens of branch (s, a) get ``summary_adv[n, s, a]``,
    prompt and inserted tokens get 0.

    For the loss: a trained target sits at flat index t + 1 of the position t that predicts it
    (``labels[t] == input_ids[t + 1]`` where ``loss_mask[t]``), so the advantage of the target
    predicted at t is ``token_adv[t + 1]``: use ``token_adv[1:]`` aligned with ``loss_mask[:-1]``.
    With non-empty inserted delimiters, ``token_adv[1:] != 0`` only where ``loss_mask[:-1]``.

    Args:
        layout: the packed batch (``anytime_kernels.pack_response_trees``), on CPU or CUDA.
        thinking_adv: ``[N, S]`` float, from ``brpo_advantages``.
        summary_adv: ``[N, S, A]`` float, from ``brpo_advantages``.
        align: ``token`` (entry t is token t's own advantage) or ``predicting`` (entry t is the
            advantage of the target that position t predicts, ``token_adv[t + 1]`` where
            ``loss_mask[t]``, else 0: aligned with the log-probs of ``labels[t]``, ready for the
            loss). This is the one place the t / t + 1 alignment is made.
        backend: ``auto`` (Triton on CUDA, C++ on CPU), ``triton``, ``cpp`` or ``reference``.
    """
    if align not in ("token", "predicting"):
        raise ValueError(f"align must be 'token' or 'predicting', got {align!r}")
    per_token = _token_advantages(layout, thinking_adv, summary_adv, backend)
    if align == "token":
        return per_token
    predicted = torch.zeros_like(per_token)
    predicted[:-1] = per_token[1:]
    return torch.where(layout.loss_mask, predicted, 0.0)


def _token_advantages(
    layout: ResponseTreeLayout, thinking_adv: torch.Tensor, summary_adv: torch.Tensor, backend: str
) -> torch.Tensor:
    if not isinstance(layout, ResponseTreeLayout):
        raise TypeError(f"layout must be a ResponseTreeLayout, got {type(layout).__name__}")
    num_traces, num_slots, num_summaries = layout.num_traces, layout.num_slots, layout.num_summaries
    device = layout.seq_ids.device
    for name, tensor, shape in (
        ("thinking_adv", thinking_adv, (num_traces, num_slots)),
        ("summary_adv", summary_adv, (num_traces, num_slots, num_summaries)),
    ):
        if not isinstance(tensor, torch.Tensor) or not tensor.dtype.is_floating_point:
            raise ValueError(f"{name} must be a floating-point tensor, got {getattr(tensor, 'dtype', type(tensor))}")
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{name} must have shape {list(shape)} to match the layout, got {tuple(tensor.shape)}")
        if tensor.device != device:
            raise ValueError(f"{name} is on {tensor.device} but the layout is on {device}")
    chosen = resolve_backend("token_advantages", backend, device)
    if chosen == "reference":
        return token_advantages_reference(
            layout.seq_ids, layout.token_kind, layout.slot, layout.summary_index, thinking_adv, summary_adv
        )
    if chosen == "cpp":
        return ops.token_advantages(
            layout.cu_seqlens,
            layout.prompt_lens,
            layout.thinking_lens,
            layout.cut_lens,
            layout.token_kind,
            layout.slot,
            layout.summary_index,
            layout.branch_start,
            thinking_adv,
            summary_adv,
        )
    from anytime_kernels.advantages_triton import token_advantages_triton

    return token_advantages_triton(
        layout.seq_ids, layout.token_kind, layout.slot, layout.summary_index, thinking_adv, summary_adv
    )


@dataclass
class AdvantageStats:
    """Per-slot statistics of one batch, for logging.

    Attributes:
        mean_score: ``[S]`` mean of r[n, s, a] over traces and summaries (accuracy at budget s).
        return_variance: ``[S]`` variance over the N traces of the return R_s.
        variance_ratio: per baseline name (``brpo``, ``v1only``, ``v2only``, ``none``), ``[S]``
            variance of the thinking advantage over the N traces divided by ``return_variance``
            (the paper's variance-reduction figure; ``none`` is 1); NaN where the return does not vary.
        advantage_variance: per baseline name, ``[S]`` the numerator of ``variance_ratio`` (to pool
            the ratio over steps: sum of numerators over sum of ``return_variance``).
    """

    mean_score: torch.Tensor
    return_variance: torch.Tensor
    variance_ratio: dict[str, torch.Tensor]
    advantage_variance: dict[str, torch.Tensor] = field(default_factory=dict)

    def metrics(self, prefix: str = "advantages") -> dict[str, float]:
        """Flat ``{name: value}`` for a logger, one entry per slot and quantity."""
        out: dict[str, float] = {}
        for s, value in enumerate(self.mean_score.tolist()):
            out[f"{prefix}/mean_score/slot{s}"] = value
        for name, ratios in self.variance_ratio.items():
            for s, value in enumerate(ratios.tolist()):
                out[f"{prefix}/variance_ratio/{name}/slot{s}"] = value
        return out


def advantage_stats(
    scores: torch.Tensor,
    cut_lens: torch.Tensor,
    group_size: int,
    budget_probs: torch.Tensor | Sequence[float],
    *,
    backend: str = "auto",
) -> AdvantageStats:
    """Mean score per slot and the variance of the thinking advantage under each baseline.

    Args and checks as ``brpo_advantages`` (``scores [N, S, A]``, ``cut_lens [N, S]``, ``budget_probs [S]``).
    """
    _check_inputs(scores, cut_lens, group_size, budget_probs, "brpo", "brpo")
    mean_score = scores.double().mean(dim=(0, 2)).float()
    returns, _ = brpo_advantages(scores, cut_lens, group_size, budget_probs, variance_reduction="none", backend=backend)
    return_variance = returns.double().var(dim=0, unbiased=False)
    ratios, variances = {}, {}
    for name in VARIANCE_REDUCTIONS:
        thinking_adv, _ = brpo_advantages(
            scores, cut_lens, group_size, budget_probs, variance_reduction=name, backend=backend
        )
        variance = thinking_adv.double().var(dim=0, unbiased=False)
        ratio = torch.where(return_variance > 0, variance / return_variance, torch.full_like(variance, math.nan))
        ratios[name] = ratio.float()
        variances[name] = variance.float()
    return AdvantageStats(mean_score=mean_score, return_variance=return_variance.float(), variance_ratio=ratios,
                          advantage_variance=variances)  # fmt: skip
