"""The embedded engine before the paged KV pool (issue 25), kept only as ``bench_decode.py``'s
``eager`` provider and as the reference the paged engine's tests compare with.

Requests are served in chunks of at most ``max_batch_rows`` sampled rows: each request rebuilds a
``DynamicCache`` from the stored keys/values of its longest cached prefix and prefills the rest on
its own; the prefilled caches, repeated for the ``n`` samples of each request, are stacked
left-padded into one batch and decoded together, sampling with a host sync every token; a
finished row of a ``cache_output`` request clones its keys/values into the radix index.

Instrumented for the benchmark: ``host_syncs`` counts the points where the host waits for the
device on CUDA (a tensor built from a Python list, a value read back), ``decode_steps`` the decode
forwards and ``peak_kv_bytes`` the most keys/values held at once (stored sequences, per-request
prefills and the stacked decode cache).
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from trainer.rollout.base import GenerationOutput, GenerationRequest, RolloutEngine
from trainer.rollout.radix import RadixIndex

logger = logging.getLogger(__name__)


@dataclass
class _StoredSequence:
    """Keys and values ``[H_kv, T, D]`` per layer of one finished sequence."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    tokens: tuple[int, ...] = ()
    priority: int = 0
    last_access: int = 0
    stored_at: int = 0


@dataclass
class _Prefilled:
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    logits: torch.Tensor
    cached: int


class _DecodeRows:
    """The sampled rows of one decode batch: request ``i`` owns ``n_i`` consecutive rows."""

    def __init__(self, batch: list[GenerationRequest]) -> None:
        self.batch = batch
        self.request_of = [i for i, request in enumerate(batch) for _ in range(request.n)]
        self.input_lens = [len(batch[i].input_ids) for i in self.request_of]
        self.count = len(self.request_of)
        self.outputs: list[list[int]] = [[] for _ in range(self.count)]
        self.logprobs: list[list[float]] = [[] for _ in range(self.count)]
        self.reasons: list[str | None] = [None] * self.count

    def request(self, row: int) -> GenerationRequest:
        return self.batch[self.request_of[row]]

    def per_request(self) -> list[tuple[list[list[int]], list[str], list[list[float]]]]:
        grouped: list[tuple[list[list[int]], list[str], list[list[float]]]] = [([], [], []) for _ in self.batch]
        for row, i in enumerate(self.request_of):
            grouped[i][0].append(self.outputs[row])
            grouped[i][1].append(self.reasons[row])
            grouped[i][2].append(self.logprobs[row])
        return grouped


