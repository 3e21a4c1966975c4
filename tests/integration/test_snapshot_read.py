"""The snapshot's (key, raw_fp) pages handed to the warehouse diff: exactly one sync's rows."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from connector.diff import ChangePlanner
from connector.state import StateStore, insert_rows, snapshot, utcnow


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StateStore]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'state.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    state = StateStore(url)
    yield state
    state.dispose()


def _planner(store: StateStore, sync: str) -> tuple[ChangePlanner, sa.Connection]:
    connection = store.connect()
    planner = ChangePlanner(
        connection, sync=sync, mode="mirror", matches_on_identifiers=False, supports_update=True
    )
    return planner, connection


@pytest.mark.parametrize("page_size", [1, 3, 100_000])
def test_pages_hold_exactly_the_syncs_keys_and_fingerprints(
    store: StateStore, page_size: int
) -> None:
    now = utcnow()
    # Two syncs interleaved in storage order; keys with the characters JSON must escape.
    keys = ["1", 'with "quotes"', "comma,key", "back\\slash", "new\nline", "ünï", "tab\tkey"]
    rows = []
    for index, key in enumerate(keys):
        for sync in ("a", "b"):
            status = "rejected" if index % 3 == 0 else "member"
            rows.append((sync, key, status, f"{sync}{index}", "i", "f", "{}", None, now, now, None))
    with store.engine.begin() as connection:
        insert_rows(connection, snapshot, rows)
    planner, connection = _planner(store, "a")
    with connection:
        assert not planner.snapshot_is_empty()
        # The default reader, and the driver-cursor one (other databases, SQLite without JSON).
        readers = [planner.snapshot_fingerprints, planner._cursor_snapshot_fingerprints]
        for read_pages in readers:
            pages = list(read_pages(page_size))
            read = [(k, f) for keys_, fps in pages for k, f in zip(keys_, fps, strict=True)]
            assert sorted(read) == sorted((key, f"a{index}") for index, key in enumerate(keys))
            assert all(len(keys_) == len(fps) for keys_, fps in pages)


def test_an_empty_snapshot_gives_no_pages(store: StateStore) -> None:
    planner, connection = _planner(store, "a")
    with connection:
        assert planner.snapshot_is_empty()
        assert list(planner.snapshot_fingerprints()) == []
