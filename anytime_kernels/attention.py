"""Tree attention for packed response trees, plugged into transformers' attention registry.

A micro-batch is one packed sequence (batch size 1) holding several response trees back to back.
The tree rule (``anytime_kernels.tree``): key k is visible to query q iff ``k <= q``, both belong
to the same tree, and ``k >= branch_start[q]`` or ``k < prefix_end[q]``.

The rule enters a Hugging Face model through ``AttentionInterface.register("anytime_tree", ...)``
and a matching ``AttentionMaskInterface`` entry. The prepared rule travels to every attention
layer as the ``tree_attention`` keyword (``TreeAttention``), which Llama/Qwen2/Qwen3 pass through
their decoder layers unchanged; the registered mask function returns ``None`` because the tree
rule replaces the model's own causal mask. No model code is copied.

Backends (``auto`` picks the first available of flex (CUDA), flash_attn, xformers, sdpa):

- ``flex``: ``flex_attention`` with a ``BlockMask`` built once per micro-batch from the rule.
- ``sdpa``: ``scaled_dot_product_attention`` with the dense ``[L, L]`` boolean mask (CPU, small).
- ``flash_attn`` / ``xformers``: the *gather plan*. The packed order is already a sequence of
  segments (each tree's trunk, then each branch); segment i attends causally, aligned to the
  bottom right, over its key list: the trunk for a trunk segment, ``trunk[:P + c] + branch`` for a
  branch. K/V are gathered into that order once per layer and one varlen causal call does all
  segments. ``varlen_attention_reference`` runs the same plan in plain torch, which is how the
  CPU tests prove the plan that the CUDA libraries execute.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from anytime_kernels.tree import mask_mod_from_offsets

ATTENTION_NAME = "anytime_tree"
BACKENDS = ("auto", "flex", "sdpa", "flash_attn", "xformers", "reference_varlen")
FLEX_BLOCK_SIZE = 128


@dataclass
class GatherPlan:
    """Segments of a packed micro-batch for varlen causal attention with gathered keys.

    Attributes:
        kv_index: ``[K]`` int64 packed index of every gathered key, segment after segment.
        cu_seqlens_q: ``[G + 1]`` int32 query offsets (queries are the packed order itself).
        cu_seqlens_k: ``[G + 1]`` int32 offsets into ``kv_index``.
        max_seqlen_q: longest query segment.
        max_seqlen_k: longest key segment.
    """

    kv_index: torch.Tensor
    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int


@dataclass
class TreeAttention:
    """The tree rule of one packed micro-batch, prepared for one backend.

    Attributes:
        backend: the resolved backend name.
        seq_ids: ``[L]`` int32 tree of every packed token (micro-batch local).
        prefix_end: ``[L]`` int32 end (exclusive) of the visible trunk prefix, local offsets.
        branch_start: ``[L]`` int32 start of the token's own branch (tree start on the trunk).
        dense_mask: ``[1, 1, L, L]`` bool, for ``sdpa``.
        block_mask: flex ``BlockMask`` over the length padded to the block size, for ``flex``.
        plan: ``GatherPlan``, for ``flash_attn``, ``xformers`` and ``reference_varlen``.
    """

    backend: str
    seq_ids: torch.Tensor
    prefix_end: torch.Tensor
    branch_start: torch.Tensor
    dense_mask: torch.Tensor | None = None
    block_mask: object | None = None
    plan: GatherPlan | None = None

    @property
    def length(self) -> int:
        return int(self.seq_ids.numel())


def backend_available(backend: str, device: torch.device) -> bool:
    if backend == "flex":
        return device.type == "cuda"
    if backend == "flash_attn":
        return device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None
    if backend == "xformers":
        return device.type == "cuda" and importlib.util.find_spec("xformers") is not None
    return backend in ("sdpa", "reference_varlen")


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """The concrete backend for ``backend`` on ``device``; a clear error when it cannot run."""
    device = torch.device(device)
    if backend not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        for candidate in ("flex", "flash_attn", "xformers", "sdpa"):
            if backend_available(candidate, device):
                return candidate
    if not backend_available(backend, device):
        needs = {
            "flex": "a CUDA device (flex_attention has no backward on CPU)",
            "flash_attn": "a CUDA device and the flash-attn package (`pip install anytime-kernels[flash-attn]`)",
            "xformers": "a CUDA device and the xformers package (`pip install anytime-kernels[xformers]`)",
        }[backend]
        raise RuntimeError(f"attention backend {backend!r} is not available on {device}: it needs {needs}")
    return backend


def dense_tree_mask(seq_ids: torch.Tensor, prefix_end: torch.Tensor, branch_start: torch.Tensor) -> torch.Tensor:
    """``[L, L]`` bool mask of the tree rule (True = may attend): the flex ``mask_mod`` on the full grid."""
    positions = torch.arange(seq_ids.numel(), device=seq_ids.device)
    mask_mod = mask_mod_from_offsets(seq_ids, prefix_end, branch_start)
    return mask_mod(0, 0, positions.view(-1, 1), positions.view(1, -1))


def gather_plan(seq_ids: torch.Tensor, prefix_end: torch.Tensor, branch_start: torch.Tensor) -> GatherPlan:
    """The segment plan of a packed micro-batch (see the module docstring)."""
    device = seq_ids.device
    seq = seq_ids.long().cpu()
    starts_branch = branch_start.long().cpu()
    prefix = prefix_end.long().cpu()
    length = seq.numel()
    boundary = torch.ones(length, dtype=torch.bool)
    if length > 1:
        boundary[1:] = (starts_branch[1:] != starts_branch[:-1]) | (seq[1:] != seq[:-1])
    segment_starts = boundary.nonzero().flatten().tolist()
    segment_ends = [*segment_starts[1:], length]
    tree_starts = {}
    for start in segment_starts:
        tree_starts.setdefault(int(seq[start]), start)
    pieces, q_lens, k_lens = [], [], []
    for start, end in zip(segment_starts, segment_ends, strict=True):
        tree_start = tree_starts[int(seq[start])]
        prefix_stop = int(prefix[start])
        keys = []
        if prefix_stop > tree_start:
            keys.append(torch.arange(tree_start, prefix_stop))
        keys.append(torch.arange(start, end))
        pieces.extend(keys)
        q_lens.append(end - start)
        k_lens.append(sum(piece.numel() for piece in keys))
    kv_index = torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.long)

    def offsets(lengths: list[int]) -> torch.Tensor:
        return torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32).to(device)

    return GatherPlan(
        kv_index=kv_index.to(device),
        cu_seqlens_q=offsets(q_lens),
        cu_seqlens_k=offsets(k_lens),
        max_seqlen_q=max(q_lens, default=0),
        max_seqlen_k=max(k_lens, default=0),
    )


def _flex_block_mask(seq_ids: torch.Tensor, prefix_end: torch.Tensor, branch_start: torch.Tensor):
    from torch.nn.attention.flex_attention import create_block_mask

    padded = -(-seq_ids.numel() // FLEX_BLOCK_SIZE) * FLEX_BLOCK_SIZE
    device = seq_ids.device
    mask_mod = mask_mod_from_offsets(seq_ids, prefix_end, branch_start, padded)

    # On CUDA the mask is built by a compiled kernel, so the [L, L] booleans never exist at once.
    return create_block_mask(
        mask_mod,
        B=None,
        H=None,
        Q_LEN=padded,
        KV_LEN=padded,
        device=device,
        BLOCK_SIZE=FLEX_BLOCK_SIZE,
        _compile=device.type == "cuda",
    )


def prepare_tree_attention(
    seq_ids: torch.Tensor, prefix_end: torch.Tensor, branch_start: torch.Tensor, backend: str = "auto"
) -> TreeAttention:
    """Prepare the tree rule of one packed micro-batch (local offsets) for ``backend``."""
    if not (seq_ids.shape == prefix_end.shape == branch_start.shape) or seq_ids.dim() != 1:
        raise ValueError(
            "seq_ids, prefix_end and branch_start must be 1-D of one length, got "
            f"{tuple(seq_ids.shape)}, {tuple(prefix_end.shape)}, {tuple(branch_start.shape)}"
        )
    resolved = resolve_backend(backend, seq_ids.device)
    spec = TreeAttention(resolved, seq_ids, prefix_end, branch_start)
    if resolved == "sdpa":
        spec.dense_mask = dense_tree_mask(seq_ids, prefix_end, branch_start)[None, None]
    elif resolved == "flex":
        spec.block_mask = _flex_block_mask(seq_ids, prefix_end, branch_start)
    else:
        spec.plan = gather_plan(seq_ids, prefix_end, branch_start)
    return spec


def varlen_attention_reference(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, plan: GatherPlan, scale: float
) -> torch.Tensor:
    """Causal (bottom-right aligned) attention of every plan segment, in plain torch.

    ``query [L, Hq, D]``, ``key``/``value [K, Hq, D]`` already gathered; returns ``[L, Hq, D]``.
    The same contract as ``flash_attn_varlen_func(..., causal=True)``.
    """
    outputs = []
    cu_q, cu_k = plan.cu_seqlens_q.tolist(), plan.cu_seqlens_k.tolist()
    for i in range(len(cu_q) - 1):
        q = query[cu_q[i] : cu_q[i + 1]].transpose(0, 1)
        k = key[cu_k[i] : cu_k[i + 1]].transpose(0, 1)
        v = value[cu_k[i] : cu_k[i + 1]].transpose(0, 1)
        q_len, k_len = q.shape[1], k.shape[1]
        rows = torch.arange(q_len, device=q.device).view(-1, 1) + (k_len - q_len)
        allowed = torch.arange(k_len, device=q.device).view(1, -1) <= rows
        scores = (q.float() @ k.float().transpose(1, 2)) * scale
        probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
        outputs.append((probs @ v.float()).to(query.dtype).transpose(0, 1))
    return torch.cat(outputs) if outputs else query.new_empty(query.shape)


def _varlen_attention(spec: TreeAttention, query, key, value, scale: float) -> torch.Tensor:
    """``query``/``key``/``value``: ``[L, H, D]`` (GQA already expanded); returns ``[L, H, D]``."""
    plan = spec.plan
    key, value = key.index_select(0, plan.kv_index), value.index_select(0, plan.kv_index)
    if spec.backend == "flash_attn":
        from flash_attn import flash_attn_varlen_func

        return flash_attn_varlen_func(
            query,
            key,
            value,
            plan.cu_seqlens_q,
            plan.cu_seqlens_k,
            plan.max_seqlen_q,
            plan.max_seqlen_k,
            softmax_scale=scale,
            causal=True,
        )
    if spec.backend == "xformers":
        from xformers.ops import fmha

        q_lens = (plan.cu_seqlens_q[1:] - plan.cu_seqlens_q[:-1]).tolist()
        k_lens = (plan.cu_seqlens_k[1:] - plan.cu_seqlens_k[:-1]).tolist()
        bias = fmha.attn_bias.BlockDiagonalCausalFromBottomRightMask.from_seqlens(q_lens, k_lens)
        return fmha.memory_efficient_attention(query[None], key[None], value[None], attn_bias=bias, scale=scale)[0]
    return varlen_attention_reference(query, key, value, plan, scale)


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
    groups = query.shape[1] // key.shape[1]
    if spec.backend == "flex":
        padded = spec.block_mask.shape[-2]
        pad = padded - spec.length

        def padded_input(t: torch.Tensor) -> torch.Tensor:
            return F.pad(t, (0, 0, 0, pad))

        out = _compiled_flex()(
            padded_input(query),
            padded_input(key),
            padded_input(value),
            block_mask=spec.block_mask,
            scale=scale,
            enable_gqa=groups > 1,
        )
        return out[:, :, : spec.length].transpose(1, 2).contiguous(), None
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    if spec.backend == "sdpa":
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=spec.dense_mask, scale=scale)
        return out.transpose(1, 2).contiguous(), None
    out = _varlen_attention(spec, query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1), scale)
    return out[None].contiguous(), None


_COMPILED_FLEX = None


def _compiled_flex():
    """flex_attention compiled once per process; lengths are padded to the block size, and after a
    second length torch.compile switches to a dynamic-shape kernel instead of recompiling again."""
    global _COMPILED_FLEX
    if _COMPILED_FLEX is None:
        from torch.nn.attention.flex_attention import flex_attention

        _COMPILED_FLEX = torch.compile(flex_attention)
    return _COMPILED_FLEX


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
