"""Testing only: the HTTP face of :class:`trainer.rollout.testing.ProtocolServer` (SGLang's routes,
status codes and JSON bodies; the server object does the work)."""

from __future__ import annotations

import json
import logging
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from trainer.rollout.testing import ProtocolServer

logger = logging.getLogger(__name__)


class _HTTPServer(ThreadingHTTPServer):
    request_queue_size = 1024  # the listen backlog: many concurrent clients (the default 5 drops SYNs)


def serve_http(server: ProtocolServer, port: int) -> ThreadingHTTPServer:
    """An HTTP server on 127.0.0.1:``port`` (0: any free port) that answers for ``server``; not started."""
    httpd = _HTTPServer(("127.0.0.1", port), _handler_class(server))
    httpd.daemon_threads = True
    return httpd


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
            if path == "/ready" and server.ready_route:
                self._send(200, b"", "text/plain")
            elif path in ("/health", "/health_generate"):
                time.sleep(server.health_check_seconds)
                self._send(200, b"", "text/plain")
            elif path in ("/get_model_info", "/model_info"):
                self._json(200, server.model_info())
            elif path in ("/server_info", "/get_server_info"):
                self._json(200, server.server_info())
            elif path == "/v1/models":
                self._json(200, server.models())
            elif path == "/flush_cache":
                self._flush()
            elif path == "/metrics":
                self._send(200, server.metrics_text().encode(), "text/plain; version=0.0.4")
            else:
                self._json(404, {"error": {"message": f"no route {path}"}})

        def _flush(self) -> None:
            # ?timeout=T: wait up to T seconds for running and waiting requests to finish, as SGLang does.
            query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
            if server.flush_cache(float(query.get("timeout", ["0"])[0])):
                self._send(200, b"Cache flushed.\n", "text/plain")
                return
            # SGLang's answer when requests are running or waiting.
            message = "Cache not flushed. Please check backend logs for more details. (When there are running or waiting requests, the operation will not be performed.)"
            self._send(400, message.encode(), "text/plain")

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
