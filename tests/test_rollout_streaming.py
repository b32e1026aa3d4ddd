"""Streaming forks, a bounded KV cache with priority/LRU eviction, and the SGLang-faithful test server.

The eviction problem this guards against: when a step's traces do not fit the cache, waiting for
every trace before sending any fork lets the cache evict the early traces (LRU), and their forks
re-prefill them. Sending a prompt's forks as soon as its traces are back keeps them cached.
"""

import copy
import itertools
import random
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
import torch
from fixtures.tiny_policy import tiny_policy

import trainer.rollout
from trainer.budgets import BudgetSchedule
from trainer.rollout import (
    EmbeddedEngine,
    GenerationRequest,
    SamplingParams,
    SGLangEngine,
    SGLangServerError,
    sglang_client,
)
from trainer.rollout.base import FORK_PRIORITY, TRACE_PRIORITY
from trainer.rollout.radix import RadixIndex
from trainer.rollout.sglang_server import sglang_server_command
from trainer.rollout.testing import ProtocolServer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GREEDY = SamplingParams(temperature=0)
B_MAX, SLOTS, A = 16, 4, 2


@pytest.fixture(scope="module")
def policy():
    return tiny_policy(seed=7)


def client(url, tokenizer, **kwargs):
    options = {"timeout_s": 10.0, "connect_timeout_s": 1.0, "max_retries": 2, "backoff_s": 0.01} | kwargs
    return SGLangEngine(url, tokenizer, **options)


def prompts_of(tokenizer, count):
    return [tokenizer.encode(f"Compute {i}+{i + 1}.", add_special_tokens=False) for i in range(count)]


def assert_same_rollout(got, want):
    (traces, batch), (want_traces, want_batch) = got, want
    assert traces.prompt_ids == want_traces.prompt_ids
    assert traces.thinking_ids == want_traces.thinking_ids and traces.finish == want_traces.finish
    assert torch.equal(batch.cut_lens, want_batch.cut_lens)
    assert batch.inserted_ids == want_batch.inserted_ids
    assert batch.summary_ids == want_batch.summary_ids and batch.summary_finish == want_batch.summary_finish


def common_prefix(a, b):
    return sum(1 for _ in itertools.takewhile(lambda pair: pair[0] == pair[1], zip(a, b, strict=False)))


def test_radix_remove_against_brute_force():
    rng = random.Random(0)
    for _ in range(200):
        index, stored = RadixIndex(), {}
        for _ in range(30):
            if stored and rng.random() < 0.4:
                tokens = rng.choice(list(stored))
                index.remove(tokens)
                del stored[tokens]
            else:
                tokens = tuple(rng.randrange(3) for _ in range(rng.randint(1, 6)))
                stored[tokens] = object()
                index.insert(tokens, stored[tokens])
            assert len(index) == len(stored)
            query = tuple(rng.randrange(3) for _ in range(rng.randint(1, 7)))
            value, length = index.match(query)
            assert length == max((common_prefix(k, query) for k in stored), default=0)
            if length:  # the value names a stored sequence that holds the matched prefix
                assert any(v is value and k[:length] == query[:length] for k, v in stored.items())
    with pytest.raises(KeyError):
        RadixIndex().remove((1, 2))


def test_bounded_cache_evicts_lower_priority_first_then_least_recently_used(policy):
    model, tokenizer = policy
    engine = EmbeddedEngine(model, tokenizer, kv_budget_tokens=30)

    def store(prompt, priority):
        request = GenerationRequest(tuple(prompt), 1, 4, (), SamplingParams(temperature=0, min_new_tokens=4),
                                    cache_output=True, priority=priority)  # fmt: skip
        engine.generate([request])
        return tuple(prompt) + tuple(engine._index.match(prompt)[0].tokens[len(prompt) :])

    a = store([5, 6, 7, 8, 9, 10], TRACE_PRIORITY)  # 6 + 3 stored tokens each
    b = store([11, 12, 13, 14, 15, 16], TRACE_PRIORITY)
    c = store([17, 18, 19, 20, 21, 22], FORK_PRIORITY)
    assert engine.stored_tokens == 27 and engine.evicted_sequences == 0
    # A read of a refreshes it; the next store must evict: c (lower priority) goes first.
    engine.generate([GenerationRequest(a[:7], 1, 1, (), GREEDY)])
    store([23, 24, 25, 26, 27, 28], TRACE_PRIORITY)
    assert engine.evicted_sequences == 1 and engine._index.match(c)[1] < len(c)
    # Among equal priorities the least recently used goes: b (a was read after it was stored).
    store([29, 30, 31, 32, 33, 34], TRACE_PRIORITY)
    assert engine._index.match(b)[1] < len(b) and engine._index.match(a)[1] == len(a)
    assert engine.stored_tokens <= 30


