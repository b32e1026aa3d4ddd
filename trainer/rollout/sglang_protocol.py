"""SGLang's ``/generate`` wire format: request bodies and the parsing of responses.

Field names follow ``sglang.srt.managers.io_struct.GenerateReqInput`` and
``sglang.srt.sampling.sampling_params.SamplingParams``; a response is one dict per sample
(``output_ids``, ``meta_info`` with ``prompt_tokens``, ``completion_tokens``, ``cached_tokens``,
``finish_reason``), a single dict for one prompt with ``n == 1`` and a list otherwise. The
returned ``output_ids`` keep the matched stop token (SGLang trims stops from ``text`` only).
Shared by the HTTP client, the in-process ``sglang.Engine`` variant and the protocol test server.
"""

from __future__ import annotations

from typing import Any

from trainer.rollout.base import GenerationOutput, GenerationRequest


class MalformedResponse(ValueError):
    """The server answered, but not in SGLang's response layout."""


def sampling_params_payload(request: GenerationRequest) -> dict[str, Any]:
    """SGLang ``sampling_params`` of a request."""
    params: dict[str, Any] = {
        "n": request.n,
        "max_new_tokens": request.max_new_tokens,
        "stop_token_ids": list(request.stop_token_ids),
        "temperature": request.sampling.temperature,
        "top_p": request.sampling.top_p,
        "min_new_tokens": request.sampling.min_new_tokens,
    }
    if request.sampling.seed is not None:
        params["sampling_seed"] = request.sampling.seed
    return params


def generate_payload(request: GenerationRequest) -> dict[str, Any]:
    """Body of ``POST /generate``. No input log-probs are asked for: they cap prefix reuse."""
    return {
        "input_ids": list(request.input_ids),
        "sampling_params": sampling_params_payload(request),
        "return_logprob": False,
        "stream": False,
    }


def parse_generate_response(payload: Any, request: GenerationRequest) -> GenerationOutput:
    """The ``n`` samples of ``request`` from a decoded ``/generate`` response."""
    samples = payload if isinstance(payload, list) else [payload]
    if len(samples) != request.n:
        raise MalformedResponse(f"expected {request.n} samples in the response, got {len(samples)}")
    output_ids, reasons, cached = [], [], []
    prompt_tokens = len(request.input_ids)
    for i, sample in enumerate(samples):
        try:
            ids = [int(t) for t in sample["output_ids"]]
            meta = sample["meta_info"]
            finish = meta["finish_reason"]
            cached.append(int(meta["cached_tokens"]))
            reported_prompt = int(meta["prompt_tokens"])
        except (KeyError, TypeError, ValueError) as error:
            raise MalformedResponse(f"sample {i} lacks SGLang's output_ids/meta_info fields: {error!r}") from error
        if reported_prompt != prompt_tokens:
            raise MalformedResponse(f"sample {i}: server counted {reported_prompt} prompt tokens, sent {prompt_tokens}")
        reason = finish.get("type") if isinstance(finish, dict) else None
        if reason not in ("stop", "length"):
            raise MalformedResponse(f"sample {i}: unfinished or aborted generation, finish_reason={finish!r}")
        output_ids.append(ids)
        reasons.append(reason)
    return GenerationOutput(
        output_ids=output_ids,
        finish_reasons=reasons,
        prompt_tokens=prompt_tokens,
        cached_tokens=cached,
        prefilled_tokens=sum(prompt_tokens - c for c in cached),
    )


def response_samples(output: GenerationOutput, request: GenerationRequest, rid: str, text=None) -> list[dict]:
    """SGLang's per-sample response dicts for ``output`` (the protocol server's side)."""
    samples = []
    for i, (ids, reason, cached) in enumerate(
        zip(output.output_ids, output.finish_reasons, output.cached_tokens, strict=True)
    ):
        finish = {"type": "stop", "matched": ids[-1]} if reason == "stop" else {"type": "length", "length": len(ids)}
        sample = {
            "output_ids": ids,
            "meta_info": {
                "id": f"{rid}-{i}" if request.n > 1 else rid,
                "finish_reason": finish,
                "prompt_tokens": output.prompt_tokens,
                "completion_tokens": len(ids),
                "cached_tokens": cached,
            },
        }
        if text is not None:
            sample["text"] = text(ids)
        samples.append(sample)
    return samples
