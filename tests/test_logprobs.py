"""fused_logprobs: every backend against the full-logits reference (fp64 for fp32 inputs), edge
cases, a hand-computed case, autocast, and argument errors raised before any kernel runs."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl

import anytime_kernels.advantages_triton as advantages_triton
import anytime_kernels.logprobs as logprobs_module
import anytime_kernels.logprobs_epilogue as logprobs_epilogue
import anytime_kernels.logprobs_plan as logprobs_plan
import anytime_kernels.logprobs_triton as logprobs_triton
from anytime_kernels import IGNORE_INDEX, fused_logprobs
from anytime_kernels.backends import BackendUnavailableError
from anytime_kernels.logprobs_reference import fused_logprobs_reference

BACKENDS = ("cpp", "triton")


def make_case(num_hidden, width, vocab, num_targets=None, *, repeated_rows=False, ignore=(), seed=0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num_hidden, width, generator=generator)
    weight = torch.randn(vocab, width, generator=generator) * (2.0 / math.sqrt(width))
    num_targets = num_hidden if num_targets is None else num_targets
    targets = torch.randint(0, vocab, (num_targets,), generator=generator)
    targets[list(ignore)] = IGNORE_INDEX
    rows = torch.randint(0, num_hidden, (num_targets,), generator=generator) if repeated_rows else None
    grad_logprobs = torch.randn(num_targets, generator=generator)
    grad_entropy = torch.randn(num_targets, generator=generator)
    return hidden, weight, targets, rows, grad_logprobs, grad_entropy


def run(fn, hidden, weight, targets, rows, grad_logprobs, grad_entropy, **kwargs):
    """Values and gradients of sum(g_lp * logprobs + g_ent * entropy) with respect to hidden and weight."""
    hidden = hidden.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_()
    logprobs, entropy = fn(hidden, weight, targets, rows=rows, return_entropy=True, **kwargs)
    loss = (logprobs * grad_logprobs.to(logprobs.dtype)).sum() + (entropy * grad_entropy.to(entropy.dtype)).sum()
    loss.backward()
    return logprobs.detach(), entropy.detach(), hidden.grad, weight.grad


def reference(hidden, weight, targets, rows, grad_logprobs, grad_entropy, temperature=1.0):
    """The reference in fp64 on the same (possibly bf16-rounded) inputs."""

    def fn(h, w, t, rows, return_entropy, temperature):
        return fused_logprobs_reference(h, w, t, rows, temperature, return_entropy)

    return run(
        fn, hidden.double(), weight.double(), targets, rows, grad_logprobs.double(), grad_entropy.double(),
        temperature=temperature,
    )  # fmt: skip


def assert_close(actual, expected, atol, rtol, name):
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(
        actual.double(), expected.double(), atol=atol + rtol * scale, rtol=0, msg=lambda m: f"{name}: {m}"
    )


def check_against_reference(backend, case, temperature=1.0, dtype=torch.float32):
    hidden, weight, targets, rows, grad_logprobs, grad_entropy = case
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    got = run(fused_logprobs, *(hidden, weight, targets, rows, grad_logprobs, grad_entropy),
              temperature=temperature, backend=backend)  # fmt: skip
    expected = reference(hidden, weight, targets, rows, grad_logprobs, grad_entropy, temperature)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    assert got[2].dtype == dtype and got[3].dtype == dtype
    # bf16: gradients are rounded to bf16 and dL/dlogits may be formed in bf16 (triton).
    atol, rtol = (2e-5, 2e-5) if dtype == torch.float32 else (2e-3, 2e-2)
    for name, actual, wanted in zip(("logprobs", "entropy", "grad_hidden", "grad_weight"), got, expected, strict=True):
        assert_close(actual, wanted, atol, rtol, name)


CASES = {
    "vocab_below_tile": dict(num_hidden=5, width=8, vocab=50),
    "vocab_above_tile": dict(num_hidden=37, width=24, vocab=300),
    "repeated_rows": dict(num_hidden=9, width=16, vocab=270, num_targets=40, repeated_rows=True),
    "ignored_targets": dict(num_hidden=13, width=12, vocab=130, ignore=(0, 4, 5, 12)),
    "one_target": dict(num_hidden=1, width=8, vocab=77),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case_name", list(CASES))
def test_fp32_matches_reference(backend, case_name):
    check_against_reference(backend, make_case(**CASES[case_name]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_temperature(backend):
    case = make_case(num_hidden=11, width=16, vocab=200, num_targets=20, repeated_rows=True, ignore=(3,))
    check_against_reference(backend, case, temperature=0.6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_matches_reference(backend):
    case = make_case(num_hidden=19, width=32, vocab=260, num_targets=25, repeated_rows=True, ignore=(2,))
    check_against_reference(backend, case, temperature=0.8, dtype=torch.bfloat16)


def test_cpu_op_several_row_blocks():
    """More rows than the C++ op's row block (512), fp16 included."""
    check_against_reference("cpp", make_case(num_hidden=1100, width=8, vocab=300, ignore=(7, 600)))
    check_against_reference("cpp", make_case(num_hidden=600, width=8, vocab=100), dtype=torch.float16)


