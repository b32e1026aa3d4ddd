"""The SGLang client against the protocol server (SGLang's endpoints over the embedded engine)."""

import dataclasses
import socket
import time

import pytest
import torch
from fixtures import protocol
from fixtures.tiny_policy import tiny_policy
from safetensors.torch import load_file

from trainer.budgets import BudgetSchedule
from trainer.rollout import EmbeddedEngine, SamplingParams, SGLangEngine, SGLangServerError
from trainer.rollout.sglang_server import SGLangInProcessEngine, sglang_server_command, wait_until_ready
from trainer.rollout.testing import ProtocolServer

GREEDY = SamplingParams(temperature=0)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# The tiny policy behind the protocol server (one per module), and a client with short waits.
policy, server, client = protocol.policy, protocol.server, protocol.client


def rollout(engine, tokenizer, group_size=2):
    prompts = [
        tokenizer.encode("Compute 3*4.", add_special_tokens=False),
        tokenizer.encode("x", add_special_tokens=False),
    ]
    traces = engine.think(prompts, group_size, 16, SamplingParams(temperature=0, min_new_tokens=10))
    return traces, engine.summarize(traces, BudgetSchedule(16, 2), 2, GREEDY, max_new_tokens=6)


def test_client_over_http_matches_the_embedded_engine_and_records_cached_tokens(policy, server):
    model, tokenizer = policy
    # One trace per prompt: greedy traces of one prompt would be identical, and the server (like
    # SGLang) also caches finished summaries, which a later identical fork would then reuse.
    remote = client([server.url, server.url], tokenizer)
    traces, batch = rollout(remote, tokenizer, group_size=1)
    local = EmbeddedEngine(model, tokenizer)
    local_traces, local_batch = rollout(local, tokenizer, group_size=1)
    assert traces.thinking_ids == local_traces.thinking_ids
    assert batch.summary_ids == local_batch.summary_ids
    assert torch.equal(batch.cut_lens, local_batch.cut_lens)
    # The server's own prefill counters (/metrics) equal the in-process engine's exact accounting.
    for phase in ("think", "summarize"):
        got, want = getattr(remote.stats, phase), getattr(local.stats, phase)
        assert (got.samples, got.prompt_tokens) == (want.samples, want.prompt_tokens)
        assert (got.server_prefill_compute, got.server_prefill_cache) == (
            want.server_prefill_compute,
            want.server_prefill_cache,
        )
        assert want.prefilled_tokens == want.server_prefill_compute  # in-process: exact, once per request
    assert remote.stats.summarize.server_prefill_cache > 0
    assert server.generate_served == 2 + sum(len(set(c)) for c in batch.cut_lens.tolist())


def test_cache_figures_come_from_the_server_counters_not_meta_info(policy, server):
    """For n > 1 SGLang reports cached_tokens = prompt_len - 1 for every sample, cached or not; the
    hit share must come from the server's prefill counters."""
    _, tokenizer = policy
    remote = client(server.url, tokenizer)
    prompt = list(range(3, 40))  # never seen: nothing of it can be cached
    remote.think([prompt], 4, 3, GREEDY)
    think = remote.stats.think
    assert think.cached_tokens == 4 * (len(prompt) - 1)  # what meta_info claims
    assert (think.server_prefill_compute, think.server_prefill_cache) == (len(prompt), 0)
    assert think.cache_hit_share == 0.0 and think.computed_prefill_tokens == len(prompt)


def test_ingested_traces_over_http_serve_forks_from_the_server_cache(policy, server):
    model, tokenizer = policy
    prompt = tokenizer.encode("Compute 3*4.", add_special_tokens=False)
    traces = [tokenizer.encode("3*4 is 12, so", add_special_tokens=False)]
    remote = client(server.url, tokenizer)
    local = EmbeddedEngine(model, tokenizer)
    batches = []
    for engine in (remote, local):
        ingested = engine.ingest([prompt], traces, group_size=1)
        batches.append(engine.summarize(ingested, BudgetSchedule(12, 2), 2, GREEDY, max_new_tokens=6))
    assert batches[0].summary_ids == batches[1].summary_ids
    assert server.engine.cached_sequences >= 1
    # Cuts 6 and 12 of the 13-token trace: each fork (one prefill for its 2 samples) is served
    # prompt + cut from the cache, by the server's counters as in-process.
    cached = [len(prompt) + 6, len(prompt) + 12]
    assert remote.stats.summarize.server_prefill_cache == local.stats.summarize.server_prefill_cache == sum(cached)


