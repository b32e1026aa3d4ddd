"""Fused per-token log-probs: ours (`triton` on CUDA, `cpp` on CPU: what backend `auto` picks) against the full-logits `reference`,
Liger-Kernel's chunked selective log-prob (`liger`) and Apple's Cut Cross-Entropy (`cce`, CUDA
only, exact gradients: `filter_eps=None`), both from the `bench` extra, plus on CUDA the three
bare GEMMs any implementation must run (`bare_gemms`: logits, grad_hidden, grad_weight), and on
CUDA `triton_cublas`: ours by the path that is not the default for bf16 (cuBLAS GEMMs writing fp32
logits tiles + Triton reductions, ``ANYTIME_LOGPROBS_EPILOGUE=0``, ``anytime_kernels/logprobs_triton.py``);
`triton` runs the default, the softmax statistics in a Triton GEMM epilogue (``logprobs_epilogue.py``).

Cases `fwd` (no grad, as for old-policy log-probs) and `fwd_bwd` (log-probs, then the backward
of sum(g * logprobs) into hidden and the LM head). Sizes: CPU N=4096, H=512, V=32000 fp32 (quick:
N=1024, H=256, V=8000); CUDA N=16384, H=1536 (and 2048), V=151936 bf16, then an M sweep of
ours alone (64k, 256k rows; quick: 64k) whose time and memory per row should stay flat. On CUDA
also a tile sweep (case ``tiles_fwd_bwd_*``: both Triton paths at ``TILE_BUDGETS_MB``, through
``ANYTIME_LOGPROBS_TILE_MB``), and on both devices a ``precision_*`` case: every provider's
log-prob and gradient error against fp64 math (CCE accumulates its gradients in bf16).
Targets: CPU fwd_bwd peak memory <= 25% of reference and time <= reference; CUDA faster than
liger and cce with lower peak memory, and fwd_bwd within 1.6x of bare_gemms. (CCE adds its
gradients into bf16 in place and holds almost nothing; ours accumulate in fp32, which costs one fp32
``[M, H]`` buffer besides the tile, and the precision case shows the difference.)
"""

from __future__ import annotations

import os

import torch
from common import Results, environment_line, parse_args, peak_memory_mb, synchronize, time_ms

from anytime_kernels import fused_logprobs, logprobs_epilogue
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


def with_environment(**variables: str):
    """Ours (``backend="triton"``) with ``variables`` set while the forward runs: the path and the
    tile budget are read once per forward and kept by its backward."""

    def provider(hidden, weight, targets):
        previous = {name: os.environ.get(name) for name in variables}
        os.environ.update(variables)
        try:
            return fused_logprobs(hidden, weight, targets, backend="triton")
        finally:
            for name, value in previous.items():
                if value is None:
                    del os.environ[name]
                else:
                    os.environ[name] = value

    return provider


# Ours by the cuBLAS + reduction path (ANYTIME_LOGPROBS_EPILOGUE=0; bf16's default is the epilogue path).
cublas_logprobs = with_environment(ANYTIME_LOGPROBS_EPILOGUE="0")
# The tile budgets of the CUDA sweep (MiB): memory against GEMM width, for both paths.
TILE_BUDGETS_MB = (128, 256, 768)


def cce_logprobs(hidden, weight, targets):
    return -linear_cross_entropy(hidden, weight, targets, reduction="none", filter_eps=None)


