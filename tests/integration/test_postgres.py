"""The engine with PostgreSQL as the warehouse and as the state store."""

from __future__ import annotations

import importlib.util
import socket
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from connector.config import build_config
from connector.errors import LockedError, StateError, WarehouseError
from connector.state import StateStore
from connector.sync import RunOptions, SyncRunner
from connector.warehouse import create_warehouse_engine, warehouse_connection
from destinations.registry import Registry
from tests.fakes.memory_destination import MemoryDestination

pytestmark = pytest.mark.postgres


def load_customers(url: str, rows: list[tuple[int, str | None, str | None]]) -> None:
    engine = sa.create_engine(url)
    with engine.begin() as connection:
        connection.execute(sa.text("DROP TABLE IF EXISTS lapsed"))
        connection.execute(sa.text("CREATE TABLE lapsed (id INTEGER, email TEXT, phone TEXT)"))
        if rows:
            connection.execute(
                sa.text("INSERT INTO lapsed VALUES (:id, :email, :phone)"),
                [{"id": i, "email": e, "phone": p} for i, e, p in rows],
            )
    engine.dispose()


def runner_for(tmp_path: Path, warehouse_url: str, state_url: str) -> SyncRunner:
    document: dict[str, Any] = {
        "warehouse": {"url": warehouse_url, "chunk_size": 100},
        "state": {"url": state_url},
        "segments": {"lapsed": {"key": "id", "sql": "SELECT id, email, phone FROM lapsed"}},
        "destinations": {"mem": {"type": "memory", "batch_size": 50}},
        "syncs": {
            "to_mem": {
                "segment": "lapsed",
                "destination": "mem",
                "audience": "pg",
                "identifiers": {"email": "email", "phone": "phone"},
                "default_country": "FR",
            }
        },
    }
    registry = Registry(adapters={"memory": MemoryDestination})
    return SyncRunner(build_config(document, path=tmp_path / "winback.toml", registry=registry))


def test_postgres_warehouse_and_state(tmp_path: Path, postgres_url: str) -> None:
    MemoryDestination.reset()
    rows = [(i, f"user{i}@example.com", None) for i in range(1, 501)]
    rows += [(501, None, "06 12 34 56 78"), (502, "broken@", None), (503, None, None)]
    load_customers(postgres_url, rows)
    runner = runner_for(tmp_path, postgres_url, postgres_url)
    try:
        first = runner.run("to_mem", RunOptions())
        assert first.status == "success", first.error
        assert first.segment_rows == 503
        assert first.skipped == 2  # no usable identifier: 502 (malformed), 503 (nothing)
        assert first.sent["add"] == 501
        audience = MemoryDestination.audiences["pg"]
        assert audience["501"]["identifiers"] == {"phone": "+33612345678"}

        load_customers(postgres_url, rows[20:])  # 20 leave
        second = runner.run("to_mem", RunOptions())
        assert second.status == "success", second.error
        assert (second.sent["remove"], second.sent["add"]) == (20, 0)
        assert len(MemoryDestination.audiences["pg"]) == 481

        store = StateStore(postgres_url)
        assert store.audience_size(None, "to_mem") == 481
        history = store.history("to_mem", 10)
        assert [r.status for r in history] == ["success", "success"]
        reasons = [i.reason for i in store.issues(first.run_id)]
        assert any("broken@" in r for r in reasons)
        store.dispose()
    finally:
        runner.close()


def test_postgres_state_lock_is_exclusive(tmp_path: Path, postgres_url: str) -> None:
    store = StateStore(postgres_url)
    try:
        store.acquire_lock("s", "run-1")
        with pytest.raises(LockedError, match="holds its lock"):
            store.acquire_lock("s", "run-2")
        store.release_lock("s", "run-1")
        store.acquire_lock("s", "run-3")
    finally:
        store.dispose()


def test_overlong_and_null_keys_are_skipped_not_fatal(tmp_path: Path, postgres_url: str) -> None:
    MemoryDestination.reset()
    engine = sa.create_engine(postgres_url)
    with engine.begin() as connection:
        connection.execute(sa.text("CREATE TABLE lapsed (id TEXT, email TEXT, phone TEXT)"))
        connection.execute(
            sa.text(
                "INSERT INTO lapsed VALUES (repeat('x', 600), 'a@example.com', NULL), "
                "(NULL, 'b@example.com', NULL), ('ok', 'c@example.com', NULL), "
                "('ok', 'd@example.com', NULL)"
            )
        )
    engine.dispose()
    runner = runner_for(tmp_path, postgres_url, postgres_url)
    try:
        result = runner.run("to_mem", RunOptions())
    finally:
        runner.close()
    assert result.status == "success", result.error
    assert (result.segment_rows, result.skipped, result.sent["add"]) == (4, 3, 1)
    assert MemoryDestination.audiences["pg"]["ok"]["identifiers"] == {"email": "c@example.com"}


def test_duckdb_warehouse_diffs_against_a_postgres_state_store(
    tmp_path: Path, postgres_url: str
) -> None:
    """The in-warehouse diff reads the snapshot's fingerprints from PostgreSQL."""
    import duckdb

    MemoryDestination.reset()
    warehouse = tmp_path / "warehouse.duckdb"

    def load(rows: list[tuple[int, str]]) -> None:
        with duckdb.connect(str(warehouse)) as db:
            db.execute("CREATE OR REPLACE TABLE lapsed (id INTEGER, email VARCHAR, phone VARCHAR)")
            db.executemany("INSERT INTO lapsed VALUES (?, ?, NULL)", rows)

    rows = [(i, f"user{i}@example.com") for i in range(1, 301)]
    load(rows)
    runner = runner_for(tmp_path, f"duckdb:///{warehouse}", postgres_url)
    try:
        first = runner.run("to_mem", RunOptions())
        assert first.status == "success", first.error
        assert first.sent["add"] == 300
        runner.close()  # let go of the DuckDB file before rewriting it
        load([*rows[10:], (1, "moved1@example.com")])  # 2..10 leave, 1 changes
        second = runner.run("to_mem", RunOptions())
        assert second.status == "success", second.error
        assert second.planned == {"add": 0, "remove": 9, "update": 1}
        unchanged = runner.run("to_mem", RunOptions())
        assert unchanged.planned == {"add": 0, "remove": 0, "update": 0}
    finally:
        runner.close()
    audience = MemoryDestination.audiences["pg"]
    assert len(audience) == 291
    assert audience["1"]["identifiers"] == {"email": "moved1@example.com"}


