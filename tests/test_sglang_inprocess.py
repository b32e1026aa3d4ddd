"""The in-process SGLang engine against a stand-in ``sglang`` module (SGLang needs CUDA).

The stand-in answers ``async_generate`` in SGLang's layout (n samples per item, item-major),
records how many calls run at once, and implements the weight and memory calls with SGLang's
return values, so the engine's own logic runs for real: concurrent per-prompt calls, bucketed
weight sync with one flush, failures raised, memory released and resumed, dp_size refused.
"""

import asyncio
import sys
import types
from typing import ClassVar

import pytest
import torch
from fixtures.tiny_policy import tiny_policy

from trainer.budgets import BudgetSchedule
from trainer.rollout import EmbeddedEngine, SamplingParams
from trainer.rollout.base import FORK_PRIORITY, TRACE_PRIORITY
from trainer.rollout.sglang_server import SGLangInProcessEngine
from trainer.rollout.weight_transfer import weight_buckets

GREEDY = SamplingParams(temperature=0)


class FakeEngine:
    """``sglang.Engine`` answering from an embedded engine, one awaited step per call."""

    instances: ClassVar[list["FakeEngine"]] = []

    def __init__(self, model_path, **options):
        self.options = options
        self.backend: EmbeddedEngine | None = None
        self.in_flight = self.max_in_flight = 0
        self.calls: list[tuple] = []
        self.weight_calls: list[tuple[list[str], bool]] = []
        self.fail_weights = False
        self.memory_events: list[str] = []
        self.session_open = False
        self.busy = False  # requests running or waiting: SGLang then refuses to flush
        FakeEngine.instances.append(self)

    # SGLang 0.5.23: weight loads from tensors only inside begin_weight_update .. end_weight_update.
    def begin_weight_update(self, selector="all"):
        if self.session_open:
            return False, "a weight-update session is already open; call end_weight_update() first"
        self.session_open = True
        self.memory_events.append("begin")
        return True, "Success"

    def end_weight_update(self):
        if not self.session_open:
            return False, "no weight-update session is open; call begin_weight_update() first"
        self.session_open = False
        self.memory_events.append("end")
        return True, "Success"

    async def async_generate(self, input_ids=None, sampling_params=None, priority=None):
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        await asyncio.sleep(0.01)  # other calls start meanwhile when they were gathered
        self.in_flight -= 1
        self.calls.append((len(input_ids), sampling_params[0]["n"], priority))
        import dataclasses

        from trainer.rollout.base import GenerationRequest
        from trainer.rollout.sglang_protocol import response_samples

        samples = []
        for ids, params in zip(input_ids, sampling_params, strict=True):
            if params.get("min_new_tokens", 0) > 0 and self.options.get("skip_tokenizer_init"):
                raise ValueError("min_new_tokens is unavailable when skip_tokenizer_init=True")  # as SGLang
            request = GenerationRequest(
                tuple(ids), params["n"], params["max_new_tokens"], tuple(params["stop_token_ids"]),
                SamplingParams(params["temperature"], params["top_p"], min_new_tokens=params.get("min_new_tokens", 0)),
                cache_output=True,
            )  # fmt: skip
            if self.options.get("enable_deterministic_inference"):
                # SGLang: seed 42 unless given, and the draws follow (seed, position): one sample, n times.
                seeded = dataclasses.replace(request, n=1, sampling=dataclasses.replace(
                    request.sampling, seed=params.get("sampling_seed", 42)))  # fmt: skip
                output = self.backend.generate([seeded])[0]
                output.output_ids, output.finish_reasons = (
                    output.output_ids * request.n,
                    output.finish_reasons * request.n,
                )
                output.cached_tokens = output.cached_tokens * request.n
            else:
                output = self.backend.generate([request])[0]
            samples += response_samples(output, request, "rid")
        return samples

    def update_weights_from_tensor(self, named_tensors, flush_cache=True):
        if not self.session_open:
            return False, "update_weights_from_tensor must run between begin_weight_update() and end_weight_update()"
        self.weight_calls.append(([name for name, _ in named_tensors], flush_cache))
        if self.fail_weights:
            return False, "shape mismatch for model.norm.weight"
        return True, "Succeeded to update model weights."

    def release_memory_occupation(self):
        self.memory_events.append("release")

    def resume_memory_occupation(self):
        self.memory_events.append("resume")

    def flush_cache(self):
        self.memory_events.append("flush")
        # SGLang's FlushCacheReqOutput; refused at once while busy (sglang.Engine passes no timeout).
        return types.SimpleNamespace(success=not self.busy, message="")

    def shutdown(self):
        pass


