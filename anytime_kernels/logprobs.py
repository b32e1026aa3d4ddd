"""Fused per-token log-probs: ``log_softmax(hidden[rows] @ weight.T / T)[targets]`` without the logits.

The policy forward returns hidden states and this op applies the LM head, so the ``[M, V]`` logits
(16384 x 151936 x 4 bytes = 10.0 GB in fp32 for 16k tokens at Qwen's vocabulary) never exist: every
backend streams the vocabulary in tiles with an online log-sum-exp, and the backward recomputes them.

With ``z = hidden[rows] @ weight.T / T``, ``p = softmax(z)`` and upstream gradients ``g_lp``,
``g_ent`` of the log-probs and entropies::

    logprob = z[target] - lse(z)          entropy = lse(z) - sum_j p_j z_j
    dL/dz_j = g_lp * (onehot(target)_j - p_j) - g_ent * p_j * (z_j - sum_k p_k z_k)

Backends (``backend=``, ``anytime_kernels.backends``): ``triton`` (CUDA; CPU under
``TRITON_INTERPRET=1``), ``cpp`` (the compiled C++/OpenMP op), ``reference`` (plain torch with
full logits), ``auto`` (triton on CUDA, cpp on CPU). Accumulation is fp32 whatever the input dtype.
``triton`` has two paths: logits tiles reduced in a Triton GEMM epilogue (``logprobs_epilogue``,
the default for bf16 on CUDA) and cuBLAS GEMMs + Triton reductions (``logprobs_triton``, the
default otherwise). Two environment variables tune it, read once per forward (its backward follows
it): ``ANYTIME_LOGPROBS_EPILOGUE`` (``1``: the epilogue path, ``0``: the cuBLAS path) and
``ANYTIME_LOGPROBS_TILE_MB`` (the tile budget, ``logprobs_plan``).
"""

from __future__ import annotations

import functools
import math

import torch

