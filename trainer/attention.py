"""Tree attention inside Hugging Face models: one table of backends and transformers' registry.

The tree rule (see ``anytime_kernels.attention``) enters a model through
``AttentionInterface.register("anytime_tree", ...)`` and a matching ``AttentionMaskInterface``
entry. The prepared rule travels to every attention layer as the ``tree_attention`` keyword
(``TreeAttention``), which Llama/Qwen2/Qwen3 pass through their decoder layers unchanged; the
registered mask function returns ``None`` because the tree rule replaces the model's causal mask.
No model code is copied.

Every backend is one row of ``BACKENDS``: whether it runs here, how it prepares a micro-batch's
rule (once per micro-batch, not per layer) and how one layer attends with it. Adding a backend is
adding a row. ``auto`` picks the first of ``AUTO_ORDER`` that runs on the device and serves the
model's head size (flex needs ``head_dim >= 16``).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from anytime_kernels.attention import (
    GatherPlan,
    dense_tree_mask,
    flex_block_mask,
    gather_plan,
    varlen_attention_reference,
)
from anytime_kernels.backends import BackendUnavailableError
from anytime_kernels.tree import mask_mod_from_offsets

ATTENTION_NAME = "anytime_tree"
FLEX_MIN_HEAD_DIM = 16


@dataclass(frozen=True)
class Backend:
    """One way to run tree attention.

    Attributes:
        needs: what it needs to run, for the error when it cannot.
        available: ``(device) -> bool``.
        serves_head_dim: ``(head_dim) -> bool``; ``auto`` skips a backend that cannot serve it.
        serves_dtype: ``(dtype) -> bool`` of q/k/v (the autocast dtype, else the model's); the same.
        prepare: ``(seq_ids, prefix_end, branch_start, device) -> state`` from ``[L]`` host
            offsets, once per micro-batch.
        attend: ``(state, query [1, Hq, L, D], key [1, Hkv, L, D], value, scale) -> [1, L, Hq, D]``.
    """

    needs: str
    available: Callable[[torch.device], bool]
    prepare: Callable[..., object]
    attend: Callable[..., torch.Tensor]
    serves_head_dim: Callable[[int], bool] = lambda head_dim: True
    serves_dtype: Callable[[torch.dtype], bool] = lambda dtype: True


def _on_device(*tensors: torch.Tensor, device: torch.device) -> list[torch.Tensor]:
    return [t.to(device, non_blocking=True) for t in tensors]


def _prepare_dense(seq_ids, prefix_end, branch_start, device):
    return dense_tree_mask(*_on_device(seq_ids, prefix_end, branch_start, device=device))[None, None]


@dataclass(frozen=True)
class TreeBlocks:
    """A packed micro-batch as one row per tree for SDPA: attention never crosses trees, so the
    ``[L, L]`` mask is block-diagonal and ``n`` blocks of the longest tree ``T`` cost ``n T^2``.

    Attributes:
        index: ``[n, T]`` packed position of each tree's tokens, padded with ``L`` (a padding
            token that attends only to itself).
        mask: ``[n, 1, T, T]`` the tree rule within each block.
        valid: ``[n_valid]`` flat positions in ``index`` that are real tokens, in packed order.
    """

    index: torch.Tensor
    mask: torch.Tensor
    valid: torch.Tensor


# Blocks are used when they do this many times less attention work than the dense mask (the gathers
# cost time of their own: on the tiny CPU model, 4 trees of 512 packed tokens run faster dense).
_BLOCKS_MIN_SAVING = 4


def _prepare_sdpa(seq_ids, prefix_end, branch_start, device):
    """``TreeBlocks`` where they save enough work over the dense ``[L, L]`` mask, else that mask.
    The offsets are read on the host (pass host tensors: no device sync)."""
    length = seq_ids.numel()
    if length == 0:
        return _prepare_dense(seq_ids, prefix_end, branch_start, device)
    seq = seq_ids.cpu()
    starts = [0, *((seq[1:] != seq[:-1]).nonzero().flatten() + 1).tolist()]
    ends = [*starts[1:], length]
    longest = max(end - start for start, end in zip(starts, ends, strict=True))
    contiguous = len(starts) == int(seq.unique().numel())  # one run per tree (a packed layout's order)
    if not contiguous or _BLOCKS_MIN_SAVING * len(starts) * longest * longest > length * length:
        return _prepare_dense(seq_ids, prefix_end, branch_start, device)
    positions = torch.tensor(starts)[:, None] + torch.arange(longest)
    index = torch.where(positions < torch.tensor(ends)[:, None], positions, length)  # [n, T]
    mask_mod = mask_mod_from_offsets(seq, prefix_end.cpu(), branch_start.cpu(), padded_len=length + 1)
    mask = mask_mod(0, 0, index[:, :, None], index[:, None, :])[:, None]
    valid = (index.flatten() < length).nonzero().flatten()
    return TreeBlocks(*_on_device(index, mask, valid, device=device))


def _attend_sdpa(state, query, key, value, scale):
    groups = query.shape[1] // key.shape[1]
    if not isinstance(state, TreeBlocks):
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=state, scale=scale, enable_gqa=groups > 1)
        return out.transpose(1, 2)
    blocks, width = state.index.shape

    def by_tree(t: torch.Tensor) -> torch.Tensor:  # [1, H, L, D] -> [n, H, T, D]; row L is the padding
        padded = F.pad(t[0], (0, 0, 0, 1))
        return padded[:, state.index.flatten()].unflatten(1, (blocks, width)).transpose(0, 1)

    out = F.scaled_dot_product_attention(
        by_tree(query), by_tree(key), by_tree(value), attn_mask=state.mask, scale=scale, enable_gqa=groups > 1
    )  # [n, Hq, T, D]
    return out.transpose(1, 2).flatten(0, 1).index_select(0, state.valid)[None]


def _prepare_flex(seq_ids, prefix_end, branch_start, device):
    return flex_block_mask(*_on_device(seq_ids, prefix_end, branch_start, device=device))


_COMPILED_FLEX = None


def _compiled_flex():
    """flex_attention compiled once per process with dynamic shapes (lengths vary per micro-batch)."""
    global _COMPILED_FLEX
    if _COMPILED_FLEX is None:
        from torch.nn.attention.flex_attention import flex_attention

        _COMPILED_FLEX = torch.compile(flex_attention, dynamic=True)
    return _COMPILED_FLEX


def _attend_flex(block_mask, query, key, value, scale):
    length = query.shape[2]
    pad = block_mask.shape[-2] - length

    def padded(t: torch.Tensor) -> torch.Tensor:
        return F.pad(t, (0, 0, 0, pad))

    groups = query.shape[1] // key.shape[1]
    out = _compiled_flex()(
        padded(query), padded(key), padded(value), block_mask=block_mask, scale=scale, enable_gqa=groups > 1
    )
    return out[:, :, :length].transpose(1, 2)


def _prepare_plan(seq_ids, prefix_end, branch_start, device):
    return gather_plan(seq_ids, prefix_end, branch_start, device=device)


def _gathered(plan: GatherPlan, query, key, value):
    """``[L, Hq, D]`` queries and ``[K, Hkv, D]`` keys/values in plan order: gathered before any
    grouped-query expansion, so the gather moves ``Hkv`` heads, not ``Hq``."""
    q = query[0].transpose(0, 1)
    k = key[0].transpose(0, 1).index_select(0, plan.kv_index)
    v = value[0].transpose(0, 1).index_select(0, plan.kv_index)
    return q, k, v


def _attend_reference_varlen(plan, query, key, value, scale):
    q, k, v = _gathered(plan, query, key, value)
    return varlen_attention_reference(q, k, v, plan, scale)[None]


def _attend_flash_attn(plan, query, key, value, scale):
    from flash_attn import flash_attn_varlen_func

    q, k, v = _gathered(plan, query, key, value)
    out = flash_attn_varlen_func(
        q.contiguous(),
        k,
        v,
        plan.cu_seqlens_q,
        plan.cu_seqlens_k,
        plan.max_seqlen_q,
        plan.max_seqlen_k,
        softmax_scale=scale,
        causal=True,
    )
    return out[None]


def _prepare_xformers(seq_ids, prefix_end, branch_start, device):
    from xformers.ops import fmha

    plan = gather_plan(seq_ids, prefix_end, branch_start, device=device)
    # On the model's device: xformers' default is the current CUDA device.
    mask = fmha.attn_bias.BlockDiagonalCausalFromBottomRightMask
    return plan, mask.from_seqlens(plan.q_lens, plan.k_lens, device=device)


def _attend_xformers(state, query, key, value, scale):
    from xformers.ops import fmha

    plan, bias = state
    q, k, v = _gathered(plan, query, key, value)
    groups = q.shape[1] // k.shape[1]
    # [B, M, H, D] with K/V repeated to Hq heads after the gather (query head h reads key head
    # h // groups): xformers has no backward for its grouped [B, M, G, H, D] layout, and scoring
    # old log-probs with the same kernel as training keeps the PPO ratio of an unchanged policy at 1.
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return fmha.memory_efficient_attention(q[None], k[None], v[None], attn_bias=bias, scale=scale)


@functools.cache
def _importable(module: str, attribute: str) -> bool:
    """Whether ``module.attribute`` imports (a package that is present but broken, or a namespace
    without the function, e.g. only ``flash_attn.cute`` of flash-attn 4, does not count)."""
    if importlib.util.find_spec(module.split(".")[0]) is None:
        return False
    try:
        return hasattr(importlib.import_module(module), attribute)
    except (ImportError, OSError, RuntimeError):
        return False


def _flash_attn_available(device: torch.device) -> bool:
    return (
        device.type == "cuda"
        and _importable("flash_attn", "flash_attn_varlen_func")
        and torch.cuda.get_device_capability(device) >= (8, 0)
    )


BACKENDS: dict[str, Backend] = {
    "flex": Backend(
        needs=f"a CUDA device (flex_attention has no backward on CPU) and head_dim >= {FLEX_MIN_HEAD_DIM}",
        available=lambda device: device.type == "cuda",
        prepare=_prepare_flex,
        attend=_attend_flex,
        serves_head_dim=lambda head_dim: head_dim >= FLEX_MIN_HEAD_DIM,
    ),
    "flash_attn": Backend(
        needs="an Ampere or newer CUDA device, the flash-attn 2 package (`pip install anytime-kernels[flash-attn]`), "
        "fp16/bf16 q/k/v (a bf16 model or autocast) and head_dim <= 256",
        available=_flash_attn_available,
        prepare=_prepare_plan,
        attend=_attend_flash_attn,
        serves_head_dim=lambda head_dim: head_dim <= 256,
        serves_dtype=lambda dtype: dtype in (torch.float16, torch.bfloat16),
    ),
    "xformers": Backend(
        needs="a CUDA device and the xformers package (`pip install anytime-kernels[xformers]`)",
        available=lambda device: (
            device.type == "cuda" and _importable("xformers.ops.fmha", "memory_efficient_attention")
        ),
        prepare=_prepare_xformers,
        attend=_attend_xformers,
    ),
    "sdpa": Backend(needs="nothing", available=lambda device: True, prepare=_prepare_sdpa, attend=_attend_sdpa),
    "reference_varlen": Backend(
        needs="nothing", available=lambda device: True, prepare=_prepare_plan, attend=_attend_reference_varlen
    ),
}
AUTO_ORDER = ("flex", "flash_attn", "xformers", "sdpa")
BACKEND_NAMES = ("auto", *BACKENDS)


def resolve_backend(
    backend: str, device: torch.device | str, head_dim: int | None = None, dtype: torch.dtype | None = None
) -> str:
    """The concrete backend for ``backend`` on ``device`` (and the model's ``head_dim`` and the
    q/k/v ``dtype``, where known)."""
    device = torch.device(device)
    if backend not in BACKEND_NAMES:
        raise ValueError(f"attention backend must be one of {BACKEND_NAMES}, got {backend!r}")

    def serves(entry: Backend) -> bool:
        return (
            entry.available(device)
            and (head_dim is None or entry.serves_head_dim(head_dim))
            and (dtype is None or entry.serves_dtype(dtype))
        )

    if backend == "auto":
        for candidate in AUTO_ORDER:
            if serves(BACKENDS[candidate]):
                return candidate
    entry = BACKENDS[backend]
    if not serves(entry):
        shape = "" if head_dim is None else f" with head_dim {head_dim}"
        shape += "" if dtype is None else f" and {str(dtype).removeprefix('torch.')} q/k/v"
        raise BackendUnavailableError(
            f"attention backend {backend!r} is not available on {device}{shape}: it needs {entry.needs}"
        )
    return backend


@dataclass
class TreeAttention:
    """The tree rule of one packed micro-batch, prepared for one backend.

    Attributes:
        backend: the resolved backend name.
        length: L, the packed tokens of the micro-batch.
        state: what the backend's ``attend`` reads (a dense mask, a ``BlockMask``, a ``GatherPlan``).
    """

    backend: str
    length: int
    state: object


def prepare_tree_attention(
    seq_ids: torch.Tensor,
    prefix_end: torch.Tensor,
    branch_start: torch.Tensor,
    backend: str = "auto",
    *,
    head_dim: int | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> TreeAttention:
    """Prepare the tree rule of one packed micro-batch for ``backend`` on ``device``.

    Args:
        seq_ids, prefix_end, branch_start: ``[L]`` local offsets (``ResponseTreeLayout`` fields of
            the micro-batch). Host tensors keep device syncs out of the step.
        head_dim: the model's head size, so that ``auto`` skips a backend that cannot serve it.
        dtype: the dtype attention runs in (autocast's, else the model's); the same for it.
        device: where attention runs (default: where the offsets are).
    """
    if not (seq_ids.shape == prefix_end.shape == branch_start.shape) or seq_ids.dim() != 1:
        raise ValueError(
            "seq_ids, prefix_end and branch_start must be 1-D of one length, got "
            f"{tuple(seq_ids.shape)}, {tuple(prefix_end.shape)}, {tuple(branch_start.shape)}"
        )
    device = seq_ids.device if device is None else torch.device(device)
    resolved = resolve_backend(backend, device, head_dim, dtype)
    state = BACKENDS[resolved].prepare(seq_ids, prefix_end, branch_start, device)
    return TreeAttention(resolved, int(seq_ids.numel()), state)


def _common_dtype(query, key, value):
    """One dtype for q/k/v: RoPE under autocast promotes q/k to fp32 while v stays in the autocast
    dtype, and flash-attn/xformers reject mixed inputs."""
    if query.dtype == key.dtype == value.dtype:
        return query, key, value
    device_type = query.device.type
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    else:
        dtype = value.dtype
    return query.to(dtype), key.to(dtype), value.to(dtype)


def tree_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention function registered as ``anytime_tree``.

    ``query [1, Hq, L, D]``, ``key``/``value [1, Hkv, L, D]``; returns ``([1, L, Hq, D], None)``.
    """
    spec: TreeAttention | None = kwargs.get("tree_attention")
    if spec is None:
        raise ValueError(
            f"attn_implementation {ATTENTION_NAME!r} needs the `tree_attention=` keyword (a TreeAttention); "
            "run the model through trainer.policy.TreePolicy"
        )
    if query.shape[0] != 1 or query.shape[2] != spec.length:
        raise ValueError(
            f"tree attention expects one packed sequence of {spec.length} tokens, got query {tuple(query.shape)}"
        )
    if dropout:
        raise ValueError(f"tree attention does not support attention dropout, got {dropout}")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    query, key, value = _common_dtype(query, key, value)
    out = BACKENDS[spec.backend].attend(spec.state, query, key, value, scale)
    return out.contiguous(), None


def tree_mask_interface(*args, **kwargs) -> None:
    """Mask function registered for ``anytime_tree``: the tree rule replaces the model's causal mask.

    transformers calls this from ``create_causal_mask``; the rule itself arrives per layer as the
    ``tree_attention`` keyword, prepared once per micro-batch, so there is nothing to build here.
    """
    return None


_REGISTERED = False


def register_tree_attention() -> str:
    """Register ``anytime_tree`` with transformers (idempotent); returns the implementation name."""
    global _REGISTERED
    if not _REGISTERED:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface

        AttentionInterface.register(ATTENTION_NAME, tree_attention_forward)
        AttentionMaskInterface.register(ATTENTION_NAME, tree_mask_interface)
        _REGISTERED = True
    return ATTENTION_NAME
