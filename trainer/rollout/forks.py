"""Summary forks: one generation request per distinct cut, and dealing its samples to the slots.

A trace z of length L with cuts ``c[s] = min(b_s, L)`` has distinct cuts ``d_1 < ... < d_D``.
The fork of cut d prompts with ``prompt + z[:d] + inserted(d)`` (ARCHITECTURE.md: the truncation
mark and answer opener, or only the opener when z closed its thinking inside the cut) and asks for
``k * A`` samples when k slots share the cut; they are dealt A per slot, in slot order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from trainer.budgets import Delimiters, distinct_cuts


@dataclass(frozen=True)
class Fork:
    """The summary request of one distinct cut of trace ``trace``, shared by ``slots``."""

    trace: int
    cut: int
    slots: tuple[int, ...]
    inserted_ids: tuple[int, ...]
    input_ids: tuple[int, ...]
    num_samples: int


def plan_forks(
    prompt_ids: Sequence[Sequence[int]],
    thinking_ids: Sequence[Sequence[int]],
    cut_lens: torch.Tensor,
    delimiters: Delimiters,
    num_summaries: int,
) -> list[Fork]:
    """Forks of every trace, trace by trace, cuts ascending.

    Args:
        prompt_ids: ``[N]`` prompt token lists.
        thinking_ids: ``[N]`` trace token lists.
        cut_lens: ``[N, S]`` cut of every slot.
        num_summaries: A, summaries per slot.
    """
    if cut_lens.dim() != 2 or cut_lens.shape[0] != len(thinking_ids):
        raise ValueError(f"cut_lens must have shape [N={len(thinking_ids)}, S], got {tuple(cut_lens.shape)}")
    if len(prompt_ids) != len(thinking_ids):
        raise ValueError(f"{len(prompt_ids)} prompts for {len(thinking_ids)} traces; expected one prompt per trace")
    forks = []
    for n, (prompt, trace) in enumerate(zip(prompt_ids, thinking_ids, strict=True)):
        cuts = [int(c) for c in cut_lens[n].tolist()]
        for cut in distinct_cuts(cuts):
            if cut > len(trace):
                raise ValueError(f"trace {n}: cut {cut} is longer than the trace ({len(trace)} tokens)")
            slots = tuple(s for s, c in enumerate(cuts) if c == cut)
            inserted = tuple(delimiters.inserted(trace, cut))
            forks.append(
                Fork(
                    trace=n,
                    cut=cut,
                    slots=slots,
                    inserted_ids=inserted,
                    input_ids=tuple(int(t) for t in prompt) + tuple(int(t) for t in trace[:cut]) + inserted,
                    num_samples=len(slots) * num_summaries,
                )
            )
    return forks


def deal_summaries(
    forks: Sequence[Fork], outputs: Sequence, cut_lens: torch.Tensor, num_summaries: int
) -> tuple[list[list[list[list[int]]]], list[list[list[str]]]]:
    """Deal each fork's samples A per slot: summaries ``[N][S][A]`` and their finish reasons."""
    if len(outputs) != len(forks):
        raise ValueError(f"{len(outputs)} generation outputs for {len(forks)} forks; expected one per fork")
    num_traces, num_slots = cut_lens.shape
    summaries: list[list[list[list[int]] | None]] = [[None] * num_slots for _ in range(num_traces)]
    finish: list[list[list[str] | None]] = [[None] * num_slots for _ in range(num_traces)]
    for fork, out in zip(forks, outputs, strict=True):
        if len(out.output_ids) != fork.num_samples:
            raise ValueError(
                f"trace {fork.trace}, cut {fork.cut}: got {len(out.output_ids)} summaries, expected {fork.num_samples}"
            )
        for k, slot in enumerate(fork.slots):
            dealt = slice(k * num_summaries, (k + 1) * num_summaries)
            summaries[fork.trace][slot] = [list(ids) for ids in out.output_ids[dealt]]
            finish[fork.trace][slot] = list(out.finish_reasons[dealt])
    for n in range(num_traces):
        missing = [s for s in range(num_slots) if summaries[n][s] is None]
        if missing:
            raise ValueError(f"trace {n}: slots {missing} got no fork")
    return summaries, finish
