"""Batch outcomes beyond acknowledged and rejected, through the engine on SQLite: rows an
adapter cannot confirm (said so, or left out of its answer) stay in doubt until the next run
settles them, and rejections the platform does not attribute to rows are counted."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import pytest
import sqlalchemy as sa

from connector.errors import PayloadTooLargeError
from connector.state import StateStore
from connector.sync import RunOptions
from destinations.base import Batch, BatchResult, Member, Rejection
from tests.fakes.memory_destination import MemoryDestination
from tests.helpers import memory_runner, write_people

Answer = Callable[[str, Batch, BatchResult], BatchResult]


class DoubtfulDestination(MemoryDestination):
    """Applies every batch like the memory destination, then answers as `answer` says."""

    name = "doubtful"
    answer: ClassVar[Answer] = staticmethod(lambda action, batch, result: result)

    def add(self, batch: Batch) -> BatchResult:
        return self.answer("add", batch, super().add(batch))

    def remove(self, batch: Batch) -> BatchResult:
        return self.answer("remove", batch, super().remove(batch))


def without(result: BatchResult, *keys: str) -> BatchResult:
    return BatchResult([a for a in result.acknowledged if a.key not in keys], result.rejected)


def people(*ids: int) -> list[tuple[Any, ...]]:
    return [(str(i), f"u{i}@example.com", None, None) for i in ids]


def run(folder: Path, rows: list[tuple[Any, ...]]) -> tuple[Any, int, int, list[Any]]:
    """One run; returns its result, the snapshot's audience size, the rows left in flight and
    the run's issues."""
    runner = memory_runner(
        folder, write_people(folder, "sqlite", rows), adapter=DoubtfulDestination
    )
    try:
        result = runner.run("s", RunOptions())
        with runner.store.engine.connect() as connection:
            in_flight = StateStore.unconfirmed_in_flight(connection, "s")
        size = runner.store.audience_size(None, "s")
        return result, size, in_flight, runner.store.issues(result.run_id)
    finally:
        runner.close()


@pytest.fixture(autouse=True)
def _reset() -> None:
    DoubtfulDestination.reset()
    DoubtfulDestination.answer = staticmethod(lambda action, batch, result: result)


def test_rows_left_out_of_an_answer_stay_in_doubt_and_the_next_run_sends_them_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Key 3 is applied but neither acknowledged nor rejected; key 4 is declared unconfirmed.
    def answer(action: str, batch: Batch, result: BatchResult) -> BatchResult:
        doubtful = without(result, "3", "4")
        doubtful.unconfirmed = ["4"] if "4" in {m.key for m in batch.members} else []
        return doubtful

    DoubtfulDestination.answer = staticmethod(answer)
    with caplog.at_level(logging.WARNING, logger="winback.delivery"):
        first, size, in_flight, issues = run(tmp_path, people(1, 2, 3, 4))
    assert first.status == "success", first.error
    assert (first.sent["add"], first.rejected) == (2, 0)
    assert (size, in_flight) == (2, 2)  # 1 and 2 recorded; 3 and 4 noted as in flight
    assert issues == []
    assert "adapter `doubtful` neither acknowledged nor rejected 1 row(s)" in caplog.text
    assert "e.g. key `3`" in caplog.text
    assert "could not confirm 1 row(s)" in caplog.text

    DoubtfulDestination.answer = staticmethod(lambda action, batch, result: result)
    DoubtfulDestination.calls.clear()
    second, size, in_flight, _ = run(tmp_path, people(1, 2, 3, 4))
    assert second.status == "success", second.error
    assert second.sent["add"] == 2  # 3 and 4 settled as unconfirmed, then added again
    assert (size, in_flight) == (4, 0)
    assert set(DoubtfulDestination.audiences["A"]) == {"1", "2", "3", "4"}


def test_a_removal_left_in_doubt_is_sent_again_by_the_next_run(tmp_path: Path) -> None:
    run(tmp_path, people(1, 2, 3))
    DoubtfulDestination.answer = staticmethod(
        lambda action, batch, result: without(result, "3") if action == "remove" else result
    )
    removing, size, in_flight, _ = run(tmp_path, people(1))
    assert removing.sent["remove"] == 1
    assert (size, in_flight) == (2, 1)  # 3 is kept in the snapshot, its removal in doubt

    DoubtfulDestination.answer = staticmethod(lambda action, batch, result: result)
    DoubtfulDestination.audiences["A"]["3"] = {"identifiers": {}, "fields": {}, "platform_id": "x"}
    again, size, in_flight, _ = run(tmp_path, people(1))
    assert again.sent["remove"] == 1
    assert (size, in_flight) == (1, 0)
    assert set(DoubtfulDestination.audiences["A"]) == {"1"}


