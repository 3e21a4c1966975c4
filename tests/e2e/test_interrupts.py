"""Ctrl-C and SIGTERM stop the real CLI at once, wherever they find it.

In a DuckDB (or SQLite) query that would run for minutes (a segment joined to a huge aggregate): `sync run`,
`sync plan` and `segments preview` exit 130 / 143 within seconds, say so without a traceback,
and a run is recorded as interrupted with its lock released. While the second process that
normalises a large first sync is starting: no traceback from it (it ignores both signals), and
winback stops it and waits for it before exiting. And a stop that Python would drop because its
handler ran inside a weakref callback is raised all the same (in-process test, at the end).

Linux only: the tests watch the CLI's open files and child processes in /proc.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from connector.errors import Terminated
from connector.interrupts import redeliver_dropped_stops, stop_on_sigterm
from connector.row_normaliser import PARALLEL_MIN_ROWS
from tests.helpers import (
    CliResult,
    build_warehouse,
    cli_command,
    cli_env,
    run_cli,
    sqlite_rows,
    state_db,
    wait_until,
    write_config,
)

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="reads /proc to see what the CLI is doing"
)

SLOW_SQL = (
    "SELECT c.customer_id, c.email FROM customers AS c, "
    "(SELECT count(*) AS n FROM range(0, 100000000000) AS t(i) WHERE i % 7 = 3) AS slow"
)
"""Minutes of DuckDB work before the first row, whatever the machine."""

SLOW_SQLITE_SQL = (
    "SELECT c.customer_id, c.email FROM customers AS c, (WITH RECURSIVE r(i) AS (SELECT 1 "
    "UNION ALL SELECT i + 1 FROM r WHERE i < 100000000000) SELECT count(*) AS n FROM r) AS slow"
)
"""The same for a SQLite warehouse."""

STOP_SECONDS = 10
"""How long a stopped command may take to exit (it takes well under a second; CI is slow)."""

EXIT_CODE = {signal.SIGINT: 130, signal.SIGTERM: 143}
SAYS = {signal.SIGINT: "error: interrupted;", signal.SIGTERM: "error: stopped by SIGTERM;"}
RECORDED = {signal.SIGINT: "interrupted by the user", signal.SIGTERM: "stopped by SIGTERM"}
STOPS = pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])


@contextmanager
def started(folder: Path, *args: str) -> Iterator[subprocess.Popen[str]]:
    """`winback ARGS` in its own process group (a terminal's Ctrl-C reaches the whole group;
    here it must not reach pytest), killed if it outlives the test."""
    process = subprocess.Popen(
        cli_command(*args),
        cwd=folder,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.communicate()


def stopped(
    process: subprocess.Popen[str],
    args: tuple[str, ...],
    stop: signal.Signals,
    *,
    whole_group: bool = False,
) -> tuple[CliResult, float]:
    """Send `stop` (to the CLI, or to its process group as a terminal does) and wait for the
    CLI to exit: its result and the seconds it took."""
    assert process.poll() is None, "the command ended before it could be stopped"
    sent_at = time.monotonic()
    if whole_group:
        os.killpg(process.pid, stop)
    else:
        process.send_signal(stop)
    try:
        stdout, stderr = process.communicate(timeout=STOP_SECONDS + 50)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
    return CliResult(args, process.returncode, stdout, stderr), time.monotonic() - sent_at


def assert_stopped_cleanly(result: CliResult, took: float, stop: signal.Signals) -> None:
    assert result.returncode == EXIT_CODE[stop], result
    assert took < STOP_SECONDS, f"took {took:.1f}s to stop\n{result}"
    assert "Traceback" not in result.stderr, result
    assert "Fatal Python error" not in result.stderr, result
    assert "Query interrupted" not in result.stderr + result.stdout, result


# -- a long DuckDB query ------------------------------------------------------------------------


@pytest.fixture
def slow_project(tmp_path: Path) -> Path:
    """A DuckDB warehouse whose segment `slow` takes minutes, synced to a file by sync `s`."""
    build_warehouse(tmp_path / "warehouse.duckdb", 10)
    write_config(
        tmp_path,
        segments={"slow": {"key": "customer_id", "sql": SLOW_SQL}},
        destinations={"out": {"type": "file", "path": "out/{sync}.csv"}},
        syncs={"s": {"segment": "slow", "destination": "out", "identifiers": {"email": "email"}}},
    )
    return tmp_path


@pytest.fixture
def slow_sqlite_project(tmp_path: Path) -> Path:
    """`slow_project` with a SQLite warehouse (sqlite3 holds a signal until its query ends)."""
    warehouse = tmp_path / "warehouse.sqlite"
    with sqlite3.connect(warehouse) as connection:
        connection.execute("CREATE TABLE customers (customer_id INTEGER, email TEXT)")
        connection.execute("INSERT INTO customers VALUES (1, 'a@example.com')")
    connection.close()
    write_config(
        tmp_path,
        warehouse_url="sqlite:///warehouse.sqlite",
        segments={"slow": {"key": "customer_id", "sql": SLOW_SQLITE_SQL}},
        destinations={"out": {"type": "file", "path": "out/{sync}.csv"}},
        syncs={"s": {"segment": "slow", "destination": "out", "identifiers": {"email": "email"}}},
    )
    return tmp_path


def opened(process: subprocess.Popen[str], path: Path) -> bool:
    """Whether the process holds `path` open."""
    try:
        descriptors = os.listdir(f"/proc/{process.pid}/fd")
    except OSError:
        return False
    for descriptor in descriptors:
        try:
            if os.readlink(f"/proc/{process.pid}/fd/{descriptor}") == str(path):
                return True
        except OSError:
            continue
    return False


def stop_in_the_query(
    folder: Path, args: tuple[str, ...], stop: signal.Signals
) -> tuple[CliResult, float]:
    """Run `winback ARGS`, send `stop` once the warehouse is busy with the slow segment."""
    warehouse = next(folder.glob("warehouse.*"))
    with started(folder, *args) as process:
        wait_until(lambda: opened(process, warehouse) or process.poll() is not None, timeout=60)
        time.sleep(0.5)  # into the query: everything before it takes milliseconds
        return stopped(process, args, stop)


@STOPS
def test_a_stop_interrupts_the_segment_query_of_a_run(
    slow_project: Path, stop: signal.Signals
) -> None:
    """The query is interrupted; the run is recorded as stopped and its lock released."""
    args = ("sync", "run", "s")
    result, took = stop_in_the_query(slow_project, args, stop)
    assert_stopped_cleanly(result, took, stop)
    assert SAYS[stop] in result.stderr, result
    assert "next run sends the rest" in result.stderr, result
    assert "s: failed" in result.stdout, result

    history = run_cli("sync", "history", "s", "--output", "json", cwd=slow_project)
    assert history.returncode == 0, history
    (run,) = history.json()
    assert (run["status"], run["error"]) == ("failed", RECORDED[stop])
    assert sqlite_rows(state_db(slow_project), "SELECT sync FROM locks") == []


@STOPS
def test_a_stop_interrupts_the_segment_query_of_a_run_on_sqlite(
    slow_sqlite_project: Path, stop: signal.Signals
) -> None:
    args = ("sync", "run", "s")
    result, took = stop_in_the_query(slow_sqlite_project, args, stop)
    assert_stopped_cleanly(result, took, stop)
    assert SAYS[stop] in result.stderr, result
    history = run_cli("sync", "history", "s", "--output", "json", cwd=slow_sqlite_project)
    (run,) = history.json()
    assert (run["status"], run["error"]) == ("failed", RECORDED[stop])
    assert sqlite_rows(state_db(slow_sqlite_project), "SELECT sync FROM locks") == []


@STOPS
def test_a_stop_interrupts_the_segment_query_of_a_plan(
    slow_project: Path, stop: signal.Signals
) -> None:
    args = ("sync", "plan", "s", "--output", "json")
    result, took = stop_in_the_query(slow_project, args, stop)
    assert_stopped_cleanly(result, took, stop)
    document = result.json()
    assert document["exit_code"] == EXIT_CODE[stop]
    assert "nothing was sent" in document["error"]
    (run,) = document["runs"]
    assert (run["status"], run["error"]) == ("failed", RECORDED[stop])
    history = run_cli("sync", "history", "s", "--output", "json", cwd=slow_project)
    assert history.json() == []  # a plan writes nothing


def test_ctrl_c_interrupts_the_query_of_a_preview(slow_project: Path) -> None:
    args = ("segments", "preview", "slow")
    result, took = stop_in_the_query(slow_project, args, signal.SIGINT)
    assert_stopped_cleanly(result, took, signal.SIGINT)
    assert result.stdout == ""


@STOPS
def test_a_stopped_preview_says_so_with_its_exit_code(
    slow_project: Path, stop: signal.Signals
) -> None:
    args = ("segments", "preview", "slow")
    result, took = stop_in_the_query(slow_project, args, stop)
    assert_stopped_cleanly(result, took, stop)
    assert SAYS[stop].rstrip(";") in result.stderr, result


# -- the normalising worker starting -------------------------------------------------------------


def normalising_worker(parent: int) -> int | None:
    """The pid of the process multiprocessing spawned for `parent` to normalise identifiers
    (not its resource tracker), if any."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8") as stat:
                ppid = int(stat.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                command = cmdline.read()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and b"spawn_main" in command:
            return int(entry)
    return None


def importing(pid: int) -> bool:
    """Whether the worker is loading winback's modules (orjson is the first extension module
    they load; phonenumbers, a few hundred milliseconds of imports, comes next)."""
    try:
        with open(f"/proc/{pid}/maps", "rb") as maps:
            return b"orjson" in maps.read()
    except OSError:
        return False


def gone(pid: int) -> bool:
    """Whether the process has exited and been reaped (no zombie left)."""
    return not Path(f"/proc/{pid}").exists()


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="one core: winback starts no worker")
@STOPS
def test_a_stop_while_the_normalising_worker_starts(tmp_path: Path, stop: signal.Signals) -> None:
    """A terminal's Ctrl-C, or a scheduler's SIGTERM to the process group, reaches the
    worker as it imports its libraries: it ignores it (no traceback), and winback stops it
    and waits for it before exiting as for any stop."""
    build_warehouse(tmp_path / "warehouse.duckdb", PARALLEL_MIN_ROWS + 5_000)
    write_config(
        tmp_path,
        destinations={"out": {"type": "file", "path": "out/{sync}.csv"}},
        syncs={
            "s": {
                "segment": "lapsed",
                "destination": "out",
                "identifiers": {"email": "email", "phone": "phone", "country": "country"},
            }
        },
    )
    args = ("sync", "run", "s")
    worker: list[int] = []

    def worker_importing(process: subprocess.Popen[str]) -> Callable[[], bool]:
        def check() -> bool:
            if not worker and (pid := normalising_worker(process.pid)) is not None:
                worker.append(pid)
            return (bool(worker) and importing(worker[0])) or process.poll() is not None

        return check

    with started(tmp_path, *args) as process:
        wait_until(worker_importing(process), timeout=60, every=0.002)
        assert worker, "no worker was started"
        result, took = stopped(process, args, stop, whole_group=True)
        worker_reaped = gone(worker[0])
    assert_stopped_cleanly(result, took, stop)
    assert SAYS[stop] in result.stderr, result
    assert worker_reaped, "winback exited without waiting for its worker"
    history = run_cli("sync", "history", "s", "--output", "json", cwd=tmp_path)
    (run,) = history.json()
    assert (run["status"], run["error"]) == ("failed", RECORDED[stop])
    assert sqlite_rows(state_db(tmp_path), "SELECT sync FROM locks") == []


