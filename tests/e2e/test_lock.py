"""Per-sync locks through the real CLI: one run per sync at a time, stale locks are taken over."""

from __future__ import annotations

import datetime as dt
import json
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy as sa

from connector.state import StateStore, locks, pid_namespace, runs
from tests.fakes.webhook_receiver import WebhookReceiver
from tests.helpers import (
    SECRET,
    build_warehouse,
    cli_env,
    dead_pid,
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


HELD = {"max_attempts": 3, "initial_backoff_s": 0.01, "max_backoff_s": 0.2, "timeout_s": 90}
"""Retries whose timeout outlasts a held answer (`WebhookReceiver.hold`)."""


def test_second_run_of_the_same_sync_exits_5_at_once(
    tmp_path: Path, receiver: WebhookReceiver
) -> None:
    webhook_project(
        tmp_path, receiver.url, customers=30, destination={"batch_size": 5, "retry": HELD}
    )
    receiver.hold()  # the first run waits on its first batch, holding the lock, until released
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
        receiver.release()
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
        destinations={"hook": webhook_destination(receiver.url, batch_size=3, retry=HELD)},
        syncs={"a": webhook_sync(segment="low"), "b": webhook_sync(segment="high")},
    )
    receiver.hold()  # a waits on its first batch until b has sent one too
    with killed_on_exit(start_cli("sync", "run", "a", cwd=tmp_path)) as first:
        wait_until(lambda: len(receiver.requests) >= 1)
        with killed_on_exit(start_cli("sync", "run", "b", cwd=tmp_path)) as second:
            wait_until(lambda: len(receiver.requests) >= 2)
            receiver.release()
            a, b = finish(first), finish(second)
    assert a.returncode == 0, a
    assert b.returncode == 0, b
    order = [sync_of(r.body) for r in receiver.requests]
    # b started while a was running and both sent their batches side by side.
    assert order.index("b") < len(order) - 1 - order[::-1].index("a")
    assert len(receiver.members) == 60
    assert snapshot_members(tmp_path, "a") == {str(i) for i in range(1, 31)}
    assert snapshot_members(tmp_path, "b") == {str(i) for i in range(31, 61)}


OTHER_HOST = "build-box-7"
OTHER_NAMESPACE = "pid:[4026599999]"
"""A PID namespace that is not this test's: another container under the same host name."""
FRESH = dt.timedelta(minutes=5)
OLD = dt.timedelta(minutes=31)


@dataclass(frozen=True)
class LeftLock:
    """A lock row some run left: where it was taken, its pid and the age of its heartbeat."""

    host: str
    pid: str  # "dead", "live" (an unrelated process) or a number
    namespace: str | None  # "ours", another one, or None (a winback before schema 4)
    heartbeat_age: dt.timedelta
    expected: int  # the next run's exit code: 0 (taken over) or 5 (locked)
    why: str = ""  # the taken-over run's error


HERE = socket.gethostname()
LEFT_LOCKS = {
    "dead-pid-this-namespace": LeftLock(HERE, "dead", "ours", FRESH, 0, "process died"),
    "dead-pid-older-winback": LeftLock(HERE, "dead", None, FRESH, 0, "process died"),
    "live-pid-fresh-heartbeat": LeftLock(HERE, "live", "ours", FRESH, 5),
    "live-pid-old-heartbeat": LeftLock(
        HERE, "live", "ours", dt.timedelta(hours=3), 0, "no heartbeat for over 30 minutes"
    ),
    "live-pid-old-heartbeat-older-winback": LeftLock(
        HERE, "live", None, dt.timedelta(hours=3), 0, "no heartbeat"
    ),
    "other-namespace-dead-pid-fresh-heartbeat": LeftLock(HERE, "dead", OTHER_NAMESPACE, FRESH, 5),
    "other-namespace-dead-pid-old-heartbeat": LeftLock(
        HERE, "dead", OTHER_NAMESPACE, OLD, 0, "no heartbeat"
    ),
    "other-host-heartbeat-expired": LeftLock(OTHER_HOST, "4242", None, OLD, 0, "no heartbeat"),
    "other-host-heartbeat-fresh": LeftLock(OTHER_HOST, "4242", None, FRESH, 5),
    "other-host-same-namespace-number": LeftLock(OTHER_HOST, "dead", "ours", FRESH, 5),
}


