"""A first sync on DuckDB is streamed straight to the destination (`connector.first_sync`).

It must end exactly where the staged path ends (the path `--full-resync` takes): the same
audience, the same snapshot rows, the same row issues; in this process and with the second,
normalising process; and later runs must compare against what it wrote.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.context
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

import connector.diff
import connector.row_normaliser
from connector.errors import BatchFailedError, Terminated, WinbackError
from connector.identity import normalise_identifiers
from connector.interrupts import stop_on_sigterm
from connector.json_text import compact_text
from connector.row_normaliser import (
    ChunkNormaliser,
    NormalisingPool,
    PayloadBuilder,
    PayloadNormaliser,
    Ready,
    RowNormaliser,
    decoded_outcomes,
    encode_outcomes,
)
from connector.state import StateStore
from connector.sync import RunOptions, RunResult
from tests.fakes.memory_destination import MemoryDestination
from tests.helpers import memory_runner, write_people

ROWS: list[tuple[Any, ...]] = [
    ("1", "ann@example.com", "+33 6 12 34 56 78", "France"),
    ("2", "  BOB@Example.COM ", None, "GB"),
    ("3", "bad@", "+1 415 555 0100", "US"),  # email dropped, sent with the phone
    ("4", "bad@", None, "DE"),  # no usable identifier: skipped, kept as 'skipped'
    ("5", None, None, None),  # nothing at all: skipped
    (None, "nokey@example.com", None, None),  # null key
    ("   ", "blank@example.com", None, None),  # blank key
    ("x" * 501, "long@example.com", None, None),  # key too long
    ("6", "first@example.com", None, "FR"),  # duplicate key: first row kept
    ("6", "second@example.com", None, "FR"),
    ("6", "third@example.com", None, "FR"),
    ("7", "bad@", None, None),  # duplicate whose first row has no usable identifier
    ("7", "later@example.com", None, None),
    ("8", "carl@example.com", "020 7946 0958", "United Kingdom"),
]


def snapshot_rows(state_url: str) -> set[tuple[Any, ...]]:
    """Everything but the timestamps and the destination's platform ids."""
    engine = sa.create_engine(state_url)
    try:
        with engine.connect() as connection:
            rows = connection.execute(
                sa.text(
                    "SELECT key, status, raw_fp, identity_fp, fields_fp, identifiers, reason "
                    "FROM snapshot WHERE sync = 's'"
                )
            )
            return {tuple(row) for row in rows}
    finally:
        engine.dispose()


def issues_of(state_url: str, run_id: str) -> Counter[tuple[Any, ...]]:
    store = StateStore(state_url)
    try:
        return Counter((i.kind, i.key, i.reason, i.action) for i in store.issues(run_id))
    finally:
        store.dispose()


def run_once(folder: Path, options: RunOptions, state_url: str, **sync: Any) -> RunResult:
    warehouse = write_people(folder, "duckdb", ROWS)
    runner = memory_runner(folder, warehouse, state_url=state_url, **sync)
    try:
        return runner.run("s", options)
    finally:
        runner.close()


def forget(state_url: str) -> None:
    """`winback sync reset s`: the next run is a first sync again."""
    store = StateStore(state_url)
    try:
        store.reset("s")
    finally:
        store.dispose()


def counts(result: RunResult) -> tuple[Any, ...]:
    return (
        result.status,
        result.segment_rows,
        result.skipped,
        result.planned,
        result.sent,
        result.rejected,
    )


