"""What ``bench_logprobs.py`` times: four losses over the LM head, each by ours, the full-logits
reference and the third-party kernels built for it, with exact fp64 gradients to rate them.

Workloads (each a scalar loss of ``hidden [M, H]`` and ``weight [V, H]``; ``lp``/``ent`` the per-token
log-probs and entropies):

- ``logprobs``: ``sum(g * lp)``, the op itself with an arbitrary upstream gradient.
- ``entropy``: ``sum(g * lp + g_ent * ent)``, the entropy's gradient path (an entropy bonus).
- ``grpo``: the trainer's PPO-clip loss (``trainer.loss.policy_loss``, token-sum-norm weights
  ``1/(B T)``, clip 0.2, no KL) on log-probs asked with ``return_entropy=True``, as the learner does
  (entropy logged, no bonus): ``triton_grpo``. Liger's fused linear GRPO loss computes the same
  loss with ``loss_type="dr_grpo"`` (sum over tokens / (B x max_completion_length)), ``beta=0``.
- ``cross_entropy``: ``-sum(lp)``, the scalar loss fused linear cross-entropy kernels are built for.

Inputs are peaked like a trained model's: logits ``hidden @ weight.T`` with a standard deviation
of ``LOGIT_STD`` (mean entropy 2.5 nats at V = 151,936, against 11.4 for the std-1 logits of an
untrained head, where CCE's gradient filter would drop every entry but the target's; 64 rows of
``torch.randn(64, 151936) * std`` on a CPU), and targets sampled from the softmax, as an RL
policy's own tokens are.

The third-party anchors import lazily (the ``bench`` extra; both need CUDA) and are skipped with
the reason when absent: Liger-Kernel (``liger_kernel``) and Apple's Cut Cross-Entropy
(``cut_cross_entropy``).
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from anytime_kernels import fused_logprobs
from anytime_kernels.logprobs_reference import fused_logprobs_reference
from trainer.loss import policy_loss

# Standard deviation of the benchmark's logits: a peaked distribution (see the module docstring).
LOGIT_STD = 6.0
# Tokens per sequence of the GRPO workload (B = M / SEQUENCE_LENGTH sequences).
SEQUENCE_LENGTH = 1024
CLIP = 0.2
# Rows per chunk of the fp64 exact gradients: bounds their [chunk, V] fp64 temporaries.
EXACT_ROWS = 1024


@dataclass
class Batch:
    """One benchmark input. ``hidden [M, H]`` and ``weight [V, H]`` are leaves that require grad.

    Attributes:
        targets: ``[M]`` int64 sampled from the softmax. grad_logprobs, grad_entropy: ``[M]`` fp32
            upstream gradients of the per-token workloads. advantages: ``[B]`` fp32, one per
            sequence. old_logprobs: ``[M]`` fp32, the exact log-probs plus N(0, 0.1) noise (some
            ratios clip).
    """

    hidden: torch.Tensor
    weight: torch.Tensor
    targets: torch.Tensor
    grad_logprobs: torch.Tensor
    grad_entropy: torch.Tensor
    advantages: torch.Tensor
    old_logprobs: torch.Tensor

    @property
    def sequences(self) -> int:
        return self.advantages.numel()

    @property
    def length(self) -> int:
        return self.targets.numel() // self.sequences

    def token_advantages(self) -> torch.Tensor:
        return self.advantages.repeat_interleave(self.length)

    def token_weights(self) -> torch.Tensor:
        """Token-sum-norm with norm_length = T: 1 / (B T) per token (``trainer.loss.token_weights``)."""
        return torch.full_like(self.grad_logprobs, 1.0 / self.targets.numel())


def make_batch(num_rows: int, width: int, vocab: int, dtype: torch.dtype, device: str, seed: int = 0) -> Batch:
    """A peaked benchmark input of ``num_rows`` tokens in sequences of at most ``SEQUENCE_LENGTH``."""
    length = min(SEQUENCE_LENGTH, num_rows)
    if num_rows % length:
        raise ValueError(f"num_rows must be a multiple of {length} (the sequence length), got {num_rows}")
    generator = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(num_rows, width, generator=generator, device=device).to(dtype)
    weight = (torch.randn(vocab, width, generator=generator, device=device) * (LOGIT_STD * width**-0.5)).to(dtype)
    targets = torch.empty(num_rows, dtype=torch.int64, device=device)
    exact = torch.empty(num_rows, device=device)
    with torch.no_grad():
        for start in range(0, num_rows, EXACT_ROWS):
            rows = slice(start, start + EXACT_ROWS)
            log_probs = torch.log_softmax((hidden[rows] @ weight.T).float(), dim=-1)
            targets[rows] = torch.multinomial(log_probs.exp(), 1, generator=generator).squeeze(1)
            exact[rows] = log_probs.gather(1, targets[rows].unsqueeze(1)).squeeze(1)
    noise = torch.randn(num_rows, generator=generator, device=device) * 0.1
    return Batch(
        hidden=hidden.requires_grad_(),
        weight=weight.requires_grad_(),
        targets=targets,
        grad_logprobs=torch.randn(num_rows, generator=generator, device=device),
        grad_entropy=torch.randn(num_rows, generator=generator, device=device) * 0.1,
        advantages=torch.randn(num_rows // length, generator=generator, device=device),
        old_logprobs=exact + noise,
    )


# The loss of each workload from per-token log-probs and entropies (entropy None when not asked).
def _logprobs_loss(logprobs, entropy, batch: Batch):
    return (logprobs * batch.grad_logprobs.to(logprobs.dtype)).sum()


def _entropy_loss(logprobs, entropy, batch: Batch):
    dtype = logprobs.dtype
    return (logprobs * batch.grad_logprobs.to(dtype)).sum() + (entropy * batch.grad_entropy.to(dtype)).sum()


def _grpo_loss(logprobs, entropy, batch: Batch):
    dtype = logprobs.dtype
    return policy_loss(
        logprobs,
        batch.old_logprobs.to(dtype),
        batch.token_advantages().to(dtype),
        batch.token_weights().to(dtype),
        clip_low=CLIP,
        clip_high=CLIP,
        entropy=entropy,
        entropy_coef=0.0,
    ).loss


def _cross_entropy_loss(logprobs, entropy, batch: Batch):
    return -logprobs.sum()


@dataclass(frozen=True)
class Workload:
    name: str
    loss: Callable  # (logprobs, entropy or None, batch) -> scalar
    entropy: bool  # whether the trainer-side composition asks for the entropy


WORKLOADS = {
    "logprobs": Workload("logprobs", _logprobs_loss, False),
    "entropy": Workload("entropy", _entropy_loss, True),
    "grpo": Workload("grpo", _grpo_loss, True),
    "cross_entropy": Workload("cross_entropy", _cross_entropy_loss, False),
}


def composed(per_token: Callable, workload: Workload) -> Callable[[Batch], torch.Tensor]:
    """``workload``'s loss over ``per_token(hidden, weight, targets, return_entropy)``."""

    def provider(batch: Batch) -> torch.Tensor:
        out = per_token(batch.hidden, batch.weight, batch.targets, workload.entropy)
        logprobs, entropy = out if workload.entropy else (out, None)
        return workload.loss(logprobs, entropy, batch)

    return provider


