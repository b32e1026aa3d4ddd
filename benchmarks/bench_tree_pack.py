"""Response-tree packing: the compiled C++ op (`cpp`) against the pure-Python reference (`reference`).

Full case: 512 traces x 8000 thinking tokens, S=4 budget slots, A=4 summaries of 130 tokens, a
120-token prompt and an 8-token inserted delimiter per distinct cut (the paper's b_max=8000
setting). Both providers start from the same lists of token tensors, as rollouts deliver them.
Target: cpp at least 30x faster than reference.
"""

from __future__ import annotations

import torch
from common import Results, environment_line, parse_args, time_ms

from anytime_kernels import pack_response_trees


def make_batch(num_traces: int, thinking_len: int, num_slots: int, num_summaries: int, summary_len: int):
    generator = torch.Generator().manual_seed(0)

    def ids(length: int) -> torch.Tensor:
        return torch.randint(0, 151_936, (length,), generator=generator)

    budgets = [thinking_len * (s + 1) // num_slots for s in range(num_slots)]
    prompts, thinking, cuts, inserted, summaries = [], [], [], [], []
    for _ in range(num_traces):
        prompts.append(ids(120))
        thinking.append(ids(thinking_len))
        trace_cuts = [min(b, thinking_len) for b in budgets]
        cuts.append(trace_cuts)
        inserted.append([ids(8) for _ in sorted(set(trace_cuts))])
        summaries.append([[ids(summary_len) for _ in range(num_summaries)] for _ in range(num_slots)])
    return prompts, thinking, torch.tensor(cuts), inserted, summaries


def main() -> None:
    args = parse_args("tree_pack", __doc__)
    print(environment_line("cpu"))
    cases = [(64, 8000)] if args.quick else [(64, 8000), (512, 8000)]
    results = Results("tree_pack", args.out)
    for num_traces, thinking_len in cases:
        batch = make_batch(num_traces, thinking_len, num_slots=4, num_summaries=4, summary_len=130)
        case = f"N{num_traces}_L{thinking_len}_S4_A4_sum130"
        layout = pack_response_trees(*batch, backend="cpp")
        results.add(case, "cpp", "tokens", layout.num_tokens, "count")
        cpp_ms = time_ms(lambda batch=batch: pack_response_trees(*batch, backend="cpp"), "cpu", warmup=2, repeat=7)
        reference_ms = time_ms(
            lambda batch=batch: pack_response_trees(*batch, backend="reference"), "cpu", warmup=1, repeat=3
        )
        results.add(case, "cpp", "time_ms", cpp_ms, "ms")
        results.add(case, "reference", "time_ms", reference_ms, "ms")
        results.add(case, "cpp", "speedup_vs_reference", reference_ms / cpp_ms, "x")
    results.finish(args.out)


if __name__ == "__main__":
    main()
