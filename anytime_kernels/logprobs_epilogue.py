"""Triton backend of ``fused_logprobs`` with the softmax statistics in the GEMM epilogue (CCE-style).

The cuBLAS path (``logprobs_triton``) writes each tile of fp32 logits to memory between a
cuBLAS GEMM and a Triton reduction. Here the logits never reach memory:

- forward: ``_lse_tile_kernel`` computes a ``[BLOCK_M, BLOCK_N]`` logits tile with ``tl.dot`` over
  the hidden size and reduces it in registers to the tile's (max, sum of exp, sum of exp * z) per
  row, written to ``[vocabulary tiles, rows]`` partials, plus the target logit where the target lies
  in the tile; the partials of a row block (at most ``ROW_BLOCK`` rows; at V = 151,936 and 128-wide
  tiles 1187 x 16384 x 4 bytes = 78 MB per statistic, half that at 256) merge into lse and entropy
  with a few ``[tiles, rows]`` torch reductions. They are sized for the tile width the autotuner
  chose for the launch's key (before its first launch, for the narrowest it may choose). Tiles are
  launched in groups of ``GROUP_M`` row tiles (``_tile_ids``).
- backward: ``_grad_tile_kernel`` recomputes the logits tile the same way and writes
  ``dL/dlogits`` in the input dtype for one (row block, vocabulary chunk); the two gradient GEMMs
  stay cuBLAS, as in ``logprobs_triton`` (each needs a reduction of the tile along a different axis).
  The tile budget (``ANYTIME_LOGPROBS_TILE_MB``) holds only that gradient, so chunks are wider.

It is the default of ``backend="triton"`` for bf16 operands on CUDA: on an H100 (M=16384,
H=1536, V=151,936 bf16, fwd+bwd; ``docs/gpu_runs/2026-11-27-h100-run2``) it ran 51.1 ms against
the cuBLAS path's 55.6 ms and the bare GEMMs' 33.4 ms (1.53x), with the same errors against fp64.
The pruned configs (``_prune_configs``), the autotuning keys and the int64 offsets have not run on
a GPU yet. ``ANYTIME_LOGPROBS_EPILOGUE=0`` selects the cuBLAS path, ``1`` this one for every dtype
(fp32 and fp16 operands default to the cuBLAS path: this path has not been timed on them). Results
equal the cuBLAS path's (tests run both under ``TRITON_INTERPRET=1``). Under the interpreter the
tiles are small and ``tl.dot`` runs on fp32 (its bf16 product is wrong there).

Autotuning keys on the row count's power-of-two bucket, the vocabulary (chunk) width, the hidden
size and the flags, so a shape that would pick differently is tuned apart; ``autotune_choices``
lists what each kernel chose.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from anytime_kernels import logprobs_triton
from anytime_kernels._interpreter import INTERPRET as _INTERPRET
from anytime_kernels._interpreter import LAUNCH_OPTIONS
from anytime_kernels.logprobs_plan import row_blocks


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


# Tiles wider than this spill registers with the entropy sums or fp32 operands (``_prune_configs``).
_WIDEST_SPILL_FREE_N = 128
# Before triton 3.9 the bf16 gradient tile spills at 128 x 256 too (sm_90, triton 3.6: 255 registers and
# a 176-byte stack, 224 with the entropy gradient; none under 3.9).
_GRAD_TILE_SPILLS_WIDE = tuple(int(part) for part in triton.__version__.split(".")[:2]) < (3, 9)


def _prune_configs(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """The configs that do not spill registers for these operands and flags (autotuner hook).

    A ``[128, 256]`` fp32 accumulator in 8 warps holds 128 registers per thread. Compiled for sm_90
    (``tests/fixtures/compile_sm90.py``, triton 3.9), the forward with the entropy sums needs a
    second tile of exps beside it and spills (255 registers and a 96-byte stack; 456 bytes before
    both sums shared one reduction), and fp32 operands, whose ``tl.dot`` has no bf16 wgmma, spill
    about 13 KB in both kernels. Those launches keep the narrower tiles; the compile test holds every
    config the autotuner may try to its spill limit.
    """
    arguments = {**named_args, **kwargs}  # constexprs passed by keyword arrive in kwargs
    wide_spills = (arguments.get("HAS_ENTROPY", False) or arguments["hidden_ptr"].dtype == torch.float32
                   or ("HAS_ENTROPY_GRAD" in arguments and _GRAD_TILE_SPILLS_WIDE))  # fmt: skip
    kept = [config for config in configs if not (wide_spills and config.kwargs["BLOCK_N"] > _WIDEST_SPILL_FREE_N)]
    return kept or configs


def _rows_bucket(num_rows: int) -> int:
    """The autotuning key's row count: the next power of two (the grid, hence the best tile, scales with it)."""
    return 1 << max(num_rows - 1, 0).bit_length()


