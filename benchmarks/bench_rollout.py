"""Summary phase of the embedded engine: forks served from the traces' cache (`shared`) against
re-prefilling every summary prompt (`unshared`), at S=4 budget slots and A=4 summaries per slot.

Proportions follow the paper's workload, scaled to a CPU. The policy is a random Qwen2 built
from a config here (the test fixtures' character vocabulary): 2 layers, hidden 768, MLP 3072,
4 query heads and 1 key/value head of 64, so weights per layer (7.6M parameters) against the
key/value cache per token (128 values) sit near DeepSeek-R1-Distill-Qwen-1.5B's 47M against
512 (the small model is, if anything, the more decode-heavy of the two). Traces are long next
to the 118-token summaries, as in the paper (b_max up to 8000): lengths drawn between 3/4 b_max
and b_max, closed with `</think>` unless they reach b_max. Sampling that many thinking tokens on
a CPU would take longer than the benchmark itself, so the traces are teacher-forced: random
token ids put into the shared engine's cache by ``RolloutEngine.ingest`` (one prefill each, as
a finished trace sits in SGLang's radix cache); the summary phase does not depend on how the
trace tokens were chosen. Each trace yields 16 summary rows: 4 traces decode 64 rows together
(2 traces, 32 rows in the quick case, b_max 2048, which runs in about a minute and is too short for the speedup
target). The speedup grows with trace length: on a CPU a batched decode step costs about as much
per row as a prefilled token, plus attention over the whole (padded) context, so the 16 x 118
decode row-steps of a trace are set against the 2.5 L prompt tokens its forks would re-prefill.

Both providers summarize the same traces with the same seed and sampling (temperature 1, at most
118 new tokens), so they decode the same tokens (checked) and differ only in the prompt tokens
they prefill. Metrics: prompt tokens computed by the summary phase (`summary_prefill_tokens`),
its wall time (`summary_time_ms`, the median of runs that alternate between the providers, so
load on a shared machine hits both alike) and, for `shared`, the share of summary-prompt tokens
served from cache (`cache_hit_share`) and the speedup over `unshared`. Targets: cache_hit_share
>= 0.95 and speedup >= 3x. CPU runs use one torch thread (the shared CI machine makes more
threads slower and noisier).

Cases `kv_half_*` / `kv_full_*`: streaming forks against waiting for every trace when the cache
holds half of the step's traces (`kv_half`) or all of them (`kv_full`), for the embedded engine
(`*_embedded`) and for the SGLang client against the SGLang-protocol test server over HTTP
(`*_http`, the same engine behind it). 8 prompts x G=2 sampled traces of exactly b_max tokens
(min_new_tokens = b_max) from 2-character prompts, S=4 slots x A=2 summaries of at most 16 tokens.
Providers: `wait_all` (think, then summarize) and `streaming` (``RolloutEngine.rollout``, 2
prompts thinking at once while the forks of finished prompts run). Metrics: `reprefilled_share`
(fork prompt tokens prefilled beyond the inserted delimiter / all fork prompt tokens, from the
engine's own prefill counters of the fork requests), `summary_s` (the summary phase: all of it for
`wait_all`, the part after the last trace is back for `streaming`), `rollout_s` and
`evicted_sequences`. Goal: at half the step's KV, streaming under 5% while wait-for-all exceeds
40%; at full budget both about 0 (only a trace's last sampled token, which has no keys/values yet,
is recomputed by the fork at its end).

Case `engine_dtype_*` (``rollout.dtype``): the thinking phase of the embedded engine holding fp32
weights against their bf16 copy (see ``engine_dtype_case``).

With `--device cuda` and `sglang` installed, case `sglang_server_*` runs the summary phase against a
real `sglang.launch_server` and reports the server's own prefill counters (`server_prefill_compute`,
`server_prefill_cache` from `/metrics`) next to its `cache_hit_share`.
"""

from __future__ import annotations

import importlib.util
import statistics
import time
from pathlib import Path

import torch
from common import Results, environment_line, parse_args, synchronize

