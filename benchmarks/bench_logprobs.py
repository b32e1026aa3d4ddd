"""Fused per-token log-probs against the real anchors, at the trainer's shapes, with the gradient
error against fp64 beside every time.

Four workloads (``logprobs_workloads``), each a scalar loss over the LM head, forward + backward:
``logprobs`` (``sum(g * lp)``) and ``entropy`` (plus ``g_ent * entropy``: its gradient path), by
ours (``triton`` on CUDA: the default path; ``cpp`` on CPU), ``triton_cublas`` (ours by the cuBLAS +
reduction path, ``ANYTIME_LOGPROBS_EPILOGUE=0``, CUDA) and ``reference`` (full logits); on CUDA the
``logprobs`` workload also by ``liger_private_eager_helper`` (Liger's private
``_ChunkedSelectiveLogProbFunction``, not a public kernel), ``cce_default_per_token`` (Cut
Cross-Entropy's defaults: gradient filtering and vocabulary sorting) and
``cce_filter_off_per_token`` (``filter_eps=None``); ``grpo``, the trainer's PPO-clip loss:
``triton_grpo`` (``fused_logprobs`` with entropy + ``trainer.loss.policy_loss``, as the learner
runs it) against ``liger_fused_linear_grpo`` (``liger_kernel.chunked_loss``, LM head fused) and
``reference_grpo``; ``cross_entropy``, a scalar sum: ``triton_ce_sum`` against
``liger_fused_linear_ce``, ``cce_default_ce``, ``cce_filter_off_ce`` and ``reference_ce_sum``.
Anchors that do not import are skipped with the reason (the ``bench`` extra; CUDA only).

Every fwd_bwd row carries ``time_ms``, ``peak_mem_mb`` and, against fp64 math on the same rounded
inputs, ``loss_rel_err``, ``grad_hidden_rel_err`` and ``grad_weight_rel_err``. Inputs are peaked
(logits of std 6, targets sampled from the softmax): CCE's filter depends on it. On CUDA two floors
sit in the ``logprobs`` fwd_bwd case: ``bare_gemms`` (logits, grad_hidden, grad_weight) and
``four_gemms`` (plus the recomputed logits: an exact design needs the whole vocabulary's
log-sum-exp before any gradient, so it runs four GEMMs with bounded memory). Also ``fwd`` of the
``logprobs`` workload (no grad, as for old-policy log-probs).

Sizes: CPU N=4096, H=512, V=32000 fp32 (quick: N=1024, H=256, V=8000); CUDA N=16384, H=1536 (and
2048: ours and the floors), V=151936 bf16, then a tile sweep of both Triton paths at
``TILE_BUDGETS_MB`` and an M sweep of ours (64k, 256k rows; quick: 64k). A CUDA run prints the
config every autotuned kernel chose (``autotune ...`` lines) after each workload and in its notes.
Targets: CPU fwd_bwd peak memory <= 25% of reference and time <= reference; CUDA ours within 1.25x
of ``four_gemms`` (and 1.6x of ``bare_gemms``), faster than each anchor of its workload at equal or
lower gradient error. (CCE adds its gradients into bf16 in place and holds almost nothing; ours
accumulate in fp32: one fp32 ``[M, H]`` buffer besides the tile.)
"""

from __future__ import annotations

import os
import traceback

import torch
from common import Results, environment_line, parse_args, peak_memory_mb, synchronize, time_ms
from logprobs_workloads import (
    WORKLOADS,
    anchors,
    composed,
    exact_gradients,
    gradient_errors,
    make_batch,
    ours,
    per_token_anchors,
)
from logprobs_workloads import reference as reference_per_token

from anytime_kernels import logprobs_epilogue

# The tile budgets of the CUDA sweep (MiB): memory against GEMM width, for both paths.
TILE_BUDGETS_MB = (128, 256, 768)
ERROR_METRICS = ("loss_rel_err", "grad_hidden_rel_err", "grad_weight_rel_err")


def with_environment(**variables: str):
    """Ours (``backend="triton"``) as a per-token function with ``variables`` set while the forward
    runs: the path and the tile budget are read once per forward and kept by its backward."""

    def per_token(hidden, weight, targets, return_entropy=False):
        previous = {name: os.environ.get(name) for name in variables}
        os.environ.update(variables)
        try:
            return ours("triton")(hidden, weight, targets, return_entropy)
        finally:
            for name, value in previous.items():
                if value is None:
                    del os.environ[name]
                else:
                    os.environ[name] = value

    return per_token


