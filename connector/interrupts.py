"""Ctrl-C and SIGTERM: how a run is stopped, and the few steps they must not cut in half.

Schedulers (Airflow, Kubernetes, systemd) stop a task with SIGTERM; the CLI turns it into
`Terminated`, handled as Ctrl-C is: the run is recorded as failed and its lock released. Taking
the lock and recording the run are each a few statements that belong together: a signal arriving
between them would leave a lock without a run, or a run left `running`. They run under
`interrupts_held`, which acts on such a signal once they are done.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

from connector.errors import Terminated

STOPPING_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def stop_on_sigterm(_signal: int, _frame: FrameType | None) -> None:
    """The CLI's SIGTERM handler: stop as Ctrl-C does (the run is recorded, the lock released)
    instead of dying with a lock and a `running` run left behind."""
    raise Terminated


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

    previous = {
        signum: signal.signal(signum, hold)
        for signum in STOPPING_SIGNALS
        if signal.getsignal(signum) is not None  # None: a handler set outside Python, kept
    }
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if received:
            signal.raise_signal(received[0])
