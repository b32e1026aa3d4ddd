"""The paged embedded engine against independent references.

- greedy decoding, token for token, against the engine it replaced (``benchmarks/eager_engine.py``,
  which decodes from stacked left-padded caches) and against ``transformers``' own ``generate``:
  batched ragged prompts, G samples, forks from the cache, under small blocks, short windows,
  a few rows at a time and a fixed pool small enough to evict and wait;
- the float64 next-token logits of every row at every step (prefill and decode, forks included)
  against a full forward over the row's whole sequence;
- the returned log-probs of thinking and forked summary tokens against ``TreePolicy`` scoring the
  packed response trees;
- a row's samples do not depend on the batch around it, the window or the block size;
- host syncs: one read-back per window of ``sync_every`` steps;
- GPU-marked: a captured bucket replays to eager's tokens; weights updated between replays give a
  fresh engine's tokens.
"""

import sys
from pathlib import Path

import pytest
import torch
from fixtures.tiny_policy import tiny_policy

from anytime_kernels import pack_response_trees
from trainer.budgets import BudgetSchedule
from trainer.policy import TreePolicy
from trainer.rollout import EmbeddedEngine, GenerationRequest, SamplingParams, paged_runner
from trainer.rollout.paged_model import paged_attention
from trainer.rollout.paged_runner import PagedRunner

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from eager_engine import EagerEngine  # the engine before the paged pool

pytestmark = pytest.mark.usefixtures("one_torch_thread")
GREEDY = SamplingParams(temperature=0)
TEXTS = ("Add 17 and 25.", "Hi", "What is 3 times 4, then minus 2?", "q")
# (block_size, sync_every, max_batch_rows, kv_blocks): blocks that end inside prompts and traces,
# windows of one step, rows that wait for room, and a pool that must evict cached traces.
LAYOUTS = [(16, 16, 64, None), (4, 3, 5, None), (2, 1, 3, None), (4, 5, 6, 40)]


def encode(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


def hf_greedy(model, ids, max_new_tokens, stop_ids):
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=list(stop_ids),
            pad_token_id=0, attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        )  # fmt: skip
    return out[0, len(ids) :].tolist()


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda layout: "bs{}-sync{}-rows{}-blocks{}".format(*layout))
def test_greedy_rollouts_equal_the_eager_engine_and_transformers_generate(layout):
    block_size, sync_every, rows, blocks = layout
    model, tokenizer = tiny_policy(seed=1)
    engine = EmbeddedEngine(model, tokenizer, block_size=block_size, sync_every=sync_every, max_batch_rows=rows,
                            kv_blocks=blocks)  # fmt: skip
    eager = EagerEngine(model, tokenizer, max_batch_rows=rows)
    prompts = [encode(tokenizer, text) for text in TEXTS]
    sampling = SamplingParams(temperature=0, min_new_tokens=4)
    schedule = BudgetSchedule(14, 3)
    got = engine.rollout(prompts, 2, 14, schedule, 2, GREEDY, 6, window=2)
    want = eager.rollout(prompts, 2, 14, schedule, 2, GREEDY, 6, window=2)
    assert got[0].thinking_ids == want[0].thinking_ids and got[1].summary_ids == want[1].summary_ids
    # The same prefix cache: the same tokens served from it and prefilled (unless the pool is too
    # small to keep every trace, which only the paged engine has).
    for phase in ("think", "summarize") if blocks is None else ():
        mine, theirs = getattr(engine.stats, phase), getattr(eager.stats, phase)
        assert (mine.cached_tokens, mine.prefilled_tokens) == (theirs.cached_tokens, theirs.prefilled_tokens), phase
    assert engine.stats.summarize.cached_tokens > 0
    min_new = engine.think(prompts, 1, 14, sampling)
    assert min_new.thinking_ids == eager.think(prompts, 1, 14, sampling).thinking_ids
    stops = (engine.delimiters.think_end_id, engine.eos_token_id)
    traces = engine.think(prompts, 1, 14, GREEDY)
    batch = engine.summarize(traces, schedule, 1, GREEDY, max_new_tokens=6)
    for n, (prompt, trace) in enumerate(zip(traces.prompt_ids, traces.thinking_ids, strict=True)):
        assert trace == hf_greedy(model, prompt, 14, stops)
        cuts = batch.cut_lens[n].tolist()
        for s, cut in enumerate(cuts):
            fork = prompt + trace[:cut] + list(batch.inserted_ids[n][sorted(set(cuts)).index(cut)])
            assert batch.summary_ids[n][s][0] == hf_greedy(model, fork, 6, stops[1:])
    engine.flush_cache()
    assert engine._pool.used_blocks == 0 and engine._reserved == 0


