"""Testing only: a small HTTP server that speaks SGLang's protocol in front of the embedded engine.

Not part of ``trainer.rollout``'s exports: tests, benchmarks and the CPU demo import it from here.

It serves ``/init_weights_update_group``, ``/begin_weight_update``, ``/update_weights_from_distributed``,
``/end_weight_update`` (loads only inside a session, as SGLang 0.5.23; ``weight_update_sessions=False``
is an older server), ``/generate`` (``input_ids``, ``sampling_params`` with every key of SGLang's,
``priority``, ``routed_dp_rank``), ``/flush_cache``, ``/update_weights_from_disk``,
``/model_info``, ``/server_info``, ``/v1/models``, ``/ready`` and ``/health`` with the JSON fields
of ``sglang.launch_server`` (``meta_info.cached_tokens`` included), so the SGLang client runs for
real over HTTP in tests and in the CPU demo. Binds 127.0.0.1 only.

It behaves as SGLang 0.5.23 does where the client depends on it: requests are served concurrently
(a scheduler thread batches every request waiting when it is free, as SGLang's continuous batching
admits them); a ``/generate`` body is read by SGLang's rules (``trainer.rollout.testing_rules``:
400 for an unknown sampling key, a batch of mixed ``n``, a request past the context length, an
out-of-range ``routed_dp_rank``, ``min_new_tokens`` on a server without its tokenizer; new tokens
capped at the context less 2); each ``n > 1`` item of a body first waits for a prefill warm-up of
its own, one after another; a bounded cache (the engine's ``kv_budget_tokens``) evicts by priority
then LRU, and keeps a finished request's prompt at its priority + 1; with ``deterministic=True``
(``--enable-deterministic-inference``) an unseeded request is seeded with 42 and the samples of a
seed are one sample; ``/health`` answers after a second at least (SGLang's runs a generation),
``/ready`` at once; ``/flush_cache`` is refused (400) while requests run or wait (after waiting up
to ``?timeout=`` seconds for them); ``cached_tokens`` is ``prompt_len - 1`` for ``n > 1``; the
full EOS set stops every request. Without a ``tokenizer`` it is a server started with
``--skip-tokenizer-init`` (no ``text`` in answers).

Fault injection for tests: :meth:`ProtocolServer.inject_faults` queues faults that the next
``/generate`` requests meet, one each: ``"500"`` (an error status), ``"malformed"`` (a body that is
not JSON), ``"hang"`` (sleep ``hang_seconds`` before answering) and ``"drop"`` (close the
connection without an answer) and ``"abort"`` (HTTP 200 with every sample's
``finish_reason`` of type ``abort``, as SGLang answers a request it dropped).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from trainer.rollout.base import GenerationOutput, GenerationRequest, SamplingParams
from trainer.rollout.embedded import EmbeddedEngine
from trainer.rollout.sglang_protocol import response_samples
from trainer.rollout.testing_http import serve_http
from trainer.rollout.testing_rules import ServerSettings, parse_body

logger = logging.getLogger(__name__)

FAULTS = ("500", "malformed", "hang", "drop", "abort")
# The seed SGLang gives an unseeded request under --enable-deterministic-inference.
DETERMINISTIC_DEFAULT_SEED = 42


class ProtocolServer:
    """SGLang's endpoints over an :class:`EmbeddedEngine`; ``with ProtocolServer(engine) as server:``.

    Args:
        engine: serves the requests.
        tokenizer: decodes ``text`` into answers; None: a server started with ``--skip-tokenizer-init``.
        port: 0 for any free port.
        model_path: what ``/model_info`` names.
        weight_update_sessions: False: an SGLang before 0.5.23 (404 on the session calls).
        context_len: ``--context-length`` (None: the model config's ``max_position_embeddings``).
        dp_size: ``--dp-size``, the replicas a request may name (all served by the one engine).
        deterministic: ``--enable-deterministic-inference``.
        ready_route: False: an SGLang without ``/ready`` (404 there).
    """

    def __init__(
        self,
        engine: EmbeddedEngine,
        tokenizer=None,
        *,
        port: int = 0,
        model_path: str = "embedded",
        weight_update_sessions: bool = True,
        context_len: int | None = None,
        dp_size: int = 1,
        deterministic: bool = False,
        ready_route: bool = True,
    ):
        self.engine = engine
        self.context_length_arg = context_len
        self.settings = ServerSettings(
            context_len=int(context_len or engine.model.config.max_position_embeddings), dp_size=dp_size,
            skips_tokenizer=tokenizer is None, eos_token_ids=engine.eos_token_ids,
        )  # fmt: skip
        self.deterministic = deterministic
        self.ready_route = ready_route
        self.health_check_seconds = 1.0  # SGLang's /health checks for its generation's answer after 1 s
        # SGLang >= 0.5.23 loads weights from a process group only inside /begin_weight_update ..
        # /end_weight_update; False: an older server, which answers 404 there.
        self.weight_update_sessions = weight_update_sessions
        self.session_open = False
        self.weight_events: list[tuple[str, str | None]] = []  # ("begin" | "bucket" | "end", weight_version)
        self.tokenizer = tokenizer
        self.model_path = model_path
        self.hang_seconds = 5.0
        self.weight_version = "default"
        self.generate_served = 0
        self.decoded_tokens = 0
        self.routed_dp_ranks: list[int] = []  # the routed_dp_rank of every /generate body that named one
        self.batches_served = 0  # scheduler rounds (engine.generate calls)
        self.warmup_rounds = 0  # prefill warm-ups of n > 1 items, each a scheduler round of its own
        self.serial_warmups = 0  # warm-ups that waited for an earlier item's of the same body
        # Prefill of the prompt re-inserts per priority, left out of /metrics (SGLang's costs nothing).
        self._hidden_prefill: dict[int, dict[str, float]] = {}
        self._top_priority = 0  # the highest request priority served so far
        self._faults: collections.deque[str] = collections.deque()
        self._fault_lock = threading.Lock()
        self._lock = threading.Lock()  # the engine: one generate, weight load or flush at a time
        self._queue: list[_Pending] = []
        self._busy = 0  # requests taken by the scheduler and not yet answered
        self._wakeup = threading.Condition()
        self._stopping = False
        self._scheduler: threading.Thread | None = None
        self._httpd = serve_http(self, port)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def inject_faults(self, faults: list[str]) -> None:
        unknown = [fault for fault in faults if fault not in FAULTS]
        if unknown:
            raise ValueError(f"unknown faults {unknown}; expected some of {FAULTS}")
        with self._fault_lock:
            self._faults.extend(faults)

    def next_fault(self) -> str | None:
        with self._fault_lock:
            return self._faults.popleft() if self._faults else None

    def start(self) -> ProtocolServer:
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="sglang-protocol-server", daemon=True)
        self._thread.start()
        self._scheduler = threading.Thread(target=self._schedule, name="sglang-protocol-scheduler", daemon=True)
        self._scheduler.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify_all()
        for thread in (self._thread, self._scheduler):
            if thread is not None:
                thread.join()

    def __enter__(self) -> ProtocolServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def idle(self) -> bool:
        """No request running or waiting (SGLang refuses /flush_cache otherwise)."""
        with self._wakeup:
            return not self._queue and not self._busy

    def flush_cache(self, timeout_s: float = 0.0) -> bool:
        """Empty the engine's cache once no request runs or waits, waiting up to ``timeout_s`` seconds
        for them (SGLang's ``/flush_cache?timeout=``); False: still busy, not flushed."""
        deadline = time.monotonic() + timeout_s
        while not self.idle and time.monotonic() < deadline:
            time.sleep(0.01)
        if not self.idle:
            return False
        with self._lock:
            self.engine.flush_cache()
        return True

    def generate(self, body: dict[str, Any]) -> Any:
        """Serve one ``/generate`` body (queued for the scheduler); raises ValueError on a bad request."""
        requests, single = self._parse(body)
        if requests[0].n > 1:
            # SGLang first prefills each n > 1 item alone (a warm-up of no new tokens), waiting for
            # each before the next, and only then sends the items' samples.
            for k in range(len(requests)):
                self._wait_for_round(_Pending([]))
                with self._wakeup:
                    self.warmup_rounds += 1
                    self.serial_warmups += int(k > 0)
        pending = self._wait_for_round(_Pending(requests))
        text = (lambda ids: self.tokenizer.decode(ids)) if self.tokenizer is not None else None
        samples = []
        for request, output in zip(requests, pending.outputs, strict=True):
            samples.extend(response_samples(output, request, uuid.uuid4().hex, text))
        for sample in samples:
            sample["meta_info"]["weight_version"] = self.weight_version
        return samples[0] if single and requests[0].n == 1 else samples

    def _parse(self, body: dict[str, Any]) -> tuple[list[GenerationRequest], bool]:
        requests, single = parse_body(body, self.settings)
        if body.get("routed_dp_rank") is not None:
            self.routed_dp_ranks.append(int(body["routed_dp_rank"]))
        return requests, single

    def _wait_for_round(self, pending: _Pending) -> _Pending:
        """Queue ``pending`` for the scheduler and wait until its round is over (no requests: a round
        of its own, as an SGLang warm-up waits for a scheduler step)."""
        with self._wakeup:
            self._queue.append(pending)
            self._wakeup.notify_all()
        pending.done.wait()
        if pending.error is not None:
            raise pending.error
        return pending

    def _schedule(self) -> None:
        """Serve every waiting request in one engine batch, then the ones that came meanwhile."""
        while True:
            with self._wakeup:
                while not self._queue and not self._stopping:
                    self._wakeup.wait()
                if self._stopping:
                    for pending in self._queue:
                        pending.fail(RuntimeError("the server stopped"))
                    return
                batch, self._queue = self._queue, []
                self._busy = len(batch)
            requests = [request for pending in batch for request in pending.requests]
            try:
                with self._lock:
                    outputs = self._serve(requests) if requests else []
                    self.batches_served += int(bool(requests))
                    self.generate_served += sum(1 for pending in batch if pending.requests)
                    self.decoded_tokens += sum(len(ids) for out in outputs for ids in out.output_ids)
            except Exception as error:  # answered as a 500 by the handler
                logger.exception("protocol server: generate failed")
                for pending in batch:
                    pending.fail(error)
            else:
                for pending in batch:
                    pending.outputs, outputs = outputs[: len(pending.requests)], outputs[len(pending.requests) :]
                    pending.done.set()
            finally:
                with self._wakeup:
                    self._busy = 0

    def _serve(self, requests: list[GenerationRequest]) -> list[GenerationOutput]:
        # Priorities decide only what a bounded cache keeps.
        reinserts = self._prompt_reinserts(requests) if self.engine.kv_budget_tokens is not None else []
        if self.deterministic:
            outputs = [self._serve_seeded(request) for request in requests]
            extra = self.engine.generate(reinserts)
        else:  # in the same engine call: their prefills meet the cache as the requests' own do
            outputs = self.engine.generate(requests + reinserts)
            outputs, extra = outputs[: len(requests)], outputs[len(requests) :]
        for reinsert, out in zip(reinserts, extra, strict=True):
            hidden = self._hidden_prefill.setdefault(reinsert.priority, {"prefill_compute": 0.0, "prefill_cache": 0.0})
            hidden["prefill_compute"] += out.prefilled_tokens
            hidden["prefill_cache"] += out.cached_tokens[0]
        return outputs

    def _serve_seeded(self, request: GenerationRequest) -> GenerationOutput:
        """Deterministic inference: one sample drawn from the request's seed (42 when it has none),
        as every one of its ``n`` samples (SGLang's draws depend on the seed and position alone)."""
        seed = DETERMINISTIC_DEFAULT_SEED if request.sampling.seed is None else request.sampling.seed
        one = dataclasses.replace(request, n=1, sampling=dataclasses.replace(request.sampling, seed=seed))
        out = self.engine.generate([one])[0]
        n = request.n
        return GenerationOutput(
            output_ids=[list(out.output_ids[0]) for _ in range(n)],
            finish_reasons=out.finish_reasons * n,
            prompt_tokens=out.prompt_tokens,
            cached_tokens=out.cached_tokens * n,
            prefilled_tokens=out.prefilled_tokens,
        )

    def _prompt_reinserts(self, requests: list[GenerationRequest]) -> list[GenerationRequest]:
        """SGLang inserts a finished request at its priority, then its prompt again at priority + 1
        (above the output). The engine stores whole sequences: the prompt goes in as a sequence of
        its own, by a one-token greedy request that stores exactly its input; its prefill is left out
        of ``/metrics``. In SGLang that prompt shares the output's memory; stored apart it takes
        budget of its own, which one above every priority in use would take from everything else
        while it only serves a later request for the very same prompt: those are left out."""
        self._top_priority = max([self._top_priority, *(request.priority for request in requests)])
        prompts = dict.fromkeys(
            (request.input_ids, request.priority + 1) for request in requests if request.priority < self._top_priority
        )
        plain = SamplingParams(temperature=0)
        return [
            GenerationRequest(ids, 1, 1, (), plain, cache_output=True, priority=priority) for ids, priority in prompts
        ]

    def server_info(self) -> dict[str, Any]:
        """``/server_info``: the resolved launch arguments the client reads, and the scheduler's limits."""
        return {
            "model_path": self.model_path,
            "context_length": self.context_length_arg,
            "dp_size": self.settings.dp_size,
            "enable_deterministic_inference": self.deterministic,
            "skip_tokenizer_init": self.settings.skips_tokenizer,
            "radix_eviction_policy": "priority",
            "max_req_input_len": self.settings.max_input_len,
            "max_total_num_tokens": self.engine.kv_budget_tokens or self.settings.context_len,
            "version": "0.5.23",
        }

    def models(self) -> dict[str, Any]:
        """``/v1/models``: the served model and its context length."""
        card = {"id": self.model_path, "object": "model", "owned_by": "sglang", "root": self.model_path,
                "max_model_len": self.settings.context_len}  # fmt: skip
        return {"object": "list", "data": [card]}

    def metrics_text(self) -> str:
        """``/metrics`` as a server started with ``--enable-metrics`` answers it (the counters the
        client reads): prompt tokens computed and served from the prefix cache, tokens decoded."""
        lines = ["# TYPE sglang:realtime_tokens_total counter"]
        priorities = self.engine.prefill_priorities() or [None]
        for priority in priorities:  # one series per request priority, as SGLang labels them
            counters = self.engine.prefill_counters(priority)
            hidden = self._hidden_prefill.get(priority, {})
            counters = {mode: value - hidden.get(mode, 0.0) for mode, value in counters.items()}
            labels = f'model_name="{self.model_path}",priority="{"" if priority is None else priority}"'
            for mode in ("prefill_compute", "prefill_cache"):
                lines.append(f'sglang:realtime_tokens_total{{{labels},mode="{mode}"}} {counters[mode]}')
        labels = f'model_name="{self.model_path}",priority=""'
        lines.append(f'sglang:realtime_tokens_total{{{labels},mode="decode"}} {float(self.decoded_tokens)}')
        return "\n".join(lines) + "\n"

    def update_weights_from_disk(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        files = sorted(Path(str(body.get("model_path", ""))).glob("*.safetensors"))
        if not files:
            return 400, {"success": False, "message": f"no *.safetensors in {body.get('model_path')!r}"}
        state = {}
        for file in files:
            state.update(load_file(str(file)))
        with self._lock:
            missing, unexpected = self.engine.model.load_state_dict(state, strict=False)
            # Tied embeddings are saved once; only a missing tied lm_head is acceptable.
            missing = [name for name in missing if name != "lm_head.weight"]
            if missing or unexpected:
                return 400, {"success": False, "message": f"missing {missing}, unexpected {unexpected}"}
            self.engine.flush_cache()
            self.weight_version = str(body.get("weight_version") or self.weight_version)
        return 200, {"success": True, "message": "Succeeded to update model weights.", "num_paused_requests": 0}

    def init_weights_update_group(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """Join the trainer's weight-update group as rank ``rank_offset`` (one rank: no tensor parallelism)."""
        from trainer.rollout.weight_transfer import init_weights_group

        try:
            self._weights_group = init_weights_group(
                body.get("backend", "gloo"), body["master_address"], int(body["master_port"]),
                int(body["world_size"]), int(body["rank_offset"]), body.get("group_name", "weight_update_group"),
            )  # fmt: skip
        except (KeyError, ValueError, RuntimeError) as error:
            return 400, {"success": False, "message": f"could not join the weight-update group: {error!r}"}
        return 200, {"success": True, "message": "Succeeded to initialize custom process group."}

    def begin_weight_update(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        if self.session_open:
            return 400, {"success": False, "message": "a weight-update session is already open; call end_weight_update() first"}  # fmt: skip
        self.session_open = True
        self.weight_events.append(("begin", None))
        return 200, {"success": True, "message": "Success"}

    def end_weight_update(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        if not self.session_open:
            return 400, {"success": False, "message": "no weight-update session is open; call begin_weight_update() first"}  # fmt: skip
        self.session_open = False
        self.weight_events.append(("end", None))
        return 200, {"success": True, "message": "Success"}

    def update_weights_from_distributed(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        from trainer.rollout.weight_transfer import receive_bucket

        if getattr(self, "_weights_group", None) is None:
            return 400, {"success": False, "message": "no weight-update group (call /init_weights_update_group)"}
        if self.weight_update_sessions and not self.session_open:
            # SGLang refuses before receiving anything (the sender's broadcast then finds no receiver).
            message = "update_weights_from_distributed must run between begin_weight_update() and end_weight_update()"
            return 400, {"success": False, "message": message}
        received = receive_bucket(body, self._weights_group, self.engine.device)
        self.weight_events.append(("bucket", body.get("weight_version")))
        with self._lock:
            known = self.engine.model.state_dict(keep_vars=True)  # tied weights under each name
            unknown = [name for name in received if name not in known]
            if unknown:
                return 400, {"success": False, "message": f"unknown parameters {unknown}"}
            with torch.no_grad():
                for name, tensor in received.items():
                    known[name].copy_(tensor)
            if body.get("flush_cache", True):
                self.engine.flush_cache()
            self.weight_version = str(body.get("weight_version") or self.weight_version)
        return 200, {"success": True, "message": "Succeeded to update parameter online."}

    def model_info(self) -> dict[str, Any]:
        return {
            "model_path": self.model_path,
            "tokenizer_path": self.model_path,
            "is_generation": True,
            "weight_version": self.weight_version,
            "model_type": getattr(self.engine.model.config, "model_type", None),
            "architectures": getattr(self.engine.model.config, "architectures", None),
        }


class _Pending:
    """One /generate body waiting for the scheduler."""

    def __init__(self, requests: list[GenerationRequest]) -> None:
        self.requests = requests
        self.outputs: list = []
        self.error: Exception | None = None
        self.done = threading.Event()

    def fail(self, error: Exception) -> None:
        self.error = error
        self.done.set()
