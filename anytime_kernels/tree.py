"""The packed response-tree layout: one row per trace, summary branches appended after the trunk.

Row n holds ``prompt (P) + thinking z (L)`` (the trunk), then for every budget slot s and summary
a the branch ``inserted[d(s)] + summary[s][a]``, where d(s) is the distinct cut of slot s. Branch
token i of slot s has position id ``P + c_s + i`` and attends to the trunk prefix
``[0, P + c_s)`` and to its own branch up to itself; trunk tokens attend causally to the trunk.

Per token the layout stores two absolute offsets that encode that rule for the whole batch:
key k is visible to query q iff ``k <= q`` and ``k >= branch_start[q]`` or
``row_start(q) <= k < prefix_end[q]``. Trunk tokens have ``prefix_end = branch_start =
row_start`` (plain causal attention inside the row).

``labels[t]`` is the next token of t's lineage when that token is trained (thinking inside the
last cut, or summary), else ``IGNORE_INDEX``: prompt and inserted tokens are never targets, and
the last trunk token has no single successor (its successors are the branches' inserted tokens).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

import torch

from anytime_kernels._extension import ops
from anytime_kernels.backends import resolve_backend
from anytime_kernels.constants import PACKED_FIELDS
from anytime_kernels.tree_reference import pack_response_trees_reference

TokenIds = Sequence[int] | torch.Tensor


@dataclass
class ResponseTreeLayout:
    """Flat tensors describing a packed batch of response trees (T tokens, N traces).

    Attributes:
        input_ids: ``[T]`` int64 token ids.
        position_ids: ``[T]`` int64; trunk token j -> j, branch token i of slot s -> P + c_s + i.
        labels: ``[T]`` int64 next trained token of the same lineage, or ``IGNORE_INDEX``.
        loss_mask: ``[T]`` bool, ``labels != IGNORE_INDEX``.
        cu_seqlens: ``[N + 1]`` int32 row offsets.
        seq_ids: ``[T]`` int32 trace (row) index.
        token_kind: ``[T]`` int8 ``TokenKind``.
        slot: ``[T]`` int32 budget slot: thinking token j -> first s with j < c_s (-1 beyond the
            last cut); branch tokens -> their slot; prompt -1.
        summary_index: ``[T]`` int32 summary a of branch tokens, -1 on the trunk.
        prefix_end: ``[T]`` int32 absolute end (exclusive) of the visible trunk prefix.
        branch_start: ``[T]`` int32 absolute start of the token's own branch (row start on the trunk).
        cut_lens: ``[N, S]`` int64 cut length of every slot.
        prompt_lens: ``[N]`` int64.
        thinking_lens: ``[N]`` int64.
        num_summaries: A, summaries per slot.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    cu_seqlens: torch.Tensor
    seq_ids: torch.Tensor
    token_kind: torch.Tensor
    slot: torch.Tensor
    summary_index: torch.Tensor
    prefix_end: torch.Tensor
    branch_start: torch.Tensor
    cut_lens: torch.Tensor
    prompt_lens: torch.Tensor
    thinking_lens: torch.Tensor
    num_summaries: int

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())

    @property
    def num_traces(self) -> int:
        return int(self.cut_lens.shape[0])

    @property
    def num_slots(self) -> int:
        return int(self.cut_lens.shape[1])

    @property
    def row_lens(self) -> torch.Tensor:
        """``[N]`` int64 packed length of every row."""
        return (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).long()

    def row_slice(self, row: int) -> slice:
        if not 0 <= row < self.num_traces:
            raise IndexError(f"row {row} is out of range for a layout of {self.num_traces} traces")
        return slice(int(self.cu_seqlens[row]), int(self.cu_seqlens[row + 1]))

    def lineage_ids(self) -> torch.Tensor:
        """``[T]`` int64 id of the sequence each position's *target* belongs to, for per-sequence
        loss aggregation: ``n * (S * A + 1)`` for the thinking of trace n, ``n * (S * A + 1) + 1 +
        s * A + a`` for summary branch (s, a); -1 where ``loss_mask`` is False. A position t
        predicts the token at t + 1 (see ``labels``), so the id is read there."""
        width = self.num_slots * self.num_summaries + 1
        target = torch.zeros_like(self.seq_ids, dtype=torch.long)
        target[:-1] = torch.arange(1, self.num_tokens, device=self.seq_ids.device)
        branch = self.summary_index[target].long()
        ids = self.seq_ids[target].long() * width + torch.where(
            branch >= 0, 1 + self.slot[target].long() * self.num_summaries + branch, 0
        )
        return torch.where(self.loss_mask, ids, -1)

    def tree_token_index(self, rows: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """``[L]`` int64 layout index of every token of ``rows``, packed in the order given."""
        rows = self._rows(rows)
        cu = self.cu_seqlens.long()
        starts = cu[rows]
        lengths = cu[rows + 1] - starts
        packed_starts = torch.cumsum(lengths, 0) - lengths
        total = int(lengths.sum())
        shift = torch.repeat_interleave(starts - packed_starts, lengths, output_size=total)
        return torch.arange(total, device=cu.device) + shift

    def select_trees(self, rows: Sequence[int] | torch.Tensor) -> ResponseTreeLayout:
        """The layout of ``rows`` alone, packed back to back in the order given.

        Per-token fields are gathered; the absolute offsets (``cu_seqlens``, ``prefix_end``,
        ``branch_start``) are rebased to the new packing and ``seq_ids`` renumbered ``0..R-1``, so
        a micro-batch is itself a layout. ``tree_token_index(rows)`` maps its tokens back.
        """
        rows = self._rows(rows)
        index = self.tree_token_index(rows)
        cu = self.cu_seqlens.long()
        lengths = cu[rows + 1] - cu[rows]
        new_cu = torch.zeros(len(rows) + 1, dtype=torch.long, device=cu.device)
        torch.cumsum(lengths, 0, out=new_cu[1:])
        shift = torch.repeat_interleave(new_cu[:-1] - cu[rows], lengths, output_size=index.numel())
        picked = {name: getattr(self, name)[index] for name in _PER_TOKEN_FIELDS}
        picked["prefix_end"] = (picked["prefix_end"].long() + shift).to(self.prefix_end.dtype)
        picked["branch_start"] = (picked["branch_start"].long() + shift).to(self.branch_start.dtype)
        picked["seq_ids"] = torch.repeat_interleave(
            torch.arange(len(rows), device=cu.device), lengths, output_size=index.numel()
        ).to(self.seq_ids.dtype)
        return ResponseTreeLayout(
            **picked,
            cu_seqlens=new_cu.to(self.cu_seqlens.dtype),
            cut_lens=self.cut_lens[rows.to(self.cut_lens.device)],
            prompt_lens=self.prompt_lens[rows.to(self.prompt_lens.device)],
            thinking_lens=self.thinking_lens[rows.to(self.thinking_lens.device)],
            num_summaries=self.num_summaries,
        )

    def _rows(self, rows: Sequence[int] | torch.Tensor) -> torch.Tensor:
        rows = torch.as_tensor(rows, dtype=torch.long).flatten()
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= self.num_traces):
            bad = next(int(r) for r in rows.tolist() if not 0 <= r < self.num_traces)
            raise IndexError(f"row {bad} is out of range for a layout of {self.num_traces} traces")
        return rows.to(self.cu_seqlens.device)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> ResponseTreeLayout:
        moved = {
            f.name: (v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v)
            for f in fields(self)
            for v in [getattr(self, f.name)]
        }
        return ResponseTreeLayout(**moved)


