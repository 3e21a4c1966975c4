"""Rows without a usable identifier are kept in the snapshot as `skipped`: reported on every run
with their reason, checked again only when they change or the normalisation settings do."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from connector.diff import ChangePlanner
from connector.errors import FatalDestinationError
from connector.row_normaliser import Normalised
from connector.state import StateStore, snapshot
from connector.sync import RunOptions, RunResult
from tests.fakes.memory_destination import MemoryDestination
from tests.helpers import memory_runner, write_people

Row = tuple[str, str | None, str | None, str | None]  # id, email, phone, country

ROWS: list[Row] = [
    ("1", "one@example.com", None, None),
    ("2", "bad@", None, None),  # invalid email, no phone: skipped
    ("3", None, None, "FR"),  # no identifier at all: skipped
]


def state_url(folder: Path) -> str:
    return STATE_URLS.get(folder, f"sqlite:///{folder / 'state.db'}")


STATE_URLS: dict[Path, str] = {}
"""A test folder whose state store is not the default SQLite file (PostgreSQL)."""


def run_sync(folder: Path, kind: str, rows: list[Row], **sync: Any) -> RunResult:
    runner = memory_runner(
        folder, write_people(folder, kind, rows), state_url=state_url(folder), **sync
    )
    try:
        result = runner.run("s", RunOptions())
    finally:
        runner.close()
    assert result.status == "success", result.error
    return result


def snapshot_rows(folder: Path) -> dict[str, tuple[str, str | None]]:
    """key -> (status, reason)"""
    engine = sa.create_engine(state_url(folder))
    with engine.connect() as connection:
        query = sa.select(snapshot.c.key, snapshot.c.status, snapshot.c.reason)
        rows = connection.execute(query.where(snapshot.c.sync == "s")).all()
    engine.dispose()
    return {key: (status, reason) for key, status, reason in rows}


def skipped_issues(folder: Path, run_id: str) -> dict[str, str]:
    store = StateStore(state_url(folder))
    try:
        return {i.key: i.reason for i in store.issues(run_id, limit=100) if i.kind == "skipped"}
    finally:
        store.dispose()


@pytest.fixture(params=["duckdb", "sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def kind(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The warehouse (DuckDB: in-warehouse diff; SQLite: state-database diff), or a DuckDB
    warehouse with a PostgreSQL state store."""
    MemoryDestination.reset()
    if request.param == "postgresql":
        STATE_URLS[tmp_path] = str(request.getfixturevalue("postgres_url"))
        return "duckdb"
    return str(request.param)


def test_unusable_rows_are_kept_and_reported_on_every_run(tmp_path: Path, kind: str) -> None:
    first = run_sync(tmp_path, kind, ROWS)
    assert (first.sent["add"], first.skipped) == (1, 2)
    kept = snapshot_rows(tmp_path)
    assert kept["1"] == ("member", None)
    assert {k: v[0] for k, v in kept.items() if k != "1"} == {"2": "skipped", "3": "skipped"}
    reasons = skipped_issues(tmp_path, first.run_id)
    assert {k: v[1] for k, v in kept.items() if k != "1"} == reasons
    assert "no usable identifier" in reasons["2"] and "`bad@`" in reasons["2"]

    again = run_sync(tmp_path, kind, ROWS)
    assert again.planned == {"add": 0, "remove": 0, "update": 0}
    assert again.skipped == 2
    assert skipped_issues(tmp_path, again.run_id) == reasons
    assert MemoryDestination.audiences["A"].keys() == {"1"}


def test_a_skipped_row_is_sent_once_it_is_usable(tmp_path: Path, kind: str) -> None:
    run_sync(tmp_path, kind, ROWS)
    fixed = [ROWS[0], ("2", "two@example.com", None, None), ROWS[2]]
    result = run_sync(tmp_path, kind, fixed)
    assert (result.sent["add"], result.skipped) == (1, 1)
    assert snapshot_rows(tmp_path)["2"] == ("member", None)
    assert MemoryDestination.audiences["A"].keys() == {"1", "2"}


def test_a_skipped_row_that_leaves_the_segment_is_forgotten(tmp_path: Path, kind: str) -> None:
    run_sync(tmp_path, kind, ROWS)
    result = run_sync(tmp_path, kind, ROWS[:2])
    assert result.skipped == 1
    assert result.planned == {"add": 0, "remove": 0, "update": 0}
    assert set(snapshot_rows(tmp_path)) == {"1", "2"}


