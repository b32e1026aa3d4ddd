"""Paged attention over a KV pool: the Triton kernels against the vectorized torch path and the reference.

Cases at the Qwen2-0.5B attention shape (14 query heads, 2 KV heads, head_dim 64, blocks of 16
tokens, bf16 on CUDA, fp32 on the CPU), every row's blocks scattered over the pool by a shuffled
block table:

- ``decode_B{rows}_L{context}``: one new token per row over ``context`` keys (the rollout engine's
  decode step, one layer). ``bandwidth`` is the K/V bytes every row must read (plus the query and
  output) over the time: decode is bound by it, so on an H100 it should approach 3.35 TB/s.
- ``prefill_R{requests}_P{prefix}_Q{new}``: each request's ``new`` tokens over a cached ``prefix``
  plus themselves (causal), all requests in one call.

Providers: ``triton`` (default split count; also ``triton_1split`` for decode), ``cpp`` (decode on
the CPU: the compiled op, the engine's CPU path), ``torch`` (gathers + matmul/SDPA; the CPU
prefill), ``reference`` (Python loops; small cases only). Every provider's output is checked
against the torch path before it is timed. On the CPU the Triton kernels run only under the
interpreter, which is not timed.
"""

from __future__ import annotations

import torch
from common import Results, environment_line, parse_args, time_ms

from anytime_kernels import paged_decode_attention, paged_prefill_attention

NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 14, 2, 64, 16
# Reference provider only where its per-row, per-head loop stays short.
REFERENCE_MAX_WORK = 64 * 1024 * NUM_Q_HEADS


def make_pool(lengths: list[int], dtype: torch.dtype, device: str, seed: int = 0):
    """A pool holding exactly the rows' blocks, in shuffled order: ``(key_cache, value_cache, block_tables)``."""
    generator = torch.Generator().manual_seed(seed)
    blocks_per_row = [-(-length // BLOCK_SIZE) for length in lengths]
    num_blocks = sum(blocks_per_row)
    order = torch.randperm(num_blocks, generator=generator)
    width = max(blocks_per_row)
    tables = torch.zeros(len(lengths), width, dtype=torch.int32)
    first = 0
    for row, count in enumerate(blocks_per_row):
        tables[row, :count] = order[first : first + count]
        first += count
    shape = (num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    key_cache = torch.randn(shape, generator=generator).to(dtype).to(device)
    value_cache = torch.randn(shape, generator=generator).to(dtype).to(device)
    return key_cache, value_cache, tables.to(device)


def _providers(device: str, work: int, decode: bool) -> list[tuple[str, dict]]:
    """(name, keyword arguments) of the providers that run here; ``work`` sizes the reference's loop."""
    providers = []
    if device == "cuda":
        providers.append(("triton", {"backend": "triton"}))
        if decode:
            providers.append(("triton_1split", {"backend": "triton", "num_splits": 1}))
    elif decode:
        providers.append(("cpp", {"backend": "cpp"}))
    providers.append(("torch", {"backend": "torch"}))
    if work <= REFERENCE_MAX_WORK:
        providers.append(("reference", {"backend": "reference"}))
    return providers


def _time(fn, device: str) -> float:
    if device == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=100)
    return time_ms(fn, device, warmup=1, repeat=5)


def bench_decode(results: Results, rows: int, context: int, dtype: torch.dtype, device: str) -> None:
    case = f"decode_B{rows}_L{context}"
    lengths = [context] * rows
    key_cache, value_cache, tables = make_pool(lengths, dtype, device)
    seq_lens = torch.tensor(lengths, dtype=torch.int32, device=device)
    query = torch.randn(rows, NUM_Q_HEADS, HEAD_DIM, generator=torch.Generator().manual_seed(1)).to(dtype).to(device)
    args = (query, key_cache, value_cache, tables, seq_lens)
    expected = paged_decode_attention(*args, backend="torch")
    moved = (2 * sum(lengths) * NUM_KV_HEADS + 2 * rows * NUM_Q_HEADS) * HEAD_DIM * key_cache.element_size()
    for provider, options in _providers(device, rows * context * NUM_Q_HEADS, decode=True):
        out = paged_decode_attention(*args, **options)
        tolerance = 2e-2 if dtype != torch.float32 else 1e-4
        torch.testing.assert_close(out.float(), expected.float(), atol=tolerance, rtol=tolerance)
        elapsed = _time(lambda options=options: paged_decode_attention(*args, **options), device)
        results.add(case, provider, "time_ms", elapsed, "ms")
        results.add(case, provider, "bandwidth", moved / (elapsed * 1e-3) / 1e9, "GB/s")


def bench_prefill(results: Results, requests: int, prefix: int, new: int, dtype: torch.dtype, device: str) -> None:
    case = f"prefill_R{requests}_P{prefix}_Q{new}"
    lengths = [prefix + new] * requests
    key_cache, value_cache, tables = make_pool(lengths, dtype, device)
    seq_lens = torch.tensor(lengths, dtype=torch.int32, device=device)
    starts = torch.arange(0, (requests + 1) * new, new, dtype=torch.int32, device=device)
    generator = torch.Generator().manual_seed(2)
    query = torch.randn(requests * new, NUM_Q_HEADS, HEAD_DIM, generator=generator).to(dtype).to(device)
    args = (query, key_cache, value_cache, tables, seq_lens, starts)
    expected = paged_prefill_attention(*args, backend="torch")
    work = requests * new * (prefix + new) * NUM_Q_HEADS // 64
    for provider, options in _providers(device, work, decode=False):
        out = paged_prefill_attention(*args, **options)
        tolerance = 2e-2 if dtype != torch.float32 else 1e-4
        torch.testing.assert_close(out.float(), expected.float(), atol=tolerance, rtol=tolerance)
        elapsed = _time(lambda options=options: paged_prefill_attention(*args, **options), device)
        results.add(case, provider, "time_ms", elapsed, "ms")


def main() -> None:
    args = parse_args("paged_attention", __doc__)
    device = args.device
    print(environment_line(device))
    results = Results("paged_attention", args.out)
    if device == "cuda":
        dtype = torch.bfloat16
        decode_cases = [(32, 1024), (32, 8192), (256, 1024)] + ([] if args.quick else [(256, 8192)])
        prefill_cases = [(8, 512, 512)] + ([] if args.quick else [(16, 8192, 128)])
    else:
        dtype = torch.float32
        decode_cases = [(8, 256), (32, 1024)] + ([] if args.quick else [(32, 4096)])
        prefill_cases = [(4, 64, 64)] + ([] if args.quick else [(8, 512, 128)])
    for rows, context in decode_cases:
        bench_decode(results, rows, context, dtype, device)
    for requests, prefix, new in prefill_cases:
        bench_prefill(results, requests, prefix, new, dtype, device)
    results.finish(args.out, title=f"bench_paged_attention ({device}, {dtype})")


if __name__ == "__main__":
    main()
