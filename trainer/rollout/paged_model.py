"""The Hugging Face model over the paged KV pool: an attention function registered with transformers.

The model stays the Hugging Face module. ``AttentionInterface.register("anytime_paged", ...)``
adds an attention function that writes each layer's new keys/values into the pool
(``module.layer_idx``) through a slot mapping and attends with ``anytime_kernels``' paged
attention; what it needs travels to every layer as the ``paged_batch`` keyword (a
:class:`PagedBatch`), as the tree attention's rule does in training (``trainer/attention.py``).
A 4-D placeholder mask makes transformers skip its own mask preparation (a host sync per forward
on a 2-D mask), and no transformers cache is used.

The engine switches the model to this attention only while it runs it (:func:`paged_forward`): the
same module object may serve other callers (a reference ``generate`` in the tests) with its own
attention. The engine must therefore not share its model with another thread while it runs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from anytime_kernels.paged_attention import paged_decode_attention, paged_prefill_attention, write_paged_kv
from trainer.rollout.kv_pool import KVPool

ATTENTION_NAME = "anytime_paged"


@dataclass
class PagedBatch:
    """What every attention layer of one engine forward reads.

    Attributes:
        pool: the KV pool.
        slot_mapping: ``[T]`` int64 pool slot of each new token (-1: skip, a finished or padding row).
        block_tables: ``[R, W]`` int32 blocks of each row / request.
        seq_lens: ``[R]`` int32 keys each row / request attends to (its new tokens included).
        query_start_loc: ``[R + 1]`` int32 offsets of each request's new tokens in a packed prefill
            (the input is ``[1, T]``); None for a decode step (the input is ``[R, 1]``).
        backend: of the paged attention ops (see :func:`attention_backend`).
    """

    pool: KVPool
    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    query_start_loc: torch.Tensor | None = None
    backend: str = "auto"


def attention_backend(dtype: torch.dtype) -> str:
    """``auto`` (Triton on CUDA, the compiled op or torch on the CPU), but ``torch`` for a float64
    model (the tests' exact reference), which the Triton kernels do not take."""
    return "torch" if dtype == torch.float64 else "auto"


def paged_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention function registered as ``anytime_paged``.

    Decode: ``query [R, Hq, 1, D]``, ``key``/``value [R, Hkv, 1, D]`` -> ``[R, 1, Hq, D]``.
    Prefill: ``query [1, Hq, T, D]``, ``key``/``value [1, Hkv, T, D]`` -> ``[1, T, Hq, D]``.
    """
    batch: PagedBatch | None = kwargs.get("paged_batch")
    if batch is None:
        raise ValueError(
            f"attn_implementation {ATTENTION_NAME!r} needs the `paged_batch=` keyword (a PagedBatch); "
            "the embedded engine's runner passes it"
        )
    if dropout:
        raise ValueError(f"paged attention does not support attention dropout, got {dropout}")
    key_cache, value_cache = batch.pool.key_cache(module.layer_idx), batch.pool.value_cache(module.layer_idx)
    backend = batch.backend
    if batch.query_start_loc is None:
        # The engine's allocator made the slots and tables: no value checks every layer of every step.
        write_paged_kv(key_cache, value_cache, key[:, :, 0], value[:, :, 0], batch.slot_mapping, backend=backend,
                       check_values=False)  # fmt: skip
        out = paged_decode_attention(query[:, :, 0], key_cache, value_cache, batch.block_tables, batch.seq_lens,
                                     scale=scaling, backend=backend, check_values=False)  # fmt: skip
        return out[:, None], None
    keys, values = key[0].transpose(0, 1).contiguous(), value[0].transpose(0, 1).contiguous()
    write_paged_kv(key_cache, value_cache, keys, values, batch.slot_mapping, backend=backend)
    out = paged_prefill_attention(query[0].transpose(0, 1).contiguous(), key_cache, value_cache, batch.block_tables,
                                  batch.seq_lens, batch.query_start_loc, scale=scaling, backend=backend)  # fmt: skip
    return out[None], None


_REGISTERED = False


def register_paged_attention() -> str:
    """Register ``anytime_paged`` with transformers (idempotent); returns the implementation name."""
    global _REGISTERED
    if not _REGISTERED:
        from transformers import AttentionInterface

        AttentionInterface.register(ATTENTION_NAME, paged_attention_forward)
        _REGISTERED = True
    return ATTENTION_NAME


@contextlib.contextmanager
def paged_attention(model: torch.nn.Module) -> Iterator[None]:
    """Run ``model`` with the paged attention inside the block, its own attention after."""
    name = register_paged_attention()
    previous = model.config._attn_implementation
    model.config._attn_implementation = name
    try:
        yield
    finally:
        model.config._attn_implementation = previous


def placeholder_mask(device: torch.device) -> torch.Tensor:
    """A 4-D mask transformers passes through as already prepared (the paged attention ignores it)."""
    return torch.ones(1, 1, 1, 1, dtype=torch.bool, device=device)


def forward_logits(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    batch: PagedBatch,
    mask: torch.Tensor,
    logits_to_keep: int | torch.Tensor = 0,
) -> torch.Tensor:
    """``model``'s logits for ``input_ids``/``position_ids [R, L]`` over the pool (call inside
    :func:`paged_attention`); ``logits_to_keep`` as transformers takes it."""
    out = model(
        input_ids=input_ids,
        position_ids=position_ids,
        attention_mask=mask,
        use_cache=False,
        logits_to_keep=logits_to_keep,
        paged_batch=batch,
    )
    return out.logits