def test_cpp_op_many_vocab_tiles_per_worker():
    """One thread: a single worker merges every vocabulary tile (20000 / 256 = 79) into its online
    log-sum-exp, so each merge must rescale the running sums by the tile's new maximum."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        case = make_case(num_hidden=24, width=16, vocab=20000, num_targets=30, repeated_rows=True, ignore=(4,))
        check_against_reference("cpp", case, temperature=0.9)
    finally:
        torch.set_num_threads(threads)


def test_triton_several_vocab_chunks(monkeypatch):
    """Chunk the vocabulary (last chunk ragged) by shrinking the chunk budget."""
    monkeypatch.setattr(logprobs_plan, "CHUNK_BYTES", 30 * 8 * 64)
    monkeypatch.setattr(logprobs_plan, "MIN_CHUNK", 64)
    assert logprobs_plan.plan(30, 250, 4) == ([(0, 30)], 64)
    case = make_case(num_hidden=30, width=16, vocab=250, ignore=(1,))
    check_against_reference("triton", case, temperature=1.3)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16))
def test_triton_several_row_blocks_and_chunks(monkeypatch, dtype):
    """Rows in blocks (last one ragged) times vocabulary chunks: running statistics merge across
    chunks, grad_weight accumulates across row blocks; equal to one block within rounding."""
    case = make_case(num_hidden=23, width=16, vocab=300, num_targets=45, repeated_rows=True, ignore=(0, 30))
    hidden, weight = case[0].to(dtype), case[1].to(dtype)
    single = run(fused_logprobs, hidden, weight, *case[2:], temperature=0.7, backend="triton")
    monkeypatch.setattr(logprobs_plan, "ROW_BLOCK", 7)
    monkeypatch.setattr(logprobs_plan, "MIN_CHUNK", 64)
    monkeypatch.setattr(logprobs_plan, "CHUNK_BYTES", 7 * 8 * 64)
    # 45 rows in 7 balanced blocks (3 of 7 rows, 4 of 6) x 64-column chunks.
    assert logprobs_plan.plan(45, 300, 4) == ([(0, 7), (7, 14), (14, 21), (21, 27), (27, 33), (33, 39), (39, 45)], 64)
    check_against_reference("triton", case, temperature=0.7, dtype=dtype)
    blocked = run(fused_logprobs, hidden, weight, *case[2:], temperature=0.7, backend="triton")
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    for name, got, expected in zip(("logprobs", "entropy", "grad_hidden", "grad_weight"), blocked, single, strict=True):
        assert_close(got, expected, tolerance, tolerance, name)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16))
@pytest.mark.parametrize("case_name", ["vocab_above_tile", "repeated_rows", "ignored_targets", "one_target"])
def test_epilogue_kernels_match_reference(monkeypatch, case_name, dtype):
    """The GEMM-epilogue path (logits tiles reduced in registers, never stored) against fp64."""
    monkeypatch.setenv("ANYTIME_LOGPROBS_EPILOGUE", "1")
    assert logprobs_module._backend_module("triton", torch.zeros(1, dtype=dtype))[0].func is logprobs_epilogue.forward
    check_against_reference("triton", make_case(**CASES[case_name]), temperature=0.8, dtype=dtype)


@triton.jit
def _tile_ids_probe(out_ptr, num_rows, num_cols, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    pid_m, pid_n = logprobs_epilogue._tile_ids(num_rows, num_cols, BLOCK_M, BLOCK_N, GROUP_M)
    pid = tl.program_id(0)
    tl.store(out_ptr + 2 * pid, pid_m)
    tl.store(out_ptr + 2 * pid + 1, pid_n)


@pytest.mark.parametrize(("rows", "cols", "group"), [(100, 70, 3), (16, 300, 4), (513, 33, 16), (48, 48, 1)])
def test_epilogue_grouped_order_visits_every_tile_once(rows, cols, group):
    """The grouped launch order (row tiles in groups of GROUP_M, columns walked inside a group,
    a short last group) is a permutation of the (row tile, column tile) grid, in the intended order."""
    block_m, block_n = 16, 8
    tiles_m, tiles_n = -(-rows // block_m), -(-cols // block_n)
    out = torch.full((tiles_m * tiles_n, 2), -1, dtype=torch.int32)
    _tile_ids_probe[(tiles_m * tiles_n,)](out, rows, cols, BLOCK_M=block_m, BLOCK_N=block_n, GROUP_M=group)
    expected = [
        (first + m, n)
        for first in range(0, tiles_m, group)
        for n in range(tiles_n)
        for m in range(min(group, tiles_m - first))
    ]
    assert [tuple(pair) for pair in out.tolist()] == expected


# Shared memory one H100 block may use (227 KiB); a config above it compiles but fails at launch.
H100_SHARED_PER_BLOCK = 232448
# Stack bytes per thread a kept config may use: the bf16 128x256 forward without entropy keeps 8
# (triton 3.9, sm_90), two registers; the configs pruned for spilling held 96 to 13,000.
SPILL_TOLERANCE_BYTES = 16


def test_every_kernel_compiles_for_hopper_and_the_epilogue_gemms_use_pipelined_wgmma():
    """Every Triton kernel the package launches, with the argument types its wrapper passes and every
    autotune config the GPU would try, compiles for sm_90 (no GPU needed) within an H100 block's
    shared memory; the interpreter that runs the CPU tests accepts code the compiler refuses. The
    epilogue kernels' bf16 GEMMs become wgmma tensor-core instructions fed by cp.async loads in at
    least two shared-memory stages: a K loop that Triton could not pipeline would run far below
    cuBLAS, and only a GPU run would tell. Every launch asks for FMA contraction."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    script = Path(__file__).parent / "fixtures" / "compile_sm90.py"
    done = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in done.stdout.splitlines()]
    launched = {name for module in (logprobs_triton, logprobs_epilogue, advantages_triton) for name in dir(module)}
    assert {record["kernel"] for record in records} == {name for name in launched if name.endswith("_kernel")}
    for kernel, flag in (("_chunk_stats_kernel", "HAS_ENTROPY"), ("_lse_tile_kernel", "HAS_ENTROPY"),
                         ("_chunk_grad_kernel", "HAS_ENTROPY_GRAD"), ("_grad_tile_kernel", "HAS_ENTROPY_GRAD")):  # fmt: skip
        assert {record["constexprs"][flag] for record in records if record["kernel"] == kernel} == {False, True}
    # (This process runs the interpreter's single config; the script sees the GPU configs.)
    assert (
        len({(r["constexprs"]["BLOCK_V"], r["num_warps"]) for r in records if r["kernel"] == "_chunk_grad_kernel"}) > 1
    )
    epilogue_bf16 = [r for r in records if r["kernel"] in ("_lse_tile_kernel", "_grad_tile_kernel") and "*bf16" in r["pointer_types"]]  # fmt: skip
    assert len(epilogue_bf16) >= 4
    for record in records:
        assert record["shared"] <= H100_SHARED_PER_BLOCK, record
        # No config the autotuner may try spills more than a couple of registers (the 128x256
        # forward with the entropy sums spilled 456 bytes before it was pruned for entropy).
        assert record["registers"] <= 255 and record["stack"] <= SPILL_TOLERANCE_BYTES, record
        # FMA contraction as measured, whatever the triton's default (3.10 turns it off; 3.9 warns).
        assert record["enable_fp_fusion"] is True, record
    assert "TRITON_DEFAULT_FP_FUSION" not in done.stderr
    widths = {(r["kernel"], r["constexprs"].get("HAS_ENTROPY")): set() for r in epilogue_bf16}
    for record in epilogue_bf16:
        widths[record["kernel"], record["constexprs"].get("HAS_ENTROPY")].add(record["constexprs"]["BLOCK_N"])
    assert widths[("_lse_tile_kernel", True)] == {128} and widths[("_lse_tile_kernel", False)] == {128, 256}
    for record in epilogue_bf16:
        constexprs = record["constexprs"]
        stage_bytes = (constexprs["BLOCK_M"] + constexprs["BLOCK_N"]) * constexprs["BLOCK_K"] * 2
        assert record["wgmma"] > 0 and record["cp_async"] > 0, record
        assert record["shared"] >= 2 * stage_bytes, record


