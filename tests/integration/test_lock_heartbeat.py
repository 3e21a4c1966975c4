"""Lock rows and who may take them over, on SQLite and PostgreSQL state stores.

A running sync keeps its lock's heartbeat fresh even while no batch is checkpointed (a long
segment query or plan), so a run on another host does not take the lock over (LOCK_TTL). A
heartbeat older than that makes a lock stale anywhere; before that, a lock taken on this host in
this PID namespace is stale as soon as its process is gone, and one taken in another namespace
(a container under the same host name) is judged by its heartbeat only."""

from __future__ import annotations

import datetime as dt
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from connector.errors import LockedError
from connector.state import LOCK_TTL, StateStore, locks, pid_namespace, runs, utcnow
from tests.helpers import dead_pid


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StateStore]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'state.db'}"
    else:
        url = str(request.getfixturevalue("postgres_url"))
    opened = StateStore(url)
    try:
        yield opened
    finally:
        opened.dispose()


def heartbeat_at(store: StateStore) -> object:
    with store.engine.connect() as connection:
        return connection.execute(sa.select(locks.c.heartbeat_at)).scalar_one()


def test_the_lock_is_kept_alive_while_the_run_is_busy_elsewhere(store: StateStore) -> None:
    store.acquire_lock("s", "run-1")
    taken = heartbeat_at(store)
    with store.lock_kept_alive("s", "run-1", every_s=0.05):
        time.sleep(0.4)  # a segment query that checkpoints nothing
    refreshed = heartbeat_at(store)
    assert refreshed > taken  # type: ignore[operator]
    time.sleep(0.2)
    assert heartbeat_at(store) == refreshed  # the thread stopped with the block


def test_a_lock_says_where_it_was_taken(store: StateStore) -> None:
    store.acquire_lock("s", "run-1")
    holder = store.lock_holder("s", live_only=True)
    assert holder is not None
    assert (holder.run_id, holder.host, holder.pid) == ("run-1", socket.gethostname(), os.getpid())
    try:
        ours: str | None = os.readlink("/proc/self/ns/pid")
    except OSError:  # not Linux, or no /proc: judged by host and pid, as before
        ours = None
    assert holder.pid_namespace == ours == pid_namespace()
    with pytest.raises(LockedError, match=rf"process {os.getpid()} on {socket.gethostname()},"):
        store.acquire_lock("s", "run-2")


OTHER_NAMESPACE = "pid:[4026599999]"
OLD = LOCK_TTL + dt.timedelta(minutes=1)
FRESH = dt.timedelta(minutes=2)

# (host, pid, namespace, heartbeat age, stale): "here" is this host, "ours" this namespace.
CASES = {
    "dead-pid-here": ("here", "dead", "ours", FRESH, True),
    "dead-pid-here-older-winback": ("here", "dead", None, FRESH, True),
    "live-pid-here-fresh": ("here", "live", "ours", FRESH, False),
    "live-pid-here-old-heartbeat": ("here", "live", "ours", OLD, True),
    "live-pid-here-old-heartbeat-older-winback": ("here", "live", None, OLD, True),
    "other-namespace-dead-pid-fresh": ("here", "dead", OTHER_NAMESPACE, FRESH, False),
    "other-namespace-live-pid-fresh": ("here", "live", OTHER_NAMESPACE, FRESH, False),
    "other-namespace-dead-pid-old-heartbeat": ("here", "dead", OTHER_NAMESPACE, OLD, True),
    "other-host-dead-pid-our-namespace-fresh": ("elsewhere", "dead", "ours", FRESH, False),
    "other-host-old-heartbeat": ("elsewhere", "live", "ours", OLD, True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_who_takes_a_lock_over(store: StateStore, live_pid: int, case: str) -> None:
    """`lock_holder(live_only=True)` (what `sync status` and `sync reset` show) and
    `acquire_lock` (what `sync run` does) agree on every lock row."""
    host, pid, namespace, age, stale = CASES[case]
    heartbeat = utcnow() - age
    with store.engine.begin() as connection:
        connection.execute(
            runs.insert().values(run_id="old", sync="s", status="running", started_at=heartbeat)
        )
        connection.execute(
            locks.insert().values(
                sync="s",
                run_id="old",
                host=socket.gethostname() if host == "here" else "build-box-7",
                pid=dead_pid() if pid == "dead" else live_pid,
                pid_namespace=pid_namespace() if namespace == "ours" else namespace,
                acquired_at=heartbeat,
                heartbeat_at=heartbeat,
            )
        )
    assert store.lock_holder("s") is not None
    assert (store.lock_holder("s", live_only=True) is None) == stale
    if stale:
        store.acquire_lock("s", "new")
        holder = store.lock_holder("s", live_only=True)
        assert holder is not None
        assert holder.run_id == "new"
        with store.engine.connect() as connection:
            old = connection.execute(
                sa.select(runs.c.status, runs.c.error).where(runs.c.run_id == "old")
            ).one()
        assert old.status == "interrupted"
        why = "process died" if age == FRESH else "no heartbeat for over 30 minutes"
        assert why in old.error
    else:
        with pytest.raises(LockedError) as refused:
            store.acquire_lock("s", "new")
        assert ("in another PID namespace" in str(refused.value)) == (namespace == OTHER_NAMESPACE)
        holder = store.lock_holder("s", live_only=True)
        assert holder is not None
        assert holder.run_id == "old"