@pytest.fixture
def fake_sglang(monkeypatch):
    module = types.ModuleType("sglang")
    module.Engine = FakeEngine
    monkeypatch.setitem(sys.modules, "sglang", module)
    FakeEngine.instances.clear()
    return module


@pytest.fixture(scope="module")
def policy():
    return tiny_policy(seed=9)


def test_requests_run_concurrently_per_prompt_and_match_the_embedded_engine(fake_sglang, policy):
    model, tokenizer = policy
    # skip_tokenizer_init=False: SGLang refuses min_new_tokens > 0 without its tokenizer (tested below).
    engine = SGLangInProcessEngine("ckpt", tokenizer, skip_tokenizer_init=False)
    fake = FakeEngine.instances[-1]
    fake.backend = EmbeddedEngine(model, tokenizer)
    assert fake.options["radix_eviction_policy"] == "priority"
    prompts = [tokenizer.encode(f"Compute {i}*{i}.", add_special_tokens=False) for i in range(3)]
    sampling = SamplingParams(temperature=0, min_new_tokens=4)
    got = engine.rollout(prompts, 1, 12, BudgetSchedule(12, 3), 2, sampling, 4)
    want = EmbeddedEngine(model, tokenizer).rollout(prompts, 1, 12, BudgetSchedule(12, 3), 2, sampling, 4)
    assert got[0].thinking_ids == want[0].thinking_ids and got[1].summary_ids == want[1].summary_ids
    # Think: 3 prompts, 3 concurrent calls; forks: one call each (A = 2 samples at least), all at once.
    assert fake.max_in_flight >= 3
    think_calls, fork_calls = fake.calls[:3], fake.calls[3:]
    assert {priority for *_, priority in think_calls} == {TRACE_PRIORITY}
    assert {priority for *_, priority in fork_calls} == {FORK_PRIORITY}
    # SGLang awaits each n > 1 item's prefill warm-up of a call in turn: such forks go alone.
    assert len(fork_calls) == sum(len(set(cuts)) for cuts in got[1].cut_lens.tolist())
    assert {(items, n >= 2) for items, n, _ in fork_calls} == {(1, True)}


def test_min_new_tokens_without_the_tokenizer_is_refused_before_sending(fake_sglang, policy):
    model, tokenizer = policy
    engine = SGLangInProcessEngine("ckpt", tokenizer)
    fake = FakeEngine.instances[-1]
    fake.backend = EmbeddedEngine(model, tokenizer)
    assert fake.options["skip_tokenizer_init"] is True
    with pytest.raises(ValueError, match=r"min_new_tokens=3: .*skip_tokenizer_init=False"):
        engine.think([[5, 6, 7]], 1, 8, SamplingParams(temperature=0, min_new_tokens=3))
    assert fake.calls == []
    assert engine.think([[5, 6, 7]], 1, 8, GREEDY).num_traces == 1  # without it, requests go out