def full_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0, -1].double()


@pytest.mark.parametrize("layout", LAYOUTS[:3], ids=lambda layout: "bs{}-sync{}-rows{}".format(*layout[:3]))
def test_float64_logits_of_every_row_at_every_step_equal_a_full_recompute(layout, monkeypatch):
    """Rows are told apart by their min_new_tokens (one distinct value per request; the samples of
    a request share it and, greedy, their tokens)."""
    block_size, sync_every, rows, _ = layout
    model, tokenizer = tiny_policy(seed=4, dtype=torch.float64)
    engine = EmbeddedEngine(model, tokenizer, block_size=block_size, sync_every=sync_every, max_batch_rows=rows)
    seen = []
    real_sample = paged_runner.sample

    def recording(logits, settings, generated, *, nucleus):
        seen.append((logits.clone(), settings.min_new_tokens.tolist(), generated.tolist()))
        return real_sample(logits, settings, generated, nucleus=nucleus)

    monkeypatch.setattr(paged_runner, "sample", recording)
    eos = engine.eos_token_id
    prompts = [encode(tokenizer, text) for text in TEXTS]
    traces = [GenerationRequest(tuple(p), n=2, max_new_tokens=10, stop_token_ids=(eos,), cache_output=True,
                                sampling=SamplingParams(temperature=0, min_new_tokens=i)) for i, p in enumerate(prompts)]  # fmt: skip
    outputs = engine.generate(traces)
    forks = [GenerationRequest(r.input_ids + tuple(o.output_ids[0][: 3 + i]) + (5, 6), n=3, max_new_tokens=7,
                               stop_token_ids=(eos,), sampling=SamplingParams(temperature=0, min_new_tokens=10 + i))
             for i, (r, o) in enumerate(zip(traces, outputs, strict=True))]  # fmt: skip
    fork_outputs = engine.generate(forks)
    assert all(o.cached_tokens[0] > len(r.input_ids) - 3 for r, o in zip(forks, fork_outputs, strict=True))
    by_min_new = {
        r.sampling.min_new_tokens: (r, o) for r, o in zip(traces + forks, outputs + fork_outputs, strict=True)
    }
    checked = 0
    for logits, min_new, generated in seen:
        for row, (key, step) in enumerate(zip(min_new, generated, strict=True)):
            request, output = by_min_new[key]
            if step >= len(output.output_ids[0]):  # a finished or padding row, its logits unused
                continue
            for sample in output.output_ids:
                assert sample == output.output_ids[0]  # greedy: every sample of a request is one sequence
            expected = full_logits(model, list(request.input_ids) + output.output_ids[0][:step])
            torch.testing.assert_close(logits[row], expected, rtol=0, atol=1e-9)
            checked += 1
    assert checked >= sum(len(o.output_ids[0]) * r.n for r, o in by_min_new.values())


def test_logprobs_are_of_the_model_before_the_min_new_tokens_mask():
    """While min_new_tokens blocks the stop ids the sampler draws from the rest, but the log-prob it
    reports is the model's own (what the learner scores), not the renormalised one."""
    model, tokenizer = tiny_policy(seed=4, dtype=torch.float64)
    ids = encode(tokenizer, TEXTS[0])
    stops = tuple(full_logits(model, ids).topk(5).indices.tolist())  # the likeliest first tokens
    engine = EmbeddedEngine(model, tokenizer, seed=1)
    request = GenerationRequest(tuple(ids), n=8, max_new_tokens=4, stop_token_ids=stops,
                                sampling=SamplingParams(temperature=0.9, min_new_tokens=4))  # fmt: skip
    (output,) = engine.generate([request])
    for sample, logprobs in zip(output.output_ids, output.output_logprobs, strict=True):
        assert not set(sample) & set(stops)
        for j, (token, logprob) in enumerate(zip(sample, logprobs, strict=True)):
            expected = torch.log_softmax(full_logits(model, ids + sample[:j]) / 0.9, dim=-1)[token]
            assert abs(logprob - float(expected)) < 1e-9


