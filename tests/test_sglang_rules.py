"""The SGLang client against the protocol server where SGLang 0.5.23 refuses, trims or reorders.

Each rule is asserted twice: the test server answers as SGLang does (read from SGLang's source:
its HTTP server, tokenizer manager, scheduler and radix cache), and the client, the launcher and
the trainer's startup neither trip on it nor let it silently change what is sampled.
"""

import time

import pytest
import requests
from fixtures import protocol

from trainer.budgets import BudgetSchedule, Delimiters
from trainer.rollout import EmbeddedEngine, SamplingParams
from trainer.rollout.base import TRACE_PRIORITY
from trainer.rollout.sglang_server import wait_until_ready
from trainer.rollout.testing import ProtocolServer

GREEDY = SamplingParams(temperature=0)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# The tiny policy behind the protocol server (one per module), and a client with short waits.
policy, server, client = protocol.policy, protocol.server, protocol.client


def post(server, body):
    return requests.post(server.url + "/generate", json=body, timeout=10)


def test_the_launcher_waits_on_ready_not_on_the_slow_health_check(server):
    """SGLang's /health answers once a one-token generation came back, a second at least (up to 20 s);
    /ready answers at once. A 1 s poll of /health never sees the server come up."""
    server.health_check_seconds = 1.2
    start = time.perf_counter()
    wait_until_ready(server.url, timeout_s=4)
    assert time.perf_counter() - start < 1.0
    start = time.perf_counter()
    assert requests.get(server.url + "/health", timeout=5).status_code == 200
    assert time.perf_counter() - start >= 1.2


def test_a_server_without_ready_is_polled_on_health_with_its_own_wait(policy):
    model, tokenizer = policy
    with ProtocolServer(EmbeddedEngine(model, tokenizer), tokenizer, ready_route=False) as old:
        old.health_check_seconds = 1.2
        assert requests.get(old.url + "/ready", timeout=5).status_code == 404
        wait_until_ready(old.url, timeout_s=4, poll_s=0.2)


def test_a_deterministic_server_gets_one_seeded_request_per_sample(policy):
    model, tokenizer = policy
    sampling = SamplingParams(temperature=1.0)
    with ProtocolServer(EmbeddedEngine(model, tokenizer), tokenizer, deterministic=True) as server:
        # SGLang's rule: an unseeded request is seeded with 42, and the samples of a seed are one.
        params = {"n": 3, "max_new_tokens": 8, "temperature": 1.0}
        unseeded = post(server, {"input_ids": [8, 9, 10], "sampling_params": params}).json()
        assert len({tuple(sample["output_ids"]) for sample in unseeded}) == 1
        seeded = post(server, {"input_ids": [8, 9, 10], "sampling_params": {**params, "n": 1, "sampling_seed": 42}})
        assert seeded.json()["output_ids"] == unseeded[0]["output_ids"]
        # The client reads the mode from /server_info: G distinct traces, distinct summaries.
        remote = client(server.url, tokenizer)
        traces = remote.think([[8, 9, 10]], 4, 8, sampling)
        assert len({tuple(z) for z in traces.thinking_ids}) == 4, traces.thinking_ids
        batch = remote.summarize(traces, BudgetSchedule(8, 2), 2, sampling, max_new_tokens=6)
        for per_trace in batch.summary_ids:
            for per_slot in per_trace:
                assert per_slot[0] != per_slot[1], per_slot
        # A seeded request's samples are reproducible and still distinct.
        seeded_sampling = SamplingParams(temperature=1.0, seed=3)
        first = remote.think([[8, 9, 10]], 3, 8, seeded_sampling).thinking_ids
        assert (
            len({tuple(z) for z in first}) == 3
            and remote.think([[8, 9, 10]], 3, 8, seeded_sampling).thinking_ids == first
        )


def test_requests_past_the_servers_context_are_refused_before_they_are_sent(policy):
    model, tokenizer = policy
    with ProtocolServer(EmbeddedEngine(model, tokenizer), tokenizer, context_len=40) as server:
        # As SGLang: 400 past the context (or for a prompt of max_req_input_len = 40 - 6 tokens), and
        # new tokens capped at the context less 2, silently.
        past = post(server, {"input_ids": list(range(5, 15)), "sampling_params": {"max_new_tokens": 31}})
        assert past.status_code == 400 and "context of 40" in past.text
        params = {"max_new_tokens": 29, "min_new_tokens": 29, "temperature": 0}
        capped = post(server, {"input_ids": list(range(5, 15)), "sampling_params": params}).json()
        assert len(capped["output_ids"]) == 40 - 2 - 10 and capped["meta_info"]["finish_reason"]["type"] == "length"
        long_prompt = post(server, {"input_ids": list(range(5, 39)), "sampling_params": {"max_new_tokens": 1}})
        assert long_prompt.status_code == 400 and "max_req_input_len=34" in long_prompt.text
        remote = client(server.url, tokenizer)
        prompt = list(range(5, 15))
        fits = remote.think([prompt], 1, 28, SamplingParams(temperature=0, min_new_tokens=28))
        assert fits.thinking_lens == [28]  # 10 + 28 = 40 - 2: served as asked
        served = server.generate_served
        for max_tokens in (29, 31):  # cut short by the server, refused by the server
            with pytest.raises(ValueError, match=r"context_len is 40, and SGLang serves at most context_len - 2 = 38"):
                remote.think([prompt], 1, max_tokens, SamplingParams(temperature=0, min_new_tokens=max_tokens))
        assert server.generate_served == served