def test_the_epilogue_path_is_the_default_for_16_bit_operands_on_cuda(monkeypatch):
    """Unset (or empty): the epilogue path for bf16 on CUDA, where an H100 measured it ahead, and
    the cuBLAS path for fp32 and fp16 (not timed) and off CUDA; 1 and 0 force either; anything else is refused."""
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    cases = {
        (cuda, torch.bfloat16): True, (cuda, torch.float16): False, (cuda, torch.float32): False,
        (cpu, torch.bfloat16): False, (cpu, torch.float32): False,
    }  # fmt: skip
    for value in (None, "", " "):
        if value is None:
            monkeypatch.delenv("ANYTIME_LOGPROBS_EPILOGUE", raising=False)
        else:
            monkeypatch.setenv("ANYTIME_LOGPROBS_EPILOGUE", value)
        for (device, dtype), expected in cases.items():
            assert logprobs_epilogue.enabled(device, dtype) is expected, (value, device, dtype)
    for value, expected in (("1", True), ("0", False)):
        monkeypatch.setenv("ANYTIME_LOGPROBS_EPILOGUE", value)
        assert {logprobs_epilogue.enabled(device, dtype) for device, dtype in cases} == {expected}
    monkeypatch.setenv("ANYTIME_LOGPROBS_EPILOGUE", "yes")
    with pytest.raises(ValueError, match=r"ANYTIME_LOGPROBS_EPILOGUE must be 0 or 1 .*got 'yes'"):
        logprobs_epilogue.enabled(cuda, torch.bfloat16)
    # fused_logprobs reads it through _backend_module, once per forward, with the operands' dtype.
    monkeypatch.delenv("ANYTIME_LOGPROBS_EPILOGUE")
    assert logprobs_module._backend_module("triton", torch.zeros(1))[0].func is logprobs_triton.forward