@pytest.mark.parametrize("window", [0, 1, 3])
def test_rollout_equals_think_then_summarize(policy, window):
    model, tokenizer = policy
    schedule, prompts = BudgetSchedule(B_MAX, SLOTS), prompts_of(tokenizer, 4)
    sampling = SamplingParams(temperature=0, min_new_tokens=5)
    reference = EmbeddedEngine(model, tokenizer)
    traces = reference.think(prompts, 1, B_MAX, sampling)
    want = traces, reference.summarize(traces, schedule, A, GREEDY, max_new_tokens=4)
    engine = EmbeddedEngine(model, tokenizer)
    got = engine.rollout(prompts, 1, B_MAX, schedule, A, sampling, 4, window=window)
    # Greedy summaries are one decision; the rollout sampled them with the summary sampling params.
    assert got[0].thinking_ids == want[0].thinking_ids
    assert got[1].summary_ids == reference.summarize(want[0], schedule, A, sampling, 4).summary_ids
    assert engine.stats.think.samples == 4 and engine.stats.summarize.samples == want[1].cut_lens.numel() * A


def test_rollout_without_window_is_think_then_summarize_exactly(policy):
    """window 0 makes the very calls of think + summarize: the same samples, the same random stream."""
    model, tokenizer = policy
    schedule, prompts, sampling = BudgetSchedule(B_MAX, SLOTS), prompts_of(tokenizer, 3), SamplingParams(1.0)
    reference = EmbeddedEngine(model, tokenizer, seed=3)
    traces = reference.think(prompts, 2, B_MAX, sampling)
    want = traces, reference.summarize(traces, schedule, A, sampling, max_new_tokens=4)
    got = EmbeddedEngine(model, tokenizer, seed=3).rollout(prompts, 2, B_MAX, schedule, A, sampling, 4)
    assert_same_rollout(got, want)


def test_streaming_client_matches_the_embedded_engine_and_sends_each_fork_alone(policy):
    model, tokenizer = policy
    schedule, prompts = BudgetSchedule(B_MAX, SLOTS), prompts_of(tokenizer, 3)
    sampling = SamplingParams(temperature=0, min_new_tokens=3)
    local = EmbeddedEngine(model, tokenizer).rollout(prompts, 1, B_MAX, schedule, A, sampling, 4)
    with ProtocolServer(EmbeddedEngine(model, tokenizer), tokenizer) as server:
        remote = client(server.url, tokenizer)
        got = remote.rollout(prompts, 1, B_MAX, schedule, A, sampling, 4, window=2)
        stored_priorities = {seq.priority for seq in server.engine._stored.values()}
        # One think request per prompt, then one /generate body per fork: with A = 2 every fork has
        # several samples, and SGLang warms up the n > 1 items of a batch body one after another.
        fork_bodies = sum(len(set(cuts)) for cuts in got[1].cut_lens.tolist())
        assert server.generate_served == len(prompts) + fork_bodies and server.serial_warmups == 0
    assert_same_rollout(got, local)
    # Traces are stored at the trace priority, the forks' outputs at the lower fork priority.
    assert stored_priorities == {TRACE_PRIORITY, FORK_PRIORITY}
    assert remote.stats.think.samples == 3 and remote.stats.rollout.server_prefill_compute is not None


def reprefilled(engine_stats, batch):
    """Fork prompt tokens prefilled beyond the inserted delimiter / all fork prompt tokens."""
    inserted = sum(len(ids) for per_trace in batch.inserted_ids for ids in per_trace)
    return (engine_stats.prefilled_tokens - inserted) / engine_stats.request_prompt_tokens


# Traces long next to their prompts (and the 30-token truncation delimiter), as at scale.
KV_B_MAX = 64


