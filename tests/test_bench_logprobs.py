"""bench_logprobs.py's helpers that only its CUDA run reaches: the tile-budget providers, the
precision measurement, and the verdict line of the tile sweep (checked here so the first GPU run
of a change yields numbers, not a traceback)."""

import os
import sys
import types
from pathlib import Path

import pytest
import torch

from anytime_kernels.logprobs_reference import fused_logprobs_reference

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import bench_logprobs
from common import Results


def small_case(dtype=torch.float32):
    generator = torch.Generator().manual_seed(3)
    hidden = torch.randn(40, 24, generator=generator).to(dtype)
    weight = (torch.randn(300, 24, generator=generator) * 0.4).to(dtype)
    targets = torch.randint(0, 300, (40,), generator=generator)
    grad = torch.randn(40, generator=generator)
    return hidden, weight, targets, grad


def test_environment_provider_runs_the_chosen_path_and_restores_the_environment(monkeypatch):
    """A tile budget of a few KiB (several chunks) on the epilogue path equals fp64 math, and the
    variables are back as they were after the call (unset ones unset)."""
    monkeypatch.delenv("ANYTIME_LOGPROBS_EPILOGUE", raising=False)
    monkeypatch.setenv("ANYTIME_LOGPROBS_TILE_MB", "512")
    provider = bench_logprobs.with_environment(ANYTIME_LOGPROBS_TILE_MB="0.004", ANYTIME_LOGPROBS_EPILOGUE="1")
    errors = bench_logprobs.precision_errors(provider, *small_case())
    assert os.environ["ANYTIME_LOGPROBS_TILE_MB"] == "512" and "ANYTIME_LOGPROBS_EPILOGUE" not in os.environ
    assert errors["logprob_max_abs_err"] < 1e-5
    assert errors["grad_hidden_rel_err"] < 1e-5 and errors["grad_weight_rel_err"] < 1e-5


def test_precision_errors_by_hand():
    """fp64 math through the reference is exact to rounding; a provider whose log-probs are 1.01x
    the true ones has gradients 1.01x the true ones: relative error 0.01, log-prob error 0.01 max|lp|."""
    hidden, weight, targets, grad = (t.double() if t.is_floating_point() else t for t in small_case())
    exact = bench_logprobs.precision_errors(fused_logprobs_reference, hidden, weight, targets, grad)
    assert max(exact.values()) < 1e-6  # the reference upcasts its logits to fp32
    lp = fused_logprobs_reference(hidden, weight, targets)

    def scaled(h, w, t):
        return 1.01 * fused_logprobs_reference(h, w, t)

    errors = bench_logprobs.precision_errors(scaled, hidden, weight, targets, grad)
    assert errors["grad_hidden_rel_err"] == pytest.approx(0.01, rel=1e-4)
    assert errors["grad_weight_rel_err"] == pytest.approx(0.01, rel=1e-4)
    assert errors["logprob_max_abs_err"] == pytest.approx(0.01 * float(lp.abs().max()), rel=1e-3)


def test_tile_line_names_the_fastest_budget():
    results = Results("logprobs")
    for provider, time_ms, memory in (("triton_cublas@128MiB", 58.0, 300), ("triton_epilogue@256MiB", 49.0, 420)):
        results.add("tiles", provider, "time_ms", time_ms, "ms")
        results.add("tiles", provider, "peak_mem_mb", memory, "MiB")
    line = bench_logprobs.tile_line(results, "tiles", 32.4)
    assert line == "tiles: fastest triton_epilogue@256MiB at 49.0 ms, 1.512x the bare GEMMs, peak memory 420 MiB"


def test_target_lines_on_cuda_rate_the_default_and_the_cublas_path():
    """The verdict lines of a CUDA run, by hand: ours (the default) against liger, cce and the bare
    GEMMs, then the cuBLAS path against the bare GEMMs."""
    results = Results("logprobs")
    for provider, time_ms, memory in (
        ("triton", 51.0, 560.0), ("triton_cublas", 54.0, 816.0), ("liger", 490.0, 980.0), ("cce", 130.0, 0.8),
    ):  # fmt: skip
        results.add("case", provider, "time_ms", time_ms, "ms")
        results.add("case", provider, "peak_mem_mb", memory, "MiB")
    results.add("case", "bare_gemms", "time_ms", 32.0, "ms")
    assert bench_logprobs.target_lines(results, "triton", "case", "cuda") == [
        "case: triton/liger time = 0.104 (target <= 1.0) met",
        "case: triton/liger peak memory = 0.571 (target <= 1.0) met",
        "case: triton/cce time = 0.392 (target <= 1.0) met",
        "case: triton/cce peak memory = 700.000 (target <= 1.0) NOT met",
        "case: triton/bare_gemms time = 1.594 (target <= 1.6) met",
        "case: triton_cublas/bare_gemms time = 1.688 (target <= 1.6) NOT met",
    ]


def test_autotune_lines_name_each_kernels_choice_per_key():
    """A CUDA run reports the config every autotuned kernel chose for each key (the interpreter's
    single config is never tuned, so a stand-in autotuner holds the choices here)."""
    import triton

    class Tuned:
        def __init__(self, name, cache):
            self.fn = types.SimpleNamespace(__name__=name)
            self.cache = cache

    wide = triton.Config({"BLOCK_M": 128, "BLOCK_N": 256}, num_warps=8, num_stages=3)
    narrow = triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=4)
    kernels = (Tuned("_lse_tile_kernel", {(1536, False, "tf32"): wide}), Tuned("_grad_tile_kernel", {}))
    kernels[1].cache[(2048, False, "tf32")] = narrow
    assert bench_logprobs.autotune_lines(kernels) == [
        f"autotune _lse_tile_kernel (1536, False, 'tf32'): {wide}",
        f"autotune _grad_tile_kernel (2048, False, 'tf32'): {narrow}",
    ]
    assert "BLOCK_N: 256" in str(wide) and "num_warps: 8" in str(wide)
