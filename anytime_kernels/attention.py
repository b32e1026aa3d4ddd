"""Tree attention building blocks: masks, the flex ``BlockMask``, the gather plan and its reference.

A micro-batch is one packed sequence holding several response trees back to back. The tree rule
(``anytime_kernels.tree``): key k is visible to query q iff ``k <= q``, both belong to the same
tree, and ``k >= branch_start[q]`` or ``k < prefix_end[q]`` (offsets local to the sequence).

Three encodings of that rule, one per family of attention kernels:

- ``dense_tree_mask``: the ``[L, L]`` boolean mask (SDPA; CPU and small cases).
- ``flex_block_mask``: a flex ``BlockMask`` built by a ``create_block_mask`` compiled once per
  process (``dynamic=True``), so new lengths do not recompile.
- ``gather_plan``: the packed order is already a sequence of segments (each tree's trunk, then
  each branch); segment i attends causally, aligned to the bottom right, over its key list: the
  trunk for a trunk segment, ``trunk[:P + c] + branch`` for a branch. K/V are gathered into that
  order once per layer and one varlen causal call (flash-attn, xformers) does all segments.
  ``varlen_attention_reference`` runs the same plan in plain torch, which is how the CPU tests
  prove the plan that the CUDA libraries execute.

The model integration (transformers' attention registry, the backend table) lives in
``trainer.attention``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from anytime_kernels.tree import mask_mod_from_offsets

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
        q_lens: the G query segment lengths (host ints, for libraries that take lists).
        k_lens: the G key segment lengths.
    """

    kv_index: torch.Tensor
    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int
    q_lens: list[int]
    k_lens: list[int]


def dense_tree_mask(seq_ids: torch.Tensor, prefix_end: torch.Tensor, branch_start: torch.Tensor) -> torch.Tensor:
    """``[L, L]`` bool mask of the tree rule (True = may attend): the flex ``mask_mod`` on the full grid."""
    positions = torch.arange(seq_ids.numel(), device=seq_ids.device)
    mask_mod = mask_mod_from_offsets(seq_ids, prefix_end, branch_start)
    return mask_mod(0, 0, positions.view(-1, 1), positions.view(1, -1))


def gather_plan(
    seq_ids: torch.Tensor,
    prefix_end: torch.Tensor,
    branch_start: torch.Tensor,
    device: torch.device | str | None = None,
) -> GatherPlan:
    """The segment plan of a packed micro-batch (see the module docstring).

    Computed on the host from ``[L]`` offsets (pass CPU tensors to keep device syncs out of the
    training step); the index tensors are returned on ``device`` (default: ``seq_ids.device``).
    """
    device = seq_ids.device if device is None else torch.device(device)
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
        return torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32).to(device, non_blocking=True)

    return GatherPlan(
        kv_index=kv_index.to(device, non_blocking=True),
        cu_seqlens_q=offsets(q_lens),
        cu_seqlens_k=offsets(k_lens),
        max_seqlen_q=max(q_lens, default=0),
        max_seqlen_k=max(k_lens, default=0),
        q_lens=q_lens,
        k_lens=k_lens,
    )


_COMPILED_CREATE_BLOCK_MASK = None


def _create_block_mask_fn(device: torch.device):
    """``create_block_mask``, compiled once per process on CUDA (``dynamic=True``: a new length or a
    new micro-batch's offsets reuse the compiled kernel), eager elsewhere."""
    global _COMPILED_CREATE_BLOCK_MASK
    from torch.nn.attention.flex_attention import create_block_mask

    if device.type != "cuda":
        return create_block_mask
    if _COMPILED_CREATE_BLOCK_MASK is None:
        _COMPILED_CREATE_BLOCK_MASK = torch.compile(create_block_mask, dynamic=True)
    return _COMPILED_CREATE_BLOCK_MASK


def flex_block_mask(seq_ids: torch.Tensor, prefix_end: torch.Tensor, branch_start: torch.Tensor):
    """A flex ``BlockMask`` of the tree rule over the length padded to ``FLEX_BLOCK_SIZE``.

    On CUDA the mask is built by a compiled kernel, so the ``[L, L]`` booleans never exist at once.
    """
    padded = -(-seq_ids.numel() // FLEX_BLOCK_SIZE) * FLEX_BLOCK_SIZE
    device = seq_ids.device
    mask_mod = mask_mod_from_offsets(seq_ids, prefix_end, branch_start, padded)
    return _create_block_mask_fn(device)(
        mask_mod, None, None, padded, padded, device=device, BLOCK_SIZE=FLEX_BLOCK_SIZE
    )


def varlen_attention_reference(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, plan: GatherPlan, scale: float
) -> torch.Tensor:
    """Causal (bottom-right aligned) attention of every plan segment, in plain torch.

    ``query [L, Hq, D]``, ``key``/``value [K, Hkv, D]`` already gathered, ``Hq`` a multiple of
    ``Hkv`` (grouped-query attention: query head h reads key head ``h // (Hq / Hkv)``); returns
    ``[L, Hq, D]``. The same contract as ``flash_attn_varlen_func(..., causal=True)``.
    """
    groups = query.shape[1] // key.shape[1]
    outputs = []
    q_start = k_start = 0
    for q_len, k_len in zip(plan.q_lens, plan.k_lens, strict=True):
        q = query[q_start : q_start + q_len].transpose(0, 1)
        k = key[k_start : k_start + k_len].transpose(0, 1).repeat_interleave(groups, dim=0)
        v = value[k_start : k_start + k_len].transpose(0, 1).repeat_interleave(groups, dim=0)
        q_start, k_start = q_start + q_len, k_start + k_len
        rows = torch.arange(q_len, device=q.device).view(-1, 1) + (k_len - q_len)
        allowed = torch.arange(k_len, device=q.device).view(1, -1) <= rows
        scores = (q.float() @ k.float().transpose(1, 2)) * scale
        probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
        outputs.append((probs @ v.float()).to(query.dtype).transpose(0, 1))
    return torch.cat(outputs) if outputs else query.new_empty(query.shape)
