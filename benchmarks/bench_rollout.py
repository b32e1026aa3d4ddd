"""Summary phase of the embedded engine: forks served from the traces' cache (`shared`) against
re-prefilling every summary prompt (`unshared`), at S=4 budget slots and A=4 summaries per slot.

The tiny random Qwen2 policy of the tests thinks once (traces of 3/4 b_max to b_max tokens, as
long reasoning traces are); both providers then summarize the same traces (118 new tokens at
most, temperature 1, same seed). Metrics: prompt tokens computed by the summary phase
(`summary_prefill_tokens`), its wall time (`summary_time_ms`) and, for `shared`, the share of
summary-prompt tokens served from cache (`cache_hit_share`) and the speedup over `unshared`.
Targets: cache_hit_share >= 0.95 and speedup >= 3x. CPU runs use one torch thread (the tiny
model is latency-bound; the shared CI machine makes more threads slower).
"""

from __future__ import annotations

import torch
from common import _REPO_ROOT, Results, environment_line, parse_args, time_ms

from trainer.budgets import BudgetSchedule
from trainer.rollout import EmbeddedEngine, SamplingParams

if str(_REPO_ROOT / "tests") not in __import__("sys").path:
    __import__("sys").path.insert(0, str(_REPO_ROOT / "tests"))
from fixtures.tiny_policy import tiny_policy

NUM_SLOTS, NUM_SUMMARIES = 4, 4
SUMMARY_SAMPLING = SamplingParams(temperature=1.0, seed=1)


def main() -> None:
    args = parse_args("rollout", __doc__)
    if args.device == "cpu":
        torch.set_num_threads(1)
    print(environment_line(args.device))
    cases = [(2, 2, 3072)] if args.quick else [(2, 2, 4096), (4, 2, 8000)]
    model, tokenizer = tiny_policy(seed=0)
    model = model.to(args.device)
    results = Results("rollout")
    for num_prompts, group_size, b_max in cases:
        case = f"P{num_prompts}_G{group_size}_bmax{b_max}_S{NUM_SLOTS}_A{NUM_SUMMARIES}"
        prompts = [
            tokenizer.encode(f"Problem {i}: what is {i} + {i}?", add_special_tokens=False) for i in range(num_prompts)
        ]
        engines = {
            "shared": EmbeddedEngine(model, tokenizer, max_batch_rows=256),
            "unshared": EmbeddedEngine(model, tokenizer, max_batch_rows=256, prefix_sharing=False),
        }
        thinking = SamplingParams(temperature=1.0, seed=0, min_new_tokens=b_max * 3 // 4)
        traces = engines["shared"].think(prompts, group_size, b_max, thinking)
        schedule = BudgetSchedule(b_max, NUM_SLOTS)
        results.add(case, "shared", "mean_trace_tokens", sum(traces.thinking_lens) / traces.num_traces, "tokens")
        times = {}
        for name, engine in engines.items():
            engine.reset_stats()
            engine.summarize(traces, schedule, NUM_SUMMARIES, SUMMARY_SAMPLING)
            stats = engine.reset_stats().summarize
            results.add(case, name, "summary_prefill_tokens", stats.prefilled_tokens, "tokens")
            results.add(case, name, "summary_generated_tokens", stats.generated_tokens, "tokens")
            if name == "shared":
                results.add(case, name, "cache_hit_share", stats.cache_hit_share, "fraction")
            times[name] = time_ms(
                lambda engine=engine, traces=traces, schedule=schedule: engine.summarize(
                    traces, schedule, NUM_SUMMARIES, SUMMARY_SAMPLING
                ),
                args.device,
                warmup=1,
                repeat=3,
            )
            results.add(case, name, "summary_time_ms", times[name], "ms")
        results.add(case, "shared", "speedup_vs_unshared", times["unshared"] / times["shared"], "x")
    results.finish(args.out)


if __name__ == "__main__":
    main()
