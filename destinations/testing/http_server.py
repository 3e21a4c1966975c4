"""Real servers on 127.0.0.1 for tests, scripted per request.

`FakeHttpServer` is an HTTP server: tests queue responses (status, body, headers, delay) or
install a handler function; every request received is recorded with its method, path, headers
and raw body, so tests can assert the exact request shape and count retries.
`RawSocketServer` answers raw bytes on the socket, for broken answers no HTTP server sends.
"""

from __future__ import annotations

import contextlib
import functools
import json
import socket
import struct
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


@dataclass
class RawAnswer:
    """What a `RawSocketServer` sends on one connection once it has read the request:
    `data` as it is (headers, a truncated body, bytes that are not HTTP) — one byte every
    `drip_s` seconds when that is set (an answer that never ends, each byte in time) — then it
    waits `hold_s` seconds (an answer that stalls) and closes the connection, with a reset
    (RST) when `reset` is true, else a normal close."""

    data: bytes = b""
    reset: bool = False
    hold_s: float = 0.0
    drip_s: float = 0.0


OK_ANSWER = RawAnswer(
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n"
    b"Connection: close\r\n\r\n{}"
)


class RawSocketServer:
    """A TCP server on 127.0.0.1 that answers each connection with raw bytes, for what a
    well-behaved HTTP server cannot do: break the connection in the middle of an answer,
    answer something that is not HTTP, close without answering.

    Every request is read whole (headers and a `Content-Length` body) and recorded, then the
    next queued `RawAnswer` is sent (``OK_ANSWER``, a 200 with ``{}``, once the queue is empty)
    and the connection is closed::

        with RawSocketServer() as server:
            head = b"HTTP/1.1 200 OK\\r\\nContent-Length: 100\\r\\n\\r\\n"
            server.enqueue(RawAnswer(head + b"{", reset=True))  # 1 byte of 100, then RST
            ...  # point the adapter at server.url
    """

    def __init__(self) -> None:
        self.requests: list[RecordedRequest] = []
        self.sent: list[int] = []
        """Bytes of each answer that went out, in order, once it is over: fewer than its
        length when the client shut the connection first (a deadline cut a dripping answer)."""
        self.queue: deque[RawAnswer] = deque()
        self._lock = threading.Lock()
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.bind(("127.0.0.1", 0))
        self._socket.listen(16)
        self._socket.settimeout(0.05)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        host, port = self._socket.getsockname()[:2]
        self.url = f"http://{host}:{port}"
        """Its base URL, valid after it stopped too (for messages that name it)."""

    def enqueue(self, *answers: RawAnswer) -> None:
        """Answer the next connections with these, in order; then with ``OK_ANSWER``."""
        with self._lock:
            self.queue.extend(answers)

    def __enter__(self) -> RawSocketServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stopping.set()
        self._thread.join(timeout=5)
        self._socket.close()

    def _serve(self) -> None:
        while not self._stopping.is_set():
            try:
                connection, _ = self._socket.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._answer, args=(connection,), daemon=True).start()

    def _answer(self, connection: socket.socket) -> None:
        with contextlib.closing(connection):
            connection.settimeout(10)
            request = _read_request(connection)
            if request is None:
                return
            with self._lock:
                self.requests.append(request)
                answer = self.queue.popleft() if self.queue else OK_ANSWER
            sent = 0
            try:
                if answer.drip_s:
                    for index in range(len(answer.data)):
                        connection.sendall(answer.data[index : index + 1])
                        sent += 1
                        if self._stopping.wait(answer.drip_s):
                            break
                else:
                    connection.sendall(answer.data)
                    sent = len(answer.data)
            except OSError:
                pass
            finally:
                with self._lock:
                    self.sent.append(sent)
            with contextlib.suppress(OSError):
                if answer.hold_s:
                    self._stopping.wait(answer.hold_s)
                if answer.reset:
                    # Linger 0: close() sends a RST instead of a FIN.
                    connection.setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                    )
                else:
                    # Let the client read everything before the connection goes.
                    connection.shutdown(socket.SHUT_WR)
                    time.sleep(0.05)


def _read_request(connection: socket.socket) -> RecordedRequest | None:
    data = b""
    with contextlib.suppress(OSError):
        while b"\r\n\r\n" not in data:
            chunk = connection.recv(65536)
            if not chunk:
                return None
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        method, path = [*lines[0].split(" "), "", ""][:2]
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length") or 0)
        while len(body) < length:
            chunk = connection.recv(65536)
            if not chunk:
                break
            body += chunk
        return RecordedRequest(method=method, path=path, headers=headers, body=body)
    return None