_PER_TOKEN_FIELDS = tuple(name for name in PACKED_FIELDS if name != "cu_seqlens")


def _as_ids(value: TokenIds, what: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        if value.dim() != 1:
            raise ValueError(f"{what} must be a 1-D tensor of token ids, got shape {tuple(value.shape)}")
        if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
            raise ValueError(f"{what} must hold integer token ids, got dtype {value.dtype}")
        return value.detach().to(device="cpu", dtype=torch.long)
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(f"{what} must be a sequence of token ids, got {type(value).__name__}")
    return torch.as_tensor(list(value), dtype=torch.long) if len(value) else torch.empty(0, dtype=torch.long)


def _as_cut_lens(cut_lens: Sequence[Sequence[int]] | torch.Tensor, num_traces: int) -> torch.Tensor:
    cuts = cut_lens.detach().cpu() if isinstance(cut_lens, torch.Tensor) else None
    if cuts is None:
        rows = [list(row) for row in cut_lens]
        widths = {len(row) for row in rows}
        if len(widths) > 1:
            bad = next(n for n, row in enumerate(rows) if len(row) != len(rows[0]))
            raise ValueError(f"trace {bad}: has {len(rows[bad])} budget slots in cut_lens, trace 0 has {len(rows[0])}")
        cuts = torch.tensor(rows, dtype=torch.long) if rows else torch.empty(0, 1, dtype=torch.long)
    if cuts.dim() != 2 or cuts.shape[0] != num_traces or cuts.shape[1] < 1:
        raise ValueError(f"cut_lens must have shape [N={num_traces}, S>=1], got {tuple(cuts.shape)}")
    if cuts.dtype.is_floating_point or cuts.dtype == torch.bool:
        raise ValueError(f"cut_lens must be integers, got dtype {cuts.dtype}")
    return cuts.long().contiguous()


def _flatten(
    prompt_ids: Sequence[TokenIds],
    thinking_ids: Sequence[TokenIds],
    cut_lens: Sequence[Sequence[int]] | torch.Tensor,
    inserted_ids: Sequence[Sequence[TokenIds]],
    summary_ids: Sequence[Sequence[Sequence[TokenIds]]],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Check the nesting and flatten every token list into CSR form (tokens, segment offsets)."""
    num_traces = len(prompt_ids)
    for name, value in (("thinking_ids", thinking_ids), ("inserted_ids", inserted_ids)):
        if len(value) != num_traces:
            raise ValueError(f"{name} has {len(value)} traces, prompt_ids has {num_traces}")
    if len(summary_ids) != num_traces:
        raise ValueError(f"summary_ids has {len(summary_ids)} traces, prompt_ids has {num_traces}")
    cuts = _as_cut_lens(cut_lens, num_traces)
    num_slots = cuts.shape[1]
    num_summaries = None
    segments: list[torch.Tensor] = []
    num_inserted = torch.empty(num_traces, dtype=torch.long)
    for n in range(num_traces):
        segments.append(_as_ids(prompt_ids[n], f"trace {n}: prompt_ids"))
        segments.append(_as_ids(thinking_ids[n], f"trace {n}: thinking_ids"))
        inserted = inserted_ids[n]
        if isinstance(inserted, torch.Tensor) or not isinstance(inserted, Sequence):
            raise ValueError(f"trace {n}: inserted_ids must be a list of token lists, one per distinct cut")
        num_inserted[n] = len(inserted)
        segments.extend(_as_ids(ids, f"trace {n}: inserted_ids[{d}]") for d, ids in enumerate(inserted))
        slots = summary_ids[n]
        if isinstance(slots, torch.Tensor) or len(slots) != num_slots:
            got = "a tensor" if isinstance(slots, torch.Tensor) else f"{len(slots)} slots"
            raise ValueError(f"trace {n}: summary_ids has {got}, expected {num_slots} (one list per slot)")
        for s, per_slot in enumerate(slots):
            if isinstance(per_slot, torch.Tensor) or not isinstance(per_slot, Sequence):
                raise ValueError(f"trace {n}: summary_ids[{s}] must be a list of A token lists")
            if num_summaries is None:
                num_summaries = len(per_slot)
                if num_summaries < 1:
                    raise ValueError(f"trace {n}: summary_ids[{s}] is empty; every slot needs A >= 1 summaries")
            elif len(per_slot) != num_summaries:
                raise ValueError(
                    f"trace {n}: summary_ids[{s}] has {len(per_slot)} summaries, expected A={num_summaries}"
                )
            segments.extend(_as_ids(ids, f"trace {n}: summary_ids[{s}][{a}]") for a, ids in enumerate(per_slot))
    lengths = torch.tensor([0] + [seg.numel() for seg in segments], dtype=torch.long)
    segment_offsets = torch.cumsum(lengths, 0)
    tokens = torch.cat(segments) if segments else torch.empty(0, dtype=torch.long)
    return tokens, segment_offsets, cuts, num_inserted, num_summaries or 1


def pack_response_trees(
    prompt_ids: Sequence[TokenIds],
    thinking_ids: Sequence[TokenIds],
    cut_lens: Sequence[Sequence[int]] | torch.Tensor,
    inserted_ids: Sequence[Sequence[TokenIds]],
    summary_ids: Sequence[Sequence[Sequence[TokenIds]]],
    *,
    backend: str = "auto",
) -> ResponseTreeLayout:
    """Pack N rollouts into one response-tree layout.

    Args:
        prompt_ids: N token lists (or 1-D int tensors), the prompts.
        thinking_ids: N token lists, the thinking traces z (length L_n).
        cut_lens: ``[N, S]`` cut length c_s of every budget slot, non-decreasing, at most L_n.
        inserted_ids: per trace, one token list per distinct cut (the inserted delimiter).
        summary_ids: per trace, S lists of A token lists (the summaries of each slot).
        backend: ``cpp`` (compiled op, OpenMP over traces), ``reference`` (plain Python), or ``auto`` (cpp).

    Returns:
        A ``ResponseTreeLayout`` on the CPU.

    Raises:
        ValueError: naming the trace and the value, for a cut beyond the trace, decreasing cuts,
            negative ids, wrong nesting or mismatched counts.
    """
    backend = resolve_backend("pack_response_trees", backend, "cpu", supports=("cpp", "reference"))
    tokens, segment_offsets, cuts, num_inserted, num_summaries = _flatten(
        prompt_ids, thinking_ids, cut_lens, inserted_ids, summary_ids
    )
    if backend == "reference":
        outputs = pack_response_trees_reference(tokens, segment_offsets, cuts, num_inserted, num_summaries)
    else:
        outputs = ops.pack_response_trees(tokens, segment_offsets, cuts, num_inserted, num_summaries)
    base = segment_offsets[:-1]
    stride = 2 + num_inserted + cuts.shape[1] * num_summaries
    first_segment = torch.cumsum(stride, 0) - stride
    lengths = segment_offsets[1:] - base
    return ResponseTreeLayout(
        **dict(zip(PACKED_FIELDS, outputs, strict=True)),
        cut_lens=cuts,
        prompt_lens=lengths[first_segment],
        thinking_lens=lengths[first_segment + 1],
        num_summaries=num_summaries,
    )


def tree_mask_mod(layout: ResponseTreeLayout, padded_len: int | None = None) -> Callable:
    """A flex_attention ``mask_mod`` over the whole packed batch as one sequence.

    Positions at or beyond ``layout.num_tokens`` (padding up to ``padded_len``) attend only to
    themselves, so padded rows stay finite and never leak into real tokens.
    """
    return mask_mod_from_offsets(layout.seq_ids, layout.prefix_end, layout.branch_start, padded_len)


def mask_mod_from_offsets(
    seq_ids: torch.Tensor, prefix_end: torch.Tensor, branch_start: torch.Tensor, padded_len: int | None = None
) -> Callable:
    """The tree rule as a flex ``mask_mod`` from per-token ``[L]`` offsets of one packed sequence.

    ``seq_ids`` names each token's tree; ``prefix_end``/``branch_start`` are offsets into the same
    sequence (see the module docstring). Padding up to ``padded_len`` attends only to itself.
    """
    total = seq_ids.numel()
    padded = total if padded_len is None else int(padded_len)
    if padded < total:
        raise ValueError(f"padded_len={padded} is shorter than the {total} packed tokens")
    device = seq_ids.device
    pad = padded - total
    pad_index = torch.arange(total, padded, device=device, dtype=torch.int32)
    seq = torch.cat([seq_ids.int(), torch.full((pad,), -1, dtype=torch.int32, device=device)])
    prefix = torch.cat([prefix_end.int(), torch.zeros(pad, dtype=torch.int32, device=device)])
    branch = torch.cat([branch_start.int(), pad_index])

    def mask_mod(batch, head, q_idx, kv_idx):
        causal = kv_idx <= q_idx
        same_row = seq[q_idx] == seq[kv_idx]
        visible = (kv_idx >= branch[q_idx]) | (kv_idx < prefix[q_idx])
        return causal & same_row & visible

    return mask_mod
