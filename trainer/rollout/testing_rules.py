"""Testing only: how SGLang 0.5.23 reads a ``/generate`` body, as the protocol server applies it.

Written from SGLang's tokenizer manager, scheduler and ``sglang.api.v1.SamplingParams`` (the
schema every ``/generate`` body is checked against), independently of the client's own checks in
``trainer.rollout.sglang_info``, so a client that breaks one of these rules fails against the
protocol server as it would against SGLang. Every rule that refuses raises ValueError, which the
server answers with HTTP 400, as SGLang does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from trainer.rollout.base import GenerationRequest, SamplingParams

# Every key of SGLang 0.5.23's sampling parameters; any other key is refused.
SAMPLING_KEYS = frozenset({
    "max_new_tokens", "stop", "stop_token_ids", "stop_regex", "temperature", "top_p", "top_k", "min_p",
    "frequency_penalty", "presence_penalty", "repetition_penalty", "min_new_tokens", "n", "json_schema", "regex",
    "ebnf", "structural_tag", "ignore_eos", "skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim",
    "stream_interval", "logit_bias", "sampling_seed", "custom_params", "beam_width", "watermark", "choice",
})  # fmt: skip
# Keys that change what is sampled beyond softmax(logits / T) with top-p, the only sampling the
# embedded engine does: accepted at these values (or null) only. top_k's "all" is -1 or 2^30.
_PLAIN = {"top_k": (-1, 1 << 30), "min_p": (0.0,), "repetition_penalty": (1.0,), "frequency_penalty": (0.0,),
          "presence_penalty": (0.0,)}  # fmt: skip
_UNSET = ("stop", "stop_regex", "json_schema", "regex", "ebnf", "structural_tag", "beam_width", "logit_bias",
          "watermark", "choice")  # fmt: skip
# SGLang's default max_new_tokens, and what it takes for null (then capped to the context).
_DEFAULT_NEW_TOKENS, _UNBOUNDED = 128, 1 << 30


@dataclass(frozen=True)
class ServerSettings:
    """The launch settings of the emulated server that its request rules depend on."""

    context_len: int
    dp_size: int = 1
    skips_tokenizer: bool = False
    eos_token_ids: tuple[int, ...] = ()

    @property
    def max_input_len(self) -> int:
        """SGLang's ``max_req_input_len``: its longest request (``context_len - 1``) less 5."""
        return self.context_len - 1 - 5


def parse_body(body: dict[str, Any], settings: ServerSettings) -> tuple[list[GenerationRequest], bool]:
    """The requests of a ``/generate`` body and whether it was a single prompt (not a batch)."""
    input_ids = body.get("input_ids")
    if not isinstance(input_ids, list) or not input_ids:
        raise ValueError("this server needs input_ids (a list of token ids, or a list of such lists)")
    single = not isinstance(input_ids[0], list)
    prompts = [input_ids] if single else input_ids
    params = body.get("sampling_params") or {}
    params_list = params if isinstance(params, list) else [params] * len(prompts)
    if len(params_list) != len(prompts):
        raise ValueError(f"{len(params_list)} sampling_params for {len(prompts)} prompts")
    if len({int(p.get("n") or 1) for p in params_list}) > 1:
        raise ValueError("all items of a batch must ask for the same n (SGLang answers 400 otherwise)")
    rank = body.get("routed_dp_rank")
    # SGLang ignores rank 0 on a server of one replica and refuses any rank it does not have.
    if rank is not None and not (settings.dp_size <= 1 and rank == 0) and not 0 <= int(rank) < settings.dp_size:
        raise ValueError(f"routed_dp_rank={rank} is outside the server's replicas [0, {settings.dp_size})")
    priority = int(body.get("priority") or 0)
    requests = [_request(prompt, p, priority, settings) for prompt, p in zip(prompts, params_list, strict=True)]
    return requests, single


def _request(prompt: list, params: dict[str, Any], priority: int, settings: ServerSettings) -> GenerationRequest:
    unknown = sorted(set(params) - SAMPLING_KEYS)
    if unknown:
        raise ValueError(f"unknown sampling_params {unknown}")
    for key, plain in _PLAIN.items():
        if params.get(key) is not None and float(params[key]) not in plain:
            raise ValueError(f"this test server does not emulate {key}={params[key]!r} (only {plain[0]})")
    if settings.skips_tokenizer and (params.get("stop") or params.get("stop_regex")):
        raise ValueError("stop strings need the tokenizer, which a server started with --skip-tokenizer-init lacks")
    for key in _UNSET:
        if params.get(key):
            raise ValueError(f"this test server does not emulate {key}={params[key]!r}")
    input_ids = tuple(int(t) for t in prompt)
    # The tokenizer manager's checks against the model's context.
    if len(input_ids) >= settings.context_len:
        raise ValueError(f"a prompt of {len(input_ids)} tokens does not fit the context of {settings.context_len}")
    asked = params.get("max_new_tokens", _DEFAULT_NEW_TOKENS)
    if "max_new_tokens" in params and asked is not None and len(input_ids) + int(asked) > settings.context_len:
        raise ValueError(
            f"{len(input_ids)} prompt + {asked} new tokens exceed the model's context of {settings.context_len} tokens"
        )
    min_new_tokens = int(params.get("min_new_tokens") or 0)
    if settings.skips_tokenizer and min_new_tokens > 0:
        raise ValueError(
            f"min_new_tokens={min_new_tokens} needs the tokenizer (its EOS), which a server started with "
            "--skip-tokenizer-init lacks"
        )
    if asked is not None and min_new_tokens > int(asked):
        raise ValueError(f"min_new_tokens={min_new_tokens} is not within [0, max_new_tokens={asked}]")
    # The scheduler's: prompts up to max_req_input_len, and new tokens up to the context less 2.
    if len(input_ids) >= settings.max_input_len:
        raise ValueError(f"a prompt of {len(input_ids)} tokens is not below max_req_input_len={settings.max_input_len}")
    max_new_tokens = min(_UNBOUNDED if asked is None else int(asked), settings.context_len - 2 - len(input_ids))
    stop = [int(t) for t in params.get("stop_token_ids") or []]
    if not params.get("ignore_eos", False):
        # SGLang always stops at every EOS of the model's configs unless ignore_eos.
        stop += [t for t in settings.eos_token_ids if t not in stop]
    seed = params.get("sampling_seed")
    return GenerationRequest(
        input_ids=input_ids,
        n=int(params.get("n") or 1),
        max_new_tokens=max_new_tokens,
        stop_token_ids=tuple(stop),
        sampling=SamplingParams(
            temperature=float(_value(params, "temperature", 1.0)),
            top_p=float(_value(params, "top_p", 1.0)),
            seed=None if seed is None else int(seed),
            min_new_tokens=min(min_new_tokens, max_new_tokens),
        ),
        cache_output=True,
        priority=priority,
    )


def _value(params: dict[str, Any], key: str, default: Any) -> Any:
    """A sampling parameter, its default when absent or null (SGLang treats null as unset)."""
    value = params.get(key)
    return default if value is None else value