def test_backward_keeps_the_forwards_tile_budget_and_path(monkeypatch):
    """The tile budget and the path are read once per forward: changing the environment before the
    backward changes neither (the backward's chunk widths follow the forward's budget)."""
    case = make_case(num_hidden=23, width=40, vocab=301, num_targets=45, repeated_rows=True, ignore=(0, 30))
    monkeypatch.setattr(logprobs_plan, "MIN_CHUNK", 64)
    widths = []
    real_plan = logprobs_plan.plan

    def spy(num_rows, vocab, element_size, budget=None, stores_logits=True):
        widths.append((budget, stores_logits))
        return real_plan(num_rows, vocab, element_size, budget, stores_logits)

    monkeypatch.setattr(logprobs_plan, "plan", spy)
    hidden, weight, targets, rows, grad_logprobs, _ = case
    hidden, weight = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    monkeypatch.setenv("ANYTIME_LOGPROBS_TILE_MB", "0.01")
    monkeypatch.setenv("ANYTIME_LOGPROBS_EPILOGUE", "1")
    logprobs = fused_logprobs(hidden, weight, targets, rows=rows, backend="triton")
    monkeypatch.setenv("ANYTIME_LOGPROBS_TILE_MB", "not a number")  # would raise if read again
    monkeypatch.delenv("ANYTIME_LOGPROBS_EPILOGUE")
    (logprobs * grad_logprobs).sum().backward()
    assert widths == [(int(0.01 * 2**20), False)]  # one backward chunk loop, epilogue-sized; no default forward
    expected = reference(
        hidden.detach(), weight.detach(), targets, rows, grad_logprobs, torch.zeros_like(grad_logprobs)
    )
    assert_close(hidden.grad, expected[2].float(), 2e-5, 2e-5, "grad_hidden")
    assert_close(weight.grad, expected[3].float(), 2e-5, 2e-5, "grad_weight")