def test_rejections_the_platform_does_not_attribute_are_counted_and_recorded(
    tmp_path: Path,
) -> None:
    def answer(action: str, batch: Batch, result: BatchResult) -> BatchResult:
        result.unattributed_rejections = 1
        result.unattributed_reason = "num_invalid_entries beyond the samples"
        return result

    DoubtfulDestination.answer = staticmethod(answer)
    result, size, in_flight, issues = run(tmp_path, people(1, 2, 3, 4))  # batches of 3 and 1
    assert result.status == "partial"
    assert (result.sent["add"], result.rejected) == (4, 2)
    assert (size, in_flight) == (4, 0)
    assert [(i.kind, i.key, i.action) for i in issues] == [("rejected", None, "add")] * 2
    assert issues[0].reason == (
        "1 row(s) of batch 1 refused by the destination without saying which "
        "(num_invalid_entries beyond the samples); the rows of that batch count as sent"
    )


def test_from_rejections_leaves_unconfirmed_keys_unacknowledged() -> None:
    batch = Batch(1, [Member(k, {"email": f"{k}@example.com"}) for k in ("a", "b", "c")])
    result = BatchResult.from_rejections(batch, [Rejection("a", "bounced")], unconfirmed=["c"])
    assert [a.key for a in result.acknowledged] == ["b"]
    assert (result.rejected, result.unconfirmed) == ([Rejection("a", "bounced")], ["c"])


class SessionDestination(MemoryDestination):
    """Records how each batch is numbered; refuses batches of more than 2 rows as too large."""

    name = "session"
    seen: ClassVar[list[tuple[str, int, bool, int | None, tuple[str, ...]]]] = []

    def _session(self, action: str, batch: Batch) -> None:
        keys = tuple(m.key for m in batch.members)
        self.seen.append((action, batch.sequence, batch.last, batch.planned_rows, keys))
        if len(batch) > 2:
            raise PayloadTooLargeError("over the platform's limit", request_bytes=9_000_000)

    def add(self, batch: Batch) -> BatchResult:
        self._session("add", batch)
        return super().add(batch)

    def remove(self, batch: Batch) -> BatchResult:
        self._session("remove", batch)
        return super().remove(batch)


def test_batches_are_numbered_per_action_without_gaps_across_splits(tmp_path: Path) -> None:
    SessionDestination.reset()
    SessionDestination.seen = []

    def run_session(rows: list[tuple[Any, ...]]) -> None:
        runner = memory_runner(
            tmp_path, write_people(tmp_path, "sqlite", rows), adapter=SessionDestination
        )
        try:
            assert runner.run("s", RunOptions()).status == "success"
        finally:
            runner.close()

    run_session(people(1, 2, 3, 4, 5, 6, 7))  # batches of 3: each refused, then halved
    total = 7  # a first sync streams its rows: the segment's count is the estimate
    assert SessionDestination.seen == [
        ("add", 1, False, total, ("1", "2", "3")),
        ("add", 1, False, total, ("1",)),
        ("add", 2, False, total, ("2", "3")),
        ("add", 3, False, total, ("4", "5", "6")),
        ("add", 3, False, total, ("4",)),
        ("add", 4, False, total, ("5", "6")),
        ("add", 5, True, total, ("7",)),
    ]
    SessionDestination.seen = []
    run_session(people(1, 2, 3, 4, 5, 8))  # 6 and 7 leave, 8 joins: each action from 1
    assert SessionDestination.seen == [
        ("remove", 1, True, 2, ("6", "7")),
        ("add", 1, True, 1, ("8",)),
    ]


class OverlappedDestination(MemoryDestination):
    """Before applying an update batch, marks its rows `unconfirmed` in the state store, as a
    run overlapping this one would when it settles a stale note of them."""

    name = "overlapped"
    state_url: ClassVar[str] = ""

    def update(self, batch: Batch) -> BatchResult:
        engine = sa.create_engine(self.state_url)
        try:
            with engine.begin() as connection:
                connection.execute(
                    sa.text("UPDATE snapshot SET status = 'unconfirmed' WHERE key = :key"),
                    [{"key": m.key} for m in batch.members],
                )
        finally:
            engine.dispose()
        return super().update(batch)


def test_an_acknowledged_update_leaves_its_rows_members(tmp_path: Path) -> None:
    OverlappedDestination.reset()
    OverlappedDestination.state_url = f"sqlite:///{tmp_path / 'state.db'}"

    def statuses(rows: list[tuple[Any, ...]]) -> dict[str, str]:
        runner = memory_runner(
            tmp_path, write_people(tmp_path, "sqlite", rows), adapter=OverlappedDestination
        )
        try:
            result = runner.run("s", RunOptions())
            assert result.status == "success", result.error
            with runner.store.engine.connect() as connection:
                found = connection.execute(sa.text("SELECT key, status FROM snapshot"))
                return dict(found.tuples().all())
        finally:
            runner.close()

    statuses(people(1, 2, 3))
    changed = [("1", "new1@example.com", None, None), *people(2, 3)]
    assert statuses(changed) == {"1": "member", "2": "member", "3": "member"}
    assert OverlappedDestination.audiences["A"]["1"]["identifiers"]["email"] == "new1@example.com"