def test_logprobs_of_thinking_and_forked_summaries_equal_tree_policy():
    model, tokenizer = tiny_policy(seed=5)
    engine = EmbeddedEngine(model, tokenizer, block_size=4, sync_every=3, seed=4)
    sampling = SamplingParams(temperature=0.7, seed=1)
    prompts = [encode(tokenizer, text) for text in TEXTS[:2]]
    requests = engine._think_requests(prompts, 2, 12, sampling)
    outputs = engine.generate(requests)
    traces = engine._thinking_batch(requests, outputs, 2)
    schedule = BudgetSchedule(12, 3)
    forks, fork_requests = engine._fork_requests(traces, 0, schedule, 2, sampling, 5)
    fork_outputs = engine.generate(fork_requests)
    assert all(o.cached_tokens[0] > 0 for o in fork_outputs)
    batch = engine._summary_batch(traces, schedule, forks, fork_outputs, 2)
    thinking = [lp for o in outputs for row in o.output_logprobs for lp in row]
    summary = {}
    for fork, out in zip(forks, fork_outputs, strict=True):
        for k, slot in enumerate(fork.slots):
            for a in range(2):
                summary[fork.trace, slot, a] = out.output_logprobs[2 * k + a]
    layout = pack_response_trees(*batch.pack_arguments())
    learner = TreePolicy(tiny_policy(seed=5)[0], attention_backend="sdpa", micro_batch_tokens=4096)
    with torch.no_grad():
        scored = learner.forward(layout, temperature=0.7)
    expected = []
    trunk_offsets = [0]
    for z in traces.thinking_ids:
        trunk_offsets.append(trunk_offsets[-1] + len(z))
    for t in scored.positions.tolist():
        target = t + 1
        n, slot, a = (int(layout.seq_ids[target]), int(layout.slot[target]), int(layout.summary_index[target]))
        start = int(layout.prompt_lens[n])
        if a < 0:  # a thinking token
            expected.append(thinking[trunk_offsets[n] + int(layout.position_ids[target]) - start])
        else:
            inserted = len(
                batch.inserted_ids[n][sorted(set(batch.cut_lens[n].tolist())).index(int(batch.cut_lens[n, slot]))]
            )
            index = int(layout.position_ids[target]) - start - int(batch.cut_lens[n, slot]) - inserted
            expected.append(summary[n, slot, a][index])
    assert len(expected) == len(thinking) + sum(len(v) for v in summary.values())
    torch.testing.assert_close(scored.logprobs, torch.tensor(expected), rtol=1e-4, atol=1e-4)


def test_a_rows_samples_do_not_depend_on_its_batch_window_or_blocks():
    model, tokenizer = tiny_policy(seed=6, dtype=torch.float64)
    eos = tokenizer.eos_token_id
    requests = [
        GenerationRequest(tuple(encode(tokenizer, text)), n=3, max_new_tokens=15, stop_token_ids=(eos,),
                          sampling=SamplingParams(temperature=1.0, top_p=0.95 if i % 2 else 1.0, seed=8 if i == 0 else None))
        for i, text in enumerate(TEXTS)
    ]  # fmt: skip
    results = []
    for block_size, sync_every, rows, _ in LAYOUTS:
        engine = EmbeddedEngine(model, tokenizer, block_size=block_size, sync_every=sync_every, max_batch_rows=rows)
        results.append([(o.output_ids, o.output_logprobs) for o in engine.generate(requests)])
    for other in results[1:]:
        assert [ids for ids, _ in other] == [ids for ids, _ in results[0]]
        mine = [lp for _, logprobs in other for row in logprobs for lp in row]
        theirs = [lp for _, logprobs in results[0] for row in logprobs for lp in row]
        torch.testing.assert_close(torch.tensor(mine), torch.tensor(theirs), rtol=0, atol=1e-12)
    samples = [tuple(ids) for output_ids, _ in results[0] for ids in output_ids]
    assert len(set(samples)) > len(samples) // 2  # rows draw their own streams (short ones may agree)


