"""The sampler samples from the policy the learner scores.

The embedded engine against independent references: the empirical first-token distribution
against ``softmax(logits / T)`` (temperature, top-p, ``min_new_tokens``); greedy decoding of
batched, ragged, forked requests against ``transformers``' own ``generate``; the log-probability
of every sampled token, in float64, against a full recompute of the sequence (which catches wrong
position ids and unmasked padding in the cached, left-padded decode) and against ``TreePolicy``
(the learner) on the same tokens.
"""

import pytest
import torch
from fixtures.tiny_policy import tiny_policy

from anytime_kernels import pack_response_trees
from trainer.budgets import BudgetSchedule
from trainer.policy import TreePolicy
from trainer.rollout import EmbeddedEngine, GenerationRequest, SamplingParams

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SAMPLES = 4000
# Total-variation distance of SAMPLES draws from their distribution is about 0.02 here; T=0.6 vs
# T=1.0 differ by 0.26 for this model and prompt, so 0.06 separates a right sampler from a wrong one.
TV_BOUND = 0.06


@pytest.fixture(scope="module")
def policy():
    return tiny_policy(seed=3)


def encode(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


def next_token_distribution(model, ids, temperature):
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1].double()
    return torch.softmax(logits / temperature, dim=-1)


def first_tokens(engine, ids, sampling, n=SAMPLES):
    request = GenerationRequest(tuple(ids), n=n, max_new_tokens=1, stop_token_ids=(), sampling=sampling)
    (output,) = engine.generate([request])
    return torch.tensor([out[0] for out in output.output_ids])


def empirical(tokens, vocab):
    return torch.bincount(tokens, minlength=vocab).double() / tokens.numel()


def total_variation(p, q):
    return 0.5 * float((p - q).abs().sum())


def test_fixture_model_depends_on_its_context(policy):
    model, tokenizer = policy
    engine = EmbeddedEngine(model, tokenizer)
    greedy = SamplingParams(temperature=0)
    text = "Add 17 and 25."
    shuffled = "".join(sorted(text))
    traces = engine.think([encode(tokenizer, text), encode(tokenizer, shuffled)], 1, 12, greedy)
    assert traces.thinking_ids[0] != traces.thinking_ids[1]


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_first_token_distribution_is_softmax_of_logits_over_temperature(policy, temperature):
    model, tokenizer = policy
    ids = encode(tokenizer, "Add 17 and 25.")
    engine = EmbeddedEngine(model, tokenizer, seed=11)
    tokens = first_tokens(engine, ids, SamplingParams(temperature=temperature, seed=5))
    expected = next_token_distribution(model, ids, temperature)
    assert total_variation(empirical(tokens, expected.numel()), expected) < TV_BOUND
    other = next_token_distribution(model, ids, 1.6 - temperature)  # the other temperature
    assert total_variation(empirical(tokens, expected.numel()), other) > 2 * TV_BOUND


def test_top_p_keeps_the_nucleus_and_renormalises_it(policy):
    model, tokenizer = policy
    ids = encode(tokenizer, "Add 17 and 25.")
    probs = next_token_distribution(model, ids, 1.0)
    ordered, order = probs.sort(descending=True)
    nucleus = order[(ordered.cumsum(0) - ordered) < 0.9]
    assert 2 <= nucleus.numel() < probs.numel() // 2
    tokens = first_tokens(EmbeddedEngine(model, tokenizer, seed=12), ids, SamplingParams(top_p=0.9, seed=6))
    assert set(tokens.tolist()) <= set(nucleus.tolist())
    renormalised = torch.zeros_like(probs)
    renormalised[nucleus] = probs[nucleus] / probs[nucleus].sum()
    assert total_variation(empirical(tokens, probs.numel()), renormalised) < TV_BOUND


def test_min_new_tokens_suppresses_every_stop_id_until_reached(policy):
    model, tokenizer = policy
    ids = encode(tokenizer, "Add 17 and 25.")
    stops = tuple(next_token_distribution(model, ids, 1.0).topk(5).indices.tolist())  # the likeliest first tokens
    engine = EmbeddedEngine(model, tokenizer, seed=13)
    request = GenerationRequest(
        tuple(ids), n=300, max_new_tokens=6, stop_token_ids=stops, sampling=SamplingParams(seed=7, min_new_tokens=3)
    )
    (output,) = engine.generate([request])
    for out in output.output_ids:
        assert not set(out[:3]) & set(stops), out
    assert any(len(out) < 6 and out[-1] in stops for out in output.output_ids)  # stops work once allowed


def hf_greedy(model, ids, max_new_tokens, stop_ids):
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=list(stop_ids),
            pad_token_id=0, attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        )  # fmt: skip
    return out[0, len(ids) :].tolist()


