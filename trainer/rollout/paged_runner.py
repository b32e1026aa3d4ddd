"""The embedded engine's model runner: a packed prefill and a decode step over the paged KV pool.

The decode state of up to ``max_rows`` rows lives in static device buffers for the engine's life
(:class:`DecodeState`): the token to feed and its position, the block table, tokens generated,
the finished flag, each row's sampling settings and caps, and a ring of the last ``ring_steps``
sampled ids and log-probs. One decode step (:meth:`PagedRunner.decode`) feeds every live row its
token, writes its keys/values to its slot, samples on the device (``trainer.rollout.sampling``),
records the token in the ring, detects stops and caps, and advances the row: nothing is read back.
The host reads the ring every few steps (:meth:`PagedRunner.read_back`, one sync) and only then
touches the buffers: it compacts finished rows away and writes new rows in.

On CUDA the step of each row-count bucket (1, 2, 4, 8, ... up to ``max_rows``) is captured as a
CUDA graph the first time it runs, then replayed; rows past the live ones are finished (no slot,
no keys), so a bucket serves any count up to its size. Weights must be updated in place
(``load_state_dict``), which keeps the graphs valid. On the CPU the same step runs eagerly on the
live rows alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch

from trainer.rollout.kv_pool import KVPool
from trainer.rollout.paged_model import (
    PagedBatch,
    attention_backend,
    forward_logits,
    paged_attention,
    placeholder_mask,
)
from trainer.rollout.sampling import RowSettings, sample

MAX_STOP_IDS = 16


def to_device(values: Sequence, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list as a device tensor, copied without waiting for the device."""
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)


def buckets(max_rows: int) -> list[int]:
    """Row counts that get their own decode graph: powers of two below ``max_rows``, then it."""
    sizes = [1]
    while sizes[-1] * 2 < max_rows:
        sizes.append(sizes[-1] * 2)
    return sorted({*sizes, max_rows})


@dataclass
class DecodeState:
    """The decode buffers of R rows (``[R]`` unless noted); :meth:`view` gives the first rows.

    Attributes:
        tokens: int64 token each row feeds next.
        positions: int64 position of that token.
        generated: int64 tokens the row has generated (the ring's next output position).
        finished: bool; a finished row (and a padding row) writes no key and attends to nothing.
        max_new_tokens: int64 cap of the row.
        block_tables: ``[R, W]`` int32 blocks of each row.
        settings: the rows' sampling settings.
        first_tokens, first_logprobs: the token sampled from the prefill (read back with the ring).
        ring_tokens, ring_logprobs: ``[K, R]`` tokens and log-probs of the last K steps.
    """

    tokens: torch.Tensor
    positions: torch.Tensor
    generated: torch.Tensor
    finished: torch.Tensor
    max_new_tokens: torch.Tensor
    block_tables: torch.Tensor
    settings: RowSettings
    first_tokens: torch.Tensor
    first_logprobs: torch.Tensor
    ring_tokens: torch.Tensor
    ring_logprobs: torch.Tensor

    @classmethod
    def empty(cls, rows: int, width: int, ring_steps: int, logit_dtype: torch.dtype, device) -> DecodeState:
        def zeros(*shape, dtype=torch.long):
            return torch.zeros(*shape, dtype=dtype, device=device)

        settings = RowSettings(
            temperature=zeros(rows, dtype=torch.float64), top_p=torch.ones(rows, dtype=torch.float64, device=device),
            min_new_tokens=zeros(rows), seeds=zeros(rows), stop_ids=zeros(rows, MAX_STOP_IDS),
            stop_valid=zeros(rows, MAX_STOP_IDS, dtype=torch.bool),
        )  # fmt: skip
        return cls(
            tokens=zeros(rows), positions=zeros(rows), generated=zeros(rows),
            finished=torch.ones(rows, dtype=torch.bool, device=device), max_new_tokens=zeros(rows),
            block_tables=zeros(rows, width, dtype=torch.int32), settings=settings, first_tokens=zeros(rows),
            first_logprobs=zeros(rows, dtype=logit_dtype), ring_tokens=zeros(ring_steps, rows),
            ring_logprobs=zeros(ring_steps, rows, dtype=logit_dtype),
        )  # fmt: skip

    def row_tensors(self) -> list[torch.Tensor]:
        """Every buffer indexed by row first (the rings are indexed by step first)."""
        rings = ("settings", "ring_tokens", "ring_logprobs")
        own = [getattr(self, f.name) for f in fields(self) if f.name not in rings]
        return own + [getattr(self.settings, f.name) for f in fields(self.settings)]

    def view(self, rows: int) -> DecodeState:
        """The first ``rows`` rows (views: writes reach the buffers)."""
        settings = RowSettings(**{f.name: getattr(self.settings, f.name)[:rows] for f in fields(self.settings)})
        by_row = {f.name: getattr(self, f.name)[:rows] for f in fields(self) if f.name != "settings"}
        by_row["ring_tokens"], by_row["ring_logprobs"] = self.ring_tokens[:, :rows], self.ring_logprobs[:, :rows]
        return DecodeState(**by_row | {"settings": settings})