def ours(backend: str = "auto") -> Callable:
    def per_token(hidden, weight, targets, return_entropy):
        return fused_logprobs(hidden, weight, targets, return_entropy=return_entropy, backend=backend)

    return per_token


def reference(hidden, weight, targets, return_entropy):
    return fused_logprobs_reference(hidden, weight, targets, return_entropy=return_entropy)


def _import(module: str, attribute: str, package: str):
    """``module.attribute``, or (None, why) when it does not import."""
    try:
        return getattr(importlib.import_module(module), attribute), None
    except (ImportError, AttributeError) as error:
        return None, f"{module}.{attribute} does not import ({type(error).__name__}: {error}; pip install {package})"


def anchors(workload: str, device: str) -> tuple[dict[str, Callable[[Batch], torch.Tensor]], list[str]]:
    """The third-party providers of ``workload`` that run here, and why each other one is skipped.

    logprobs: ``liger_private_eager_helper`` (Liger's private ``_ChunkedSelectiveLogProbFunction``,
    plain torch GEMMs with fp32 products in its backward, what its GRPO loss calls per chunk),
    ``cce_default_per_token`` and ``cce_filter_off_per_token`` (CCE with ``reduction="none"``;
    default: gradient filtering with ``filter_eps="auto"`` and its vocabulary sorting; filter off:
    ``filter_eps=None``). grpo: ``liger_fused_linear_grpo`` (``liger_kernel.chunked_loss``, the LM
    head fused). cross_entropy: ``liger_fused_linear_ce``, ``cce_default_ce``, ``cce_filter_off_ce``.
    """
    if workload not in WORKLOADS:
        raise ValueError(f"workload must be one of {sorted(WORKLOADS)}, got {workload!r}")
    wanted = {
        "logprobs": ("liger_private_eager_helper", "cce_default_per_token", "cce_filter_off_per_token"),
        "entropy": (),
        "grpo": ("liger_fused_linear_grpo",),
        "cross_entropy": ("liger_fused_linear_ce", "cce_default_ce", "cce_filter_off_ce"),
    }[workload]
    if not wanted:
        return {}, []
    if device != "cuda":
        return {}, [f"{', '.join(wanted)}: need CUDA"]
    providers, skipped = {}, []
    for name in wanted:
        provider, reason = _anchor(name)
        if provider is None:
            skipped.append(f"{name}: {reason}")
        else:
            providers[name] = provider
    return providers, skipped