def test_the_prompt_limit_at_startup_comes_from_the_servers_context(tmp_path):
    """One prompt too long for the server would fail a training step (a 400 is not retried): the
    limit that loading the data applies is the servers' context less 2, and a set
    data.max_prompt_tokens that does not fit it is refused before anything runs."""
    from test_trainer import TINY

    from trainer.components import build
    from trainer.config import load_config
    from trainer.data import DataError
    from trainer.models import load_model, load_tokenizer

    config = load_config(None, TINY)
    tokenizer = load_tokenizer(config.model)
    delimiters = Delimiters.from_tokenizer(tokenizer)
    branch = max(len(delimiters.truncated), len(delimiters.closed)) + config.rollout.summary_max_new_tokens
    context_len = 2 + config.method.b_max + branch + 5  # room for prompts of 5 tokens, shorter than any
    engine = EmbeddedEngine(load_model(config.model, tokenizer, "cpu", seed=0), tokenizer)
    with ProtocolServer(engine, tokenizer, context_len=context_len) as server:
        common = [*TINY, "rollout.engine=sglang", f"rollout.urls=[{server.url}]", "data.skip_long_prompts=false"]
        with pytest.raises(DataError, match="has a prompt longer than 5 tokens"):
            build(load_config(None, common), tmp_path / "derived")
        with pytest.raises(ValueError, match=r"data.max_prompt_tokens=6 leaves no room .* set it to at most 5"):
            build(load_config(None, [*common, "data.max_prompt_tokens=6"]), tmp_path / "set")
    assert server.generate_served == 0


