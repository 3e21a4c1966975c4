"""A first sync streamed straight to the destination.

With no snapshot yet (a new sync, or after `sync reset`) every valid segment row is an add:
there is nothing to compare with, so staging the segment and writing a plan (`connector.diff`)
would only write every row twice and read it back twice. Instead the rows read from the
warehouse are normalised and handed to delivery as they arrive, in batches, and each
acknowledged batch is checkpointed as usual. Rows that cannot be sent (null, blank, too long
or duplicate key, no usable identifier) are recorded on the same state connection and committed
with the next checkpoint; a row without a usable identifier is kept in the snapshot as
`skipped`, as the planner does.

Duplicate keys are found beforehand by one aggregate pass of the segment query in the warehouse
(the first row of each key is sent, as on the other paths), so nothing of the segment is held in
memory. Normalising, most of the per-row work, runs in a second process for a large segment
(`connector.row_normaliser`) while this one reads the next rows and sends the previous ones. A crash at any point loses nothing: the snapshot holds exactly the acknowledged rows and
the next run, which has a snapshot to compare with, sends what is missing.

Only on the in-warehouse path (DuckDB). A dry run reads and normalises the same way and only
counts: nothing is staged, sent or written.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import sqlalchemy as sa

from connector.delivery import Delivery, Reporter
from connector.diff import (
    PlannedChange,
    dropped_issue,
    duplicate_key_issues,
    skipped_snapshot_row,
)
from connector.pushdown import KeyCensus, WarehouseDiff
from connector.row_normaliser import (
    ChunkNormaliser,
    NormalisingPool,
    Outcome,
    RowNormaliser,
    second_process_pays,
)
from connector.run_result import RunResult
from connector.staging import (
    SegmentSource,
    payload_builder,
    warehouse_diff,
    warehouse_key_issue,
)
from connector.state import RowIssue, StateStore, insert_rows, snapshot

JOB_ROWS = 2000
"""Rows per job handed to the normaliser: small jobs keep both processes' memory low."""
JOBS_AHEAD = 6
"""Jobs handed to the normaliser before the oldest one's rows are sent."""
WORKER_JOBS_QUEUED = 3
"""When this many jobs wait for the normalising process, the next one is normalised here (the
worker is behind; this process would only wait for it)."""
ISSUES_PAGE = 5000
"""Row issues and skipped rows written at most this many at a time."""
PLAN_PROGRESS_STEP = 5000
"""Rows a dry run counts between two updates of the progress bar."""


