"""Triton backend of ``fused_logprobs``: cuBLAS GEMMs over vocabulary chunks + Triton row reductions.

Decomposition. The vocabulary is cut into chunks of ``chunk_vocab`` columns sized so one chunk of
fp32 logits (plus its gradient in the input dtype) fits ``CHUNK_BYTES``. Per chunk:

- forward: ``logits = hidden @ W[chunk].T`` by cuBLAS with fp32 output (``torch.mm(out_dtype=)``),
  then ``_chunk_stats_kernel`` (one program per row) streams the chunk once and writes the row's
  (max, sum of exp, sum of exp * z) and, for the row whose target lies in the chunk, the target
  logit. A log-sum-exp merge over the chunks' statistics gives lse, the log-probs and the entropy.
- backward: the logits chunk is recomputed, ``_chunk_grad_kernel`` turns it into
  ``dL/dlogits = (g_lp * (onehot - p) - g_ent * p * (z - mean_z)) / T`` in the input dtype, and two
  cuBLAS GEMMs give ``grad_weight[chunk] = dz.T @ hidden`` (written once: every row is in the chunk,
  so no accumulation across chunks) and ``grad_hidden += dz @ W[chunk]`` (fp32, ``[M, H]``).

Why not all-Triton ``tl.dot`` tiles with the softmax fused into the GEMM epilogue: the four GEMMs
(logits, recomputed logits, grad_hidden, grad_weight) are at least 85% of the time at trainer
shapes (16k tokens, H 1536-2048, V 151,936), and cuBLAS runs them on Hopper with TMA and
warp-specialised wgmma pipelines that a portable Triton GEMM reaches only with per-shape tuning.
The backward needs two reductions of the same ``dz`` tile along different axes (over V for
grad_hidden, over M for grad_weight), which a fused kernel can do only with atomics on ``[M, H]``
or ``[V, H]`` or by writing ``dz`` out anyway. The fused epilogue would save only the fp32 logits
round trip through HBM (the reduction kernels here are memory-bound streams at ~3 TB/s), so the
chunked GEMM design is the faster and the more predictable one; TRL and Liger-Kernel made the
same choice. Chunking over the vocabulary rather than rows keeps the only cross-chunk
accumulation on ``[M, H]`` (small) instead of ``[V, H]`` (the LM head).

Under ``TRITON_INTERPRET=1`` (CPU tests) the kernels run with one config and the GEMMs upcast to
fp32 on the CPU, which has no mixed-dtype ``mm``.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from anytime_kernels.tree import IGNORE_INDEX

# Bytes of one vocabulary chunk: fp32 logits plus their gradient in the input dtype.
CHUNK_BYTES = 768 * 2**20
_MIN_CHUNK = 64
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _configs() -> list[triton.Config]:
    if _INTERPRET:
        return [triton.Config({"BLOCK_V": 128}, num_warps=4)]
    return [
        triton.Config({"BLOCK_V": block}, num_warps=warps)
        for block in (1024, 2048, 4096)
        for warps in (4, 8, 16)
        if block // (32 * warps) >= 4
    ]


@triton.autotune(configs=_configs(), key=["chunk_vocab", "HAS_ENTROPY"])
@triton.jit
def _chunk_stats_kernel(
    logits_ptr,
    targets_ptr,
    stats_ptr,
    target_logit_ptr,
    num_rows,
    chunk_vocab,
    vocab_start,
    inv_temperature,
    HAS_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """stats[0|1|2, row] = max z, sum exp(z - max), sum exp(z - max) * z over this chunk's columns."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * chunk_vocab
    columns = tl.arange(0, BLOCK_V)
    running_max = float("-inf")
    running_sum = 0.0
    running_weighted = 0.0
    for start in range(0, chunk_vocab, BLOCK_V):
        offsets = start + columns
        mask = offsets < chunk_vocab
        z = tl.load(row_ptr + offsets, mask=mask, other=float("-inf")) * inv_temperature
        new_max = tl.maximum(running_max, tl.max(z, axis=0))
        rescale = tl.exp(running_max - new_max)
        exps = tl.exp(z - new_max)
        running_sum = running_sum * rescale + tl.sum(exps, axis=0)
        if HAS_ENTROPY:
            running_weighted = running_weighted * rescale + tl.sum(exps * tl.where(mask, z, 0.0), axis=0)
        running_max = new_max
    tl.store(stats_ptr + row, running_max)
    tl.store(stats_ptr + num_rows + row, running_sum)
    if HAS_ENTROPY:
        tl.store(stats_ptr + 2 * num_rows + row, running_weighted)
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


