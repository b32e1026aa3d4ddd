"""Triton backend of ``fused_logprobs`` with the softmax statistics in the GEMM epilogue (CCE-style).

The cuBLAS path (``logprobs_triton``) writes each tile of fp32 logits to memory between a
cuBLAS GEMM and a Triton reduction; at trainer shapes that round trip is about a third of the time
above the bare GEMMs (H100, M=16384, H=1536, V=151,936 bf16: 55.6 ms against 33.4 ms). Here the
logits never reach memory:

- forward: ``_lse_tile_kernel`` computes a ``[BLOCK_M, BLOCK_N]`` logits tile with ``tl.dot`` over
  the hidden size and reduces it in registers to the tile's (max, sum of exp, sum of exp * z) per
  row, written to ``[vocabulary tiles, rows]`` partials, plus the target logit where the target lies
  in the tile; the partials of a row block (at most ``ROW_BLOCK`` rows: 78 MB per statistic at
  V = 151,936, two or three statistics) merge into lse and entropy with a few ``[tiles, rows]``
  torch reductions. Tiles are launched in groups of ``GROUP_M`` row tiles (``_tile_ids``).
- backward: ``_grad_tile_kernel`` recomputes the logits tile the same way and writes
  ``dL/dlogits`` in the input dtype for one (row block, vocabulary chunk); the two gradient GEMMs
  stay cuBLAS, as in ``logprobs_triton`` (each needs a reduction of the tile along a different axis).
  The tile budget (``ANYTIME_LOGPROBS_TILE_MB``) holds only that gradient, so chunks are wider.

It is the default of ``backend="triton"`` for bf16 operands on CUDA: on an H100 (M=16384,
H=1536, V=151,936 bf16, fwd+bwd; ``docs/gpu_runs/2026-11-27-h100-run2``) it ran 51.1 ms against
the cuBLAS path's 55.6 ms, 1.53x the bare GEMMs' 33.4 ms, with the same errors against fp64.
``ANYTIME_LOGPROBS_EPILOGUE=0`` selects the cuBLAS path, ``1`` this one for every dtype (fp32
and fp16 operands default to the cuBLAS path: this path has not been timed on them). Results
equal the cuBLAS path's (tests run both under ``TRITON_INTERPRET=1``). Under the interpreter
the tiles are small and ``tl.dot`` runs on fp32 (its bf16 product is wrong there).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from anytime_kernels import logprobs_triton
from anytime_kernels._interpreter import INTERPRET as _INTERPRET
from anytime_kernels._interpreter import LAUNCH_OPTIONS
from anytime_kernels.logprobs_triton import _row_blocks


def enabled(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``backend="triton"`` runs this path for operands of ``dtype`` on ``device``.

    ``ANYTIME_LOGPROBS_EPILOGUE``: ``1`` always, ``0`` never (the cuBLAS + reduction path of
    ``logprobs_triton``); unset or empty: on CUDA for bf16 operands, where it was measured
    ahead, else the cuBLAS path. Any other value raises rather than being read as either."""
    value = os.environ.get("ANYTIME_LOGPROBS_EPILOGUE", "").strip()
    if value not in ("", "0", "1"):
        raise ValueError(f"ANYTIME_LOGPROBS_EPILOGUE must be 0 or 1 (or unset: automatic), got {value!r}")
    if value:
        return value == "1"
    return torch.device(device).type == "cuda" and dtype == torch.bfloat16


def _configs() -> list[triton.Config]:
    if _INTERPRET:
        # GROUP_M 2 with 16-row tiles: the interpreter tests run several groups, the last one short.
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16, "GROUP_M": 2}, num_warps=4)]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": 64, "GROUP_M": 16}, num_warps=warps, num_stages=stages)
        # Two Hopper-friendly shapes (autotuning compiles each, and a GPU check has minutes).
        for m, n, warps, stages in ((128, 256, 8, 3), (128, 128, 8, 4))
    ]


