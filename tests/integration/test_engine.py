"""Engine behaviours on SQLite (warehouse and state), against the in-memory destination."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from connector.state import StateStore
from connector.sync import RunOptions, SyncRunner
from tests.fakes.memory_destination import MemoryDestination
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
