"""Fused per-token log-probs: ours (`triton` on CUDA, `cpp` on CPU: what backend `auto` picks) against the full-logits `reference`,
Liger-Kernel's chunked selective log-prob (`liger`) and Apple's Cut Cross-Entropy (`cce`, CUDA
only, exact gradients: `filter_eps=None`), both from the `bench` extra, plus on CUDA the three
bare GEMMs any implementation must run (`bare_gemms`: logits, grad_hidden, grad_weight), and on
CUDA `triton_epilogue`: ours with the softmax statistics in a Triton GEMM epilogue
(``ANYTIME_LOGPROBS_EPILOGUE=1``, ``anytime_kernels/logprobs_epilogue.py``).

Cases `fwd` (no grad, as for old-policy log-probs) and `fwd_bwd` (log-probs, then the backward
of sum(g * logprobs) into hidden and the LM head). Sizes: CPU N=4096, H=512, V=32000 fp32 (quick:
N=1024, H=256, V=8000); CUDA N=16384, H=1536 (and 2048), V=151936 bf16, then an M sweep of
ours alone (64k, 256k rows; quick: 64k) whose time and memory per row should stay flat.
Targets: CPU fwd_bwd peak memory <= 25% of reference and time <= reference; CUDA faster than
liger and cce with lower peak memory, and fwd_bwd within 1.6x of bare_gemms.
"""

from __future__ import annotations

import os

import torch
from common import Results, environment_line, parse_args, peak_memory_mb, synchronize, time_ms

from anytime_kernels import fused_logprobs
from anytime_kernels.logprobs_reference import fused_logprobs_reference

try:
    from liger_kernel.chunked_loss.fused_linear_ppo import _ChunkedSelectiveLogProbFunction
except ImportError:
    _ChunkedSelectiveLogProbFunction = None


try:
    from cut_cross_entropy import linear_cross_entropy
except ImportError:
    linear_cross_entropy = None


def liger_logprobs(hidden, weight, targets):
    return _ChunkedSelectiveLogProbFunction.apply(hidden, weight, targets, None, 1.0, 4096)


def epilogue_logprobs(hidden, weight, targets):
    """Ours with the GEMM-epilogue kernels (``ANYTIME_LOGPROBS_EPILOGUE=1``; the backward follows the forward)."""
    previous = os.environ.get("ANYTIME_LOGPROBS_EPILOGUE")
    os.environ["ANYTIME_LOGPROBS_EPILOGUE"] = "1"
    try:
        return fused_logprobs(hidden, weight, targets, backend="triton")
    finally:
        if previous is None:
            del os.environ["ANYTIME_LOGPROBS_EPILOGUE"]
        else:
            os.environ["ANYTIME_LOGPROBS_EPILOGUE"] = previous


def cce_logprobs(hidden, weight, targets):
    return -linear_cross_entropy(hidden, weight, targets, reduction="none", filter_eps=None)


PROVIDERS = {
    "ours": lambda hidden, weight, targets: fused_logprobs(hidden, weight, targets),
    "triton_epilogue": epilogue_logprobs,
    "reference": fused_logprobs_reference,
    "liger": liger_logprobs,
    "cce": cce_logprobs,
}


def make_inputs(num_rows: int, width: int, vocab: int, dtype: torch.dtype, device: str):
    generator = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(num_rows, width, generator=generator, device=device).to(dtype)
    weight = (torch.randn(vocab, width, generator=generator, device=device) * width**-0.5).to(dtype)
    targets = torch.randint(0, vocab, (num_rows,), generator=generator, device=device)
    grad = torch.randn(num_rows, generator=generator, device=device)
    return hidden.requires_grad_(), weight.requires_grad_(), targets, grad


def step(provider, mode, hidden, weight, targets, grad):
    def forward():
        with torch.no_grad():
            return provider(hidden, weight, targets)

    def forward_backward():
        hidden.grad = weight.grad = None
        (provider(hidden, weight, targets) * grad).sum().backward()

    return forward if mode == "fwd" else forward_backward


def bare_gemms(hidden, weight):
    """logits = h @ W.T, grad_hidden = dz @ W, grad_weight = dz.T @ h, with a preallocated dz."""
    hidden, weight = hidden.detach(), weight.detach()
    grad_logits = torch.randn(hidden.shape[0], weight.shape[0], device=hidden.device).to(hidden.dtype)

    def run():
        torch.mm(hidden, weight.T)
        torch.mm(grad_logits, weight)
        torch.mm(grad_logits.T, hidden)

    return run


