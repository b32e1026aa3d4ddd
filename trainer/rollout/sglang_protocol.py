"""SGLang's ``/generate`` wire format: request bodies and the parsing of responses.

Field names follow ``sglang.srt.managers.io_struct.GenerateReqInput`` and
``sglang.srt.sampling.sampling_params.SamplingParams``; a response is one dict per sample
(``output_ids``, ``meta_info`` with ``prompt_tokens``, ``completion_tokens``, ``cached_tokens``,
``finish_reason``), a single dict for one prompt with ``n == 1`` and a list otherwise. The
returned ``output_ids`` keep the matched stop token (SGLang trims stops from ``text`` only).
Shared by the HTTP client, the in-process ``sglang.Engine`` variant and the protocol test server.
"""

from __future__ import annotations

import dataclasses
import struct
import zlib
from collections.abc import Callable, Sequence
from typing import Any

from trainer.rollout.base import GenerationOutput, GenerationRequest


class MalformedResponse(ValueError):
    """The server answered, but not in SGLang's response layout."""


class AbortedRequest(MalformedResponse):
    """The server aborted the request: HTTP 200 with ``finish_reason.type == "abort"``, SGLang's
    answer to a request it dropped without an error status (e.g. from its waiting queue, on a weight
    update or a client abort; aborts that carry a status code of 400 or more come as HTTP errors)."""


def sampling_params_payload(request: GenerationRequest) -> dict[str, Any]:
    """SGLang ``sampling_params`` of a request.

    ``top_k``, ``min_p`` and ``repetition_penalty`` are always sent: a server's preferred sampling
    parameters (from the model's generation config) fill the keys a request leaves unset, and the
    learner scores the plain ``softmax(logits / T)`` (top-p aside). ``sampling_seed`` is sent only
    for ``n == 1``: under deterministic inference one seed makes all ``n`` samples identical (the
    engines split such requests, see ``deterministic_parts``), and elsewhere SGLang ignores it. It is
    the request's seed mixed with its input ids (``request_seed``): SGLang draws a seeded sample's
    random numbers from the seed and the position alone, so requests for different prompts sharing
    one seed (an evaluation's) would make the same draws, correlated across problems.
    """
    params: dict[str, Any] = {
        "n": request.n,
        "max_new_tokens": request.max_new_tokens,
        "stop_token_ids": list(request.stop_token_ids),
        "temperature": request.sampling.temperature,
        "top_p": request.sampling.top_p,
        "top_k": -1,
        "min_p": 0.0,
        "repetition_penalty": 1.0,
    }
    if request.sampling.min_new_tokens > 0:
        # Only when asked: SGLang refuses any min_new_tokens > 0 (HTTP 400) on a server started with
        # --skip-tokenizer-init, as launch_server_cmd starts it. It refuses min_new_tokens above
        # max_new_tokens too, which the phases' shared sampling settings give a summary: no stop
        # within min_new_tokens is no stop within max_new_tokens then.
        params["min_new_tokens"] = min(request.sampling.min_new_tokens, request.max_new_tokens)
    if request.sampling.seed is not None and request.n == 1:
        params["sampling_seed"] = request_seed(request.sampling.seed, request.input_ids)
    return params


def request_seed(seed: int, input_ids: Sequence[int]) -> int:
    """``seed`` mixed with the request's input ids, deterministically (a CRC of the ids), in [0, 2^31)."""
    digest = zlib.crc32(struct.pack(f"<{len(input_ids)}q", *input_ids))
    return (seed * 2_654_435_761 + digest) % 2**31


def generate_payload(request: GenerationRequest, dp_size: int = 1) -> dict[str, Any]:
    """Body of ``POST /generate``. No input log-probs are asked for: they cap prefix reuse.

    With ``dp_size > 1`` the request names its data-parallel replica (``routed_dp_rank``, from its
    routing key): SGLang's controller balances unrouted requests round-robin, which would send a
    trace's summary forks to replicas that do not hold its KV cache.
    """
    body: dict[str, Any] = {
        "input_ids": list(request.input_ids),
        "sampling_params": sampling_params_payload(request),
        "return_logprob": False,
        "stream": False,
        "priority": request.priority,
    }
    if dp_size > 1 and request.routing_key is not None:
        body["routed_dp_rank"] = request.routing_key % dp_size
    return body


def batch_payload(requests: list[GenerationRequest], dp_size: int = 1) -> dict[str, Any]:
    """One ``POST /generate`` body for several requests of one prompt's forks: SGLang's batch form
    (lists of ``input_ids`` and ``sampling_params``). SGLang needs one ``n`` for all items, and one
    ``priority`` and ``routed_dp_rank`` per body, so the requests must share them."""
    if len({r.n for r in requests}) != 1 or len({(r.priority, r.routing_key) for r in requests}) != 1:
        raise ValueError("a /generate batch needs items of one n, one priority and one routing key")
    body = generate_payload(requests[0], dp_size)
    body["input_ids"] = [list(r.input_ids) for r in requests]
    body["sampling_params"] = [sampling_params_payload(r) for r in requests]
    return body


