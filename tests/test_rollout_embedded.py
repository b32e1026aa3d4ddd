"""The embedded engine: forked summaries equal a fresh full prefill; exact cached-token accounting."""

import pytest
import torch
from fixtures.tiny_policy import tiny_policy

from trainer.budgets import BudgetSchedule
from trainer.rollout import EmbeddedEngine, GenerationRequest, SamplingParams

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def reference_greedy(model, input_ids, max_new_tokens, eos):
    """Greedy decoding by recomputing the whole sequence every step (no cache at all)."""
    ids = list(input_ids)
    out = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(input_ids=torch.tensor([ids], device=model.device)).logits[0, -1]
            token = int(logits.argmax())
            out.append(token)
            ids.append(token)
            if token == eos:
                break
    return out


def check_greedy_forks_match_full_prefill(device):
    model, tokenizer = tiny_policy(seed=1, dtype=torch.float64)
    model = model.to(device)
    engine = EmbeddedEngine(model, tokenizer, max_batch_rows=8)
    prompts = [
        tokenizer.encode("Add 17 and 25.", add_special_tokens=False),
        tokenizer.encode("Hi", add_special_tokens=False),
    ]
    traces = engine.think(
        prompts, group_size=2, max_tokens=20, sampling=SamplingParams(temperature=1.0, seed=7, min_new_tokens=6)
    )
    assert engine.cached_sequences == 4
    batch = engine.summarize(
        traces, BudgetSchedule(20, 4), num_summaries=1, sampling=SamplingParams(temperature=0), max_new_tokens=10
    )
    assert engine.stats.summarize.cached_tokens > 0
    eos = tokenizer.eos_token_id
    checked = 0
    for n in range(traces.num_traces):
        cuts = batch.cut_lens[n].tolist()
        for s, cut in enumerate(cuts):
            inserted = batch.inserted_ids[n][sorted(set(cuts)).index(cut)]
            fork_prompt = traces.prompt_ids[n] + traces.thinking_ids[n][:cut] + list(inserted)
            assert batch.summary_ids[n][s][0] == reference_greedy(model, fork_prompt, 10, eos)
            checked += 1
    assert checked == 16


def test_greedy_forks_from_the_cache_equal_a_fresh_full_prefill():
    check_greedy_forks_match_full_prefill("cpu")


@pytest.mark.gpu
def test_greedy_forks_from_the_cache_equal_a_fresh_full_prefill_cuda():
    check_greedy_forks_match_full_prefill("cuda")


def test_cached_token_accounting_is_exact_on_a_hand_checked_case():
    model, tokenizer = tiny_policy(seed=2)
    engine = EmbeddedEngine(model, tokenizer)
    prompt = tokenizer.encode("2+2=?", add_special_tokens=False)
    assert len(prompt) == 5 and len(engine.delimiters.truncated) == 30
    # min_new_tokens == max_tokens forbids stopping: both traces run to b_max = 12 unclosed.
    traces = engine.think([prompt], group_size=2, max_tokens=12, sampling=SamplingParams(seed=0, min_new_tokens=12))
    assert traces.thinking_lens == [12, 12] and traces.finish == ["length", "length"]
    think = engine.stats.think
    assert (think.requests, think.samples, think.prompt_tokens, think.cached_tokens, think.prefilled_tokens) == (
        1,
        2,
        10,
        0,
        5,
    )

    engine.summarize(traces, BudgetSchedule(12, 4), num_summaries=2, sampling=SamplingParams(seed=1), max_new_tokens=4)
    stats = engine.stats.summarize
    # Cuts 3, 6, 9, 12 per trace; fork prompt = 5 + c + 30 tokens. Cached: 5 + c, except the
    # whole trace, whose last token was sampled but never fed (no keys/values): 5 + 11.
    prompt_tokens = [38, 41, 44, 47]
    cached = [8, 11, 14, 16]
    assert stats.requests == 8 and stats.samples == 16
    assert stats.prompt_tokens == 2 * 2 * sum(prompt_tokens) == 680
    assert stats.cached_tokens == 2 * 2 * sum(cached) == 196
    assert stats.prefilled_tokens == 2 * sum(p - c for p, c in zip(prompt_tokens, cached, strict=True)) == 242

    unshared = EmbeddedEngine(model, tokenizer, prefix_sharing=False)
    unshared.summarize(
        traces, BudgetSchedule(12, 4), num_summaries=2, sampling=SamplingParams(seed=1), max_new_tokens=4
    )
    assert unshared.stats.summarize.cached_tokens == 0
    assert unshared.stats.summarize.prefilled_tokens == 2 * sum(prompt_tokens) == 340


