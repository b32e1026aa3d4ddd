"""Policy forward over packed response trees for Hugging Face causal LMs (Llama/Qwen2/Qwen3).

The thinking prefix of a trace is computed once for all of its S x A summary branches: each
micro-batch is one packed sequence of whole trees, the tree rule enters the model through the
``anytime_tree`` attention registered with transformers (``trainer.attention``), the
decoder returns hidden states, and ``fused_logprobs`` applies the LM head so the
``[tokens x vocab]`` logits never exist.

Micro-batches pack whole trees in layout order until the token budget would be exceeded (a tree
longer than the budget gets a micro-batch of its own). The trainer backpropagates one
micro-batch at a time, so only one micro-batch's activations are alive.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from anytime_kernels import ResponseTreeLayout, fused_logprobs
from trainer.attention import prepare_tree_attention, register_tree_attention


@dataclass
class MicroBatch:
    """Whole trees packed into one sequence.

    Attributes:
        rows: trace indices of the layout, in packed order.
        token_index: ``[L]`` int64 layout index of every packed token.
        layout: the trees alone as a layout of their own (offsets rebased; host tensors).
    """

    rows: list[int]
    token_index: torch.Tensor
    layout: ResponseTreeLayout

    @property
    def num_tokens(self) -> int:
        return int(self.token_index.numel())


@dataclass
class TokenLogprobs:
    """Log-probs of the trained targets of one micro-batch.

    Attributes:
        positions: ``[M]`` int64 layout index t of each predicting position (``loss_mask[t]``);
            the target is ``labels[t]``, the token at ``t + 1``.
        logprobs: ``[M]`` fp32.
        entropy: ``[M]`` fp32, when asked for.
    """

    positions: torch.Tensor
    logprobs: torch.Tensor
    entropy: torch.Tensor | None = None


def plan_micro_batches(
    layout: ResponseTreeLayout, max_tokens: int, rows: Sequence[int] | None = None
) -> list[MicroBatch]:
    """Whole trees (``rows``, default all) packed into sequences of at most ``max_tokens`` tokens,
    first-fit by decreasing length (fewer forwards than filling in order: at paper scale 9 instead of
    10-11 micro-batches of 32k tokens per rank); each micro-batch keeps its trees in ``rows`` order,
    and a tree longer than ``max_tokens`` gets a micro-batch of its own."""
    if max_tokens < 1:
        raise ValueError(f"micro_batch_tokens must be >= 1, got {max_tokens}")
    row_lens = layout.row_lens.tolist()
    rows = list(range(len(row_lens))) if rows is None else [int(r) for r in rows]
    order = {row: k for k, row in enumerate(rows)}
    groups: list[list[int]] = []
    loads: list[int] = []
    for row in sorted(rows, key=lambda r: (-row_lens[r], order[r])):
        length = row_lens[row]
        for k, load in enumerate(loads):
            if load + length <= max_tokens:
                groups[k].append(row)
                loads[k] += length
                break
        else:
            groups.append([row])
            loads.append(length)
    groups = [sorted(group, key=order.__getitem__) for group in groups]
    groups.sort(key=lambda group: order[group[0]])
    return [MicroBatch(rows, layout.tree_token_index(rows), layout.select_trees(rows)) for rows in groups]


class TreeForward(torch.nn.Module):
    """The decoder over one packed micro-batch, then the LM head through ``fused_logprobs``, as one
    module: under FSDP2 it is the root that unshards the embeddings and the LM head for its forward
    (the decoder layers are sharded units of their own)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, position_ids, mask, spec, targets, rows, temperature, return_entropy, autocast):
        with autocast:
            hidden = self.model.get_decoder()(
                input_ids=input_ids, position_ids=position_ids, attention_mask=mask, tree_attention=spec,
                use_cache=False,
            ).last_hidden_state[0]  # fmt: skip
            # Under autocast, fused_logprobs casts hidden and the LM head to the autocast dtype, as
            # the model's own lm_head would be.
            return fused_logprobs(
                hidden,
                self.model.get_output_embeddings().weight,
                targets,
                rows=rows,
                temperature=temperature,
                return_entropy=return_entropy,
                check_values=False,
            )


