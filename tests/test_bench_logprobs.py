"""bench_logprobs.py's logic that a CPU can run: the workloads' losses and their fp64 gradients,
the peaked inputs, the providers' names and rows, the third-party anchors (absent here: skipped
with the reason; stand-ins written from their documented APIs check what the bench passes them),
the floors and the verdict lines (checked here so the first GPU run of a change yields numbers,
not a traceback)."""

import math
import os
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import anytime_kernels.logprobs_epilogue as logprobs_epilogue
from anytime_kernels.logprobs_reference import fused_logprobs_reference

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import bench_logprobs
import logprobs_workloads
from common import Results
from logprobs_workloads import WORKLOADS, Batch


def small_batch(num_rows=64, width=24, vocab=300, dtype=torch.float32, length=16):
    generator = torch.Generator().manual_seed(3)
    hidden = torch.randn(num_rows, width, generator=generator).to(dtype)
    weight = (torch.randn(vocab, width, generator=generator) * 0.6).to(dtype)
    targets = torch.randint(0, vocab, (num_rows,), generator=generator)
    logprobs = fused_logprobs_reference(hidden.double(), weight.double(), targets).float()
    return Batch(
        hidden=hidden.requires_grad_(),
        weight=weight.requires_grad_(),
        targets=targets,
        grad_logprobs=torch.randn(num_rows, generator=generator),
        grad_entropy=torch.randn(num_rows, generator=generator) * 0.1,
        advantages=torch.randn(num_rows // length, generator=generator),
        old_logprobs=logprobs + torch.randn(num_rows, generator=generator) * 0.3,
    )


def autograd_fp64(batch, workload):
    """The workload's loss and gradients by fp64 autograd through full fp64 logits."""
    hidden = batch.hidden.detach().double().requires_grad_()
    weight = batch.weight.detach().double().requires_grad_()
    log_probs = torch.log_softmax(hidden @ weight.T, dim=-1)
    logprobs = log_probs.gather(1, batch.targets.unsqueeze(1)).squeeze(1)
    entropy = -(log_probs.exp() * log_probs).sum(dim=-1)
    loss = workload.loss(logprobs, entropy if workload.entropy else None, batch)
    loss.backward()
    return float(loss.detach()), hidden.grad, weight.grad


@pytest.mark.parametrize("name", list(WORKLOADS))
def test_exact_gradients_match_fp64_autograd_in_chunks(monkeypatch, name):
    """The chunked fp64 gradients (dL/dz by formula, per 7 rows) equal autograd through full logits."""
    monkeypatch.setattr(logprobs_workloads, "EXACT_ROWS", 7)
    batch = small_batch()
    loss, grad_hidden, grad_weight = logprobs_workloads.exact_gradients(batch, WORKLOADS[name])
    expected = autograd_fp64(batch, WORKLOADS[name])
    assert loss == pytest.approx(expected[0], rel=1e-10)
    torch.testing.assert_close(grad_hidden, expected[1], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(grad_weight, expected[2], rtol=1e-9, atol=1e-12)


def test_the_grpo_workload_is_the_trainers_ppo_clip_by_hand():
    """Two tokens, one sequence of 2, weights 1/2: ratios e^0.5 (clipped at 1.2 for A > 0) and 1."""
    batch = Batch(
        hidden=torch.zeros(2, 1), weight=torch.zeros(3, 1), targets=torch.tensor([0, 1]),
        grad_logprobs=torch.zeros(2), grad_entropy=torch.zeros(2), advantages=torch.tensor([2.0]),
        old_logprobs=torch.tensor([-1.5, -1.0]),
    )  # fmt: skip
    logprobs = torch.tensor([-1.0, -1.0], dtype=torch.float64)
    loss = WORKLOADS["grpo"].loss(logprobs, torch.zeros(2, dtype=torch.float64), batch)
    assert float(loss) == pytest.approx(0.5 * (-2.0 * 1.2) + 0.5 * (-2.0 * 1.0))


def test_gradient_errors_by_hand():
    """Exact math through gradient_errors reads 0; a provider whose loss is 1.01x the true one has
    gradients 1.01x the true ones: relative errors 0.01."""
    batch = small_batch(dtype=torch.float64)
    workload = WORKLOADS["entropy"]
    exact = logprobs_workloads.exact_gradients(batch, workload)
    reference = logprobs_workloads.composed(logprobs_workloads.reference, workload)
    assert max(logprobs_workloads.gradient_errors(reference, batch, exact).values()) < 1e-6  # fp32 logits inside

    errors = logprobs_workloads.gradient_errors(lambda b: 1.01 * reference(b), batch, exact)
    for metric in ("loss_rel_err", "grad_hidden_rel_err", "grad_weight_rel_err"):
        assert errors[metric] == pytest.approx(0.01, rel=2e-4), metric


def test_make_batch_is_peaked_and_samples_its_targets():
    """Logits of std LOGIT_STD: the mean entropy is far below log V; targets drawn from the softmax
    have a mean negative log-prob equal to the mean entropy (the cross-entropy of a distribution's
    own samples), up to sampling noise."""
    batch = logprobs_workloads.make_batch(2048, 64, 2000, torch.float32, "cpu")
    assert batch.sequences == 2 and batch.length == 1024 and batch.advantages.shape == (2,)
    logprobs, entropy = fused_logprobs_reference(batch.hidden.detach(), batch.weight.detach(), batch.targets, return_entropy=True)  # fmt: skip
    assert float(entropy.mean()) < 0.5 * math.log(2000)
    assert float(-logprobs.mean()) == pytest.approx(float(entropy.mean()), abs=0.15)
    assert float((batch.old_logprobs - logprobs).std()) == pytest.approx(0.1, rel=0.1)
    with pytest.raises(ValueError, match="multiple of 1024"):
        logprobs_workloads.make_batch(1500, 8, 50, torch.float32, "cpu")


def test_anchors_absent_here_are_skipped_with_the_reason():
    """Without CUDA every anchor is skipped for it; without the packages each names what to install."""
    assert logprobs_workloads.anchors("grpo", "cpu") == ({}, ["liger_fused_linear_grpo: need CUDA"])
    providers, skipped = logprobs_workloads.anchors("cross_entropy", "cuda")
    if providers:
        pytest.skip("liger-kernel or cut-cross-entropy is installed here")
    assert [line.split(":")[0] for line in skipped] == ["liger_fused_linear_ce", "cce_default_ce", "cce_filter_off_ce"]
    assert "pip install liger-kernel" in skipped[0] and "pip install cut-cross-entropy" in skipped[1]
    assert logprobs_workloads.anchors("entropy", "cuda") == ({}, [])
    with pytest.raises(ValueError, match="workload must be one of"):
        logprobs_workloads.anchors("ppo", "cuda")


class _FakeGRPOLoss:
    """Liger's LigerFusedLinearGRPOLoss as documented: log-probs of [B, T] tokens, PPO clip, and for
    loss_type dr_grpo the masked token sum / (B x max_completion_length); returns (loss, metrics)."""

    def __init__(self, beta, use_ref_model, epsilon_low, epsilon_high, loss_type, max_completion_length, temperature):
        assert (beta, use_ref_model, loss_type) == (0.0, False, "dr_grpo")
        self.low, self.high, self.length, self.temperature = (
            epsilon_low,
            epsilon_high,
            max_completion_length,
            temperature,
        )

    def __call__(self, _input, lin_weight, selected_token_ids, attention_mask, advantages, old_per_token_logps):
        assert _input.dim() == 3 and selected_token_ids.shape == attention_mask.shape == old_per_token_logps.shape
        log_probs = torch.log_softmax((_input @ lin_weight.T).float() / self.temperature, dim=-1)
        per_token = log_probs.gather(-1, selected_token_ids.unsqueeze(-1)).squeeze(-1)
        ratio = torch.exp(per_token - old_per_token_logps)
        clipped = ratio.clamp(1 - self.low, 1 + self.high)
        token_loss = -torch.min(ratio * advantages.unsqueeze(1), clipped * advantages.unsqueeze(1))
        return (token_loss * attention_mask).sum() / (_input.shape[0] * self.length), []


class _FakeFusedLinearCE:
    def __init__(self, reduction):
        self.reduction = reduction

    def __call__(self, lin_weight, _input, target):
        return F.cross_entropy((_input @ lin_weight.T).float(), target, reduction=self.reduction)


def _fake_linear_cross_entropy(e, c, targets, reduction="mean", filter_eps="auto"):
    assert filter_eps in ("auto", None)
    return F.cross_entropy((e @ c.T).float(), targets, reduction=reduction)


class _FakeSelectiveLogProb:
    @staticmethod
    def apply(hidden, weight, targets, bias, temperature, vocab_chunk_size):
        assert bias is None and temperature == 1.0
        return torch.log_softmax((hidden @ weight.T).float(), dim=-1).gather(1, targets.unsqueeze(1)).squeeze(1)


@pytest.fixture
def fake_anchors(monkeypatch):
    modules = {
        "liger_kernel": types.ModuleType("liger_kernel"),
        "liger_kernel.chunked_loss": types.SimpleNamespace(LigerFusedLinearGRPOLoss=_FakeGRPOLoss),
        "liger_kernel.chunked_loss.fused_linear_ppo": types.SimpleNamespace(
            _ChunkedSelectiveLogProbFunction=_FakeSelectiveLogProb
        ),
        "liger_kernel.transformers": types.SimpleNamespace(LigerFusedLinearCrossEntropyLoss=_FakeFusedLinearCE),
        "cut_cross_entropy": types.SimpleNamespace(linear_cross_entropy=_fake_linear_cross_entropy),
    }
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)


@pytest.mark.parametrize("workload", ["logprobs", "grpo", "cross_entropy"])
def test_each_anchor_is_called_for_the_same_loss_as_ours(fake_anchors, workload):
    """Stand-ins computing each anchor's documented math with full logits: through the bench's calls
    (shapes [B, T], dr_grpo with max_completion_length T, reduction sum, per-token CE negated) each
    gives ours' loss and gradients, so a time ratio compares the same work."""
    providers, skipped = logprobs_workloads.anchors(workload, "cuda")
    assert skipped == [] and list(providers) == list(bench_logprobs.OURS_AND_ANCHORS[workload][1])
    batch = small_batch()
    exact = logprobs_workloads.exact_gradients(batch, WORKLOADS[workload])
    for name, provider in providers.items():
        errors = logprobs_workloads.gradient_errors(provider, batch, exact)
        assert max(errors.values()) < 1e-5, (name, errors)
    per_token, skipped = logprobs_workloads.per_token_anchors("cuda")
    assert skipped == [] and sorted(per_token) == sorted(bench_logprobs.OURS_AND_ANCHORS["logprobs"][1])


def test_a_workload_writes_errors_beside_each_time_and_names_ours_for_what_it_is(monkeypatch):
    """On CPU the grpo workload runs ours (cpp) and the reference: each row set holds time, peak
    memory and the three errors in one case; an anchor that fails is noted and the run goes on."""
    monkeypatch.setattr(
        logprobs_workloads, "anchors", lambda workload, device: ({"broken_anchor": _raise}, ["other: need CUDA"])
    )
    monkeypatch.setattr(bench_logprobs, "anchors", logprobs_workloads.anchors)
    bench = bench_logprobs.Bench(Results("logprobs"), "cpu", warmup=0, repeat=1)
    bench.workload("grpo", small_batch(), "tiny")
    metrics = {}
    for row in bench.results.rows:
        assert row["case"] == "grpo_fwd_bwd_tiny"
        metrics.setdefault(row["provider"], {})[row["metric"]] = row["value"]
    assert sorted(metrics) == ["cpp_grpo", "reference_grpo"]
    for values in metrics.values():
        assert set(values) == {"time_ms", "peak_mem_mb", "loss_rel_err", "grad_hidden_rel_err", "grad_weight_rel_err"}
        assert values["grad_hidden_rel_err"] < 1e-5 and values["grad_weight_rel_err"] < 1e-5
    assert bench.notes[0] == "grpo_fwd_bwd_tiny: skipped other: need CUDA"
    assert bench.notes[1].startswith("grpo_fwd_bwd_tiny: broken_anchor failed: RuntimeError: anchor broke")


def _raise(batch):
    raise RuntimeError("anchor broke")


def test_floors_run_three_and_four_gemms(monkeypatch):
    calls = []
    real_mm = torch.mm

    def counting_mm(left, right, *args, **kwargs):
        calls.append((tuple(left.shape), tuple(right.shape)))
        return real_mm(left, right, *args, **kwargs)

    floors = bench_logprobs.floors(torch.randn(8, 4), torch.randn(30, 4))
    monkeypatch.setattr(torch, "mm", counting_mm)
    floors["bare_gemms"]()
    assert calls == [((8, 4), (4, 30)), ((8, 30), (30, 4)), ((30, 8), (8, 4))]
    calls.clear()
    floors["four_gemms"]()
    assert calls == [((8, 4), (4, 30)), ((8, 4), (4, 30)), ((8, 30), (30, 4)), ((30, 8), (8, 4))]


def test_environment_provider_runs_the_chosen_path_and_restores_the_environment(monkeypatch):
    """A tile budget of a few KiB (several chunks) on the epilogue path equals fp64 math, and the
    variables are back as they were after the call (unset ones unset)."""
    monkeypatch.delenv("ANYTIME_LOGPROBS_EPILOGUE", raising=False)
    monkeypatch.setenv("ANYTIME_LOGPROBS_TILE_MB", "512")
    per_token = bench_logprobs.with_environment(ANYTIME_LOGPROBS_TILE_MB="0.004", ANYTIME_LOGPROBS_EPILOGUE="1")
    batch = small_batch(num_rows=32)
    exact = logprobs_workloads.exact_gradients(batch, WORKLOADS["entropy"])
    provider = logprobs_workloads.composed(per_token, WORKLOADS["entropy"])
    errors = logprobs_workloads.gradient_errors(provider, batch, exact)
    assert os.environ["ANYTIME_LOGPROBS_TILE_MB"] == "512" and "ANYTIME_LOGPROBS_EPILOGUE" not in os.environ
    assert max(errors.values()) < 1e-5


def test_tile_line_names_the_fastest_budget():
    results = Results("logprobs")
    for provider, time_ms, memory in (("triton_cublas@128MiB", 58.0, 300), ("triton_epilogue@256MiB", 49.0, 420)):
        results.add("tiles", provider, "time_ms", time_ms, "ms")
        results.add("tiles", provider, "peak_mem_mb", memory, "MiB")
    line = bench_logprobs.tile_line(results, "tiles", 32.4)
    assert line == "tiles: fastest triton_epilogue@256MiB at 49.0 ms, 1.512x the bare GEMMs, peak memory 420 MiB"


def test_target_lines_on_cuda_rate_ours_against_the_floors_and_each_anchor():
    """The verdicts of a CUDA run's logprobs case, by hand: ours against each anchor (time, memory,
    gradient error), then against four_gemms (1.25) and bare_gemms (1.6), and the cuBLAS path."""
    results = Results("logprobs")
    rows = (
        ("triton", 51.0, 560.0, 2.4e-3), ("triton_cublas", 54.0, 816.0, 2.4e-3),
        ("liger_private_eager_helper", 490.0, 980.0, 1.6e-3), ("cce_default_per_token", 100.0, 0.8, 1.2e-2),
    )  # fmt: skip
    for provider, time_ms, memory, error in rows:
        results.add("case", provider, "time_ms", time_ms, "ms")
        results.add("case", provider, "peak_mem_mb", memory, "MiB")
        results.add("case", provider, "grad_hidden_rel_err", error, "")
    results.add("case", "bare_gemms", "time_ms", 32.0, "ms")
    results.add("case", "four_gemms", "time_ms", 44.0, "ms")
    assert bench_logprobs.target_lines(results, "triton", "case", "cuda") == [
        "case: triton/liger_private_eager_helper time = 0.104 (target <= 1.0) met",
        "case: triton/liger_private_eager_helper peak memory = 0.571 (target <= 1.0) met",
        "case: triton/liger_private_eager_helper grad_hidden error = 1.500 (target <= 1.0) NOT met",
        "case: triton/cce_default_per_token time = 0.510 (target <= 1.0) met",
        "case: triton/cce_default_per_token peak memory = 700.000 (target <= 1.0) NOT met",
        "case: triton/cce_default_per_token grad_hidden error = 0.200 (target <= 1.0) met",
        "case: triton/four_gemms time = 1.159 (target <= 1.25) met",
        "case: triton/bare_gemms time = 1.594 (target <= 1.6) met",
        "case: triton_cublas/four_gemms time = 1.227 (target <= 1.25) met",
    ]
    assert bench_logprobs.anchor_lines(results, "case", "logprobs", "cpu") == []


def test_autotune_choices_name_each_kernels_choice_per_key(monkeypatch):
    """A CUDA run reports the config every autotuned kernel of both paths chose for each key (the
    interpreter's single config is never tuned, so the caches are filled here by hand)."""
    import triton

    wide = triton.Config({"BLOCK_M": 128, "BLOCK_N": 256}, num_warps=8, num_stages=3)
    narrow = triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=4)
    monkeypatch.setattr(logprobs_epilogue._lse_tile_kernel, "cache", {(16384, 151936, 1536, False, "tf32"): wide})
    monkeypatch.setattr(logprobs_epilogue._grad_tile_kernel, "cache", {(16384, 16384, 2048, True, "tf32"): narrow})
    from anytime_kernels import logprobs_triton

    monkeypatch.setattr(logprobs_triton._chunk_stats_kernel, "cache", {})
    monkeypatch.setattr(logprobs_triton._chunk_grad_kernel, "cache", {})
    assert logprobs_epilogue.autotune_choices() == [
        f"autotune _lse_tile_kernel (16384, 151936, 1536, False, 'tf32'): {wide}",
        f"autotune _grad_tile_kernel (16384, 16384, 2048, True, 'tf32'): {narrow}",
    ]
    assert "BLOCK_N: 256" in str(wide) and "num_warps: 8" in str(wide)


