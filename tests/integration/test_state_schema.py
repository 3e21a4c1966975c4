"""The state store's schema: created on first use with its version, refused when newer."""

from __future__ import annotations

import datetime as dt
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import sqlalchemy as sa

from connector.errors import LockedError, StateError
from connector.state import SCHEMA_VERSION, StateStore, locks, schema_info, snapshot
from tests.helpers import prepared_database


def test_a_new_store_has_the_current_schema(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'state.db'}"
    StateStore(url).dispose()
    StateStore(url).dispose()  # opening again changes nothing
    engine = sa.create_engine(url)
    with engine.connect() as connection:
        assert connection.execute(sa.select(schema_info.c.version)).scalar_one() == SCHEMA_VERSION
    engine.dispose()


def test_a_store_from_a_newer_winback_is_refused(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'state.db'}"
    StateStore(url).dispose()
    engine = sa.create_engine(url)
    with engine.begin() as connection:
        connection.execute(schema_info.update().values(version=SCHEMA_VERSION + 1))
    engine.dispose()
    with pytest.raises(StateError, match="newer than this winback"):
        StateStore(url)


V1_TABLES = (
    "CREATE TABLE winback_schema (version INTEGER NOT NULL)",
    "CREATE TABLE snapshot (sync VARCHAR(200) NOT NULL, key VARCHAR(500) NOT NULL, "
    "status VARCHAR(16) NOT NULL, raw_fp VARCHAR(40) NOT NULL, identity_fp VARCHAR(40) NOT NULL, "
    "fields_fp VARCHAR(40) NOT NULL, identifiers TEXT NOT NULL, platform_id VARCHAR(200), "
    "first_added_at TIMESTAMP, last_sent_at TIMESTAMP, PRIMARY KEY (sync, key))",
    "INSERT INTO winback_schema (version) VALUES (1)",
    "INSERT INTO snapshot VALUES ('s', '1', 'member', 'r', 'i', 'f', '{\"email\": \"a@b.co\"}', "
    "NULL, NULL, NULL)",
)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def v1_store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A store as winback with schema version 1 left it, holding one member."""
    return prepared_database(request, tmp_path, "state.db", V1_TABLES)


def test_a_version_1_store_is_migrated_in_place(v1_store_url: str) -> None:
    store = StateStore(v1_store_url)
    try:
        with store.engine.connect() as connection:
            version = connection.execute(sa.select(schema_info.c.version)).scalar_one()
            member = connection.execute(
                sa.select(snapshot.c.key, snapshot.c.status, snapshot.c.reason)
            ).one()
            indexes = {i["name"] for i in sa.inspect(connection).get_indexes("snapshot")}
            tables = set(sa.inspect(connection).get_table_names())
        assert version == SCHEMA_VERSION == 4
        assert tuple(member) == ("1", "member", None)
        assert "snapshot_skipped" in indexes
        assert {"in_flight", "sync_targets", "locks"} <= tables
        assert store.audience_size(None, "s") == 1
    finally:
        store.dispose()
    StateStore(v1_store_url).dispose()  # opening again changes nothing


def v3_tables(host: str, pid: int, heartbeat: dt.datetime) -> tuple[str, ...]:
    """A store as winback with schema version 3 left it: one member, and the lock of a run on
    `host` (process `pid`, last heartbeat at `heartbeat`), with no PID namespace."""
    at = f"'{heartbeat:%Y-%m-%d %H:%M:%S}'"
    return (
        "CREATE TABLE winback_schema (version INTEGER NOT NULL)",
        "CREATE TABLE snapshot (sync VARCHAR(200) NOT NULL, key VARCHAR(500) NOT NULL, "
        "status VARCHAR(16) NOT NULL, raw_fp VARCHAR(40) NOT NULL, "
        "identity_fp VARCHAR(40) NOT NULL, fields_fp VARCHAR(40) NOT NULL, "
        "identifiers TEXT NOT NULL, platform_id VARCHAR(200), first_added_at TIMESTAMP, "
        "last_sent_at TIMESTAMP, reason TEXT, PRIMARY KEY (sync, key))",
        "CREATE TABLE runs (run_id VARCHAR(40) NOT NULL PRIMARY KEY, sync VARCHAR(200) NOT NULL, "
        "status VARCHAR(16) NOT NULL, started_at TIMESTAMP NOT NULL, finished_at TIMESTAMP, "
        "duration_s FLOAT, segment_rows INTEGER NOT NULL, skipped INTEGER NOT NULL, "
        "planned_add INTEGER NOT NULL, planned_remove INTEGER NOT NULL, "
        "planned_update INTEGER NOT NULL, sent_add INTEGER NOT NULL, "
        "sent_remove INTEGER NOT NULL, sent_update INTEGER NOT NULL, "
        "rejected INTEGER NOT NULL, batches INTEGER NOT NULL, retries INTEGER NOT NULL, "
        "error TEXT)",
        "CREATE TABLE locks (sync VARCHAR(200) NOT NULL PRIMARY KEY, run_id VARCHAR(40) NOT NULL, "
        "host VARCHAR(200) NOT NULL, pid INTEGER NOT NULL, acquired_at TIMESTAMP NOT NULL, "
        "heartbeat_at TIMESTAMP NOT NULL)",
        "INSERT INTO winback_schema (version) VALUES (3)",
        "INSERT INTO snapshot VALUES ('s', '1', 'member', 'r', 'i', 'f', "
        '\'{"email": "a@b.co"}\', NULL, NULL, NULL, NULL)',
        f"INSERT INTO runs VALUES ('old', 's', 'running', {at}, NULL, NULL, "
        "1, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, NULL)",
        f"INSERT INTO locks VALUES ('s', 'old', '{host}', {pid}, {at}, {at})",
    )


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def prepare_store(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[Sequence[str]], str]:
    """Makes a SQLite or PostgreSQL database from statements; returns its URL."""
    return lambda statements: prepared_database(request, tmp_path, "state.db", statements)


@pytest.mark.parametrize(
    ("holder", "taken_over"),
    [
        pytest.param("dead-pid-here", True, id="dead-pid-on-this-host"),
        pytest.param("live-pid-here", False, id="live-pid-on-this-host"),
        pytest.param("old-heartbeat-elsewhere", True, id="other-host-heartbeat-expired"),
    ],
)
def test_a_version_3_store_is_migrated_and_its_lock_judged_by_host_and_pid(
    prepare_store: Callable[[Sequence[str]], str], holder: str, taken_over: bool
) -> None:
    """Its `locks` table gains `pid_namespace`; the lock row an older winback left has none,
    so it is judged by host and pid (and its heartbeat) as that winback judged it."""
    now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    host, pid, heartbeat = {
        "dead-pid-here": (socket.gethostname(), dead_pid(), now),
        "live-pid-here": (socket.gethostname(), os.getpid(), now),
        "old-heartbeat-elsewhere": ("build-box-7", 4242, now - dt.timedelta(hours=1)),
    }[holder]
    url = prepare_store(v3_tables(host, pid, heartbeat))
    with pytest.raises(StateError, match=r"schema version 3, older .*`winback sync run` upgrades"):
        StateStore.for_reading(url)  # commands that only read change nothing
    store = StateStore(url)
    try:
        with store.engine.connect() as connection:
            version = connection.execute(sa.select(schema_info.c.version)).scalar_one()
            columns = [c["name"] for c in sa.inspect(connection).get_columns("locks")]
            left = connection.execute(sa.select(locks)).one()
        assert version == SCHEMA_VERSION == 4
        assert columns[-1] == "pid_namespace"
        assert (left.run_id, left.host, left.pid, left.pid_namespace) == ("old", host, pid, None)
        assert store.audience_size(None, "s") == 1
        assert (store.lock_holder("s", live_only=True) is None) == taken_over
        if taken_over:
            store.acquire_lock("s", "new")
            assert store.history("s", 5)[-1].status == "interrupted"
        else:
            with pytest.raises(LockedError, match=rf"process {pid} on {host},"):
                store.acquire_lock("s", "new")
    finally:
        store.dispose()
    reader = StateStore.for_reading(url)  # opening again changes nothing; readable now
    try:
        holder_row = reader.lock_holder("s")
        assert holder_row is not None
        assert holder_row.run_id == ("new" if taken_over else "old")
    finally:
        reader.dispose()


def test_insert_rows_stores_what_a_core_insert_stores(tmp_path: Path) -> None:
    """SQLite inserts write columns that hold one value throughout into the statement: the
    stored rows are those of a plain insert, quotes, NUL characters and one-row batches too."""
    import datetime as dt

    from connector.state import insert_rows

    now = dt.datetime(2026, 12, 7, 3, 14, 9, 287321)
    sync, status = "o'brien's sync", "member"

    def row(key: str, identifiers: str, reason: str | None = None) -> tuple[object, ...]:
        return (sync, key, status, "1", "a" * 40, "b" * 40, identifiers, None, now, now, reason)

    batches = [
        [row("1", '{"email":"a@b.com"}'), row("2", '{"email":"c@d.com"}')],
        [row("3", "same"), row("4", "same")],  # a constant text column beside bound ones
        [row("5", "nul\x00inside", "x"), row("6", "nul\x00inside", "x")],
        [row("7", "one row")],
    ]
    stores = {}
    for name in ("raw", "core"):
        store = StateStore(f"sqlite:///{tmp_path / name}.db")
        with store.connect() as connection:
            for rows in batches:
                if name == "raw":
                    insert_rows(connection, snapshot, rows)
                else:
                    names = [column.key for column in snapshot.columns]
                    connection.execute(
                        snapshot.insert(), [dict(zip(names, r, strict=True)) for r in rows]
                    )
            connection.commit()
            stores[name] = connection.execute(
                sa.select(snapshot, sa.func.typeof(snapshot.c.platform_id)).order_by("key")
            ).all()
        store.dispose()
    assert stores["raw"] == stores["core"]
    assert len(stores["raw"]) == 7


@pytest.mark.postgres
def test_insert_rows_on_postgresql_copies_what_a_core_insert_stores(postgres_url: str) -> None:
    """PostgreSQL (psycopg) inserts through COPY: the stored rows are those of a plain insert,
    whatever the text holds (tabs, newlines, backslashes, quotes, non-ASCII, `\\N`), NULLs and
    timestamps included; rows copied after a commit are in the next transaction, and a rollback
    takes them back."""
    import datetime as dt

    from connector.state import insert_rows

    now = dt.datetime(2026, 12, 7, 3, 14, 9, 287321)
    texts = ["plain", "tab\there", "new\nline", "back\\slash", 'o\'brien "q"', "zoë ß", "\\N", ""]
    rows = [
        (
            f"sync-{n % 2}",
            f"key-{n}",
            "member",
            "1",
            "a" * 40,
            "b" * 40,
            text,
            None,
            now,
            None,
            text,
        )
        for n, text in enumerate(texts)
    ]
    store = StateStore(postgres_url)
    stored = {}
    try:
        with store.connect() as connection:
            for name in ("copy", "core"):
                named = [(f"{name}-{row[0]}", *row[1:]) for row in rows]
                if name == "copy":
                    insert_rows(connection, snapshot, named[:3])
                    connection.commit()
                    insert_rows(connection, snapshot, named[3:])  # a new transaction
                else:
                    names = [column.key for column in snapshot.columns]
                    connection.execute(
                        snapshot.insert(), [dict(zip(names, r, strict=True)) for r in named]
                    )
                connection.commit()
                stored[name] = [
                    tuple(row)[1:]
                    for row in connection.execute(
                        sa.select(snapshot)
                        .where(snapshot.c.sync.startswith(name))
                        .order_by(snapshot.c.key)
                    )
                ]
            insert_rows(connection, snapshot, [("rolled-back", *rows[0][1:])])
            connection.rollback()
            left = connection.execute(
                sa.select(sa.func.count()).where(snapshot.c.sync == "rolled-back")
            ).scalar_one()
    finally:
        store.dispose()
    assert stored["copy"] == stored["core"]
    assert len(stored["copy"]) == len(texts)
    assert [row[-1] for row in stored["copy"]] == texts  # the reason column, by key
    assert left == 0