def chunk_vocab_size(num_rows: int, vocab: int, element_size: int) -> int:
    """Columns per vocabulary chunk: fp32 logits + gradient of ``num_rows`` rows within CHUNK_BYTES.

    A power of two (at least 64) or the whole vocabulary, so the autotuning key (the chunk width)
    takes a handful of values however the number of rows varies between calls.
    """
    columns = CHUNK_BYTES // (max(num_rows, 1) * (4 + element_size))
    return min(vocab, max(_MIN_CHUNK, 1 << (max(columns, 1).bit_length() - 1)))


def forward(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float, compute_entropy: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probs, entropy, lse and mean logit (all fp32 ``[M]``) of validated contiguous operands.

    Args:
        hidden: ``[M, H]`` the rows that predict the targets (already gathered).
        weight: ``[V, H]`` LM head, same dtype and device.
        targets: ``[M]`` int64, in ``[0, V)`` or ``IGNORE_INDEX``.
    """
    num_rows, vocab = hidden.shape[0], weight.shape[0]
    fp32 = {"dtype": torch.float32, "device": hidden.device}
    if num_rows == 0:
        empty = torch.zeros(0, **fp32)
        return empty, empty, empty, empty
    chunk_vocab = chunk_vocab_size(num_rows, vocab, hidden.element_size())
    starts = range(0, vocab, chunk_vocab)
    stats = torch.empty(len(starts), 3 if compute_entropy else 2, num_rows, **fp32)
    target_logit = torch.zeros(num_rows, **fp32)
    for index, start in enumerate(starts):
        logits = _matmul_fp32(hidden, weight[start : start + chunk_vocab].T)
        _chunk_stats_kernel[(num_rows,)](
            logits,
            targets,
            stats[index],
            target_logit,
            num_rows,
            logits.shape[1],
            start,
            1.0 / temperature,
            HAS_ENTROPY=compute_entropy,
        )
        del logits
    row_max = stats[:, 0].amax(dim=0)
    rescale = torch.exp(stats[:, 0] - row_max)
    row_sum = (stats[:, 1] * rescale).sum(dim=0)
    lse = row_max + torch.log(row_sum)
    valid = targets != IGNORE_INDEX
    logprobs = torch.where(valid, target_logit - lse, 0.0)
    if not compute_entropy:
        return logprobs, torch.zeros(0, **fp32), lse, torch.zeros(0, **fp32)
    mean_logit = (stats[:, 2] * rescale).sum(dim=0) / row_sum
    entropy = torch.where(valid, lse - mean_logit, 0.0)
    return logprobs, entropy, lse, mean_logit


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
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """fp32 ``grad_hidden [M, H]`` and ``grad_weight [V, H]`` (weight dtype); None where not needed.

    ``grad_logprobs``/``grad_entropy`` are fp32 ``[M]`` and already zero on ignored targets;
    ``mean_logit`` (``lse - entropy``) is needed with ``grad_entropy``.
    """
    num_rows, vocab = hidden.shape[0], weight.shape[0]
    grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_hidden else None
    if num_rows == 0 or not (need_hidden or need_weight):
        return grad_hidden, torch.zeros_like(weight) if need_weight else None
    # Every chunk writes its rows of grad_weight whole, so it needs no zero fill.
    grad_weight = torch.empty_like(weight) if need_weight else None
    has_entropy_grad = grad_entropy is not None
    chunk_vocab = chunk_vocab_size(num_rows, vocab, hidden.element_size())
    for start in range(0, vocab, chunk_vocab):
        weight_chunk = weight[start : start + chunk_vocab]
        logits = _matmul_fp32(hidden, weight_chunk.T)
        grad_logits = torch.empty(logits.shape, dtype=hidden.dtype, device=hidden.device)
        _chunk_grad_kernel[(num_rows,)](
            logits,
            grad_logits,
            targets,
            lse,
            mean_logit if has_entropy_grad else lse,
            grad_logprobs,
            grad_entropy if has_entropy_grad else grad_logprobs,
            logits.shape[1],
            start,
            1.0 / temperature,
            HAS_ENTROPY_GRAD=has_entropy_grad,
        )
        del logits
        if need_weight:
            _matmul_into(grad_weight[start : start + chunk_vocab], grad_logits.T, hidden)
        if need_hidden:
            grad_hidden += _matmul_fp32(grad_logits, weight_chunk)
    return grad_hidden, grad_weight
