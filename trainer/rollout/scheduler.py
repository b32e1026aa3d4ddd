"""One ``generate`` call of the embedded engine: rows admitted, decoded in windows, finished.

Every request's ``n`` samples are rows. Rows enter the decode batch whenever it has room (at most
``max_rows``), a request's prompt being prefilled once for all its rows, packed with the other
requests admitted at that moment into one forward; its cached prefix comes from the prefix cache
(shared blocks, only the partial last block copied). The batch then decodes ``sync_every`` steps
(fewer when every row reaches its cap sooner) with nothing read back; at the window's end one
read-back tells the host each row's new tokens and whether it finished, and only then the host
finishes rows (a row of a ``cache_output`` request is stored in the prefix cache: its blocks are
referenced, not copied), compacts the batch, admits new rows and allocates every row's blocks for
the next window. A row's tokens depend on its seed and the model alone, not on this schedule.

Blocks are promised at admission: a row reserves what its cap could need, so a fixed pool never
runs out in the middle of a window; when free blocks fall short, cached sequences are evicted
(lowest priority, least recently used first), and a request that still does not fit waits for
rows to finish.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from trainer.rollout.base import GenerationOutput, GenerationRequest
from trainer.rollout.paged_runner import MAX_STOP_IDS, ReadBack

if TYPE_CHECKING:
    from trainer.rollout.embedded import EmbeddedEngine

# A packed prefill's new tokens, and its requests x longest new part x longest context (the torch
# attention pads the requests of a prefill to one shape).
PREFILL_TOKENS = 8192
PREFILL_PADDED = 2**25


@dataclass
class _Request:
    """A request being served: its prefill's blocks and logits, and its samples."""

    request: GenerationRequest
    first_seed: int  # index of its first row's seed among the call's seeds
    cached: int = 0
    blocks: list[int] = field(default_factory=list)  # the prompt's blocks, until every row is in
    logits: torch.Tensor | None = None
    admitted: int = 0
    outputs: list[list[int]] = field(default_factory=list)
    logprobs: list[list[float]] = field(default_factory=list)
    reasons: list[str | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = self.request.n
        self.outputs, self.logprobs, self.reasons = [[] for _ in range(n)], [[] for _ in range(n)], [None] * n

    @property
    def length(self) -> int:
        return len(self.request.input_ids)


@dataclass
class _Row:
    """One sample in the decode batch; ``blocks`` hold one reference each."""

    owner: _Request
    sample: int
    blocks: list[int]
    reserved: int  # blocks its cap may still need, promised at admission
    generated: int = 1  # as last read back (the first token is sampled at admission)
    first_pending: bool = True

    @property
    def position(self) -> int:
        """Position of the token the row feeds next."""
        return self.owner.length + self.generated - 1

    @property
    def last_position(self) -> int:
        """Position of the last token the row can feed (its last sampled token is never fed)."""
        return self.owner.length + self.owner.request.max_new_tokens - 2

    @property
    def remaining(self) -> int:
        """Decode steps until the row's cap (it may stop sooner)."""
        return self.owner.request.max_new_tokens - self.generated


class Scheduler:
    """Serves the requests of one ``generate`` call on ``engine``'s runner and pool."""

    def __init__(self, engine: EmbeddedEngine, requests: Sequence[GenerationRequest]) -> None:
        self.engine = engine
        self.runner = engine._runner
        self.pool = engine._pool
        self.served, total = [], 0
        for request in requests:
            if len(request.stop_token_ids) > MAX_STOP_IDS:
                raise ValueError(
                    f"a request has {len(request.stop_token_ids)} stop ids; the engine takes {MAX_STOP_IDS}"
                )
            self.served.append(_Request(request, first_seed=total))
            total += request.n
        # Not prefilled yet; the longest cached prefix first (SGLang's "lpm" policy): a fork admitted
        # before fresh prompts keeps its trace when the pool has to evict to make room.
        cached = {id(s): self.engine._match_prefix(s.request.input_ids)[1] for s in self.served}
        self.pending = deque(sorted(self.served, key=lambda s: -cached[id(s)]))
        self.admitting: deque[_Request] = deque()  # prefilled, some rows not admitted yet
        self.live: list[_Row] = []
        # One seed per row from the engine's generator: its state determines every sample.
        self.seeds = torch.randint(0, 2**62, (total,), generator=engine._generator, device=engine.device)

    def run(self) -> list[GenerationOutput]:
        while self.pending or self.admitting or self.live:
            self._admit()
            if not self.live:
                raise RuntimeError(self._no_room_message())
            steps = min(self.runner.ring_steps, max(row.remaining for row in self.live))
            self._allocate_ahead(steps)
            if steps:
                nucleus = any(row.owner.request.sampling.top_p < 1 for row in self.live)
                self.runner.decode(len(self.live), steps, nucleus)
            self._finish(self.runner.read_back(len(self.live), steps))
        return [self._output(served) for served in self.served]

    def _output(self, served: _Request) -> GenerationOutput:
        request = served.request
        return GenerationOutput(
            output_ids=served.outputs,
            output_logprobs=served.logprobs,
            finish_reasons=served.reasons,
            prompt_tokens=served.length,
            cached_tokens=[served.cached] * request.n,
            prefilled_tokens=served.length - served.cached,
        )

    def _no_room_message(self) -> str:
        waiting = (self.admitting or self.pending)[0]
        need = self.pool.blocks_for(waiting.length) + self._row_need(waiting)
        return (
            f"the KV pool ({self.pool.num_blocks} blocks of {self.pool.block_size} tokens) cannot hold one row of a "
            f"request of {waiting.length} prompt tokens and max_new_tokens {waiting.request.max_new_tokens} "
            f"({need} blocks); raise rollout.kv_blocks or rollout.kv_memory_fraction"
        )

    def _row_need(self, served: _Request) -> int:
        """Blocks one row of ``served`` may take beyond the prompt's full blocks, which it shares."""
        request = served.request
        if request.max_new_tokens < 2:
            return 0
        return self.pool.blocks_for(served.length + request.max_new_tokens - 1) - served.length // self.pool.block_size

    # Admission ---------------------------------------------------------------------------------

    def _admit(self) -> None:
        """Prefill the next requests that fit (one packed forward) and start rows up to the batch's room."""
        room = self.runner.max_rows - len(self.live)
        planned = sum(min(s.request.n - s.admitted, room) for s in self.admitting)
        group: list[_Request] = []
        promised = 0  # blocks the group's first rows will reserve
        while self.pending and planned < room:
            served = self.pending[0]
            stored, cached = self.engine._match_prefix(served.request.input_ids)
            if group and not _fits_one_prefill(group, served, cached):
                break
            rows = min(served.request.n, room - planned)
            if not self._take_prompt_blocks(served, stored, cached, promised + rows * self._row_need(served)):
                break
            self.pending.popleft()
            group.append(served)
            planned += rows
            promised += rows * self._row_need(served)
        if group:
            self._prefill(group)
            self.admitting.extend(group)
        self._start_rows(room)

    def _take_prompt_blocks(self, served: _Request, stored, cached: int, also: int) -> bool:
        """Blocks of the prompt: the cached prefix's full blocks shared, the rest new (its partial
        block copied), if the pool has room for them and ``also`` more; False when it has not."""
        block_size = self.pool.block_size
        if stored is not None:
            self.pool.allocator.retain(stored.blocks)  # evicting for room must not free them
        fits = self.engine._make_room(self.pool.blocks_for(served.length) - cached // block_size + also)
        if fits:
            served.cached = cached
            if cached:
                served.blocks, copy = self.pool.fork(stored.blocks, cached)
                self.pool.copy_blocks([copy] if copy else [])
            served.blocks += self.pool.allocate(self.pool.blocks_for(served.length) - len(served.blocks))
            self.engine._count_prefill(served.request, cached)
        if stored is not None:
            self.pool.allocator.release(stored.blocks)
        return fits

    def _prefill(self, group: list[_Request]) -> None:
        block_size = self.pool.block_size
        ids, positions, slots = [], [], []
        for served in group:
            for position in range(served.cached, served.length):
                ids.append(served.request.input_ids[position])
                positions.append(position)
                slots.append(served.blocks[position // block_size] * block_size + position % block_size)
        logits = self.runner.prefill(
            ids, positions, slots, [s.blocks for s in group], [s.length for s in group],
            [s.length - s.cached for s in group],
        )  # fmt: skip
        for served, request_logits in zip(group, logits, strict=True):
            served.logits = request_logits

    def _start_rows(self, room: int) -> None:
        """Rows of the prefilled requests, in request order, while the batch and the pool have room;
        their first tokens are sampled from the prompt's logits."""
        started: list[_Row] = []
        copies = []
        while self.admitting and len(started) < room:
            served = self.admitting[0]
            if not self.engine._make_room(self._row_need(served)):
                break
            started.append(self._start_row(served, copies))
            if served.admitted == served.request.n:
                served.blocks = []
                self.admitting.popleft()
        if not started:
            return
        self.pool.copy_blocks(copies)
        first = len(self.live)
        self.live += started
        requests = [row.owner.request for row in started]
        settings = {
            "temperature": [r.sampling.temperature for r in requests],
            "top_p": [r.sampling.top_p for r in requests],
            "min_new_tokens": [r.sampling.min_new_tokens for r in requests],
            "stop_ids": [_padded_stops(r.stop_token_ids) for r in requests],
            "stop_valid": [[bool(r.stop_token_ids)] * MAX_STOP_IDS for r in requests],
        }
        seed_index = torch.tensor([row.owner.first_seed + row.sample for row in started])
        self.runner.start_rows(
            first,
            torch.stack([row.owner.logits for row in started]),
            [row.owner.length for row in started],
            settings,
            [r.max_new_tokens for r in requests],
            self.seeds[seed_index.to(self.seeds.device, non_blocking=True)],
        )
        for row in started:
            if row.owner.admitted == row.owner.request.n:
                row.owner.logits = None
        self._write_tables(range(first, len(self.live)), [0] * len(started))

    def _start_row(self, served: _Request, copies: list) -> _Row:
        """The next row of ``served``: the prompt's blocks forked (the last row takes them over)."""
        request = served.request
        last = served.admitted == request.n - 1
        if request.max_new_tokens >= 2:  # the row writes after the prompt: a copy of its partial block
            blocks, copy = (served.blocks, None) if last else self.pool.fork(served.blocks, served.length)
            copies += [copy] if copy else []
            reserved = self.pool.blocks_for(served.length + request.max_new_tokens - 1) - len(blocks)
        else:  # one token, nothing written: the prompt's blocks are kept only to be stored
            blocks, reserved = [], 0
            if request.cache_output and self.engine.prefix_sharing:
                blocks = list(served.blocks)
                if not last:
                    self.pool.allocator.retain(blocks)
            elif last:
                self.pool.allocator.release(served.blocks)
        self.engine._reserved += reserved
        served.admitted += 1
        return _Row(served, served.admitted - 1, blocks, reserved)

    # Windows -----------------------------------------------------------------------------------

    def _allocate_ahead(self, steps: int) -> None:
        """Blocks for every position each live row may feed in the next ``steps`` steps."""
        old_counts = []
        for row in self.live:
            old_counts.append(len(row.blocks))
            last = min(row.position + steps - 1, row.last_position)
            missing = self.pool.blocks_for(last + 1) - len(row.blocks)
            if missing > 0 and last >= row.position:  # a row that feeds nothing needs no room
                row.blocks += self.pool.allocate(missing)
                taken = min(missing, row.reserved)
                row.reserved -= taken
                self.engine._reserved -= taken
        self._write_tables(range(len(self.live)), old_counts)

    def _write_tables(self, rows: range, old_counts: Sequence[int]) -> None:
        """Write the block-table entries of ``rows`` from ``old_counts[i]`` blocks on."""
        index_rows, columns, blocks = [], [], []
        for i, start in zip(rows, old_counts, strict=True):
            for column in range(start, len(self.live[i].blocks)):
                index_rows.append(i)
                columns.append(column)
                blocks.append(self.live[i].blocks[column])
        self.runner.write_blocks(index_rows, columns, blocks)

    def _finish(self, back: ReadBack) -> None:
        """Take each row's new tokens; finish the rows that stopped; compact the batch."""
        keep = []
        for i, row in enumerate(self.live):
            served = row.owner
            outputs, logprobs = served.outputs[row.sample], served.logprobs[row.sample]
            if row.first_pending:
                outputs.append(back.first_tokens[i])
                logprobs.append(back.first_logprobs[i])
                row.first_pending = False
            count = back.generated[i] - row.generated
            outputs += back.tokens[i][:count]
            logprobs += back.logprobs[i][:count]
            row.generated = back.generated[i]
            if not back.finished[i]:
                keep.append(i)
                continue
            served.reasons[row.sample] = "stop" if outputs[-1] in served.request.stop_token_ids else "length"
            if served.request.cache_output and self.engine.prefix_sharing:
                self.engine._store(served.request, outputs, row.blocks)
            self.pool.allocator.release(row.blocks)
            self.engine._reserved -= row.reserved
        self.runner.compact(keep, len(self.live))
        self.live = [self.live[i] for i in keep]


def _fits_one_prefill(group: list[_Request], served: _Request, cached: int) -> bool:
    """Whether ``served`` (with ``cached`` prompt tokens cached) joins ``group``'s packed prefill."""
    new_parts = [s.length - s.cached for s in group] + [served.length - cached]
    longest = max(s.length for s in [*group, served])
    return sum(new_parts) <= PREFILL_TOKENS and len(new_parts) * max(new_parts) * longest <= PREFILL_PADDED


def _padded_stops(stop_ids: Sequence[int]) -> list[int]:
    """``MAX_STOP_IDS`` ids: the request's, then its first repeated (or 0 when it has none)."""
    ids = list(stop_ids) or [0]
    return ids + [ids[0]] * (MAX_STOP_IDS - len(ids))
