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

    Args:
        model_path: the policy checkpoint the engine starts from.
        tokenizer: the policy's tokenizer (delimiter ids and EOS).
        engine_kwargs: further ``sglang.Engine`` server arguments.
    """

    def __init__(
        self, model_path: str | Path, tokenizer, *, eos_token_ids: Sequence[int] = (), **engine_kwargs
    ) -> None:
        _reject_reuse_killers((), engine_kwargs)
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
        self.engine = sglang.Engine(model_path=str(model_path), **options)

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationOutput]:
        if not requests:
            return []
        # SGLang wants one n per batch: serve the requests grouped by n. A batch answer lists the n
        # samples of each prompt consecutively, prompts in order.
        outputs: list[GenerationOutput | None] = [None] * len(requests)
        for n in sorted({r.n for r in requests}):
            group = [i for i, r in enumerate(requests) if r.n == n]
            payload = self.engine.generate(
                input_ids=[list(requests[i].input_ids) for i in group],
                sampling_params=[sampling_params_payload(requests[i]) for i in group],
            )
            if len(payload) != n * len(group):
                raise RuntimeError(f"sglang.Engine returned {len(payload)} samples for {n * len(group)} requested")
            for k, i in enumerate(group):
                outputs[i] = parse_generate_response(payload[k * n : (k + 1) * n], requests[i])
        return outputs

    def update_weights(self, model: torch.nn.Module) -> None:
        start = time.perf_counter()
        named = [(name, tensor.detach()) for name, tensor in model.state_dict().items()]
        self.engine.update_weights_from_tensor(named, flush_cache=True)
        self.flush_cache()
        self.stats.weight_sync_seconds += time.perf_counter() - start

    def flush_cache(self) -> None:
        self.engine.flush_cache()

    def shutdown(self) -> None:
        self.engine.shutdown()
