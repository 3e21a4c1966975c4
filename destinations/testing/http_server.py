"""A real HTTP server on 127.0.0.1 for tests, scripted per request.

Tests queue responses (status, body, headers, delay) or install a handler function; every
request received is recorded with its method, path, headers and raw body, so tests can assert the
exact request shape and count retries.
"""

from __future__ import annotations

import contextlib
import functools
import json
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class ScriptedResponse:
    status: int = 200
    body: bytes | str | dict[str, Any] | list[Any] = b""
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0


Handler = Callable[[RecordedRequest], ScriptedResponse]


class FakeHttpServer:
    """Start with ``with FakeHttpServer() as server:``; ``server.url`` is its base URL."""

    def __init__(self, handler: Handler | None = None, *, port: int = 0):
        self.requests: list[RecordedRequest] = []
        self.queue: deque[ScriptedResponse] = deque()
        self.handler = handler
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", port), self._make_handler_class())
        self._server.daemon_threads = True
        # A short poll keeps shutdown in milliseconds (the default 0.5 s adds up over many tests).
        serve = functools.partial(self._server.serve_forever, poll_interval=0.01)
        self._thread = threading.Thread(target=serve, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def enqueue(self, *responses: ScriptedResponse) -> None:
        """Answer the next requests with these, in order; then fall back to the handler/200."""
        self.queue.extend(responses)

    def __enter__(self) -> FakeHttpServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _respond(self, request: RecordedRequest) -> ScriptedResponse:
        with self._lock:
            self.requests.append(request)
            if self.queue:
                return self.queue.popleft()
        if self.handler is not None:
            return self.handler(request)
        return ScriptedResponse(200, {"ok": True})

    def _make_handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class _Handler(BaseHTTPRequestHandler):
            disable_nagle_algorithm = True
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                recorded = RecordedRequest(
                    method=self.command,
                    path=self.path,
                    headers={k.lower(): v for k, v in self.headers.items()},
                    body=body,
                )
                scripted = server._respond(recorded)
                if scripted.delay_s:
                    time.sleep(scripted.delay_s)
                payload = scripted.body
                content_type = "application/json"
                if isinstance(payload, dict | list):
                    payload = json.dumps(payload).encode()
                elif isinstance(payload, str):
                    payload = payload.encode()
                    content_type = "text/plain"
                self.send_response(scripted.status)
                headers = {"Content-Type": content_type, **scripted.headers}
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command == "HEAD":
                    return
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    self.wfile.write(payload)

            do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

        return _Handler

    def bodies(self) -> Iterator[Any]:
        for request in list(self.requests):
            yield request.json()