def test_model_info_flush_and_weight_sync_from_disk(policy, server, tmp_path):
    _, tokenizer = policy
    remote = client(server.url, tokenizer, weights_dir=tmp_path)
    assert remote.model_info()["is_generation"] is True
    remote.think([[5, 6, 7]], 1, 4, GREEDY)
    assert server.engine.cached_sequences == 1
    remote.flush_cache()
    assert server.engine.cached_sequences == 0

    new_policy, _ = tiny_policy(seed=6)
    remote.think([[5, 6, 7]], 1, 4, GREEDY)
    remote.update_weights(new_policy)
    saved = load_file(str(tmp_path / "policy" / "model.safetensors"))
    assert {tensor.dtype for tensor in saved.values()} == {torch.bfloat16}  # half the bytes of fp32
    served = server.engine.model.model.embed_tokens.weight
    assert torch.equal(served, new_policy.model.embed_tokens.weight.bfloat16().float())  # the server casts back
    assert server.engine.cached_sequences == 0
    assert server.model_info()["weight_version"] == "1"
    exact = client(server.url, tokenizer, weights_dir=tmp_path / "exact", sync_dtype=None)
    exact.update_weights(new_policy)
    assert torch.equal(server.engine.model.model.embed_tokens.weight, new_policy.model.embed_tokens.weight)


def test_cast_floats_keeps_tied_tensors_shared_and_leaves_integers():
    from trainer.rollout.weight_transfer import cast_floats

    weight = torch.randn(4, 3)
    state = {"embed": weight, "lm_head": weight, "steps": torch.arange(3), "norm": torch.ones(3)}
    cast = cast_floats(state, torch.bfloat16)
    assert cast["embed"] is cast["lm_head"] and cast["embed"].dtype == torch.bfloat16
    assert cast["steps"] is state["steps"] and cast["norm"].dtype == torch.bfloat16
    assert torch.equal(cast["embed"], weight.bfloat16()) and cast_floats(state, None) is state


@pytest.mark.parametrize("faults", [["500"], ["malformed"], ["drop"], ["500", "malformed"]])
def test_transient_faults_are_retried_and_nothing_is_lost_or_duplicated(policy, server, faults):
    _, tokenizer = policy
    reference = rollout(client(server.url, tokenizer), tokenizer)
    server.inject_faults(faults)
    remote = client(server.url, tokenizer)
    traces, batch = rollout(remote, tokenizer)
    assert traces.thinking_ids == reference[0].thinking_ids
    assert batch.summary_ids == reference[1].summary_ids
    assert remote.stats.think.requests == 2 and remote.stats.summarize.requests == reference[1].cut_lens.shape[0] * 2


def test_a_hung_request_times_out_and_is_retried(policy, server):
    _, tokenizer = policy
    server.hang_seconds = 3.0
    server.inject_faults(["hang"])
    remote = client(server.url, tokenizer, timeout_s=0.5)
    start = time.perf_counter()
    out = remote.think([[8, 9]], 2, 3, GREEDY)
    elapsed = time.perf_counter() - start
    # Abandoned at its 0.5 s timeout and retried: well before the hang would have ended.
    assert out.num_traces == 2 and 0.5 <= elapsed < 2.0


def test_persistent_faults_raise_a_clear_error(policy, server):
    _, tokenizer = policy
    server.inject_faults(["500"] * 3)
    with pytest.raises(SGLangServerError, match=r"/generate failed after 3 attempts; last error: HTTP 500"):
        client(server.url, tokenizer).think([[8, 9]], 1, 3, GREEDY)
    server.inject_faults(["malformed"] * 3)
    with pytest.raises(SGLangServerError, match="failed after 3 attempts; last error: malformed response"):
        client(server.url, tokenizer).think([[8, 9]], 1, 3, GREEDY)


def test_connection_refused_raises_after_the_retries(policy):
    _, tokenizer = policy
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # The first request reads the server's limits first.
    with pytest.raises(
        SGLangServerError, match=rf"127.0.0.1:{port}/server_info failed after 3 attempts.*ConnectionError"
    ):
        client(f"http://127.0.0.1:{port}", tokenizer).think([[8, 9]], 1, 3, GREEDY)


def test_a_bad_request_is_not_retried(policy, server):
    _, tokenizer = policy
    remote = client(server.url, tokenizer)
    with pytest.raises(SGLangServerError, match="answered 400"):
        remote._call(server.url, "/generate", body={"text": "no ids"})
    assert server.generate_served == 0


