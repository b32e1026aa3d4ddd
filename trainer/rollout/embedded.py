"""The embedded engine: a Hugging Face causal LM over a paged KV pool, in this process.

The default engine on one machine and the CPU path. Keys and values live in blocks of
``block_size`` tokens (``trainer/rollout/kv_pool.py``), with reference counts on the host:

1. prefill: a request looks up the longest prefix of its input among the finished sequences in
   the radix index, shares that prefix's full blocks (copying only a partial last block), and
   computes the rest only (a summary fork prefills just its delimiter), packed with the other
   requests that start at the same moment into one forward;
2. decode: every request's ``n`` samples are rows of one batch (at most ``max_batch_rows``), each
   with its own block table, decoded by a step that samples on the device
   (``trainer/rollout/paged_runner.py``; a CUDA graph per row bucket on CUDA); the host reads the
   tokens back every ``sync_every`` steps and then finishes, compacts and refills rows
   (``trainer/rollout/scheduler.py``);
3. a finished row of a request with ``cache_output`` is stored under its token ids (input and
   output except the last sampled token, which was never fed) in the radix index: the stored
   sequence references the row's blocks, nothing is copied.

With ``kv_budget_tokens`` the stored sequences hold at most that many tokens: storing past it
evicts whole sequences, lowest request ``priority`` first and least recently used (stored or
matched) among equals, as SGLang's radix cache does with ``--radix-eviction-policy priority``.
The same order frees blocks when the pool runs short. The pool holds ``kv_blocks`` blocks, or on
CUDA ``kv_memory_fraction`` of the memory free when the engine first generates (SGLang's
``--mem-fraction-static``); a CPU pool without ``kv_blocks`` grows as needed.

Sampling is reproducible: each row draws a seed from the engine's generator (a request's
``sampling.seed`` reseeds it once per call), and its tokens are a function of that seed and the
model alone (``trainer/rollout/sampling.py``), whatever the batch around it.

With ``prefix_sharing=False`` nothing is stored or looked up: every request prefills its whole
input (the baseline of ``benchmarks/bench_rollout.py``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from trainer.rollout.base import GenerationOutput, GenerationRequest, RolloutEngine
from trainer.rollout.kv_pool import KVPool
from trainer.rollout.paged_runner import PagedRunner
from trainer.rollout.radix import RadixIndex
from trainer.rollout.scheduler import Scheduler

logger = logging.getLogger(__name__)

CPU_START_BLOCKS = 256
DEFAULT_CONTEXT = 32768  # the block-table width of a model whose config names no context length


@dataclass
class _StoredSequence:
    """A finished sequence in the prefix cache: its token ids and the blocks holding their keys/values."""

    tokens: tuple[int, ...]
    blocks: list[int]
    priority: int = 0
    last_access: int = 0
    stored_at: int = 0


class EmbeddedEngine(RolloutEngine):
    """Rollouts from a Hugging Face causal LM (CPU or CUDA) with prefix-shared summary forks.

    Args:
        model: a ``*ForCausalLM`` whose attention layers dispatch through transformers'
            ``AttentionInterface`` (Qwen2/Llama-style decoders).
        tokenizer: the policy's tokenizer (delimiter ids and EOS come from it).
        prefix_sharing: serve cached prefixes from the radix index of finished traces.
        max_batch_rows: most sampled rows decoded together.
        seed: seed of the sampling generator (a request's ``sampling.seed`` reseeds it).
        kv_budget_tokens: most tokens the stored sequences may hold (None: unbounded); see above.
        kv_blocks: blocks in the KV pool (None: ``kv_memory_fraction`` on CUDA, growing on the CPU).
        kv_memory_fraction: share of the free CUDA memory the pool takes when ``kv_blocks`` is None.
        block_size: tokens per KV block.
        sync_every: decode steps between two read-backs of the sampled tokens.
        cuda_graphs: capture the decode step in CUDA graphs (CUDA only; not for a float64 model).
    """

    reseeds_per_call = True  # generate() reseeds its generator from the first request's seed

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
        kv_blocks: int | None = None,
        kv_memory_fraction: float = 0.4,
        block_size: int = 16,
        sync_every: int = 16,
        cuda_graphs: bool = True,
    ) -> None:
        super().__init__(*self.tokenizer_setup(tokenizer), eos_token_ids=eos_token_ids)
        for name, value in (("max_batch_rows", max_batch_rows), ("block_size", block_size),
                            ("sync_every", sync_every)):  # fmt: skip
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if kv_budget_tokens is not None and kv_budget_tokens < 1:
            raise ValueError(f"kv_budget_tokens must be >= 1 or None, got {kv_budget_tokens}")
        if kv_blocks is not None and kv_blocks < 1:
            raise ValueError(f"kv_blocks must be >= 1 or None, got {kv_blocks}")
        if not 0 < kv_memory_fraction < 1:
            raise ValueError(f"kv_memory_fraction must be in (0, 1), got {kv_memory_fraction}")
        self.model = model.eval()
        self.prefix_sharing = prefix_sharing
        self.max_batch_rows = max_batch_rows
        self.kv_budget_tokens = kv_budget_tokens
        self.kv_blocks = kv_blocks
        self.kv_memory_fraction = kv_memory_fraction
        self.block_size = block_size
        self.sync_every = sync_every
        self.device = next(model.parameters()).device
        # A float64 model (the tests' exact reference) runs the torch attention, which is not graph-safe on CUDA.
        dtype = next(model.parameters()).dtype
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda" and dtype != torch.float64
        self._generator = torch.Generator(device=self.device).manual_seed(seed)
        self._index: RadixIndex[_StoredSequence] = RadixIndex()
        self._stored: dict[tuple[int, ...], _StoredSequence] = {}
        self._stored_tokens = 0
        self._clock = 0
        self._call_started = 0
        self.evicted_sequences = 0
        self._prefill_compute = self._prefill_cache = 0
        self._prefill_by_priority: dict[int, list[int]] = {}
        self._pool: KVPool | None = None
        self._runner: PagedRunner | None = None
        self._reserved = 0  # blocks promised to live rows, not allocated yet

    # Public interface --------------------------------------------------------------------------

    @property
    def cached_sequences(self) -> int:
        """Number of finished sequences held in the prefix index."""
        return len(self._index)

    @property
    def stored_tokens(self) -> int:
        """Tokens held by the stored sequences (what ``kv_budget_tokens`` bounds)."""
        return self._stored_tokens

    @property
    def host_syncs(self) -> int:
        """Reads of device values so far: one per decode window, and on the CPU, where it costs
        nothing, one per step (the eager loop stops once every row finished)."""
        return self._runner.host_syncs if self._runner is not None else 0

    @property
    def read_backs(self) -> int:
        """Decode windows read back so far."""
        return self._runner.read_backs if self._runner is not None else 0

    @property
    def decode_steps(self) -> int:
        """Decode steps run so far (each over every row of its batch)."""
        return self._runner.decode_steps if self._runner is not None else 0

    @property
    def peak_kv_bytes(self) -> int:
        """Most KV pool bytes in use at once so far."""
        return self._pool.peak_used * self._pool.bytes_per_block if self._pool is not None else 0

    def reset_peak_kv(self) -> None:
        """Measure ``peak_kv_bytes`` from the blocks in use now on."""
        if self._pool is not None:
            self._pool.reset_peak()

    def flush_cache(self) -> None:
        for tokens in list(self._stored):
            self._drop(tokens)

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
        """Drop the step's cached traces before the learner trains (the weight sync flushes them
        anyway). The pool itself stays: captured CUDA graphs hold its addresses; size it with
        ``kv_blocks`` or ``kv_memory_fraction`` to leave the learner its memory."""
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
        """Copy ``model``'s weights in place (captured graphs keep reading the same tensors) and
        drop the cached sequences, computed by the old weights."""
        start = time.perf_counter()
        if model is not self.model:
            self.model.load_state_dict(model.state_dict())
        self.flush_cache()
        self.stats.weight_sync_seconds += time.perf_counter() - start

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationOutput]:
        # Reseed once per call, never per request: the rows of one call draw their seeds from one
        # stream, or the same prompt's samples would repeat across requests.
        if requests and requests[0].sampling.seed is not None:
            self._generator.manual_seed(requests[0].sampling.seed)
        self._clock += 1
        self._call_started = self._clock  # what this call stores is newer (release_traces)
        if not requests:
            return []
        self._ensure_runner()
        context = self._runner.max_blocks_per_row * self.block_size
        for request in requests:
            if len(request.input_ids) + request.max_new_tokens > context:
                raise ValueError(
                    f"a request of {len(request.input_ids)} prompt tokens and max_new_tokens {request.max_new_tokens} "
                    f"exceeds the engine's context of {context} tokens (the model's max_position_embeddings)"
                )
        with torch.inference_mode():
            return Scheduler(self, requests).run()

    # The pool and the runner -------------------------------------------------------------------

    def _ensure_runner(self) -> None:
        if self._runner is not None:
            return
        config = self.model.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        num_kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        dtype = next(self.model.parameters()).dtype
        shape = dict(num_layers=config.num_hidden_layers, num_kv_heads=num_kv_heads, head_dim=head_dim,
                     block_size=self.block_size, dtype=dtype, device=self.device)  # fmt: skip
        bytes_per_block = 2 * config.num_hidden_layers * self.block_size * num_kv_heads * head_dim * dtype.itemsize
        num_blocks = self.kv_blocks
        if num_blocks is None and self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            cached = torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
            num_blocks = int(self.kv_memory_fraction * (free + cached)) // bytes_per_block
        growable = num_blocks is None
        self._pool = KVPool(**shape, num_blocks=num_blocks or CPU_START_BLOCKS, growable=growable)
        context = int(getattr(config, "max_position_embeddings", 0) or DEFAULT_CONTEXT)
        self._runner = PagedRunner(self.model, self._pool, max_rows=self.max_batch_rows,
                                   max_blocks_per_row=self._pool.blocks_for(context), ring_steps=self.sync_every,
                                   use_graphs=self.cuda_graphs)  # fmt: skip
        logger.info("embedded engine: KV pool of %d blocks x %d tokens (%.1f MiB)%s", self._pool.num_blocks,
                    self.block_size, self._pool.num_blocks * bytes_per_block / 2**20, ", growing" if growable else "")  # fmt: skip

    def _make_room(self, blocks: int) -> bool:
        """Whether ``blocks`` more blocks can be promised, after growing a growable pool, or else
        evicting cached sequences (lowest priority, least recently used first) as needed."""
        allocator = self._pool.allocator
        if allocator.num_free - self._reserved >= blocks:
            return True
        if self._pool.growable:  # memory is not the bound here: kv_budget_tokens is
            self._pool.grow(self._pool.used_blocks + self._reserved + blocks)
            return True
        for victim in sorted(self._stored.values(), key=lambda seq: (seq.priority, seq.last_access)):
            self._drop(victim.tokens)
            self.evicted_sequences += 1
            if allocator.num_free - self._reserved >= blocks:
                return True
        return False

    # The prefix cache --------------------------------------------------------------------------

    def _match_prefix(self, input_ids: Sequence[int]) -> tuple[_StoredSequence | None, int]:
        """The stored sequence sharing the longest prefix of ``input_ids`` and that prefix's length;
        at least one input token is left to compute (its logits give the first sample). A match
        counts as a use (SGLang's radix cache stamps the matched nodes' access time too): a
        request that waits for a row keeps its prefix ahead of older sequences in the LRU order."""
        if not self.prefix_sharing:
            return None, 0
        stored, cached = self._index.match(input_ids)
        cached = min(cached, len(input_ids) - 1)
        if stored is None or cached <= 0:
            return None, 0
        self._touch(stored)
        return stored, cached

    def _touch(self, stored: _StoredSequence) -> None:
        self._clock += 1
        stored.last_access = self._clock

    def _count_prefill(self, request: GenerationRequest, cached: int) -> None:
        computed = len(request.input_ids) - cached
        self._prefill_compute += computed
        self._prefill_cache += cached
        counts = self._prefill_by_priority.setdefault(request.priority, [0, 0])
        counts[0] += computed
        counts[1] += cached

    def _store(self, request: GenerationRequest, output_ids: Sequence[int], blocks: Sequence[int]) -> None:
        """Keep a finished row's keys/values for ``input + output[:-1]`` (the last token has none)
        by referencing its blocks, then evict down to the budget."""
        tokens = tuple(request.input_ids) + tuple(output_ids[:-1])
        kept = list(blocks[: self._pool.blocks_for(len(tokens))])
        self._pool.allocator.retain(kept)
        self._clock += 1
        if tokens in self._stored:
            self._drop(tokens)
        stored = _StoredSequence(tokens, kept, request.priority, last_access=self._clock, stored_at=self._clock)
        self._index.insert(tokens, stored)
        self._stored[tokens] = stored
        self._stored_tokens += len(tokens)
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
        """Forget the stored sequence of ``tokens``: its index entry, token count and block references."""
        stored = self._stored.pop(tokens)
        self._index.remove(tokens)
        self._stored_tokens -= len(tokens)
        self._pool.allocator.release(stored.blocks)