def test_epilogue_kernels_several_row_blocks_and_chunks_equal_the_default_path(monkeypatch):
    """Row blocks (each merges its vocabulary-tile partials) and backward chunks, against the
    default cuBLAS + reduction path on the same operands."""
    case = make_case(num_hidden=23, width=40, vocab=301, num_targets=45, repeated_rows=True, ignore=(0, 30))
    default = run(fused_logprobs, *case, temperature=0.7, backend="triton")
    monkeypatch.setattr(logprobs_plan, "ROW_BLOCK", 7)
    monkeypatch.setattr(logprobs_plan, "MIN_CHUNK", 64)
    monkeypatch.setattr(logprobs_plan, "CHUNK_BYTES", 7 * 8 * 64)
    monkeypatch.setenv("ANYTIME_LOGPROBS_EPILOGUE", "1")
    check_against_reference("triton", case, temperature=0.7)
    fused = run(fused_logprobs, *case, temperature=0.7, backend="triton")
    for name, got, expected in zip(("logprobs", "entropy", "grad_hidden", "grad_weight"), fused, default, strict=True):
        assert_close(got, expected, 1e-5, 1e-5, name)


@pytest.mark.parametrize("epilogue", ("0", "1"))
def test_backward_holds_one_gradient_tile(monkeypatch, epilogue):
    """Every (chunk, row block) of the backward writes dL/dlogits into one buffer, and the row blocks
    of every chunk add into one fp32 grad_weight buffer. A tile allocated per iteration is allocated
    while the last one is still referenced: two tiles at the peak (the H100 run measured 1072 MiB
    for a 512 MiB tile). Seven row blocks x five (cuBLAS path) or three (epilogue) chunks."""
    case = make_case(num_hidden=23, width=40, vocab=301, num_targets=45, repeated_rows=True, ignore=(0, 30))
    monkeypatch.setattr(logprobs_plan, "ROW_BLOCK", 7)
    monkeypatch.setattr(logprobs_plan, "MIN_CHUNK", 64)
    monkeypatch.setattr(logprobs_plan, "CHUNK_BYTES", 7 * 8 * 64)
    monkeypatch.setenv("ANYTIME_LOGPROBS_EPILOGUE", epilogue)
    tiles, outs = [], []
    real_accumulate = logprobs_triton._accumulate

    def spy(out, left, right):
        tiles.append(left.untyped_storage().data_ptr())
        outs.append(out.untyped_storage().data_ptr())
        real_accumulate(out, left, right)

    monkeypatch.setattr(logprobs_triton, "_accumulate", spy)
    check_against_reference("triton", case, temperature=0.7)
    assert len(tiles) == 2 * 7 * (5 if epilogue == "0" else 3)  # grad_weight and grad_hidden per tile
    assert len(set(tiles)) == 1  # every dL/dlogits tile (and its transpose) in one buffer
    assert len(set(outs)) == 2  # grad_hidden, and one fp32 grad_weight chunk buffer for every chunk


@pytest.mark.parametrize("backend", (*BACKENDS, "reference"))
def test_no_targets(backend):
    hidden, weight = torch.randn(4, 8, requires_grad=True), torch.randn(30, 8, requires_grad=True)
    empty = torch.zeros(0, dtype=torch.long)
    logprobs, entropy = fused_logprobs(hidden, weight, empty, rows=empty, return_entropy=True, backend=backend)
    assert logprobs.shape == (0,) and entropy.shape == (0,) and logprobs.dtype == torch.float32
    (logprobs.sum() + entropy.sum()).backward()
    assert torch.equal(hidden.grad, torch.zeros(4, 8)) and torch.equal(weight.grad, torch.zeros(30, 8))
    assert fused_logprobs(torch.zeros(0, 8), weight.detach(), empty, backend=backend).shape == (0,)