def parse_batch_response(payload: Any, requests: list[GenerationRequest]) -> list[GenerationOutput]:
    """The outputs of a batch body: SGLang answers one list of samples, request-major
    (``n`` consecutive samples per item)."""
    n = requests[0].n
    if not isinstance(payload, list) or len(payload) != n * len(requests):
        got = len(payload) if isinstance(payload, list) else type(payload).__name__
        raise MalformedResponse(f"expected a list of {n * len(requests)} samples for a batch, got {got}")
    return [parse_generate_response(payload[i * n : (i + 1) * n], r) for i, r in enumerate(requests)]


def split_for_seeds(request: GenerationRequest) -> list[GenerationRequest]:
    """A seeded ``n > 1`` request as ``n`` requests of one sample with seeds ``seed + i`` (for servers
    in deterministic-inference mode, where one seed would give ``n`` identical samples)."""
    if request.sampling.seed is None or request.n == 1:
        return [request]
    return [
        dataclasses.replace(
            request, n=1, sampling=dataclasses.replace(request.sampling, seed=request.sampling.seed + i)
        )
        for i in range(request.n)
    ]


def deterministic_parts(request: GenerationRequest, fresh_seed: Callable[[], int]) -> list[GenerationRequest]:
    """What to send a server in deterministic-inference mode for ``request``: one seeded request per
    sample. Such a server seeds an unseeded request with 42 and draws from (seed, position) alone, so
    the ``n`` samples of one request, or the unseeded requests of one prompt, would all be the same
    sample; an unseeded request takes its seed from ``fresh_seed()``."""
    if request.sampling.seed is None:
        request = dataclasses.replace(request, sampling=dataclasses.replace(request.sampling, seed=fresh_seed()))
    return split_for_seeds(request)


def parse_generate_response(payload: Any, request: GenerationRequest) -> GenerationOutput:
    """The ``n`` samples of ``request`` from a decoded ``/generate`` response."""
    samples = payload if isinstance(payload, list) else [payload]
    if len(samples) != request.n:
        raise MalformedResponse(f"expected {request.n} samples in the response, got {len(samples)}")
    output_ids, reasons, cached = [], [], []
    prompt_tokens = len(request.input_ids)
    for i, sample in enumerate(samples):
        # An abort's meta_info carries only id, finish_reason and timing (no token counts): look first.
        meta = sample.get("meta_info") if isinstance(sample, dict) else None
        finish = meta.get("finish_reason") if isinstance(meta, dict) else None
        if isinstance(finish, dict) and finish.get("type") == "abort":
            raise AbortedRequest(f"sample {i}: the server aborted the request ({finish.get('message', 'no message')})")
        try:
            ids = [int(t) for t in sample["output_ids"]]
            meta = sample["meta_info"]
            finish = meta["finish_reason"]
            cached.append(int(meta["cached_tokens"]))
            reported_prompt = int(meta["prompt_tokens"])
        except (KeyError, TypeError, ValueError, AttributeError) as error:
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
        # Once per request: the n samples share one prefill. (For n > 1 SGLang reports
        # prompt_len - 1 cached tokens per sample whatever it computed; the counters tell.)
        prefilled_tokens=prompt_tokens - min(cached),
    )


def merge_outputs(outputs: list[GenerationOutput]) -> GenerationOutput:
    """One output of the one-sample outputs of a split request (their prefill counted once each)."""
    return GenerationOutput(
        output_ids=[ids for out in outputs for ids in out.output_ids],
        finish_reasons=[reason for out in outputs for reason in out.finish_reasons],
        prompt_tokens=outputs[0].prompt_tokens,
        cached_tokens=[cached for out in outputs for cached in out.cached_tokens],
        prefilled_tokens=sum(out.prefilled_tokens for out in outputs),
    )


def response_samples(output: GenerationOutput, request: GenerationRequest, rid: str, text=None) -> list[dict]:
    """SGLang's per-sample response dicts for ``output`` (the protocol server's side).

    As SGLang does for ``n > 1`` (a hidden prefill-only request first, then every copy reads the
    prompt from cache), each sample reports ``cached_tokens = prompt_len - 1``.
    """
    samples = []
    reported = output.cached_tokens if request.n == 1 else [output.prompt_tokens - 1] * request.n
    for i, (ids, reason, cached) in enumerate(zip(output.output_ids, output.finish_reasons, reported, strict=True)):
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