from anytime_kernels._extension import ops
from anytime_kernels.backends import resolve_backend
from anytime_kernels.constants import IGNORE_INDEX
from anytime_kernels.logprobs_reference import fused_logprobs_reference

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def fused_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    rows: torch.Tensor | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    backend: str = "auto",
    check_values: bool = True,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of every target under the LM head, differentiable in hidden and weight.

    Args:
        hidden: ``[N, H]`` hidden states, fp32/bf16/fp16.
        weight: ``[V, H]`` LM head (``lm_head.weight``), same dtype and device as ``hidden``.
            Under ``torch.autocast`` both are cast to the autocast dtype first, as ``lm_head``
            itself would be.
        targets: ``[M]`` int64 token ids in ``[0, V)``; ``IGNORE_INDEX`` (-100) gives log-prob 0,
            entropy 0 and no gradient.
        rows: ``[M]`` int64, the hidden row that predicts each target (rows may repeat: a branch
            point predicts several branch tokens). Default: row i for target i, with M == N.
        temperature: logits are divided by it before the softmax; > 0.
        return_entropy: also return the entropy of each row's distribution (differentiable).
        backend: ``auto``, ``triton``, ``cpp`` or ``reference``.
        check_values: range-check ``targets`` and ``rows`` (one device sync on CUDA). Callers that
            checked them on the host already (``TreePolicy``) pass False to keep the step sync-free;
            shapes, dtypes and devices are always checked.

    Returns:
        fp32 ``logprobs [M]``, and fp32 ``entropy [M]`` when ``return_entropy``.

    Raises:
        TypeError: a non-tensor argument. ValueError: a bad shape, dtype, device, index range,
            temperature or backend name. BackendUnavailableError: a backend that cannot run on
            these tensors. All before any kernel runs.
    """
    hidden, weight = _autocast_operands(hidden, weight)
    backend = _validate(hidden, weight, targets, rows, temperature, backend, check_values)
    if backend == "reference":
        return fused_logprobs_reference(hidden, weight, targets, rows, temperature, return_entropy)
    logprobs, entropy = _FusedLogprobs.apply(hidden, weight, targets, rows, float(temperature), return_entropy, backend)
    return (logprobs, entropy) if return_entropy else logprobs


def _autocast_operands(hidden: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(hidden, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise TypeError(f"hidden and weight must be tensors, got {type(hidden).__name__} and {type(weight).__name__}")
    device_type = hidden.device.type
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        if hidden.is_floating_point() and weight.is_floating_point():
            return hidden.to(dtype), weight.to(dtype)
    return hidden, weight


def _first_bad(bad: torch.Tensor, values: torch.Tensor) -> tuple[int, int] | None:
    """(index, value) of the first True in ``bad``, or None; one device sync."""
    if not bool(bad.any()):
        return None
    index = int(bad.nonzero()[0, 0])
    return index, int(values[index])


def _validate(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    rows: torch.Tensor | None,
    temperature: float,
    backend: str,
    check_values: bool = True,
) -> str:
    """Check every argument; return the concrete backend."""
    if not isinstance(targets, torch.Tensor) or (rows is not None and not isinstance(rows, torch.Tensor)):
        raise TypeError("targets (and rows, when given) must be tensors")
    if hidden.dim() != 2 or weight.dim() != 2:
        raise ValueError(
            f"hidden must be [N, H] and weight [V, H], got shapes {tuple(hidden.shape)} and {tuple(weight.shape)}"
        )
    if hidden.dtype not in _FLOAT_DTYPES or weight.dtype != hidden.dtype:
        raise ValueError(
            f"hidden and weight must share one dtype of float32/bfloat16/float16, got {hidden.dtype} and "
            f"{weight.dtype} (cast one, or call under torch.autocast)"
        )
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden [N, H] and weight [V, H] disagree on H: {tuple(hidden.shape)} vs {tuple(weight.shape)}"
        )
    if targets.dim() != 1 or targets.dtype != torch.int64:
        raise ValueError(f"targets must be a 1-D int64 tensor, got shape {tuple(targets.shape)} dtype {targets.dtype}")
    if rows is None and targets.shape[0] != hidden.shape[0]:
        raise ValueError(
            f"without rows, targets must have one entry per hidden row ({hidden.shape[0]}), got {targets.shape[0]}"
        )
    if rows is not None and (rows.dim() != 1 or rows.dtype != torch.int64 or rows.shape != targets.shape):
        raise ValueError(
            f"rows must be a 1-D int64 tensor shaped like targets {tuple(targets.shape)}, got shape "
            f"{tuple(rows.shape)} dtype {rows.dtype}"
        )
    devices = {hidden.device, weight.device, targets.device} | ({rows.device} if rows is not None else set())
    if len(devices) != 1:
        raise ValueError(f"hidden, weight, targets and rows must be on one device, got {sorted(map(str, devices))}")
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    backend = resolve_backend("fused_logprobs", backend, hidden.device)
    if not check_values:
        return backend
    vocab = weight.shape[0]
    bad_target = _first_bad((targets != IGNORE_INDEX) & ((targets < 0) | (targets >= vocab)), targets)
    if bad_target is not None:
        raise ValueError(
            f"targets[{bad_target[0]}] = {bad_target[1]} is outside [0, {vocab}) and is not IGNORE_INDEX ({IGNORE_INDEX})"
        )
    if rows is not None:
        bad_row = _first_bad((rows < 0) | (rows >= hidden.shape[0]), rows)
        if bad_row is not None:
            raise ValueError(f"rows[{bad_row[0]}] = {bad_row[1]} is outside [0, {hidden.shape[0]}) (hidden rows)")
    return backend


def _cpp_forward(hidden, weight, targets, temperature, compute_entropy):
    return ops.fused_logprobs_forward(hidden, weight, targets, temperature, compute_entropy)


def _cpp_backward(
    hidden, weight, targets, lse, mean_logit, grad_logprobs, grad_entropy, temperature, need_hidden, need_weight
):
    grad_hidden, grad_weight = ops.fused_logprobs_backward(
        hidden, weight, targets, lse, mean_logit, grad_logprobs, grad_entropy, temperature, need_hidden, need_weight
    )
    return (grad_hidden if need_hidden else None), (grad_weight if need_weight else None)


def _backend_module(backend: str, hidden: torch.Tensor):
    """(forward, backward) of ``backend`` for ``hidden``'s device and dtype; for ``triton`` the path
    (``ANYTIME_LOGPROBS_EPILOGUE``, or automatic) and the tile budget (``ANYTIME_LOGPROBS_TILE_MB``)
    are read here, once per forward, and bound into both functions, so a backward runs as its
    forward chose whatever the environment says by then."""
    if backend == "triton":
        from anytime_kernels import logprobs_epilogue, logprobs_plan, logprobs_triton

        budget = logprobs_plan.tile_bytes()
        module = logprobs_epilogue if logprobs_epilogue.enabled(hidden.device, hidden.dtype) else logprobs_triton
        return functools.partial(module.forward, budget=budget), functools.partial(module.backward, budget=budget)
    return _cpp_forward, _cpp_backward


class _FusedLogprobs(torch.autograd.Function):
    """Autograd wrapper: the forward keeps lse (and the mean logit) per row, the backward recomputes."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, rows, temperature, return_entropy, backend):
        forward_impl, backward_impl = _backend_module(backend, hidden)
        with torch.autocast(hidden.device.type, enabled=False):
            selected = hidden if rows is None else hidden.index_select(0, rows)
            # Both backends return (logprobs, entropy, lse); entropy is empty without return_entropy.
            logprobs, entropy, lse = forward_impl(
                selected.contiguous(), weight.contiguous(), targets.contiguous(), temperature, return_entropy
            )
        # The backward of the entropy needs the mean logit sum_j p_j z_j = lse - entropy.
        mean_logit = lse - entropy if return_entropy else entropy
        ctx.save_for_backward(hidden, weight, targets, rows, lse, mean_logit)
        ctx.temperature, ctx.return_entropy, ctx.backward_impl = temperature, return_entropy, backward_impl
        ctx.set_materialize_grads(False)
        if not return_entropy:
            ctx.mark_non_differentiable(entropy)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        hidden, weight, targets, rows, lse, mean_logit = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not ctx.return_entropy:
            grad_entropy = None
        if grad_logprobs is None and grad_entropy is None:
            return None, None, None, None, None, None, None
        backward_impl = ctx.backward_impl  # the forward's choice (an environment flag may change between)
        valid = targets != IGNORE_INDEX
        grad_logprobs = (
            torch.zeros_like(lse) if grad_logprobs is None else torch.where(valid, grad_logprobs.float(), 0.0)
        )
        if grad_entropy is not None:
            grad_entropy = torch.where(valid, grad_entropy.float(), 0.0).contiguous()
        with torch.autocast(hidden.device.type, enabled=False):
            selected = hidden if rows is None else hidden.index_select(0, rows)
            grad_selected, grad_weight = backward_impl(
                selected.contiguous(),
                weight.contiguous(),
                targets.contiguous(),
                lse,
                mean_logit if grad_entropy is not None else None,
                grad_logprobs.contiguous(),
                grad_entropy,
                ctx.temperature,
                need_hidden,
                need_weight,
            )
        grad_hidden = None
        if need_hidden:
            if rows is not None:
                # fp32 scatter-add: repeated rows sum their gradients before the cast.
                grad_selected = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device).index_add_(
                    0, rows, grad_selected
                )
            grad_hidden = grad_selected.to(hidden.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None
