"""Tree attention alone, per backend: forward and forward+backward time, peak memory, compile cost.

One packed micro-batch of response trees (traces of b_max thinking tokens, S=A=4 branches of a
12-token delimiter + 130-token summary, prompt 200) goes through ``trainer.attention``'s
``prepare`` (once per micro-batch) and ``attend`` (once per layer), with q/k/v shaped like
DeepSeek-R1-Distill-Qwen-1.5B (12 query heads, 2 key/value heads), bf16.

CUDA: `flex` at head_dim 64 and 128 and L of about 16k and 32k tokens (quick: 16k), against
`sdpa` with the dense tree mask at 16k. Metrics: `prepare_ms` (the BlockMask), `fwd_ms`,
`fwd_bwd_ms`, `peak_mem_mb`, `first_call_s` (compile included) and `recompiles` (frames compiled
when a micro-batch of another length arrives after warm-up; dynamic shapes should keep it 0).
CPU: `sdpa` and `reference_varlen` forward at about 2k tokens (flex has no CPU backward).
"""

from __future__ import annotations

import time

import torch
from common import Results, environment_line, parse_args, peak_memory_mb, synchronize, time_ms

from anytime_kernels import pack_response_trees
from trainer.attention import BACKENDS, prepare_tree_attention

Q_HEADS, KV_HEADS = 12, 2


def tree_offsets(num_traces: int, b_max: int, seed: int = 0):
    """``(seq_ids, prefix_end, branch_start)`` of a packed micro-batch (host tensors)."""
    generator = torch.Generator().manual_seed(seed)
    budgets = [b_max * (s + 1) // 4 for s in range(4)]
    prompts, thinking, cuts, inserted, summaries = [], [], [], [], []
    for n in range(num_traces):
        length = b_max if n % 2 == 0 else int(torch.randint(budgets[0], b_max + 1, (1,), generator=generator))
        trace_cuts = [min(b, length) for b in budgets]
        prompts.append([1] * 200)
        thinking.append([2] * length)
        cuts.append(trace_cuts)
        inserted.append([[3] * 12 for _ in sorted(set(trace_cuts))])
        summaries.append([[[4] * 130 for _ in range(4)] for _ in range(4)])
    layout = pack_response_trees(prompts, thinking, cuts, inserted, summaries)
    return layout.seq_ids, layout.prefix_end, layout.branch_start


def compiled_frames() -> int:
    from torch._dynamo.utils import counters

    return int(sum(counters["frames"].values()))


def run_case(results, device, backend, head_dim, num_traces, b_max, measure_recompiles):
    offsets = tree_offsets(num_traces, b_max)
    length = offsets[0].numel()
    case = f"L{length}_d{head_dim}"
    generator = torch.Generator(device=device).manual_seed(0)

    def tensor(heads):
        return torch.randn(1, heads, length, head_dim, generator=generator, device=device, dtype=torch.bfloat16)

    query, key, value = tensor(Q_HEADS), tensor(KV_HEADS), tensor(KV_HEADS)
    scale = head_dim**-0.5
    attend = BACKENDS[backend].attend

    def prepare():
        return prepare_tree_attention(*offsets, backend, head_dim=head_dim, device=device).state

    state = None

    def forward():
        with torch.no_grad():
            attend(state, query, key, value, scale)

    leaves = [t.detach().requires_grad_() for t in (query, key, value)]

    def forward_backward():
        for leaf in leaves:
            leaf.grad = None
        attend(state, *leaves, scale).float().sum().backward()

    frames_before = compiled_frames()
    start = time.perf_counter()
    state = prepare()
    forward_backward() if device == "cuda" else forward()
    synchronize(device)
    results.add(case, backend, "first_call_s", time.perf_counter() - start, "s")
    results.add(case, backend, "prepare_ms", time_ms(prepare, device, warmup=1, repeat=3), "ms")
    results.add(case, backend, "fwd_ms", time_ms(forward, device), "ms")
    if device == "cuda":
        results.add(case, backend, "fwd_bwd_ms", time_ms(forward_backward, device), "ms")
        results.add(case, backend, "peak_mem_mb", peak_memory_mb(forward_backward, device), "MiB")
    else:
        results.add(case, backend, "peak_mem_mb", peak_memory_mb(forward, device), "MiB")
    if measure_recompiles:
        # A micro-batch of another length (one trace fewer) after warm-up.
        warm = compiled_frames()
        other = tree_offsets(max(num_traces - 1, 1), b_max, seed=1)
        other_length = other[0].numel()
        other_state = prepare_tree_attention(*other, backend, head_dim=head_dim, device=device).state
        q2, k2, v2 = (
            torch.randn(1, heads, other_length, head_dim, device=device, dtype=torch.bfloat16, requires_grad=True)
            for heads in (Q_HEADS, KV_HEADS, KV_HEADS)
        )
        attend(other_state, q2, k2, v2, scale).float().sum().backward()
        synchronize(device)
        results.add(case, backend, "frames_compiled_warmup", warm - frames_before, "count")
        results.add(case, backend, "recompiles", compiled_frames() - warm, "count")


def main() -> None:
    args = parse_args("tree_attention", __doc__)
    device = args.device
    print(environment_line(device))
    results = Results("tree_attention", args.out)
    if device == "cuda":
        # (backend, head_dim, traces, b_max): 2 traces of b_max 6000 ~ 15.8k tokens, 4 ~ 31k.
        cases = [("flex", 128, 2, 6000, True), ("sdpa", 128, 2, 6000, False), ("flex", 64, 2, 6000, False)]
        if not args.quick:
            cases += [("flex", 128, 4, 6000, False), ("flex", 64, 4, 6000, False)]
    else:
        cases = [("sdpa", 64, 1, 1024, False), ("reference_varlen", 64, 1, 1024, False)]
    for backend, head_dim, num_traces, b_max, recompiles in cases:
        run_case(results, device, backend, head_dim, num_traces, b_max, recompiles)
    results.finish(args.out)


if __name__ == "__main__":
    main()