class _PreallocatedLayer(DynamicLayer):
    """A cache layer that writes into a buffer sized for the whole decode.

    ``DynamicLayer`` concatenates on every step, copying the whole cache each token; here ``keys``
    and ``values`` are views of the first ``length`` columns of preallocated buffers.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, capacity: int) -> None:
        super().__init__()
        self.lazy_initialization(keys, values)
        rows, heads, length, head_dim = keys.shape
        self._key_buffer = keys.new_zeros(rows, heads, capacity, head_dim)
        self._value_buffer = torch.zeros_like(self._key_buffer)
        self._key_buffer[:, :, :length] = keys
        self._value_buffer[:, :, :length] = values
        self._length = length
        self._publish()

    def _publish(self) -> None:
        self.keys = self._key_buffer[:, :, : self._length]
        self.values = self._value_buffer[:, :, : self._length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        end = self._length + key_states.shape[-2]
        if end > self._key_buffer.shape[-2]:
            raise RuntimeError(f"decode cache overflow: {end} columns for a buffer of {self._key_buffer.shape[-2]}")
        self._key_buffer[:, :, self._length : end] = key_states
        self._value_buffer[:, :, self._length : end] = value_states
        self._length = end
        self._publish()
        return self.keys, self.values

    def select(self, rows: torch.Tensor, first: int) -> None:
        """Keep ``rows`` and drop the columns before ``first``."""
        self._key_buffer = self._key_buffer[rows, :, first:]
        self._value_buffer = self._value_buffer[rows, :, first:]
        self._length -= first
        self._publish()


class EagerEngine(RolloutEngine):
    """Rollouts from a Hugging Face causal LM (CPU or CUDA) with prefix-shared summary forks.

    Args:
        model: a ``*ForCausalLM`` whose forward takes ``position_ids``, ``attention_mask`` and a
            ``DynamicCache`` (Qwen2/Llama-style decoders).
        tokenizer: the policy's tokenizer (delimiter ids and EOS come from it).
        prefix_sharing: serve cached prefixes from the radix index of finished traces.
        max_batch_rows: most sampled rows decoded together.
        seed: seed of the sampling generator (a request's ``sampling.seed`` reseeds it).
        kv_budget_tokens: most tokens the stored sequences may hold (None: unbounded); see above.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        *,
        prefix_sharing: bool = True,
        max_batch_rows: int = 64,
        seed: int = 0,
        eos_token_ids: Sequence[int] = (),
        kv_budget_tokens: int | None = None,
    ) -> None:
        super().__init__(*self.tokenizer_setup(tokenizer), eos_token_ids=eos_token_ids)
        if max_batch_rows < 1:
            raise ValueError(f"max_batch_rows must be >= 1, got {max_batch_rows}")
        if kv_budget_tokens is not None and kv_budget_tokens < 1:
            raise ValueError(f"kv_budget_tokens must be >= 1 or None, got {kv_budget_tokens}")
        self.kv_budget_tokens = kv_budget_tokens
        self._stored: dict[tuple[int, ...], _StoredSequence] = {}
        self._stored_tokens = 0
        self._clock = 0
        self._call_started = 0
        self.evicted_sequences = 0
        self.model = model.eval()
        self.prefix_sharing = prefix_sharing
        self.max_batch_rows = max_batch_rows
        self.device = next(model.parameters()).device
        self._generator = torch.Generator(device=self.device).manual_seed(seed)
        self._index: RadixIndex[_StoredSequence] = RadixIndex()
        self._prefill_compute = self._prefill_cache = 0
        self._prefill_by_priority: dict[int, list[int]] = {}
        parameters = inspect.signature(model.forward).parameters
        # transformers renamed `past_key_values` to `cache` after 5.17.
        self._cache_argument = "cache" if "cache" in parameters else "past_key_values"
        self.host_syncs = 0
        self.decode_steps = 0
        self.peak_kv_bytes = 0

    @property
    def cached_sequences(self) -> int:
        """Number of finished sequences held in the prefix index."""
        return len(self._index)

    @property
    def stored_tokens(self) -> int:
        """Tokens held by the stored sequences (what ``kv_budget_tokens`` bounds)."""
        return self._stored_tokens

    def flush_cache(self) -> None:
        self._index.clear()
        self._stored.clear()
        self._stored_tokens = 0

    reseeds_per_call = True  # generate() reseeds its generator from the first request's seed

    def release_traces(self, traces) -> None:
        """Drop the stored keys/values of ``traces`` (a ``ThinkingBatch``) once their forks are
        served; the stored key of a trace is its prompt and thinking but the last token. A
        sequence stored again by the latest ``generate`` call (the same tokens sampled by the next
        window) stays for its own forks."""
        for prompt, thinking in zip(traces.prompt_ids, traces.thinking_ids, strict=True):
            tokens = tuple(prompt) + tuple(thinking[:-1])
            stored = self._stored.get(tokens)
            if stored is not None and stored.stored_at < self._call_started:
                self._drop(tokens)

    def release_memory(self) -> None:
        """Drop the step's cached traces before the learner trains: on a GPU shared with the learner
        their K/V would hold memory through the update, and the weight sync flushes them anyway."""
        self.flush_cache()

    def prefill_priorities(self) -> list[int]:
        """The request priorities that have prefilled so far, ascending (``prefill_counters``' keys)."""
        return sorted(self._prefill_by_priority)

    def prefill_counters(self, priority: int | None = None) -> dict[str, float]:
        """Exact: every prefill computes the uncached part of its prompt once (its n samples share it).
        ``priority``: of the requests of that priority only (SGLang labels its counters with it)."""
        if priority is not None:
            compute, cache = self._prefill_by_priority.get(priority, (0, 0))
            return {"prefill_compute": float(compute), "prefill_cache": float(cache)}
        return {"prefill_compute": float(self._prefill_compute), "prefill_cache": float(self._prefill_cache)}

    def update_weights(self, model: torch.nn.Module) -> None:
        start = time.perf_counter()
        if model is not self.model:
            self.model.load_state_dict(model.state_dict())
        self.flush_cache()
        self.stats.weight_sync_seconds += time.perf_counter() - start

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationOutput]:
        outputs: list[GenerationOutput | None] = [None] * len(requests)
        chunk: list[int] = []
        rows = 0
        # Reseed once per call, never per chunk: chunks must continue one random stream, or the
        # same prompt's samples would repeat across chunks.
        if requests and requests[0].sampling.seed is not None:
            self._generator.manual_seed(requests[0].sampling.seed)
        self._clock += 1
        self._call_started = self._clock  # what this call stores is newer (release_traces)
        with torch.inference_mode():
            for i, request in enumerate(requests):
                if chunk and rows + request.n > self.max_batch_rows:
                    self._serve(requests, chunk, outputs)
                    chunk, rows = [], 0
                chunk.append(i)
                rows += request.n
            if chunk:
                self._serve(requests, chunk, outputs)
        return outputs

    def _serve(self, requests: Sequence[GenerationRequest], chunk: list[int], outputs: list) -> None:
        batch = [requests[i] for i in chunk]
        prefilled = [self._prefill(request) for request in batch]
        samples = self._decode(batch, prefilled)
        for pre, request in zip(prefilled, batch, strict=True):
            self._prefill_compute += len(request.input_ids) - pre.cached
            self._prefill_cache += pre.cached
            counts = self._prefill_by_priority.setdefault(request.priority, [0, 0])
            counts[0] += len(request.input_ids) - pre.cached
            counts[1] += pre.cached
        for i, request, pre, (ids, reasons, logprobs) in zip(chunk, batch, prefilled, samples, strict=True):
            outputs[i] = GenerationOutput(
                output_ids=ids,
                output_logprobs=logprobs,
                finish_reasons=reasons,
                prompt_tokens=len(request.input_ids),
                cached_tokens=[pre.cached] * request.n,
                prefilled_tokens=len(request.input_ids) - pre.cached,
            )

    def _forward(self, input_ids, position_ids, cache, attention_mask=None) -> torch.Tensor:
        out = self.model(
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask=attention_mask,
            use_cache=True,
            logits_to_keep=1,
            **{self._cache_argument: cache},
        )
        logits = out.logits[:, -1]
        return logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp32 at least; fp64 stays

    def _prefill(self, request: GenerationRequest) -> _Prefilled:
        ids = request.input_ids
        stored, cached = self._index.match(ids) if self.prefix_sharing else (None, 0)
        # At least one token is computed: its logits give the first sample.
        cached = min(cached, len(ids) - 1)
        if stored is not None:
            self._clock += 1
            stored.last_access = self._clock
        if stored is None or cached == 0:
            cache, cached = DynamicCache(), 0
        else:
            layers = [
                (k[None, :, :cached], v[None, :, :cached]) for k, v in zip(stored.keys, stored.values, strict=True)
            ]
            cache = DynamicCache(ddp_cache_data=layers)
        suffix = torch.tensor([ids[cached:]], dtype=torch.long, device=self.device)
        self.host_syncs += 1
        positions = torch.arange(cached, len(ids), device=self.device)[None]
        logits = self._forward(suffix, positions, cache)[0]
        return _Prefilled(
            keys=[layer.keys[0] for layer in cache.layers],
            values=[layer.values[0] for layer in cache.layers],
            logits=logits,
            cached=cached,
        )

    def _decode(
        self, batch: list[GenerationRequest], prefilled: list[_Prefilled]
    ) -> list[tuple[list[list[int]], list[str], list[list[float]]]]:
        """Sample every row of the batch to a stop token or its cap; (ids, reasons, log-probs) per request."""
        rows = _DecodeRows(batch)
        cache, mask = self._stack_caches(rows, prefilled)
        self._record_kv(cache, prefilled)
        logits = torch.stack([prefilled[i].logits for i in rows.request_of])
        present = list(range(rows.count))  # batch position -> row; finished rows leave in bulk
        while True:
            tokens, logprobs = self._sample(
                logits, [rows.request(row) for row in present], [len(rows.outputs[row]) for row in present]
            )
            # One device-to-host copy per decoded token for both (ids are exact in float64).
            tokens_host, logprobs_host = torch.stack([tokens.double(), logprobs.double()]).tolist()
            self.host_syncs += 1
            self._append_tokens(rows, present, [int(t) for t in tokens_host], logprobs_host, cache, mask)
            keep = [position for position, row in enumerate(present) if rows.reasons[row] is None]
            if not keep:
                break
            if self._worth_compacting(rows, present, keep):
                mask = self._select_rows(cache, mask, keep)
                tokens = tokens[keep]
                present = [present[p] for p in keep]
            mask = torch.cat([mask, mask.new_ones(len(present), 1)], dim=1)
            positions = torch.tensor(
                [[rows.input_lens[row] + len(rows.outputs[row]) - 1] for row in present],
                dtype=torch.long,
                device=self.device,
            )
            logits = self._forward(tokens[:, None], positions, cache, attention_mask=mask)
            self.host_syncs += 1
            self.decode_steps += 1
        return rows.per_request()

    def reset_peak_kv(self) -> None:
        """Start measuring ``peak_kv_bytes`` afresh."""
        self.peak_kv_bytes = 0

    def _record_kv(self, cache: DynamicCache, prefilled: list[_Prefilled]) -> None:
        """Keys/values held while a chunk decodes: the stacked cache, the prefills, the stored sequences."""

        def size(tensors) -> int:
            return sum(t.numel() * t.element_size() for t in tensors)

        held = sum(size([layer._key_buffer, layer._value_buffer]) for layer in cache.layers)
        held += sum(size(p.keys) + size(p.values) for p in prefilled)
        held += sum(size(s.keys) + size(s.values) for s in self._stored.values())
        self.peak_kv_bytes = max(self.peak_kv_bytes, held)

    def _stack_caches(self, rows: _DecodeRows, prefilled: list[_Prefilled]) -> tuple[DynamicCache, torch.Tensor]:
        """One left-padded cache of all rows (each request's prefill repeated for its n samples),
        preallocated for the longest decode, and its attention mask ``[rows, width]``."""
        width = max(rows.input_lens)
        layers = []
        for layer in range(len(prefilled[0].keys)):
            heads, _, head_dim = prefilled[0].keys[layer].shape
            keys = prefilled[0].keys[layer].new_zeros(rows.count, heads, width, head_dim)
            values = torch.zeros_like(keys)
            for row, i in enumerate(rows.request_of):
                keys[row, :, width - rows.input_lens[row] :] = prefilled[i].keys[layer]
                values[row, :, width - rows.input_lens[row] :] = prefilled[i].values[layer]
            layers.append((keys, values))
        capacity = width + max(request.max_new_tokens for request in rows.batch)
        cache = DynamicCache()
        cache.layers = [_PreallocatedLayer(keys, values, capacity) for keys, values in layers]
        mask = torch.zeros(rows.count, width, dtype=torch.long, device=self.device)
        for row, length in enumerate(rows.input_lens):
            mask[row, width - length :] = 1
        return cache, mask

    def _append_tokens(
        self, rows: _DecodeRows, present: list[int], tokens: list[int], logprobs: list[float], cache, mask
    ) -> None:
        """Append each unfinished row's token; a row that stops (stop token or cap) is finished and,
        for a request with ``cache_output``, stored in the prefix index."""
        for position, (row, token, logprob) in enumerate(zip(present, tokens, logprobs, strict=True)):
            if rows.reasons[row] is not None:
                continue
            request = rows.request(row)
            rows.outputs[row].append(token)
            rows.logprobs[row].append(logprob)
            if token in request.stop_token_ids:
                rows.reasons[row] = "stop"
            elif len(rows.outputs[row]) >= request.max_new_tokens:
                rows.reasons[row] = "length"
            else:
                continue
            if request.cache_output and self.prefix_sharing:
                self._store(cache, position, mask, request, rows.outputs[row])

    @staticmethod
    def _worth_compacting(rows: _DecodeRows, present: list[int], keep: list[int]) -> bool:
        """Compacting copies the cache (reads and writes it: about two decode steps of cache reads);
        finished rows left in would cost up to ``finished * steps_left`` row-steps."""
        steps_left = max(rows.request(row).max_new_tokens - len(rows.outputs[row]) for row in present)
        return (len(present) - len(keep)) * steps_left >= 2 * len(present)

    def _store(self, cache: DynamicCache, position: int, mask: torch.Tensor, request, output_ids) -> None:
        """Keep a finished row's keys/values for ``input + output[:-1]`` (the last token has none),
        then evict down to the budget."""
        tokens = tuple(request.input_ids) + tuple(output_ids[:-1])
        length = len(tokens)
        end = mask.shape[1]
        self._clock += 1
        stored = _StoredSequence(
            keys=[layer.keys[position, :, end - length : end].clone() for layer in cache.layers],
            values=[layer.values[position, :, end - length : end].clone() for layer in cache.layers],
            tokens=tokens,
            priority=request.priority,
            last_access=self._clock,
            stored_at=self._clock,
        )
        previous = self._stored.pop(tokens, None)
        if previous is not None:
            self._stored_tokens -= len(previous.tokens)
        self._index.insert(tokens, stored)
        self._stored[tokens] = stored
        self._stored_tokens += length
        self._evict()

    def _evict(self) -> None:
        """Drop stored sequences (lowest priority, then least recently used) until within budget."""
        if self.kv_budget_tokens is None or self._stored_tokens <= self.kv_budget_tokens:
            return
        order = sorted(self._stored.values(), key=lambda seq: (seq.priority, seq.last_access))
        for victim in order:
            if self._stored_tokens <= self.kv_budget_tokens:
                break
            self._drop(victim.tokens)
            self.evicted_sequences += 1

    def _drop(self, tokens: tuple[int, ...]) -> None:
        """Forget the stored sequence of ``tokens``: its keys/values, index entry and token count."""
        self._index.remove(tokens)
        del self._stored[tokens]
        self._stored_tokens -= len(tokens)

    def _select_rows(self, cache: DynamicCache, mask: torch.Tensor, keep: list[int]) -> torch.Tensor:
        """Drop finished rows, and the padding columns no remaining row needs."""
        index = torch.tensor(keep, dtype=torch.long, device=mask.device)
        mask = mask[index]
        first = int(mask.any(dim=0).nonzero()[0])
        self.host_syncs += 2
        for layer in cache.layers:
            layer.select(index, first)
        return mask[:, first:]

    def _sample(
        self, logits: torch.Tensor, requests: list[GenerationRequest], generated: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Next token ``[B]`` from ``logits [B, V]`` under each row's sampling settings, and its
        log-probability ``[B]`` under ``log_softmax(logits / T)`` (T = 1 for greedy rows)."""
        temperatures = torch.tensor(
            [r.sampling.temperature for r in requests], device=logits.device, dtype=logits.dtype
        )
        self.host_syncs += 1
        scaled = torch.log_softmax(logits / torch.where(temperatures > 0, temperatures, 1.0)[:, None], dim=-1)
        tokens = self._choose(logits, requests, generated, temperatures)
        return tokens, scaled.gather(-1, tokens[:, None])[:, 0]

    def _choose(
        self, logits: torch.Tensor, requests: list[GenerationRequest], generated: list[int], temperatures: torch.Tensor
    ) -> torch.Tensor:
        for row, (request, count) in enumerate(zip(requests, generated, strict=True)):
            if count < request.sampling.min_new_tokens:
                logits[row, list(request.stop_token_ids)] = float("-inf")
                self.host_syncs += 1
        greedy = logits.argmax(dim=-1)
        # Decided from the requests on the host: no device sync per decoded token.
        if all(r.sampling.temperature == 0 for r in requests):
            return greedy
        probs = torch.softmax(logits / temperatures.clamp_min(1e-6)[:, None], dim=-1)
        top_p = torch.tensor([r.sampling.top_p for r in requests], device=logits.device)
        self.host_syncs += 1
        if any(r.sampling.top_p < 1 for r in requests):
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            # Keep the smallest set of most likely tokens whose mass reaches top_p.
            outside = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_p[:, None]
            choice = torch.multinomial(sorted_probs.masked_fill(outside, 0.0), 1, generator=self._generator)
            sampled = order.gather(-1, choice)[:, 0]
        else:
            sampled = torch.multinomial(probs, 1, generator=self._generator)[:, 0]
        return torch.where(temperatures == 0, greedy, sampled)