@triton.jit
def _tile_ids(num_rows, num_cols, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row tile, column tile) of this program, in groups of GROUP_M row tiles.

    With row tiles varying fastest, the programs resident at once would cover every row of the
    block (16384 rows x 1536 x 2 bytes = 48 MiB of bf16 hidden states, about an H100's 50 MB L2)
    against one or two weight tiles, re-reading the hidden states from HBM for each column tile.
    Walking the column tiles inside a group of GROUP_M row tiles keeps both operands of the
    resident programs in L2.
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
    """``hidden[rows] @ weight[cols].T`` as an fp32 ``[BLOCK_M, BLOCK_N]`` tile.

    Offsets are int64: ``cols * stride_w`` reaches V * H, past int32 at a 200k vocabulary and H 12288.
    """
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    row_mask = rows < num_rows
    col_mask = cols < vocab_end
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = hidden_ptr + rows.to(tl.int64)[:, None] * stride_h + ks[None, :]
    b_ptrs = weight_ptr + cols.to(tl.int64)[None, :] * stride_w + ks[:, None]
    for k in range(0, hidden_size, BLOCK_K):
        k_mask = ks < hidden_size - k
        a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=col_mask[None, :] & k_mask[:, None], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    return acc


@triton.jit
def _add_pair(a0, a1, b0, b1):
    return a0 + b0, a1 + b1


@triton.autotune(
    configs=_configs(),
    key=["rows_bucket", "vocab", "hidden_size", "HAS_ENTROPY", "PRECISION"],
    prune_configs_by={"early_config_prune": _prune_configs},
)
@triton.jit
def _lse_tile_kernel(
    hidden_ptr, weight_ptr, targets_ptr, part_max_ptr, part_sum_ptr, part_weighted_ptr, target_logit_ptr,
    num_rows, rows_bucket, vocab, partial_tiles, hidden_size, stride_h, stride_w, inv_temperature,
    HAS_ENTROPY: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """One logits tile, reduced in registers to its per-row (max, sum exp, sum exp * z).

    ``rows_bucket`` only keys the autotuner; ``partial_tiles`` is how many column tiles the
    partials hold (a wider config than planned writes nothing past them; the wrapper raises). The
    target logit is taken before the exps, and both entropy sums come from one reduction of
    ``exp(z - max)`` and ``z - max``, so fewer tiles are live at once (fewer spilled registers).
    """
    pid_m, pid_n = _tile_ids(num_rows, vocab, BLOCK_M, BLOCK_N, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = _logits_tile(hidden_ptr, weight_ptr, rows, cols, num_rows, vocab, hidden_size, stride_h, stride_w,
                       UPCAST, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)  # fmt: skip
    col_mask = cols < vocab
    z = tl.where(col_mask[None, :], acc * inv_temperature, float("-inf"))
    row_mask = rows < num_rows
    targets = tl.load(targets_ptr + rows, mask=row_mask, other=-1)
    target_logit = tl.sum(tl.where(cols[None, :] == targets[:, None], z, 0.0), axis=1)
    in_tile = (targets >= pid_n * BLOCK_N) & (targets < pid_n * BLOCK_N + BLOCK_N)
    tile_max = tl.max(z, axis=1)
    shifted = z - tile_max[:, None]
    exps = tl.exp(shifted)
    out = pid_n.to(tl.int64) * num_rows + rows
    stored = row_mask & (pid_n + tl.zeros_like(rows) < partial_tiles)
    tl.store(part_max_ptr + out, tile_max, mask=stored)
    if HAS_ENTROPY:
        # sum exp * z = sum exp * (z - max) + max * sum exp.
        total, weighted = tl.reduce((exps, exps * tl.where(col_mask[None, :], shifted, 0.0)), 1, _add_pair)
        tl.store(part_sum_ptr + out, total, mask=stored)
        tl.store(part_weighted_ptr + out, weighted + tile_max * total, mask=stored)
    else:
        tl.store(part_sum_ptr + out, tl.sum(exps, axis=1), mask=stored)
    tl.store(target_logit_ptr + rows, target_logit, mask=row_mask & in_tile)


@triton.autotune(
    configs=_configs(),
    key=["rows_bucket", "chunk_vocab", "hidden_size", "HAS_ENTROPY_GRAD", "PRECISION"],
    prune_configs_by={"early_config_prune": _prune_configs},
)
@triton.jit
def _grad_tile_kernel(
    hidden_ptr, weight_ptr, targets_ptr, lse_ptr, mean_logit_ptr, grad_logprobs_ptr, grad_entropy_ptr, grad_ptr,
    num_rows, rows_bucket, vocab_start, vocab_end, chunk_vocab, hidden_size, stride_h, stride_w, inv_temperature,
    HAS_ENTROPY_GRAD: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """dL/dlogits = (g_lp * (onehot - p) - g_ent * p * (z - mean_z)) / T of one recomputed tile
    (``rows_bucket`` only keys the autotuner)."""
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


def autotune_choices() -> list[str]:
    """One line per (autotuned kernel of both Triton paths, key): the config it chose. Empty under
    the interpreter (one config, never tuned) and before the first CUDA launch."""
    kernels = (
        _lse_tile_kernel,
        _grad_tile_kernel,
        logprobs_triton._chunk_stats_kernel,
        logprobs_triton._chunk_grad_kernel,
    )
    return [
        f"autotune {kernel.fn.__name__} {key}: {config}" for kernel in kernels for key, config in kernel.cache.items()
    ]


# BLOCK_N the autotuner chose per forward key (its own key: the same fields and the operands' dtype).
_chosen_block_n: dict[tuple, int] = {}


def _partial_tiles(rows: int, vocab: int, hidden: torch.Tensor, compute_entropy: bool, precision: str):
    """(key, column tiles to allocate partials for): the chosen config's once this key has been
    tuned, else the narrowest config the autotuner may try for these operands."""
    key = (_rows_bucket(rows), vocab, hidden.shape[1], compute_entropy, precision, hidden.dtype)
    block_n = _chosen_block_n.get(key)
    if block_n is None:
        kept = _prune_configs(_lse_tile_kernel.configs, {"hidden_ptr": hidden}, HAS_ENTROPY=compute_entropy)
        block_n = min(config.kwargs["BLOCK_N"] for config in kept)
    return key, triton.cdiv(vocab, block_n)


def forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    compute_entropy: bool,
    budget: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same contract as ``logprobs_triton.forward``: fp32 log-probs, entropy (empty unless asked), lse.
    ``budget`` is accepted for the common signature: this forward keeps no tiles in memory.

    The ``[column tiles, rows]`` partials of a row block are sized for the tile width the
    autotuner chose for this key; before its first launch, for the narrowest it may choose.
    """
    num_rows, vocab = hidden.shape[0], weight.shape[0]
    fp32 = {"dtype": torch.float32, "device": hidden.device}
    if num_rows == 0:
        empty = torch.zeros(0, **fp32)
        return empty, empty, empty
    lse = torch.empty(num_rows, **fp32)
    mean_logit = torch.empty(num_rows if compute_entropy else 0, **fp32)
    target_logit = torch.zeros(num_rows, **fp32)
    precision = _precision(hidden.dtype)
    for row_start, row_end in row_blocks(num_rows):
        rows = row_end - row_start
        key, tiles = _partial_tiles(rows, vocab, hidden, compute_entropy, precision)
        part_max = torch.empty(tiles, rows, **fp32)
        part_sum = torch.empty(tiles, rows, **fp32)
        part_weighted = torch.empty(tiles if compute_entropy else 1, rows, **fp32)
        block = hidden[row_start:row_end]
        grid = lambda meta, rows=rows: (triton.cdiv(rows, meta["BLOCK_M"]) * triton.cdiv(vocab, meta["BLOCK_N"]),)  # noqa: E731
        _lse_tile_kernel[grid](
            block, weight, targets[row_start:row_end], part_max, part_sum, part_weighted,
            target_logit[row_start:row_end], rows, _rows_bucket(rows), vocab, tiles, hidden.shape[1],
            block.stride(0), weight.stride(0), 1.0 / temperature, HAS_ENTROPY=compute_entropy, UPCAST=_INTERPRET,
            PRECISION=precision, **LAUNCH_OPTIONS,
        )  # fmt: skip
        block_n = (getattr(_lse_tile_kernel, "best_config", None) or _lse_tile_kernel.configs[0]).kwargs["BLOCK_N"]
        used = triton.cdiv(vocab, block_n)
        if used > tiles:
            raise RuntimeError(
                f"_lse_tile_kernel ran {used} column tiles of {block_n} for key {key}, but its partials hold {tiles}"
            )
        _chosen_block_n[key] = block_n
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

    def tile_grad(block, start, end, grad_logits, grad_logprobs, grad_entropy) -> None:
        rows, width = block.stop - block.start, end - start
        rows_hidden = hidden[block]
        _grad_tile_kernel[lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]) * triton.cdiv(width, meta["BLOCK_N"]),)](
            rows_hidden, weight, targets[block], lse[block], mean_logit[block] if has_entropy_grad else lse[block],
            grad_logprobs[block], grad_entropy[block] if has_entropy_grad else grad_logprobs[block], grad_logits,
            rows, _rows_bucket(rows), start, end, width, hidden.shape[1], rows_hidden.stride(0), weight.stride(0),
            1.0 / temperature, HAS_ENTROPY_GRAD=has_entropy_grad, UPCAST=_INTERPRET, PRECISION=precision,
            **LAUNCH_OPTIONS,
        )  # fmt: skip

    return logprobs_triton.backward(
        hidden, weight, targets, lse, mean_logit, grad_logprobs, grad_entropy, temperature, need_hidden, need_weight,
        budget=budget, tile_grad=tile_grad,
    )  # fmt: skip
