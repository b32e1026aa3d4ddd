"""The paged KV pool's reference counts against a brute-force model of who holds which block.

Two levels: the pool alone under random store / fork / evict / flush operations (holders are plain
lists of blocks), and the embedded engine under random generate calls that store traces, fork
summaries from them, evict under a small budget and flush, checked after every call against the
blocks its stored sequences hold, and against the keys/values a fresh forward computes.
"""

import random

import pytest
import torch
from fixtures.tiny_policy import tiny_policy

from trainer.rollout import EmbeddedEngine, GenerationRequest, SamplingParams
from trainer.rollout.kv_pool import BlockAllocator, KVPool, OutOfBlocks

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def expected_counts(holders, num_blocks):
    counts = [0] * num_blocks
    for blocks in holders.values():
        for block in blocks:
            counts[block] += 1
    return counts


def check(pool, holders):
    counts = expected_counts(holders, pool.num_blocks)
    assert [pool.allocator.ref_count(b) for b in range(pool.num_blocks)] == counts
    assert pool.allocator.num_free == counts.count(0)  # nothing leaked, nothing freed while held


def small_pool(num_blocks=24, block_size=4, growable=False):
    return KVPool(num_layers=2, num_kv_heads=1, head_dim=2, block_size=block_size, num_blocks=num_blocks,
                  dtype=torch.float32, device="cpu", growable=growable)  # fmt: skip


