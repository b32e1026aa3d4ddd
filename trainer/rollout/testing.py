"""Testing only: a small HTTP server that speaks SGLang's protocol in front of the embedded engine.

Not part of ``trainer.rollout``'s exports: tests, benchmarks and the CPU demo import it from here.

It serves ``/init_weights_update_group``, ``/begin_weight_update``, ``/update_weights_from_distributed``,
``/end_weight_update`` (loads only inside a session, as SGLang 0.5.23; ``weight_update_sessions=False``
is an older server), ``/generate`` (``input_ids``, ``sampling_params`` with ``n``, ``max_new_tokens``,
``stop_token_ids``, ``temperature``, ``top_p``, ``min_new_tokens``, ``sampling_seed``),
``/flush_cache``, ``/update_weights_from_disk``, ``/get_model_info`` and ``/health`` with the
JSON fields of ``sglang.launch_server`` (``meta_info.cached_tokens`` included), so the SGLang
client runs for real over HTTP in tests and in the CPU demo. Binds 127.0.0.1 only.

It behaves as SGLang does where the client depends on it: requests are served concurrently (a
scheduler thread batches every request waiting when it is free, as SGLang's continuous batching
admits them), a bounded cache evicts by priority then LRU when the engine has a
``kv_budget_tokens``, batch items must share ``n`` and sampling keys must be known (400
otherwise), ``/flush_cache`` is refused (400) while requests run or wait (after waiting up to
``?timeout=`` seconds for them), ``cached_tokens`` is
``prompt_len - 1`` for ``n > 1``, and the full EOS set stops every request.

Fault injection for tests: :meth:`ProtocolServer.inject_faults` queues faults that the next
``/generate`` requests meet, one each: ``"500"`` (an error status), ``"malformed"`` (a body that is
not JSON), ``"hang"`` (sleep ``hang_seconds`` before answering) and ``"drop"`` (close the
connection without an answer) and ``"abort"`` (HTTP 200 with every sample's
``finish_reason`` of type ``abort``, as SGLang answers a request it dropped).
"""

from __future__ import annotations

import collections
import json
import logging
import threading
import time
import urllib.parse
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from trainer.rollout.base import GenerationRequest, SamplingParams
from trainer.rollout.embedded import EmbeddedEngine
from trainer.rollout.sglang_protocol import response_samples

logger = logging.getLogger(__name__)

FAULTS = ("500", "malformed", "hang", "drop", "abort")


class ProtocolServer:
    """SGLang's endpoints over an :class:`EmbeddedEngine`; ``with ProtocolServer(engine) as server:``."""

    def __init__(
        self,
        engine: EmbeddedEngine,
        tokenizer=None,
        *,
        port: int = 0,
        model_path: str = "embedded",
        weight_update_sessions: bool = True,
    ):
        self.engine = engine
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
        self._faults: collections.deque[str] = collections.deque()
        self._fault_lock = threading.Lock()
        self._lock = threading.Lock()  # the engine: one generate, weight load or flush at a time
        self._queue: list[_Pending] = []
        self._busy = 0  # requests taken by the scheduler and not yet answered
        self._wakeup = threading.Condition()
        self._stopping = False
        self._scheduler: threading.Thread | None = None
        self._httpd = _HTTPServer(("127.0.0.1", port), _handler_class(self))
        self._httpd.daemon_threads = True
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

    def generate(self, body: dict[str, Any]) -> Any:
        """Serve one ``/generate`` body (queued for the scheduler); raises ValueError on a bad request."""
        requests, single = self._parse(body)
        pending = _Pending(requests)
        with self._wakeup:
            self._queue.append(pending)
            self._wakeup.notify_all()
        pending.done.wait()
        if pending.error is not None:
            raise pending.error
        text = (lambda ids: self.tokenizer.decode(ids)) if self.tokenizer is not None else None
        samples = []
        for request, output in zip(requests, pending.outputs, strict=True):
            samples.extend(response_samples(output, request, uuid.uuid4().hex, text))
        for sample in samples:
            sample["meta_info"]["weight_version"] = self.weight_version
        return samples[0] if single and requests[0].n == 1 else samples

    def _parse(self, body: dict[str, Any]) -> tuple[list[GenerationRequest], bool]:
        input_ids = body.get("input_ids")
        if not isinstance(input_ids, list) or not input_ids:
            raise ValueError("this server needs input_ids (a list of token ids, or a list of such lists)")
        single = not isinstance(input_ids[0], list)
        prompts = [input_ids] if single else input_ids
        params = body.get("sampling_params") or {}
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"{len(params_list)} sampling_params for {len(prompts)} prompts")
        if len({int(p.get("n", 1)) for p in params_list}) > 1:
            raise ValueError("all items of a batch must ask for the same n (SGLang answers 400 otherwise)")
        if "routed_dp_rank" in body:
            self.routed_dp_ranks.append(int(body["routed_dp_rank"]))
        priority = int(body.get("priority") or 0)
        requests = [
            _request(prompt, p, self.engine.eos_token_ids, priority)
            for prompt, p in zip(prompts, params_list, strict=True)
        ]
        return requests, single

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
                    outputs = self.engine.generate(requests)
                    self.batches_served += 1
                    self.generate_served += len(batch)
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

    def metrics_text(self) -> str:
        """``/metrics`` as a server started with ``--enable-metrics`` answers it (the counters the
        client reads): prompt tokens computed and served from the prefix cache, tokens decoded."""
        lines = ["# TYPE sglang:realtime_tokens_total counter"]
        priorities = self.engine.prefill_priorities() or [None]
        for priority in priorities:  # one series per request priority, as SGLang labels them
            counters = self.engine.prefill_counters(priority)
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


