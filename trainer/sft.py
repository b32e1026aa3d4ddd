"""SFT warm-up: causal-LM loss on the data's ``solution`` text, prompt tokens masked.

A training sequence ``prompt + solution + EOS`` is a response tree with one slot cut at the whole
solution and an empty branch, so SFT runs through the same packed forward and ``fused_logprobs``
as RL (whole sequences packed into token-balanced micro-batches), with the same optimizer stack.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Sequence

import torch

from anytime_kernels import pack_response_trees
from trainer.config import SFTConfig
from trainer.data import Prompt
from trainer.policy import TreePolicy

logger = logging.getLogger(__name__)


def sft_examples(prompts: Sequence[Prompt], tokenizer) -> list[tuple[list[int], list[int]]]:
    """``(prompt_ids, solution_ids + [EOS])`` of every prompt whose problem has a solution."""
    examples = []
    for prompt in prompts:
        solution = prompt.problem.solution
        if solution:
            ids = [*tokenizer.encode(solution, add_special_tokens=False), tokenizer.eos_token_id]
            examples.append((list(prompt.token_ids), ids))
    return examples


def sft_loss_layout(batch: Sequence[tuple[list[int], list[int]]]):
    """The packed layout of a batch of SFT sequences (one slot cut at the full solution, empty branch)."""
    prompts = [prompt for prompt, _ in batch]
    solutions = [solution for _, solution in batch]
    cuts = [[len(solution)] for solution in solutions]
    return pack_response_trees(prompts, solutions, cuts, [[[]] for _ in batch], [[[[]]] for _ in batch])


def sft_warmup(
    policy: TreePolicy,
    examples: Sequence[tuple[list[int], list[int]]],
    config: SFTConfig,
    *,
    seed: int = 0,
    steps: int | None = None,
    on_step: Callable[[int, dict], None] | None = None,
) -> list[dict]:
    """Train ``policy`` on ``examples`` for ``steps`` (default ``config.steps``) optimizer steps.

    AdamW at ``config.lr`` (weight decay on matrices only) with linear warm-up and cosine decay to
    10%; gradient norm clipped at 1.
    The loss is the mean negative log-likelihood over the batch's solution tokens. Returns one
    metrics dict per step (``sft/loss``, ``sft/tokens``, ``sft/lr``, ``sft/seconds``).
    """
    steps = config.steps if steps is None else steps
    if steps <= 0:
        return []
    if not examples:
        raise ValueError("SFT needs examples with a solution; the data set has none (set sft.steps=0)")
    model = policy.model
    parameters = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in parameters if p.dim() >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in parameters if p.dim() < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, config.beta2))
    warmup = min(config.warmup_steps, max(steps - 1, 0))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(steps - warmup, 1)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    rng = random.Random(seed)
    order: list[int] = []
    history = []
    model.train()
    for step in range(steps):
        start = time.perf_counter()
        batch = []
        while len(batch) < config.batch_size:
            if not order:
                order = list(range(len(examples)))
                rng.shuffle(order)
            batch.append(examples[order.pop()])
        layout = sft_loss_layout(batch)
        num_targets = int(layout.loss_mask.sum())
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for micro_batch in policy.micro_batches(layout):
            loss = -policy.logprobs(micro_batch).logprobs.sum() / num_targets
            loss.backward()
            total += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        metrics = {
            "sft/loss": total,
            "sft/tokens": float(num_targets),
            "sft/lr": optimizer.param_groups[0]["lr"],
            "sft/seconds": time.perf_counter() - start,
        }
        history.append(metrics)
        if on_step is not None:
            on_step(step, metrics)
    return history
