"""Engine behaviours on SQLite (warehouse and state), against the in-memory destination."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from connector.state import StateStore
from connector.sync import RunOptions, SyncRunner
from tests.fakes.memory_destination import (
    KeyedMemoryDestination,
    LimitedMemoryDestination,
    MemoryDestination,
)
from tests.helpers import memory_runner, write_people


def make_runner(folder: Path, rows: list[tuple[Any, ...]]) -> SyncRunner:
    return memory_runner(folder, write_people(folder, "sqlite", rows))


def test_an_invalid_identifier_is_dropped_and_recorded_the_row_still_sent(tmp_path: Path) -> None:
    MemoryDestination.reset()
    runner = make_runner(
        tmp_path,
        [
            ("1", "ok@example.com", "12", "FR"),
            ("2", "bad@", "+33 6 12 34 56 78", "France"),
            ("3", "bad@", "12", "FR"),
        ],
    )
    try:
        result = runner.run("s", RunOptions())
    finally:
        runner.close()
    assert result.status == "success", result.error
    assert (result.sent["add"], result.skipped) == (2, 1)
    audience = MemoryDestination.audiences["A"]
    assert audience["1"]["identifiers"] == {"email": "ok@example.com", "country": "FR"}
    assert audience["2"]["identifiers"] == {"phone": "+33612345678", "country": "FR"}
    store = StateStore(f"sqlite:///{tmp_path / 'state.db'}")
    issues = {(i.key, i.kind): i.reason for i in store.issues(result.run_id)}
    store.dispose()
    assert set(issues) == {("1", "dropped"), ("2", "dropped"), ("3", "skipped")}
    assert "`12`" in issues[("1", "dropped")]
    assert "`bad@`" in issues[("2", "dropped")]
    assert "no usable identifier" in issues[("3", "skipped")]


def test_dry_run_writes_nothing(tmp_path: Path) -> None:
    MemoryDestination.reset()
    runner = make_runner(tmp_path, [("1", "a@example.com", None, None)])
    try:
        plan = runner.run("s", RunOptions(dry_run=True))
        assert plan.status == "dry_run"
        assert plan.planned == {"add": 1, "remove": 0, "update": 0}
        assert plan.samples["add"] == ["1"]
        assert MemoryDestination.calls == []
        assert runner.store.history("s", 5) == []
        assert runner.store.audience_size(None, "s") == 0
    finally:
        runner.close()


def test_new_identifiers_reach_a_keyed_destination_without_updates(tmp_path: Path) -> None:
    """Members known by the key, no update call: a changed email is sent as an add of the same
    key (adds are idempotent per key), not dropped; a changed field alone is not sent."""
    KeyedMemoryDestination.reset()

    def run(rows: list[tuple[Any, ...]], **sync: Any) -> dict[str, int]:
        warehouse = write_people(tmp_path, "sqlite", rows)
        runner = memory_runner(tmp_path, warehouse, adapter=KeyedMemoryDestination, **sync)
        try:
            result = runner.run("s", RunOptions())
        finally:
            runner.close()
        assert result.status == "success", result.error
        return result.sent

    run([("1", "old@example.com", None, None), ("2", "two@example.com", None, None)])
    sent = run([("1", "new@example.com", None, None), ("2", "two@example.com", None, None)])
    assert sent == {"add": 1, "remove": 0, "update": 0}
    audience = KeyedMemoryDestination.audiences["A"]
    assert audience["1"]["identifiers"] == {"email": "new@example.com"}
    assert set(audience) == {"1", "2"}
    assert run([("1", "new@example.com", None, None), ("2", "two@example.com", None, None)]) == {
        "add": 0,
        "remove": 0,
        "update": 0,
    }
    # add_only: no change to members already there.
    kept = run([("1", "third@example.com", None, None)], mode="add_only")
    assert kept == {"add": 0, "remove": 0, "update": 0}
    assert audience["1"]["identifiers"] == {"email": "new@example.com"}


def test_a_platform_limit_per_action_cuts_the_batches_of_that_action(tmp_path: Path) -> None:
    LimitedMemoryDestination.reset()
    rows = [(str(i), f"u{i}@example.com", None, None) for i in range(1, 8)]

    def run(rows: list[tuple[Any, ...]]) -> None:
        runner = memory_runner(
            tmp_path, write_people(tmp_path, "sqlite", rows), adapter=LimitedMemoryDestination
        )
        try:
            assert runner.run("s", RunOptions()).status == "success"
        finally:
            runner.close()

    run(rows)
    run(rows[:4])
    assert (
        LimitedMemoryDestination.calls == [("add", 3), ("add", 3), ("add", 1)] + [("remove", 1)] * 3
    )
