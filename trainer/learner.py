"""The learner: old log-probs, then PPO-clip updates over mini-batches of whole prompt groups.

One optimizer step per mini-batch (``ppo_mini_batch_prompts`` prompts, all G traces of each);
inside it, gradients accumulate over token-balanced micro-batches of whole trees (only one
micro-batch's activations are alive). A non-finite loss or gradient norm skips the step (counted).
"""

from __future__ import annotations

import logging
import math
import random
from collections import defaultdict

import torch

from trainer.batches import TrainBatch
from trainer.config import LossConfig, OptimConfig
from trainer.distributed import SINGLE_PROCESS, Distributed, all_reduce_max, all_reduce_sum, split_rows
from trainer.loss import policy_loss, token_weights
from trainer.policy import TreePolicy

logger = logging.getLogger(__name__)


def make_optimizer(model: torch.nn.Module, optim: OptimConfig, total_steps: int):
    """AdamW and a per-optimizer-step LR schedule (linear warm-up, then constant/cosine/linear decay)."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        parameters, lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps, weight_decay=optim.weight_decay
    )
    warmup, total = max(optim.warmup_steps, 0), max(total_steps, 1)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if optim.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(total - warmup, 1))
        if optim.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - progress

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class Learner:
    """Scores and updates a ``TreePolicy``.

    Args:
        policy: the trained policy.
        optimizer, scheduler: from ``make_optimizer``.
        loss: the loss settings.
        grad_clip: max gradient norm (None: none).
        norm_length: the ``token-sum-norm`` constant per trace.
        temperature: the rollout temperature (log-probs of softmax(z / T), the sampled distribution).
        reference: a frozen ``TreePolicy`` for the KL term (``loss.kl_coef > 0``).
        seed: shuffles the mini-batch order of every epoch.
    """

    def __init__(
        self,
        policy: TreePolicy,
        optimizer: torch.optim.Optimizer,
        scheduler,
        loss: LossConfig,
        *,
        grad_clip: float | None,
        norm_length: int,
        temperature: float = 1.0,
        reference: TreePolicy | None = None,
        seed: int = 0,
        max_skipped_updates: int = 10,
        context: Distributed = SINGLE_PROCESS,
    ) -> None:
        if loss.kl_coef > 0 and reference is None:
            raise ValueError("loss.kl_coef > 0 needs a reference policy")
        self.policy = policy
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.loss = loss
        self.grad_clip = grad_clip
        self.norm_length = norm_length
        self.temperature = temperature
        self.reference = reference
        self.rng = random.Random(seed)
        self.skipped_updates = 0
        self.skipped_in_a_row = 0
        self.max_skipped_updates = max_skipped_updates
        self.context = context

    @property
    def device(self) -> torch.device:
        return self.policy.device

    def _rank_micro_batches(self, policy: TreePolicy, layout, rows: list[int]) -> list[tuple[object, bool]]:
        """``(micro_batch, real)`` of this rank's share of ``rows``. Under FSDP every rank must run
        the same number of forwards (each all-gathers the shards), so a rank with fewer micro-batches
        pads with a copy of the shortest tree whose loss counts zero (``real`` False)."""
        if not self.context.enabled:
            return [(mb, True) for mb in policy.micro_batches(layout, rows)]
        row_lens = layout.row_lens.tolist()
        share = split_rows(row_lens, rows, self.context.world_size)[self.context.rank]
        mine = policy.micro_batches(layout, share) if share else []
        count = all_reduce_max(len(mine), self.context)
        filler = policy.micro_batches(layout, [min(rows, key=row_lens.__getitem__)])[0]
        return [(mb, True) for mb in mine] + [(filler, False)] * (count - len(mine))

    @torch.no_grad()
    def _positions_logprobs(self, policy: TreePolicy, batch: TrainBatch, rows: list[int] | None = None) -> torch.Tensor:
        """Log-probs at every position of ``rows`` (default: all trees); zero elsewhere."""
        out = torch.zeros(batch.layout.num_tokens, device=self.device)
        rows = list(range(batch.layout.num_traces)) if rows is None else rows
        if not rows:
            return all_reduce_sum(out, self.context)
        for micro_batch, real in self._rank_micro_batches(policy, batch.layout, rows):
            result = policy.logprobs(micro_batch, temperature=self.temperature)
            if real:
                out[result.positions.to(self.device)] = result.logprobs
        return all_reduce_sum(out, self.context)  # each position is filled on exactly one rank

    def fill_logprobs(self, batch: TrainBatch, num_updates: int, first_rows: list[int] | None = None) -> None:
        """The sampling policy's log-probs and the reference's (with a KL term).

        The first update is on-policy: its trees (``first_rows``) need no old log-probs, the
        current ones are (detached), so only the other trees are scored here, and nothing with a
        single update. The first update's own pass fills its trees' entries (``_optimizer_step``):
        with ``ppo_epochs > 1`` they are trained again after the policy moved.
        """
        if num_updates > 1:
            first = set(first_rows or ())
            later = [row for row in range(batch.layout.num_traces) if row not in first]
            batch.old_logprobs = self._positions_logprobs(self.policy, batch, later)
        if self.loss.kl_coef > 0:
            batch.ref_logprobs = self._positions_logprobs(self.reference, batch)

    def update(self, batch: TrainBatch, mini_batch_prompts: int, epochs: int) -> dict[str, float]:
        """PPO updates over ``epochs`` passes of shuffled mini-batches; returns the step's metrics."""
        num_updates = epochs * math.ceil(batch.num_prompts / mini_batch_prompts)
        orders = []
        for _ in range(epochs):
            orders.append(list(range(batch.num_prompts)))
            self.rng.shuffle(orders[-1])
        first_rows = batch.prompt_rows(orders[0][:mini_batch_prompts]) if orders and orders[0] else []
        self.fill_logprobs(batch, num_updates, first_rows)
        device = self.device
        advantages = batch.advantages.to(device)
        sums: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=device))
        grad_norms, losses, learning_rates = [], [], []
        self.policy.model.train()
        for epoch, order in enumerate(orders):
            for start in range(0, len(order), mini_batch_prompts):
                rows = batch.prompt_rows(order[start : start + mini_batch_prompts])
                on_policy = epoch == 0 and start == 0
                loss, grad_norm = self._optimizer_step(batch, rows, advantages, sums, on_policy)
                losses.append(loss)
                grad_norms.append(grad_norm)
                learning_rates.append(self.optimizer.param_groups[0]["lr"])
        for value in sums.values():
            all_reduce_sum(value, self.context)
        tokens = max(float(sums.pop("tokens")), 1.0)
        metrics = {f"train/{name}": float(value) / tokens for name, value in sums.items()}
        metrics["train/clip_fraction"] = metrics.pop("train/clipped", 0.0)
        metrics.update(
            {
                "train/loss": sum(losses) / len(losses),
                "train/grad_norm": sum(grad_norms) / len(grad_norms),
                "train/lr": learning_rates[-1],
                "train/updates": float(num_updates),
                "train/trained_tokens": tokens,
                "train/skipped_updates": float(self.skipped_updates),
            }
        )
        return metrics

    def _optimizer_step(
        self, batch: TrainBatch, rows: list[int], advantages, sums, on_policy: bool = False
    ) -> tuple[float, float]:
        """One optimizer update on the trees ``rows``; ``on_policy``: no update has happened since
        the rollout, so the old log-probs are the current ones."""
        device = self.device
        layout = batch.layout
        index = layout.tree_token_index(rows)
        trained = index[layout.loss_mask[index]]
        weights = torch.zeros(layout.num_tokens, device=device)
        weights[trained.to(device)] = token_weights(
            self.loss.aggregation, batch.lineage_ids[trained], len(rows), self.norm_length
        ).to(device)
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=device)
        # The on-policy pass's log-probs are the old ones of its trees for any later epoch; each rank
        # fills the positions of its own share, and one all-reduce gives every rank all of them.
        keep_old = on_policy and batch.old_logprobs is not None
        on_policy_logprobs = torch.zeros(layout.num_tokens, device=device) if keep_old else None
        # FSDP averages gradients over ranks; the weights already normalise over the whole mini-batch.
        scale = float(self.context.world_size)
        for micro_batch, real in self._rank_micro_batches(self.policy, layout, rows):
            # Entropy comes out of the same fused LM-head pass; it is logged even without a bonus.
            result = self.policy.logprobs(micro_batch, temperature=self.temperature, return_entropy=True)
            positions = result.positions.to(device)
            current = on_policy or batch.old_logprobs is None
            old = result.logprobs.detach() if current else batch.old_logprobs[positions]
            if keep_old and real:
                on_policy_logprobs[positions] = old
            terms = policy_loss(
                result.logprobs,
                old,
                advantages[positions],
                weights[positions],
                clip_low=self.loss.clip_low,
                clip_high=self.loss.clip_high,
                dual_clip=self.loss.dual_clip,
                ref_logprobs=None if batch.ref_logprobs is None else batch.ref_logprobs[positions],
                kl_coef=self.loss.kl_coef,
                kl_estimator=self.loss.kl_estimator,
                entropy=result.entropy,
                entropy_coef=self.loss.entropy_coef,
            )
            (terms.loss * (scale if real else 0.0)).backward()
            if real:
                total += terms.loss.detach()
            # A filler adds zeros, so that every rank holds the same metric keys, in the same order,
            # for the all-reduces after the update (a rank of fillers only would skip them and hang).
            for name, value in terms.sums.items():
                sums[name] += value if real else torch.zeros_like(value)
        all_reduce_sum(total, self.context)
        if keep_old:
            all_reduce_sum(on_policy_logprobs, self.context)  # each position is filled on exactly one rank
            index = trained.to(device)
            batch.old_logprobs[index] = on_policy_logprobs[index]
        parameters = [p for p in self.policy.model.parameters() if p.grad is not None]
        max_norm = self.grad_clip if self.grad_clip is not None else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm) if parameters else torch.zeros(())
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP: the norm over every shard
            grad_norm = grad_norm.full_tensor()
        loss_value, norm_value = float(total), float(grad_norm)
        if math.isfinite(loss_value) and math.isfinite(norm_value):
            self.optimizer.step()
            self.scheduler.step()
            self.skipped_in_a_row = 0
        else:
            self.skipped_updates += 1
            self.skipped_in_a_row += 1
            logger.warning("skipped an update: loss %s, gradient norm %s", loss_value, norm_value)
            if self.skipped_in_a_row >= self.max_skipped_updates:
                raise FloatingPointError(
                    f"{self.skipped_in_a_row} updates in a row had a non-finite loss or gradient norm "
                    f"(last: loss {loss_value}, gradient norm {norm_value}); stopping. Lower optim.lr, check the "
                    "rewards and the data, or resume from the last checkpoint"
                )
        self.optimizer.zero_grad(set_to_none=True)
        return loss_value, norm_value
