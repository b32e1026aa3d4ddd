"""Tiny models and a character tokenizer, built locally (no model hub): the one factory that tests,
benchmarks and examples share.

``char_tokenizer()`` has one id per printable ASCII character and newline, with ``<think>``,
``</think>`` (single tokens, as in reasoning models) and the EOS ``<|endoftext|>`` at ids 0..2;
it is built with the ``tokenizers`` library and wrapped as ``transformers.PreTrainedTokenizerFast``.
``tiny_causal_lm(...)`` is a random-initialised Qwen2 (or Llama) of any small shape.
"""

from __future__ import annotations

import string

import torch
from tokenizers import Tokenizer, models
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

EOS = "<|endoftext|>"
CHARACTERS = sorted(set(string.printable) - set("\t\r\x0b\x0c"))
FIRST_CHARACTER_ID = 3  # ids 0..2: EOS, <think>, </think>


def char_tokenizer() -> PreTrainedTokenizerFast:
    """The character tokenizer of the tests and benchmarks (vocabulary of 3 + 96 ids)."""
    vocab = {EOS: 0, "<think>": 1, "</think>": 2}
    for char in CHARACTERS:
        vocab[char] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS, pad_token=EOS)
    tokenizer.add_tokens(["<think>", "</think>"])
    return tokenizer


def tiny_causal_lm(
    vocab_size: int,
    *,
    family: str = "qwen2",
    hidden_size: int = 64,
    intermediate_size: int | None = None,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int | None = None,
    max_positions: int = 16384,
    tie_word_embeddings: bool = True,
    init_scale: float | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> torch.nn.Module:
    """A random-initialised causal LM with SDPA attention, in eval mode.

    ``init_scale`` is the initializer range (transformers' default 0.02 when None); a large one
    (0.5) makes the outputs depend on the context, which rollout tests need to catch position and
    padding bugs.
    """
    settings = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=tie_word_embeddings,
    )
    if head_dim is not None:
        settings["head_dim"] = head_dim
    if init_scale is not None:
        settings["initializer_range"] = init_scale
    configs = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM)}
    if family not in configs:
        raise ValueError(f"family must be one of {sorted(configs)}, got {family!r}")
    config_class, model_class = configs[family]
    torch.manual_seed(seed)
    model = model_class(config_class(**settings))
    model.set_attn_implementation("sdpa")
    return model.to(dtype).eval()
