"""Triton backend of ``fused_logprobs``: cuBLAS GEMMs over (row block, vocabulary chunk) tiles +
Triton row reductions, with running ``[M]`` statistics.

Decomposition (``logprobs_plan``). Rows are processed in balanced blocks of at most ``ROW_BLOCK``
and the vocabulary in chunks of ``chunk_vocab`` columns, so one tile of fp32 logits plus its
gradient fits the tile budget (``CHUNK_BYTES``, or ``ANYTIME_LOGPROBS_TILE_MB`` MiB: less memory
for more, narrower GEMMs). Tile sizes therefore do not grow with M, and memory beyond the inputs
and outputs is one tile, one fp32 ``[chunk, H]`` buffer and ``O(M)`` plus the fp32 ``[M, H]``
gradient of the hidden states:

- forward, per tile: ``logits = hidden[block] @ W[chunk].T`` by cuBLAS with fp32 output
  (``torch.mm(out_dtype=)``), then ``_chunk_stats_kernel`` (one program per row) streams the tile
  once and merges the chunk's (max, sum of exp, sum of exp * z) into the row's running
  statistics, an online log-sum-exp, and stores the target logit when the target lies in the
  chunk. lse, the log-probs and the entropy follow from the running statistics.
- backward, per tile (chunk outer, row block inner): the logits are recomputed,
  ``_chunk_grad_kernel`` turns them into ``dL/dlogits = (g_lp * (onehot - p) - g_ent * p *
  (z - mean_z)) / T`` in the input dtype, and two cuBLAS GEMMs accumulate
  ``grad_weight[chunk] += dz.T @ hidden[block]`` (fp32 across row blocks, cast once per chunk)
  and ``grad_hidden[block] += dz @ W[chunk]`` in place in fp32. fp16 tiles hold ``c * dz`` for a
  power of two ``c`` (``logprobs_plan.gradient_scale``), divided out of the fp32 accumulations.

Which path runs. An exact design needs the whole vocabulary's log-sum-exp before any gradient, so
it runs four GEMMs (logits, recomputed logits, grad_hidden, grad_weight); on an H100 (M=16384,
H=1536, V=151,936 bf16, fwd+bwd; ``docs/gpu_runs/2026-11-27-h100-run2``) the three bare GEMMs
took 33.4 ms and this path 55.6 ms, 22.2 ms more. ``logprobs_epilogue`` reduces logits tiles in a
Triton GEMM epilogue instead of writing them as fp32 between a cuBLAS GEMM and a reduction; it ran
51.1 ms there, 4.5 of the 22.2 ms (20%) less: the round trip is not most of the excess. It reuses
this module's backward chunk loop and its two gradient GEMMs (each reduces the same ``dz`` tile
along a different axis, which a fused kernel could do only with atomics on ``[M, H]`` or
``[V, H]``). The epilogue path is the default for bf16 operands on CUDA and this one for fp32 and
fp16 (``logprobs_epilogue.enabled``).

fp32 inputs run fp32 GEMMs under torch's global matmul precision (TF32 only where the user
enabled it). Under ``TRITON_INTERPRET=1`` (CPU tests) the kernels run with one config and the
GEMMs upcast to fp32 on the CPU, which has no mixed-dtype ``mm``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from anytime_kernels import logprobs_plan
from anytime_kernels._interpreter import INTERPRET as _INTERPRET
from anytime_kernels._interpreter import LAUNCH_OPTIONS, patch_interpreter
from anytime_kernels.constants import IGNORE_INDEX

patch_interpreter()


def _configs() -> list[triton.Config]:
    if _INTERPRET:
        return [triton.Config({"BLOCK_V": 128}, num_warps=4)]
    return [
        triton.Config({"BLOCK_V": block}, num_warps=warps)
        for block in (1024, 2048, 4096)
        for warps in (4, 8, 16)
        if block // (32 * warps) >= 4
    ]


@triton.autotune(
    configs=_configs(),
    key=["chunk_vocab", "HAS_ENTROPY"],
    # The kernel merges into the running statistics: autotuning reruns must start from the same state.
    restore_value=["running_max_ptr", "running_sum_ptr", "running_weighted_ptr", "target_logit_ptr"],
)
@triton.jit
def _chunk_stats_kernel(
    logits_ptr,
    targets_ptr,
    running_max_ptr,
    running_sum_ptr,
    running_weighted_ptr,
    target_logit_ptr,
    chunk_vocab,
    vocab_start,
    inv_temperature,
    HAS_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Merge this chunk's (max z, sum exp(z - max), sum exp(z - max) * z) into the row's running ones."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * chunk_vocab
    columns = tl.arange(0, BLOCK_V)
    chunk_max = float("-inf")
    chunk_sum = 0.0
    chunk_weighted = 0.0
    for start in range(0, chunk_vocab, BLOCK_V):
        offsets = start + columns
        mask = offsets < chunk_vocab
        z = tl.load(row_ptr + offsets, mask=mask, other=float("-inf")) * inv_temperature
        new_max = tl.maximum(chunk_max, tl.max(z, axis=0))
        rescale = tl.exp(chunk_max - new_max)
        exps = tl.exp(z - new_max)
        chunk_sum = chunk_sum * rescale + tl.sum(exps, axis=0)
        if HAS_ENTROPY:
            chunk_weighted = chunk_weighted * rescale + tl.sum(exps * tl.where(mask, z, 0.0), axis=0)
        chunk_max = new_max
    old_max = tl.load(running_max_ptr + row)
    new_max = tl.maximum(old_max, chunk_max)
    old_scale = tl.exp(old_max - new_max)
    chunk_scale = tl.exp(chunk_max - new_max)
    tl.store(running_max_ptr + row, new_max)
    tl.store(running_sum_ptr + row, tl.load(running_sum_ptr + row) * old_scale + chunk_sum * chunk_scale)
    if HAS_ENTROPY:
        old_weighted = tl.load(running_weighted_ptr + row)
        tl.store(running_weighted_ptr + row, old_weighted * old_scale + chunk_weighted * chunk_scale)
    local = tl.load(targets_ptr + row) - vocab_start
    if (local >= 0) & (local < chunk_vocab):
        tl.store(target_logit_ptr + row, tl.load(row_ptr + local) * inv_temperature)


@triton.autotune(configs=_configs(), key=["chunk_vocab", "HAS_ENTROPY_GRAD"])
@triton.jit
def _chunk_grad_kernel(
    logits_ptr,
    grad_logits_ptr,
    targets_ptr,
    lse_ptr,
    mean_logit_ptr,
    grad_logprobs_ptr,
    grad_entropy_ptr,
    chunk_vocab,
    vocab_start,
    inv_temperature,
    HAS_ENTROPY_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """grad_logits = (g_lp * (onehot(target) - p) - g_ent * p * (z - mean_z)) / T for one row."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * chunk_vocab
    out_ptr = grad_logits_ptr + row * chunk_vocab
    lse = tl.load(lse_ptr + row)
    grad_logprob = tl.load(grad_logprobs_ptr + row)
    local = tl.load(targets_ptr + row) - vocab_start
    if HAS_ENTROPY_GRAD:
        grad_entropy = tl.load(grad_entropy_ptr + row)
        mean_logit = tl.load(mean_logit_ptr + row)
    columns = tl.arange(0, BLOCK_V)
    for start in range(0, chunk_vocab, BLOCK_V):
        offsets = start + columns
        mask = offsets < chunk_vocab
        z = tl.load(row_ptr + offsets, mask=mask, other=0.0) * inv_temperature
        probs = tl.exp(z - lse)
        weight_per_prob = grad_logprob
        if HAS_ENTROPY_GRAD:
            weight_per_prob = grad_logprob + grad_entropy * (z - mean_logit)
        grad = -probs * weight_per_prob
        grad = tl.where(offsets == local, grad + grad_logprob, grad) * inv_temperature
        tl.store(out_ptr + offsets, grad.to(grad_logits_ptr.dtype.element_ty), mask=mask)