def per_token_anchors(device: str) -> tuple[dict[str, Callable], list[str]]:
    """The per-token third-party functions ``(hidden, weight, targets, return_entropy) -> logprobs``
    that run here (for forward-only rows), and why each other one is skipped."""
    names = ("liger_private_eager_helper", "cce_default_per_token", "cce_filter_off_per_token")
    if device != "cuda":
        return {}, [f"{', '.join(names)}: need CUDA"]
    found, skipped = {}, []
    for name in names:
        per_token, reason = _per_token_anchor(name)
        if per_token is None:
            skipped.append(f"{name}: {reason}")
        else:
            found[name] = per_token
    return found, skipped


def _per_token_anchor(name: str):
    if name == "liger_private_eager_helper":
        helper, reason = _import(
            "liger_kernel.chunked_loss.fused_linear_ppo", "_ChunkedSelectiveLogProbFunction", "liger-kernel"
        )
        if helper is None:
            return None, reason
        return (
            lambda hidden, weight, targets, return_entropy: helper.apply(hidden, weight, targets, None, 1.0, 4096)
        ), None
    linear_cross_entropy, reason = _import("cut_cross_entropy", "linear_cross_entropy", "cut-cross-entropy")
    if linear_cross_entropy is None:
        return None, reason
    options = {"filter_eps": None} if "filter_off" in name else {}
    return (
        lambda hidden, weight, targets, return_entropy: (
            -linear_cross_entropy(hidden, weight, targets, reduction="none", **options)
        )
    ), None


def _anchor(name: str):
    """(provider, None) or (None, why) for one third-party provider."""
    if name in ("liger_private_eager_helper", "cce_default_per_token", "cce_filter_off_per_token"):
        per_token, reason = _per_token_anchor(name)
        return (None, reason) if per_token is None else (composed(per_token, WORKLOADS["logprobs"]), None)
    if name in ("cce_default_ce", "cce_filter_off_ce"):
        linear_cross_entropy, reason = _import("cut_cross_entropy", "linear_cross_entropy", "cut-cross-entropy")
        if linear_cross_entropy is None:
            return None, reason
        options = {"filter_eps": None} if "filter_off" in name else {}
        return (
            lambda batch: linear_cross_entropy(batch.hidden, batch.weight, batch.targets, reduction="sum", **options)
        ), None
    if name == "liger_fused_linear_grpo":
        loss_class, reason = _import("liger_kernel.chunked_loss", "LigerFusedLinearGRPOLoss", "liger-kernel")
        if loss_class is None:
            return None, reason
        return _liger_grpo(loss_class), None
    if name == "liger_fused_linear_ce":
        loss_class, reason = _import("liger_kernel.transformers", "LigerFusedLinearCrossEntropyLoss", "liger-kernel")
        if loss_class is None:
            return None, reason
        loss = loss_class(reduction="sum")
        return (lambda batch: loss(batch.weight, batch.hidden, batch.targets)), None
    raise ValueError(f"no third-party provider named {name!r}")


