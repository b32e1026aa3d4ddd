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
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import requests
import torch

from trainer.rollout.base import GenerationOutput, GenerationRequest, RolloutEngine
from trainer.rollout.sglang_protocol import parse_generate_response, sampling_params_payload
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


def wait_for_health(url: str, timeout_s: float, process: subprocess.Popen | None = None, poll_s: float = 1.0) -> None:
    """Poll ``GET url/health`` until it answers 200; raise if the process exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    last = "no answer yet"
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server process exited with code {process.returncode} before {url} was healthy")
        try:
            response = requests.get(url.rstrip("/") + "/health", timeout=poll_s)
            if response.status_code == 200:
                return
            last = f"HTTP {response.status_code}"
        except (requests.ConnectionError, requests.Timeout) as error:
            last = type(error).__name__
        time.sleep(poll_s)
    raise TimeoutError(f"{url} was not healthy within {timeout_s:.0f}s (last: {last})")


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
            wait_for_health(self.url, self.startup_timeout_s, self.process)
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

    Requests run as concurrent ``async_generate`` calls, one per prompt (its think request, or its
    traces' forks of one ``n``): a single batch of every fork would make SGLang await each item's
    warm-up in turn. Weight sync
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
        # One call per routing key (a prompt: its think request, or one trace's forks) and n: SGLang
        # wants one n per batch and answers the n samples of each item consecutively.
        groups: dict[tuple, list[int]] = {}
        for i, request in enumerate(requests):
            prompt = request.routing_key if request.routing_key is not None else ("alone", i)
            groups.setdefault((prompt, request.n, request.priority), []).append(i)

        async def serve(items: list[int]) -> list[GenerationOutput]:
            n = requests[items[0]].n
            options = {"priority": requests[items[0]].priority} if self._takes_priority else {}
            payload = await self.engine.async_generate(
                input_ids=[list(requests[i].input_ids) for i in items],
                sampling_params=[sampling_params_payload(requests[i]) for i in items],
                **options,
            )
            payload = payload if isinstance(payload, list) else [payload]
            if len(payload) != n * len(items):
                raise RuntimeError(f"sglang.Engine returned {len(payload)} samples for {n * len(items)} requested")
            return [parse_generate_response(payload[k * n : (k + 1) * n], requests[i]) for k, i in enumerate(items)]

        async def serve_all():
            return await asyncio.gather(*(serve(items) for items in groups.values()))

        outputs: list[GenerationOutput | None] = [None] * len(requests)
        for items, served in zip(groups.values(), self._loop().run_until_complete(serve_all()), strict=True):
            for i, output in zip(items, served, strict=True):
                outputs[i] = output
        return outputs

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
        self.engine.flush_cache()

    def shutdown(self) -> None:
        self.engine.shutdown()


def _success(answer) -> tuple[bool, str]:
    """(success, message) of an ``sglang.Engine`` weight call (a tuple, or a bare truth value)."""
    return tuple(answer[:2]) if isinstance(answer, tuple) else (bool(answer), "")