@dataclass
class ReadBack:
    """What the host learns at a read-back, per row (``[rows]``; the ring ``[rows][steps]``)."""

    tokens: list[list[int]]
    logprobs: list[list[float]]
    generated: list[int]
    finished: list[bool]
    first_tokens: list[int]
    first_logprobs: list[float]


def _stops(tokens: torch.Tensor, settings: RowSettings) -> torch.Tensor:
    """``[B]`` whether each row's token is one of its stop ids."""
    return ((tokens[:, None] == settings.stop_ids) & settings.stop_valid).any(dim=-1)


class PagedRunner:
    """Runs the model over the pool: packed prefills, and decode steps on static buffers.

    Args:
        model: the engine's causal LM.
        pool: the KV pool.
        max_rows: rows decoded together.
        max_blocks_per_row: block-table width (the longest sequence / block size).
        ring_steps: most decode steps between two read-backs.
        use_graphs: capture each bucket's step in a CUDA graph (CUDA only).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        pool: KVPool,
        *,
        max_rows: int,
        max_blocks_per_row: int,
        ring_steps: int,
        use_graphs: bool,
    ) -> None:
        self.model = model
        self.pool = pool
        self.device = pool.storage.device
        self.max_rows = max_rows
        self.max_blocks_per_row = max_blocks_per_row
        self.ring_steps = ring_steps
        self.use_graphs = use_graphs
        dtype = next(model.parameters()).dtype
        self.logit_dtype = torch.promote_types(dtype, torch.float32)
        self.backend = attention_backend(dtype)
        self.state = DecodeState.empty(max_rows, max_blocks_per_row, ring_steps, self.logit_dtype, self.device)
        self.ring_step = torch.zeros(1, dtype=torch.long, device=self.device)
        self._mask = placeholder_mask(self.device)
        self._buckets = buckets(max_rows)
        self._graphs: dict[tuple[int, bool], torch.cuda.CUDAGraph] = {}
        self._graph_pool = None
        self.host_syncs = 0  # reads of device values: read-backs, and the eager loop's finished flags
        self.read_backs = 0
        self.decode_steps = 0

    def prefill(
        self,
        input_ids: Sequence[int],
        positions: Sequence[int],
        slots: Sequence[int],
        block_tables: Sequence[Sequence[int]],
        seq_lens: Sequence[int],
        query_lens: Sequence[int],
    ) -> torch.Tensor:
        """One forward over the new tokens of R requests, packed; their keys/values go to ``slots``.

        Args:
            input_ids, positions, slots: ``[T]`` the new tokens, request after request.
            block_tables: ``[R][blocks]`` each request's blocks (its cached prefix and new tokens).
            seq_lens: ``[R]`` each request's whole length (prefix + new).
            query_lens: ``[R]`` new tokens of each request (>= 1).

        Returns:
            ``[R, V]`` logits of each request's last token (fp32 at least).
        """
        width = max(len(table) for table in block_tables)
        tables = [list(table) + [0] * (width - len(table)) for table in block_tables]
        starts = [0]
        for length in query_lens:
            starts.append(starts[-1] + length)
        batch = PagedBatch(
            self.pool,
            to_device(slots, torch.long, self.device),
            to_device(tables, torch.int32, self.device),
            to_device(seq_lens, torch.int32, self.device),
            to_device(starts, torch.int32, self.device),
            self.backend,
        )
        ids = to_device([input_ids], torch.long, self.device)
        position_ids = to_device([positions], torch.long, self.device)
        last = to_device([s - 1 for s in starts[1:]], torch.long, self.device)
        with paged_attention(self.model):
            logits = forward_logits(self.model, ids, position_ids, batch, self._mask, logits_to_keep=last)
        return logits[0].to(self.logit_dtype)

    def start_rows(
        self,
        first: int,
        logits: torch.Tensor,
        positions: Sequence[int],
        settings: dict[str, Sequence],
        max_new_tokens: Sequence[int],
        seeds: torch.Tensor,
    ) -> None:
        """Write rows ``first .. first + m`` in and sample their first token from ``logits [m, V]``.

        ``positions``: ``[m]`` position of the first sampled token (the prompt length);
        ``settings``: ``RowSettings`` field name -> ``[m]`` host values (``seeds`` excluded);
        ``seeds``: ``[m]`` int64 device tensor. Block tables are written apart (:meth:`write_blocks`).
        """
        rows = slice(first, first + len(positions))
        state = self.state
        for name, values in settings.items():
            target = getattr(state.settings, name)[rows]
            target.copy_(to_device(values, target.dtype, self.device), non_blocking=True)
        state.settings.seeds[rows] = seeds
        state.max_new_tokens[rows] = to_device(max_new_tokens, torch.long, self.device)
        view = RowSettings(**{f.name: getattr(state.settings, f.name)[rows] for f in fields(RowSettings)})
        generated = torch.zeros(len(positions), dtype=torch.long, device=self.device)
        tokens, logprobs = sample(logits, view, generated, nucleus=bool(min(settings["top_p"]) < 1))
        state.first_tokens[rows] = tokens
        state.first_logprobs[rows] = logprobs
        state.tokens[rows] = tokens
        state.positions[rows] = to_device(positions, torch.long, self.device)
        state.generated[rows] = 1
        state.finished[rows] = _stops(tokens, view) | (state.max_new_tokens[rows] <= 1)

    def write_blocks(self, rows: Sequence[int], columns: Sequence[int], blocks: Sequence[int]) -> None:
        """``block_tables[rows[i], columns[i]] = blocks[i]`` in one op."""
        if rows:
            index = (to_device(rows, torch.long, self.device), to_device(columns, torch.long, self.device))
            self.state.block_tables.index_put_(index, to_device(blocks, torch.int32, self.device))

    def compact(self, keep: Sequence[int], live: int) -> None:
        """Move rows ``keep`` (of the ``live`` first rows, ascending) to the front; the rest are finished."""
        if list(keep) == list(range(live)):
            return
        if keep:
            index = to_device(keep, torch.long, self.device)
            for tensor in self.state.row_tensors():
                tensor[: len(keep)] = tensor.index_select(0, index)
        self.state.finished[len(keep) : live] = True

    def decode(self, rows: int, steps: int, nucleus: bool) -> None:
        """``steps`` decode steps of the first ``rows`` rows (their tokens go to the ring from slot 0)."""
        if steps > self.ring_steps:
            raise ValueError(f"{steps} steps between read-backs; the ring holds {self.ring_steps}")
        self.ring_step.zero_()
        if self.use_graphs:
            bucket = next(size for size in self._buckets if size >= rows)
            graph = self._graphs.get((bucket, nucleus)) or self._capture(bucket, nucleus)
            for _ in range(steps):
                graph.replay()
            self.decode_steps += steps
            return
        state = self.state.view(rows)
        with paged_attention(self.model):
            for _ in range(steps):
                # Eager (the CPU): stop once every row finished; a read of the flags per step (a
                # host sync where the device is not the host, hence counted).
                self.host_syncs += 1
                if bool(state.finished.all()):
                    break
                self._step(state, nucleus)
                self.decode_steps += 1

    def _step(self, state: DecodeState, nucleus: bool) -> None:
        block_size = self.pool.block_size
        live = ~state.finished
        column = (state.positions // block_size).clamp_max(state.block_tables.shape[1] - 1)
        blocks = state.block_tables.gather(1, column[:, None])[:, 0].long()
        slots = torch.where(live, blocks * block_size + state.positions % block_size, -1)
        seq_lens = torch.where(live, state.positions + 1, 0).to(torch.int32)
        batch = PagedBatch(self.pool, slots, state.block_tables, seq_lens, backend=self.backend)
        logits = forward_logits(self.model, state.tokens[:, None], state.positions[:, None], batch, self._mask)
        tokens, logprobs = sample(logits[:, -1], state.settings, state.generated, nucleus=nucleus)
        state.ring_tokens.index_copy_(0, self.ring_step, tokens[None])
        state.ring_logprobs.index_copy_(0, self.ring_step, logprobs[None].to(state.ring_logprobs.dtype))
        generated = state.generated + live
        done = live & (_stops(tokens, state.settings) | (generated >= state.max_new_tokens))
        state.tokens.copy_(torch.where(live, tokens, state.tokens))
        state.positions.add_(live)
        state.generated.copy_(generated)
        state.finished.logical_or_(done)
        self.ring_step.add_(1)

    def _capture(self, bucket: int, nucleus: bool) -> torch.cuda.CUDAGraph:
        """Capture one bucket's step; its warm-up runs with every row finished, so it changes nothing."""
        state = self.state.view(bucket)
        finished = state.finished.clone()
        state.finished.fill_(True)
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with paged_attention(self.model):
            stream = torch.cuda.Stream(device=self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                self._step(state, nucleus)  # warm-up: kernels compiled and workspaces made outside the capture
            torch.cuda.current_stream(self.device).wait_stream(stream)
            with torch.cuda.graph(graph, pool=self._graph_pool):
                self._step(state, nucleus)
        state.finished.copy_(finished)
        self._graphs[(bucket, nucleus)] = graph
        return graph

    def read_back(self, rows: int, steps: int) -> ReadBack:
        """The first ``rows`` rows' last ``steps`` ring entries, counters and first tokens: one wait."""
        state = self.state
        parts = [state.ring_tokens[:steps, :rows].T, state.ring_logprobs[:steps, :rows].T.double(),
                 torch.stack([state.generated[:rows], state.finished[:rows].long(), state.first_tokens[:rows]]),
                 state.first_logprobs[:rows].double()]  # fmt: skip
        if self.device.type == "cuda":
            host = [torch.empty(part.shape, dtype=part.dtype, pin_memory=True) for part in parts]
            for target, part in zip(host, parts, strict=True):
                target.copy_(part, non_blocking=True)
            torch.cuda.current_stream(self.device).synchronize()
            parts = host
        self.host_syncs += 1
        self.read_backs += 1
        tokens, logprobs, counters, first_logprobs = (part.tolist() for part in parts)
        generated, finished, first_tokens = counters
        return ReadBack(tokens, logprobs, generated, [bool(f) for f in finished], first_tokens, first_logprobs)
