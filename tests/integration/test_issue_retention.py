"""Row issues are kept for the newest `[state] keep_issue_runs` runs of a sync only: every run
records each skipped row again, so they would otherwise grow with `keep_runs` times the segment's
unusable rows. Older runs keep their counts in the history and a marker that says their issues
were pruned (`StateStore.issues_pruned`)."""

from __future__ import annotations

import datetime as dt
from collections import Counter
from pathlib import Path

import pytest
import sqlalchemy as sa

from connector.state import PRUNED_ISSUES, RowIssue, StateStore, row_issues, runs
from connector.sync import RunOptions
from tests.fakes.memory_destination import MemoryDestination
from tests.helpers import PEOPLE_TWO_SKIPPED, memory_runner, write_people


def issue_rows(url: str) -> Counter[tuple[str, str]]:
    """(run_id, kind) -> row_issues rows, markers included, for every sync."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as connection:
            query = sa.select(row_issues.c.run_id, row_issues.c.kind)
            return Counter((run_id, kind) for run_id, kind in connection.execute(query))
    finally:
        engine.dispose()


def seed_run(store: StateStore, sync: str, run_id: str, minute: int, issues: int) -> None:
    """A finished run started `minute` minutes into the day, with `issues` skipped rows."""
    store.start_run(sync, run_id)
    with store.engine.begin() as connection:
        started = dt.datetime(2026, 12, 1) + dt.timedelta(minutes=minute)
        connection.execute(runs.update().where(runs.c.run_id == run_id).values(started_at=started))
        StateStore.record_issues(
            connection,
            run_id=run_id,
            sync=sync,
            issues=[RowIssue("skipped", str(k), "no usable identifier") for k in range(issues)],
        )
    store.finish_run(
        run_id, status="success", counts={"skipped": issues}, duration_s=0.1, error=None
    )


def test_prune_keeps_the_issues_of_the_newest_runs_and_marks_the_others(state_url: str) -> None:
    store = StateStore(state_url)
    try:
        for minute in range(8):  # r0 (oldest) ... r7 (newest); r5 recorded no issue
            seed_run(store, "s", f"r{minute}", minute, 0 if minute == 5 else 3)
        seed_run(store, "other", "o0", 0, 2)

        for _ in range(2):  # pruning again changes nothing
            store.prune_history("s", keep_runs=6, keep_issue_runs=2)

            assert [r.run_id for r in store.history("s", 100)] == [
                f"r{m}" for m in (7, 6, 5, 4, 3, 2)
            ]
            assert issue_rows(state_url) == Counter(
                {
                    ("r7", "skipped"): 3,
                    ("r6", "skipped"): 3,
                    ("r4", PRUNED_ISSUES): 1,
                    ("r3", PRUNED_ISSUES): 1,
                    ("r2", PRUNED_ISSUES): 1,
                    ("o0", "skipped"): 2,  # another sync's issues are its own business
                }
            )
            pruned = [m for m in range(2, 8) if store.issues_pruned(f"r{m}")]
            assert pruned == [2, 3, 4]
            # The marker is never shown as an issue.
            assert store.issues("r4", limit=None) == []
            assert store.issues("r5", limit=None) == []  # no issue, not pruned
            assert len(store.issues("r7", limit=None)) == 3
            assert store.history("s", 100)[3].skipped == 3  # r4 keeps its counts
    finally:
        store.dispose()


@pytest.mark.parametrize(("keep", "keep_issues"), [(3, 10), (4, 4)])
def test_issues_are_never_kept_for_more_runs_than_the_history(
    state_url: str, keep: int, keep_issues: int
) -> None:
    store = StateStore(state_url)
    try:
        for minute in range(6):
            seed_run(store, "s", f"r{minute}", minute, 1)
        store.prune_history("s", keep_runs=keep, keep_issue_runs=keep_issues)
        kept = [f"r{m}" for m in range(5, 5 - keep, -1)]
        assert [r.run_id for r in store.history("s", 100)] == kept
        assert issue_rows(state_url) == Counter({(run_id, "skipped"): 1 for run_id in kept})
    finally:
        store.dispose()


def run_times(folder: Path, state_url: str, times: int, **state: int) -> list[str]:
    """Run sync `s` `times` times over PEOPLE_TWO_SKIPPED with the `[state]` options `state`;
    returns the run ids, newest first."""
    MemoryDestination.reset()
    warehouse_url = write_people(folder, "duckdb", PEOPLE_TWO_SKIPPED)
    run_ids = []
    for _ in range(times):
        runner = memory_runner(folder, warehouse_url, state_url=state_url, state=state)
        try:
            result = runner.run("s", RunOptions())
        finally:
            runner.close()
        assert (result.status, result.skipped) == ("success", 2), result.error
        run_ids.append(result.run_id)
    return run_ids[::-1]


def test_runs_keep_row_issues_for_the_newest_10_runs_by_default(
    tmp_path: Path, state_url: str
) -> None:
    newest_first = run_times(tmp_path, state_url, 12, keep_runs=11)

    store = StateStore(state_url)
    try:
        assert [r.run_id for r in store.history("s", 100)] == newest_first[:11]
        assert issue_rows(state_url) == Counter(
            {
                **{(run_id, "skipped"): 2 for run_id in newest_first[:10]},
                (newest_first[10], PRUNED_ISSUES): 1,
            }
        )
        assert store.issues_pruned(newest_first[10])
        assert {i.key for i in store.issues(newest_first[0])} == {"2", "3"}
    finally:
        store.dispose()


def test_runs_keep_row_issues_for_the_configured_number_of_runs(
    tmp_path: Path, state_url: str
) -> None:
    newest_first = run_times(tmp_path, state_url, 5, keep_runs=4, keep_issue_runs=2)

    assert issue_rows(state_url) == Counter(
        {
            **{(run_id, "skipped"): 2 for run_id in newest_first[:2]},
            **{(run_id, PRUNED_ISSUES): 1 for run_id in newest_first[2:4]},
        }
    )
