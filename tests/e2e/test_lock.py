"""Per-sync locks through the real CLI: one run per sync at a time, stale locks are taken over."""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from connector.state import StateStore, locks, runs
from tests.fakes.webhook_receiver import WebhookReceiver
from tests.helpers import (
    SECRET,
    build_warehouse,
    finish,
    killed_on_exit,
    run_cli,
    run_many,
    segment_members,
    snapshot_members,
    start_cli,
    state_db,
    wait_until,
    webhook_destination,
    webhook_project,
    webhook_sync,
    write_config,
)


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    with WebhookReceiver(secret=SECRET) as server:
        yield server


def sync_of(body: bytes) -> str:
    import json

    sync: str = json.loads(body)["sync"]
    return sync


def test_second_run_of_the_same_sync_exits_5_at_once(
    tmp_path: Path, receiver: WebhookReceiver
) -> None:
    webhook_project(tmp_path, receiver.url, customers=30, destination={"batch_size": 5})
    receiver.delay_s = 1.0  # six slow batches: the first run holds the lock for seconds
    with killed_on_exit(start_cli("sync", "run", "--output", "json", cwd=tmp_path)) as first:
        wait_until(lambda: len(receiver.requests) >= 1)
        second = run_cli("sync", "run", "s", "--output", "json", cwd=tmp_path)
        assert first.poll() is None, "the first run ended before the second was refused"
        assert second.returncode == 5, second
        assert second.json()["exit_code"] == 5
        run = second.run()
        assert run["status"] == "locked"
        assert f"process {first.pid}" in run["error"]
        assert run["sent"] == {"add": 0, "remove": 0, "update": 0}
        status = run_cli("sync", "status", cwd=tmp_path)
        assert first.poll() is None, "the first run ended before `sync status` ran"
        assert f"pid {first.pid}" in status.stdout, status
        receiver.delay_s = 0
        done = finish(first)
    assert done.returncode == 0, done
    assert done.run()["sent"]["add"] == 30
    assert set(receiver.members) == set(segment_members(tmp_path / "warehouse.duckdb"))
    # The refused run left no trace in the history.
    history = run_cli("sync", "history", "s", "--output", "json", cwd=tmp_path)
    assert [r["status"] for r in history.json()] == ["success"]


def test_different_syncs_run_concurrently(tmp_path: Path, receiver: WebhookReceiver) -> None:
    build_warehouse(tmp_path / "warehouse.duckdb", 60)
    write_config(
        tmp_path,
        segments={
            "low": {"key": "customer_id", "sql": "SELECT * FROM customers WHERE customer_id <= 30"},
            "high": {"key": "customer_id", "sql": "SELECT * FROM customers WHERE customer_id > 30"},
        },
        destinations={"hook": webhook_destination(receiver.url, batch_size=3)},
        syncs={"a": webhook_sync(segment="low"), "b": webhook_sync(segment="high")},
    )
    receiver.delay_s = 0.3
    with killed_on_exit(start_cli("sync", "run", "a", cwd=tmp_path)) as first:
        wait_until(lambda: len(receiver.requests) >= 1)
        with killed_on_exit(start_cli("sync", "run", "b", cwd=tmp_path)) as second:
            a, b = finish(first), finish(second)
    assert a.returncode == 0, a
    assert b.returncode == 0, b
    order = [sync_of(r.body) for r in receiver.requests]
    # b started while a was running and both sent their batches side by side.
    assert order.index("b") < len(order) - 1 - order[::-1].index("a")
    assert len(receiver.members) == 60
    assert snapshot_members(tmp_path, "a") == {str(i) for i in range(1, 31)}
    assert snapshot_members(tmp_path, "b") == {str(i) for i in range(31, 61)}


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


@pytest.mark.parametrize(
    ("holder", "expected"),
    [
        pytest.param("dead-pid", 0, id="dead-process-on-this-host"),
        pytest.param("old-heartbeat", 0, id="other-host-heartbeat-expired"),
        pytest.param("live-pid", 5, id="live-process-on-this-host"),
        pytest.param("fresh-heartbeat", 5, id="other-host-heartbeat-fresh"),
    ],
)
def test_lock_rows_left_behind(
    tmp_path: Path, receiver: WebhookReceiver, holder: str, expected: int
) -> None:
    webhook_project(tmp_path, receiver.url, customers=20)
    url = f"sqlite:///{state_db(tmp_path)}"
    StateStore(url).dispose()  # creates the schema
    now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    host, pid, heartbeat = {
        "dead-pid": (socket.gethostname(), dead_pid(), now),
        "live-pid": (socket.gethostname(), os.getpid(), now - dt.timedelta(hours=3)),
        "old-heartbeat": ("build-box-7", 4242, now - dt.timedelta(minutes=31)),
        "fresh-heartbeat": ("build-box-7", 4242, now - dt.timedelta(minutes=5)),
    }[holder]
    engine = sa.create_engine(url)
    with engine.begin() as connection:
        connection.execute(
            runs.insert().values(run_id="old-run", sync="s", status="running", started_at=heartbeat)
        )
        connection.execute(
            locks.insert().values(
                sync="s",
                run_id="old-run",
                host=host,
                pid=pid,
                acquired_at=heartbeat,
                heartbeat_at=heartbeat,
            )
        )

    status = run_cli("sync", "status", cwd=tmp_path)  # a dead run's lock is not shown
    assert (f"pid {pid} on {host}" in status.stdout) == (expected != 0), status
    assert ("interrupted" in status.stdout) == (expected == 0), status
    if expected == 0:  # nothing holds the sync: it can be reset
        reset = run_cli("sync", "reset", "s", "--yes", cwd=tmp_path)
        assert reset.returncode == 0, reset

    result = run_cli("sync", "run", "--output", "json", cwd=tmp_path)
    assert result.returncode == expected, result
    if expected == 0:
        assert result.run()["status"] == "success"
        assert len(receiver.members) == 20
    else:
        assert result.run()["status"] == "locked"
        assert host in result.run()["error"]
        assert receiver.requests == []
        # `sync reset` refuses too while the sync runs.
        reset = run_cli("sync", "reset", "s", "--yes", cwd=tmp_path)
        assert reset.returncode == 5, reset
        assert str(pid) in reset.stderr
    with engine.connect() as connection:
        left = connection.execute(sa.select(locks.c.run_id)).scalars().all()
    engine.dispose()
    assert left == ([] if expected == 0 else ["old-run"])


def test_many_syncs_run_in_parallel_on_one_sqlite_state_file(tmp_path: Path) -> None:
    """A scheduler starting every sync at once: the first runs create the store together, and
    later runs plan and record side by side. Before, SQLite refused at once ("table already
    exists", "database is locked": a transaction that read, then wrote after another run's
    commit) and about one run in five failed."""
    assert run_cli("init", "--demo", cwd=tmp_path).returncode == 0
    syncs = ["lapsed_to_csv", "prospects_to_jsonl", "accounts_to_csv", "big_spenders_to_jsonl"]
    for round_number in range(3):
        again = ["--full-resync"] if round_number else []
        commands = [("sync", "run", name, *again) for name in syncs]
        commands += [("sync", "plan", syncs[round_number])]
        for result in run_many(*commands, cwd=tmp_path):
            assert result.returncode == 0, result
    history = run_cli("sync", "history", "lapsed_to_csv", "--output", "json", cwd=tmp_path)
    assert [run["status"] for run in json.loads(history.stdout)] == ["success"] * 3
