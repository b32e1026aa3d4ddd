"""Packed tree forward: log-probs and parameter gradients equal per-branch re-forwards.

The reference runs every branch as its own ordinary sequence (prompt + z[:c] + inserted +
summary) and the full trace as its own sequence, through the same weights with transformers' own
SDPA attention and a plain log-softmax over the full logits.
"""

import copy
import random
import types

import pytest
import torch

from anytime_kernels import pack_response_trees
from anytime_kernels.attention import dense_tree_mask, flex_block_mask
from anytime_kernels.backends import BackendUnavailableError
from trainer.attention import TreeBlocks, prepare_tree_attention, resolve_backend
from trainer.policy import TreePolicy, plan_micro_batches
from trainer.tiny import tiny_causal_lm

VOCAB = 96


def tiny_model(family: str, seed: int = 0, hidden_size: int = 32):
    """Head size hidden_size / 4: 8 by default (CPU); GPU tests use 64 (flex needs head_dim >= 16)."""
    return tiny_causal_lm(
        VOCAB, family=family, hidden_size=hidden_size, intermediate_size=2 * hidden_size, max_positions=256,
        tie_word_embeddings=family == "qwen2", seed=seed,
    )  # fmt: skip


def random_rollouts(seed: int, num_traces: int = 3, num_slots: int = 3, num_summaries: int = 2):
    rng = random.Random(seed)
    budgets = [4 * (s + 1) for s in range(num_slots)]
    prompts, thinking, cuts, inserted, summaries = [], [], [], [], []
    for n in range(num_traces):
        length = budgets[-1] if n == 0 else rng.randint(1, budgets[-1])  # later traces may stop early
        trace_cuts = [min(b, length) for b in budgets]
        prompts.append([rng.randrange(VOCAB) for _ in range(rng.randint(2, 5))])
        thinking.append([rng.randrange(VOCAB) for _ in range(length)])
        cuts.append(trace_cuts)
        inserted.append([[rng.randrange(VOCAB) for _ in range(rng.randint(1, 3))] for _ in sorted(set(trace_cuts))])
        summaries.append(
            [[[rng.randrange(VOCAB) for _ in range(rng.randint(1, 5))] for _ in range(num_summaries)] for _ in budgets]
        )
    return prompts, thinking, cuts, inserted, summaries


def reference_logprobs(model, rollouts, layout, temperature: float = 1.0):
    """Per-target log-probs (and entropies) at ``temperature`` from ordinary per-branch and per-trace
    sequences through the model's own attention, in layout order."""
    prompts, thinking, cuts, inserted, summaries = rollouts
    cache: dict[tuple, torch.Tensor] = {}

    def sequence_logprobs(key, ids):
        if key not in cache:
            logits = model(input_ids=torch.tensor([ids])).logits[0].float()
            cache[key] = torch.log_softmax(logits / temperature, -1)
        return cache[key]

    positions = layout.loss_mask.nonzero().flatten()
    values, entropies = [], []
    for t in positions.tolist():
        n, s, a = int(layout.seq_ids[t]), int(layout.slot[t]), int(layout.summary_index[t])
        position, target = int(layout.position_ids[t]), int(layout.labels[t])
        if a < 0:  # trunk position: the full trace
            ids = prompts[n] + thinking[n]
            table = sequence_logprobs((n,), ids)
        else:
            cut = cuts[n][s]
            delimiter = inserted[n][sorted(set(cuts[n])).index(cut)]
            ids = prompts[n] + thinking[n][:cut] + delimiter + summaries[n][s][a]
            table = sequence_logprobs((n, s, a), ids)
        assert ids[position + 1] == target
        values.append(table[position, target])
        entropies.append(-(table[position].exp() * table[position]).sum())
    return positions, torch.stack(values), torch.stack(entropies)


