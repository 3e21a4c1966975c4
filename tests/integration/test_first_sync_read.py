"""A first sync is streamed on SQLite warehouses, where one aggregate query finds the repeated
keys (`connector.first_sync.SegmentRead`), and on PostgreSQL with pushdown, where the warehouse
computes keys and fingerprints as DuckDB does (`SegmentComparedInWarehouse`). PostgreSQL and
DuckDB with `pushdown = false` stage it (their GROUP BY may not tell keys apart as texts).

Whichever path it takes, it must end exactly where the staged path ends (`--full-resync`), and
the next run, which compares where later runs compare, must find nothing to send.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import connector.row_normaliser
from connector.state import StateStore
from connector.sync import RunOptions, RunResult
from tests.fakes.memory_destination import MemoryDestination
from tests.helpers import memory_runner, write_people, write_people_at
from tests.integration.test_first_sync import ROWS, counts, forget, issues_of, snapshot_rows

STREAMED = "streamed the segment (first sync)"
STAGED = "read and compared the segment"


@pytest.fixture(
    params=[
        "sqlite",
        "duckdb, pushdown off",
        pytest.param("postgresql", marks=pytest.mark.postgres),
        pytest.param("postgresql, pushdown off", marks=pytest.mark.postgres),
    ]
)
def warehouse_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def people_warehouse(
    request: pytest.FixtureRequest, folder: Path, kind: str, rows: list[tuple[Any, ...]]
) -> tuple[str, dict[str, Any]]:
    """The warehouse URL and `[warehouse]` options of a `people` table holding `rows`."""
    if kind == "sqlite":  # `id` of no type: SQLite keeps what it is given, 1 or '1'
        path = folder / "warehouse.db"
        with sqlite3.connect(path) as db:
            db.execute("DROP TABLE IF EXISTS people")
            db.execute("CREATE TABLE people (id, email TEXT, phone TEXT, country TEXT)")
            db.executemany("INSERT INTO people VALUES (?, ?, ?, ?)", rows)
        return f"sqlite:///{path}", {}
    if kind == "duckdb, pushdown off":
        return write_people(folder, "duckdb", rows), {"pushdown": False}
    options = {"pushdown": False} if kind.endswith("pushdown off") else {}
    return write_people_at(str(request.getfixturevalue("postgres_url")), rows), options


@pytest.fixture
def run(
    request: pytest.FixtureRequest, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> Iterator[Any]:
    """Run sync `s` over `rows` on the given warehouse; returns the result and which path the
    run took (STREAMED or STAGED)."""
    caplog.set_level(logging.INFO, logger="winback")

    def run_sync(
        kind: str, rows: list[tuple[Any, ...]], options: RunOptions
    ) -> tuple[RunResult, str]:
        url, warehouse = people_warehouse(request, tmp_path, kind, rows)
        runner = memory_runner(tmp_path, url, warehouse=warehouse)
        caplog.clear()
        try:
            result = runner.run("s", options)
        finally:
            runner.close()
        paths = [p for p in (STREAMED, STAGED) if p in caplog.text]
        assert len(paths) == 1, caplog.text
        return result, paths[0]

    yield run_sync


@pytest.mark.parametrize("normalising", ["this process", "second process"])
def test_a_first_sync_read_from_the_warehouse_ends_where_the_staged_path_ends(
    run: Any,
    tmp_path: Path,
    warehouse_kind: str,
    normalising: str,
    monkeypatch: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    if normalising == "second process":
        monkeypatch.setattr(connector.row_normaliser, "PARALLEL_MIN_ROWS", 0)
    state_url = f"sqlite:///{tmp_path / 'state.db'}"
    MemoryDestination.reset()
    MemoryDestination.reject = staticmethod(
        lambda m: "refused by the platform" if m.key == "8" else None
    )
    streamed, path = run(warehouse_kind, ROWS, RunOptions())
    assert path == (STAGED if warehouse_kind.endswith("pushdown off") else STREAMED)
    streamed_audience = MemoryDestination.audiences.pop("A")
    streamed_snapshot = snapshot_rows(state_url)
    forget(state_url)
    staged, path = run(warehouse_kind, ROWS, RunOptions(full_resync=True))
    assert path == STAGED

    assert counts(streamed) == counts(staged)
    assert counts(streamed)[2:] == (
        9,  # null, blank, long key; 4, 5 and 7's first row; two extra rows of 6, one of 7
        {"add": 5, "remove": 0, "update": 0},
        {"add": 4, "remove": 0, "update": 0},
        1,
    )
    staged_audience = MemoryDestination.audiences.pop("A")
    assert {k: m["identifiers"] for k, m in streamed_audience.items()} == {
        k: m["identifiers"] for k, m in staged_audience.items()
    }
    assert streamed_audience["6"]["identifiers"]["email"] == "first@example.com"
    assert streamed_snapshot == snapshot_rows(state_url)
    assert issues_of(state_url, streamed.run_id) == issues_of(state_url, staged.run_id)

    MemoryDestination.calls.clear()
    again, path = run(warehouse_kind, ROWS, RunOptions())
    assert path == STAGED  # compared from now on
    where = "in the warehouse" if warehouse_kind == "postgresql" else "in the state database"
    assert f"{STAGED} {where}" in caplog.text
    assert again.planned == {"add": 0, "remove": 0, "update": 0}
    assert again.skipped == streamed.skipped
    assert MemoryDestination.calls == []


def test_a_dry_run_of_a_first_sync_read_from_the_warehouse_writes_nothing(
    run: Any, tmp_path: Path, warehouse_kind: str
) -> None:
    state_url = f"sqlite:///{tmp_path / 'state.db'}"
    MemoryDestination.reset()
    plan, path = run(warehouse_kind, ROWS, RunOptions(dry_run=True))
    staged, _ = run(warehouse_kind, ROWS, RunOptions(dry_run=True, full_resync=True))

    assert path == (STAGED if warehouse_kind.endswith("pushdown off") else STREAMED)
    assert counts(plan) == counts(staged)
    assert plan.samples == staged.samples
    assert MemoryDestination.calls == []
    assert snapshot_rows(state_url) == set()
    store = StateStore(state_url)
    try:
        assert store.issues(plan.run_id) == []
    finally:
        store.dispose()


def test_sqlite_keys_of_several_storage_classes_are_compared_in_the_state_database(
    run: Any, tmp_path: Path
) -> None:
    """SQLite's GROUP BY tells 1 from '1'; the state database, which keeps keys as text, does
    not: such a segment is staged, and '1' is one key sent once."""
    MemoryDestination.reset()
    rows: list[tuple[Any, ...]] = [
        (1, "one@example.com", None, None),
        ("1", "uno@example.com", None, None),
        (2, "two@example.com", None, None),
    ]
    result, path = run("sqlite", rows, RunOptions())

    assert path == STAGED
    assert result.status == "success", result.error
    assert result.planned == {"add": 2, "remove": 0, "update": 0}
    assert MemoryDestination.audiences["A"]["1"]["identifiers"]["email"] == "one@example.com"
    store = StateStore(f"sqlite:///{tmp_path / 'state.db'}")
    try:
        issues = [(issue.kind, issue.key) for issue in store.issues(result.run_id)]
    finally:
        store.dispose()
    assert issues == [("skipped", "1")]


def test_sqlite_real_keys_are_compared_in_the_state_database(run: Any, tmp_path: Path) -> None:
    """A REAL's text in SQLite rounds to 15 digits, Python's does not: such keys are staged."""
    MemoryDestination.reset()
    rows: list[tuple[Any, ...]] = [
        (0.1 + 0.2, "sum@example.com", None, None),
        (0.3, "three@example.com", None, None),
    ]
    result, path = run("sqlite", rows, RunOptions())

    assert path == STAGED
    assert result.status == "success", result.error
    assert result.planned == {"add": 2, "remove": 0, "update": 0}


def test_integer_keys_read_from_the_warehouse_are_sent_as_their_text(
    run: Any, tmp_path: Path
) -> None:
    MemoryDestination.reset()
    path_db = tmp_path / "warehouse.db"
    rows: list[tuple[Any, ...]] = [
        (10, "ten@example.com", None, None),
        (10, "again@example.com", None, None),
        (11, "eleven@example.com", None, None),
    ]
    result, path = run("sqlite", rows, RunOptions())
    with sqlite3.connect(path_db) as db:  # the table holds integers, not texts
        assert {type(k) for (k,) in db.execute("SELECT id FROM people")} == {int}

    assert path == STREAMED
    assert result.planned == {"add": 2, "remove": 0, "update": 0}
    assert sorted(MemoryDestination.audiences["A"]) == ["10", "11"]
    assert MemoryDestination.audiences["A"]["10"]["identifiers"]["email"] == "ten@example.com"


def test_sqlite_keys_of_a_nocase_column_are_told_apart_as_texts(tmp_path: Path) -> None:
    """'A' and 'a' are one key to a NOCASE column's GROUP BY but two texts to the state
    database: the census compares them as bytes, so both are sent and none is a duplicate."""
    path = tmp_path / "warehouse.db"
    rows: list[tuple[Any, ...]] = [
        ("A", "upper@example.com", None, None),
        ("a", "lower@example.com", None, None),
        ("a", "again@example.com", None, None),
    ]
    MemoryDestination.reset()
    with sqlite3.connect(path) as db:
        db.execute("DROP TABLE IF EXISTS people")
        db.execute("CREATE TABLE people (id TEXT COLLATE NOCASE, email, phone, country)")
        db.executemany("INSERT INTO people VALUES (?, ?, ?, ?)", rows)
    runner = memory_runner(tmp_path, f"sqlite:///{path}")
    try:
        streamed = runner.run("s", RunOptions())
        streamed_audience = MemoryDestination.audiences.pop("A")
        forget(f"sqlite:///{tmp_path / 'state.db'}")
        staged = runner.run("s", RunOptions(full_resync=True))
    finally:
        runner.close()

    assert counts(streamed) == counts(staged)
    assert streamed.planned == {"add": 2, "remove": 0, "update": 0}
    assert streamed.skipped == 1  # the second row of 'a'
    assert {k: m["identifiers"]["email"] for k, m in streamed_audience.items()} == {
        "A": "upper@example.com",
        "a": "lower@example.com",
    }
