"""Packed response-tree forward+backward (`tree`) against re-forwarding every branch (`per_branch`).

Same model, same rollouts, same attention backend and fused log-probs; `per_branch` runs every
summary branch as its own sequence prompt + z[:c] + inserted + summary (how the authors' trainer
scores summaries), `tree` packs each trace once with all of its branches appended. Metrics:
`tokens` (packed tokens through the model), `time_ms`, `peak_mem_mb`, and `tokens_per_s` (tree
tokens, i.e. real work, per second).

CPU: a tiny random-initialised Qwen2 at scaled shapes (b_max=512, S=A=4, 32-token summaries),
SDPA with the dense tree mask; target tree >= 3x faster. GPU: a random-initialised Qwen2 config of
about 0.5B parameters at b_max=8000, S=A=4, 130-token summaries, bf16, flex backend, gradient
checkpointing; target tree >= 5x faster.
"""

from __future__ import annotations

import statistics

import torch
from common import Results, environment_line, parse_args, peak_memory_mb, time_ms

from anytime_kernels import pack_response_trees
from trainer.policy import TreePolicy
from trainer.tiny import tiny_causal_lm


def make_rollouts(num_traces, prompt_len, b_max, num_slots, num_summaries, summary_len, vocab, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def ids(length: int) -> torch.Tensor:
        return torch.randint(0, vocab, (length,), generator=generator)

    budgets = [b_max * (s + 1) // num_slots for s in range(num_slots)]
    prompts, thinking, cuts, inserted, summaries = [], [], [], [], []
    for n in range(num_traces):
        # Half the traces use the whole budget, the rest close their thinking somewhere past b_1.
        length = b_max if n % 2 == 0 else int(torch.randint(budgets[0], b_max + 1, (1,), generator=generator))
        trace_cuts = [min(b, length) for b in budgets]
        prompts.append(ids(prompt_len))
        thinking.append(ids(length))
        cuts.append(trace_cuts)
        inserted.append([ids(12) for _ in sorted(set(trace_cuts))])
        summaries.append([[ids(summary_len) for _ in range(num_summaries)] for _ in range(num_slots)])
    return prompts, thinking, cuts, inserted, summaries


def per_branch_rollouts(rollouts):
    """Every (trace, slot, summary) as its own one-slot, one-summary rollout: z[:c] + its branch."""
    prompts, thinking, cuts, inserted, summaries = rollouts
    out = ([], [], [], [], [])
    for n in range(len(prompts)):
        distinct = sorted(set(cuts[n]))
        for s, cut in enumerate(cuts[n]):
            for summary in summaries[n][s]:
                out[0].append(prompts[n])
                out[1].append(thinking[n][:cut])
                out[2].append([cut])
                out[3].append([inserted[n][distinct.index(cut)]])
                out[4].append([[summary]])
    return out


def build_model(config: dict, device: str, dtype: torch.dtype) -> torch.nn.Module:
    model = tiny_causal_lm(**config, dtype=dtype)
    return model.to(device=device).train()


CPU_CASE = dict(
    name="tiny_qwen2_bmax512_S4_A4_sum32",
    model=dict(
        vocab_size=4096,
        hidden_size=64,
        intermediate_size=192,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        max_positions=2048,
    ),
    rollouts=dict(num_traces=4, prompt_len=64, b_max=512, num_slots=4, num_summaries=4, summary_len=32),
    micro_batch_tokens=4096,
    backend="sdpa",
    dtype=torch.float32,
    autocast=None,
    checkpointing=False,
)
GPU_CASE = dict(
    name="qwen2_0.5b_bmax8000_S4_A4_sum130",
    model=dict(
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_layers=24,
        num_heads=14,
        num_kv_heads=2,
        max_positions=32768,
    ),
    rollouts=dict(num_traces=4, prompt_len=200, b_max=8000, num_slots=4, num_summaries=4, summary_len=130),
    micro_batch_tokens=32768,
    backend="flex",
    dtype=torch.bfloat16,
    autocast=None,
    checkpointing=True,
)


def run_case(case: dict, device: str, quick: bool, results: Results) -> None:
    rollout_args = dict(case["rollouts"])
    if quick:
        rollout_args["num_traces"] = 1
    vocab = case["model"]["vocab_size"]
    rollouts = make_rollouts(**rollout_args, vocab=vocab)
    layouts = {
        "tree": pack_response_trees(*rollouts),
        "per_branch": pack_response_trees(*per_branch_rollouts(rollouts)),
    }
    model = build_model(case["model"], device, case["dtype"])
    policy = TreePolicy(
        model,
        attention_backend=case["backend"],
        gradient_checkpointing=case["checkpointing"],
        autocast_dtype=case["autocast"],
        micro_batch_tokens=case["micro_batch_tokens"],
    )

    def step(layout) -> None:
        for micro_batch in policy.micro_batches(layout):
            policy.logprobs(micro_batch).logprobs.sum().backward()

    for layout in layouts.values():
        step(layout)  # warm-up: allocates the gradient buffers (and compiles flex on CUDA)
    # The providers alternate, one step each per round, so load on a shared machine hits both alike.
    samples = {provider: [] for provider in layouts}
    for _ in range(2 if quick else 4):
        for provider, layout in layouts.items():
            samples[provider].append(time_ms(lambda layout=layout: step(layout), device, warmup=0, repeat=1))
    timings = {provider: statistics.median(values) for provider, values in samples.items()}
    for provider, layout in layouts.items():
        results.add(case["name"], provider, "tokens", layout.num_tokens, "count")
        results.add(case["name"], provider, "time_ms", timings[provider], "ms")
        results.add(
            case["name"], provider, "peak_mem_mb", peak_memory_mb(lambda layout=layout: step(layout), device), "MiB"
        )
        results.add(
            case["name"], provider, "tokens_per_s", layouts["tree"].num_tokens / timings[provider] * 1e3, "tok/s"
        )
    results.add(case["name"], "tree", "speedup_vs_per_branch", timings["per_branch"] / timings["tree"], "x")


def main() -> None:
    args = parse_args("tree_forward", __doc__)
    print(environment_line(args.device))
    results = Results("tree_forward", args.out)
    run_case(GPU_CASE if args.device == "cuda" else CPU_CASE, args.device, args.quick, results)
    results.finish(args.out)


if __name__ == "__main__":
    main()