def main() -> None:
    args = parse_args("logprobs", __doc__)
    device = args.device
    print(environment_line(device))
    sweep = []
    if device == "cuda":
        dtype, sizes = torch.bfloat16, [(16384, 1536, 151936)] + ([] if args.quick else [(16384, 2048, 151936)])
        sweep = [(65536, 1536, 151936)] + ([] if args.quick else [(262144, 1536, 151936)])
        warmup, repeat = 1, 5
    else:
        dtype, sizes = torch.float32, [(1024, 256, 8000)] if args.quick else [(4096, 512, 32000)]
        warmup, repeat = 0, 3
    ours = "triton" if device == "cuda" else "cpp"
    providers = {ours if name == "ours" else name: fn for name, fn in PROVIDERS.items()}
    if _ChunkedSelectiveLogProbFunction is None:
        del providers["liger"]
        print("liger: not available (pip install liger-kernel, the `bench` extra); no liger rows")
    if device != "cuda":
        del providers["triton_epilogue"]  # on CPU the Triton kernels run only in the interpreter
    if linear_cross_entropy is None or device != "cuda":
        del providers["cce"]
        print("cce: needs CUDA and cut-cross-entropy (the `bench` extra); no cce rows")
    results = Results("logprobs", args.out)
    checks = []

    def measure(case, name, fn):
        if device == "cuda":
            fn()  # Triton autotuning and cuBLAS workspaces stay out of the measurements
            synchronize(device)
        results.add(case, name, "peak_mem_mb", peak_memory_mb(fn, device), "MiB")
        results.add(case, name, "time_ms", time_ms(fn, device, warmup=warmup, repeat=repeat), "ms")

    for num_rows, width, vocab in sizes:
        size = f"N{num_rows}_H{width}_V{vocab}_{str(dtype).removeprefix('torch.')}"
        inputs = make_inputs(num_rows, width, vocab, dtype, device)
        for mode in ("fwd", "fwd_bwd"):
            for name, provider in providers.items():
                measure(f"{mode}_{size}", name, step(provider, mode, *inputs))
        if device == "cuda":
            gemms = bare_gemms(*inputs[:2])
            results.add(f"fwd_bwd_{size}", "bare_gemms", "time_ms", time_ms(gemms, device, warmup=2, repeat=5), "ms")
        checks.extend(target_lines(results, ours, f"fwd_bwd_{size}", device))
        del inputs
    base = sizes[0]
    for num_rows, width, vocab in sweep:
        size = f"N{num_rows}_H{width}_V{vocab}_{str(dtype).removeprefix('torch.')}"
        inputs = make_inputs(num_rows, width, vocab, dtype, device)
        measure(f"fwd_bwd_{size}", ours, step(providers[ours], "fwd_bwd", *inputs))
        del inputs
        checks.append(sweep_line(results, ours, base, (num_rows, width, vocab), dtype))
    results.finish(args.out, notes=checks)


def sweep_line(results: Results, ours: str, base: tuple, size: tuple, dtype: torch.dtype) -> str:
    """Time and peak memory per row at ``size`` relative to ``base``: 1.0 means linear in M."""

    def case(shape):
        return f"fwd_bwd_N{shape[0]}_H{shape[1]}_V{shape[2]}_{str(dtype).removeprefix('torch.')}"

    rows = size[0] / base[0]
    time_ratio = results.value(case(size), ours, "time_ms") / results.value(case(base), ours, "time_ms") / rows
    memory_ratio = (
        results.value(case(size), ours, "peak_mem_mb") / results.value(case(base), ours, "peak_mem_mb") / rows
    )
    return (
        f"M sweep {base[0]} -> {size[0]} rows: time per row x{time_ratio:.2f}, peak memory per row "
        f"x{memory_ratio:.2f} (1.00 = linear in M)"
    )


def target_lines(results: Results, ours: str, case: str, device: str) -> list[str]:
    def value(provider, metric):
        return results.value(case, provider, metric)

    def line(label, ratio, limit):
        verdict = "met" if ratio <= limit else "NOT met"
        return f"{case}: {label} = {ratio:.3f} (target <= {limit}) {verdict}"

    fused_time, fused_mem = value(ours, "time_ms"), value(ours, "peak_mem_mb")
    lines = []
    if device == "cpu":
        lines.append(line(f"{ours}/reference peak memory", fused_mem / value("reference", "peak_mem_mb"), 0.25))
        lines.append(line(f"{ours}/reference time", fused_time / value("reference", "time_ms"), 1.0))
        return lines
    for baseline in ("liger", "cce"):
        if value(baseline, "time_ms") is not None:
            lines.append(line(f"{ours}/{baseline} time", fused_time / value(baseline, "time_ms"), 1.0))
            lines.append(line(f"{ours}/{baseline} peak memory", fused_mem / value(baseline, "peak_mem_mb"), 1.0))
    lines.append(line(f"{ours}/bare_gemms time", fused_time / value("bare_gemms", "time_ms"), 1.6))
    if value("triton_epilogue", "time_ms") is not None:
        lines.append(
            line(
                "triton_epilogue/bare_gemms time",
                value("triton_epilogue", "time_ms") / value("bare_gemms", "time_ms"),
                1.6,
            )
        )
    return lines


if __name__ == "__main__":
    main()