from trainer.budgets import BudgetSchedule
from trainer.rollout import EmbeddedEngine, SamplingParams, SGLangEngine
from trainer.rollout.base import FORK_PRIORITY
from trainer.rollout.testing import ProtocolServer
from trainer.tiny import FIRST_CHARACTER_ID, char_tokenizer, tiny_causal_lm

NUM_SLOTS, NUM_SUMMARIES = 4, 4
SUMMARY_SAMPLING = SamplingParams(temperature=1.0, seed=1)


def benchmark_policy(vocab_size: int, device: str) -> torch.nn.Module:
    model = tiny_causal_lm(
        vocab_size, hidden_size=768, intermediate_size=3072, num_layers=2, num_heads=4, num_kv_heads=1, head_dim=64
    )
    return model.to(device)


def teacher_forced_traces(num_traces: int, b_max: int, tokenizer, seed: int) -> list[list[int]]:
    """Random trace token ids, lengths in [3/4 b_max, b_max]; a trace shorter than b_max closes its thinking."""
    generator = torch.Generator().manual_seed(seed)
    think_end = tokenizer.convert_tokens_to_ids("</think>")
    first_plain = FIRST_CHARACTER_ID
    traces = []
    for _ in range(num_traces):
        length = int(torch.randint(b_max * 3 // 4, b_max + 1, (), generator=generator))
        trace = torch.randint(first_plain, len(tokenizer), (length,), generator=generator).tolist()
        if length < b_max:
            trace[-1] = think_end
        traces.append(trace)
    return traces


def main() -> None:
    args = parse_args("rollout", __doc__)
    if args.device == "cpu":
        torch.set_num_threads(1)
    print(environment_line(args.device))
    # (prompts, traces per prompt, b_max, timed runs per provider)
    cases = [(1, 2, 2048, 1)] if args.quick else [(2, 2, 4096, 2), (2, 2, 8000, 2)]
    tokenizer = char_tokenizer()
    model = benchmark_policy(len(tokenizer), args.device)
    results = Results("rollout", args.out)
    for num_prompts, group_size, b_max, repeat in cases:
        case = f"P{num_prompts}_G{group_size}_bmax{b_max}_S{NUM_SLOTS}_A{NUM_SUMMARIES}"
        prompts = [
            tokenizer.encode(f"Problem {i}: what is {i} + {i}?", add_special_tokens=False) for i in range(num_prompts)
        ]
        engines = {
            "shared": EmbeddedEngine(model, tokenizer, max_batch_rows=256),
            "unshared": EmbeddedEngine(model, tokenizer, max_batch_rows=256, prefix_sharing=False),
        }
        traces = engines["shared"].ingest(
            prompts, teacher_forced_traces(num_prompts * group_size, b_max, tokenizer, seed=0), group_size
        )
        schedule = BudgetSchedule(b_max, NUM_SLOTS)
        results.add(case, "shared", "mean_trace_tokens", sum(traces.thinking_lens) / traces.num_traces, "tokens")
        times: dict[str, list[float]] = {name: [] for name in engines}
        summaries = {}
        # The first round warms up and records the accounting; the next ones are timed.
        for round_index in range(1 + repeat):
            for name, engine in engines.items():
                engine.reset_stats()
                synchronize(args.device)
                start = time.perf_counter()
                batch = engine.summarize(traces, schedule, NUM_SUMMARIES, SUMMARY_SAMPLING)
                synchronize(args.device)
                if round_index == 0:
                    summaries[name] = batch.summary_ids
                    stats = engine.reset_stats().summarize
                    results.add(case, name, "summary_prefill_tokens", stats.computed_prefill_tokens, "tokens")
                    results.add(case, name, "summary_generated_tokens", stats.generated_tokens, "tokens")
                    if name == "shared":
                        results.add(case, name, "cache_hit_share", stats.cache_hit_share, "fraction")
                else:
                    times[name].append((time.perf_counter() - start) * 1e3)
        # Prefill from cache and from scratch round differently, so a sampled token could flip:
        # record whether both providers really decoded the same summaries.
        results.add(case, "shared", "same_summaries_as_unshared", summaries["shared"] == summaries["unshared"], "bool")
        for name in engines:
            results.add(case, name, "summary_time_ms", statistics.median(times[name]), "ms")
        speedup = statistics.median(times["unshared"]) / statistics.median(times["shared"])
        results.add(case, "shared", "speedup_vs_unshared", speedup, "x")
    kv_budget_cases(results, model, tokenizer, b_max=256 if args.quick else 512)
    if args.device == "cuda" and importlib.util.find_spec("sglang") is not None:
        real_server_case(results, model, tokenizer, b_max=1024 if args.quick else 4096)
    else:
        print("sglang: not installed or no CUDA device; no real-server case")
    del model, engines
    engine_dtype_case(results, tokenizer, args.device, args.quick)
    results.finish(args.out)


def real_server_case(results: Results, model, tokenizer, b_max: int) -> None:
    """The same summary phase against a real ``sglang.launch_server`` (the benchmark policy saved
    to a temporary folder), with the server's own prefill counters (``--enable-metrics``)."""
    import socket
    import tempfile

    from trainer.rollout import SGLangServerProcess

    num_prompts, group_size = 2, 2
    prompts = [
        tokenizer.encode(f"Problem {i}: what is {i} + {i}?", add_special_tokens=False) for i in range(num_prompts)
    ]
    with tempfile.TemporaryDirectory() as folder, socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        with SGLangServerProcess(folder, port, mem_fraction_static=0.3, startup_timeout_s=300,
                                 log_path=Path(folder) / "server.log") as server:  # fmt: skip
            engine = SGLangEngine(server.url, tokenizer, timeout_s=600)
            traces = engine.ingest(
                prompts, teacher_forced_traces(num_prompts * group_size, b_max, tokenizer, seed=0), group_size
            )
            case = f"sglang_server_P{num_prompts}_G{group_size}_bmax{b_max}_S{NUM_SLOTS}_A{NUM_SUMMARIES}"
            engine.reset_stats()
            start = time.perf_counter()
            engine.summarize(traces, BudgetSchedule(b_max, NUM_SLOTS), NUM_SUMMARIES, SUMMARY_SAMPLING)
            seconds = time.perf_counter() - start
            stats = engine.reset_stats().summarize
            results.add(case, "sglang", "summary_time_ms", seconds * 1e3, "ms")
            for name in ("server_prefill_compute", "server_prefill_cache"):
                value = getattr(stats, name)
                results.add(case, "sglang", name, float("nan") if value is None else value, "tokens")
            results.add(case, "sglang", "cache_hit_share", stats.cache_hit_share, "fraction")


def engine_dtype_case(results: Results, tokenizer, device: str, quick: bool) -> None:
    """``rollout.dtype``: the embedded engine's thinking phase from fp32 weights against their bf16
    copy (RoPE buffers fp32, as the trainer makes it), same prompts, seed and lengths
    (``min_new_tokens`` = the cap). On CUDA the policy has DeepSeek-R1-Distill-Qwen-1.5B's shape (28
    layers, hidden 1536, MLP 8960, 12/2 heads of 128, vocabulary 151,936; random weights), where a
    decode step reads every weight once; on a CPU the 2 x 768 benchmark policy. Metrics: weight
    memory, think wall time (median), sampled tokens per second, and on CUDA the peak memory the
    think phase adds (its K/V cache and activations)."""
    from trainer.components import cast_parameters

    cuda = device == "cuda"
    num_prompts, group_size = (4 if quick else 8), 8
    max_tokens, repeat = (128, 1) if quick else (256, 2)
    with torch.device(device):
        if cuda:
            source = tiny_causal_lm(151936, hidden_size=1536, intermediate_size=8960, num_layers=28, num_heads=12,
                                    num_kv_heads=2, head_dim=128, tie_word_embeddings=False)  # fmt: skip
        else:
            source = benchmark_policy(len(tokenizer), device)
    prompts = [
        tokenizer.encode(f"Problem {i}: what is {i} + {i}?", add_special_tokens=False) for i in range(num_prompts)
    ]
    sampling = SamplingParams(temperature=1.0, min_new_tokens=max_tokens, seed=0)
    medians: dict[str, float] = {}
    case = f"engine_dtype_{'qwen1.5b_shape' if cuda else 'cpu_2x768'}_P{num_prompts}_G{group_size}_tokens{max_tokens}"
    for name, dtype in (("float32", None), ("bfloat16", torch.bfloat16)):
        model = source
        if dtype is not None:
            cast_parameters(model, dtype)  # the fp32 run is done: cast the one copy in place
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        results.add(case, name, "weight_mib", weight_bytes / 2**20, "MiB")
        engine = EmbeddedEngine(model, tokenizer, max_batch_rows=num_prompts * group_size, seed=0)
        seconds, tokens = [], 0
        for round_index in range(1 + repeat):
            engine.flush_cache()
            synchronize(device)
            if cuda:
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            start = time.perf_counter()
            traces = engine.think(prompts, group_size, max_tokens, sampling)
            synchronize(device)
            if round_index == 0:  # warm-up (CUDA: kernels, allocator)
                tokens = sum(traces.thinking_lens)
                if cuda:
                    results.add(case, name, "think_peak_mib", (torch.cuda.max_memory_allocated() - base) / 2**20, "MiB")
                continue
            seconds.append(time.perf_counter() - start)
        think_s = statistics.median(seconds)
        results.add(case, name, "think_s", think_s, "s")
        results.add(case, name, "sampled_tokens_per_s", tokens / think_s, "tokens/s")
        medians[name] = think_s
        del engine
    results.add(case, "bfloat16", "speedup_vs_float32", medians["float32"] / medians["bfloat16"], "x")


def kv_budget_cases(results: Results, model, tokenizer, b_max: int) -> None:
    """Streaming forks vs wait-for-all under a KV budget of half / all the step's traces."""
    num_prompts, group_size, slots, summaries, window = 8, 2, 4, 2, 2
    prompts = [tokenizer.encode(f"q{i}", add_special_tokens=False) for i in range(num_prompts)]
    sampling = SamplingParams(temperature=1.0, min_new_tokens=b_max)
    schedule = BudgetSchedule(b_max, slots)
    step_tokens = sum(group_size * (len(p) + b_max - 1) for p in prompts)  # stored per trace: input + output - 1
    for budget_name, budget in (("kv_half", step_tokens // 2), ("kv_full", step_tokens)):
        for transport in ("embedded", "http"):
            case = f"{budget_name}_{transport}_P{num_prompts}_G{group_size}_bmax{b_max}"
            for provider in ("wait_all", "streaming"):
                engine = EmbeddedEngine(model, tokenizer, max_batch_rows=256, kv_budget_tokens=budget, seed=0)
                server = ProtocolServer(engine, tokenizer).start() if transport == "http" else None
                try:
                    client = SGLangEngine(server.url, tokenizer, timeout_s=600) if server else engine
                    start = time.perf_counter()
                    if provider == "wait_all":
                        traces = client.think(prompts, group_size, b_max, sampling)
                        batch = client.summarize(traces, schedule, summaries, sampling, 16)
                    else:
                        _, batch = client.rollout(prompts, group_size, b_max, schedule, summaries, sampling, 16,
                                                  window=window)  # fmt: skip
                    seconds = time.perf_counter() - start
                finally:
                    if server is not None:
                        server.stop()
                forks = engine.prefill_counters(FORK_PRIORITY)
                inserted = sum(len(ids) for per_trace in batch.inserted_ids for ids in per_trace)
                fork_prompt_tokens = forks["prefill_compute"] + forks["prefill_cache"]
                share = (forks["prefill_compute"] - inserted) / fork_prompt_tokens
                results.add(case, provider, "reprefilled_share", share, "fraction")
                results.add(case, provider, "summary_s", client.stats.summarize.seconds, "s")
                results.add(case, provider, "rollout_s", seconds, "s")
                results.add(case, provider, "evicted_sequences", engine.evicted_sequences, "count")


if __name__ == "__main__":
    main()