def grads_of(model, loss):
    model.zero_grad()
    loss.backward()
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["qwen2", "llama"])
@pytest.mark.parametrize("backend", ["sdpa", "reference_varlen"])
@pytest.mark.parametrize("num_traces", [3, 12])
def test_tree_logprobs_and_gradients_equal_per_branch_forwards(family, backend, num_traces):
    """SDPA takes the dense mask for 3 trees and a batch of one row per tree for 12 (less work)."""
    rollouts = random_rollouts(seed=1, num_traces=num_traces)
    layout = pack_response_trees(*rollouts)
    if backend == "sdpa":
        state = prepare_tree_attention(layout.seq_ids, layout.prefix_end, layout.branch_start, backend).state
        assert isinstance(state, TreeBlocks) == (num_traces == 12)
    reference_model = tiny_model(family)
    tree_model = copy.deepcopy(reference_model)
    policy = TreePolicy(tree_model, attention_backend=backend, micro_batch_tokens=10_000)

    got = policy.forward(layout)
    positions, expected, _ = reference_logprobs(reference_model, rollouts, layout)
    assert torch.equal(got.positions, positions)
    torch.testing.assert_close(got.logprobs, expected, rtol=1e-5, atol=1e-5)

    weights = torch.randn(positions.numel(), generator=torch.Generator().manual_seed(0))
    tree_grads = grads_of(tree_model, (got.logprobs * weights).sum())
    reference_grads = grads_of(reference_model, (expected * weights).sum())
    assert tree_grads.keys() == reference_grads.keys()
    for name in reference_grads:
        torch.testing.assert_close(tree_grads[name], reference_grads[name], rtol=1e-4, atol=1e-5, msg=name)


def test_temperature_entropy_and_micro_batches_equal_per_branch_forwards():
    rollouts = random_rollouts(seed=9, num_traces=4)
    layout = pack_response_trees(*rollouts)
    reference_model = tiny_model("qwen2")
    tree_model = copy.deepcopy(reference_model)
    policy = TreePolicy(tree_model, attention_backend="sdpa", micro_batch_tokens=1)  # a tree per micro-batch
    assert len(policy.micro_batches(layout)) == 4
    got = policy.forward(layout, temperature=0.7, return_entropy=True)
    positions, expected, entropy = reference_logprobs(reference_model, rollouts, layout, temperature=0.7)
    assert torch.equal(got.positions, positions)
    torch.testing.assert_close(got.logprobs, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.entropy, entropy, rtol=1e-5, atol=1e-5)
    generator = torch.Generator().manual_seed(1)
    weights, entropy_weights = (
        torch.randn(positions.numel(), generator=generator),
        torch.randn(positions.numel(), generator=generator),
    )
    tree_grads = grads_of(tree_model, (got.logprobs * weights + got.entropy * entropy_weights).sum())
    reference_grads = grads_of(reference_model, (expected * weights + entropy * entropy_weights).sum())
    for name in reference_grads:
        torch.testing.assert_close(tree_grads[name], reference_grads[name], rtol=1e-4, atol=1e-5, msg=name)