@triton.jit
def _tile_ids(num_rows, num_cols, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row tile, column tile) of this program, in groups of GROUP_M row tiles.

    With row tiles varying fastest, the programs resident at once would cover every row of the
    block (16k rows x H bf16 = 48 MB at H 1536, about the whole L2) against one or two weight tiles,
    re-reading the hidden states from HBM for each column tile. Walking the column tiles inside a
    group of GROUP_M row tiles keeps both operands of the resident programs in L2.
    """
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(num_rows, BLOCK_M)
    tiles_n = tl.cdiv(num_cols, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(tiles_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % group_m, (pid % per_group) // group_m


def _precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: fp32 operands follow torch's global TF32 setting, as cuBLAS does."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


@triton.jit
def _logits_tile(
    hidden_ptr, weight_ptr, rows, cols, num_rows, vocab_end, hidden_size, stride_h, stride_w,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):  # fmt: skip
    """``hidden[rows] @ weight[cols].T`` as an fp32 ``[BLOCK_M, BLOCK_N]`` tile."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    row_mask = rows < num_rows
    col_mask = cols < vocab_end
    for k in range(0, hidden_size, BLOCK_K):
        ks = k + tl.arange(0, BLOCK_K)
        k_mask = ks < hidden_size
        a = tl.load(hidden_ptr + rows[:, None] * stride_h + ks[None, :], mask=row_mask[:, None] & k_mask[None, :],
                    other=0.0)  # fmt: skip
        b = tl.load(weight_ptr + cols[None, :] * stride_w + ks[:, None], mask=col_mask[None, :] & k_mask[:, None],
                    other=0.0)  # fmt: skip
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    return acc