def _liger_grpo(loss_class) -> Callable[[Batch], torch.Tensor]:
    """Liger's GRPO loss configured as the trainer's: PPO clip 0.2, no KL, dr_grpo normalisation."""
    modules: dict[int, torch.nn.Module] = {}

    def provider(batch: Batch) -> torch.Tensor:
        sequences, length = batch.sequences, batch.length
        if length not in modules:
            modules[length] = loss_class(
                beta=0.0,
                use_ref_model=False,
                epsilon_low=CLIP,
                epsilon_high=CLIP,
                loss_type="dr_grpo",
                max_completion_length=length,
                temperature=1.0,
            )
        out = modules[length](
            batch.hidden.view(sequences, length, -1),
            batch.weight,
            batch.targets.view(sequences, length),
            torch.ones(sequences, length, dtype=torch.int64, device=batch.targets.device),
            batch.advantages,
            old_per_token_logps=batch.old_logprobs.view(sequences, length),
        )
        return out[0] if isinstance(out, tuple | list) else out

    return provider


def exact_gradients(batch: Batch, workload: Workload) -> tuple[float, torch.Tensor, torch.Tensor]:
    """fp64 loss and gradients (``[M, H]``, ``[V, H]``) of ``workload`` on the batch's rounded
    inputs, in chunks of ``EXACT_ROWS`` rows (no ``[M, V]`` tensor): the per-token log-probs and
    entropies first, the loss's gradients with respect to them by autograd, then
    ``dL/dz = g_lp (onehot - p) - g_ent p (z - sum p z)`` and the two GEMMs per chunk."""
    hidden, weight, targets = batch.hidden.detach().double(), batch.weight.detach().double(), batch.targets
    num_rows = hidden.shape[0]
    logprobs = torch.empty(num_rows, dtype=torch.float64, device=hidden.device)
    entropy = torch.empty_like(logprobs)
    for start in range(0, num_rows, EXACT_ROWS):
        rows = slice(start, start + EXACT_ROWS)
        log_probs = torch.log_softmax(hidden[rows] @ weight.T, dim=-1)
        logprobs[rows] = log_probs.gather(1, targets[rows].unsqueeze(1)).squeeze(1)
        entropy[rows] = -(log_probs.exp() * log_probs).sum(dim=-1)
    logprobs.requires_grad_()
    entropy.requires_grad_()
    loss = workload.loss(logprobs, entropy if workload.entropy else None, batch)
    grad_logprobs, grad_entropy = torch.autograd.grad(loss, (logprobs, entropy), allow_unused=True)
    grad_entropy = torch.zeros_like(logprobs) if grad_entropy is None else grad_entropy
    grad_hidden, grad_weight = torch.zeros_like(hidden), torch.zeros_like(weight)
    for start in range(0, num_rows, EXACT_ROWS):
        rows = slice(start, start + EXACT_ROWS)
        logits = hidden[rows] @ weight.T
        probs = torch.softmax(logits, dim=-1)
        mean_logit = (probs * logits).sum(dim=-1, keepdim=True)
        grad_logits = -probs * (grad_logprobs[rows, None] + grad_entropy[rows, None] * (logits - mean_logit))
        del probs, logits
        grad_logits[torch.arange(grad_logits.shape[0], device=hidden.device), targets[rows]] += grad_logprobs[rows]
        grad_hidden[rows] = grad_logits @ weight
        grad_weight += grad_logits.T @ hidden[rows]
    return float(loss.detach()), grad_hidden, grad_weight


def gradient_errors(provider: Callable[[Batch], torch.Tensor], batch: Batch, exact) -> dict[str, float]:
    """A provider's loss and gradients against ``exact`` (``exact_gradients``): relative loss error,
    and ``||error||_F / ||exact||_F`` of each gradient."""
    exact_loss, exact_hidden, exact_weight = exact
    hidden = batch.hidden.detach().clone().requires_grad_()
    weight = batch.weight.detach().clone().requires_grad_()
    loss = provider(dataclasses.replace(batch, hidden=hidden, weight=weight))
    loss.backward()

    def relative(got, wanted):
        return float(torch.linalg.norm(got.double() - wanted) / torch.linalg.norm(wanted))

    return {
        "loss_rel_err": abs(float(loss.detach()) - exact_loss) / abs(exact_loss),
        "grad_hidden_rel_err": relative(hidden.grad, exact_hidden),
        "grad_weight_rel_err": relative(weight.grad, exact_weight),
    }
