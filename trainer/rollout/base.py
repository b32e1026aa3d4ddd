"""The rollout engine interface: think (G traces per prompt), then fork summaries from every cut.

An engine implements one primitive, :meth:`RolloutEngine.generate`, with SGLang's request shape
(token ids in, ``n`` samples out, ``meta_info``-style accounting). The two phases of a rollout
are built on it here, identically for every engine:

- :meth:`RolloutEngine.think` samples G thinking traces per prompt, at most ``b_max`` tokens,
  stopping at ``</think>`` (kept) or EOS (kept);
- :meth:`RolloutEngine.ingest` puts traces that were not sampled here (off-policy data, a
  benchmark's teacher-forced traces) into the prefix cache by one prefill each, as a finished
  trace of ``think`` would be;
- :meth:`RolloutEngine.summarize` cuts every trace at its budget slots (``trainer/budgets.py``)
  and forks ``k * A`` summaries from every distinct cut shared by k slots, from the prompt
  ``prompt + z[:c] + inserted``; the engine serves ``prompt + z[:c]`` from its prefix cache;
- :meth:`RolloutEngine.rollout` does both with the forks of a prompt sent as soon as its traces
  are back (what the trainer uses): traces are still cached when their forks arrive even when the
  step's KV does not fit the cache.

The engine, the reward oracle and the learner exchange the plain dataclasses defined here.
"""

from __future__ import annotations

import abc
import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from trainer.budgets import BudgetSchedule, Delimiters
from trainer.rollout.forks import Fork, deal_summaries, plan_forks

logger = logging.getLogger(__name__)

