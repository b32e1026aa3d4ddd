"""Pure-Python reference of the response-tree packing rules (see ``anytime_kernels.tree``).

Readable and slow on purpose: tests check the compiled op against it, and the packing benchmark
uses it as its baseline. It takes the same flattened inputs as ``ops.pack_response_trees``.
"""

from __future__ import annotations

import torch

from anytime_kernels.constants import IGNORE_INDEX, PACKED_FIELDS, TokenKind

PROMPT, THINKING, INSERTED, SUMMARY = (int(kind) for kind in TokenKind)


def _check_trace(n: int, cuts: list[int], thinking_len: int, num_inserted: int, tokens: list[int]) -> None:
    for s, cut in enumerate(cuts):
        if cut < 0:
            raise ValueError(f"trace {n}: cut_lens[{s}] = {cut} is negative")
        if cut > thinking_len:
            raise ValueError(f"trace {n}: cut_lens[{s}] = {cut} is beyond the thinking length {thinking_len}")
        if s > 0 and cut < cuts[s - 1]:
            raise ValueError(f"trace {n}: cut_lens decrease at slot {s} ({cuts[s - 1]} then {cut})")
    distinct = len(set(cuts))
    if num_inserted != distinct:
        raise ValueError(
            f"trace {n}: got {num_inserted} inserted delimiters, expected one per distinct cut ({distinct})"
        )
    negative = [t for t in tokens if t < 0]
    if negative:
        raise ValueError(f"trace {n}: token id {negative[0]} is negative")


def pack_response_trees_reference(
    tokens: torch.Tensor,
    segment_offsets: torch.Tensor,
    cut_lens: torch.Tensor,
    num_inserted: torch.Tensor,
    num_summaries: int,
) -> list[torch.Tensor]:
    """Same contract and outputs as ``torch.ops.anytime_kernels.pack_response_trees``."""
    flat = tokens.tolist()
    offsets = segment_offsets.tolist()
    all_cuts = cut_lens.tolist()
    inserted_counts = num_inserted.tolist()

    def segment(index: int) -> list[int]:
        return flat[offsets[index] : offsets[index + 1]]

    columns: dict[str, list[int]] = {name: [] for name in PACKED_FIELDS if name not in ("loss_mask", "cu_seqlens")}
    cu_seqlens = [0]
    base = 0
    for n, cuts in enumerate(all_cuts):
        num_slots = len(cuts)
        prompt, thinking = segment(base), segment(base + 1)
        inserted = [segment(base + 2 + d) for d in range(inserted_counts[n])]
        summaries = [
            [segment(base + 2 + inserted_counts[n] + s * num_summaries + a) for a in range(num_summaries)]
            for s in range(num_slots)
        ]
        trace_tokens = prompt + thinking + [t for ids in inserted for t in ids]
        trace_tokens += [t for per_slot in summaries for ids in per_slot for t in ids]
        _check_trace(n, cuts, len(thinking), len(inserted), trace_tokens)
        base += 2 + inserted_counts[n] + num_slots * num_summaries

        row_start = cu_seqlens[-1]
        last_cut = cuts[-1]

        def emit(token, position, label, kind, slot, summary, prefix, branch, n=n):
            columns["input_ids"].append(token)
            columns["position_ids"].append(position)
            columns["labels"].append(label)
            columns["seq_ids"].append(n)
            columns["token_kind"].append(kind)
            columns["slot"].append(slot)
            columns["summary_index"].append(summary)
            columns["prefix_end"].append(prefix)
            columns["branch_start"].append(branch)

        # The trunk: prompt then thinking, causal. A thinking token is trained when it lies
        # inside the last cut; it is the target of the token just before it.
        trunk = prompt + thinking
        kinds = [PROMPT] * len(prompt) + [THINKING] * len(thinking)
        for j, token in enumerate(trunk):
            next_j = j + 1
            next_is_trained = next_j < len(trunk) and kinds[next_j] == THINKING and next_j - len(prompt) < last_cut
            label = trunk[next_j] if next_is_trained else IGNORE_INDEX
            if kinds[j] == PROMPT:
                slot = -1
            else:
                z_index = j - len(prompt)
                slot = next((s for s, cut in enumerate(cuts) if z_index < cut), -1)
            emit(token, j, label, kinds[j], slot, -1, row_start, row_start)

        # The branches: every slot s, every summary a, the inserted delimiter of s's distinct cut.
        distinct_cuts = sorted(set(cuts))
        position = row_start + len(trunk)
        for s, cut in enumerate(cuts):
            delimiter = inserted[distinct_cuts.index(cut)]
            for a, summary in enumerate(summaries[s]):
                branch = delimiter + summary
                branch_kinds = [INSERTED] * len(delimiter) + [SUMMARY] * len(summary)
                branch_begin = position
                for i, token in enumerate(branch):
                    next_is_summary = i + 1 < len(branch) and branch_kinds[i + 1] == SUMMARY
                    label = branch[i + 1] if next_is_summary else IGNORE_INDEX
                    emit(
                        token,
                        len(prompt) + cut + i,
                        label,
                        branch_kinds[i],
                        s,
                        a,
                        row_start + len(prompt) + cut,
                        branch_begin,
                    )
                    position += 1
        cu_seqlens.append(position)

    long_columns = ("input_ids", "position_ids", "labels")
    out = {
        name: torch.tensor(values, dtype=torch.long if name in long_columns else torch.int32)
        for name, values in columns.items()
    }
    out["token_kind"] = out["token_kind"].to(torch.int8)
    labels = out["labels"]
    return [
        out["input_ids"],
        out["position_ids"],
        labels,
        labels.ne(IGNORE_INDEX),
        torch.tensor(cu_seqlens, dtype=torch.int32),
        out["seq_ids"],
        out["token_kind"],
        out["slot"],
        out["summary_index"],
        out["prefix_end"],
        out["branch_start"],
    ]