class StreamedFirstSync:
    """Reads, normalises and sends one sync's segment in a single pass (or, for a dry run,
    counts what it would send)."""

    def __init__(
        self,
        source: SegmentSource,
        *,
        engine: sa.Engine,
        connection: sa.Connection,
        result: RunResult,
        reporter: Reporter,
        normalise: RowNormaliser,
        skip_settings: str,
    ):
        """Rows not sent are recorded on the state `connection` (that of the delivery), counted
        in `result` and reported as progress."""
        self.source = source
        self.engine = engine
        self.normalise = normalise
        self.skip_settings = skip_settings
        self.connection = connection
        self.result = result
        self.reporter = reporter
        self._recording = True
        self._issues: list[RowIssue] = []
        self._skipped_rows: list[tuple[Any, ...]] = []

    def send(self, delivery: Delivery, *, batch_size: int) -> None:
        """Send every row that can be sent through `delivery`; record the others."""
        with self._segment_changes("add (first sync)") as changes:
            delivery.send("add", changes, batch_size=batch_size)
        self.connection.commit()

    def plan(self, *, samples: int = 5) -> list[str]:
        """A dry run: what `send` would send, counted in the run result as it counts it;
        nothing is sent or written. Returns the first `samples` keys it would add."""
        self._recording = False
        keys: list[str] = []
        with self._segment_changes("planning (first sync)") as changes:
            for planned, change in enumerate(changes, start=1):
                if len(keys) < samples:
                    keys.append(change.key)
                if planned % PLAN_PROGRESS_STEP == 0:
                    self.reporter.advance(PLAN_PROGRESS_STEP)
        self.reporter.advance(self.result.planned["add"] % PLAN_PROGRESS_STEP)
        return keys

    @contextlib.contextmanager
    def _segment_changes(self, phase: str) -> Iterator[Iterator[PlannedChange]]:
        """The segment's adds, read after one census of its keys (shown as `phase` with the
        segment's size); the rows not sent are written, or counted, once they are consumed."""
        with warehouse_diff(self.source, self.engine) as diff:
            census = diff.key_census()
            self.reporter.phase(f"{self.source.sync}: {phase}", census.rows)
            yield self._changes(diff, census)
        self._write_issues()

    def _changes(self, diff: WarehouseDiff, census: KeyCensus) -> Iterator[PlannedChange]:
        """The segment's rows as adds, in segment order; the others recorded as issues.

        Each chunk's rows are checked by key here and normalised by the pool (in a second
        process for a large segment) while the next chunk is read and earlier ones are sent."""
        normalise = ChunkNormaliser(payload_builder(diff.columns, self.source), self.normalise)
        with NormalisingPool(
            normalise,
            parallel=second_process_pays(census.rows),
            share_when_behind=WORKER_JOBS_QUEUED,
        ) as pool:
            for (keys, fingerprints), outcomes in pool.in_order(
                self._jobs(diff, census), ahead=JOBS_AHEAD
            ):
                yield from self._adds(keys, fingerprints, outcomes)

    def _jobs(
        self, diff: WarehouseDiff, census: KeyCensus
    ) -> Iterator[tuple[tuple[list[str], list[str]], list[tuple[Any, ...]]]]:
        """The rows to normalise, a job at a time, with their keys and fingerprints; rows with
        a bad or repeated key are recorded as issues instead."""
        source = self.source
        duplicates, seen_duplicates = census.duplicates, set[str]()
        for chunk in diff.every_row(chunk_size=source.chunk_size):
            keys, fingerprints, values = [], [], []
            for row in chunk:  # mapped columns, then key and fingerprint
                key = row[-2]
                issue = warehouse_key_issue(source, key)
                if issue is not None:
                    self._issues.append(issue)
                    continue
                if key in duplicates:
                    if key in seen_duplicates:
                        continue  # counted by duplicate_key_issues below
                    seen_duplicates.add(key)
                    self._issues += duplicate_key_issues(key, duplicates[key])
                keys.append(key)
                fingerprints.append(row[-1])
                values.append(tuple(row))
            self.result.segment_rows += len(chunk)
            for start in range(0, len(keys), JOB_ROWS):
                job = slice(start, start + JOB_ROWS)
                yield (keys[job], fingerprints[job]), values[job]

    def _adds(
        self, keys: list[str], fingerprints: list[str], outcomes: list[Outcome]
    ) -> Iterator[PlannedChange]:
        result, sync = self.result, self.source.sync
        for key, raw_fp, outcome in zip(keys, fingerprints, outcomes, strict=True):
            if isinstance(outcome, str):  # no usable identifier
                self._issues.append(RowIssue("skipped", key, outcome))
                self._skipped_rows.append(
                    skipped_snapshot_row(sync, key, raw_fp, outcome, self.skip_settings)
                )
                continue
            if outcome.dropped:
                self._issues.append(dropped_issue(key, outcome.dropped))
            result.planned["add"] += 1
            yield PlannedChange(
                result.planned["add"],
                "add",
                key,
                raw_fp,
                outcome.identity_fp,
                outcome.fields_fp,
                outcome.identifiers,
                outcome.fields,
                None,
                outcome.identifiers_text,
                in_snapshot=False,
            )
        if len(self._issues) >= ISSUES_PAGE:
            self._write_issues()

    def _write_issues(self) -> None:
        """Record the rows not sent so far (committed with the next checkpoint); a dry run
        only counts them."""
        issues, self._issues = self._issues, []
        skipped_rows, self._skipped_rows = self._skipped_rows, []
        result = self.result
        if self._recording:
            StateStore.record_issues(
                self.connection, run_id=result.run_id, sync=self.source.sync, issues=issues
            )
            insert_rows(self.connection, snapshot, skipped_rows)
        result.skipped += sum(1 for issue in issues if issue.kind == "skipped")
        self.reporter.advance(sum(1 for issue in issues if issue.kind != "dropped"))