def test_server_command_health_wait_and_missing_sglang(policy, server):
    command = sglang_server_command("/models/policy", 31000, dp_size=2)
    assert command[1:] == [
        "-m", "sglang.launch_server", "--model-path", "/models/policy", "--host", "127.0.0.1", "--port", "31000",
        "--schedule-policy", "lpm", "--radix-eviction-policy", "priority", "--enable-metrics", "--skip-tokenizer-init", "--dp-size", "2",
    ]  # fmt: skip
    assert "--disable-radix-cache" not in command
    wait_until_ready(server.url, timeout_s=5)
    with pytest.raises(TimeoutError, match="was not ready within 1s"):
        wait_until_ready("http://127.0.0.1:9", timeout_s=1, poll_s=0.2)
    with pytest.raises(ValueError, match="must start with http"):
        SGLangEngine("localhost:30000", policy[1])
    try:
        import sglang  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="needs the sglang package"):
            SGLangInProcessEngine("/models/policy", policy[1])


@pytest.fixture
def replicated_server(policy):
    """A server started with --dp-size 4 (the one engine serves every replica)."""
    model, tokenizer = policy
    with ProtocolServer(EmbeddedEngine(model, tokenizer), tokenizer, dp_size=4) as running:
        yield running


def test_requests_name_their_replica_and_forks_follow_their_trace(policy, replicated_server):
    """With --dp-size > 1 the server balances unrouted requests round-robin; every request names its
    replica from the prompt's routing key, so a trace's forks land where its KV cache is."""
    _, tokenizer = policy
    server = replicated_server
    remote = client(server.url, tokenizer, dp_size=4)
    prompts = [[8, 9, 10], [11, 12], [13, 14, 15, 16]]
    # Record, per /generate body, its replica and the prompts it carries (a fork's input starts
    # with its trace's prompt; no prompt here is a prefix of another).
    bodies = []
    parse = server._parse

    def recording(body):
        bodies.append((body.get("routed_dp_rank"), body["input_ids"]))
        return parse(body)

    server._parse = recording
    traces = remote.think(prompts, 2, 6, GREEDY)
    think_ranks = list(server.routed_dp_ranks)
    num_think_bodies = len(bodies)
    remote.summarize(traces, BudgetSchedule(6, 2), 1, GREEDY, max_new_tokens=3)
    fork_ranks = server.routed_dp_ranks[len(think_ranks) :]
    from trainer.rollout.base import prompt_key

    # Concurrent requests reach the server in any order: compare the ranks as a multiset.
    assert sorted(think_ranks) == sorted(prompt_key(p) % 4 for p in prompts)
    ranks = [prompt_key(p) % 4 for p in prompts]
    assert len(set(ranks)) == len(prompts)  # distinct replicas: a fork sent to another trace's one shows
    assert len(fork_ranks) == len(bodies) - num_think_bodies > 0 and set(fork_ranks) == set(ranks)
    for rank, input_ids in bodies:
        for ids in input_ids if isinstance(input_ids[0], list) else [input_ids]:
            owner = [i for i, p in enumerate(prompts) if ids[: len(p)] == p]
            assert len(owner) == 1 and rank == ranks[owner[0]], (rank, ids)
    plain = client(server.url, tokenizer)  # dp_size 1 against a server of 4 replicas: refused
    with pytest.raises(ValueError, match=r"rollout.dp_size=1, but .* runs 4 data-parallel"):
        plain.think([[5, 6]], 1, 2, GREEDY)
    assert len(server.routed_dp_ranks) == len(think_ranks) + len(fork_ranks)


def test_sampling_payload_seeds_and_explicit_defaults():
    from trainer.rollout import GenerationRequest
    from trainer.rollout.sglang_protocol import generate_payload, request_seed, split_for_seeds

    seeded = SamplingParams(temperature=0.7, seed=5)
    many = GenerationRequest((1, 2), n=3, max_new_tokens=4, stop_token_ids=(0,), sampling=seeded, routing_key=7)
    params = generate_payload(many)["sampling_params"]
    assert "sampling_seed" not in params  # one seed for n > 1: identical samples in deterministic mode
    assert (params["top_k"], params["min_p"], params["repetition_penalty"]) == (-1, 0.0, 1.0)
    assert "routed_dp_rank" not in generate_payload(many) and generate_payload(many, dp_size=4)["routed_dp_rank"] == 3
    parts = split_for_seeds(many)
    assert [p.n for p in parts] == [1, 1, 1] and [p.sampling.seed for p in parts] == [5, 6, 7]
    seeds = [generate_payload(p)["sampling_params"]["sampling_seed"] for p in parts]
    assert seeds == [request_seed(5 + i, (1, 2)) for i in range(3)] and len(set(seeds)) == 3
    # SGLang draws a seeded sample from (seed, position) alone: one seed shared by requests for
    # different prompts (an evaluation's) must not give them the same draws.
    other = dataclasses.replace(parts[0], input_ids=(1, 3))
    assert generate_payload(other)["sampling_params"]["sampling_seed"] != seeds[0]
    assert generate_payload(dataclasses.replace(parts[0]))["sampling_params"]["sampling_seed"] == seeds[0]
    assert all(0 <= seed < 2**31 for seed in seeds)