def our_providers(workload: str, device: str) -> dict:
    """Ours (and the full-logits reference) composed into ``workload``'s loss, named for what they are."""
    suffix = {"logprobs": "", "entropy": "", "grpo": "_grpo", "cross_entropy": "_ce_sum"}[workload]
    name = "triton" if device == "cuda" else "cpp"
    providers = {f"{name}{suffix}": composed(ours(), WORKLOADS[workload])}
    if device == "cuda" and workload in ("logprobs", "entropy"):
        providers["triton_cublas"] = composed(with_environment(ANYTIME_LOGPROBS_EPILOGUE="0"), WORKLOADS[workload])
    providers[f"reference{suffix}"] = composed(reference_per_token, WORKLOADS[workload])
    return providers


def floors(hidden: torch.Tensor, weight: torch.Tensor) -> dict:
    """``bare_gemms``: logits = h @ W.T, grad_hidden = dz @ W, grad_weight = dz.T @ h with a
    preallocated dz; ``four_gemms``: the same plus the logits again (the backward's recompute)."""
    hidden, weight = hidden.detach(), weight.detach()
    grad_logits = torch.randn(hidden.shape[0], weight.shape[0], device=hidden.device).to(hidden.dtype)

    def bare():
        torch.mm(hidden, weight.T)
        torch.mm(grad_logits, weight)
        torch.mm(grad_logits.T, hidden)

    def four():
        torch.mm(hidden, weight.T)
        bare()

    return {"bare_gemms": bare, "four_gemms": four}


def size_name(num_rows: int, width: int, vocab: int, dtype: torch.dtype) -> str:
    return f"N{num_rows}_H{width}_V{vocab}_{str(dtype).removeprefix('torch.')}"


class Bench:
    """One run: the results, where it runs, and its notes (verdicts, skips, failures, autotune choices)."""

    def __init__(self, results: Results, device: str, warmup: int, repeat: int):
        self.results, self.device, self.warmup, self.repeat = results, device, warmup, repeat
        self.notes: list[str] = []

    def measure(self, case: str, name: str, fn) -> None:
        if self.device == "cuda":
            fn()  # Triton autotuning, torch.compile and cuBLAS workspaces stay out of the measurements
            synchronize(self.device)
        self.results.add(case, name, "peak_mem_mb", peak_memory_mb(fn, self.device), "MiB")
        self.results.add(case, name, "time_ms", time_ms(fn, self.device, warmup=self.warmup, repeat=self.repeat), "ms")

    def workload(self, workload: str, batch, size: str, third_party: bool = True) -> None:
        """fwd_bwd of ``workload`` by ours, the reference and (``third_party``) its anchors, each with
        its errors against fp64 in the same case."""
        case = f"fwd_bwd_{size}" if workload == "logprobs" else f"{workload}_fwd_bwd_{size}"
        providers = our_providers(workload, self.device)
        foreign = {}
        if third_party:
            foreign, skipped = anchors(workload, self.device)
            self.note(*(f"{case}: skipped {reason}" for reason in skipped))
        exact = exact_gradients(batch, WORKLOADS[workload])
        for name, provider in {**providers, **foreign}.items():
            try:
                self.measure(case, name, backward_step(provider, batch))
                for metric, value in gradient_errors(provider, batch, exact).items():
                    self.results.add(case, name, metric, value, "")
            except Exception as error:  # a third-party anchor failing is reported, and the run goes on
                if name not in foreign:
                    raise
                self.note(f"{case}: {name} failed: {type(error).__name__}: {error}")
                traceback.print_exc()
        del exact
        if self.device == "cuda":
            self.note(*logprobs_epilogue.autotune_choices(), echo=True)

    def note(self, *lines: str, echo: bool = True) -> None:
        for line in lines:
            if line not in self.notes:
                self.notes.append(line)
                if echo:
                    print(line, flush=True)


def backward_step(provider, batch):
    def run():
        batch.hidden.grad = batch.weight.grad = None
        provider(batch).backward()

    return run


