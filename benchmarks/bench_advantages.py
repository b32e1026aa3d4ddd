"""BRPO advantages plus the per-token scatter: the kernels (`cpp` on CPU, `triton` on CUDA) against a Python loop (`python_loop`).

Case: 64 prompts x G=8 traces of 8000 thinking tokens, S=4 budget slots, A=4 summaries of 130
tokens, a 120-token prompt and an 8-token inserted delimiter per distinct cut (the paper's
b_max=8000 setting, about 5.3M packed tokens). Both providers start from the same scores
``[N, S, A]``, cut lengths and packed layout, and end with the advantage of every packed token.

``python_loop`` is written in the style of the authors' code (verl/trainer/ppo/brpo.py of
AnytimeReasoner): a triple loop over prompts, traces and slots for the advantages, then per trace
a Python list of per-token advantages filled token by token, then one tensor.
``kernel`` is ``brpo_advantages`` + ``token_advantages`` (C++ op on CPU, Triton on CUDA).

Target (CPU): cpp end to end at least 200x faster than python_loop. On CUDA the token scatter
is also timed alone, with its achieved memory bandwidth (17 bytes moved per packed token).
``torch_zeros`` times ``torch.zeros(T)``, the cost of merely materialising a fresh [T] fp32 output
(first-touch page faults dominate it on the CPU), as the floor for any provider.
"""

from __future__ import annotations

import torch
from common import Results, environment_line, parse_args, time_ms

from anytime_kernels import brpo_advantages, pack_response_trees, token_advantages
from trainer.budgets import budget_prior, budget_support, cut_lengths

PROMPT_LEN, INSERTED_LEN = 120, 8
# Bytes the token scatter moves per packed token: seq_ids, slot, summary_index (int32), token_kind
# (int8) read, the fp32 advantage written.
SCATTER_BYTES_PER_TOKEN = 4 + 4 + 4 + 1 + 4


def make_batch(
    num_prompts: int, group_size: int, thinking_len: int, num_slots: int, num_summaries: int, summary_len: int
):
    """Rollouts (token lists), their cut lengths ``[N, S]``, scores ``[N, S, A]`` and the prior ``[S]``."""
    generator = torch.Generator().manual_seed(0)
    num_traces = num_prompts * group_size
    budgets = budget_support(thinking_len, num_slots)
    cuts = cut_lengths([thinking_len] * num_traces, budgets)

    def ids(length: int) -> torch.Tensor:
        return torch.randint(0, 151_936, (length,), generator=generator)

    prompts = [ids(PROMPT_LEN) for _ in range(num_traces)]
    thinking = [ids(thinking_len) for _ in range(num_traces)]
    inserted = [[ids(INSERTED_LEN) for _ in sorted(set(row))] for row in cuts.tolist()]
    summaries = [
        [[ids(summary_len) for _ in range(num_summaries)] for _ in range(num_slots)] for _ in range(num_traces)
    ]
    scores = torch.randint(0, 2, (num_traces, num_slots, num_summaries), generator=generator).float()
    return (prompts, thinking, cuts, inserted, summaries), scores, budget_prior("uniform", budgets)


def tree_offsets(rollouts) -> tuple[list[list[list[int]]], list[int]]:
    """Per trace and branch (s, a) the authors' ``[len_0, len_1, len_3, len_4]`` row offsets, and row lengths.

    ``[len_0, len_1)`` is the thinking segment of slot s, ``[len_3, len_4)`` the summary tokens.
    """
    prompts, thinking, cuts, inserted, summaries = rollouts
    offsets, row_lens = [], []
    for n, trace_cuts in enumerate(cuts.tolist()):
        prompt_len = len(prompts[n])
        position = prompt_len + len(thinking[n])
        distinct = sorted(set(trace_cuts))
        per_trace = []
        for s, cut in enumerate(trace_cuts):
            start = prompt_len + (trace_cuts[s - 1] if s else 0)
            for a in range(len(summaries[n][s])):
                summary_start = position + len(inserted[n][distinct.index(cut)])
                position = summary_start + len(summaries[n][s][a])
                per_trace.append([start, prompt_len + cut, summary_start, position])
        offsets.append(per_trace)
        row_lens.append(position)
    return offsets, row_lens