class TreePolicy:
    """Runs a causal LM over packed response trees and returns per-target log-probs.

    The model is switched to the ``anytime_tree`` attention implementation for good (gradient
    checkpointing recomputes layers during backward, so a temporary switch would be unsafe);
    give it a model dedicated to training.

    Args:
        model: a transformers ``*ForCausalLM`` of the Llama/Qwen2/Qwen3 families.
        attention_backend: ``auto``, ``flex``, ``sdpa``, ``flash_attn``, ``xformers`` or
            ``reference_varlen`` (see ``trainer.attention``).
        gradient_checkpointing: recompute decoder layers in backward (non-reentrant).
        autocast_dtype: e.g. ``torch.bfloat16`` to run the forward under autocast; None = off.
        micro_batch_tokens: token budget of one packed micro-batch.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        attention_backend: str = "auto",
        gradient_checkpointing: bool = False,
        autocast_dtype: torch.dtype | None = None,
        micro_batch_tokens: int = 16384,
    ) -> None:
        if autocast_dtype not in (None, torch.bfloat16, torch.float16):
            raise ValueError(f"autocast_dtype must be None, torch.bfloat16 or torch.float16, got {autocast_dtype}")
        if micro_batch_tokens < 1:
            raise ValueError(f"micro_batch_tokens must be >= 1, got {micro_batch_tokens}")
        self.model = model
        self.attention_backend = attention_backend
        self.autocast_dtype = autocast_dtype
        self.micro_batch_tokens = micro_batch_tokens
        name = register_tree_attention()
        model.set_attn_implementation(name)
        if gradient_checkpointing:
            # transformers 5.24 renamed the switch; 5.17 only has the old name.
            enable = getattr(model, "activation_checkpointing_enable", None)
            if enable is not None:
                enable({"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.decoder = model.get_decoder()
        self.module = TreeForward(model)
        config = model.config
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.model.get_output_embeddings().weight

    def _autocast(self) -> torch.autocast:
        return torch.autocast(
            self.device.type, dtype=self.autocast_dtype or torch.bfloat16, enabled=self.autocast_dtype is not None
        )

    @staticmethod
    def _prepared_mask(device: torch.device) -> torch.Tensor:
        """A placeholder 4-D mask: transformers passes a 4-D mask through as already prepared, so it
        skips its own mask preprocessing (which reads position ids back to the host to detect packed
        sequences: a device sync per forward). The tree attention ignores it."""
        return torch.ones(1, 1, 1, 1, dtype=torch.bool, device=device)

    def micro_batches(self, layout: ResponseTreeLayout, rows: Sequence[int] | None = None) -> list[MicroBatch]:
        return plan_micro_batches(layout, self.micro_batch_tokens, rows)

    def _spec(self, trees: ResponseTreeLayout):
        return prepare_tree_attention(
            trees.seq_ids, trees.prefix_end, trees.branch_start, self.attention_backend, head_dim=self.head_dim,
            dtype=self.autocast_dtype or next(self.model.parameters()).dtype, device=self.device,
        )  # fmt: skip

    def hidden_states(self, micro_batch: MicroBatch) -> torch.Tensor:
        """Final hidden states ``[L, H]`` of the micro-batch's packed tokens."""
        device = self.device
        trees = micro_batch.layout
        with self._autocast():
            output = self.decoder(
                input_ids=trees.input_ids.to(device, non_blocking=True)[None],
                position_ids=trees.position_ids.to(device, non_blocking=True)[None],
                attention_mask=self._prepared_mask(device),
                tree_attention=self._spec(trees),
                use_cache=False,
            )
        return output.last_hidden_state[0]

    def logprobs(
        self, micro_batch: MicroBatch, *, temperature: float = 1.0, return_entropy: bool = False
    ) -> TokenLogprobs:
        """Log-probs (and entropy) of every trained target of one micro-batch.

        No device sync: the trained positions and targets are found and range-checked on the host
        layout, then copied to the device.
        """
        device = self.device
        trees = micro_batch.layout
        trained = trees.loss_mask.nonzero().flatten()
        targets = trees.labels[trained]
        vocab = self.lm_head_weight.shape[0]
        if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= vocab):
            raise ValueError(f"labels hold ids outside the model's vocabulary [0, {vocab})")
        positions = micro_batch.token_index[trained]
        result = self.module(
            trees.input_ids.to(device, non_blocking=True)[None],
            trees.position_ids.to(device, non_blocking=True)[None],
            self._prepared_mask(device),
            self._spec(trees),
            targets.to(device, non_blocking=True),
            trained.to(device, non_blocking=True),
            temperature,
            return_entropy,
            self._autocast(),
        )
        if return_entropy:
            logprobs, entropy = result
            return TokenLogprobs(positions, logprobs, entropy)
        return TokenLogprobs(positions, result)

    def forward(
        self, layout: ResponseTreeLayout, *, temperature: float = 1.0, return_entropy: bool = False
    ) -> TokenLogprobs:
        """Log-probs of every trained target of the whole layout, micro-batch after micro-batch.

        For training, prefer iterating ``micro_batches`` and calling ``logprobs`` on each, with a
        backward per micro-batch; this keeps every micro-batch's graph alive at once.
        """
        parts = [
            self.logprobs(mb, temperature=temperature, return_entropy=return_entropy)
            for mb in self.micro_batches(layout)
        ]
        positions = torch.cat([p.positions for p in parts]) if parts else torch.empty(0, dtype=torch.long)
        logprobs = torch.cat([p.logprobs for p in parts]) if parts else torch.empty(0)
        entropy = torch.cat([p.entropy for p in parts]) if return_entropy and parts else None
        return TokenLogprobs(positions, logprobs, entropy)