_SAMPLING_KEYS = {"n", "max_new_tokens", "stop_token_ids", "temperature", "top_p", "top_k", "min_p",
                  "repetition_penalty", "min_new_tokens", "sampling_seed", "ignore_eos"}  # fmt: skip
# Values this server can emulate (it samples softmax(logits / T) with top-p only).
_PLAIN = {"top_k": -1, "min_p": 0.0, "repetition_penalty": 1.0}


class _HTTPServer(ThreadingHTTPServer):
    request_queue_size = 1024  # the listen backlog: many concurrent clients (the default 5 drops SYNs)


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


def _request(prompt: list, params: dict[str, Any], eos_token_ids: tuple[int, ...], priority: int) -> GenerationRequest:
    unknown = sorted(set(params) - _SAMPLING_KEYS)
    if unknown:
        raise ValueError(f"unknown sampling_params {unknown}")
    for key, plain in _PLAIN.items():
        if key in params and float(params[key]) != plain:
            raise ValueError(f"this test server samples with {key}={plain} only, got {params[key]}")
    stop = [int(t) for t in params.get("stop_token_ids") or []]
    if not params.get("ignore_eos", False):
        # SGLang always stops at every EOS of the model's configs unless ignore_eos.
        stop += [t for t in eos_token_ids if t not in stop]
    return GenerationRequest(
        input_ids=tuple(int(t) for t in prompt),
        n=int(params.get("n", 1)),
        max_new_tokens=int(params.get("max_new_tokens", 128)),
        stop_token_ids=tuple(stop),
        sampling=SamplingParams(
            temperature=float(params.get("temperature", 1.0)),
            top_p=float(params.get("top_p", 1.0)),
            seed=params.get("sampling_seed"),
            min_new_tokens=int(params.get("min_new_tokens", 0)),
        ),
        cache_output=True,
        priority=priority,
    )


def _handler_class(server: ProtocolServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args) -> None:
            logger.debug("protocol server: " + format, *args)

        def _send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
            try:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                logger.debug("protocol server: the client left before the answer (%s)", self.path)

        def _json(self, status: int, payload: Any) -> None:
            self._send(status, json.dumps(payload).encode())

        def _body(self) -> dict[str, Any]:
            length = int(self.headers.get("Content-Length") or 0)
            return json.loads(self.rfile.read(length) or b"{}") if length else {}

        def do_GET(self) -> None:
            path = self.path.split("?")[0]
            if path in ("/health", "/health_generate", "/ready"):
                self._send(200, b"", "text/plain")
            elif path in ("/get_model_info", "/model_info"):
                self._json(200, server.model_info())
            elif path == "/flush_cache":
                self._flush()
            elif path == "/metrics":
                self._send(200, server.metrics_text().encode(), "text/plain; version=0.0.4")
            else:
                self._json(404, {"error": {"message": f"no route {path}"}})

        def _flush(self) -> None:
            # ?timeout=T: wait up to T seconds for running and waiting requests to finish, as SGLang does.
            query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
            deadline = time.monotonic() + float(query.get("timeout", ["0"])[0])
            while not server.idle and time.monotonic() < deadline:
                time.sleep(0.01)
            if not server.idle:
                # SGLang's answer when requests are running or waiting.
                message = "Cache not flushed. Please check backend logs for more details. (When there are running or waiting requests, the operation will not be performed.)"
                self._send(400, message.encode(), "text/plain")
                return
            with server._lock:
                server.engine.flush_cache()
            self._send(200, b"Cache flushed.\n", "text/plain")

        def do_POST(self) -> None:
            path = self.path.split("?")[0]
            try:
                body = self._body()
            except json.JSONDecodeError as error:
                self._json(400, {"error": {"message": f"request body is not JSON: {error}"}})
                return
            if path == "/generate":
                self._generate(body)
            elif path == "/flush_cache":
                self._flush()
            elif path == "/update_weights_from_disk":
                self._json(*server.update_weights_from_disk(body))
            elif path == "/init_weights_update_group":
                self._json(*server.init_weights_update_group(body))
            elif path == "/update_weights_from_distributed":
                self._json(*server.update_weights_from_distributed(body))
            elif path in ("/begin_weight_update", "/end_weight_update") and server.weight_update_sessions:
                self._json(*getattr(server, path.strip("/"))(body))
            else:
                self._json(404, {"error": {"message": f"no route {path}"}})

        def _generate(self, body: dict[str, Any]) -> None:
            fault = server.next_fault()
            if fault == "500":
                self._json(500, {"error": {"message": "injected internal error"}})
                return
            if fault == "drop":
                self.close_connection = True
                self.connection.close()
                return
            if fault == "hang":
                time.sleep(server.hang_seconds)
            try:
                payload = server.generate(body)
            except ValueError as error:
                self._json(400, {"error": {"message": str(error)}})
                return
            except Exception as error:
                self._json(500, {"error": {"message": f"{type(error).__name__}: {error}"}})
                return
            if fault == "abort":
                for sample in payload if isinstance(payload, list) else [payload]:
                    # SGLang's abort meta_info: no token counts, only id, finish_reason and timing.
                    sample["output_ids"] = sample["output_ids"][:1]
                    sample["meta_info"] = {"id": sample["meta_info"].get("id", ""), "e2e_latency": 0.0,
                                           "finish_reason": {"type": "abort", "message": "injected abort"},
                                           "weight_version": server.weight_version}  # fmt: skip
            if fault == "malformed":
                self._send(200, b'{"output_ids": [1, 2', "application/json")
                return
            self._json(200, payload)

    return Handler