def python_loop(scores, cut_lens, offsets, row_lens, group_size, budget_probs, variance_reduction="brpo"):
    """Advantages and per-token advantages ``[T]`` with Python loops, as the authors' code does."""
    num_traces, num_slots, num_summaries = scores.shape
    num_prompts = num_traces // group_size
    r = scores.tolist()
    cuts = cut_lens.tolist()
    p = [w / sum(budget_probs.tolist()) for w in budget_probs.tolist()]
    rbar = [[sum(r[n][s]) / num_summaries for s in range(num_slots)] for n in range(num_traces)]
    discount = [2.0**k for k in range(num_slots)]
    thinking_adv = [[0.0] * num_slots for _ in range(num_traces)]
    for b in range(num_prompts):
        for g in range(group_size):
            n = b * group_size + g
            for s in range(num_slots):
                cot_return = sum(rbar[n][k] * p[k] for k in range(s, num_slots))
                avg_return = 0.0
                if group_size > 1:
                    members = range(b * group_size, (b + 1) * group_size)
                    avg_return = sum(sum(rbar[m][k] * p[k] for k in range(s, num_slots)) for m in members) / group_size
                last_cot_return = 0.0
                if s > 0:
                    prev = sum(rbar[n][k] * discount[k] for k in range(s)) / sum(discount[:s])
                    last_cot_return = prev * sum(p[s:])
                if variance_reduction == "brpo":
                    baseline = (s * last_cot_return + (num_slots - s) * avg_return) / num_slots
                elif variance_reduction == "v1only":
                    baseline = last_cot_return
                elif variance_reduction == "v2only":
                    baseline = avg_return
                else:
                    baseline = 0.0
                thinking_adv[n][s] = cot_return - baseline
    summary_adv = [[[0.0] * num_summaries for _ in range(num_slots)] for _ in range(num_traces)]
    for n in range(num_traces):
        by_cut: dict[int, list[float]] = {}
        for s in range(num_slots):
            by_cut.setdefault(cuts[n][s], []).extend(r[n][s])
        for s in range(num_slots):
            for a in range(num_summaries):
                if num_summaries == 1:
                    first = n // group_size * group_size
                    baseline = sum(r[m][s][0] for m in range(first, first + group_size)) / group_size
                else:
                    shared = by_cut[cuts[n][s]]
                    baseline = sum(shared) / len(shared)
                summary_adv[n][s][a] = r[n][s][a] - baseline
    token_level_adv = []
    for n in range(num_traces):
        advantage = [0.0] * row_lens[n]
        visited = set()
        for index, (len_0, len_1, len_3, len_4) in enumerate(offsets[n]):
            s, a = divmod(index, num_summaries)
            if s not in visited:
                visited.add(s)
                for i in range(len_0, len_1):
                    advantage[i] = thinking_adv[n][s]
            for i in range(len_3, len_4):
                advantage[i] = summary_adv[n][s][a]
        token_level_adv.extend(advantage)
    return torch.tensor(token_level_adv, dtype=torch.float32)


def kernel(scores, cut_lens, layout, group_size, budget_probs):
    thinking_adv, summary_adv = brpo_advantages(scores, cut_lens, group_size, budget_probs)
    return token_advantages(layout, thinking_adv, summary_adv)


def main() -> None:
    args = parse_args("advantages", __doc__)
    device = args.device
    print(environment_line(device))
    num_prompts, group_size, thinking_len, num_slots, num_summaries, summary_len = 64, 8, 8000, 4, 4, 130
    rollouts, scores, probs = make_batch(num_prompts, group_size, thinking_len, num_slots, num_summaries, summary_len)
    cuts = rollouts[2]
    layout = pack_response_trees(*rollouts)
    offsets, row_lens = tree_offsets(rollouts)
    case = f"P{num_prompts}_G{group_size}_S{num_slots}_A{num_summaries}_L{thinking_len}_sum{summary_len}"
    results = Results("advantages", args.out)
    ours = "triton" if device == "cuda" else "cpp"  # the backend `auto` resolves to
    results.add(case, ours, "tokens", layout.num_tokens, "count")

    expected = python_loop(scores, cuts, offsets, row_lens, group_size, probs)
    loop_ms = time_ms(
        lambda: python_loop(scores, cuts, offsets, row_lens, group_size, probs),
        "cpu",
        warmup=0,
        repeat=1 if args.quick else 3,
    )

    on_device = layout.to(device)
    scores_d, cuts_d, probs_d = scores.to(device), cuts.to(device), probs.to(device)
    got = kernel(scores_d, cuts_d, on_device, group_size, probs_d)
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-6, atol=1e-6)
    kernel_ms = time_ms(lambda: kernel(scores_d, cuts_d, on_device, group_size, probs_d), device, warmup=3, repeat=11)
    results.add(case, "python_loop", "time_ms", loop_ms, "ms")
    results.add(case, ours, "time_ms", kernel_ms, "ms")
    results.add(case, ours, "speedup_vs_python_loop", loop_ms / kernel_ms, "x")

    thinking_adv, summary_adv = brpo_advantages(scores_d, cuts_d, group_size, probs_d)
    if device == "cuda":
        from triton.testing import do_bench

        scatter_ms = do_bench(lambda: token_advantages(on_device, thinking_adv, summary_adv), warmup=25, rep=100)
    else:
        scatter_ms = time_ms(
            lambda: token_advantages(on_device, thinking_adv, summary_adv), device, warmup=3, repeat=11
        )
    advantages_ms = time_ms(lambda: brpo_advantages(scores_d, cuts_d, group_size, probs_d), device, warmup=3, repeat=11)
    # The floor under any provider that returns a fresh [T] fp32 tensor: allocating and zeroing it.
    floor_ms = time_ms(lambda: torch.zeros(layout.num_tokens, device=device), device, warmup=3, repeat=11)
    results.add(f"{case}/output_alloc_floor", "torch_zeros", "time_ms", floor_ms, "ms")
    results.add(f"{case}/advantages_only", ours, "time_ms", advantages_ms, "ms")
    results.add(f"{case}/token_scatter_only", ours, "time_ms", scatter_ms, "ms")
    if device == "cuda":
        bandwidth = layout.num_tokens * SCATTER_BYTES_PER_TOKEN / (scatter_ms * 1e-3) / 1e9
        results.add(f"{case}/token_scatter_only", ours, "bandwidth", bandwidth, "GB/s")
    results.finish(args.out, title=f"bench_advantages ({device})")


if __name__ == "__main__":
    main()