PROVIDERS = {
    "ours": lambda hidden, weight, targets: fused_logprobs(hidden, weight, targets),
    "triton_cublas": cublas_logprobs,
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


def precision_errors(provider, hidden, weight, targets, grad) -> dict[str, float]:
    """Errors of a provider's log-probs and gradients (of sum(grad * logprobs)) against fp64 math on
    the same rounded inputs: max |logprob error|, and ||error||_F / ||exact||_F of each gradient."""
    hidden_in = hidden.detach().clone().requires_grad_()
    weight_in = weight.detach().clone().requires_grad_()
    logprobs = provider(hidden_in, weight_in, targets)
    (logprobs.float() * grad).sum().backward()
    with torch.no_grad():
        hidden64, weight64 = hidden.detach().double(), weight.detach().double()
        log_probs = torch.log_softmax(hidden64 @ weight64.T, dim=-1)
        exact = log_probs.gather(1, targets.unsqueeze(1)).squeeze(1)
        grad_logits = log_probs.exp_().mul_(-grad.double().unsqueeze(1))  # dL/dz = g * (onehot - p)
        del log_probs
        grad_logits[torch.arange(targets.shape[0], device=targets.device), targets] += grad.double()
        exact_hidden, exact_weight = grad_logits @ weight64, grad_logits.T @ hidden64
        del grad_logits

        def relative(got, wanted):
            return float(torch.linalg.norm(got.double() - wanted) / torch.linalg.norm(wanted))

        return {
            "logprob_max_abs_err": float((logprobs.double() - exact).abs().max()),
            "grad_hidden_rel_err": relative(hidden_in.grad, exact_hidden),
            "grad_weight_rel_err": relative(weight_in.grad, exact_weight),
        }


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
        del providers["triton_cublas"]  # on CPU the Triton kernels run only in the interpreter
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

    def providers_side_by_side(num_rows: int, width: int, vocab: int) -> None:
        size = f"N{num_rows}_H{width}_V{vocab}_{str(dtype).removeprefix('torch.')}"
        inputs = make_inputs(num_rows, width, vocab, dtype, device)
        for mode in ("fwd", "fwd_bwd"):
            for name, provider in providers.items():
                measure(f"{mode}_{size}", name, step(provider, mode, *inputs))
        if device == "cuda":
            gemms = bare_gemms(*inputs[:2])
            results.add(f"fwd_bwd_{size}", "bare_gemms", "time_ms", time_ms(gemms, device, warmup=2, repeat=5), "ms")
        checks.extend(target_lines(results, ours, f"fwd_bwd_{size}", device))

    # In the order of what they decide, so a run stopped at its time limit keeps the most telling rows.
    providers_side_by_side(*sizes[0])
    if device == "cuda":
        # Tile budgets of both paths at the first size: what the default should be.
        num_rows, width, vocab = sizes[0]
        size = f"N{num_rows}_H{width}_V{vocab}_{str(dtype).removeprefix('torch.')}"
        inputs = make_inputs(num_rows, width, vocab, dtype, device)
        for megabytes in TILE_BUDGETS_MB:
            for name, epilogue in (("triton_cublas", "0"), ("triton_epilogue", "1")):
                provider = with_environment(ANYTIME_LOGPROBS_TILE_MB=str(megabytes), ANYTIME_LOGPROBS_EPILOGUE=epilogue)
                measure(f"tiles_fwd_bwd_{size}", f"{name}@{megabytes}MiB", step(provider, "fwd_bwd", *inputs))
        checks.append(
            tile_line(results, f"tiles_fwd_bwd_{size}", results.value(f"fwd_bwd_{size}", "bare_gemms", "time_ms"))
        )
        del inputs
    # Precision of every provider against fp64 math (CCE accumulates its gradients in bf16).
    num_rows, width, vocab = (4096, 1536, 151936) if device == "cuda" else (512, 256, 8000)
    case = f"precision_N{num_rows}_H{width}_V{vocab}_{str(dtype).removeprefix('torch.')}"
    hidden, weight, targets, grad = make_inputs(num_rows, width, vocab, dtype, device)
    for name, provider in providers.items():
        for metric, value in precision_errors(provider, hidden, weight, targets, grad).items():
            results.add(case, name, metric, value, "")
    del hidden, weight, targets, grad
    for size in sizes[1:]:
        providers_side_by_side(*size)
    base = sizes[0]
    for num_rows, width, vocab in sweep:
        size = f"N{num_rows}_H{width}_V{vocab}_{str(dtype).removeprefix('torch.')}"
        inputs = make_inputs(num_rows, width, vocab, dtype, device)
        measure(f"fwd_bwd_{size}", ours, step(providers[ours], "fwd_bwd", *inputs))
        del inputs
        checks.append(sweep_line(results, ours, base, (num_rows, width, vocab), dtype))
    if device == "cuda":
        checks.extend(autotune_lines((logprobs_epilogue._lse_tile_kernel, logprobs_epilogue._grad_tile_kernel)))
    results.finish(args.out, notes=checks)


def autotune_lines(kernels) -> list[str]:
    """The config each autotuned kernel chose per key (hidden size, flags, dtypes), so that a
    timing that moves between GPU runs can be traced to a different choice."""
    return [
        f"autotune {kernel.fn.__name__} {key}: {config}" for kernel in kernels for key, config in kernel.cache.items()
    ]


def tile_line(results: Results, case: str, bare_gemms_ms: float | None) -> str:
    """The fastest (path, tile budget) of the sweep, with its memory and ratio to the bare GEMMs."""
    timed = [
        (row["value"], row["provider"]) for row in results.rows if row["case"] == case and row["metric"] == "time_ms"
    ]
    best_ms, best = min(timed)
    ratio = f", {best_ms / bare_gemms_ms:.3f}x the bare GEMMs" if bare_gemms_ms else ""
    return (
        f"{case}: fastest {best} at {best_ms:.1f} ms{ratio}, peak memory "
        f"{results.value(case, best, 'peak_mem_mb'):.0f} MiB"
    )


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
    if value("triton_cublas", "time_ms") is not None:
        cublas_ratio = value("triton_cublas", "time_ms") / value("bare_gemms", "time_ms")
        lines.append(line("triton_cublas/bare_gemms time", cublas_ratio, 1.6))
    return lines


if __name__ == "__main__":
    main()
