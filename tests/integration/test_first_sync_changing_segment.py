"""A streamed first sync whose segment changes between its key census and its read (a table
loaded while the run reads it): keys the census did not see repeated come twice. The later
rows are skipped duplicates, the state store never gets a key twice and the next run puts the
destination right. Real warehouses (SQLite, PostgreSQL) and state stores."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

import connector.sync
from connector.state import StateStore
from connector.sync import RunOptions, RunResult
from tests.fakes.memory_destination import MemoryDestination
from tests.helpers import memory_runner, write_people, write_people_at

SEGMENT: list[tuple[Any, ...]] = [
    *[(str(i), f"u{i}@example.com", None, None) for i in range(1, 6)],
    ("6", "bad@", None, None),  # no usable identifier: skipped
]
LOADED_DURING_THE_RUN: list[dict[str, Any]] = [
    {"id": "5", "email": "five-again@example.com"},  # same batch as 5: not sent
    {"id": "2", "email": "two-again@example.com"},  # 2 was recorded by batch 1: sent, skipped
    {"id": "7", "email": "u7@example.com"},
    {"id": "7", "email": "seven-again@example.com"},  # same batch as 7: not sent
    {"id": "6", "email": "u6@example.com"},  # usable: sent, recorded over nothing
]


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def urls(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, str]:
    """A warehouse with SEGMENT in `people` and a state store of the same kind: SQLite files
    (the segment read as the state database reads it), or one PostgreSQL database (the
    segment compared in the warehouse, the snapshot written with COPY)."""
    if request.param == "sqlite":
        return write_people(tmp_path, "sqlite", SEGMENT), f"sqlite:///{tmp_path / 'state.db'}"
    url = write_people_at(str(request.getfixturevalue("postgres_url")), SEGMENT)
    return url, url


def run(folder: Path, urls: tuple[str, str]) -> RunResult:
    warehouse, state = urls
    runner = memory_runner(folder, warehouse, state_url=state)
    try:
        return runner.run("s", RunOptions())
    finally:
        runner.close()


def snapshot_of(state_url: str) -> dict[str, tuple[str, str]]:
    store = StateStore(state_url)
    try:
        with store.engine.connect() as connection:
            rows = connection.execute(
                sa.text("SELECT key, status, raw_fp FROM snapshot WHERE sync = 's'")
            )
            return {key: (status, raw_fp) for key, status, raw_fp in rows}
    finally:
        store.dispose()


def issues_of(state_url: str, run_id: str) -> Counter[tuple[str, str | None]]:
    store = StateStore(state_url)
    try:
        return Counter((i.kind, i.key) for i in store.issues(run_id))
    finally:
        store.dispose()


def test_keys_met_again_while_the_segment_is_read_are_skipped_duplicates(
    tmp_path: Path, urls: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    state_url = urls[1]
    MemoryDestination.reset()  # batches of 3
    streamable_segment = connector.sync.streamable_segment

    def census_then_a_load(*args: Any, **kwargs: Any) -> Any:
        """The table is loaded right after the key census, before the rows are read."""
        found = streamable_segment(*args, **kwargs)
        engine: sa.Engine = args[1]
        with engine.begin() as connection:
            connection.execute(
                sa.text("INSERT INTO people (id, email) VALUES (:id, :email)"),
                LOADED_DURING_THE_RUN,
            )
        return found

    monkeypatch.setattr(connector.sync, "streamable_segment", census_then_a_load)
    first = run(tmp_path, urls)
    monkeypatch.undo()

    assert first.status == "success", first.error
    assert first.segment_rows == len(SEGMENT) + len(LOADED_DURING_THE_RUN)
    assert first.sent["add"] == 7  # 1-5, 7 and 6's later row; 2's later row not counted
    assert first.skipped == 4  # 6's first row; the later rows of 5, 2 and 7
    issues = issues_of(state_url, first.run_id)
    assert issues == Counter({("skipped", k): 1 for k in ("2", "5", "6", "7")})
    audience = MemoryDestination.audiences["A"]
    emails = {key: member["identifiers"]["email"] for key, member in audience.items()}
    assert emails == {
        "1": "u1@example.com",
        "2": "two-again@example.com",  # sent after the first row: the destination has it
        "3": "u3@example.com",
        "4": "u4@example.com",
        "5": "u5@example.com",
        "6": "u6@example.com",
        "7": "u7@example.com",
    }
    recorded = snapshot_of(state_url)
    assert {key: status for key, (status, _) in recorded.items()} == dict.fromkeys(
        ("1", "2", "3", "4", "5", "6", "7"), "member"
    )
    assert recorded["2"][1] == ""  # the destination got both rows: sent again next run

    # The table keeps its duplicates: the next run compares with the first row of each key.
    MemoryDestination.calls.clear()
    second = run(tmp_path, urls)
    assert second.status == "success", second.error
    assert second.sent == {"add": 0, "remove": 1, "update": 1}  # 6's first row has no email
    emails = {k: m["identifiers"]["email"] for k, m in MemoryDestination.audiences["A"].items()}
    assert emails["2"] == "u2@example.com" and "6" not in emails
    third = run(tmp_path, urls)
    assert third.planned == {"add": 0, "remove": 0, "update": 0}, third