def count_calls(module: torch.nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_micro_batching_packs_whole_trees_without_leaking_between_them():
    rollouts = random_rollouts(seed=2, num_traces=4)
    layout = pack_response_trees(*rollouts)
    model = tiny_model("qwen2")
    one_per_tree = TreePolicy(copy.deepcopy(model), attention_backend="sdpa", micro_batch_tokens=1)
    all_in_one = TreePolicy(copy.deepcopy(model), attention_backend="sdpa", micro_batch_tokens=10_000)
    assert len(one_per_tree.micro_batches(layout)) == 4 and len(all_in_one.micro_batches(layout)) == 1
    with torch.no_grad():
        separate, packed = one_per_tree.forward(layout), all_in_one.forward(layout)
    torch.testing.assert_close(separate.logprobs, packed.logprobs, rtol=1e-5, atol=1e-5)


def test_plan_micro_batches_respects_the_token_budget():
    layout = pack_response_trees(*random_rollouts(seed=3, num_traces=6))
    lens = layout.row_lens.tolist()
    budget = max(lens) + 3
    batches = plan_micro_batches(layout, budget)
    assert sorted(r for mb in batches for r in mb.rows) == list(range(6))
    for mb in batches:
        assert mb.rows == sorted(mb.rows) and mb.num_tokens == sum(lens[r] for r in mb.rows)
        assert len(mb.rows) == 1 or mb.num_tokens <= budget
    with pytest.raises(ValueError, match="micro_batch_tokens must be >= 1, got 0"):
        plan_micro_batches(layout, 0)


def test_plan_micro_batches_first_fit_decreasing_by_hand():
    """Trees of 5, 9, 4, 3, 6 tokens into micro-batches of 10: in order they would take 4
    ([5], [9], [4, 3], [6]); longest first, each into the first that fits, they take 3."""
    fake = types.SimpleNamespace(
        row_lens=torch.tensor([5, 9, 4, 3, 6]), tree_token_index=lambda rows: rows, select_trees=lambda rows: None
    )
    assert [mb.rows for mb in plan_micro_batches(fake, 10)] == [[0, 3], [1], [2, 4]]
    assert [mb.rows for mb in plan_micro_batches(fake, 10, rows=[4, 1, 3])] == [[4, 3], [1]]
    assert [mb.rows for mb in plan_micro_batches(fake, 4)] == [[0], [1], [2], [3], [4]]  # too long: alone


def test_branch_cannot_see_later_thinking_or_sibling_branches():
    rollouts = random_rollouts(seed=4, num_traces=1, num_slots=3, num_summaries=2)
    layout = pack_response_trees(*rollouts)
    policy = TreePolicy(tiny_model("qwen2"), attention_backend="sdpa")
    with torch.no_grad():
        base = policy.forward(layout)
    cuts = rollouts[2][0]
    prompt_len = len(rollouts[0][0])
    # Perturb the thinking after the first cut and branch (0, 0) (its delimiter copy and summary).
    # Branch (0, 1) is packed after branch (0, 0), so only the tree rule (not causality) hides it.
    perturbed = copy.copy(layout)
    perturbed.input_ids = layout.input_ids.clone()
    later_thinking = torch.arange(prompt_len + cuts[0], prompt_len + len(rollouts[1][0]))
    perturbed.input_ids[later_thinking] = (perturbed.input_ids[later_thinking] + 7) % VOCAB
    sibling = ((layout.slot == 0) & (layout.summary_index == 0)).nonzero().flatten()
    branch_tokens = ((layout.slot == 0) & (layout.summary_index == 1)).nonzero().flatten()
    assert int(sibling.max()) < int(branch_tokens.min())
    perturbed.input_ids[sibling] = (perturbed.input_ids[sibling] + 5) % VOCAB
    with torch.no_grad():
        after = policy.forward(perturbed)
    # Targets predicted inside branch (0, 1) are unchanged; the trunk after the cut and the
    # perturbed sibling itself did change.
    at = base.positions
    branch = (layout.slot[at] == 0) & (layout.summary_index[at] == 1)
    assert int(branch.sum()) >= 2
    torch.testing.assert_close(after.logprobs[branch], base.logprobs[branch], rtol=0, atol=1e-6)
    trunk_late = (layout.summary_index[at] < 0) & (at > prompt_len + cuts[0])
    assert not torch.allclose(after.logprobs[trunk_late], base.logprobs[trunk_late])
    own = (layout.slot[at] == 0) & (layout.summary_index[at] == 0)
    assert not torch.allclose(after.logprobs[own], base.logprobs[own])


def test_gradient_checkpointing_gives_the_same_gradients():
    rollouts = random_rollouts(seed=5)
    layout = pack_response_trees(*rollouts)
    model = tiny_model("llama")
    plain = TreePolicy(copy.deepcopy(model), attention_backend="sdpa")
    checkpointed = TreePolicy(copy.deepcopy(model), attention_backend="sdpa", gradient_checkpointing=True)
    checkpointed.model.train()
    plain.model.train()
    calls = [count_calls(p.model.model.layers[0].mlp) for p in (plain, checkpointed)]
    grads = [grads_of(p.model, p.forward(layout).logprobs.sum()) for p in (plain, checkpointed)]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-6, msg=name)
    # One micro-batch: the checkpointed layer runs again during backward.
    assert calls[0][0] == 1 and calls[1][0] == 2