@triton.autotune(configs=_configs(), key=["hidden_size", "HAS_ENTROPY", "PRECISION"])
@triton.jit
def _lse_tile_kernel(
    hidden_ptr, weight_ptr, targets_ptr, part_max_ptr, part_sum_ptr, part_weighted_ptr, target_logit_ptr,
    num_rows, vocab, hidden_size, stride_h, stride_w, inv_temperature,
    HAS_ENTROPY: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """One logits tile, reduced in registers to its per-row (max, sum exp, sum exp * z)."""
    pid_m, pid_n = _tile_ids(num_rows, vocab, BLOCK_M, BLOCK_N, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = _logits_tile(hidden_ptr, weight_ptr, rows, cols, num_rows, vocab, hidden_size, stride_h, stride_w,
                       UPCAST, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)  # fmt: skip
    col_mask = cols < vocab
    z = tl.where(col_mask[None, :], acc * inv_temperature, float("-inf"))
    tile_max = tl.max(z, axis=1)
    exps = tl.exp(z - tile_max[:, None])
    row_mask = rows < num_rows
    out = pid_n.to(tl.int64) * num_rows + rows
    tl.store(part_max_ptr + out, tile_max, mask=row_mask)
    tl.store(part_sum_ptr + out, tl.sum(exps, axis=1), mask=row_mask)
    if HAS_ENTROPY:
        tl.store(part_weighted_ptr + out, tl.sum(exps * tl.where(col_mask[None, :], z, 0.0), axis=1), mask=row_mask)
    targets = tl.load(targets_ptr + rows, mask=row_mask, other=-1)
    hit = cols[None, :] == targets[:, None]
    target_logit = tl.sum(tl.where(hit, z, 0.0), axis=1)
    in_tile = (targets >= pid_n * BLOCK_N) & (targets < pid_n * BLOCK_N + BLOCK_N)
    tl.store(target_logit_ptr + rows, target_logit, mask=row_mask & in_tile)


@triton.autotune(configs=_configs(), key=["hidden_size", "HAS_ENTROPY_GRAD", "PRECISION"])
@triton.jit
def _grad_tile_kernel(
    hidden_ptr, weight_ptr, targets_ptr, lse_ptr, mean_logit_ptr, grad_logprobs_ptr, grad_entropy_ptr, grad_ptr,
    num_rows, vocab_start, vocab_end, chunk_vocab, hidden_size, stride_h, stride_w, inv_temperature,
    HAS_ENTROPY_GRAD: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """dL/dlogits = (g_lp * (onehot - p) - g_ent * p * (z - mean_z)) / T of one recomputed tile."""
    pid_m, pid_n = _tile_ids(num_rows, chunk_vocab, BLOCK_M, BLOCK_N, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    local = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = vocab_start + local
    acc = _logits_tile(hidden_ptr, weight_ptr, rows, cols, num_rows, vocab_end, hidden_size, stride_h, stride_w,
                       UPCAST, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)  # fmt: skip
    row_mask = rows < num_rows
    z = acc * inv_temperature
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    grad_logprob = tl.load(grad_logprobs_ptr + rows, mask=row_mask, other=0.0)
    probs = tl.exp(z - lse[:, None])
    weight_per_prob = tl.broadcast_to(grad_logprob[:, None], (BLOCK_M, BLOCK_N))
    if HAS_ENTROPY_GRAD:
        grad_entropy = tl.load(grad_entropy_ptr + rows, mask=row_mask, other=0.0)
        mean_logit = tl.load(mean_logit_ptr + rows, mask=row_mask, other=0.0)
        weight_per_prob = weight_per_prob + grad_entropy[:, None] * (z - mean_logit[:, None])
    targets = tl.load(targets_ptr + rows, mask=row_mask, other=-1)
    grad = -probs * weight_per_prob
    grad = tl.where(cols[None, :] == targets[:, None], grad + grad_logprob[:, None], grad) * inv_temperature
    mask = row_mask[:, None] & (cols < vocab_end)[None, :]
    out = grad_ptr + rows[:, None].to(tl.int64) * chunk_vocab + local[None, :]
    tl.store(out, grad.to(grad_ptr.dtype.element_ty), mask=mask)


def _used_block_n(kernel) -> int:
    config = getattr(kernel, "best_config", None) or kernel.configs[0]
    return config.kwargs["BLOCK_N"]


def forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    compute_entropy: bool,
    budget: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same contract as ``logprobs_triton.forward``: fp32 log-probs, entropy (empty unless asked), lse.
    ``budget`` is accepted for the common signature: this forward keeps no tiles in memory."""
    num_rows, vocab = hidden.shape[0], weight.shape[0]
    fp32 = {"dtype": torch.float32, "device": hidden.device}
    if num_rows == 0:
        empty = torch.zeros(0, **fp32)
        return empty, empty, empty
    lse = torch.empty(num_rows, **fp32)
    mean_logit = torch.empty(num_rows if compute_entropy else 0, **fp32)
    target_logit = torch.zeros(num_rows, **fp32)
    min_block_n = min(config.kwargs["BLOCK_N"] for config in _lse_tile_kernel.configs)
    precision = _precision(hidden.dtype)
    for row_start, row_end in _row_blocks(num_rows):
        rows = row_end - row_start
        tiles = triton.cdiv(vocab, min_block_n)
        part_max = torch.empty(tiles, rows, **fp32)
        part_sum = torch.empty(tiles, rows, **fp32)
        part_weighted = torch.empty(tiles if compute_entropy else 1, rows, **fp32)
        block = hidden[row_start:row_end]
        grid = lambda meta, rows=rows: (triton.cdiv(rows, meta["BLOCK_M"]) * triton.cdiv(vocab, meta["BLOCK_N"]),)  # noqa: E731
        _lse_tile_kernel[grid](
            block, weight, targets[row_start:row_end], part_max, part_sum, part_weighted,
            target_logit[row_start:row_end], rows, vocab, hidden.shape[1], block.stride(0), weight.stride(0),
            1.0 / temperature, HAS_ENTROPY=compute_entropy, UPCAST=_INTERPRET, PRECISION=precision, **LAUNCH_OPTIONS,
        )  # fmt: skip
        used = triton.cdiv(vocab, _used_block_n(_lse_tile_kernel))
        part_max, part_sum = part_max[:used], part_sum[:used]
        row_max = part_max.max(dim=0).values
        scale = torch.exp(part_max - row_max)
        total = (part_sum * scale).sum(dim=0)
        lse[row_start:row_end] = row_max + torch.log(total)
        if compute_entropy:
            mean_logit[row_start:row_end] = (part_weighted[:used] * scale).sum(dim=0) / total
        del part_max, part_sum, part_weighted, scale
    return logprobs_triton.finish_rows(targets, target_logit, lse, mean_logit if compute_entropy else None)


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
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Same contract as ``logprobs_triton.backward`` (its chunk loop and gradient GEMMs); each
    ``dL/dlogits`` tile comes from ``_grad_tile_kernel``, which recomputes the logits in registers,
    so the tile budget holds only the gradient (wider chunks than the default path's)."""
    has_entropy_grad = grad_entropy is not None
    precision = _precision(hidden.dtype)

    def tile_grad(block: slice, start: int, end: int, grad_logits: torch.Tensor) -> None:
        rows, width = block.stop - block.start, end - start
        rows_hidden = hidden[block]
        _grad_tile_kernel[lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]) * triton.cdiv(width, meta["BLOCK_N"]),)](
            rows_hidden, weight, targets[block], lse[block], mean_logit[block] if has_entropy_grad else lse[block],
            grad_logprobs[block], grad_entropy[block] if has_entropy_grad else grad_logprobs[block], grad_logits,
            rows, start, end, width, hidden.shape[1], rows_hidden.stride(0), weight.stride(0), 1.0 / temperature,
            HAS_ENTROPY_GRAD=has_entropy_grad, UPCAST=_INTERPRET, PRECISION=precision, **LAUNCH_OPTIONS,
        )  # fmt: skip

    return logprobs_triton.backward(
        hidden, weight, targets, lse, mean_logit, grad_logprobs, grad_entropy, temperature, need_hidden, need_weight,
        budget=budget, tile_grad=tile_grad,
    )  # fmt: skip