def test_min_new_tokens_is_refused_before_sending_to_a_server_without_its_tokenizer(policy):
    model, tokenizer = policy
    with ProtocolServer(EmbeddedEngine(model, tokenizer)) as server:  # --skip-tokenizer-init, as launched
        answer = post(server, {"input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 4, "min_new_tokens": 2}})
        assert answer.status_code == 400 and "min_new_tokens=2" in answer.text
        remote = client(server.url, tokenizer)
        with pytest.raises(ValueError, match=r"min_new_tokens=3: .* --skip-tokenizer-init"):
            remote.think([[5, 6, 7]], 1, 8, SamplingParams(temperature=0, min_new_tokens=3))
        assert server.generate_served == 0
        assert remote.think([[5, 6, 7]], 1, 8, GREEDY).num_traces == 1


def test_a_dp_size_other_than_the_servers_is_refused_at_start(policy):
    model, tokenizer = policy
    prompts = [[8, 9, 10], [11, 12], [13, 14, 15, 16], [17, 18], [19, 20, 21]]
    with ProtocolServer(EmbeddedEngine(model, tokenizer), tokenizer, dp_size=2) as server:
        body = {"input_ids": [5, 6], "sampling_params": {"max_new_tokens": 2}}
        out_of_range = post(server, {**body, "routed_dp_rank": 2})
        assert out_of_range.status_code == 400 and "routed_dp_rank=2" in out_of_range.text
        assert post(server, {**body, "routed_dp_rank": 1}).status_code == 200
        served = server.generate_served
        for dp_size in (4, 1):  # replicas the server lacks; a server balancing forks away from their trace
            with pytest.raises(ValueError, match=rf"rollout.dp_size={dp_size}, but .* runs 2 data-parallel"):
                client(server.url, tokenizer, dp_size=dp_size).think(prompts, 1, 4, GREEDY)
        assert server.generate_served == served
        assert client(server.url, tokenizer, dp_size=2).think(prompts, 1, 4, GREEDY).num_traces == len(prompts)


def test_traces_outrank_the_prompts_their_forks_leave_in_the_cache(policy):
    """SGLang keeps a finished fork's prompt (trace prefix + delimiter) at its priority + 1. Were that
    equal to the trace's priority, the fork's newer prompt would outlive the trace on a tie, and
    the trace's next fork would find only the first cut in the cache."""
    model, tokenizer = policy
    prompt, length = [5, 6, 7], 16
    trace_tokens = len(prompt) + length - 1  # a finished trace's last token has no keys/values yet
    # Room for the trace (and a few tokens), not for a fork's prompt too.
    engine = EmbeddedEngine(model, tokenizer, kv_budget_tokens=trace_tokens + len(prompt) + 1)
    with ProtocolServer(engine, tokenizer) as server:
        remote = client(server.url, tokenizer)
        traces = remote.think([prompt], 1, length, SamplingParams(temperature=0, min_new_tokens=length))
        assert traces.thinking_lens == [length]
        remote.summarize(traces, BudgetSchedule(8, 1), 1, GREEDY, max_new_tokens=4)  # the fork at cut 8
        remote.reset_stats()
        remote.summarize(traces, BudgetSchedule(12, 1), 1, GREEDY, max_new_tokens=4)  # the fork at cut 12
        assert remote.stats.summarize.server_prefill_cache == len(prompt) + 12


def test_min_new_tokens_above_a_summarys_cap_is_sent_as_the_cap(policy, server):
    """The phases share their sampling settings, so a think-phase min_new_tokens exceeds the summaries'
    cap; SGLang refuses min_new_tokens above max_new_tokens, and no stop within the cap is the same ask."""
    model, tokenizer = policy
    refused = post(server, {"input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 4, "min_new_tokens": 10}})
    assert refused.status_code == 400 and "min_new_tokens=10" in refused.text
    sampling, schedule = SamplingParams(temperature=0, min_new_tokens=10), BudgetSchedule(12, 2)
    _, batch = client(server.url, tokenizer).rollout([[8, 9, 10]], 1, 12, schedule, 1, sampling, 4)
    _, local = EmbeddedEngine(model, tokenizer).rollout([[8, 9, 10]], 1, 12, schedule, 1, sampling, 4)
    assert batch.summary_ids == local.summary_ids
    assert {len(ids) for per_trace in batch.summary_ids for per_slot in per_trace for ids in per_slot} == {4}


def test_forks_of_several_samples_go_as_bodies_of_their_own(policy, server):
    """SGLang prefills each n > 1 item of a batch body alone, waiting for each in turn, before it
    samples any: the forks of a trace must not share a body."""
    _, tokenizer = policy
    body = {"input_ids": [[5, 6], [7, 8]], "sampling_params": [{"n": 2, "max_new_tokens": 2}] * 2}
    assert post(server, body).status_code == 200 and (server.warmup_rounds, server.serial_warmups) == (2, 1)
    remote = client(server.url, tokenizer)
    sampling = SamplingParams(temperature=0, min_new_tokens=4)  # these prompts' greedy traces are 16 long
    _, batch = remote.rollout([[8, 9, 10], [11, 12]], 1, 16, BudgetSchedule(16, 4), 2, sampling, 4)
    assert batch.cut_lens.tolist() == [[4, 8, 12, 16]] * 2
    assert server.warmup_rounds == 2 + 8 and server.serial_warmups == 1


def test_every_sampling_key_of_sglang_is_accepted_and_no_other(server):
    defaults = {
        "max_new_tokens": 3, "stop": None, "stop_token_ids": None, "stop_regex": None, "temperature": 0.0,
        "top_p": 1.0, "top_k": -1, "min_p": 0.0, "frequency_penalty": 0.0, "presence_penalty": 0.0,
        "repetition_penalty": 1.0, "min_new_tokens": 0, "n": 1, "json_schema": None, "regex": None, "ebnf": None,
        "structural_tag": None, "ignore_eos": False, "skip_special_tokens": True,
        "spaces_between_special_tokens": True, "no_stop_trim": False, "stream_interval": None, "logit_bias": {},
        "sampling_seed": None, "custom_params": None, "beam_width": None, "watermark": None, "choice": [],
    }  # fmt: skip
    assert len(defaults) == 28  # sglang.api.v1.SamplingParams, 0.5.23
    answer = post(server, {"input_ids": [5, 6, 7], "sampling_params": defaults})
    assert answer.status_code == 200 and len(answer.json()["output_ids"]) == 3
    unknown = post(server, {"input_ids": [5, 6, 7], "sampling_params": {**defaults, "top_a": 0.1}})
    assert unknown.status_code == 400 and "unknown sampling_params ['top_a']" in unknown.text
    not_emulated = post(server, {"input_ids": [5, 6, 7], "sampling_params": {**defaults, "frequency_penalty": 0.5}})
    assert not_emulated.status_code == 400 and "does not emulate frequency_penalty" in not_emulated.text


def test_server_info_names_the_limits_the_client_reads(policy):
    model, tokenizer = policy
    with ProtocolServer(EmbeddedEngine(model, tokenizer), context_len=64, dp_size=2, deterministic=True) as server:
        info = client(server.url, tokenizer, dp_size=2).server_info()
    assert [(i.context_len, i.max_input_len, i.dp_size, i.deterministic, i.skips_tokenizer) for i in info] == [
        (64, 64 - 6, 2, True, True)
    ]
    assert info[0].request_tokens == 62 and TRACE_PRIORITY >= 2