def test_weights_sync_in_buckets_with_one_flush_and_failures_raise(fake_sglang, policy):
    model, tokenizer = policy
    engine = SGLangInProcessEngine("ckpt", tokenizer, weight_bucket_mb=0.05)
    fake = FakeEngine.instances[-1]
    engine.update_weights(model)
    assert fake.memory_events == ["begin", "end"] and not fake.session_open  # one session around the buckets
    names = [name for names, _ in fake.weight_calls for name in names]
    assert names == list(model.state_dict())  # every tensor once, in order
    assert len(fake.weight_calls) > 1 and [flush for _, flush in fake.weight_calls] == [False] * (
        len(fake.weight_calls) - 1
    ) + [True]
    assert "flush" not in fake.memory_events  # no second flush after the update's own
    fake.fail_weights = True
    with pytest.raises(RuntimeError, match=r"rejected weight bucket 1/.*shape mismatch"):
        engine.update_weights(model)
    assert not fake.session_open  # closed after the failure too
    # An SGLang without sessions (before 0.5.23): the buckets go out alone.
    fake.fail_weights = False
    del FakeEngine.begin_weight_update
    try:
        calls = len(fake.weight_calls)
        fake.session_open = True  # what such an engine accepts: no session calls at all
        engine.update_weights(model)
        assert len(fake.weight_calls) > calls and fake.memory_events.count("begin") == 2
    finally:
        FakeEngine.begin_weight_update = _begin_weight_update


def test_weight_buckets_respect_the_byte_limit():
    state = {f"w{i}": torch.zeros(size) for i, size in enumerate([10, 10, 30, 5, 100, 1])}
    buckets = weight_buckets(state, max_bytes=4 * 35)  # w2 alone is 120 bytes; w2 + w3 is 140
    assert [[name for name, _ in bucket] for bucket in buckets] == [["w0", "w1"], ["w2", "w3"], ["w4"], ["w5"]]
    assert weight_buckets({}, 100) == []


def test_colocated_engine_releases_memory_for_the_update_and_resumes_for_the_sync(fake_sglang, policy):
    model, tokenizer = policy
    engine = SGLangInProcessEngine("ckpt", tokenizer, colocate=True)
    fake = FakeEngine.instances[-1]
    assert fake.options["enable_memory_saver"] is True
    engine.release_memory()
    engine.release_memory()  # once only
    with pytest.raises(RuntimeError, match="memory is released"):
        engine.generate(engine._think_requests([[5, 6]], 1, 2, GREEDY))
    engine.update_weights(model)
    assert fake.memory_events == ["release", "resume", "begin", "end"] and not engine.released
    # Not colocated: nothing is released.
    plain = SGLangInProcessEngine("ckpt", tokenizer)
    plain.release_memory()
    assert FakeEngine.instances[-1].memory_events == []


def test_data_parallel_and_reuse_killers_are_refused(fake_sglang, policy):
    _, tokenizer = policy
    with pytest.raises(ValueError, match=r"dp_size=2.*SGLangEngine"):
        SGLangInProcessEngine("ckpt", tokenizer, dp_size=2)
    with pytest.raises(ValueError, match="disable-radix-cache"):
        SGLangInProcessEngine("ckpt", tokenizer, disable_radix_cache=True)


_begin_weight_update = FakeEngine.begin_weight_update


def test_a_flush_refused_while_requests_run_raises(fake_sglang, policy):
    _, tokenizer = policy
    engine = SGLangInProcessEngine("ckpt", tokenizer)
    fake = FakeEngine.instances[-1]
    engine.flush_cache()
    fake.busy = True
    with pytest.raises(RuntimeError, match="did not flush its cache"):
        engine.flush_cache()


def test_a_deterministic_engine_gets_one_seeded_request_per_sample(fake_sglang, policy):
    """Under enable_deterministic_inference SGLang draws from (seed, position) alone, 42 for an
    unseeded request: the G traces of one request would be one trace."""
    model, tokenizer = policy
    engine = SGLangInProcessEngine("ckpt", tokenizer, enable_deterministic_inference=True)
    fake = FakeEngine.instances[-1]
    fake.backend = EmbeddedEngine(model, tokenizer)
    traces = engine.think([[8, 9, 10]], 4, 8, SamplingParams(temperature=1.0))
    assert len({tuple(z) for z in traces.thinking_ids}) == 4, traces.thinking_ids
    # One call of four one-sample items (no warm-ups for n = 1).
    assert fake.calls == [(4, 1, TRACE_PRIORITY)]