def forward_step(per_token, batch):
    def run():
        with torch.no_grad():
            return per_token(batch.hidden, batch.weight, batch.targets, False)

    return run


def plan(device: str, quick: bool) -> dict:
    """Sizes ``(N, H, V)`` of the run: the first gets every workload and anchor, the others ours
    and the floors, the sweep ours alone; dtype, and the timing repeats."""
    if device == "cuda":
        return {
            "dtype": torch.bfloat16,
            "sizes": [(16384, 1536, 151936)] + ([] if quick else [(16384, 2048, 151936)]),
            "sweep": [(65536, 1536, 151936)] + ([] if quick else [(262144, 1536, 151936)]),
            "warmup": 1,
            "repeat": 5,
        }
    sizes = [(1024, 256, 8000)] if quick else [(4096, 512, 32000)]
    return {"dtype": torch.float32, "sizes": sizes, "sweep": [], "warmup": 0, "repeat": 3}


def run(bench: Bench, sizes: list, sweep: list, dtype: torch.dtype, tensor_device: str) -> None:
    """Every measurement of a run, in the order of what it decides, so a run stopped at its time
    limit keeps the most telling rows. ``bench.device`` picks the providers and floors;
    ``tensor_device`` holds the tensors (the same, except in the CPU test of the CUDA run's logic)."""
    device = bench.device
    ours_name = "triton" if device == "cuda" else "cpp"

    def logprobs_and_floors(batch, size: str, third_party: bool) -> None:
        per_token = {ours_name: ours(), "reference": reference_per_token}
        if device == "cuda":
            per_token["triton_cublas"] = with_environment(ANYTIME_LOGPROBS_EPILOGUE="0")
        if third_party:
            per_token.update(per_token_anchors(device)[0])
        for name, fn in per_token.items():
            bench.measure(f"fwd_{size}", name, forward_step(fn, batch))
        bench.workload("logprobs", batch, size, third_party)
        if device == "cuda":
            for name, fn in floors(batch.hidden, batch.weight).items():
                bench.results.add(f"fwd_bwd_{size}", name, "time_ms", time_ms(fn, device, warmup=2, repeat=5), "ms")
        bench.note(*target_lines(bench.results, ours_name, f"fwd_bwd_{size}", device))

    size = size_name(*sizes[0], dtype)
    batch = make_batch(*sizes[0], dtype, tensor_device)
    logprobs_and_floors(batch, size, third_party=True)
    for workload in ("entropy", "grpo", "cross_entropy"):
        bench.workload(workload, batch, size)
        bench.note(*anchor_lines(bench.results, f"{workload}_fwd_bwd_{size}", workload, device))
    if device == "cuda":
        # Tile budgets of both paths at the first size: what the default should be.
        for megabytes in TILE_BUDGETS_MB:
            for name, epilogue in (("triton_cublas", "0"), ("triton_epilogue", "1")):
                per_token = with_environment(
                    ANYTIME_LOGPROBS_TILE_MB=str(megabytes), ANYTIME_LOGPROBS_EPILOGUE=epilogue
                )
                provider = composed(per_token, WORKLOADS["logprobs"])
                bench.measure(f"tiles_fwd_bwd_{size}", f"{name}@{megabytes}MiB", backward_step(provider, batch))
        bare = bench.results.value(f"fwd_bwd_{size}", "bare_gemms", "time_ms")
        bench.note(tile_line(bench.results, f"tiles_fwd_bwd_{size}", bare))
    del batch
    for shape in sizes[1:]:
        batch = make_batch(*shape, dtype, tensor_device)
        logprobs_and_floors(batch, size_name(*shape, dtype), third_party=False)
        bench.workload("entropy", batch, size_name(*shape, dtype), third_party=False)
        del batch
    for shape in sweep:
        batch = make_batch(*shape, dtype, tensor_device)
        provider = composed(ours(), WORKLOADS["logprobs"])
        bench.measure(f"fwd_bwd_{size_name(*shape, dtype)}", ours_name, backward_step(provider, batch))
        del batch
        bench.note(sweep_line(bench.results, ours_name, sizes[0], shape, dtype))
    if device == "cuda":
        bench.note(*logprobs_epilogue.autotune_choices(), echo=False)