def test_the_cuda_runs_logic_end_to_end_on_cpu_tensors(monkeypatch, fake_anchors):
    """The CUDA run's sequence (every workload with its anchors, the floors, the tile sweep, the
    second size, the M sweep, the verdicts) on tiny CPU tensors, with the stand-in anchors and the
    CUDA timers replaced by one call each: every provider gets its rows, every verdict its line."""
    monkeypatch.setattr(bench_logprobs, "synchronize", lambda device: None)
    monkeypatch.setattr(bench_logprobs, "peak_memory_mb", lambda fn, device: (fn(), 1.0)[1])
    monkeypatch.setattr(bench_logprobs, "time_ms", lambda fn, device, warmup, repeat: (fn(), 2.0)[1])
    monkeypatch.setattr(bench_logprobs, "TILE_BUDGETS_MB", (1,))
    monkeypatch.setattr(logprobs_workloads, "SEQUENCE_LENGTH", 16)
    bench = bench_logprobs.Bench(Results("logprobs"), "cuda", warmup=0, repeat=1)
    bench_logprobs.run(bench, [(32, 16, 100), (32, 24, 100)], [(64, 16, 100)], torch.float32, "cpu")
    providers = {}
    for row in bench.results.rows:
        providers.setdefault(row["case"], {}).setdefault(row["provider"], set()).add(row["metric"])
    size = "N32_H16_V100_float32"
    per_token = {"triton", "reference", "triton_cublas", *bench_logprobs.OURS_AND_ANCHORS["logprobs"][1]}
    assert set(providers[f"fwd_{size}"]) == per_token
    assert set(providers[f"fwd_bwd_{size}"]) == per_token | {"bare_gemms", "four_gemms"}
    assert set(providers[f"entropy_fwd_bwd_{size}"]) == {"triton", "triton_cublas", "reference"}
    assert set(providers[f"grpo_fwd_bwd_{size}"]) == {"triton_grpo", "reference_grpo", "liger_fused_linear_grpo"}
    assert set(providers[f"cross_entropy_fwd_bwd_{size}"]) == {
        "triton_ce_sum", "reference_ce_sum", *bench_logprobs.OURS_AND_ANCHORS["cross_entropy"][1]
    }  # fmt: skip
    timed_and_rated = {"time_ms", "peak_mem_mb", *bench_logprobs.ERROR_METRICS}
    for case in (f"fwd_bwd_{size}", f"grpo_fwd_bwd_{size}", f"cross_entropy_fwd_bwd_{size}"):
        for name, metrics in providers[case].items():
            assert metrics == ({"time_ms"} if name.endswith("_gemms") else timed_and_rated), (case, name)
    assert set(providers[f"tiles_fwd_bwd_{size}"]) == {"triton_cublas@1MiB", "triton_epilogue@1MiB"}
    assert set(providers["fwd_bwd_N32_H24_V100_float32"]) == {"triton", "reference", "triton_cublas", "bare_gemms", "four_gemms"}  # fmt: skip
    assert set(providers["fwd_bwd_N64_H16_V100_float32"]) == {"triton"}
    assert not any("failed" in line or "skipped" in line for line in bench.notes), bench.notes
    for needle in (
        f"fwd_bwd_{size}: triton/four_gemms time", f"fwd_bwd_{size}: triton/cce_default_per_token grad_hidden error",
        f"grpo_fwd_bwd_{size}: triton_grpo/liger_fused_linear_grpo time",
        f"cross_entropy_fwd_bwd_{size}: triton_ce_sum/liger_fused_linear_ce peak memory",
        f"tiles_fwd_bwd_{size}: fastest", "M sweep 32 -> 64 rows",
    ):  # fmt: skip
        assert any(line.startswith(needle) for line in bench.notes), needle
    errors = [row["value"] for row in bench.results.rows if row["metric"] in bench_logprobs.ERROR_METRICS]
    assert max(errors) < 1e-4  # every provider (stand-ins included) computed its workload's loss