# -- a stop raised where Python drops it ----------------------------------------------------------


@pytest.mark.parametrize("stop", [KeyboardInterrupt, Terminated])
def test_a_stop_dropped_in_a_weakref_callback_is_raised_once_it_returns(
    monkeypatch: pytest.MonkeyPatch, stop: type[KeyboardInterrupt]
) -> None:
    """What happens when the garbage collector runs a weakref callback just as a signal
    arrives (seen in about one run in ten stopped during a first sync): the handler's
    exception is raised inside the callback, where Python can only drop it. The CLI's
    unraisable hook signals it again, and it is raised in the code that was running."""
    monkeypatch.setattr(sys, "unraisablehook", redeliver_dropped_stops)
    previous = signal.signal(signal.SIGTERM, stop_on_sigterm)
    try:

        class Key:
            pass

        def callback(_reference: object) -> None:
            raise stop  # as the signal handler does when it runs in the callback

        key = Key()
        reference = weakref.ref(key, callback)
        steps = []
        with pytest.raises(stop) as stopped:
            del key  # the callback runs and its exception is dropped
            steps.append("after the callback")
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                time.sleep(0.01)
        assert steps == ["after the callback"]
        assert type(stopped.value) is stop
        assert reference() is None
    finally:
        signal.signal(signal.SIGTERM, previous)