def main() -> None:
    args = parse_args("logprobs", __doc__)
    print(environment_line(args.device))
    settings = plan(args.device, args.quick)
    bench = Bench(Results("logprobs", args.out), args.device, settings["warmup"], settings["repeat"])
    run(bench, settings["sizes"], settings["sweep"], settings["dtype"], args.device)
    bench.results.finish(args.out, notes=bench.notes)


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


def sweep_line(results: Results, ours_name: str, base: tuple, size: tuple, dtype: torch.dtype) -> str:
    """Time and peak memory per row at ``size`` relative to ``base``: 1.0 means linear in M."""

    def case(shape):
        return f"fwd_bwd_{size_name(*shape, dtype)}"

    rows = size[0] / base[0]
    time_ratio = results.value(case(size), ours_name, "time_ms") / results.value(case(base), ours_name, "time_ms")
    memory_ratio = results.value(case(size), ours_name, "peak_mem_mb") / results.value(
        case(base), ours_name, "peak_mem_mb"
    )
    return (
        f"M sweep {base[0]} -> {size[0]} rows: time per row x{time_ratio / rows:.2f}, peak memory per row "
        f"x{memory_ratio / rows:.2f} (1.00 = linear in M)"
    )


def _verdict(case: str, label: str, ratio: float, limit: float) -> str:
    return f"{case}: {label} = {ratio:.3f} (target <= {limit}) {'met' if ratio <= limit else 'NOT met'}"


def target_lines(results: Results, ours_name: str, case: str, device: str) -> list[str]:
    """Verdicts of the ``logprobs`` workload: against the reference (CPU), the floors and the cuBLAS
    path (CUDA), and against each anchor of its case (``anchor_lines``)."""

    def value(provider, metric):
        return results.value(case, provider, metric)

    fused_time, fused_mem = value(ours_name, "time_ms"), value(ours_name, "peak_mem_mb")
    if device == "cpu":
        return [
            _verdict(case, f"{ours_name}/reference peak memory", fused_mem / value("reference", "peak_mem_mb"), 0.25),
            _verdict(case, f"{ours_name}/reference time", fused_time / value("reference", "time_ms"), 1.0),
        ]
    lines = anchor_lines(results, case, "logprobs", device)
    lines.append(_verdict(case, f"{ours_name}/four_gemms time", fused_time / value("four_gemms", "time_ms"), 1.25))
    lines.append(_verdict(case, f"{ours_name}/bare_gemms time", fused_time / value("bare_gemms", "time_ms"), 1.6))
    if value("triton_cublas", "time_ms") is not None:
        cublas_ratio = value("triton_cublas", "time_ms") / value("four_gemms", "time_ms")
        lines.append(_verdict(case, "triton_cublas/four_gemms time", cublas_ratio, 1.25))
    return lines


# Ours in each workload's case, and the third-party anchors it is rated against there.
OURS_AND_ANCHORS = {
    "logprobs": ("triton", ("liger_private_eager_helper", "cce_default_per_token", "cce_filter_off_per_token")),
    "entropy": ("triton", ()),
    "grpo": ("triton_grpo", ("liger_fused_linear_grpo",)),
    "cross_entropy": ("triton_ce_sum", ("liger_fused_linear_ce", "cce_default_ce", "cce_filter_off_ce")),
}


def anchor_lines(results: Results, case: str, workload: str, device: str) -> list[str]:
    """Ours against each anchor measured in ``case``: time, peak memory, and gradient error
    (grad_hidden; ours must be at most the anchor's)."""
    if device != "cuda":
        return []
    ours_name, anchor_names = OURS_AND_ANCHORS[workload]
    lines = []
    for anchor in anchor_names:
        if results.value(case, anchor, "time_ms") is None:
            continue
        for metric, label in (("time_ms", "time"), ("peak_mem_mb", "peak memory")):
            ratio = results.value(case, ours_name, metric) / results.value(case, anchor, metric)
            lines.append(_verdict(case, f"{ours_name}/{anchor} {label}", ratio, 1.0))
        error, anchor_error = (results.value(case, name, "grad_hidden_rel_err") for name in (ours_name, anchor))
        if error is not None and anchor_error:
            lines.append(_verdict(case, f"{ours_name}/{anchor} grad_hidden error", error / anchor_error, 1.0))
    return lines


if __name__ == "__main__":
    main()