SUMMARY_MAX_NEW_TOKENS = 118  # the authors' 128 - 10 (ARCHITECTURE.md)
# SGLang request priorities (higher is kept longer under --radix-eviction-policy priority): a
# finished trace is still needed by its forks, a fork's own cached output never is. SGLang keeps a
# finished request's prompt at its priority + 1, so a fork's inserted delimiter sits at
# FORK_PRIORITY + 1: traces must be above that, or a tie with them evicts the older trace first.
TRACE_PRIORITY = 2
FORK_PRIORITY = 0


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings shared by both phases. ``temperature == 0`` is greedy decoding.

    ``min_new_tokens`` suppresses the stop tokens until that many tokens were generated (as
    SGLang's field of the same name); ``seed`` makes sampling reproducible.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    min_new_tokens: int = 0

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.min_new_tokens < 0:
            raise ValueError(f"min_new_tokens must be >= 0, got {self.min_new_tokens}")


@dataclass(frozen=True)
class GenerationRequest:
    """One prompt, ``n`` samples of at most ``max_new_tokens`` that stop at ``stop_token_ids``.

    ``cache_output`` asks an engine that manages its own prefix cache to keep the finished
    sequences (the traces that summaries fork from); SGLang's radix cache keeps everything.
    ``routing_key`` sends requests with the same key to the same data-parallel server (the think
    request of a prompt and all its forks share the prompt's key). ``priority`` is SGLang's request
    priority: under ``--radix-eviction-policy priority`` the cache evicts the sequences of
    lower-priority requests first (traces are sent above their forks, so a fork's output goes before
    a trace that other forks still need).
    """

    input_ids: tuple[int, ...]
    n: int
    max_new_tokens: int
    stop_token_ids: tuple[int, ...]
    sampling: SamplingParams
    cache_output: bool = False
    routing_key: int | None = None
    priority: int = 0

    def __post_init__(self) -> None:
        if len(self.input_ids) == 0:
            raise ValueError("a generation request needs at least one input token")
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclass
class GenerationOutput:
    """The ``n`` samples of one request, with SGLang's per-sample accounting.

    ``finish_reasons[i]`` is ``"stop"`` (a stop token, kept as the last output id) or ``"length"``;
    ``cached_tokens[i]`` is ``meta_info.cached_tokens``, the prompt tokens served from cache.
    ``prefilled_tokens`` is the number of prompt tokens the engine actually computed for the
    request (its n samples share one prefill). ``output_logprobs[i][j]``, where the engine reports
    them, is the log-probability of ``output_ids[i][j]`` under the model's distribution at the
    request's temperature (``log_softmax(logits / T)``; T = 1 for greedy), before top-p and
    ``min_new_tokens`` masking: what the learner's ``TreePolicy.logprobs`` computes for that token.
    """

    output_ids: list[list[int]]
    finish_reasons: list[str]
    prompt_tokens: int
    cached_tokens: list[int]
    prefilled_tokens: int
    output_logprobs: list[list[float]] | None = None


@dataclass
class PhaseStats:
    """Token and time accounting of one phase.

    ``prompt_tokens``/``cached_tokens`` sum over every returned sample (``meta_info``);
    ``prefilled_tokens`` counts each request's prefill once. ``server_prefill_compute`` and
    ``server_prefill_cache`` are the engine's own counters of prompt tokens computed and served
    from its prefix cache during the phase (SGLang's ``sglang:realtime_tokens_total`` on
    ``/metrics``; None where the server does not expose them): for ``n > 1`` SGLang reports
    ``cached_tokens = prompt_len - 1`` for every sample whether or not the prompt was cached, so only
    the counters tell a hit from a miss.
    """

    requests: int = 0
    samples: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    prefilled_tokens: int = 0
    request_prompt_tokens: int = 0  # prompt tokens once per request (the n samples share a prompt)
    generated_tokens: int = 0
    seconds: float = 0.0
    server_prefill_compute: float | None = None
    server_prefill_cache: float | None = None

    def add_counters(self, before: dict[str, float] | None, after: dict[str, float] | None) -> None:
        if before is None or after is None:
            return
        compute = after["prefill_compute"] - before["prefill_compute"]
        cache = after["prefill_cache"] - before["prefill_cache"]
        self.server_prefill_compute = (self.server_prefill_compute or 0.0) + compute
        self.server_prefill_cache = (self.server_prefill_cache or 0.0) + cache

    def add(self, outputs: Sequence[GenerationOutput], seconds: float) -> None:
        for out in outputs:
            self.requests += 1
            self.samples += len(out.output_ids)
            self.prompt_tokens += out.prompt_tokens * len(out.output_ids)
            self.cached_tokens += sum(out.cached_tokens)
            self.prefilled_tokens += out.prefilled_tokens
            self.request_prompt_tokens += out.prompt_tokens
            self.generated_tokens += sum(len(ids) for ids in out.output_ids)
        self.seconds += seconds

    @property
    def computed_prefill_tokens(self) -> float:
        """Prompt tokens the engine actually computed in the phase: its counters when it has them
        (per-request ``prefilled_tokens`` from ``meta_info`` undercounts misses for ``n > 1``)."""
        return self.server_prefill_compute if self.server_prefill_compute is not None else self.prefilled_tokens

    @property
    def cache_hit_share(self) -> float:
        """Prompt tokens served from cache / all prompt tokens processed, from the engine's counters
        when it has them, else from the per-sample ``cached_tokens`` (0 when there were none)."""
        if self.server_prefill_compute is not None and self.server_prefill_cache is not None:
            total = self.server_prefill_compute + self.server_prefill_cache
            return self.server_prefill_cache / total if total else 0.0
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


@dataclass
class RolloutStats:
    """Accounting per phase since the last :meth:`RolloutEngine.reset_stats`."""

    think: PhaseStats = field(default_factory=PhaseStats)
    ingest: PhaseStats = field(default_factory=PhaseStats)
    summarize: PhaseStats = field(default_factory=PhaseStats)
    weight_sync_seconds: float = 0.0
    # An overlapped rollout (:meth:`RolloutEngine.rollout`): ``think`` and ``summarize`` get its
    # samples and split its wall time (until the last trace is back / the rest), while the
    # engine's prefill counters, which cannot tell the overlapping phases apart, go here whole.
    rollout: PhaseStats = field(default_factory=PhaseStats)

    @classmethod
    def combine(cls, parts: Sequence[RolloutStats]) -> RolloutStats:
        """The accounting of engines that ran side by side (one per rank): counts add up, times are
        the slowest engine's (wall time), server counters add up where every engine has them."""
        combined = cls()
        for phase in ("think", "ingest", "summarize", "rollout"):
            for f in dataclasses.fields(PhaseStats):
                values = [getattr(getattr(part, phase), f.name) for part in parts]
                if f.name == "seconds":
                    value = max(values, default=0.0)
                elif f.name.startswith("server_"):
                    value = None if not values or None in values else sum(values)
                else:
                    value = sum(values)
                setattr(getattr(combined, phase), f.name, value)
        combined.weight_sync_seconds = max((p.weight_sync_seconds for p in parts), default=0.0)
        return combined


@dataclass
class ThinkingBatch:
    """G thinking traces per prompt; the traces of one prompt are consecutive (n = p * G + g).

    Attributes:
        prompt_ids: ``[N]`` prompt token lists (repeated for the G traces of a prompt).
        thinking_ids: ``[N]`` trace token lists z; a closed trace ends in ``</think>``, one that
            stopped at EOS ends in EOS.
        finish: ``[N]`` ``"think_end"`` | ``"eos"`` | ``"length"``.
        group_size: G.
    """

    prompt_ids: list[list[int]]
    thinking_ids: list[list[int]]
    finish: list[str]
    group_size: int

    @property
    def num_traces(self) -> int:
        return len(self.thinking_ids)

    @classmethod
    def concatenate(cls, batches: Sequence[ThinkingBatch]) -> ThinkingBatch:
        """The traces of ``batches`` one after the other (the prompts of each, in order)."""
        if not batches or len({b.group_size for b in batches}) != 1:
            raise ValueError(f"need >= 1 batch of one group size, got {[b.group_size for b in batches]}")
        return cls(
            [ids for b in batches for ids in b.prompt_ids],
            [ids for b in batches for ids in b.thinking_ids],
            [f for b in batches for f in b.finish],
            batches[0].group_size,
        )

    @property
    def thinking_lens(self) -> list[int]:
        return [len(z) for z in self.thinking_ids]


@dataclass
class SummaryBatch:
    """Everything :func:`anytime_kernels.pack_response_trees` takes, in its argument order.

    Attributes:
        prompt_ids: ``[N]`` prompt token lists.
        thinking_ids: ``[N]`` trace token lists.
        cut_lens: ``[N, S]`` int64 cut of every slot, ``min(b_s, L_n)``.
        inserted_ids: ``[N][D_n]`` inserted delimiter ids per distinct cut, in cut order.
        summary_ids: ``[N][S][A]`` summary token lists (EOS kept when sampled).
        summary_finish: ``[N][S][A]`` ``"stop"`` | ``"length"``.
    """

    prompt_ids: list[list[int]]
    thinking_ids: list[list[int]]
    cut_lens: torch.Tensor
    inserted_ids: list[list[tuple[int, ...]]]
    summary_ids: list[list[list[list[int]]]]
    summary_finish: list[list[list[str]]]

    @classmethod
    def concatenate(cls, batches: Sequence[SummaryBatch]) -> SummaryBatch:
        """The traces of ``batches`` one after the other."""
        if not batches:
            raise ValueError("need at least one batch to concatenate")
        return cls(
            [ids for b in batches for ids in b.prompt_ids],
            [ids for b in batches for ids in b.thinking_ids],
            torch.cat([b.cut_lens for b in batches]),
            [ids for b in batches for ids in b.inserted_ids],
            [ids for b in batches for ids in b.summary_ids],
            [f for b in batches for f in b.summary_finish],
        )

    def pack_arguments(self) -> tuple:
        """``(prompt_ids, thinking_ids, cut_lens, inserted_ids, summary_ids)`` for tree packing."""
        inserted = [[list(ids) for ids in per_trace] for per_trace in self.inserted_ids]
        return self.prompt_ids, self.thinking_ids, self.cut_lens, inserted, self.summary_ids


def prompt_key(prompt: Sequence[int]) -> int:
    """Routing key of a prompt (stable across processes: hashes of int tuples are not salted)."""
    return hash(tuple(int(t) for t in prompt))


class RolloutEngine(abc.ABC):
    """Base of every engine: subclasses implement ``generate``, ``update_weights`` and ``flush_cache``.

    Args:
        delimiters: the inserted delimiters encoded with the policy's tokenizer.
        eos_token_id: the policy's end-of-sequence id.
    """

    @staticmethod
    def tokenizer_setup(tokenizer) -> tuple[Delimiters, int]:
        """``(delimiters, eos_token_id)`` of a policy's tokenizer, for a subclass's ``__init__``."""
        eos = tokenizer.eos_token_id
        if eos is None:
            raise ValueError("the tokenizer has no eos_token_id; the engine needs one to stop summaries")
        return Delimiters.from_tokenizer(tokenizer), int(eos)

    def __init__(self, delimiters: Delimiters, eos_token_id: int, *, eos_token_ids: Sequence[int] = ()) -> None:
        """``eos_token_id``: the tokenizer's EOS; ``eos_token_ids``: every other id that ends a
        sequence for this model (Qwen-style configs name two). SGLang stops at all of them, so the
        engines stop at, and label as ``"eos"``, the whole set."""
        if not isinstance(eos_token_id, int) or eos_token_id < 0:
            raise ValueError(f"eos_token_id must be a non-negative int, got {eos_token_id!r}")
        eos_set = tuple(dict.fromkeys([eos_token_id, *(int(t) for t in eos_token_ids)]))
        if delimiters.think_end_id in eos_set:
            raise ValueError(f"the EOS ids {list(eos_set)} include the </think> id {delimiters.think_end_id}")
        self.delimiters = delimiters
        self.eos_token_id = eos_token_id
        self.eos_token_ids = eos_set
        self.stats = RolloutStats()

    @abc.abstractmethod
    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationOutput]:
        """One output per request, in request order; raises rather than drop a request."""

    def prefill_counters(self) -> dict[str, float] | None:
        """Cumulative prompt tokens the engine computed (``prefill_compute``) and served from its
        prefix cache (``prefill_cache``), or None when it cannot tell."""
        return None

    @abc.abstractmethod
    def update_weights(self, model: torch.nn.Module) -> None:
        """Load the policy's current weights into the engine and invalidate its prefix cache."""

    @abc.abstractmethod
    def flush_cache(self) -> None:
        """Drop every cached prefix."""

    # Whether generate() restarts one random stream from a request's seed on every call (the
    # embedded engine) rather than seeding each request on its own (SGLang's sampling_seed).
    reseeds_per_call = False

    def release_traces(self, traces: ThinkingBatch) -> None:
        """The forks of ``traces`` are served: an engine that keeps finished traces for their forks
        may drop them (:meth:`rollout` calls this window by window, so an engine's stored traces
        stay within about two windows). Nothing to do for a server's own LRU cache."""
        return None

    def release_memory(self) -> None:
        """Free accelerator memory while the learner trains (an engine colocated on the learner's GPU);
        the next :meth:`update_weights` takes it back. Nothing to do for most engines."""
        return None

    def reset_stats(self) -> RolloutStats:
        """Return the accounting so far and start a fresh one."""
        stats, self.stats = self.stats, RolloutStats()
        return stats

    def think(
        self,
        prompts: Sequence[Sequence[int]],
        group_size: int,
        max_tokens: int,
        sampling: SamplingParams,
    ) -> ThinkingBatch:
        """Sample ``group_size`` traces of at most ``max_tokens`` (b_max) tokens per prompt."""
        requests = self._think_requests(prompts, group_size, max_tokens, sampling)
        start, counters = time.perf_counter(), self.prefill_counters()
        outputs = self.generate(requests)
        self.stats.think.add(outputs, time.perf_counter() - start)
        self.stats.think.add_counters(counters, self.prefill_counters())
        return self._thinking_batch(requests, outputs, group_size)

    def _think_requests(
        self, prompts: Sequence[Sequence[int]], group_size: int, max_tokens: int, sampling: SamplingParams
    ) -> list[GenerationRequest]:
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        stop_ids = (self.delimiters.think_end_id, *self.eos_token_ids)
        return [
            GenerationRequest(
                input_ids=tuple(int(t) for t in prompt),
                n=group_size,
                max_new_tokens=max_tokens,
                stop_token_ids=stop_ids,
                sampling=sampling,
                cache_output=True,
                routing_key=prompt_key(prompt),
                priority=TRACE_PRIORITY,
            )
            for prompt in prompts
        ]

    def _thinking_batch(
        self, requests: Sequence[GenerationRequest], outputs: Sequence[GenerationOutput], group_size: int
    ) -> ThinkingBatch:
        prompt_ids, thinking_ids, finish = [], [], []
        for request, out in zip(requests, outputs, strict=True):
            for trace in out.output_ids:
                prompt_ids.append(list(request.input_ids))
                thinking_ids.append(list(trace))
                finish.append(self._trace_finish(trace))
        return ThinkingBatch(prompt_ids, thinking_ids, finish, group_size)

    def ingest(
        self,
        prompts: Sequence[Sequence[int]],
        traces: Sequence[Sequence[int]],
        group_size: int,
    ) -> ThinkingBatch:
        """Cache finished traces given as tokens (teacher-forced), and return them as a batch.

        Each ``prompt + z`` is prefilled once by a request for one greedy token that keeps its
        output (SGLang's radix cache keeps every request), so :meth:`summarize` forks from the
        cache exactly as after :meth:`think`. Traces follow ``think``'s shape: ``group_size``
        consecutive traces per prompt, each stopped at its first ``</think>`` or EOS if any.

        Args:
            prompts: ``[P]`` prompt token lists.
            traces: ``[P * group_size]`` trace token lists, those of prompt p at
                ``p * group_size .. (p + 1) * group_size - 1``.
            group_size: G, traces per prompt.
        """
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        if len(traces) != len(prompts) * group_size:
            raise ValueError(
                f"{len(traces)} traces for {len(prompts)} prompts with group_size {group_size}; "
                f"expected {len(prompts) * group_size}"
            )
        stop_ids = {self.delimiters.think_end_id, *self.eos_token_ids}
        prompt_ids = [[int(t) for t in prompts[n // group_size]] for n in range(len(traces))]
        thinking_ids = [[int(t) for t in trace] for trace in traces]
        for n, trace in enumerate(thinking_ids):
            if not trace:
                raise ValueError(f"trace {n} is empty; a finished trace has at least one token")
            early = [i for i, token in enumerate(trace[:-1]) if token in stop_ids]
            if early:
                raise ValueError(
                    f"trace {n} has a stop token (</think> or EOS) at position {early[0]} before its end; "
                    "a finished trace stops at its first one"
                )
        requests = [
            GenerationRequest(
                input_ids=tuple(prompt + trace),
                n=1,
                max_new_tokens=1,
                stop_token_ids=(),
                sampling=SamplingParams(temperature=0),
                cache_output=True,
                routing_key=prompt_key(prompt),
                priority=TRACE_PRIORITY,
            )
            for prompt, trace in zip(prompt_ids, thinking_ids, strict=True)
        ]
        start, counters = time.perf_counter(), self.prefill_counters()
        outputs = self.generate(requests)
        self.stats.ingest.add(outputs, time.perf_counter() - start)
        self.stats.ingest.add_counters(counters, self.prefill_counters())
        finish = [self._trace_finish(trace) for trace in thinking_ids]
        return ThinkingBatch(prompt_ids, thinking_ids, finish, group_size)

    def summarize(
        self,
        traces: ThinkingBatch,
        schedule: BudgetSchedule,
        num_summaries: int,
        sampling: SamplingParams,
        max_new_tokens: int = SUMMARY_MAX_NEW_TOKENS,
    ) -> SummaryBatch:
        """Fork ``num_summaries`` (A) summaries per budget slot from every distinct cut of every trace."""
        forks, requests = self._fork_requests(traces, 0, schedule, num_summaries, sampling,
                                              max_new_tokens)  # fmt: skip
        start, counters = time.perf_counter(), self.prefill_counters()
        outputs = self.generate(requests)
        self.stats.summarize.add(outputs, time.perf_counter() - start)
        self.stats.summarize.add_counters(counters, self.prefill_counters())
        return self._summary_batch(traces, schedule, forks, outputs, num_summaries)

    def rollout(
        self,
        prompts: Sequence[Sequence[int]],
        group_size: int,
        max_tokens: int,
        schedule: BudgetSchedule,
        num_summaries: int,
        sampling: SamplingParams,
        max_new_tokens: int = SUMMARY_MAX_NEW_TOKENS,
        *,
        window: int = 0,
    ) -> tuple[ThinkingBatch, SummaryBatch]:
        """:meth:`think` then :meth:`summarize`, overlapped: the forks of a prompt go out with the
        next prompts' think requests instead of after every trace of the step.

        Here (one ``generate`` call at a time, as the embedded engine serves) prompts think in
        windows of ``window`` (0: all at once, which is ``think`` then ``summarize`` exactly); each
        ``generate`` call carries one window's think requests and the previous window's forks, so
        summaries of finished prompts decode in the same batches as the next prompts' traces, and
        a trace waits for its forks through one window only. Engines that serve requests
        concurrently override this to send each prompt's forks the moment its traces are back.

        Once a window's forks are served, :meth:`release_traces` lets the engine drop its traces.
        On an engine that reseeds its one random stream per ``generate`` call
        (``reseeds_per_call``), a ``sampling.seed`` seeds the first window and later windows
        continue that stream (else every window would sample with the same draws); engines that
        seed each request keep the seed on every request.

        Returns the same ``(ThinkingBatch, SummaryBatch)`` as the two calls.
        """
        if window < 0:
            raise ValueError(f"window must be >= 0 prompts (0: all), got {window}")
        think_requests = self._think_requests(prompts, group_size, max_tokens, sampling)
        size = window or max(len(think_requests), 1)
        windows = [list(range(i, min(i + size, len(think_requests)))) for i in range(0, len(think_requests), size)]
        if len(windows) > 1 and sampling.seed is not None and self.reseeds_per_call:
            sampling = dataclasses.replace(sampling, seed=None)  # what the requests after the first call carry
            think_requests[size:] = [dataclasses.replace(r, sampling=sampling) for r in think_requests[size:]]
        served: ThinkingBatch | None = None  # the traces whose forks the current call serves
        think_outputs: list[GenerationOutput | None] = [None] * len(think_requests)
        forks: list[Fork] = []
        fork_outputs: list[GenerationOutput] = []
        pending: tuple[list[Fork], list[GenerationRequest]] = ([], [])
        rollout_start, counters = time.perf_counter(), self.prefill_counters()
        for step in range(len(windows) + 1):
            batch = [think_requests[p] for p in windows[step]] if step < len(windows) else []
            start = time.perf_counter()
            outputs = self.generate(batch + pending[1])
            seconds = time.perf_counter() - start
            self.stats.think.add(outputs[: len(batch)], seconds if batch else 0.0)
            self.stats.summarize.add(outputs[len(batch) :], 0.0 if batch else seconds)
            forks += pending[0]
            fork_outputs += outputs[len(batch) :]
            if served is not None:
                self.release_traces(served)
            for p, out in zip(windows[step] if batch else [], outputs[: len(batch)], strict=True):
                think_outputs[p] = out
            if batch:
                served = self._thinking_batch(batch, outputs[: len(batch)], group_size)
                first = windows[step][0] * group_size
                pending = self._fork_requests(served, first, schedule, num_summaries, sampling,
                                              max_new_tokens)  # fmt: skip
            else:
                pending, served = ([], []), None
        self.stats.rollout.add([], time.perf_counter() - rollout_start)
        self.stats.rollout.add_counters(counters, self.prefill_counters())
        traces = self._thinking_batch(think_requests, think_outputs, group_size)
        return traces, self._summary_batch(traces, schedule, forks, fork_outputs, num_summaries)

    def _fork_requests(
        self,
        traces: ThinkingBatch,
        first_trace: int,
        schedule: BudgetSchedule,
        num_summaries: int,
        sampling: SamplingParams,
        max_new_tokens: int,
    ) -> tuple[list[Fork], list[GenerationRequest]]:
        """The forks of the traces of ``traces`` (numbered from ``first_trace`` in the step), cuts
        ascending per trace, and their requests."""
        if num_summaries < 1:
            raise ValueError(f"num_summaries must be >= 1, got {num_summaries}")
        cut_lens = schedule.cuts(traces.thinking_lens)
        forks = [
            dataclasses.replace(fork, trace=fork.trace + first_trace)
            for fork in plan_forks(traces.prompt_ids, traces.thinking_ids, cut_lens, self.delimiters, num_summaries)
        ]
        requests = [
            GenerationRequest(
                input_ids=fork.input_ids,
                n=fork.num_samples,
                max_new_tokens=max_new_tokens,
                stop_token_ids=self.eos_token_ids,
                sampling=sampling,
                routing_key=prompt_key(traces.prompt_ids[fork.trace - first_trace]),
                priority=FORK_PRIORITY,
            )
            for fork in forks
        ]
        return forks, requests

    def _summary_batch(
        self,
        traces: ThinkingBatch,
        schedule: BudgetSchedule,
        forks: Sequence[Fork],
        outputs: Sequence[GenerationOutput],
        num_summaries: int,
    ) -> SummaryBatch:
        cut_lens = schedule.cuts(traces.thinking_lens)
        summary_ids, summary_finish = deal_summaries(forks, outputs, cut_lens, num_summaries)
        inserted_ids = [[] for _ in range(traces.num_traces)]
        for fork in sorted(forks, key=lambda fork: (fork.trace, fork.cut)):
            inserted_ids[fork.trace].append(fork.inserted_ids)
        return SummaryBatch(
            prompt_ids=[list(p) for p in traces.prompt_ids],
            thinking_ids=[list(z) for z in traces.thinking_ids],
            cut_lens=cut_lens,
            inserted_ids=inserted_ids,
            summary_ids=summary_ids,
            summary_finish=summary_finish,
        )

    def _trace_finish(self, trace: Sequence[int]) -> str:
        if trace and trace[-1] == self.delimiters.think_end_id:
            return "think_end"
        if trace and trace[-1] in self.eos_token_ids:
            return "eos"
        return "length"