def _matmul_fp32(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``left @ right`` with fp32 output and fp32 accumulation, for fp32/bf16/fp16 operands."""
    if left.dtype == torch.float32:
        return torch.mm(left, right)
    if left.is_cuda:
        return torch.mm(left, right, out_dtype=torch.float32)
    return torch.mm(left.float(), right.float())


def _matmul_into(out: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> None:
    """``out[:] = left @ right`` in ``out.dtype`` (fp32 accumulation inside the GEMM)."""
    if left.is_cuda or left.dtype == torch.float32:
        torch.mm(left, right, out=out)
    else:
        out.copy_(torch.mm(left.float(), right.float()))


_ADDMM_DTYPE_IN_PLACE: dict[torch.device, bool] = {}


def _addmm_dtype_in_place(device: torch.device) -> bool:
    """Whether ``torch.addmm(out, a, b, out_dtype=float32, out=out)`` accumulates bf16 products into
    fp32 in place on this device (checked once against the two-step sum)."""
    if device not in _ADDMM_DTYPE_IN_PLACE:
        generator = torch.Generator(device=device).manual_seed(0)
        left, right, base = (torch.randn(64, 64, generator=generator, device=device) for _ in range(3))
        left, right = left.bfloat16(), right.bfloat16()
        expected = base + torch.mm(left.float(), right.float())
        try:
            got = base.clone()
            torch.addmm(got, left, right, out_dtype=torch.float32, out=got)
            works = torch.allclose(got, expected, rtol=1e-3, atol=1e-3)
        except (RuntimeError, TypeError):
            works = False
        _ADDMM_DTYPE_IN_PLACE[device] = works
    return _ADDMM_DTYPE_IN_PLACE[device]


def _accumulate(out: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> None:
    """``out += left @ right`` with fp32 ``out`` and fp32 accumulation, in place where torch allows."""
    if left.dtype == torch.float32:
        out.addmm_(left, right)
    elif not left.is_cuda:
        out.addmm_(left.float(), right.float())
    elif _addmm_dtype_in_place(out.device):
        torch.addmm(out, left, right, out_dtype=torch.float32, out=out)
    else:
        out.add_(torch.mm(left, right, out_dtype=torch.float32))


def forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    compute_entropy: bool,
    budget: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probs, entropy (empty unless ``compute_entropy``) and lse, fp32 ``[M]``, of validated
    contiguous operands: what the C++ op returns. ``budget``: tile bytes (default ``tile_bytes()``).

    Args:
        hidden: ``[M, H]`` the rows that predict the targets (already gathered).
        weight: ``[V, H]`` LM head, same dtype and device.
        targets: ``[M]`` int64, in ``[0, V)`` or ``IGNORE_INDEX``.
    """
    num_rows, vocab = hidden.shape[0], weight.shape[0]
    fp32 = {"dtype": torch.float32, "device": hidden.device}
    if num_rows == 0:
        empty = torch.zeros(0, **fp32)
        return empty, empty, empty
    blocks, chunk_vocab = logprobs_plan.plan(num_rows, vocab, hidden.element_size(), budget)
    running_max = torch.full((num_rows,), float("-inf"), **fp32)
    running_sum = torch.zeros(num_rows, **fp32)
    running_weighted = torch.zeros(num_rows if compute_entropy else 1, **fp32)
    target_logit = torch.zeros(num_rows, **fp32)
    for row_start, row_end in blocks:
        block = slice(row_start, row_end)
        weighted = running_weighted[block] if compute_entropy else running_weighted
        for start in range(0, vocab, chunk_vocab):
            logits = _matmul_fp32(hidden[block], weight[start : start + chunk_vocab].T)
            _chunk_stats_kernel[(row_end - row_start,)](
                logits,
                targets[block],
                running_max[block],
                running_sum[block],
                weighted,
                target_logit[block],
                logits.shape[1],
                start,
                1.0 / temperature,
                HAS_ENTROPY=compute_entropy,
                **LAUNCH_OPTIONS,
            )
            del logits
    lse = running_max + torch.log(running_sum)
    return finish_rows(targets, target_logit, lse, running_weighted / running_sum if compute_entropy else None)


def finish_rows(
    targets: torch.Tensor, target_logit: torch.Tensor, lse: torch.Tensor, mean_logit: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``forward``'s result from fp32 per-row statistics: log-probs, entropy (empty when
    ``mean_logit`` is None) and lse; ignored targets read 0."""
    valid = targets != IGNORE_INDEX
    logprobs = torch.where(valid, target_logit - lse, 0.0)
    if mean_logit is None:
        return logprobs, torch.zeros(0, dtype=torch.float32, device=lse.device), lse
    # lse >= mean logit exactly; rounding can leave a tiny negative entropy.
    entropy = torch.where(valid, (lse - mean_logit).clamp_min(0.0), 0.0)
    return logprobs, entropy, lse


def backward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    mean_logit: torch.Tensor | None,
    grad_logprobs: torch.Tensor,
    grad_entropy: torch.Tensor | None,
    temperature: float,
    need_hidden: bool,
    need_weight: bool,
    budget: int | None = None,
    tile_grad=None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """fp32 ``grad_hidden [M, H]`` and ``grad_weight [V, H]`` (weight dtype); None where not needed.

    ``grad_logprobs``/``grad_entropy`` are fp32 ``[M]`` and already zero on ignored targets;
    ``mean_logit`` (``lse - entropy``) is needed with ``grad_entropy``. ``tile_grad(rows, start,
    end, grad_logits, grad_logprobs, grad_entropy)`` fills ``grad_logits`` (``[row block, end -
    start]``, input dtype) with dL/dlogits of rows ``rows`` (a slice) and vocabulary ``[start,
    end)`` for the upstream gradients it is given (``[M]``, scaled for fp16); by default a cuBLAS
    GEMM recomputes the logits and ``_chunk_grad_kernel`` turns them into the gradient.
    ``budget``: tile bytes (default ``tile_bytes()``); a ``tile_grad`` keeps no fp32 logits, so
    its chunks are wider.
    """
    num_rows, vocab = hidden.shape[0], weight.shape[0]
    grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_hidden else None
    if num_rows == 0 or not (need_hidden or need_weight):
        return grad_hidden, torch.zeros_like(weight) if need_weight else None
    # Every chunk writes its rows of grad_weight whole, so it needs no zero fill.
    grad_weight = torch.empty_like(weight) if need_weight else None
    has_entropy_grad = grad_entropy is not None
    # fp16 tiles hold c * dL/dlogits (c a power of two): p * g would fall below fp16's subnormals.
    scale = None
    if hidden.dtype == torch.float16:
        scale = logprobs_plan.gradient_scale(grad_logprobs, grad_entropy, vocab, temperature)
        grad_logprobs = grad_logprobs * scale
        grad_entropy = grad_entropy * scale if has_entropy_grad else None

    def recompute_and_grad(block, start, end, grad_logits, grad_logprobs, grad_entropy) -> None:
        logits = _matmul_fp32(hidden[block], weight[start:end].T)
        _chunk_grad_kernel[(block.stop - block.start,)](
            logits,
            grad_logits,
            targets[block],
            lse[block],
            mean_logit[block] if has_entropy_grad else lse[block],
            grad_logprobs[block],
            grad_entropy[block] if has_entropy_grad else grad_logprobs[block],
            logits.shape[1],
            start,
            1.0 / temperature,
            HAS_ENTROPY_GRAD=has_entropy_grad,
            **LAUNCH_OPTIONS,
        )

    blocks, chunk_vocab = logprobs_plan.plan(
        num_rows, vocab, hidden.element_size(), budget, stores_logits=tile_grad is None
    )
    tile_grad = tile_grad or recompute_and_grad
    # One gradient tile, and one fp32 grad_weight chunk when several row blocks add into it (or a
    # scale must be divided out), serve every (chunk, row block): a tile allocated per iteration
    # would be allocated while the last one is still referenced, two tiles at the peak. Later tiles
    # are stream-ordered after the GEMMs that read the earlier ones.
    tile = torch.empty(
        max(end - start for start, end in blocks) * chunk_vocab, dtype=hidden.dtype, device=hidden.device
    )
    weight_acc_buffer = None
    if need_weight and (len(blocks) > 1 or scale is not None):
        weight_acc_buffer = torch.empty(chunk_vocab * weight.shape[1], dtype=torch.float32, device=weight.device)
    for start in range(0, vocab, chunk_vocab):
        end = min(start + chunk_vocab, vocab)
        weight_chunk = weight[start:end]
        # Several row blocks add into one chunk of grad_weight: accumulate in fp32, cast once.
        weight_acc = None
        if weight_acc_buffer is not None:
            weight_acc = weight_acc_buffer[: weight_chunk.numel()].view(weight_chunk.shape).zero_()
        for row_start, row_end in blocks:
            block = slice(row_start, row_end)
            grad_logits = tile[: (row_end - row_start) * (end - start)].view(row_end - row_start, end - start)
            tile_grad(block, start, end, grad_logits, grad_logprobs, grad_entropy)
            if weight_acc is not None:
                _accumulate(weight_acc, grad_logits.T, hidden[block])
            elif need_weight:
                _matmul_into(grad_weight[start:end], grad_logits.T, hidden[block])
            if need_hidden:
                _accumulate(grad_hidden[block], grad_logits, weight_chunk)
        if weight_acc is not None:
            if scale is not None:
                weight_acc.div_(scale)
            grad_weight[start:end].copy_(weight_acc)
    if scale is not None and need_hidden:
        grad_hidden.div_(scale)
    return grad_hidden, grad_weight