def short_prompts(tokenizer, count):
    return [tokenizer.encode(f"q{i}", add_special_tokens=False) for i in range(count)]


def test_streaming_forks_keep_traces_cached_when_the_kv_budget_is_half_the_step(policy):
    """Wait-for-all: the LRU cache holds only the later half of the traces when the forks come, so
    the forks of the earlier half re-prefill their cuts (about half of all fork prompt tokens once
    the delimiters are counted); streaming: every fork finds its trace."""
    model, tokenizer = policy
    schedule, prompts = BudgetSchedule(KV_B_MAX, SLOTS), short_prompts(tokenizer, 8)
    sampling = SamplingParams(temperature=1.0, min_new_tokens=KV_B_MAX)  # every trace is b_max long
    step_tokens = sum(2 * (len(p) + KV_B_MAX - 1) for p in prompts)
    shares = {}
    for mode in ("wait_all", "streaming"):
        engine = EmbeddedEngine(model, tokenizer, kv_budget_tokens=step_tokens // 2, seed=0)
        if mode == "wait_all":
            traces = engine.think(prompts, 2, KV_B_MAX, sampling)
            batch = engine.summarize(traces, schedule, A, sampling, 4)
        else:
            _, batch = engine.rollout(prompts, 2, KV_B_MAX, schedule, A, sampling, 4, window=2)
        shares[mode] = reprefilled(engine.stats.summarize, batch)
        if mode == "wait_all":
            assert engine.stored_tokens <= step_tokens // 2 and engine.evicted_sequences == 8
        else:  # a window's traces are dropped once their forks are served: none evicted, none left
            assert engine.evicted_sequences == 0 and engine.stored_tokens == 0
    assert shares["wait_all"] > 0.25 and shares["streaming"] < 0.02, shares
    # With room for the whole step nothing is re-prefilled but the last token of a trace cut at its
    # end (a sampled token's keys/values exist only once it is fed: one token per such fork).
    engine = EmbeddedEngine(model, tokenizer, kv_budget_tokens=4 * step_tokens)
    traces = engine.think(prompts, 2, KV_B_MAX, sampling)
    batch = engine.summarize(traces, schedule, A, sampling, 4)
    at_end = sum(
        int(cut) == len(z)
        for cuts, z in zip(batch.cut_lens.tolist(), traces.thinking_ids, strict=True)
        for cut in set(cuts)
    )
    assert 0 < reprefilled(engine.stats.summarize, batch) * engine.stats.summarize.request_prompt_tokens <= at_end


def test_streaming_without_a_kv_budget_holds_at_most_two_windows_of_traces(policy, monkeypatch):
    """Without kv_budget_tokens nothing is evicted, so an engine that kept every trace would hold
    the whole step (at paper scale, more than a GPU): each window's traces are dropped once the
    call serving their forks returns, so at most two windows' traces are ever stored, and every
    fork still finds its trace."""
    model, tokenizer = policy
    schedule, prompts = BudgetSchedule(KV_B_MAX, SLOTS), short_prompts(tokenizer, 8)
    sampling = SamplingParams(temperature=1.0, min_new_tokens=KV_B_MAX)
    engine = EmbeddedEngine(model, tokenizer, seed=0)
    peak = []
    original = EmbeddedEngine._store

    def recording(self, *args):
        original(self, *args)
        peak.append(self.stored_tokens)

    monkeypatch.setattr(EmbeddedEngine, "_store", recording)
    _, batch = engine.rollout(prompts, 2, KV_B_MAX, schedule, A, sampling, 4, window=2)
    window_tokens = sum(2 * (len(p) + KV_B_MAX - 1) for p in prompts[:2])  # 2 prompts x G=2, as stored
    assert max(peak) == 2 * window_tokens, (max(peak), window_tokens)
    assert engine.stored_tokens == 0 and engine.evicted_sequences == 0
    assert reprefilled(engine.stats.summarize, batch) < 0.02


def test_releasing_a_window_keeps_the_same_trace_sampled_again_by_the_next(policy):
    """Greedy traces of a repeated prompt are one stored sequence: releasing the previous window's
    copy must not drop the one the current call stored for its own forks."""
    model, tokenizer = policy
    schedule = BudgetSchedule(KV_B_MAX, SLOTS)
    prompts = [tokenizer.encode("q1", add_special_tokens=False)] * 3
    engine = EmbeddedEngine(model, tokenizer, seed=0)
    sampling = SamplingParams(temperature=0, min_new_tokens=KV_B_MAX)
    traces, batch = engine.rollout(prompts, 1, KV_B_MAX, schedule, A, sampling, 4, window=1)
    assert len({tuple(z) for z in traces.thinking_ids}) == 1
    assert reprefilled(engine.stats.summarize, batch) < 0.02
    assert engine.stored_tokens == 0


def test_a_seeded_rollout_seeds_its_first_window_only(policy, monkeypatch):
    """Each generate call of the embedded engine restarts a seeded stream: a seeded rollout in
    windows seeds the first call and continues the stream after it, so its windows do not repeat
    the same draws (same-length prompts would then sample the same traces), and it is reproducible."""
    model, tokenizer = policy
    schedule = BudgetSchedule(16, 2)
    prompts = [tokenizer.encode("q1", add_special_tokens=False)] * 4  # one prompt four times
    sampling = SamplingParams(temperature=1.0, seed=5)

    seeds = []

    def run():
        engine = EmbeddedEngine(model, tokenizer, seed=0)
        generate = engine.generate

        def recording(requests):
            seeds.append(sorted({str(r.sampling.seed) for r in requests}))
            return generate(requests)

        engine.generate = recording
        return engine.rollout(prompts, 1, 16, schedule, 1, sampling, 4, window=1)

    traces, summaries = run()
    # 4 windows, then the last forks: the engine reseeds when a call's requests carry a seed.
    assert seeds == [["5"], ["None"], ["None"], ["None"], ["None"]], seeds
    # An engine that seeds each request (SGLang's sampling_seed) keeps the seed on every request.
    seeds.clear()
    monkeypatch.setattr(EmbeddedEngine, "reseeds_per_call", False)
    run()
    assert seeds == [["5"]] * 5, seeds
    monkeypatch.undo()
    assert len({tuple(z) for z in traces.thinking_ids}) > 1, traces.thinking_ids
    again = run()
    assert again[0].thinking_ids == traces.thinking_ids and again[1].summary_ids == summaries.summary_ids
    # One window is think then summarize exactly, seeds included.
    engine = EmbeddedEngine(model, tokenizer, seed=0)
    whole = engine.rollout(prompts, 1, 16, schedule, 1, sampling, 4)
    reference = EmbeddedEngine(model, tokenizer, seed=0)
    thought = reference.think(prompts, 1, 16, sampling)
    assert whole[0].thinking_ids == thought.thinking_ids
    assert whole[1].summary_ids == reference.summarize(thought, schedule, 1, sampling, 4).summary_ids


def test_streaming_over_http_against_a_bounded_server_cache(policy):
    model, tokenizer = policy
    schedule, prompts = BudgetSchedule(KV_B_MAX, SLOTS), short_prompts(tokenizer, 8)
    sampling = SamplingParams(temperature=1.0, min_new_tokens=KV_B_MAX)
    step_tokens = sum(2 * (len(p) + KV_B_MAX - 1) for p in prompts)
    shares = {}
    for mode in ("wait_all", "streaming"):
        engine = EmbeddedEngine(model, tokenizer, kv_budget_tokens=step_tokens // 2)
        with ProtocolServer(engine, tokenizer) as server:
            remote = client(server.url, tokenizer)
            if mode == "wait_all":
                batch = remote.summarize(remote.think(prompts, 2, KV_B_MAX, sampling), schedule, A, sampling, 4)
            else:
                _, batch = remote.rollout(prompts, 2, KV_B_MAX, schedule, A, sampling, 4, window=2)
            # The server's own counters of the fork requests (SGLang labels them by priority).
            forks = engine.prefill_counters(FORK_PRIORITY)
            inserted = sum(len(ids) for per_trace in batch.inserted_ids for ids in per_trace)
            total = forks["prefill_compute"] + forks["prefill_cache"]
            shares[mode] = (forks["prefill_compute"] - inserted) / total
    # Waiting for every trace recomputes about 0.29 of the fork tokens beyond the inserted ones.
    # Streaming keeps nearly all, but over HTTP a fork that reaches the server after a later
    # window's thinking has filled the budget recomputes its prefix: a matter of arrival timing
    # (0.003 to 0.04 over 8 seeds on the paged engine; 0.03 to 0.07 before a prefix match counted
    # as a use in the LRU order).
    assert shares["wait_all"] > 0.25 and shares["streaming"] < shares["wait_all"] / 5, shares


def test_aborted_requests_are_retried_then_reported(policy):
    model, tokenizer = policy
    with ProtocolServer(EmbeddedEngine(model, tokenizer), tokenizer) as server:
        remote = client(server.url, tokenizer)
        want = remote.think([[5, 6, 7]], 2, 4, GREEDY).thinking_ids
        server.inject_faults(["abort"])
        assert remote.think([[5, 6, 7]], 2, 4, GREEDY).thinking_ids == want
        server.inject_faults(["abort"] * 3)
        with pytest.raises(SGLangServerError, match="aborted"):
            remote.think([[5, 6, 7]], 2, 4, GREEDY)


def test_flush_is_refused_while_requests_run(policy, monkeypatch):
    """SGLang refuses a flush while requests run or wait; the client's ``?timeout=`` lets the server
    wait for them, and a flush still refused after that wait is an error."""
    model, tokenizer = policy
    monkeypatch.setattr(sglang_client, "FLUSH_WAIT_S", 0.3)
    with ProtocolServer(EmbeddedEngine(model, tokenizer), tokenizer) as server:
        remote = client(server.url, tokenizer)
        server._lock.acquire()  # the engine is busy: the next request waits in the scheduler
        worker = threading.Thread(target=remote.think, args=([[5, 6, 7]], 1, 4, GREEDY))
        worker.start()
        try:
            deadline = time.monotonic() + 30
            while server.idle:
                assert time.monotonic() < deadline, "the request never reached the server"
            answer = requests.post(server.url + "/flush_cache", timeout=5)
            assert answer.status_code == 400 and "running or waiting" in answer.text
            with pytest.raises(SGLangServerError, match="400"):
                remote.flush_cache()  # busy for longer than the 0.3 s wait
            monkeypatch.setattr(sglang_client, "FLUSH_WAIT_S", 30.0)
            errors = []

            def flush():
                try:
                    remote.flush_cache()
                except Exception as error:
                    errors.append(error)

            flushing = threading.Thread(target=flush)
            flushing.start()
            time.sleep(0.2)
            assert flushing.is_alive()  # the server waits for the request ...
        finally:
            server._lock.release()
        flushing.join(timeout=30)
        assert not flushing.is_alive() and not errors  # ... and flushes once it is done
        worker.join()
        assert requests.post(server.url + "/flush_cache", timeout=5).status_code == 200


def test_concurrent_requests_are_batched_together(policy):
    model, tokenizer = policy
    with ProtocolServer(EmbeddedEngine(model, tokenizer), tokenizer) as server:
        remote = client(server.url, tokenizer)
        server._lock.acquire()
        worker = threading.Thread(target=remote.think, args=(prompts_of(tokenizer, 6), 1, 4, GREEDY))
        worker.start()
        deadline = time.monotonic() + 30
        while True:  # wait until the first batch is taken and every other request waits behind it
            with server._wakeup:
                if server._busy and server._busy + len(server._queue) == 6:
                    break
            if time.monotonic() > deadline:
                server._lock.release()
                pytest.fail("the six requests never all reached the server")
        server._lock.release()
        worker.join()
        # Six concurrent requests: the first batch, then everything that queued meanwhile, in one.
        assert server.generate_served == 6 and server.batches_served <= 2


def test_test_server_is_not_a_public_export_and_the_launcher_keeps_traces():
    assert not hasattr(trainer.rollout, "ProtocolServer")
    command = sglang_server_command("m", 30000)
    assert command[command.index("--radix-eviction-policy") + 1] == "priority"
    assert "--enable-metrics" in command


TRAINER_SIDE = """
import sys
sys.path.insert(0, {tests!r})
from fixtures.tiny_policy import tiny_policy
from trainer.rollout import SGLangEngine
model, tokenizer = tiny_policy(seed=6)
engine = SGLangEngine({url!r}, tokenizer, timeout_s=60)
engine.init_weight_transfer("127.0.0.1", {port}, backend="gloo", bucket_mb=0.05)
engine.update_weights(model)
print("synced", engine._weight_version)
"""


@pytest.mark.parametrize("sessions", [True, False], ids=["sglang-0.5.23-sessions", "older-sglang"])
def test_weights_sync_over_a_process_group_without_a_shared_disk(policy, sessions):
    """The trainer (another process: rank 0) broadcasts the policy in buckets to the server (rank 1),
    inside one weight-update session where the server has them (else without), and the server takes
    the new weight version with the last bucket only."""
    model, tokenizer = policy
    new_policy, _ = tiny_policy(seed=6)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    engine = EmbeddedEngine(copy.deepcopy(model), tokenizer)
    with ProtocolServer(engine, tokenizer, weight_update_sessions=sessions) as server:
        answer = requests.post(server.url + "/update_weights_from_distributed", json={"names": []}, timeout=5)
        assert answer.status_code == 400 and "init_weights_update_group" in answer.json()["message"]
        client(server.url, tokenizer).think([[5, 6, 7]], 1, 4, GREEDY)
        assert server.engine.cached_sequences == 1
        script = TRAINER_SIDE.format(tests=str(Path(__file__).parent), url=server.url, port=port)
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        assert "synced 1" in done.stdout
        for name, tensor in new_policy.state_dict().items():  # sent in bf16 (sync_dtype), cast back by the server
            expected = tensor.bfloat16().to(tensor.dtype) if tensor.is_floating_point() else tensor
            assert torch.equal(server.engine.model.state_dict()[name], expected), name
        assert server.weight_version == "1" and server.engine.cached_sequences == 0  # flushed with the last bucket
        kinds = [kind for kind, _ in server.weight_events]
        buckets = kinds.count("bucket")
        assert buckets > 1 and kinds == (["begin"] if sessions else []) + ["bucket"] * buckets + (
            ["end"] if sessions else []
        )
        versions = [version for kind, version in server.weight_events if kind == "bucket"]
        assert versions == [None] * (buckets - 1) + ["1"] and not server.session_open


def test_weight_group_over_ipv6_and_a_second_join_under_the_same_name():
    """A bracketed tcp:// address for an IPv6 master, and a group name joined again (servers
    restarted, a new engine in this process) replaces the old group instead of failing."""
    import torch.distributed as dist

    from trainer.rollout.weight_transfer import init_weights_group

    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
            port = probe.getsockname()[1]
    except OSError as error:
        pytest.skip(f"no IPv6 loopback on this machine: {error}")
    group = init_weights_group("gloo", "::1", port, 1, 0, "ipv6_test_group")
    tensor = torch.arange(3.0)
    dist.broadcast(tensor, src=0, group=group)
    again = init_weights_group("gloo", "::1", port, 1, 0, "ipv6_test_group")
    assert again.size() == 1 and list(dist.distributed_c10d._world.pg_names.values()).count("ipv6_test_group") == 1
    dist.destroy_process_group(again)


def test_collective_calls_are_sent_once_and_data_parallel_servers_refuse_group_sync(policy):
    """Retrying a weight broadcast's HTTP call would pair it with the wrong broadcast: those calls
    go out once; SGLang asserts dp_size == 1 for group sync, so the client refuses it up front."""
    model, tokenizer = policy
    with ProtocolServer(EmbeddedEngine(model, tokenizer), tokenizer) as server:
        remote = client(server.url, tokenizer)
        body = {"input_ids": [5, 6], "sampling_params": {"n": 1, "max_new_tokens": 2, "temperature": 0}}
        server.inject_faults(["500", "500"])
        with pytest.raises(SGLangServerError, match=r"after 1 attempt; last error: HTTP 500") as caught:
            remote._call(server.url, "/generate", body=body, retry=False)
        assert caught.value.status == 500 and server.next_fault() == "500"  # the second fault was not reached
        assert remote._call(server.url, "/generate", body=body).json()["meta_info"]["finish_reason"]["type"]
    with pytest.raises(ValueError, match="dp_size=2"):
        client("http://127.0.0.1:9", tokenizer, dp_size=2).init_weight_transfer("127.0.0.1", 29999)