def test_deterministic_servers_get_one_request_per_seeded_sample(policy, server):
    _, tokenizer = policy
    remote = client(server.url, tokenizer, deterministic=True)
    before = server.generate_served
    out = remote.think([[8, 9]], 3, 4, SamplingParams(temperature=1.0, seed=11))
    assert out.num_traces == 3 and server.generate_served - before == 3


def test_the_full_eos_set_stops_and_labels_traces(policy, server):
    """Qwen-style configs name two EOS ids; the engines stop at, and label as "eos", every one."""
    model, tokenizer = policy
    engine = EmbeddedEngine(model, tokenizer)
    greedy = engine.think([[8, 9, 10]], 1, 12, GREEDY).thinking_ids[0]
    extra = greedy[2]  # make the third greedy token an EOS of the model
    assert extra not in (engine.eos_token_id, engine.delimiters.think_end_id)
    for candidate in (EmbeddedEngine(model, tokenizer, eos_token_ids=[extra]),
                      client(server.url, tokenizer, eos_token_ids=[extra])):  # fmt: skip
        traces = candidate.think([[8, 9, 10]], 1, 12, GREEDY)
        assert traces.thinking_ids[0] == greedy[:3] and traces.finish == ["eos"]
    with pytest.raises(ValueError, match="include the </think> id"):
        EmbeddedEngine(model, tokenizer, eos_token_ids=[engine.delimiters.think_end_id])


def test_a_server_on_old_weights_is_caught(policy, server, tmp_path):
    _, tokenizer = policy
    remote = client(server.url, tokenizer, weights_dir=tmp_path, max_retries=0)
    remote.update_weights(tiny_policy(seed=7)[0])
    remote.think([[5, 6]], 1, 2, GREEDY)  # version 1 on both sides
    server.weight_version = "0"  # the server silently kept older weights
    with pytest.raises(SGLangServerError, match="weight version 0, but the policy is at 1"):
        remote.think([[5, 6]], 1, 2, GREEDY)


def test_the_test_server_refuses_what_sglang_refuses(policy, server):
    _, tokenizer = policy
    remote = client(server.url, tokenizer)
    body = {"input_ids": [[1, 2], [3, 4]], "sampling_params": [{"n": 2}, {"n": 3}]}
    with pytest.raises(SGLangServerError, match=r"answered 400.*same n"):
        remote._call(server.url, "/generate", body=body)
    with pytest.raises(SGLangServerError, match=r"answered 400.*unknown sampling_params \['frequency_penaltyy'\]"):
        remote._call(server.url, "/generate", body={"input_ids": [1, 2], "sampling_params": {"frequency_penaltyy": 1}})


def test_settings_that_kill_prefix_reuse_are_rejected(policy):
    for flag in ("--disable-radix-cache", "--strip-thinking-cache"):
        with pytest.raises(ValueError, match=f"{flag}.*turns off the radix-cache reuse"):
            sglang_server_command("/models/policy", 31000, extra_args=[flag])
    with pytest.raises(ValueError, match="disable_radix_cache"):
        SGLangInProcessEngine("/models/policy", policy[1], disable_radix_cache=True)


@pytest.mark.parametrize(
    "sample",
    [{"output_ids": [1], "meta_info": "oops"}, "not a record", {"output_ids": [1]}],
    ids=["meta_info-not-a-record", "sample-not-a-record", "no-meta_info"],
)
def test_malformed_samples_are_malformed_responses(sample):
    """Anything short of SGLang's layout is a MalformedResponse (which the client retries), never a
    stray AttributeError from looking for an abort first."""
    from trainer.rollout import GenerationRequest
    from trainer.rollout.sglang_protocol import AbortedRequest, MalformedResponse, parse_generate_response

    request = GenerationRequest((1, 2), 1, 4, (), GREEDY)
    with pytest.raises(MalformedResponse, match="lacks SGLang's output_ids/meta_info fields") as caught:
        parse_generate_response(sample, request)
    assert not isinstance(caught.value, AbortedRequest)
