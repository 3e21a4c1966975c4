"""An overall deadline for each HTTP attempt of `destinations.base.HttpClient`.

`timeout_s` bounds each wait for a byte; an answer dripping its status line, headers or body one
byte at a time would never end. One watchdog thread for the whole process shuts the socket of an
attempt still running at its deadline (`RetrySettings.attempt_deadline_s`): the read blocked on
it returns at once. requests' connections are urllib3 subclasses (`WatchedAdapter`) that attach
themselves to the attempt of the thread sending them.
"""

from __future__ import annotations

import contextlib
import heapq
import socket
import threading
import time
from typing import Any

import requests.adapters
import urllib3
import urllib3.connection


class Watch:
    """One attempt's deadline: the connection it uses is shut when the deadline passes."""

    def __init__(self, deadline: float):
        self.deadline = deadline
        self.connection: Any = None
        self.sock: Any = None
        """The connection's socket as the attempt last saw it: an answer that will close its
        connection (`Connection: close`, HTTP/1.0) takes the socket off the connection
        (`sock` None) while its body is still read from it."""
        self.active = True
        self.fired = False

    def end(self) -> bool:
        """Stop watching (idempotent); True when the deadline passed and the connection was
        shut: the attempt's answer, whatever came of it, is incomplete."""
        with WATCHDOG.lock:
            self.active = False
            return self.fired


class _Watchdog:
    """One thread for the whole process that shuts the socket of each attempt still running at
    its deadline (`RetrySettings.attempt_deadline_s`): a read blocked on a server that drips
    its status line, headers or body one byte at a time (each within `timeout_s`) then ends at
    once. No thread per request, and nothing but the socket is touched from this thread."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._wake = threading.Condition(self.lock)
        self._pending: list[tuple[float, int, Watch]] = []
        self._count = 0
        self._thread: threading.Thread | None = None
        self._local = threading.local()

    def watch(self, seconds: float) -> Watch:
        """Watch the attempt this thread starts now; `_WatchedHTTPConnection` attaches the
        connection it uses."""
        watch = Watch(time.monotonic() + seconds)
        with self.lock:
            self._count += 1
            heapq.heappush(self._pending, (watch.deadline, self._count, watch))
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="winback-http-deadlines", daemon=True
                )
                self._thread.start()
            self._wake.notify()
        self._local.watch = watch
        return watch

    def attach(self, connection: Any) -> None:
        """`connection` sends this thread's current attempt (called as it sends, and again
        once connected, as a socket may be opened after the deadline passed)."""
        watch: Watch | None = getattr(self._local, "watch", None)
        if watch is None:
            return
        with self.lock:
            if not watch.active:
                return
            watch.connection = connection
            watch.sock = getattr(connection, "sock", None) or watch.sock
            connection._winback_watch = watch
            if watch.fired:
                _shut(watch)

    def _run(self) -> None:
        with self.lock:
            while True:
                while self._pending and not self._pending[0][2].active:
                    heapq.heappop(self._pending)  # ended in time
                if not self._pending:
                    self._wake.wait()
                    continue
                left = self._pending[0][0] - time.monotonic()
                if left > 0:
                    self._wake.wait(left)
                    continue
                _, _, watch = heapq.heappop(self._pending)
                watch.fired = True
                connection = watch.connection
                # The connection may serve another attempt by now (back in the pool).
                if connection is not None and connection._winback_watch is watch:
                    _shut(watch)


def _shut(watch: Watch) -> None:
    """Shut the socket of the watch's attempt for both directions: a read blocked in another
    thread returns at once. `socket.socket.shutdown` on a TLS socket too, which leaves its TLS
    state to the thread reading it."""
    sock = getattr(watch.connection, "sock", None) or watch.sock
    if sock is not None:
        with contextlib.suppress(OSError):
            socket.socket.shutdown(sock, socket.SHUT_RDWR)


WATCHDOG = _Watchdog()


class _Watched:
    """Mixin of urllib3's connections: attach to this thread's attempt as it sends, and again
    once connected (a socket may be opened after the deadline passed)."""

    _winback_watch: Watch | None = None

    def connect(self) -> None:
        super().connect()  # type: ignore[misc]
        WATCHDOG.attach(self)

    def request(self, *args: Any, **kwargs: Any) -> None:
        WATCHDOG.attach(self)
        super().request(*args, **kwargs)  # type: ignore[misc]


class _WatchedHTTPConnection(_Watched, urllib3.connection.HTTPConnection):
    pass


class _WatchedHTTPSConnection(_Watched, urllib3.connection.HTTPSConnection):
    pass


class _WatchedHTTPPool(urllib3.HTTPConnectionPool):
    ConnectionCls = _WatchedHTTPConnection


class _WatchedHTTPSPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _WatchedHTTPSConnection


_WATCHED_POOLS = {"http": _WatchedHTTPPool, "https": _WatchedHTTPSPool}


class WatchedAdapter(requests.adapters.HTTPAdapter):
    """requests' adapter whose connections the watchdog can shut at an attempt's deadline."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = _WATCHED_POOLS

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> urllib3.PoolManager:
        manager: urllib3.PoolManager = super().proxy_manager_for(proxy, **proxy_kwargs)
        if type(manager) is urllib3.ProxyManager:  # SOCKS proxies have their own classes
            manager.pool_classes_by_scheme = _WATCHED_POOLS
        return manager
