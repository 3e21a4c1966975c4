"""Ctrl-C and SIGTERM held over the steps that must not be cut in half (`connector.interrupts`)."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator

import pytest

from connector.errors import Terminated
from connector.interrupts import interrupts_held, stop_on_sigterm


@pytest.fixture
def cli_handlers() -> Iterator[None]:
    """The handlers the CLI installs: SIGTERM raises Terminated, Ctrl-C KeyboardInterrupt."""
    previous = signal.signal(signal.SIGTERM, stop_on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.mark.usefixtures("cli_handlers")
@pytest.mark.parametrize(
    ("signum", "raised"),
    [(signal.SIGTERM, Terminated), (signal.SIGINT, KeyboardInterrupt)],
)
def test_a_signal_during_the_block_is_delivered_once_it_ends(
    signum: int, raised: type[BaseException]
) -> None:
    steps = []
    with pytest.raises(raised) as stopped, interrupts_held():
        signal.raise_signal(signum)
        steps.append("after the signal")
        signal.raise_signal(signal.SIGTERM)  # a second one changes nothing
        steps.append("end of the block")
    assert steps == ["after the signal", "end of the block"]
    assert type(stopped.value) is raised
    # The handlers in place before are back.
    assert signal.getsignal(signal.SIGTERM) is stop_on_sigterm
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.usefixtures("cli_handlers")
def test_without_a_signal_the_block_runs_and_returns() -> None:
    with interrupts_held():
        value = 42
    assert value == 42
    assert signal.getsignal(signal.SIGTERM) is stop_on_sigterm


@pytest.mark.usefixtures("cli_handlers")
def test_an_error_in_the_block_still_gets_the_signal_after_it() -> None:
    with pytest.raises(Terminated) as stopped, interrupts_held():
        signal.raise_signal(signal.SIGTERM)
        raise RuntimeError("the block failed")
    assert isinstance(stopped.value.__context__, RuntimeError)


def test_outside_the_main_thread_the_block_just_runs() -> None:
    """Only the main thread may set signal handlers (a sync run from an orchestrator's
    worker thread)."""
    outcome: list[object] = []

    def run() -> None:
        try:
            with interrupts_held():
                outcome.append("ran")
        except BaseException as error:  # pragma: no cover - what this test looks for
            outcome.append(error)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert outcome == ["ran"]