def test_greedy_decoding_equals_transformers_generate(policy):
    model, tokenizer = policy
    engine = EmbeddedEngine(model, tokenizer, max_batch_rows=16)
    prompts = [encode(tokenizer, text) for text in ("Add 17 and 25.", "Hi", "What is 3 times 4, then minus 2?")]
    greedy = SamplingParams(temperature=0)
    traces = engine.think(prompts, 1, 16, greedy)  # ragged prompts, one left-padded batch
    stops = (engine.delimiters.think_end_id, engine.eos_token_id)
    for prompt, trace in zip(traces.prompt_ids, traces.thinking_ids, strict=True):
        assert trace == hf_greedy(model, prompt, 16, stops)
    batch = engine.summarize(traces, BudgetSchedule(16, 2), 2, greedy, max_new_tokens=6)  # forks from the cache
    assert engine.stats.summarize.cached_tokens > 0
    for n in range(traces.num_traces):
        cuts = batch.cut_lens[n].tolist()
        for s, cut in enumerate(cuts):
            inserted = list(batch.inserted_ids[n][sorted(set(cuts)).index(cut)])
            fork = traces.prompt_ids[n] + traces.thinking_ids[n][:cut] + inserted
            expected = hf_greedy(model, fork, 6, (engine.eos_token_id,))
            assert batch.summary_ids[n][s] == [expected, expected]


def full_recompute_logprobs(model, prompt, output, temperature):
    with torch.no_grad():
        logits = model(torch.tensor([prompt + output])).logits[0].double()
    scaled = torch.log_softmax(logits[len(prompt) - 1 : -1] / temperature, dim=-1)
    return scaled.gather(-1, torch.tensor(output)[:, None])[:, 0]


def test_sampled_logprobs_equal_a_float64_full_recompute():
    model, tokenizer = tiny_policy(seed=4, dtype=torch.float64)
    engine = EmbeddedEngine(model, tokenizer, max_batch_rows=8, seed=2)
    prompts = [encode(tokenizer, text) for text in ("Add 17 and 25.", "Hi", "Multiply 6 by 7, please.")]
    sampling = SamplingParams(temperature=0.8, seed=3)
    requests = [
        GenerationRequest(tuple(p), n=2, max_new_tokens=14, stop_token_ids=(engine.eos_token_id,), sampling=sampling,
                          cache_output=True)
        for p in prompts
    ]  # fmt: skip
    outputs = engine.generate(requests)
    # Forks of the finished sequences: their prefixes come from the cache.
    forks = [
        GenerationRequest(tuple(r.input_ids) + tuple(o.output_ids[0][:-1]) + (5, 6), n=2, max_new_tokens=8,
                          stop_token_ids=(engine.eos_token_id,), sampling=sampling)
        for r, o in zip(requests, outputs, strict=True)
    ]  # fmt: skip
    fork_outputs = engine.generate(forks)
    assert all(o.prefilled_tokens < len(r.input_ids) for r, o in zip(forks, fork_outputs, strict=True))
    checked = 0
    for request, output in zip(requests + forks, outputs + fork_outputs, strict=True):
        for ids, logprobs in zip(output.output_ids, output.output_logprobs, strict=True):
            expected = full_recompute_logprobs(model, list(request.input_ids), ids, 0.8)
            torch.testing.assert_close(torch.tensor(logprobs, dtype=torch.float64), expected, rtol=0, atol=1e-9)
            checked += len(ids)
    assert checked > 100


def test_learner_scores_sampled_tokens_as_the_sampler_did():
    """TreePolicy's log-probs of the sampled thinking, at the sampling temperature, equal the engine's."""
    model, tokenizer = tiny_policy(seed=5)
    engine = EmbeddedEngine(model, tokenizer, seed=4)
    prompts = [encode(tokenizer, text) for text in ("Add 17 and 25.", "Hi there")]
    requests = [
        GenerationRequest(tuple(p), n=2, max_new_tokens=12, stop_token_ids=(), sampling=SamplingParams(0.7, seed=1))
        for p in prompts
    ]
    outputs = engine.generate(requests)
    prompt_ids = [list(r.input_ids) for r in requests for _ in range(2)]
    thinking = [ids for o in outputs for ids in o.output_ids]
    sampled = torch.tensor([lp for o in outputs for row in o.output_logprobs for lp in row])
    layout = pack_response_trees(prompt_ids, thinking, [[len(z)] for z in thinking], [[[]]] * 4, [[[[]]]] * 4)
    learner = TreePolicy(tiny_policy(seed=5)[0], attention_backend="sdpa", micro_batch_tokens=40)
    with torch.no_grad():
        scored = learner.forward(layout, temperature=0.7)
    order = scored.positions.argsort()
    # fp32 on both sides (the fused LM-head op has no fp64); a wrong temperature is off by whole nats.
    torch.testing.assert_close(scored.logprobs[order], sampled, rtol=1e-4, atol=1e-4)


def test_every_planted_bug_still_finds_its_line():
    """tests/plant_bugs.py edits one line per bug; a refactor that moves a line would make the script
    report "NOT PLANTED" instead of testing the suite, so each line must occur exactly once."""
    from plant_bugs import BUGS, ROOT

    for bug in BUGS:
        count = (ROOT / bug.path).read_text().count(bug.old)
        assert count == 1, f"{bug.name}: {bug.old!r} occurs {count} times in {bug.path}"
        assert all((ROOT / test).is_file() for test in bug.tests), bug.name
