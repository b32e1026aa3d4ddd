"""Talking to an SGLang server: one HTTP call with retries, what the server tells about itself,
and the requests it refuses or silently trims.

The facts come from ``GET /server_info`` (``/get_server_info`` on servers that predate it: the
resolved launch arguments and the scheduler's ``max_req_input_len``) and ``GET /v1/models`` (its
``max_model_len`` is the model's ``context_len``, which ``/server_info`` names only when
``--context-length`` was given). The rules are SGLang 0.5.23's:

- a request whose prompt + ``max_new_tokens`` exceeds ``context_len`` is answered 400;
- the scheduler then caps ``max_new_tokens`` at ``context_len - 2 - prompt`` (it keeps one token
  of the context, and one more for the last sampled token), so a request within
  ``context_len - 2`` is served as asked and one of ``context_len - 1`` or ``context_len`` tokens
  comes back shorter than asked, without a word;
- a prompt of ``max_req_input_len`` tokens or more is answered 400;
- ``routed_dp_rank`` outside ``[0, dp_size)`` is answered 400;
- ``min_new_tokens > 0`` on a server started with ``--skip-tokenizer-init`` is answered 400;
- under ``--enable-deterministic-inference`` a request without ``sampling_seed`` is seeded with 42,
  and a sample's random numbers depend on its seed and position alone: the ``n`` samples of one
  request are identical.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import requests

from trainer.rollout.base import GenerationRequest

logger = logging.getLogger(__name__)

# Tokens of its context_len that SGLang's scheduler never gives a request (see above).
CONTEXT_RESERVE = 2


class SGLangServerError(RuntimeError):
    """A server request failed for good (after the retries, or with a 4xx answer); ``status`` is the
    HTTP status of the last answer, None when there was none (a timeout, a dropped connection)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def http_call(
    session: requests.Session,
    url: str,
    path: str,
    method: str,
    body: dict | None,
    *,
    timeout: tuple[float, float],
    attempts: int,
    backoff_s: float,
) -> requests.Response:
    """One HTTP call, tried ``attempts`` times with exponential backoff after connection errors,
    timeouts and 5xx/408/429 answers; returns a 2xx/3xx response, raises :class:`SGLangServerError`
    (at once on any other 4xx: the server refused the request)."""
    status = None
    for attempt in range(attempts):
        try:
            response = session.request(method, url + path, json=body, timeout=timeout)
        except (requests.ConnectionError, requests.Timeout) as error:
            failure, status = f"{type(error).__name__}: {error}", None
        else:
            status = response.status_code
            if status < 400:
                return response
            if status < 500 and status not in (408, 429):
                raise SGLangServerError(f"{method} {url}{path} answered {status}: {response.text[:500]}", status)
            failure = f"HTTP {status}: {response.text[:200]}"
        if attempt + 1 < attempts:
            wait = backoff_s * 2**attempt
            logger.warning("%s %s%s failed (%s); retry %d/%d in %.2fs", method, url, path, failure, attempt + 1,
                           attempts - 1, wait)  # fmt: skip
            time.sleep(wait)
    raise SGLangServerError(
        f"{method} {url}{path} failed after {attempts} attempt{'s' * (attempts != 1)}; last error: {failure}",
        status,
    )


@dataclass(frozen=True)
class ServerInfo:
    """One server's limits and modes; None where the server did not say (a router, an old server)."""

    url: str
    context_len: int | None = None
    max_input_len: int | None = None
    dp_size: int | None = None
    deterministic: bool | None = None
    skips_tokenizer: bool | None = None

    @property
    def request_tokens(self) -> int | None:
        """Most prompt + new tokens of a request the server serves as asked."""
        return None if self.context_len is None else self.context_len - CONTEXT_RESERVE