def test_ingested_traces_are_cached_whole_and_their_forks_match_a_fresh_full_prefill():
    model, tokenizer = tiny_policy(seed=1, dtype=torch.float64)
    engine = EmbeddedEngine(model, tokenizer)
    prompt = tokenizer.encode("2+2=?", add_special_tokens=False)
    unclosed = tokenizer.encode("abcdefghijkl", add_special_tokens=False)
    closed = [*tokenizer.encode("mnopqrs", add_special_tokens=False), engine.delimiters.think_end_id]
    assert (len(prompt), len(unclosed), len(closed)) == (5, 12, 8)
    assert (len(engine.delimiters.truncated), len(engine.delimiters.closed)) == (30, 19)

    traces = engine.ingest([prompt], [unclosed, closed], group_size=2)
    assert traces.prompt_ids == [prompt, prompt] and traces.thinking_ids == [unclosed, closed]
    assert traces.finish == ["length", "think_end"] and traces.group_size == 2
    assert engine.cached_sequences == 2
    ingest = engine.stats.ingest
    assert (ingest.requests, ingest.prompt_tokens, ingest.prefilled_tokens, ingest.cached_tokens) == (2, 30, 30, 0)

    batch = engine.summarize(traces, BudgetSchedule(12, 4), 1, SamplingParams(temperature=0), max_new_tokens=6)
    stats = engine.stats.summarize
    # Cuts 3, 6, 9, 12 of the unclosed trace (30 inserted tokens each); 3, 6, 8, 8 of the closed
    # one, whose cut 8 holds its </think> (19 inserted) and serves 2 slots, so 2 samples. Ingest
    # caches all of prompt + z: every fork gets 5 + c tokens from cache, the whole trace too.
    assert stats.requests == 7 and stats.samples == 8
    assert stats.prompt_tokens == (38 + 41 + 44 + 47) + (38 + 41 + 2 * 32) == 313
    assert stats.cached_tokens == (8 + 11 + 14 + 17) + (8 + 11 + 2 * 13) == 95
    assert stats.prefilled_tokens == 4 * 30 + (30 + 30 + 19) == 199

    eos = tokenizer.eos_token_id
    for n, trace in enumerate(traces.thinking_ids):
        cuts = batch.cut_lens[n].tolist()
        for s, cut in enumerate(cuts):
            fork_prompt = prompt + trace[:cut] + list(engine.delimiters.inserted(trace, cut))
            assert batch.summary_ids[n][s][0] == reference_greedy(model, fork_prompt, 6, eos)


def test_seeded_sampling_repeats_and_weight_updates_flush_the_cache():
    model, tokenizer = tiny_policy(seed=3)
    prompts = [tokenizer.encode("abc", add_special_tokens=False)]
    sampling = SamplingParams(temperature=0.8, top_p=0.9, seed=11)
    first = EmbeddedEngine(model, tokenizer).think(prompts, 3, 15, sampling)
    engine = EmbeddedEngine(model, tokenizer)
    assert engine.think(prompts, 3, 15, sampling).thinking_ids == first.thinking_ids
    assert all(1 <= len(z) <= 15 for z in first.thinking_ids)

    other, _ = tiny_policy(seed=4)
    assert engine.cached_sequences == 3
    engine.update_weights(other)
    assert engine.cached_sequences == 0
    assert torch.equal(engine.model.model.embed_tokens.weight, other.model.embed_tokens.weight)


def test_chunks_of_one_call_continue_one_random_stream():
    """Identical requests split over decode chunks must not repeat each other's samples."""
    model, tokenizer = tiny_policy(seed=3)
    prompt = tokenizer.encode("abc", add_special_tokens=False)
    sampling = SamplingParams(temperature=1.0, seed=5)
    request = GenerationRequest(
        input_ids=tuple(prompt), n=2, max_new_tokens=12, stop_token_ids=(tokenizer.eos_token_id,), sampling=sampling
    )
    requests = [request, request]
    engine = EmbeddedEngine(model, tokenizer, max_batch_rows=2, prefix_sharing=False)
    first, second = engine.generate(requests)
    assert first.output_ids != second.output_ids
    again = EmbeddedEngine(model, tokenizer, max_batch_rows=2, prefix_sharing=False).generate(requests)
    assert [o.output_ids for o in again] == [first.output_ids, second.output_ids]


def test_bad_arguments_raise():
    model, tokenizer = tiny_policy()
    with pytest.raises(ValueError, match="max_batch_rows must be >= 1, got 0"):
        EmbeddedEngine(model, tokenizer, max_batch_rows=0)
    with pytest.raises(ValueError, match="top_p must be in"):
        SamplingParams(top_p=0.0)
    engine = EmbeddedEngine(model, tokenizer)
    with pytest.raises(ValueError, match="group_size must be >= 1"):
        engine.think([[3]], 0, 4, SamplingParams())
    with pytest.raises(ValueError, match="at least one input token"):
        engine.think([[]], 1, 4, SamplingParams())
    with pytest.raises(ValueError, match="3 traces for 1 prompts with group_size 2; expected 2"):
        engine.ingest([[3]], [[4], [5], [6]], 2)
    with pytest.raises(ValueError, match="trace 1 is empty"):
        engine.ingest([[3]], [[4], []], 2)
    with pytest.raises(ValueError, match=r"trace 0 has a stop token .* at position 1 before its end"):
        engine.ingest([[3]], [[4, engine.delimiters.think_end_id, 5]], 1)