def test_new_settings_check_skipped_rows_again(tmp_path: Path, kind: str) -> None:
    """A phone without a country code is skipped until the sync sets a default country."""
    rows: list[Row] = [("1", None, "212 555 0100", None)]
    first = run_sync(tmp_path, kind, rows)
    assert (first.sent["add"], first.skipped) == (0, 1)
    assert snapshot_rows(tmp_path)["1"][0] == "skipped"
    result = run_sync(tmp_path, kind, rows, default_country="US")
    assert (result.sent["add"], result.skipped) == (1, 0)
    assert MemoryDestination.audiences["A"]["1"]["identifiers"] == {"phone": "+12125550100"}


def test_a_member_that_loses_its_identifiers_is_removed_then_kept_as_skipped(
    tmp_path: Path, kind: str
) -> None:
    stays: Row = ("4", "four@example.com", None, None)
    run_sync(tmp_path, kind, [*ROWS, stays])
    emptied = [("1", None, None, None), *ROWS[1:], stays]
    removal = run_sync(tmp_path, kind, emptied)
    assert (removal.sent["remove"], removal.skipped) == (1, 3)
    assert "1" not in snapshot_rows(tmp_path)  # the removal was acknowledged
    assert MemoryDestination.audiences["A"].keys() == {"4"}
    later = run_sync(tmp_path, kind, emptied)
    assert later.planned == {"add": 0, "remove": 0, "update": 0}
    assert later.skipped == 3
    assert snapshot_rows(tmp_path)["1"][0] == "skipped"


def test_a_failed_first_sync_still_records_its_skipped_rows(tmp_path: Path, kind: str) -> None:
    """The destination refuses the only batch: the run fails, and still reports the rows it
    read and could not send; the next run sends the member and reports them again."""
    MemoryDestination.fail_batch = staticmethod(lambda action, batch: FatalDestinationError("no"))
    runner = memory_runner(
        tmp_path, write_people(tmp_path, kind, ROWS), state_url=state_url(tmp_path)
    )
    try:
        failed = runner.run("s", RunOptions())
    finally:
        runner.close()
    assert failed.status == "failed"
    assert failed.skipped == 2
    assert set(skipped_issues(tmp_path, failed.run_id)) == {"2", "3"}
    assert {k: v[0] for k, v in snapshot_rows(tmp_path).items()} == {
        "2": "skipped",
        "3": "skipped",
    }
    MemoryDestination.fail_batch = staticmethod(lambda action, batch: None)
    healed = run_sync(tmp_path, kind, ROWS)
    assert (healed.sent["add"], healed.skipped) == (1, 2)
    assert MemoryDestination.audiences["A"].keys() == {"1"}


def test_a_dry_run_keeps_no_skipped_rows(tmp_path: Path, kind: str) -> None:
    runner = memory_runner(
        tmp_path,
        write_people(tmp_path, kind, ROWS),
        state_url=state_url(tmp_path),
        identifiers={"email": "email"},
    )
    try:
        plan = runner.run("s", RunOptions(dry_run=True))
    finally:
        runner.close()
    assert plan.status == "dry_run"
    assert plan.skipped == 2
    assert snapshot_rows(tmp_path) == {}


def test_unchanged_skipped_rows_are_not_checked_again(tmp_path: Path) -> None:
    """The planner's normaliser sees a skipped row again only when it changes."""
    store = StateStore(f"sqlite:///{tmp_path / 'state.db'}")
    seen: list[str] = []

    def normalise(payload: dict[str, Any]) -> Normalised:
        seen.append(payload["i"]["email"])
        email = payload["i"]["email"]
        if "@" not in email:
            return Normalised({}, {}, skip_reason=f"no usable identifier: `{email}`")
        return Normalised({"email": email}, {})

    def plan(rows: list[tuple[str, dict[str, Any]]]) -> list[str]:
        seen.clear()
        with store.connect() as connection:
            planner = ChangePlanner(
                connection,
                sync="s",
                mode="mirror",
                matches_on_identifiers=False,
                supports_update=True,
                skip_settings="v1",
            )
            planner.stage_rows(rows)
            issues = planner.finish_staging()
            issues += planner.build(normalise)
            connection.commit()
        return sorted(f"{issue.key}: {issue.reason}" for issue in issues)

    rows = [("a", {"i": {"email": "a"}, "f": {}}), ("b", {"i": {"email": "b"}, "f": {}})]
    assert plan(rows) == ["a: no usable identifier: `a`", "b: no usable identifier: `b`"]
    assert sorted(seen) == ["a", "b"]
    assert plan(rows) == ["a: no usable identifier: `a`", "b: no usable identifier: `b`"]
    assert seen == []  # reported from the snapshot, not checked again
    changed = [("a", {"i": {"email": "a2"}, "f": {}}), rows[1]]
    assert plan(changed) == ["a: no usable identifier: `a2`", "b: no usable identifier: `b`"]
    assert seen == ["a2"]
    store.dispose()