def test_bf16_autocast_is_close_to_fp32():
    layout = pack_response_trees(*random_rollouts(seed=6))
    model = tiny_model("qwen2")
    fp32 = TreePolicy(copy.deepcopy(model), attention_backend="sdpa")
    bf16 = TreePolicy(copy.deepcopy(model), attention_backend="sdpa", autocast_dtype=torch.bfloat16)
    dtypes = []
    for policy in (fp32, bf16):
        policy.model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, out: dtypes.append(out.dtype))
    with torch.no_grad():
        full, half = fp32.forward(layout, return_entropy=True), bf16.forward(layout, return_entropy=True)
    assert dtypes == [torch.float32, torch.bfloat16]  # the autocast really runs the layers in bf16
    assert half.logprobs.dtype == torch.float32
    # Measured: 7e-4 (log-probs) and 3e-5 (entropies) apart. The tiny model is near uniform
    # (entropy ~ log 96), so a loose bound would pass any model: a wrong temperature (0.9) moves
    # the log-probs by 0.07, another random model the entropies by 4e-3.
    torch.testing.assert_close(half.logprobs, full.logprobs, rtol=0, atol=1e-2)
    torch.testing.assert_close(half.entropy, full.entropy, rtol=0, atol=1e-3)


def test_flex_block_mask_reproduces_the_dense_tree_rule_on_cpu():
    """flex_attention has no CPU backward, but its eager forward checks the BlockMask here."""
    from torch.nn.attention.flex_attention import flex_attention

    layout = pack_response_trees(*random_rollouts(seed=7, num_traces=3))
    block_mask = flex_block_mask(layout.seq_ids, layout.prefix_end, layout.branch_start)
    length, padded = layout.seq_ids.numel(), block_mask.shape[-2]
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, padded, 8) for _ in range(3))
    flex = flex_attention(q, k, v, block_mask=block_mask)[:, :, :length]
    dense = torch.nn.functional.scaled_dot_product_attention(
        q[:, :, :length], k[:, :, :length], v[:, :, :length],
        attn_mask=dense_tree_mask(layout.seq_ids, layout.prefix_end, layout.branch_start),
    )  # fmt: skip
    torch.testing.assert_close(flex, dense, rtol=1e-5, atol=1e-5)


def test_unavailable_backends_raise_clear_errors():
    with pytest.raises(
        BackendUnavailableError, match="'flash_attn' is not available on cpu: it needs an Ampere or newer CUDA device"
    ):
        resolve_backend("flash_attn", "cpu")
    with pytest.raises(BackendUnavailableError, match="'flex' is not available on cpu"):
        resolve_backend("flex", "cpu")
    with pytest.raises(ValueError, match="attention backend must be one of"):
        resolve_backend("eager", "cpu")
    assert resolve_backend("auto", "cpu") == "sdpa"


def test_model_without_tree_keyword_raises():
    policy = TreePolicy(tiny_model("qwen2"), attention_backend="sdpa")
    with pytest.raises(ValueError, match="needs the `tree_attention=` keyword"):
        policy.model(input_ids=torch.tensor([[1, 2, 3]]))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["flex", "auto"])
def test_cuda_backends_match_sdpa(backend):
    rollouts = random_rollouts(seed=8, num_traces=4)
    layout = pack_response_trees(*rollouts)
    model = tiny_model("qwen2", hidden_size=64).cuda()
    reference = TreePolicy(copy.deepcopy(model), attention_backend="sdpa")
    candidate = TreePolicy(copy.deepcopy(model), attention_backend=backend)
    outputs = [p.forward(layout.to("cuda")) for p in (reference, candidate)]
    torch.testing.assert_close(outputs[1].logprobs, outputs[0].logprobs, rtol=1e-4, atol=1e-4)
    grads = [grads_of(p.model, o.logprobs.sum()) for p, o in zip((reference, candidate), outputs, strict=True)]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-3, atol=1e-4, msg=name)