def check_lock_left_behind(
    tmp_path: Path, receiver: WebhookReceiver, left: LeftLock, live_pid: int, state_url: str
) -> None:
    """Write `left` into a new state store, then `sync status`, `sync reset` and `sync run`
    must all judge it alike: taken over (the run it stood for shown `interrupted`), or held."""
    webhook_project(tmp_path, receiver.url, customers=20, state_url=state_url)
    StateStore(state_url).dispose()  # creates the schema
    now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    heartbeat = now - left.heartbeat_age
    pid = dead_pid() if left.pid == "dead" else live_pid if left.pid == "live" else int(left.pid)
    namespace = pid_namespace() if left.namespace == "ours" else left.namespace
    engine = sa.create_engine(state_url)
    try:
        with engine.begin() as connection:
            connection.execute(
                runs.insert().values(
                    run_id="old-run", sync="s", status="running", started_at=heartbeat
                )
            )
            connection.execute(
                locks.insert().values(
                    sync="s",
                    run_id="old-run",
                    host=left.host,
                    pid=pid,
                    pid_namespace=namespace,
                    acquired_at=heartbeat,
                    heartbeat_at=heartbeat,
                )
            )

        status = run_cli("sync", "status", cwd=tmp_path)  # a dead run's lock is not shown
        assert (f"pid {pid} on {left.host}" in status.stdout) == (left.expected != 0), status
        assert ("interrupted" in status.stdout) == (left.expected == 0), status
        if left.expected == 0:  # nothing holds the sync: it can be reset
            reset = run_cli("sync", "reset", "s", "--yes", cwd=tmp_path)
            assert reset.returncode == 0, reset

        result = run_cli("sync", "run", "--output", "json", cwd=tmp_path)
        assert result.returncode == left.expected, result
        if left.expected == 0:
            assert result.run()["status"] == "success"
            assert len(receiver.members) == 20
        else:
            assert result.run()["status"] == "locked"
            error = result.run()["error"]
            assert f"process {pid} on {left.host}" in error
            other_namespace = left.host == HERE and left.namespace == OTHER_NAMESPACE
            assert ("in another PID namespace" in error) == other_namespace, error
            assert receiver.requests == []
            # `sync reset` refuses too while the sync runs.
            reset = run_cli("sync", "reset", "s", "--yes", cwd=tmp_path)
            assert reset.returncode == 5, reset
            assert str(pid) in reset.stderr
        with engine.connect() as connection:
            left_rows = connection.execute(sa.select(locks.c.run_id)).scalars().all()
            old_run = connection.execute(
                sa.select(runs.c.status, runs.c.error).where(runs.c.run_id == "old-run")
            ).one()
    finally:
        engine.dispose()
    assert left_rows == ([] if left.expected == 0 else ["old-run"])
    if left.expected == 0:
        assert old_run.status == "interrupted"
        assert left.why in old_run.error
    else:
        assert tuple(old_run) == ("running", None)


@pytest.mark.parametrize("case", list(LEFT_LOCKS))
def test_lock_rows_left_behind(
    tmp_path: Path, receiver: WebhookReceiver, live_pid: int, case: str
) -> None:
    state_url = f"sqlite:///{state_db(tmp_path)}"
    check_lock_left_behind(tmp_path, receiver, LEFT_LOCKS[case], live_pid, state_url)


@pytest.mark.postgres
@pytest.mark.parametrize(
    "case",
    [
        "dead-pid-this-namespace",
        "live-pid-old-heartbeat",
        "other-namespace-dead-pid-fresh-heartbeat",
        "other-namespace-dead-pid-old-heartbeat",
    ],
)
def test_lock_rows_left_behind_in_a_postgresql_state_store(
    tmp_path: Path, receiver: WebhookReceiver, live_pid: int, postgres_url: str, case: str
) -> None:
    """The store several machines and containers share: the same rules."""
    check_lock_left_behind(tmp_path, receiver, LEFT_LOCKS[case], live_pid, postgres_url)


UNSHARE = ("unshare", "--user", "--map-root-user", "--pid", "--fork", "--mount-proc")


def unshare_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    try:
        done = subprocess.run([*UNSHARE, "true"], capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


@pytest.mark.skipif(
    not unshare_works(), reason="needs `unshare` of user and PID namespaces (Linux)"
)
def test_a_run_in_another_pid_namespace_on_this_host_keeps_its_lock(
    tmp_path: Path, receiver: WebhookReceiver
) -> None:
    """A run in a container sharing this host's name: its pid means nothing here, even a pid
    no process has here (as the run gets it inside its namespace), so a second run from this
    namespace exits 5 instead of taking the live lock over and sending alongside it."""
    webhook_project(
        tmp_path, receiver.url, customers=30, destination={"batch_size": 5, "retry": HELD}
    )
    receiver.hold()  # the first run waits on its first batch, holding the lock, until released
    free = dead_pid()  # the pid the run gets in its namespace, where it can be chosen
    script = (
        'echo "$1" > /proc/sys/kernel/ns_last_pid 2>/dev/null; shift; '
        '"$0" -m connector sync run --output json; exit $?'
    )
    first = subprocess.Popen(
        [*UNSHARE, "--kill-child", "sh", "-c", script, sys.executable, str(free - 1)],
        cwd=tmp_path,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    with killed_on_exit(first):
        wait_until(lambda: len(receiver.requests) >= 1)
        held = StateStore(f"sqlite:///{state_db(tmp_path)}")
        try:
            holder = held.lock_holder("s")
        finally:
            held.dispose()
        assert holder is not None
        assert holder.host == socket.gethostname()
        assert holder.pid_namespace not in (None, pid_namespace())
        second = run_cli("sync", "run", "s", "--output", "json", cwd=tmp_path)
        status = run_cli("sync", "status", cwd=tmp_path)
        assert second.returncode == 5, second  # not taken over: no second run alongside
        assert first.poll() is None, "the first run ended before the second was refused"
        assert second.run()["status"] == "locked"
        refusal = second.run()["error"]
        assert f"process {holder.pid} on {holder.host} (in another PID namespace)" in refusal
        assert f"pid {holder.pid} on {holder.host}" in status.stdout, status
        receiver.release()
        done = finish(first)
    assert done.returncode == 0, done
    assert done.run()["sent"]["add"] == 30
    assert len(receiver.requests) == 6  # the first run's batches only, none sent twice
    assert set(receiver.members) == set(segment_members(tmp_path / "warehouse.duckdb"))
    assert snapshot_members(tmp_path, "s") == set(segment_members(tmp_path / "warehouse.duckdb"))


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
