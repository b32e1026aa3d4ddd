"""How the Triton log-probs paths cut and scale their work (``logprobs_plan``, the epilogue's
autotuning): the tile budget is a bound, row blocks are balanced, fp16 gradients keep their
precision at a token-sum-norm upstream gradient, offsets past int32 address the right rows, and
the autotuner is keyed on what changes its choice and never tries a config that spills."""

import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton

import anytime_kernels.logprobs_epilogue as logprobs_epilogue
import anytime_kernels.logprobs_plan as logprobs_plan
import anytime_kernels.logprobs_triton as logprobs_triton
from anytime_kernels import fused_logprobs
from anytime_kernels.logprobs_reference import fused_logprobs_reference

MIB = 2**20


def test_tile_budget_from_the_environment(monkeypatch):
    """ANYTIME_LOGPROBS_TILE_MB sets the tile budget; the epilogue path's tiles hold no fp32 logits,
    so the same budget gives it wider chunks. By hand, 16384 rows x (4 + 2) bytes = 96 KiB a column:
    768 MiB hold 8192 columns; without logits 32 KiB a column, 24576 -> 16384."""
    monkeypatch.delenv("ANYTIME_LOGPROBS_TILE_MB", raising=False)
    assert logprobs_plan.tile_bytes() == logprobs_plan.CHUNK_BYTES == 768 * MIB
    monkeypatch.setenv("ANYTIME_LOGPROBS_TILE_MB", "192")
    assert logprobs_plan.tile_bytes() == 192 * MIB
    assert logprobs_plan.plan(16384, 151936, 2, 768 * MIB) == ([(0, 16384)], 8192)
    assert logprobs_plan.plan(16384, 151936, 2, 768 * MIB, stores_logits=False) == ([(0, 16384)], 16384)
    for bad in ("0", "-5", "lots", "inf", "nan"):
        monkeypatch.setenv("ANYTIME_LOGPROBS_TILE_MB", bad)
        with pytest.raises(ValueError, match=f"ANYTIME_LOGPROBS_TILE_MB.*{bad!r}"):
            logprobs_plan.tile_bytes()


def test_a_small_budget_takes_fewer_rows_not_more_memory():
    """At 128 MiB a 16384-row tile of MIN_CHUNK columns would take 16384 x 4096 x 6 bytes = 384 MiB
    (what the H100 run measured for the cuBLAS path at 128 and 256 MiB): the plan takes row blocks
    of 4096 instead (128 MiB // (4096 x 6) = 5461 rows at most, balanced to 4 x 4096), 96 MiB tiles."""
    assert logprobs_plan.plan(16384, 151936, 2, 128 * MIB) == (
        [(0, 4096), (4096, 8192), (8192, 12288), (12288, 16384)],
        4096,
    )
    assert logprobs_plan.plan(16384, 151936, 2, 256 * MIB) == ([(0, 8192), (8192, 16384)], 4096)


@pytest.mark.parametrize("stores_logits", (True, False))
@pytest.mark.parametrize("element_size", (2, 4))
def test_every_plan_keeps_its_tile_within_the_budget(element_size, stores_logits):
    """Over rows, vocabularies and budgets down to a few KiB: rows x chunk x bytes <= budget, the
    blocks tile [0, M) in order with sizes at most one apart, and the chunk is the whole vocabulary
    or a power of two, at least MIN_CHUNK whenever one row of MIN_CHUNK columns fits."""
    per_element = element_size + (4 if stores_logits else 0)
    for num_rows in (1, 7, 4097, 16384, 16385, 40_000):
        for vocab in (300, 32000, 151936):
            for budget in (4 * 1024, 1 * MIB, 128 * MIB, 256 * MIB, 768 * MIB):
                blocks, chunk = logprobs_plan.plan(num_rows, vocab, element_size, budget, stores_logits)
                sizes = [end - start for start, end in blocks]
                assert blocks[0][0] == 0 and blocks[-1][1] == num_rows
                assert all(previous[1] == current[0] for previous, current in itertools.pairwise(blocks))
                assert max(sizes) - min(sizes) <= 1 and max(sizes) <= logprobs_plan.ROW_BLOCK
                assert max(sizes) * chunk * per_element <= budget, (num_rows, vocab, budget)
                assert chunk == vocab or chunk & (chunk - 1) == 0
                if budget >= min(vocab, logprobs_plan.MIN_CHUNK) * per_element:
                    assert chunk >= min(vocab, logprobs_plan.MIN_CHUNK)