@pytest.fixture(params=["this process", "second process"])
def normalising(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "second process":
        monkeypatch.setattr(connector.row_normaliser, "PARALLEL_MIN_ROWS", 0)
    return str(request.param)


def test_streamed_first_sync_ends_where_the_staged_path_ends(
    tmp_path: Path, normalising: str, state_url: str
) -> None:
    MemoryDestination.reset()
    MemoryDestination.reject = staticmethod(
        lambda m: "refused by the platform" if m.key == "8" else None
    )
    streamed = run_once(tmp_path, RunOptions(), state_url)
    streamed_audience = MemoryDestination.audiences.pop("A")
    streamed_snapshot = snapshot_rows(state_url)
    forget(state_url)
    staged = run_once(tmp_path, RunOptions(full_resync=True), state_url)  # stages the segment
    staged_audience = MemoryDestination.audiences.pop("A")

    assert counts(streamed) == counts(staged)
    assert counts(streamed) == (
        "partial",
        len(ROWS),
        9,  # null, blank, long key; 4, 5 and 7's first row; two extra rows of 6, one of 7
        {"add": 5, "remove": 0, "update": 0},
        {"add": 4, "remove": 0, "update": 0},
        1,
    )

    def without_platform_ids(audience: dict[str, Any]) -> dict[str, Any]:
        return {k: {**v, "platform_id": None} for k, v in audience.items()}

    assert without_platform_ids(streamed_audience) == without_platform_ids(staged_audience)
    assert streamed_audience["6"]["identifiers"]["email"] == "first@example.com"
    assert "7" not in streamed_audience  # its first row had nothing usable
    assert streamed_snapshot == snapshot_rows(state_url)
    assert len(streamed_snapshot) == 8  # 5 sent (one rejected) and 3 kept as skipped
    assert issues_of(state_url, streamed.run_id) == issues_of(state_url, staged.run_id)


CHANGED_ROWS: list[tuple[Any, ...]] = [
    ("1", "ann@example.com", "+33 6 12 34 56 79", "France"),  # new phone: an update
    ("2", "bad@", None, "GB"),  # a member without a usable identifier now
    ("3", "bad@", "+1 415 555 0100", "US"),  # unchanged
    ("4", "dora@example.com", None, "DE"),  # skipped before, usable now
    ("6", "first@example.com", None, "FR"),
    ("8", "carl@example.com", "020 7946 0958", "United Kingdom"),
    ("9", "new@example.com", None, None),  # joins
    ("10", "", None, None),  # joins without a usable identifier
]


@pytest.mark.parametrize("warehouse_kind", ["sqlite", "duckdb"])
def test_planning_in_a_second_process_plans_what_this_one_does(
    tmp_path: Path, warehouse_kind: str, state_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The staged path (a first sync on a warehouse that does not diff, `--full-resync`, the
    next runs) hands its candidates to the normalising process when they are many: the same
    plan, snapshot and row issues as when this process normalises them."""

    def sync_twice(folder: Path) -> tuple[list[tuple[Any, ...]], Any, list[Any]]:
        MemoryDestination.reset()
        folder.mkdir()
        forget(state_url)
        outcomes = []
        for rows, options in [(ROWS, RunOptions(full_resync=True)), (CHANGED_ROWS, RunOptions())]:
            warehouse = write_people(folder, warehouse_kind, rows)
            runner = memory_runner(folder, warehouse, state_url=state_url)
            try:
                result = runner.run("s", options)
            finally:
                runner.close()
            assert result.status in ("success", "partial"), result.error
            outcomes.append(
                (counts(result), issues_of(state_url, result.run_id), snapshot_rows(state_url))
            )
        audience = MemoryDestination.audiences.pop("A")
        members = {key: member["identifiers"] for key, member in audience.items()}
        return outcomes, members, MemoryDestination.calls

    here = sync_twice(tmp_path / "here")
    monkeypatch.setattr(connector.row_normaliser, "PARALLEL_MIN_ROWS", 0)
    monkeypatch.setattr(connector.diff, "PAGE_SIZE", 2)  # the first page here, four by the pool
    in_second_process = sync_twice(tmp_path / "second")

    assert in_second_process == here
    first, second = here[0]
    assert first[0][3] == {"add": 5, "remove": 0, "update": 0}
    assert second[0][3] == {"add": 2, "remove": 1, "update": 1}


def test_next_run_compares_against_what_the_streamed_sync_wrote(
    tmp_path: Path, normalising: str
) -> None:
    MemoryDestination.reset()
    state_url = f"sqlite:///{tmp_path / 'state.db'}"
    first = run_once(tmp_path, RunOptions(), state_url)
    assert first.status == "success", first.error
    MemoryDestination.calls.clear()

    again = run_once(tmp_path, RunOptions(), state_url)

    assert again.status == "success", again.error
    assert again.planned == {"add": 0, "remove": 0, "update": 0}
    assert again.skipped == first.skipped
    assert MemoryDestination.calls == []


def test_a_failed_batch_stays_pending_for_the_next_run(tmp_path: Path) -> None:
    MemoryDestination.reset()
    MemoryDestination.fail_batch = staticmethod(
        lambda action, batch: BatchFailedError("injected 400") if batch.number == 1 else None
    )
    state_url = f"sqlite:///{tmp_path / 'state.db'}"
    first = run_once(tmp_path, RunOptions(), state_url, batch_size=2)
    assert first.status == "failed" and "injected 400" in (first.error or "")
    assert first.sent["add"] == 3  # batches of 2, 2 and 1: the first failed
    MemoryDestination.fail_batch = staticmethod(lambda action, batch: None)

    second = run_once(tmp_path, RunOptions(), state_url, batch_size=2)

    assert second.status == "success", second.error
    assert second.planned == {"add": 2, "remove": 0, "update": 0}
    assert set(MemoryDestination.audiences["A"]) == {"1", "2", "3", "6", "8"}


def test_ctrl_c_during_a_checkpoint_is_recorded_and_leaves_nothing_locked(tmp_path: Path) -> None:
    """Ctrl-C inside a state-store statement: SQLAlchemy discards that connection, whose
    transaction stays open (keeping SQLite locked) until the interrupted frames are gone. The
    run is recorded as interrupted at once, and the next run sends exactly the rest."""
    MemoryDestination.reset()
    warehouse = write_people(tmp_path, "duckdb", ROWS)
    runner = memory_runner(tmp_path, warehouse, batch_size=2)
    checkpoints = 0

    def interrupt_the_second_checkpoint(*args: Any) -> None:
        nonlocal checkpoints
        if args[2].startswith("INSERT INTO snapshot"):
            checkpoints += 1
            if checkpoints == 2:
                raise KeyboardInterrupt

    sa.event.listen(runner.store.engine, "after_cursor_execute", interrupt_the_second_checkpoint)
    started = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            runner.run("s", RunOptions())
    finally:
        sa.event.remove(
            runner.store.engine, "after_cursor_execute", interrupt_the_second_checkpoint
        )
    # Recording the run did not wait for the lock (SQLite's busy timeout is 30 s).
    assert time.monotonic() - started < 10
    history = runner.store.history("s", 5)
    assert [(run.status, run.error) for run in history] == [("failed", "interrupted by the user")]
    assert runner.store.lock_holder("s") is None

    second = runner.run("s", RunOptions())
    runner.close()

    assert second.status == "success", second.error
    assert set(MemoryDestination.audiences["A"]) == {"1", "2", "3", "6", "8"}
    # The interrupted batch (2 rows) was acknowledged but not recorded: only it is sent again.
    assert sum(n for _, n in MemoryDestination.calls) == 5 + 2, MemoryDestination.calls


def test_sigterm_while_the_run_is_recorded_waits_until_it_is(tmp_path: Path) -> None:
    """A scheduler's SIGTERM arriving while the run is recorded: recording and releasing the
    lock finish first (no run left `running`), then the run stops as for any SIGTERM."""
    MemoryDestination.reset()
    warehouse = write_people(tmp_path, "duckdb", ROWS)
    runner = memory_runner(tmp_path, warehouse, batch_size=2)

    def sigterm_when_recording(*args: Any) -> None:
        if args[2].startswith("UPDATE runs") and "finished_at" in args[2]:  # not a checkpoint's
            signal.raise_signal(signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, stop_on_sigterm)  # as the CLI does
    sa.event.listen(runner.store.engine, "before_cursor_execute", sigterm_when_recording)
    try:
        with pytest.raises(Terminated):
            runner.run("s", RunOptions())
    finally:
        sa.event.remove(runner.store.engine, "before_cursor_execute", sigterm_when_recording)
        signal.signal(signal.SIGTERM, previous)
    history = runner.store.history("s", 5)
    runner.close()
    assert [run.status for run in history] == ["success"]
    assert runner.store.lock_holder("s") is None
    assert set(MemoryDestination.audiences["A"]) == {"1", "2", "3", "6", "8"}


def test_a_dry_run_of_a_first_sync_writes_nothing(tmp_path: Path, normalising: str) -> None:
    """`sync plan` before a first sync reads and normalises as the first sync does and only
    counts: the plan of the staged path (`--full-resync`), with nothing staged or written."""
    MemoryDestination.reset()
    state_url = f"sqlite:///{tmp_path / 'state.db'}"
    statements: list[str] = []
    store = StateStore(state_url)

    def remember(*args: Any) -> None:
        statements.append(args[2])

    runner = memory_runner(tmp_path, write_people(tmp_path, "duckdb", ROWS), state_url=state_url)
    runner._store = store
    sa.event.listen(store.engine, "before_cursor_execute", remember)
    try:
        plan = runner.run("s", RunOptions(dry_run=True))
    finally:
        sa.event.remove(store.engine, "before_cursor_execute", remember)
    staged = runner.run("s", RunOptions(dry_run=True, full_resync=True))
    runner.close()

    assert plan.status == "dry_run"
    assert plan.planned == {"add": 5, "remove": 0, "update": 0}
    assert counts(plan) == counts(staged)
    assert plan.samples == staged.samples
    assert plan.samples["add"] == ["1", "2", "3", "6", "8"]
    assert MemoryDestination.calls == []
    assert snapshot_rows(state_url) == set()
    # The planner's empty temporary tables are all it creates; it reads the snapshot once.
    writes = [s for s in statements if s.split()[0].upper() in ("INSERT", "UPDATE", "DELETE")]
    assert writes == []
    assert all("TEMPORARY" in s for s in statements if s.upper().startswith("CREATE"))


# -- the normalising process ------------------------------------------------------------------


def chunk_normaliser() -> ChunkNormaliser:
    normalise = RowNormaliser(
        default_country=None,
        accepted=frozenset({"email", "phone", "country"}),
        matching=frozenset({"email", "phone"}),
    )
    columns = ["email", "phone", "country"]
    payload = PayloadBuilder.for_columns(columns, {"email": "email", "phone": "phone"}, {})
    return ChunkNormaliser(payload, normalise)


def test_the_second_process_gives_what_this_one_gives() -> None:
    rows = [("A@B.com", "+1 415 555 0100", "US"), ("bad@", None, None), (None, "12", None)]
    inline = NormalisingPool(chunk_normaliser(), parallel=False)
    with NormalisingPool(chunk_normaliser(), parallel=True) as pool:
        assert pool.parallel
        parallel = NormalisingPool.outcomes(pool.submit(rows))
    assert parallel == NormalisingPool.outcomes(inline.submit(rows))
    ready = parallel[0]
    assert isinstance(ready, Ready)
    expected = normalise_identifiers({"email": "A@B.com", "phone": "+1 415 555 0100"})
    assert ready.identifiers == expected.identifiers
    assert isinstance(parallel[1], str) and "no usable identifier" in parallel[1]


def test_a_worker_that_is_behind_shares_the_work_with_this_process() -> None:
    rows = [("A@B.com", "+1 415 555 0100", "US"), ("bad@", None, None)]
    with NormalisingPool(chunk_normaliser(), parallel=True, share_when_behind=1) as pool:
        first = pool.submit(rows)  # the worker is still starting: this one waits for it
        second = pool.submit(rows)
        assert second.done() and not first.done()  # normalised here, at once
        assert NormalisingPool.outcomes(first) == NormalisingPool.outcomes(second)
        third = pool.submit(rows)  # nothing waits for the worker any more
        assert NormalisingPool.outcomes(third) == NormalisingPool.outcomes(first)
        assert isinstance(third.result(), bytes)  # it came from the worker


def test_staged_payloads_normalise_as_warehouse_rows_do() -> None:
    """The planner's jobs (payload texts read back from the stage) and the streamed first
    sync's (warehouse rows) give the same outcomes."""
    rows = [("A@B.com", "+1 415 555 0100", "US"), ("bad@", None, None), (None, "12", None)]
    chunks = chunk_normaliser()
    texts = [compact_text(chunks.payload(row)) for row in rows]
    with NormalisingPool(PayloadNormaliser(chunks.normalise), parallel=True) as pool:
        from_texts = NormalisingPool.outcomes(pool.submit(texts))
    assert from_texts == chunks(rows)


def test_outcomes_leave_the_worker_as_one_json_document_and_come_back_equal() -> None:
    outcomes = [
        Ready({"email": "a@b.com"}, {"F": 1.5, "G": None, "H": [1, "x"]}, ("phone: bad",),
              '{"email":"a@b.com"}', "fp1", '{"F":1.5}', "fp2"),
        Ready({"email": "é@b.com"}, {}, (), '{"email":"\\u00e9@b.com"}', "fp3", "{}", "fp4"),
        "no usable identifier (email): all identifier columns are empty",
    ]  # fmt: skip
    sent = encode_outcomes(outcomes)
    assert isinstance(sent, bytes)
    assert decoded_outcomes(sent) == outcomes
    # What orjson refuses (an integer beyond 64 bits) is handed over as it is.
    huge = [Ready({"email": "a@b.com"}, {"N": 2**70}, (), "{}", "fp", "{}", "fp")]
    assert encode_outcomes(huge) is huge
    assert decoded_outcomes(huge) is huge


def test_the_worker_outlives_a_sigterm_sent_to_the_whole_group() -> None:
    """Schedulers send SIGTERM to every process of a task: winback stops the run and closes the
    pool itself, so the worker ignores it (dying mid-result would hang the pool's shutdown)."""
    with NormalisingPool(chunk_normaliser(), parallel=True) as pool:
        NormalisingPool.outcomes(pool.submit([("a@b.com", None, None)]))
        executor = pool._executor
        assert executor is not None
        (process,) = executor._processes.values()
        os.kill(process.pid, signal.SIGTERM)
        time.sleep(0.3)
        assert process.is_alive()
        outcomes = NormalisingPool.outcomes(pool.submit([("c@d.com", None, None)]))
        assert isinstance(outcomes[0], Ready)
    assert not process.is_alive()  # closing the pool still ends it


def test_a_worker_that_dies_fails_the_run_with_a_clear_error() -> None:
    with NormalisingPool(chunk_normaliser(), parallel=True) as pool:
        NormalisingPool.outcomes(pool.submit([("a@b.com", None, None)]))
        executor = pool._executor
        assert executor is not None
        for process in list(executor._processes.values()):
            os.kill(process.pid, signal.SIGKILL)
        time.sleep(0.5)
        with pytest.raises(
            WinbackError, match=r"stopped unexpectedly.*run the sync again to send the rest"
        ):
            NormalisingPool.outcomes(pool.submit([("a@b.com", None, None)]))


def test_the_worker_exits_when_its_parent_is_killed(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import sys, time
        from tests.integration.test_first_sync import chunk_normaliser
        from connector.row_normaliser import NormalisingPool

        if __name__ == "__main__":
            pool = NormalisingPool(chunk_normaliser(), parallel=True)
            NormalisingPool.outcomes(pool.submit([("a@b.com", None, None)]))
            print(*[p.pid for p in pool._executor._processes.values()], flush=True)
            time.sleep(60)
        """
    )
    path = tmp_path / "parent.py"
    path.write_text(script)
    root = Path(__file__).resolve().parents[2]
    parent = subprocess.Popen(
        [sys.executable, str(path)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    assert parent.stdout is not None
    with parent.stdout:
        workers = [int(pid) for pid in parent.stdout.readline().split()]
        assert workers
        parent.kill()
        parent.wait(timeout=10)

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(pid) for pid in workers):
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in workers)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie has exited; it only waits for its new parent (init) to reap it.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


class _CannotStartProcesses(multiprocessing.context.SpawnContext):
    """A system where starting a process fails (no fork/spawn allowed in the container)."""

    class Process(multiprocessing.context.SpawnProcess):
        def start(self) -> None:
            raise OSError(38, "Function not implemented")


def test_without_processes_the_pool_normalises_in_this_process(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(multiprocessing, "get_context", lambda method: _CannotStartProcesses())
    rows = [("A@B.com", None, None), ("bad@", None, None)]
    with NormalisingPool(chunk_normaliser(), parallel=True) as pool:
        outcomes = NormalisingPool.outcomes(pool.submit(rows))
        assert not pool.parallel
    assert outcomes == chunk_normaliser()(rows)
    assert "cannot start a process to normalise identifiers" in caplog.text