def test_a_bare_postgresql_url_uses_the_installed_psycopg(
    tmp_path: Path, postgres_url: str
) -> None:
    """`postgresql://` names psycopg2 to SQLAlchemy; `winback[postgres]` installs psycopg 3,
    which is used when psycopg2 is absent, for the warehouse and the state store alike."""
    MemoryDestination.reset()
    load_customers(postgres_url, [(1, "ann@example.com", None), (2, "bob@example.com", None)])
    bare = sa.make_url(postgres_url).set(drivername="postgresql")
    url = bare.render_as_string(hide_password=False)
    runner = runner_for(tmp_path, url, url)
    try:
        result = runner.run("to_mem", RunOptions())
        drivers = {runner.warehouse.dialect.driver, runner.store.engine.dialect.driver}
    finally:
        runner.close()
    assert result.status == "success", result.error
    assert sorted(MemoryDestination.audiences["pg"]) == ["1", "2"]
    expected = "psycopg2" if importlib.util.find_spec("psycopg2") else "psycopg"
    assert drivers == {expected}


@pytest.mark.parametrize(("query", "expected"), [("", 15), ("?connect_timeout=3", 3)])
def test_a_postgresql_warehouse_gives_up_connecting_after_a_timeout(
    query: str, expected: int
) -> None:
    """A server that accepts connections and never answers must not hold a run for libpq's
    default (as long as the OS waits: about two minutes); the URL may set its own timeout."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()  # accepts in the kernel, never answers
        port = listener.getsockname()[1]
        engine = create_warehouse_engine(f"postgresql+psycopg://u:p@127.0.0.1:{port}/db{query}")
        seen: dict[str, Any] = {}

        @sa.event.listens_for(engine, "do_connect")
        def _driver_arguments(dialect: Any, record: Any, args: Any, kwargs: Any) -> None:
            seen.update(kwargs)
            kwargs["connect_timeout"] = 1  # keep the test short once the value is checked

        with (
            pytest.raises(WarehouseError, match="cannot connect to the warehouse"),
            warehouse_connection(engine),
        ):
            pass
        engine.dispose()
    assert int(seen["connect_timeout"]) == expected


def test_a_postgresql_state_store_gives_up_connecting_after_a_timeout() -> None:
    seen: dict[str, Any] = {}

    def driver_arguments(dialect: Any, record: Any, args: Any, kwargs: Any) -> None:
        seen.update(kwargs)
        kwargs["connect_timeout"] = 1  # keep the test short once the value is checked

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()  # accepts in the kernel, never answers
        port = listener.getsockname()[1]
        sa.event.listen(sa.Engine, "do_connect", driver_arguments)
        try:
            with pytest.raises(StateError, match=r"\[state\] url"):
                StateStore(f"postgresql+psycopg://u:p@127.0.0.1:{port}/db")
        finally:
            sa.event.remove(sa.Engine, "do_connect", driver_arguments)
    assert int(seen["connect_timeout"]) == 15


@pytest.mark.parametrize("pushdown", [True, False])
def test_nul_characters_from_the_warehouse_never_jam_a_postgres_state_store(
    tmp_path: Path, postgres_url: str, pushdown: bool
) -> None:
    """PostgreSQL text cannot hold U+0000: a key or a quoted value holding one made every run
    of the sync fail at the same statement, for good. Such a key is skipped with a reason; a
    value quoted in a reason is stored as `\\x00`."""
    import duckdb

    warehouse = tmp_path / "warehouse.duckdb"
    with duckdb.connect(str(warehouse)) as duck:
        duck.execute("CREATE TABLE lapsed (id VARCHAR, email VARCHAR, phone VARCHAR)")
        duck.execute(
            "INSERT INTO lapsed VALUES ('1', 'one@example.com', NULL), "
            "('k' || chr(0) || 'ey', 'two@example.com', NULL), "
            "('3', 'nul' || chr(0) || 'byte@example.com', NULL), "
            "('4', 'four@example.com', '06 12 34' || chr(0) || ' 56 78')"
        )
    MemoryDestination.reset()
    runner = runner_for(tmp_path, f"duckdb:///{warehouse}", postgres_url)
    runner.config.warehouse.pushdown = pushdown
    try:
        for options in (RunOptions(), RunOptions(), RunOptions(full_resync=True)):
            result = runner.run("to_mem", options)
            assert result.status == "success", result.error
            assert result.skipped == 2  # the NUL key; 3 has no usable identifier
        assert sorted(MemoryDestination.audiences["pg"]) == ["1", "4"]
        store = StateStore(postgres_url)
        try:
            issues = {(i.key, i.reason) for i in store.issues(result.run_id, limit=None)}
        finally:
            store.dispose()
        assert any(key == "k\\x00ey" and "NUL character" in reason for key, reason in issues)
        assert any(key == "3" and "nul\\x00byte@example.com" in reason for key, reason in issues)
    finally:
        runner.close()