def test_chunk_width_stops_shrinking_at_the_row_block():
    """Blocks hold at most ROW_BLOCK rows, so the chunk is as wide at 5.3M rows as at 16k."""
    width_16k = logprobs_plan.plan(16384, 151936, 2)[1]
    assert width_16k == logprobs_plan.plan(5_300_000, 151936, 2)[1] == 8192
    assert logprobs_plan.plan(10**7, 1000, 2)[1] == 1000  # a small vocabulary is one chunk


def test_row_blocks_are_balanced():
    """16385 rows are two blocks of 8193 and 8192, not 16384 and one row paying a launch per chunk."""
    assert logprobs_plan.row_blocks(16385) == [(0, 8193), (8193, 16385)]
    assert logprobs_plan.row_blocks(16384) == [(0, 16384)]
    assert logprobs_plan.row_blocks(40_000) == [(0, 13334), (13334, 26667), (26667, 40000)]
    assert logprobs_plan.row_blocks(0) == []


@pytest.mark.parametrize("epilogue", ("0", "1"))
def test_backward_tiles_respect_the_budget_and_the_balance(monkeypatch, epilogue):
    """End to end, fp32: a budget of 5120 bytes cannot hold 45 rows of a 64-column chunk (45 x 64 x 8
    bytes on the cuBLAS path), so the backward takes balanced row blocks (no block under 8 rows)
    and its one gradient tile stays within the budget; results equal fp64 math."""
    monkeypatch.setattr(logprobs_plan, "MIN_CHUNK", 64)
    monkeypatch.setenv("ANYTIME_LOGPROBS_TILE_MB", str(5120 / MIB))
    monkeypatch.setenv("ANYTIME_LOGPROBS_EPILOGUE", epilogue)
    per_element = 4 + (4 if epilogue == "0" else 0)
    tiles, block_rows = set(), []
    real_accumulate = logprobs_triton._accumulate

    def spy(out, left, right):
        tiles.add((left.untyped_storage().data_ptr(), left.untyped_storage().nbytes()))
        if left.is_contiguous():  # grad_hidden[block] += tile @ W[chunk] (grad_weight reads the tile transposed)
            block_rows.append(left.shape[0])
        real_accumulate(out, left, right)

    monkeypatch.setattr(logprobs_triton, "_accumulate", spy)
    generator = torch.Generator().manual_seed(5)
    hidden = torch.randn(45, 12, generator=generator, requires_grad=True)
    weight = (torch.randn(301, 12, generator=generator) * 0.5).requires_grad_()
    targets = torch.randint(0, 301, (45,), generator=generator)
    grad = torch.randn(45, generator=generator)
    (fused_logprobs(hidden, weight, targets, backend="triton") * grad).sum().backward()
    assert len(tiles) == 1
    tile_elements = tiles.pop()[1] // 4
    assert tile_elements * per_element <= 5120
    assert min(block_rows) >= 8
    hidden64, weight64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    (fused_logprobs_reference(hidden64, weight64, targets) * grad.double()).sum().backward()
    torch.testing.assert_close(hidden.grad.double(), hidden64.grad, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(weight.grad.double(), weight64.grad, atol=2e-5, rtol=2e-5)


def test_gradient_scale_by_hand():
    """The largest row bound (|g_lp| + |g_ent| (log V + 1)) / T goes to 2^14 by a power of two."""
    grad_logprobs = torch.tensor([2.0**-14, -(2.0**-16)])
    assert float(logprobs_plan.gradient_scale(grad_logprobs, None, 300, 1.0)) == 2.0**28
    assert float(logprobs_plan.gradient_scale(grad_logprobs, None, 300, 0.5)) == 2.0**27
    grad_entropy = torch.tensor([0.0, 2.0**-10])
    bound = 2.0**-10 * (math.log(300) + 1.0) + 2.0**-16  # 0.0066, in [2^-8, 2^-7)
    assert float(logprobs_plan.gradient_scale(grad_logprobs, grad_entropy, 300, 1.0)) == 2.0 ** (14 + 7)
    assert 2.0**-8 <= bound < 2.0**-7
    assert math.isfinite(float(logprobs_plan.gradient_scale(torch.zeros(3), torch.zeros(3), 300, 1.0)))


@pytest.mark.parametrize("backend_path", ("cublas", "epilogue", "cpp"))
def test_fp16_gradients_at_a_token_sum_norm_gradient_reach_the_rounding_floor(monkeypatch, backend_path):
    """fp16, upstream gradient +-1/16384 per token (token-sum-norm at 16k tokens) and a small entropy
    term: p * g lies below fp16's subnormals, so a gradient tile stored unscaled lost ~10x the
    rounding of the result (7.3e-3 against a 1.5e-3 floor here). Both gradients must be within 1.5x
    of the fp64 result's own fp16 rounding."""
    if backend_path != "cpp":
        monkeypatch.setenv("ANYTIME_LOGPROBS_EPILOGUE", "1" if backend_path == "epilogue" else "0")
    generator = torch.Generator().manual_seed(0)
    num_rows, width, vocab = 32, 32, 512
    hidden = torch.randn(num_rows, width, generator=generator).half()
    weight = (torch.randn(vocab, width, generator=generator) * width**-0.5).half()
    targets = torch.randint(0, vocab, (num_rows,), generator=generator)
    grad_logprobs = (torch.randint(0, 2, (num_rows,), generator=generator).float() * 2 - 1) / 16384
    grad_entropy = torch.full((num_rows,), 0.001 / 16384)

    def gradients(fn, hidden, weight):
        hidden, weight = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
        logprobs, entropy = fn(hidden, weight)
        dtype = logprobs.dtype
        ((logprobs * grad_logprobs.to(dtype)).sum() + (entropy * grad_entropy.to(dtype)).sum()).backward()
        return hidden.grad, weight.grad

    exact = gradients(
        lambda h, w: fused_logprobs_reference(h, w, targets, return_entropy=True), hidden.double(), weight.double()
    )
    backend = "cpp" if backend_path == "cpp" else "triton"
    got = gradients(lambda h, w: fused_logprobs(h, w, targets, return_entropy=True, backend=backend), hidden, weight)
    for name, actual, wanted in zip(("grad_hidden", "grad_weight"), got, exact, strict=True):
        assert actual.dtype == torch.float16
        error = float((actual.double() - wanted).norm() / wanted.norm())
        floor = float((wanted.half().double() - wanted).norm() / wanted.norm())
        assert error <= 1.5 * floor, f"{name}: relative error {error:.2e}, fp16 rounding floor {floor:.2e}"


def test_offsets_past_int32_address_the_right_rows():
    """``cols * stride_w`` >= 2^31 (V * H past int32, e.g. a 200k vocabulary at H 12288): a head with a
    2^28-element row stride over a lazily mapped 4 GiB region, in a subprocess (an int32 offset
    wraps to a read 4 GiB before the mapping: a segfault)."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    script = Path(__file__).parent / "fixtures" / "large_stride_logprobs.py"
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    if done.returncode != 0 and done.stderr.startswith("SKIP:"):
        pytest.skip(done.stderr.strip())
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-2000:]}"
    errors = json.loads(done.stdout.strip().splitlines()[-1])
    for path in ("epilogue", "cublas"):
        assert errors[path]["logprobs"] < 1e-5, errors
        assert errors[path]["grad_hidden"] < 5e-3 and errors[path]["grad_weight"] < 5e-3, errors


def _gpu_configs():
    return [
        triton.Config({"BLOCK_M": 128, "BLOCK_N": n, "BLOCK_K": 64, "GROUP_M": 16}, num_warps=8, num_stages=s)
        for n, s in ((256, 3), (128, 4))
    ]


@pytest.mark.parametrize("grad_tile_spills", [False, True])
def test_pruning_drops_the_wide_tile_where_it_spills(monkeypatch, grad_tile_spills):
    """The 128x256 config is kept for bf16 without the entropy sums and dropped with them or with fp32
    operands (the compile test measures the spills); the gradient kernel keeps it only where its
    triton does not spill it (3.9, not 3.6); a list that would be empty is left whole."""
    monkeypatch.setattr(logprobs_epilogue, "_GRAD_TILE_SPILLS_WIDE", grad_tile_spills)
    configs = _gpu_configs()
    bf16, fp32 = {"hidden_ptr": torch.zeros(1, dtype=torch.bfloat16)}, {"hidden_ptr": torch.zeros(1)}
    assert logprobs_epilogue._prune_configs(configs, bf16, HAS_ENTROPY=False) == configs
    grad_kept = configs[1:] if grad_tile_spills else configs
    assert logprobs_epilogue._prune_configs(configs, bf16, HAS_ENTROPY_GRAD=True) == grad_kept
    assert logprobs_epilogue._prune_configs(configs, bf16, HAS_ENTROPY=True) == configs[1:]
    assert logprobs_epilogue._prune_configs(configs, fp32, HAS_ENTROPY_GRAD=False) == configs[1:]
    assert logprobs_epilogue._prune_configs(configs[:1], fp32, HAS_ENTROPY=True) == configs[:1]


def test_autotuning_keys_on_the_row_bucket_and_the_vocabulary():
    """Both epilogue kernels retune for another power-of-two bucket of rows and another vocabulary
    (chunk) width, not only for another hidden size (the H=2048 time moved 65.1 -> 72.4 ms between
    two H100 runs, docs/gpu_runs/ run1 and run2, with one choice per hidden size)."""
    assert logprobs_epilogue._lse_tile_kernel.keys[:3] == ["rows_bucket", "vocab", "hidden_size"]
    assert logprobs_epilogue._grad_tile_kernel.keys[:3] == ["rows_bucket", "chunk_vocab", "hidden_size"]
    assert [logprobs_epilogue._rows_bucket(rows) for rows in (1, 5, 16, 16384, 16385)] == [1, 8, 16, 16384, 32768]


def test_forward_partials_follow_the_chosen_tile_width(monkeypatch):
    """The partials are sized for the tile width chosen for the key; one recorded wider than the
    autotuner then runs (a key that diverged) raises instead of losing the tiles past the buffer."""
    monkeypatch.setattr(logprobs_epilogue, "_chosen_block_n", {})
    generator = torch.Generator().manual_seed(2)
    hidden, weight = torch.randn(20, 16, generator=generator), torch.randn(300, 16, generator=generator)
    targets = torch.randint(0, 300, (20,), generator=generator)
    block_n = logprobs_epilogue._lse_tile_kernel.configs[0].kwargs["BLOCK_N"]
    precision = logprobs_epilogue._precision(hidden.dtype)
    key, tiles = logprobs_epilogue._partial_tiles(20, 300, hidden, False, precision)
    assert tiles == -(-300 // block_n)
    expected = fused_logprobs_reference(hidden.double(), weight.double(), targets)
    logprobs, _, _ = logprobs_epilogue.forward(hidden, weight, targets, 1.0, False)
    torch.testing.assert_close(logprobs.double(), expected.double(), atol=1e-5, rtol=0)
    assert logprobs_epilogue._chosen_block_n == {key: block_n}
    logprobs_epilogue._chosen_block_n[key] = 2 * block_n
    with pytest.raises(RuntimeError, match="partials hold"):
        logprobs_epilogue.forward(hidden, weight, targets, 1.0, False)