@pytest.mark.parametrize("seed", range(20))
def test_reference_counts_follow_random_store_fork_evict_flush(seed):
    rng = random.Random(seed)
    pool = small_pool(growable=seed % 2 == 0)
    holders: dict[int, list[int]] = {}  # holder id -> its blocks (a stored sequence or a fork)
    lengths: dict[int, int] = {}
    contents: dict[int, torch.Tensor] = {}  # what each holder's tokens hold, to catch a reused block
    next_id = 0
    for _ in range(60):
        op = rng.random()
        try:
            if op < 0.35 or not holders:  # store: a new sequence in fresh blocks
                length = rng.randint(1, 14)
                blocks = pool.allocate(pool.blocks_for(length))
                value = torch.full((length,), float(next_id))
                slots = torch.tensor([blocks[p // 4] * 4 + p % 4 for p in range(length)])
                pool.storage.view(2, 2, -1, 1, 2)[:, :, slots, 0, :] = value[:, None]
            elif op < 0.75:  # fork: a prefix of a holder, then its own tokens after it
                parent = rng.choice(list(holders))
                prefix = rng.randint(1, lengths[parent])
                blocks, copy = pool.fork(holders[parent], prefix)
                pool.copy_blocks([copy] if copy else [])
                extra = rng.randint(0, 6)
                try:
                    blocks += pool.allocate(pool.blocks_for(prefix + extra) - len(blocks))
                except OutOfBlocks:
                    pool.allocator.release(blocks)
                    raise
                length = prefix + extra
                value = torch.cat([contents[parent][:prefix], torch.full((extra,), float(next_id))])
                slots = torch.tensor([blocks[p // 4] * 4 + p % 4 for p in range(prefix, length)], dtype=torch.long)
                pool.storage.view(2, 2, -1, 1, 2)[:, :, slots, 0, :] = value[prefix:, None]
                # The fork shares the parent's full blocks: one copy of them in the pool.
                assert blocks[: prefix // 4] == holders[parent][: prefix // 4]
            elif op < 0.95:  # evict one holder
                victim = rng.choice(list(holders))
                pool.allocator.release(holders.pop(victim))
                continue
            else:  # flush
                for blocks in holders.values():
                    pool.allocator.release(blocks)
                holders.clear()
                check(pool, holders)
                continue
        except OutOfBlocks:
            assert not pool.growable
            continue
        holders[next_id], lengths[next_id], contents[next_id] = blocks, length, value
        next_id += 1
        check(pool, holders)
        for holder, blocks in holders.items():  # no holder's tokens were overwritten by another's
            slots = torch.tensor([blocks[p // 4] * 4 + p % 4 for p in range(lengths[holder])])
            assert torch.equal(pool.storage.view(2, 2, -1, 1, 2)[0, 0, slots, 0, 0], contents[holder])


def test_allocator_refuses_misuse_by_name():
    allocator = BlockAllocator(3)
    (block,) = allocator.allocate(1)
    allocator.release([block])
    with pytest.raises(ValueError, match=f"block {block} is released more often"):
        allocator.release([block])
    with pytest.raises(ValueError, match=f"block {block} is free"):
        allocator.retain([block])
    with pytest.raises(OutOfBlocks, match="asked for 4 blocks, 3 of 3 are free"):
        allocator.allocate(4)
    with pytest.raises(ValueError, match="num_blocks must be >= 1, got 0"):
        BlockAllocator(0)


def fresh_keys(model, tokens):
    """``[layers][T, Hkv, D]`` keys of ``tokens`` from a plain forward with transformers' own cache."""
    with torch.no_grad():
        cache = model(torch.tensor([tokens]), use_cache=True).past_key_values
    return [layer.keys[0].transpose(0, 1) for layer in cache.layers]


def engine_holders(engine):
    return {tokens: stored.blocks for tokens, stored in engine._stored.items()}


@pytest.mark.parametrize("seed", range(3))
def test_engine_blocks_are_held_exactly_by_its_stored_sequences(seed):
    """Random calls: traces stored, forks of their cuts (stored too), evictions under a token budget,
    release and flush. After each call only stored sequences hold blocks, each held once per stored
    sequence; forks reuse the trace's full blocks; every stored block still holds its tokens' keys."""
    rng = random.Random(seed)
    model, tokenizer = tiny_policy(seed=seed, dtype=torch.float64)
    engine = EmbeddedEngine(model, tokenizer, block_size=4, sync_every=3, max_batch_rows=5,
                            kv_budget_tokens=150, kv_blocks=80, seed=seed)  # fmt: skip
    eos = tokenizer.eos_token_id
    for _ in range(8):
        op = rng.random()
        if op < 0.5 or not engine._stored:
            prompts = [[rng.randrange(3, 90) for _ in range(rng.randint(2, 9))] for _ in range(rng.randint(1, 3))]
            engine.generate([GenerationRequest(tuple(p), n=rng.randint(1, 3), max_new_tokens=rng.randint(1, 12),
                                               stop_token_ids=(eos,), sampling=SamplingParams(seed=rng.randrange(99)),
                                               cache_output=True, priority=1) for p in prompts])  # fmt: skip
        elif op < 0.9:
            parents = rng.sample(list(engine._stored), min(2, len(engine._stored)))
            requests = [GenerationRequest((*parent[: rng.randint(1, len(parent))], 7, 8), n=rng.randint(1, 3),
                                          max_new_tokens=rng.randint(1, 6), stop_token_ids=(eos,),
                                          sampling=SamplingParams(temperature=0), cache_output=rng.random() < 0.5)
                        for parent in parents]  # fmt: skip
            engine.generate(requests)
            for parent, request in zip(parents, requests, strict=True):
                shared = len(request.input_ids) - 2
                child = next((t for t in engine._stored if t[: len(request.input_ids)] == request.input_ids), None)
                if parent in engine._stored and child is not None:  # one copy of the parent's full blocks
                    assert engine._stored[child].blocks[: shared // 4] == engine._stored[parent].blocks[: shared // 4]
        else:
            engine.flush_cache()
        check(engine._pool, engine_holders(engine))
        assert engine._reserved == 0
        for tokens, blocks in engine_holders(engine).items():
            slots = torch.tensor([blocks[p // 4] * 4 + p % 4 for p in range(len(tokens))])
            for layer, keys in enumerate(fresh_keys(model, list(tokens))):
                stored = engine._pool.key_cache(layer).reshape(-1, *keys.shape[1:])[slots]
                torch.testing.assert_close(stored, keys, rtol=0, atol=1e-9)
    engine.flush_cache()
    check(engine._pool, {})
