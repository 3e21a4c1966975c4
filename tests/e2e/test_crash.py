"""`kill -9` at any point loses nothing: the next run re-sends exactly what was not acknowledged.

A 20,000-customer warehouse is synced to the fake webhook receiver running as its own process
(batches of 200, a small delay per request). `winback sync run` is SIGKILLed while it reads the
segment, twice while it adds, and while it removes during a second run; each time the next run
must finish the job: the receiver's audience equals the segment exactly, the state snapshot
equals the segment, and the only keys added twice are those of the batch in flight at a kill.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from destinations.testing.http_server import FakeHttpServer, RecordedRequest, ScriptedResponse
from tests.helpers import (
    LoggedReceiverProcess,
    build_warehouse,
    finish,
    segment_members,
    snapshot_members,
    sqlite_rows,
    start_cli,
    state_db,
    wait_until,
    warehouse_sql,
    webhook_destination,
    webhook_project,
    webhook_sync,
    write_config,
)

CUSTOMERS = 20_000
BATCH = 200
RUN = ("sync", "run", "s", "--output", "json")


@contextmanager
def crash_project(folder: Path) -> Iterator[LoggedReceiverProcess]:
    """A CUSTOMERS-row warehouse synced to a slow receiver process in batches of BATCH."""
    build_warehouse(folder / "warehouse.duckdb", CUSTOMERS)
    with LoggedReceiverProcess(folder, delay_s=0.005) as receiver:
        write_config(
            folder,
            destinations={"hook": webhook_destination(receiver.url, batch_size=BATCH)},
            syncs={"s": webhook_sync()},
        )
        yield receiver


def lock_holder(folder: Path) -> int | None:
    rows = sqlite_rows(state_db(folder), "SELECT pid FROM locks WHERE sync = 's'")
    return rows[0][0] if rows else None


def running_runs(folder: Path) -> list[tuple[object, ...]]:
    return sqlite_rows(state_db(folder), "SELECT run_id FROM runs WHERE status = 'running'")


def kill_when(process: subprocess.Popen[str], condition: Callable[[], bool]) -> None:
    """SIGKILL the run as soon as `condition()` holds (it must still be running then)."""
    wait_until(lambda: bool(condition()) or process.poll() is not None, timeout=60, every=0.005)
    assert process.poll() is None, finish(process, RUN)
    process.kill()
    process.wait(timeout=10)
    finish(process, RUN)


def complete_run(folder: Path) -> dict[str, object]:
    result = finish(start_cli(*RUN, cwd=folder), RUN, timeout=120)
    assert result.returncode == 0, result
    run: dict[str, object] = result.run()
    return run


def kill_while_removing(folder: Path, receiver: LoggedReceiverProcess, *, requests: int) -> None:
    """Start a run and SIGKILL it once it has sent `requests` requests, all of them removals
    (which a run sends first)."""
    applied = len(receiver.log())
    sent_before = receiver.requests()
    removing = start_cli(*RUN, cwd=folder)
    kill_when(removing, lambda: receiver.requests() >= sent_before + requests)
    in_killed_run = receiver.log()[applied:]
    assert in_killed_run
    assert {entry["action"] for entry in in_killed_run} == {"remove"}


def duplicate_adds(log: list[dict[str, object]]) -> dict[str, int]:
    """Keys added again while already in the audience (no remove in between): key -> times."""
    present: set[str] = set()
    again: dict[str, int] = {}
    for entry in log:
        keys = entry["keys"]
        assert isinstance(keys, list)
        for key in keys:
            if entry["action"] == "add":
                if key in present:
                    again[key] = again.get(key, 0) + 1
                present.add(key)
            elif entry["action"] == "remove":
                present.discard(key)
    return again


def assert_in_sync(folder: Path, receiver: LoggedReceiverProcess) -> None:
    segment = segment_members(folder / "warehouse.duckdb")
    members = receiver.members()
    assert set(members) == set(segment)
    assert {k: m["identifiers"]["email"] for k, m in members.items()} == segment
    assert snapshot_members(folder, "s") == set(segment)
    assert lock_holder(folder) is None


@pytest.mark.slow
def test_kill_at_any_point_loses_nothing(tmp_path: Path) -> None:
    with crash_project(tmp_path) as receiver:
        # 1. Killed once its run is recorded, while it reads and plans the segment: nothing sent.
        early = start_cli(*RUN, cwd=tmp_path)
        kill_when(early, lambda: bool(running_runs(tmp_path)))
        assert receiver.requests() == 0
        # Its lock stays behind, held by a dead process on this host.
        assert lock_holder(tmp_path) == early.pid
        with pytest.raises(ProcessLookupError):
            os.kill(early.pid, 0)

        # 2. and 3. Killed twice while adding; each run takes over the dead run's lock.
        first = start_cli(*RUN, cwd=tmp_path)
        kill_when(first, lambda: receiver.requests() >= 10)
        assert lock_holder(tmp_path) == first.pid
        # The killed run's record shows what its checkpoints recorded.
        (killed,) = sqlite_rows(
            state_db(tmp_path), "SELECT sent_add, batches FROM runs WHERE status = 'running'"
        )
        assert 0 < killed[0] == killed[1] * BATCH <= receiver.requests() * BATCH
        history = finish(start_cli("sync", "history", "s", "-o", "json", cwd=tmp_path), RUN)
        assert [run["status"] for run in history.json()] == ["interrupted", "interrupted"]
        sent_before = receiver.requests()
        second = start_cli(*RUN, cwd=tmp_path)
        kill_when(second, lambda: receiver.requests() >= sent_before + 25)
        assert 0 < len(receiver.members()) < CUSTOMERS

        run = complete_run(tmp_path)
        assert run["status"] == "success"
        sent = run["sent"]
        assert isinstance(sent, dict)
        assert 0 < sent["add"] < CUSTOMERS
        assert_in_sync(tmp_path, receiver)
        again = duplicate_adds(receiver.log())
        # At-least-once: only the batch in flight at each of the two kills may come twice.
        assert len(again) <= 2 * BATCH, len(again)
        assert set(again.values()) <= {1}

        # 4. A second run removes 30% (below the guard), changes 500 emails, adds 1,000 people;
        # it is killed during the removals, which come first.
        warehouse = tmp_path / "warehouse.duckdb"
        warehouse_sql(
            warehouse,
            "UPDATE customers SET lapsed = false WHERE customer_id % 10 IN (1, 2, 3)",
            "UPDATE customers SET email = 'moved.' || email "
            "WHERE customer_id % 10 = 5 AND customer_id <= 5000",
            "INSERT INTO customers SELECT i, 'user' || i || '@example.com', NULL, 'Name' || i, "
            "'US', 't0', true FROM range(20001, 21001) AS r(i)",
        )
        kill_while_removing(tmp_path, receiver, requests=5)
        run = complete_run(tmp_path)
        assert run["status"] == "success"
        planned = run["planned"]
        assert isinstance(planned, dict)
        assert (planned["add"], planned["update"]) == (1000, 500)
        # What the killed run had removed (and checkpointed) is not removed again.
        assert 0 < planned["remove"] <= 6000 - 4 * BATCH
        assert_in_sync(tmp_path, receiver)
        again = duplicate_adds(receiver.log())
        assert len(again) <= 2 * BATCH
        assert set(again.values()) <= {1}

        # Nothing is left to do, and no killed run is still shown as running.
        final = complete_run(tmp_path)
        assert final["planned"] == {"add": 0, "remove": 0, "update": 0}
        statuses = sqlite_rows(state_db(tmp_path), "SELECT status FROM runs")
        assert len(statuses) == 7
        assert not running_runs(tmp_path)


def interrupt_after_requests(
    folder: Path, receiver: LoggedReceiverProcess, requests: int, stop: signal.Signals
) -> None:
    """Start a run, send it `stop` once the receiver has had `requests` requests, check that
    it stops at once, says what is kept and leaves no lock or running run behind."""
    process = start_cli(*RUN, cwd=folder)
    wait_until(
        lambda: receiver.requests() >= requests or process.poll() is not None,
        timeout=60,
        every=0.005,
    )
    assert process.poll() is None, finish(process, RUN)
    interrupted_at = time.monotonic()
    process.send_signal(stop)
    result = finish(process, RUN, timeout=30)
    assert time.monotonic() - interrupted_at < 15
    assert result.returncode == (130 if stop == signal.SIGINT else 143), result
    assert "next run sends the rest" in result.stderr
    assert "Traceback" not in result.stderr
    assert lock_holder(folder) is None
    assert not running_runs(folder)


@pytest.mark.slow
def test_ctrl_c_or_sigterm_is_recorded_and_the_next_run_sends_the_rest(tmp_path: Path) -> None:
    """SIGINT (Ctrl-C) or SIGTERM stops a large first sync within seconds, says what is kept,
    records the run and releases the lock; the next run sends exactly what is missing."""
    with crash_project(tmp_path) as receiver:
        # Ctrl-C early in the first run, then a scheduler's SIGTERM in the run resuming it.
        for interrupt_after, stop in ((3, signal.SIGINT), (12, signal.SIGTERM)):
            interrupt_after_requests(
                tmp_path, receiver, receiver.requests() + interrupt_after, stop
            )

        statuses = sqlite_rows(state_db(tmp_path), "SELECT status, error FROM runs")
        assert statuses == [("failed", "interrupted by the user"), ("failed", "stopped by SIGTERM")]
        run = complete_run(tmp_path)
        assert run["status"] == "success"
        assert_in_sync(tmp_path, receiver)
        again = duplicate_adds(receiver.log())
        # At-least-once: only what was in flight at each interrupt may come twice.
        assert len(again) <= 2 * 2 * BATCH, len(again)
        assert set(again.values()) <= {1}


@pytest.mark.parametrize("receiver_answer", ["held", "retry_in_a_minute"])
@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_stop_does_not_wait_for_the_batch_in_flight(
    tmp_path: Path, receiver_answer: str, stop: signal.Signals
) -> None:
    """The only batch is in flight: its request held by the receiver for a minute, or answered
    503 with `Retry-After: 60`. Ctrl-C or SIGTERM stops the run without waiting for the answer
    or the retry; the run is recorded (JSON too) and the next run sends the batch."""
    released = threading.Event()

    def answer(request: RecordedRequest) -> ScriptedResponse:
        if released.is_set():
            return ScriptedResponse(200)
        if receiver_answer == "held":
            released.wait(60)
            return ScriptedResponse(200)
        return ScriptedResponse(503, headers={"Retry-After": "60"})

    slow_retry = {"max_attempts": 5, "initial_backoff_s": 60, "max_backoff_s": 60, "timeout_s": 60}
    with FakeHttpServer(answer) as server:
        webhook_project(
            tmp_path, server.url + "/hook", customers=10, destination={"retry": slow_retry}
        )
        process = start_cli(*RUN, cwd=tmp_path)
        wait_until(lambda: len(server.requests) >= 1 or process.poll() is not None)
        time.sleep(0.2)  # into the wait for the answer, or for the retry
        process.send_signal(stop)
        try:
            result = finish(process, RUN, timeout=20)  # well before the receiver's minute
        finally:
            released.set()
        assert result.returncode == (130 if stop == signal.SIGINT else 143), result
        assert result.json()["exit_code"] == result.returncode
        (run,) = result.json()["runs"]
        assert (run["status"], run["sent"]["add"]) == ("failed", 0)
        assert "next run sends the rest" in result.json()["error"]
        assert len(server.requests) == 1  # no retry once stopped
        assert lock_holder(tmp_path) is None
        assert not running_runs(tmp_path)

        rerun = finish(start_cli(*RUN, cwd=tmp_path), RUN)
        assert rerun.returncode == 0, rerun
        assert rerun.json()["runs"][0]["sent"]["add"] == 10


def test_ctrl_c_in_text_mode_still_prints_the_syncs_that_finished(tmp_path: Path) -> None:
    """Sync `a` finishes, Ctrl-C comes while `b`'s batch is held by the receiver: the text
    output shows both runs (`a` succeeded, `b` failed), not only the error."""
    released = threading.Event()

    def answer(request: RecordedRequest) -> ScriptedResponse:
        if request.json()["sync"] == "b":
            released.wait(60)
        return ScriptedResponse(200)

    build_warehouse(tmp_path / "warehouse.duckdb", 10)
    args = ("sync", "run")
    with FakeHttpServer(answer) as server:
        write_config(
            tmp_path,
            destinations={"hook": webhook_destination(server.url + "/hook")},
            syncs={"a": webhook_sync(), "b": webhook_sync()},
        )
        process = start_cli(*args, cwd=tmp_path)
        wait_until(
            lambda: (
                any(r.json()["sync"] == "b" for r in list(server.requests))
                or process.poll() is not None
            )
        )
        time.sleep(0.2)
        process.send_signal(signal.SIGINT)
        try:
            result = finish(process, args, timeout=20)
        finally:
            released.set()
    assert result.returncode == 130, result
    assert "a: success" in result.stdout, result
    assert "b: failed" in result.stdout, result
    assert "error: interrupted" in result.stderr


@pytest.mark.parametrize("action", ["add", "remove"])
def test_a_batch_applied_without_an_answer_is_settled_whatever_the_segment_does_next(
    tmp_path: Path, action: str
) -> None:
    """The receiver applies a batch, and the run is killed before the answer comes back. Then
    the segment undoes that change: the person being added leaves, or the person being removed
    comes back. The next run must remove the one who left (nobody else would: winback never
    saw the add acknowledged), or add the one who came back (the snapshot still has them)."""
    members: dict[str, dict[str, object]] = {}
    guard = threading.Lock()
    hold = threading.Event()
    released = threading.Event()

    def answer(request: RecordedRequest) -> ScriptedResponse:
        body = request.json()
        with guard:
            for record in body["records"]:
                if body["action"] == "remove":
                    members.pop(record["key"], None)
                else:
                    members[record["key"]] = record
        if body["action"] == action and hold.is_set():
            released.wait(60)  # applied; the answer never reaches the killed run
        return ScriptedResponse(200)

    warehouse = tmp_path / "warehouse.duckdb"
    with FakeHttpServer(answer) as server:
        webhook_project(tmp_path, server.url + "/hook", customers=10)
        if action == "remove":
            complete_run(tmp_path)
            warehouse_sql(warehouse, "UPDATE customers SET lapsed = false WHERE customer_id = 3")
        hold.set()
        try:
            process = start_cli(*RUN, cwd=tmp_path)
            held = 2 if action == "remove" else 1
            wait_until(lambda: len(server.requests) >= held or process.poll() is not None)
            time.sleep(0.2)  # the receiver holds the batch, the run waits for the answer
            live = finish(start_cli("sync", "plan", cwd=tmp_path), ("sync", "plan"))
            assert "a run of this sync is in progress" in live.stderr, live
            kill_when(process, lambda: True)
        finally:
            released.set()
        lapsed = "false" if action == "add" else "true"
        warehouse_sql(warehouse, f"UPDATE customers SET lapsed = {lapsed} WHERE customer_id = 3")

        state_before = sqlite_rows(state_db(tmp_path), "SELECT * FROM snapshot ORDER BY key")
        plan = finish(start_cli("sync", "plan", cwd=tmp_path), ("sync", "plan"))
        assert plan.returncode == 0, plan
        assert "sent by an earlier run" in plan.stderr and "not counted here" in plan.stderr
        assert sqlite_rows(state_db(tmp_path), "SELECT * FROM snapshot ORDER BY key") == (
            state_before
        )
        assert sqlite_rows(state_db(tmp_path), "SELECT count(*) FROM in_flight") != [(0,)]
        status = finish(start_cli("sync", "status", cwd=tmp_path), ("sync", "status"))
        shown = "0 (+10 unconfirmed)" if action == "add" else "9 (+1 unconfirmed)"
        assert shown in status.stdout, status.stdout

        run = complete_run(tmp_path)

        assert set(members) == set(segment_members(warehouse))
        assert snapshot_members(tmp_path, "s") == set(members)
        assert run["sent"] == (
            {"add": 9, "remove": 1, "update": 0}
            if action == "add"
            else {"add": 1, "remove": 0, "update": 0}
        )
        rerun = complete_run(tmp_path)
        assert rerun["batches"] == 0
