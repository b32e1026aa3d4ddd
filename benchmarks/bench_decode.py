"""Decode steps of the embedded engine: the paged path against the engine it replaced and transformers.

Providers: `paged_graph` (``EmbeddedEngine``: paged KV pool, sampling on the device, a CUDA graph per
row bucket; CUDA only), `paged_eager` (the same engine with ``cuda_graphs=False``: the CPU path),
`eager` (``benchmarks/eager_engine.py``, the engine before issue 25: one prefill per request,
stacked left-padded caches, a host sync every token) and, on the plain decode cases,
`hf_generate` (transformers' ``generate`` over a left-padded batch).

Cases: `rows<R>_ctx<C>`, R rows decoding after a prompt of C tokens (R / 8 prompts of 8 samples
each, as G traces of a prompt; random token ids), every row running the same number of steps
(``min_new_tokens`` = the cap); `fork_ctx<C>`, the summaries of one trace of C tokens ingested into
the cache: S = 4 cuts x A = 4 summaries = 16 fork rows. CUDA: the Qwen2-0.5B shape (24 layers,
hidden 896, 14/2 heads of 64, vocabulary 151,936) with random bf16 weights, R in {32, 256}, C in
{1k, 8k}, fork at 8k (`--quick`: the 256-row 8k case for the paged providers only). CPU: a 4-layer
model of hidden 256 (4/2 heads of 64, the character vocabulary), 32 rows at 256, fork at 1k.

Metrics: `ms_per_step` (the wall time of a generate with N steps minus one with a single step, over
N - 1; the median of repeats), `tokens_per_s` (rows / step time), `kv_mib` (the most keys/values held
at once: pool blocks in use / the eager engine's caches and copies / transformers' cache),
`host_syncs_per_step` (the engines' own count of points where the host waits for the device:
read-backs, tensors built from Python lists; not reported for hf_generate), and `floor_ms` (the
weights plus the K/V one step reads, over the H100's 3.35 TB/s). Targets, H100: at 32 rows a step
15x faster than `eager`; at 256 rows within 3x of `floor_ms`; the 16 forks hold at most 1.1x the
KV of the trace plus their summaries. CPU: host syncs per step at most a quarter of `eager`'s, the
forks' KV at most 0.3x of `eager`'s copies, `paged_eager` no slower than `eager` (ratio in one run).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from common import Results, environment_line, parse_args, synchronize
from eager_engine import EagerEngine

from trainer.budgets import BudgetSchedule
from trainer.rollout import EmbeddedEngine, GenerationRequest, SamplingParams
from trainer.tiny import char_tokenizer, tiny_causal_lm

H100_BYTES_PER_S = 3.35e12
GROUP = 8  # samples per prompt in the plain cases
SLOTS = SUMMARIES = 4


def build_model(device: str) -> torch.nn.Module:
    with torch.device(device):
        if device == "cuda":
            model = tiny_causal_lm(151936, hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14,
                                   num_kv_heads=2, max_positions=32768)  # fmt: skip
            return model.to(torch.bfloat16)
        return tiny_causal_lm(len(char_tokenizer()), hidden_size=256, intermediate_size=1024, num_layers=4,
                              num_heads=4, num_kv_heads=2, max_positions=4096)  # fmt: skip


def kv_bytes_per_token(model: torch.nn.Module) -> int:
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    element = next(model.parameters()).element_size()
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * element


def make_engine(provider: str, model, tokenizer, rows: int, tokens: int):
    """``provider``'s engine for ``rows`` rows; ``tokens``: what the case holds at most (a CUDA pool's size)."""
    if provider == "eager":
        return EagerEngine(model, tokenizer, max_batch_rows=rows)
    # A fixed pool on CUDA sized for the case (the default fraction would take whatever the other
    # providers of the case left free).
    blocks = tokens // 16 + 4 * rows + 64 if model.device.type == "cuda" else None
    return EmbeddedEngine(model, tokenizer, max_batch_rows=rows, kv_blocks=blocks,
                          cuda_graphs=provider == "paged_graph")  # fmt: skip


def step_times(runs: dict[str, Callable[[int], object]], steps: int, device: str, repeat: int) -> dict[str, float]:
    """Milliseconds per decode step of each provider: a run of ``steps`` tokens minus a run of one,
    over steps - 1; the providers alternate within each repeat, so load on a shared machine hits
    them alike (the median of the repeats)."""
    for run in runs.values():
        run(2)  # warm-up: kernels compiled, graphs captured, allocator warmed
    samples: dict[str, list[float]] = {provider: [] for provider in runs}
    for _ in range(repeat):
        for provider, run in runs.items():
            times = {}
            for count in (1, steps):
                synchronize(device)
                start = time.perf_counter()
                run(count)
                synchronize(device)
                times[count] = time.perf_counter() - start
            samples[provider].append((times[steps] - times[1]) * 1e3 / (steps - 1))
    return {provider: statistics.median(values) for provider, values in samples.items()}


def add_step_metrics(results, case, provider, ms, rows, kv_mib, syncs, floor_ms) -> None:
    results.add(case, provider, "ms_per_step", ms, "ms")
    results.add(case, provider, "tokens_per_s", rows / ms * 1e3, "tokens/s")
    results.add(case, provider, "kv_mib", kv_mib, "MiB")
    if syncs is not None:
        results.add(case, provider, "host_syncs_per_step", syncs, "syncs")
    results.add(case, provider, "floor_ms", floor_ms, "ms")


def floor(model, rows: int, context: int) -> float:
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return (weights + rows * context * kv_bytes_per_token(model)) / H100_BYTES_PER_S * 1e3


def engine_counts(engine, run: Callable[[int], object], steps: int) -> tuple[float, float]:
    """``(host syncs per decode step, most KV MiB held)`` of one more run of ``steps`` tokens."""
    syncs_before, steps_before = engine.host_syncs, engine.decode_steps
    engine.reset_peak_kv()
    run(steps)
    return (engine.host_syncs - syncs_before) / (engine.decode_steps - steps_before), engine.peak_kv_bytes / 2**20


def plain_case(results, model, tokenizer, providers, rows: int, context: int, steps: int, device, repeat) -> None:
    case = f"rows{rows}_ctx{context}"
    generator = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    prompts = [tuple(torch.randint(3, vocab, (context,), generator=generator).tolist()) for _ in range(rows // GROUP)]
    engines = {
        p: make_engine(p, model, tokenizer, rows, len(prompts) * context) for p in providers if p != "hf_generate"
    }

    def engine_run(engine):
        def run(count):
            sampling = SamplingParams(temperature=1.0, min_new_tokens=count, seed=0)
            engine.generate([GenerationRequest(p, n=GROUP, max_new_tokens=count, stop_token_ids=(), sampling=sampling)
                             for p in prompts])  # fmt: skip

        return run

    runs = {provider: engine_run(engine) for provider, engine in engines.items()}
    if "hf_generate" in providers:
        runs["hf_generate"] = hf_generate_run(model, prompts)
    times = step_times(runs, steps, device, repeat)
    floor_ms = floor(model, rows, context + steps // 2)
    for provider, ms in times.items():
        if provider == "hf_generate":
            kv_mib = rows * (context + steps) * kv_bytes_per_token(model) / 2**20
            add_step_metrics(results, case, provider, ms, rows, kv_mib, None, floor_ms)
        else:
            syncs, kv_mib = engine_counts(engines[provider], runs[provider], steps)
            add_step_metrics(results, case, provider, ms, rows, kv_mib, syncs, floor_ms)
    del engines, runs
    if device == "cuda":
        torch.cuda.empty_cache()


def hf_generate_run(model, prompts) -> Callable[[int], object]:
    ids = torch.tensor([p for p in prompts for _ in range(GROUP)], device=model.device)
    mask = torch.ones_like(ids)

    def run(count):
        with torch.no_grad():
            model.generate(ids, attention_mask=mask, max_new_tokens=count, min_new_tokens=count, do_sample=True,
                           top_k=0, pad_token_id=0)  # fmt: skip

    return run


def fork_case(results, model, tokenizer, providers, context: int, steps: int, device, repeat) -> None:
    """Summaries of one ingested trace of ``context`` tokens: 4 cuts x 4 summaries."""
    case = f"fork_ctx{context}"
    generator = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size
    prompt = torch.randint(3, vocab, (16,), generator=generator).tolist()  # ids 0-2: EOS, <think>, </think>
    trace = torch.randint(3, vocab, (context,), generator=generator).tolist()
    schedule = BudgetSchedule(context, SLOTS)
    rows = SLOTS * SUMMARIES
    engines = {p: make_engine(p, model, tokenizer, rows, len(prompt) + context) for p in providers}

    def fork_run(engine):
        traces = engine.ingest([prompt], [trace], 1)

        def run(count):
            sampling = SamplingParams(temperature=1.0, min_new_tokens=count, seed=0)
            engine.summarize(traces, schedule, SUMMARIES, sampling, max_new_tokens=count)

        return run

    runs = {provider: fork_run(engine) for provider, engine in engines.items()}
    times = step_times(runs, steps, device, repeat)
    mean_context = len(prompt) + context * (SLOTS + 1) / (2 * SLOTS) + steps // 2
    # What the forks need at least: the trace once, and each fork's summary tokens.
    minimum = (len(prompt) + context + rows * steps) * kv_bytes_per_token(model) / 2**20
    for provider, ms in times.items():
        syncs, kv_mib = engine_counts(engines[provider], runs[provider], steps)
        add_step_metrics(results, case, provider, ms, rows, kv_mib, syncs, floor(model, rows, int(mean_context)))
        results.add(case, provider, "kv_over_trace_and_summaries", kv_mib / minimum, "x")
    del engines, runs
    if device == "cuda":
        torch.cuda.empty_cache()


def main() -> None:
    args = parse_args("decode", __doc__)
    if args.device == "cpu":
        torch.set_num_threads(1)
    print(environment_line(args.device))
    tokenizer = char_tokenizer()
    model = build_model(args.device)
    results = Results("decode", args.out)
    cuda = args.device == "cuda"
    repeat = 1 if args.quick else 3
    paged = ["paged_graph", "paged_eager"] if cuda else ["paged_eager"]
    if cuda:
        cases = [(32, 1024, [*paged, "eager", "hf_generate"]), (256, 1024, [*paged, "eager"]),
                 (32, 8192, [*paged, "eager"]), (256, 8192, paged if args.quick else [*paged, "eager"])]  # fmt: skip
        steps, fork_context = 32, 8192
    else:
        cases = [(32, 256, [*paged, "eager", "hf_generate"])]
        steps, fork_context = 16 if args.quick else 32, 1024
    for rows, context, providers in cases:
        plain_case(results, model, tokenizer, providers, rows, context, steps, args.device, repeat)
    fork_case(results, model, tokenizer, [*paged, "eager"], fork_context, steps, args.device, repeat)
    notes = []
    for case in {row["case"] for row in results.rows}:
        eager_ms = results.value(case, "eager", "ms_per_step")
        for provider in paged:
            ms = results.value(case, provider, "ms_per_step")
            if eager_ms and ms:
                results.add(case, provider, "speedup_vs_eager", eager_ms / ms, "x")
                syncs = results.value(case, provider, "host_syncs_per_step")
                eager_syncs = results.value(case, "eager", "host_syncs_per_step")
                notes.append(f"{case} {provider}: {eager_ms / ms:.2f}x eager's step, host syncs per step "
                             f"{syncs:.3f} vs {eager_syncs:.3f}")  # fmt: skip
    fork = f"fork_ctx{fork_context}"
    eager_kv = results.value(fork, "eager", "kv_mib")
    for provider in paged:
        notes.append(f"{fork} {provider}: KV {results.value(fork, provider, 'kv_mib') / eager_kv:.3f}x eager's")
    results.finish(args.out, notes=sorted(notes))


if __name__ == "__main__":
    main()