def test_forks_of_one_trace_hold_its_blocks_once():
    """16 forks of one ingested trace hold the trace's blocks once, plus their own few; the engine
    they replace held a copy of the trace per fork row."""
    model, tokenizer = tiny_policy(seed=2)
    engine = EmbeddedEngine(model, tokenizer, block_size=4)
    eager = EagerEngine(model, tokenizer)
    prompt, trace = [5, 6, 7, 8, 9], [10 + i % 80 for i in range(60)]
    schedule, sampling = BudgetSchedule(60, 4), SamplingParams(min_new_tokens=6, seed=0)
    peaks = {}
    for name, candidate in (("paged", engine), ("eager", eager)):
        traces = candidate.ingest([prompt], [trace], 1)
        if name == "paged":  # the ingest row (one token, nothing written) took only the trace's blocks
            assert engine.peak_kv_bytes == engine._pool.blocks_for(65) * engine._pool.bytes_per_block
        candidate.reset_peak_kv()
        batch = candidate.summarize(traces, schedule, 4, sampling, max_new_tokens=6)
        peaks[name] = candidate.peak_kv_bytes
    # Each fork request: its inserted tokens plus a copy of the cut's partial block; each of its 4
    # rows: a copy of the request's last block and the blocks of its 6 new tokens.
    forks = [len(ids) for ids in batch.inserted_ids[0]]
    bound = engine._pool.blocks_for(65) + sum(-(-n // 4) + 1 + 4 * (1 + 2) for n in forks)
    assert peaks["paged"] <= bound * engine._pool.bytes_per_block
    assert peaks["eager"] > 4 * peaks["paged"]
    # Rows of a one-token request write nothing: the prompt's blocks are all they hold.
    engine.flush_cache()
    engine.reset_peak_kv()
    engine.generate([GenerationRequest(tuple(trace), n=4, max_new_tokens=1, stop_token_ids=(), sampling=GREEDY)])
    assert engine.peak_kv_bytes == engine._pool.blocks_for(60) * engine._pool.bytes_per_block


def test_a_waiting_requests_prefix_outlives_older_sequences_in_the_lru_order():
    """A match counts as a use when the call's requests arrive, as SGLang's radix cache stamps
    matched nodes: with one row, a fork queued behind a longer cached request keeps its prefix
    when that request's output is stored over the budget; the sequence no request reads goes."""
    model, tokenizer = tiny_policy(seed=2)
    a, b, c = tuple(range(5, 15)), tuple(range(20, 60)), tuple(range(60, 72))
    stored = {seq: len(seq) + 1 for seq in (a, b, c)}  # prompt + 2 new tokens, the last one not stored
    engine = EmbeddedEngine(model, tokenizer, max_batch_rows=1, kv_budget_tokens=sum(stored.values()))
    for seq in (a, b, c):  # stored oldest to newest: a, b, c
        engine.generate([GenerationRequest(seq, n=1, max_new_tokens=2, stop_token_ids=(), sampling=GREEDY,
                                           cache_output=True)])  # fmt: skip
    assert engine.stored_tokens == sum(stored.values()) and engine.evicted_sequences == 0
    longer = GenerationRequest((*c, 1), n=1, max_new_tokens=4, stop_token_ids=(), sampling=GREEDY, cache_output=True)
    fork = GenerationRequest((*a[:8], 2, 3), n=1, max_new_tokens=2, stop_token_ids=(), sampling=GREEDY)
    out = engine.generate([fork, longer])  # ``longer`` goes first (longest cached prefix) and is stored
    assert [o.cached_tokens[0] for o in out] == [8, len(c)]
    assert engine.evicted_sequences == 1 and engine._index.match(b)[1] < len(b) and engine._index.match(a)[1] == 10


def test_one_read_back_per_window_of_sync_every_steps():
    model, tokenizer = tiny_policy(seed=2)
    engine = EmbeddedEngine(model, tokenizer, sync_every=16)
    request = GenerationRequest((5, 6, 7), n=4, max_new_tokens=33, stop_token_ids=(0,),
                                sampling=SamplingParams(min_new_tokens=33, seed=3))  # fmt: skip
    (output,) = engine.generate([request])
    assert [len(ids) for ids in output.output_ids] == [33] * 4
    # The first token comes from the prefill; 32 decode steps in two windows of 16.
    assert (engine.decode_steps, engine.read_backs) == (32, 2)


def test_a_pool_too_small_for_one_row_is_named():
    model, tokenizer = tiny_policy(seed=2)
    engine = EmbeddedEngine(model, tokenizer, block_size=4, kv_blocks=3)
    request = GenerationRequest((5, 6, 7, 8, 9), n=1, max_new_tokens=20, stop_token_ids=(), sampling=GREEDY)
    with pytest.raises(
        RuntimeError, match=r"KV pool \(3 blocks of 4 tokens\) cannot hold one row .* rollout\.kv_blocks"
    ):
        engine.generate([request])
    with pytest.raises(ValueError, match="exceeds the engine's context of 16384 tokens"):
        engine.generate([GenerationRequest((5,), n=1, max_new_tokens=16384, stop_token_ids=(), sampling=GREEDY)])
    for keyword, value in (("block_size", 0), ("sync_every", 0), ("kv_blocks", 0), ("kv_memory_fraction", 1.0)):
        with pytest.raises(ValueError, match=keyword):
            EmbeddedEngine(model, tokenizer, **{keyword: value})


def test_bucket_padding_rows_change_nothing(monkeypatch):
    """On CUDA a step runs on a whole row bucket (1, 2, 4, ...), the rows past the live ones finished.
    Here each bucket's step runs eagerly in place of its captured graph: the tokens and log-probs
    equal those of the live rows decoded alone."""

    class EagerBucket:  # what a captured graph of the bucket replays
        def __init__(self, runner, bucket, nucleus):
            self.runner, self.bucket, self.nucleus = runner, bucket, nucleus

        def replay(self):
            with paged_attention(self.runner.model):
                self.runner._step(self.runner.state.view(self.bucket), self.nucleus)

    monkeypatch.setattr(PagedRunner, "_capture", lambda runner, bucket, nucleus: EagerBucket(runner, bucket, nucleus))
    model, tokenizer = tiny_policy(seed=9, dtype=torch.float64)
    eos = tokenizer.eos_token_id
    requests = [
        GenerationRequest(tuple(encode(tokenizer, text)), n=i + 1, max_new_tokens=6 + 3 * i, stop_token_ids=(eos,),
                          sampling=SamplingParams(temperature=1.0, top_p=0.9 if i == 2 else 1.0, seed=4 if i == 0 else None))
        for i, text in enumerate(TEXTS)
    ]  # fmt: skip
    outputs = {}
    for padded in (False, True):
        engine = EmbeddedEngine(model, tokenizer, block_size=4, sync_every=3, max_batch_rows=16)
        engine.cuda_graphs = padded  # the runner is built at the first generate
        outputs[padded] = [(o.output_ids, o.output_logprobs) for o in engine.generate(requests)]
        assert engine._runner.use_graphs is padded
    assert [ids for ids, _ in outputs[True]] == [ids for ids, _ in outputs[False]]
    padded, alone = ([lp for _, rows in outputs[key] for row in rows for lp in row] for key in (True, False))
    torch.testing.assert_close(torch.tensor(padded), torch.tensor(alone), rtol=0, atol=1e-12)


def test_weights_updated_in_place_sample_as_a_fresh_engine():
    model, tokenizer = tiny_policy(seed=7)
    request = GenerationRequest(tuple(encode(tokenizer, TEXTS[0])), n=3, max_new_tokens=10, stop_token_ids=(),
                                sampling=SamplingParams(seed=2), cache_output=True)  # fmt: skip
    engine = EmbeddedEngine(model, tokenizer, block_size=4)
    first = engine.generate([request])[0].output_ids
    pool = engine._pool.storage
    other, _ = tiny_policy(seed=8)
    engine.update_weights(other)
    assert engine.cached_sequences == 0 and engine._pool.used_blocks == 0 and engine._pool.storage is pool
    updated = engine.generate([request])[0].output_ids
    assert updated != first
    assert updated == EmbeddedEngine(other, tokenizer, block_size=4).generate([request])[0].output_ids


def check_graph_replays_equal_eager_and_follow_weight_updates():
    model, tokenizer = tiny_policy(seed=7)
    model = model.cuda()
    eos = tokenizer.eos_token_id
    requests = [
        GenerationRequest(tuple(encode(tokenizer, text)), n=3, max_new_tokens=20, stop_token_ids=(eos,),
                          sampling=SamplingParams(temperature=0.0 if i == 1 else 1.0, top_p=0.9 if i == 2 else 1.0,
                                                  seed=11 if i == 0 else None))
        for i, text in enumerate(TEXTS)
    ]  # fmt: skip

    def run(engine):
        return [o.output_ids for o in engine.generate(requests)]

    graphs = EmbeddedEngine(model, tokenizer, max_batch_rows=8, kv_blocks=256)
    eager = EmbeddedEngine(model, tokenizer, max_batch_rows=8, kv_blocks=256, cuda_graphs=False)
    first = run(graphs)
    assert graphs._runner._graphs, "no bucket was captured"
    assert first == run(eager)
    other, _ = tiny_policy(seed=8)
    graphs.update_weights(other.cuda())
    updated = run(graphs)
    assert updated != first
    assert updated == run(EmbeddedEngine(other.cuda(), tokenizer, max_batch_rows=8, kv_blocks=256))


@pytest.mark.gpu
def test_captured_buckets_replay_eager_tokens_and_follow_weight_updates_cuda():
    check_graph_replays_equal_eager_and_follow_weight_updates()
