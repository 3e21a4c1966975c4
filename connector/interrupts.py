"""Ctrl-C and SIGTERM: how a run is stopped, and the few steps they must not cut in half.

Schedulers (Airflow, Kubernetes, systemd) stop a task with SIGTERM; the CLI turns it into
`Terminated`, handled as Ctrl-C is: the run is recorded as failed and its lock released. Taking
the lock and recording the run are each a few statements that belong together: a signal arriving
between them would leave a lock without a run, or a run left `running`. They run under
`interrupts_held`, which acts on such a signal once they are done.

A statement running inside a database driver that keeps the interpreter until it returns
(DuckDB) would hold a signal just the same, for as long as the query runs: under
`statement_interruptible`, the signal interrupts the statement itself, and is raised as usual
once the driver has given up.

A handler's KeyboardInterrupt or `Terminated` is lost when the interpreter happens to run the
handler inside a weakref callback or a `__del__` (the garbage collector freeing objects while
rows are built, for instance): Python prints "Exception ignored in..." and goes on, and the run
would finish as if nothing had been asked. `redeliver_dropped_stops` catches that case.
"""

from __future__ import annotations

import _thread
import contextlib
import logging
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

from connector.errors import Terminated

log = logging.getLogger("winback.interrupts")

STOPPING_SIGNALS = (signal.SIGINT, signal.SIGTERM)

_held_blocks = 0
"""How many `interrupts_held` blocks the main thread is in: statements run there are not
interrupted (the block is promised to run whole)."""


def stop_on_sigterm(_signal: int, _frame: FrameType | None) -> None:
    """The CLI's SIGTERM handler: stop as Ctrl-C does (the run is recorded, the lock released)
    instead of dying with a lock and a `running` run left behind."""
    raise Terminated


def redeliver_dropped_stops(unraisable: sys.UnraisableHookArgs) -> None:
    """`sys.unraisablehook` for the CLI: a Ctrl-C or SIGTERM whose exception was raised where
    Python can only print and drop it (a weakref callback, a finalizer) is signalled again a
    moment later, from another thread, once that callback has returned. Anything else goes to
    Python's own hook."""
    stop = unraisable.exc_value
    if not isinstance(stop, KeyboardInterrupt):
        sys.__unraisablehook__(unraisable)
        return
    signum = signal.SIGTERM if isinstance(stop, Terminated) else signal.SIGINT
    threading.Thread(
        target=_signal_again, args=(signum,), name="winback-stop-again", daemon=True
    ).start()


def _signal_again(signum: signal.Signals) -> None:
    time.sleep(REDELIVERY_DELAY_S)
    _thread.interrupt_main(signum)  # as if the signal arrived again (the handler runs)


REDELIVERY_DELAY_S = 0.005
"""Long enough for the callback that dropped a stop to return (signalled at once, the stop
would be raised in it again: from the hook's own call)."""


@contextlib.contextmanager
def interrupts_held() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM while the block runs, then deliver the first one that came to
    the handler that was in place (Ctrl-C raises KeyboardInterrupt, SIGTERM what the CLI set).

    Signal handlers belong to the main thread: elsewhere (a sync run from a worker thread of
    an orchestrator) the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def hold(signum: int, _frame: FrameType | None) -> None:
        received.append(signum)

    global _held_blocks
    previous = {
        signum: signal.signal(signum, hold)
        for signum in STOPPING_SIGNALS
        if signal.getsignal(signum) is not None  # None: a handler set outside Python, kept
    }
    _held_blocks += 1
    try:
        yield
    finally:
        _held_blocks -= 1
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if received:
            signal.raise_signal(received[0])


@contextlib.contextmanager
def statement_interruptible(interrupt: Callable[[], object]) -> Iterator[None]:
    """Run one call into a database driver (a statement, a fetch) that Ctrl-C and SIGTERM
    stop at once: `interrupt` (the driver's cancel, e.g. DuckDB's `connection.interrupt`) is
    called from a watcher thread as the signal arrives, and the signal is then raised as usual
    (KeyboardInterrupt, or what the SIGTERM handler raises: `Terminated` in the CLI) in place
    of the error of the statement it interrupted.

    Python runs signal handlers in the main thread between bytecodes, so without this a
    DuckDB query holds the signal until it ends (minutes for a heavy segment), and DuckDB
    then runs the handler itself and turns what it raises into its own "Query interrupted"
    error. While the call runs, the handlers only note the signal, and the signal's byte
    (`signal.set_wakeup_fd`, written by the interpreter's C-level handler) wakes the watcher.

    The call runs as it is outside the main thread (handlers belong to it) and inside
    `interrupts_held`, whose block must run whole. Some 50 microseconds each: meant for calls
    that may run a query (execute, fetching a chunk), not for fetching row by row."""
    if _held_blocks or threading.current_thread() is not threading.main_thread():
        yield
        return
    watcher = _StatementWatcher.started()
    received: list[int] = []

    def hold(signum: int, _frame: FrameType | None) -> None:
        received.append(signum)

    previous: dict[int, Any] = {}
    previous_fd: int | None = None
    try:
        for signum in STOPPING_SIGNALS:
            handler = signal.getsignal(signum)
            if handler is not None:  # None: a handler set outside Python, kept
                previous[signum] = handler  # noted first: restored whatever happens next
                signal.signal(signum, hold)
        watcher.watch(received, interrupt)
        previous_fd = signal.set_wakeup_fd(watcher.writer.fileno(), warn_on_full_buffer=False)
        try:
            yield
        except Exception:
            if not received:
                raise
            # The driver's error for the statement the signal interrupted: the signal,
            # raised below, says what happened.
    finally:
        if previous_fd is not None:
            signal.set_wakeup_fd(previous_fd)
        watcher.watch(None, None)
        for number, handler in previous.items():
            signal.signal(number, handler)
    if received:
        try:
            signal.raise_signal(received[0])  # to the handler in place, as interrupts_held
        except BaseException as stopped:
            raise stopped from None  # not "during the handling of" the driver's error


class _StatementWatcher:
    """The thread that interrupts the statement running (`statement_interruptible`) when a
    stopping signal's byte arrives on its socket. One per process, started on first use.

    A byte read just after its statement returned would reach the next one (cleaning up
    after the stop): it counts as a stop there too, so that statement raises the same stop
    instead of the driver's error."""

    _instance: _StatementWatcher | None = None

    def __init__(self) -> None:
        self.reader, self.writer = socket.socketpair()
        self.writer.setblocking(False)  # as set_wakeup_fd requires
        self._lock = threading.Lock()
        self._received: list[int] | None = None
        self._interrupt: Callable[[], object] | None = None
        threading.Thread(target=self._run, name="winback-statement-interrupt", daemon=True).start()

    @classmethod
    def started(cls) -> _StatementWatcher:
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance

    def watch(self, received: list[int] | None, interrupt: Callable[[], object] | None) -> None:
        """Interrupt with `interrupt` and note the signal in `received` (None: no statement)."""
        with self._lock:
            self._received, self._interrupt = received, interrupt

    def _run(self) -> None:
        while chunk := self.reader.recv(64):
            stops = [number for number in chunk if number in STOPPING_SIGNALS]
            if not stops:
                continue
            with self._lock:  # its call cannot finish meanwhile, nor the next one begin
                if self._received is None or self._interrupt is None:
                    continue
                self._received.append(stops[0])
                try:
                    self._interrupt()
                except Exception:  # the signal is raised all the same when the call returns
                    log.debug("could not interrupt the statement", exc_info=True)