@pytest.mark.parametrize("backend", BACKENDS)
def test_uniform_distribution_by_hand(backend):
    """A zero LM head gives the uniform distribution: log-prob -log V, entropy log V, at any temperature."""
    vocab = 150
    hidden, weight = torch.randn(3, 8), torch.zeros(vocab, 8)
    targets = torch.tensor([0, vocab - 1, IGNORE_INDEX])
    logprobs, entropy = fused_logprobs(hidden, weight, targets, temperature=0.5, return_entropy=True, backend=backend)
    expected = torch.tensor([-math.log(vocab), -math.log(vocab), 0.0])
    torch.testing.assert_close(logprobs, expected)
    torch.testing.assert_close(entropy, torch.tensor([math.log(vocab), math.log(vocab), 0.0]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignored_target_gets_no_gradient(backend):
    hidden, weight = torch.randn(3, 8, requires_grad=True), torch.randn(40, 8, requires_grad=True)
    targets = torch.tensor([IGNORE_INDEX, 5, IGNORE_INDEX])
    logprobs, entropy = fused_logprobs(hidden, weight, targets, return_entropy=True, backend=backend)
    assert logprobs[0] == 0 and entropy[0] == 0 and entropy[1] > 0
    (logprobs.sum() + entropy.sum()).backward()
    assert torch.equal(hidden.grad[0], torch.zeros(8)) and torch.equal(hidden.grad[2], torch.zeros(8))
    assert hidden.grad[1].abs().sum() > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_partial_gradients(backend):
    """Only the entropy feeds the loss; the LM head is frozen; no-grad calls work."""
    hidden, weight, targets, _, _, grad_entropy = make_case(num_hidden=7, width=8, vocab=90)
    hidden_leaf = hidden.clone().requires_grad_()
    _, entropy = fused_logprobs(hidden_leaf, weight, targets, return_entropy=True, backend=backend)
    (entropy * grad_entropy).sum().backward()
    expected = hidden.double().requires_grad_()
    _, ref_entropy = fused_logprobs_reference(expected, weight.double(), targets, return_entropy=True)
    (ref_entropy * grad_entropy.double()).sum().backward()
    assert_close(hidden_leaf.grad, expected.grad, 2e-5, 2e-5, "grad_hidden")
    with torch.no_grad():
        logprobs = fused_logprobs(hidden, weight, targets, backend=backend)
    assert_close(logprobs, fused_logprobs_reference(hidden.double(), weight.double(), targets), 2e-5, 2e-5, "logprobs")


@pytest.mark.parametrize("weight_dtype", (torch.float32, torch.bfloat16))
def test_autocast_casts_like_lm_head(weight_dtype):
    """Under CPU autocast (bf16) both operands are cast to bf16 and gradients reach the original weight."""
    hidden, weight, targets, _, grad_logprobs, _ = make_case(num_hidden=6, width=16, vocab=120)
    weight_leaf = weight.to(weight_dtype).clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logprobs = fused_logprobs(hidden, weight_leaf, targets)
    (logprobs * grad_logprobs).sum().backward()
    assert weight_leaf.grad.dtype == weight_dtype
    expected = weight.to(torch.bfloat16).double().requires_grad_()
    ref = fused_logprobs_reference(hidden.to(torch.bfloat16).double(), expected, targets)
    (ref * grad_logprobs.double()).sum().backward()
    assert_close(logprobs, ref.detach(), 2e-3, 1e-2, "logprobs")
    assert_close(weight_leaf.grad, expected.grad, 2e-3, 2e-2, "grad_weight")


def _good():
    return torch.randn(4, 8), torch.randn(20, 8), torch.tensor([1, 2, 3, IGNORE_INDEX])


BAD_INPUTS = {
    "H mismatch": (lambda h, w, t: (h, torch.randn(20, 7), t, {}), r"disagree on H"),
    "target too large": (
        lambda h, w, t: (h, w, torch.tensor([1, 20, 3, 4]), {}),
        r"targets\[1\] = 20 is outside \[0, 20\)",
    ),
    "negative target": (lambda h, w, t: (h, w, torch.tensor([1, 2, -5, 4]), {}), r"targets\[2\] = -5"),
    "row out of range": (
        lambda h, w, t: (h, w, t, {"rows": torch.tensor([0, 4, 1, 1])}),
        r"rows\[1\] = 4 is outside \[0, 4\)",
    ),
    "rows length": (lambda h, w, t: (h, w, t, {"rows": torch.tensor([0, 1])}), r"rows must be .* shaped like targets"),
    "targets int32": (lambda h, w, t: (h, w, t.int(), {}), r"targets must be a 1-D int64"),
    "rows float": (lambda h, w, t: (h, w, t, {"rows": torch.zeros(4)}), r"rows must be a 1-D int64"),
    "integer hidden": (lambda h, w, t: (h.long(), w, t, {}), r"float32/bfloat16/float16"),
    "dtype mix": (lambda h, w, t: (h, w.double(), t, {}), r"share one dtype"),
    "fp64": (lambda h, w, t: (h.double(), w.double(), t, {}), r"float32/bfloat16/float16"),
    "targets per row": (lambda h, w, t: (h, w, t[:3], {}), r"one entry per hidden row \(4\), got 3"),
    "device mix": (lambda h, w, t: (h, w.to("meta"), t, {}), r"one device"),
    "temperature": (lambda h, w, t: (h, w, t, {"temperature": 0.0}), r"temperature must be a finite number > 0"),
    "backend": (lambda h, w, t: (h, w, t, {"backend": "cuda"}), r"backend must be one of"),
    "1-D hidden": (lambda h, w, t: (h[0], w, t, {}), r"hidden must be \[N, H\]"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_raises_before_any_kernel(name, monkeypatch):
    def no_kernel(backend, hidden):
        raise AssertionError(f"a {backend} kernel was reached with bad input")

    monkeypatch.setattr(logprobs_module, "_backend_module", no_kernel)
    build, message = BAD_INPUTS[name]
    hidden, weight, targets, kwargs = build(*_good())
    with pytest.raises(ValueError, match=message):
        fused_logprobs(hidden, weight, targets, **kwargs)


def test_backend_errors_follow_the_one_policy():
    hidden, weight, targets = _good()
    with pytest.raises(BackendUnavailableError, match="backend 'cpp' runs on CPU tensors, got tensors on meta"):
        fused_logprobs(hidden.to("meta"), weight.to("meta"), targets.to("meta"), backend="cpp", check_values=False)
    with pytest.raises(TypeError, match="hidden and weight must be tensors"):
        fused_logprobs(hidden.tolist(), weight, targets)
    with pytest.raises(TypeError, match="backend must be a string"):
        fused_logprobs(hidden, weight, targets, backend=1)


@pytest.mark.gpu
@pytest.mark.parametrize("epilogue", ("", "0"))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_cuda_triton_matches_reference(monkeypatch, dtype, epilogue):
    """``auto`` on CUDA, by each dtype's default path (unset) and by the cuBLAS path (0)."""
    monkeypatch.setenv("ANYTIME_LOGPROBS_EPILOGUE", epilogue)
    case = make_case(num_hidden=300, width=256, vocab=5003, num_targets=400, repeated_rows=True, ignore=(3, 77))
    case = tuple(x.cuda() if isinstance(x, torch.Tensor) else x for x in case)
    check_against_reference("auto", case, temperature=0.9, dtype=dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_cuda_epilogue_kernels_match_reference(monkeypatch, dtype):
    monkeypatch.setenv("ANYTIME_LOGPROBS_EPILOGUE", "1")
    monkeypatch.setattr(logprobs_plan, "CHUNK_BYTES", 2**20)
    monkeypatch.setattr(logprobs_plan, "ROW_BLOCK", 200)
    case = make_case(num_hidden=300, width=256, vocab=5003, num_targets=400, repeated_rows=True, ignore=(3, 77))
    case = tuple(x.cuda() if isinstance(x, torch.Tensor) else x for x in case)
    check_against_reference("triton", case, temperature=0.9, dtype=dtype)


@pytest.mark.gpu
def test_cuda_epilogue_kernels_over_several_tile_groups(monkeypatch):
    """2600 rows are 21 row tiles of 128 at the GPU configs: one full group of GROUP_M = 16 and a
    short one, in the forward and in every backward chunk (a 6 MiB tile budget: 3 chunks of <= 1024)."""
    monkeypatch.setenv("ANYTIME_LOGPROBS_EPILOGUE", "1")
    monkeypatch.setenv("ANYTIME_LOGPROBS_TILE_MB", "6")
    monkeypatch.setattr(logprobs_plan, "MIN_CHUNK", 128)
    case = make_case(num_hidden=2600, width=128, vocab=3001, ignore=(9, 2000))
    case = tuple(x.cuda() if isinstance(x, torch.Tensor) else x for x in case)
    check_against_reference("triton", case, temperature=1.1, dtype=torch.bfloat16)


@pytest.mark.gpu
def test_cuda_triton_several_vocab_chunks(monkeypatch):
    monkeypatch.setenv("ANYTIME_LOGPROBS_EPILOGUE", "0")  # bf16's default is the epilogue path
    monkeypatch.setattr(logprobs_plan, "CHUNK_BYTES", 2**20)
    monkeypatch.setattr(logprobs_plan, "ROW_BLOCK", 200)  # 3 row blocks x 3 vocabulary chunks
    case = make_case(num_hidden=512, width=128, vocab=9000, ignore=(5,))
    case = tuple(x.cuda() if isinstance(x, torch.Tensor) else x for x in case)
    check_against_reference("triton", case, dtype=torch.bfloat16)
