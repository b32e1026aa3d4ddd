"""Policy forward over packed response trees for Hugging Face causal LMs (Llama/Qwen2/Qwen3).

The thinking prefix of a trace is computed once for all of its S x A summary branches: each
micro-batch is one packed sequence of whole trees, the tree rule enters the model through the
``anytime_tree`` attention registered with transformers (``anytime_kernels.attention``), the
decoder returns hidden states, and ``fused_logprobs`` applies the LM head so the
``[tokens x vocab]`` logits never exist.

Micro-batches pack whole trees in layout order until the token budget would be exceeded (a tree
longer than the budget gets a micro-batch of its own). The trainer backpropagates one
micro-batch at a time, so only one micro-batch's activations are alive.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from anytime_kernels import ResponseTreeLayout, fused_logprobs
from anytime_kernels.attention import prepare_tree_attention, register_tree_attention


@dataclass
class MicroBatch:
    """Whole trees packed into one sequence.

    Attributes:
        rows: trace indices of the layout, in packed order.
        token_index: ``[L]`` int64 layout index of every packed token.
    """

    rows: list[int]
    token_index: torch.Tensor

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


def plan_micro_batches(layout: ResponseTreeLayout, max_tokens: int) -> list[MicroBatch]:
    """Greedy packing of whole trees, in order, into sequences of at most ``max_tokens``."""
    if max_tokens < 1:
        raise ValueError(f"micro_batch_tokens must be >= 1, got {max_tokens}")
    row_lens = layout.row_lens.tolist()
    cu = layout.cu_seqlens.tolist()
    groups: list[list[int]] = []
    current: list[int] = []
    current_tokens = 0
    for row, length in enumerate(row_lens):
        if current and current_tokens + length > max_tokens:
            groups.append(current)
            current, current_tokens = [], 0
        current.append(row)
        current_tokens += length
    if current:
        groups.append(current)
    device = layout.input_ids.device
    return [
        MicroBatch(rows, torch.cat([torch.arange(cu[r], cu[r + 1], device=device) for r in rows])) for rows in groups
    ]


class TreePolicy:
    """Runs a causal LM over packed response trees and returns per-target log-probs.

    The model is switched to the ``anytime_tree`` attention implementation for good (gradient
    checkpointing recomputes layers during backward, so a temporary switch would be unsafe);
    give it a model dedicated to training.

    Args:
        model: a transformers ``*ForCausalLM`` of the Llama/Qwen2/Qwen3 families.
        attention_backend: ``auto``, ``flex``, ``sdpa``, ``flash_attn``, ``xformers`` or
            ``reference_varlen`` (see ``anytime_kernels.attention``).
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

    def micro_batches(self, layout: ResponseTreeLayout) -> list[MicroBatch]:
        return plan_micro_batches(layout, self.micro_batch_tokens)

    def hidden_states(self, layout: ResponseTreeLayout, micro_batch: MicroBatch) -> torch.Tensor:
        """Final hidden states ``[L, H]`` of the micro-batch's packed tokens."""
        device = self.device
        index = micro_batch.token_index.to(layout.input_ids.device)
        # Offsets in the layout are absolute; shift them to this micro-batch's packed sequence.
        rows = torch.tensor(micro_batch.rows, dtype=torch.long, device=index.device)
        lengths = layout.row_lens.to(index.device)[rows]
        packed_starts = torch.cumsum(lengths, 0) - lengths
        local_row = torch.repeat_interleave(torch.arange(len(rows), device=index.device), lengths)
        shift = (packed_starts - layout.cu_seqlens.to(index.device).long()[rows])[local_row]
        spec = prepare_tree_attention(
            local_row.to(device=device, dtype=torch.int32),
            (layout.prefix_end[index].long() + shift).to(device=device, dtype=torch.int32),
            (layout.branch_start[index].long() + shift).to(device=device, dtype=torch.int32),
            self.attention_backend,
        )
        input_ids = layout.input_ids[index].to(device)[None]
        position_ids = layout.position_ids[index].to(device)[None]
        with self._autocast():
            output = self.decoder(input_ids=input_ids, position_ids=position_ids, tree_attention=spec, use_cache=False)
        return output.last_hidden_state[0]

    def logprobs(
        self,
        layout: ResponseTreeLayout,
        micro_batch: MicroBatch,
        *,
        temperature: float = 1.0,
        return_entropy: bool = False,
    ) -> TokenLogprobs:
        """Log-probs (and entropy) of every trained target of one micro-batch."""
        hidden = self.hidden_states(layout, micro_batch)
        index = micro_batch.token_index.to(layout.loss_mask.device)
        trained = layout.loss_mask[index].nonzero().flatten()
        positions = index[trained]
        targets = layout.labels[positions].to(hidden.device)
        # Under autocast, fused_logprobs casts hidden and the LM head to the autocast dtype, as
        # the model's own lm_head would be.
        with self._autocast():
            result = fused_logprobs(
                hidden,
                self.lm_head_weight,
                targets,
                rows=trained.to(hidden.device),
                temperature=temperature,
                return_entropy=return_entropy,
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
            self.logprobs(layout, mb, temperature=temperature, return_entropy=return_entropy)
            for mb in self.micro_batches(layout)
        ]
        positions = torch.cat([p.positions for p in parts]) if parts else torch.empty(0, dtype=torch.long)
        logprobs = torch.cat([p.logprobs for p in parts]) if parts else torch.empty(0)
        entropy = torch.cat([p.entropy for p in parts]) if return_entropy and parts else None
        return TokenLogprobs(positions, logprobs, entropy)