def read_server_info(
    urls: Sequence[str],
    *,
    timeout_s: float = 60.0,
    connect_timeout_s: float = 10.0,
    max_retries: int = 4,
    backoff_s: float = 1.0,
    session: requests.Session | None = None,
) -> list[ServerInfo]:
    """The facts of every server (a URL listed twice is one server)."""
    session = session or requests.Session()
    servers = []
    for url in dict.fromkeys(url.rstrip("/") for url in urls):

        def get_json(path: str, url: str = url) -> Any:
            """The decoded answer to ``GET url/path``; None on a 404 (an endpoint this server lacks)."""
            try:
                response = http_call(session, url, path, "GET", None, timeout=(connect_timeout_s, timeout_s),
                                     attempts=max_retries + 1, backoff_s=backoff_s)  # fmt: skip
            except SGLangServerError as error:
                if error.status == 404:
                    return None
                raise
            try:
                return response.json()
            except ValueError as error:
                raise SGLangServerError(f"GET {url}{path} answered a body that is not JSON: {error}") from error

        servers.append(_server_info(url, get_json))
        if servers[-1].context_len is None:
            logger.warning("%s names no context length (not an SGLang server?): requests are not checked "
                           "against it", url)  # fmt: skip
    return servers


def request_token_limit(urls: Sequence[str], **options) -> int | None:
    """The most prompt + new tokens every server serves as asked (None: no server names its context);
    ``options`` as :func:`read_server_info`'s."""
    limits = [info.request_tokens for info in read_server_info(urls, **options) if info.request_tokens is not None]
    return min(limits, default=None)


def _server_info(url: str, get_json: Callable[[str], Any]) -> ServerInfo:
    info = get_json("/server_info")
    if info is None:
        info = get_json("/get_server_info")
    info = info if isinstance(info, dict) else {}
    models = get_json("/v1/models")
    cards = models.get("data") if isinstance(models, dict) else None
    context = cards[0].get("max_model_len") if cards and isinstance(cards[0], dict) else None
    if context is None:
        context = info.get("context_length")
    return ServerInfo(
        url=url,
        context_len=_optional(context, int),
        max_input_len=_optional(info.get("max_req_input_len"), int),
        dp_size=_optional(info.get("dp_size"), int),
        deterministic=_optional(info.get("enable_deterministic_inference"), bool),
        skips_tokenizer=_optional(info.get("skip_tokenizer_init"), bool),
    )


def _optional(value: Any, kind: type) -> Any:
    return None if value is None else kind(value)


def check_dp_size(servers: Sequence[ServerInfo], dp_size: int) -> None:
    """Refuse a client ``dp_size`` other than a server's ``--dp-size``: larger, and requests name
    replicas the server does not have (HTTP 400); smaller, and the server balances a trace's forks
    over replicas that do not hold its cache."""
    for server in servers:
        if server.dp_size is not None and server.dp_size != dp_size:
            raise ValueError(
                f"rollout.dp_size={dp_size}, but {server.url} runs {server.dp_size} data-parallel replica(s) "
                f"(--dp-size {server.dp_size}): set rollout.dp_size={server.dp_size}"
            )


def check_request(request: GenerationRequest, server: ServerInfo) -> None:
    """Raise ValueError, before anything is sent, for a request ``server`` would refuse or cut short."""
    prompt = len(request.input_ids)
    if server.request_tokens is not None and prompt + request.max_new_tokens > server.request_tokens:
        raise ValueError(
            f"a request of {prompt} prompt + {request.max_new_tokens} new tokens does not fit {server.url}: its "
            f"context_len is {server.context_len}, and SGLang serves at most context_len - {CONTEXT_RESERVE} = "
            f"{server.request_tokens} tokens per request as asked (more is refused, or cut short); lower "
            "data.max_prompt_tokens or method.b_max, or start the server with a larger --context-length"
        )
    if server.max_input_len is not None and prompt >= server.max_input_len:
        raise ValueError(
            f"a prompt of {prompt} tokens is refused by {server.url}, which takes prompts of fewer than "
            f"{server.max_input_len} tokens (max_req_input_len)"
        )
    if server.skips_tokenizer and request.sampling.min_new_tokens > 0:
        raise ValueError(
            f"min_new_tokens={request.sampling.min_new_tokens}: {server.url} runs with --skip-tokenizer-init, and "
            "SGLang refuses min_new_tokens > 0 without its tokenizer; sample without it, or start the server "
            "without --skip-tokenizer-init"
        )
