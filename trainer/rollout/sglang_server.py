"""Starting SGLang: a local ``sglang.launch_server`` subprocess, and the in-process ``sglang.Engine``.

The server flags this workload wants: the radix cache stays on (SGLang's default; summary forks
depend on it), longest-prefix-match scheduling (``--schedule-policy lpm``) so forks of one trace
run while it is cached, priority eviction (``--radix-eviction-policy priority``: traces are sent
with a higher request priority than their forks, so a fork's output is evicted before a trace
other forks still need), ``--enable-metrics`` (the prefill counters the phase statistics read) and
``--skip-tokenizer-init`` (the trainer sends and reads token ids).
``sglang`` is imported only by :class:`SGLangInProcessEngine`.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import random
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import requests
import torch

from trainer.rollout.base import GenerationOutput, GenerationRequest, RolloutEngine
from trainer.rollout.sglang_protocol import (
    deterministic_parts,
    merge_outputs,
    parse_generate_response,
    sampling_params_payload,
)
from trainer.rollout.weight_transfer import weight_buckets

logger = logging.getLogger(__name__)


# Settings that silently kill the prefix reuse the summary forks depend on.
_REUSE_KILLERS = {"--disable-radix-cache": "disable_radix_cache", "--strip-thinking-cache": "strip_thinking_cache"}


def _reject_reuse_killers(arguments: Sequence[str], keywords: dict) -> None:
    for flag, keyword in _REUSE_KILLERS.items():
        if any(arg == flag or arg.startswith(flag + "=") for arg in arguments) or keywords.get(keyword):
            raise ValueError(
                f"{flag} ({keyword}) turns off the radix-cache reuse of the thinking prefix that every summary "
                "fork relies on: each fork would re-prefill its whole trace. Remove it."
            )


def sglang_server_command(
    model_path: str | Path,
    port: int,
    *,
    host: str = "127.0.0.1",
    dp_size: int = 1,
    mem_fraction_static: float | None = None,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """The ``python -m sglang.launch_server`` command line for rollouts."""
    if not 0 < port < 65536:
        raise ValueError(f"port must be in 1..65535, got {port}")
    if dp_size < 1:
        raise ValueError(f"dp_size must be >= 1, got {dp_size}")
    _reject_reuse_killers(extra_args, {})
    command = [
        sys.executable,
        "-m",
        "sglang.launch_server",
        "--model-path",
        str(model_path),
        "--host",
        host,
        "--port",
        str(port),
        "--schedule-policy",
        "lpm",
        "--radix-eviction-policy",
        "priority",
        "--enable-metrics",
        "--skip-tokenizer-init",
        "--dp-size",
        str(dp_size),
    ]
    if mem_fraction_static is not None:
        command += ["--mem-fraction-static", str(mem_fraction_static)]
    return command + list(extra_args)


# SGLang's /health answers only once a one-token generation came back, checking each second for up
# to 20 s (SGLANG_HEALTH_CHECK_TIMEOUT): a poll of it must wait longer than that.
HEALTH_CHECK_WAIT_S = 25.0


def wait_until_ready(url: str, timeout_s: float, process: subprocess.Popen | None = None, poll_s: float = 1.0) -> None:
    """Poll ``GET url/ready`` (SGLang answers at once: 200 once warmed up, 503 before) until it
    answers 200; a server without ``/ready`` (404) is polled on ``/health``, each poll given
    ``HEALTH_CHECK_WAIT_S``. Raise if the process exits or ``timeout_s`` runs out."""
    deadline = time.monotonic() + timeout_s
    url, path, read_timeout = url.rstrip("/"), "/ready", poll_s
    last = "no answer yet"
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server process exited with code {process.returncode} before {url} was ready")
        try:
            remaining = max(deadline - time.monotonic(), 0.01)
            response = requests.get(url + path, timeout=(poll_s, min(read_timeout, remaining)))
            if response.status_code == 200:
                return
            if response.status_code == 404 and path == "/ready":  # an SGLang without /ready
                path, read_timeout = "/health", HEALTH_CHECK_WAIT_S
                continue
            last = f"{path}: HTTP {response.status_code}"
        except (requests.ConnectionError, requests.Timeout) as error:
            last = f"{path}: {type(error).__name__}"
        time.sleep(poll_s)
    raise TimeoutError(f"{url} was not ready within {timeout_s:.0f}s (last: {last})")


class SGLangServerProcess:
    """A local ``sglang.launch_server`` subprocess; ``with SGLangServerProcess(...) as server:``."""

    def __init__(
        self,
        model_path: str | Path,
        port: int = 30000,
        *,
        dp_size: int = 1,
        mem_fraction_static: float | None = None,
        extra_args: Sequence[str] = (),
        startup_timeout_s: float = 900.0,
        log_path: str | Path | None = None,
    ) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.command = sglang_server_command(
            model_path, port, dp_size=dp_size, mem_fraction_static=mem_fraction_static, extra_args=extra_args
        )
        self.startup_timeout_s = startup_timeout_s
        self.log_path = Path(log_path) if log_path is not None else None
        self.process: subprocess.Popen | None = None

    def start(self) -> SGLangServerProcess:
        log = open(self.log_path, "ab") if self.log_path is not None else subprocess.DEVNULL  # noqa: SIM115
        logger.info("starting %s", " ".join(self.command))
        self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_until_ready(self.url, self.startup_timeout_s, self.process)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> SGLangServerProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class SGLangInProcessEngine(RolloutEngine):
    """``sglang.Engine`` in this process, for colocated training (weights synced from tensors).

    Requests run as concurrent ``async_generate`` calls: one per request of several samples (SGLang
    awaits the prefill warm-up of each ``n > 1`` item of a call in turn before any sample), one per
    prompt for its one-sample requests. With ``enable_deterministic_inference`` every request goes as
    one seeded request per sample (SGLang would give the samples of one seed the same draws). Weight sync
    sends the state dict in buckets of at most ``weight_bucket_mb`` MiB through
    ``update_weights_from_tensor`` (the cache is flushed with the last bucket only) and raises
    when SGLang reports a failure. With ``colocate=True`` the engine starts with
    ``enable_memory_saver`` and :meth:`release_memory` frees its weights and KV cache on the GPU
    while the learner trains; the next weight sync takes them back first.

    Args:
        model_path: the policy checkpoint the engine starts from.
        tokenizer: the policy's tokenizer (delimiter ids and EOS).
        colocate: share the GPU with the learner (memory saver; release around the update).
        weight_bucket_mb: most MiB of tensors per ``update_weights_from_tensor`` call.
        engine_kwargs: further ``sglang.Engine`` server arguments (``dp_size`` must stay 1 here:
            SGLang's weight updates from tensors assert it; run servers and :class:`SGLangEngine`
            instead). The engine skips tokenizer init unless ``skip_tokenizer_init=False``, and SGLang
            then refuses ``min_new_tokens > 0``: such requests raise here before any is sent.
    """

    def __init__(
        self,
        model_path: str | Path,
        tokenizer,
        *,
        eos_token_ids: Sequence[int] = (),
        colocate: bool = False,
        weight_bucket_mb: float = 512.0,
        **engine_kwargs,
    ) -> None:
        _reject_reuse_killers((), engine_kwargs)
        if int(engine_kwargs.get("dp_size", 1)) != 1:
            raise ValueError(
                f"dp_size={engine_kwargs['dp_size']}: sglang.Engine in this process serves one data-parallel "
                "replica; start servers with --dp-size and use SGLangEngine (rollout.engine sglang) instead"
            )
        if weight_bucket_mb <= 0:
            raise ValueError(f"weight_bucket_mb must be > 0, got {weight_bucket_mb}")
        try:
            import sglang
        except ImportError as error:
            raise ImportError(
                "SGLangInProcessEngine needs the sglang package (pip install 'anytime-kernels[sglang]', "
                "CUDA machines only); use EmbeddedEngine or SGLangEngine with a server URL instead"
            ) from error
        super().__init__(*self.tokenizer_setup(tokenizer), eos_token_ids=eos_token_ids)
        options = {"schedule_policy": "lpm", "radix_eviction_policy": "priority", "skip_tokenizer_init": True,
                   **engine_kwargs}  # fmt: skip
        if colocate:
            options["enable_memory_saver"] = True
        self.colocate = colocate
        self.weight_bucket_bytes = int(weight_bucket_mb * 2**20)
        self.released = False
        self.skips_tokenizer = bool(options["skip_tokenizer_init"])
        self.deterministic = bool(options.get("enable_deterministic_inference", False))
        self._seeds = random.Random()
        self.engine = sglang.Engine(model_path=str(model_path), **options)
        self._takes_priority = "priority" in inspect.signature(self.engine.async_generate).parameters

    def _loop(self) -> asyncio.AbstractEventLoop:
        # sglang.Engine runs its tokenizer manager on the thread's event loop (its own generate does
        # the same run_until_complete).
        try:
            return asyncio.get_event_loop()
        except RuntimeError:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            return loop

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationOutput]:
        if not requests:
            return []
        if self.released:
            raise RuntimeError("the engine's memory is released (colocated training); sync weights first")
        if self.skips_tokenizer and any(request.sampling.min_new_tokens > 0 for request in requests):
            asked = max(request.sampling.min_new_tokens for request in requests)
            raise ValueError(
                f"min_new_tokens={asked}: SGLang refuses min_new_tokens > 0 without its tokenizer; start the "
                "engine with skip_tokenizer_init=False to use it"
            )
        sent = [deterministic_parts(r, self._fresh_seed) if self.deterministic else [r] for r in requests]
        parts = [part for request_parts in sent for part in request_parts]
        # One call per request of several samples, one per routing key (a prompt) and priority for
        # the others; SGLang answers the n samples of each item of a call consecutively.
        groups: dict[tuple, list[int]] = {}
        for k, part in enumerate(parts):
            prompt = part.routing_key if part.routing_key is not None else ("alone", k)
            groups.setdefault((prompt, part.priority) if part.n == 1 else ("several", k), []).append(k)

        async def serve(items: list[int]) -> list[GenerationOutput]:
            n = parts[items[0]].n
            options = {"priority": parts[items[0]].priority} if self._takes_priority else {}
            payload = await self.engine.async_generate(
                input_ids=[list(parts[k].input_ids) for k in items],
                sampling_params=[sampling_params_payload(parts[k]) for k in items],
                **options,
            )
            payload = payload if isinstance(payload, list) else [payload]
            if len(payload) != n * len(items):
                raise RuntimeError(f"sglang.Engine returned {len(payload)} samples for {n * len(items)} requested")
            return [parse_generate_response(payload[j * n : (j + 1) * n], parts[k]) for j, k in enumerate(items)]

        async def serve_all():
            return await asyncio.gather(*(serve(items) for items in groups.values()))

        served: list[GenerationOutput | None] = [None] * len(parts)
        for items, outputs in zip(groups.values(), self._loop().run_until_complete(serve_all()), strict=True):
            for k, output in zip(items, outputs, strict=True):
                served[k] = output
        merged, start = [], 0
        for request_parts in sent:
            own = served[start : start + len(request_parts)]
            merged.append(own[0] if len(own) == 1 else merge_outputs(own))
            start += len(request_parts)
        return merged

    def _fresh_seed(self) -> int:
        return self._seeds.randrange(2**31)

    def release_memory(self) -> None:
        """Free the engine's weights and KV cache on the GPU (colocated: before the learner trains)."""
        if self.colocate and not self.released:
            self.engine.release_memory_occupation()
            self.released = True

    def update_weights(self, model: torch.nn.Module) -> None:
        start = time.perf_counter()
        if self.released:
            self.engine.resume_memory_occupation()
            self.released = False
        buckets = weight_buckets(model.state_dict(), self.weight_bucket_bytes)
        with self._weight_update_session():
            for k, bucket in enumerate(buckets):
                answer = self.engine.update_weights_from_tensor(bucket, flush_cache=k == len(buckets) - 1)
                success, message = _success(answer)
                if not success:
                    names = f"{bucket[0][0]} .. {bucket[-1][0]}"
                    raise RuntimeError(
                        f"sglang.Engine rejected weight bucket {k + 1}/{len(buckets)} ({names}): {message}"
                    )
        self.stats.weight_sync_seconds += time.perf_counter() - start

    @contextlib.contextmanager
    def _weight_update_session(self):
        """``begin_weight_update`` .. ``end_weight_update`` around the buckets: recent SGLang refuses
        ``update_weights_from_tensor`` outside a session; older engines have neither call."""
        begin = getattr(self.engine, "begin_weight_update", None)
        if begin is None:
            yield
            return
        success, message = _success(begin())
        if not success:
            raise RuntimeError(f"sglang.Engine could not open a weight-update session: {message}")
        try:
            yield
        finally:
            success, message = _success(self.engine.end_weight_update())
            if not success and sys.exc_info()[0] is None:
                raise RuntimeError(f"sglang.Engine could not close the weight-update session: {message}")

    def flush_cache(self) -> None:
        """Empty the radix cache; SGLang refuses (``success=False``) while requests run or wait, and
        ``sglang.Engine.flush_cache`` does not wait for them: raise then."""
        success, message = _success(self.engine.flush_cache())
        if not success:
            raise RuntimeError(
                f"sglang.Engine did not flush its cache ({message or 'requests were running or waiting'}); "
                "flush once no request is in flight"
            )

    def shutdown(self) -> None:
        self.engine.shutdown()


def _success(answer) -> tuple[bool, str]:
    """(success, message) of an ``sglang.Engine`` call: a tuple, an output record with ``success``
    and ``message`` (``flush_cache``'s), or a bare truth value."""
    if isinstance(answer, tuple):
        return bool(answer[0]), str(answer[1]) if len(answer) > 1 else ""
    if hasattr(answer, "success"):
        return bool(answer.success), str(getattr(answer, "message", "") or "")
    return bool(answer), ""
