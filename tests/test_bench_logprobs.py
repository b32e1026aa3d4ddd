"""bench_logprobs.py's helpers that only its CUDA run reaches: the tile-budget providers, the
precision measurement, and the verdict line of the tile sweep (checked here so the first GPU run
of a change yields numbers, not a traceback)."""

import os
import sys
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
    for provider, time_ms, memory in (("triton@128MiB", 58.0, 300), ("triton_epilogue@256MiB", 49.0, 420)):
        results.add("tiles", provider, "time_ms", time_ms, "ms")
        results.add("tiles", provider, "peak_mem_mb", memory, "MiB")
    line = bench_logprobs.tile_line(results, "tiles", 32.4)
    assert line == "tiles: fastest triton_epilogue@256MiB at 49.0 ms, 1.512x the bare GEMMs, peak memory 420 MiB"
