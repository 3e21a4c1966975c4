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
memory. Should the rows differ between that pass and the read (a table loaded meanwhile, a query
whose rows vary), a key repeated within a batch is sent once, and one that an earlier batch
recorded keeps that row in the snapshot (`delivery.insert_new_snapshot_rows`): the later rows
are skipped duplicates, and the state store never sees a key twice. Normalising, most of the per-row work, runs in a second process for a large segment
(`connector.row_normaliser`) while this one reads the next rows and sends the previous ones.
A crash at any point loses nothing: the snapshot holds exactly the acknowledged rows and the
next run, which has a snapshot to compare with, sends what is missing.

The key texts and raw fingerprints written are those the next runs compare: the warehouse's
with pushdown (DuckDB, PostgreSQL: `SegmentComparedInWarehouse`), the state database's on
SQLite (`SegmentRead`). A warehouse whose GROUP BY may tell apart keys of one text (SQLite keys of
several storage classes, dialects not in `READ_STREAM_DIALECTS`) has its first sync staged as
any other run. A dry run reads and normalises the same way and only counts: nothing is staged,
sent or written.
"""

from __future__ import annotations

import contextlib
import logging
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Any

import sqlalchemy as sa

from connector.delivery import Delivery, Reporter, insert_new_snapshot_rows
from connector.diff import (
    PlannedChange,
    dropped_issue,
    duplicate_key_issues,
    skipped_snapshot_row,
)
from connector.errors import DestinationError
from connector.json_text import fingerprinted_text
from connector.pushdown import KeyCensus
from connector.row_normaliser import (
    ChunkNormaliser,
    JobNormaliser,
    NormalisingPool,
    Outcome,
    PayloadNormaliser,
    RowNormaliser,
    second_process_pays,
)
from connector.run_result import RunResult
from connector.segments import segment_keys
from connector.staging import (
    KeyedChunk,
    PayloadChunk,
    SegmentSource,
    checked_query,
    keyed_chunks,
    payload_builder,
    read_payloads,
    segment_key,
    warehouse_diff,
)
from connector.state import RowIssue, StateStore

log = logging.getLogger("winback.sync")

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

READ_STREAM_DIALECTS = frozenset({"sqlite"})
"""Warehouses whose GROUP BY is known to tell keys apart exactly as their texts in the state
database do: SQLite, grouping integer or text keys as bytes (`segments.segment_keys`). Elsewhere,
with pushdown off, a first sync is staged: a collation that makes 'A' equal to 'a', or numbers
whose text rounds, would make the census miss a repeated key, and the stream would then send it
twice."""


class StreamedSegment(ABC):
    """Where a streamed first sync reads the segment: its key census, then its rows."""

    def __init__(self, source: SegmentSource, engine: sa.Engine):
        self.source = source
        self.engine = engine

    @abstractmethod
    def census(self) -> KeyCensus | None:
        """Rows and repeated keys (by key text); None when only the state database can tell
        the keys apart."""

    @abstractmethod
    def normaliser(self, normalise: RowNormaliser) -> JobNormaliser:
        """What normalises the third items of the chunks."""

    @abstractmethod
    def chunks(self) -> contextlib.AbstractContextManager[Iterator[KeyedChunk]]:
        """The segment's rows, a chunk at a time, in segment order."""


def streamable_segment(
    source: SegmentSource, engine: sa.Engine, *, in_warehouse: bool
) -> tuple[StreamedSegment, KeyCensus] | None:
    """Where a first sync of `source` streams the segment from, with its key census taken;
    None (having read no row) when this warehouse cannot tell the keys apart as the state
    database does: the segment is staged instead."""
    segment: StreamedSegment
    if in_warehouse:
        segment = SegmentComparedInWarehouse(source, engine)
    elif engine.dialect.name in READ_STREAM_DIALECTS:
        segment = SegmentRead(source, engine)
    else:
        return None
    census = segment.census()
    return None if census is None else (segment, census)


class SegmentComparedInWarehouse(StreamedSegment):
    """DuckDB and PostgreSQL with pushdown: the key census, key texts and raw fingerprints
    come from the warehouse (`connector.pushdown`), as later runs compare them there; the
    rows' mapped values are normalised."""

    def census(self) -> KeyCensus:
        with warehouse_diff(self.source, self.engine) as diff:
            return diff.key_census()

    def normaliser(self, normalise: RowNormaliser) -> JobNormaliser:
        payload = payload_builder(self.source.mapped_columns(), self.source)
        return ChunkNormaliser(payload, normalise)

    @contextlib.contextmanager
    def chunks(self) -> Iterator[Iterator[KeyedChunk]]:
        with warehouse_diff(self.source, self.engine) as diff:
            yield keyed_chunks(self.source, diff, tuple)  # the normaliser reads the rows


class SegmentRead(StreamedSegment):
    """SQLite (`READ_STREAM_DIALECTS`): one aggregate query counts the rows and finds the
    repeated keys, then the segment is read as the state database's diff reads it
    (`staging.read_payloads`): key texts and raw fingerprints (the SHA-1 of the payload's
    compact JSON) are those later runs compare; the payload texts are normalised."""

    def census(self) -> KeyCensus | None:
        source = self.source
        query, columns = checked_query(source, self.engine)
        keys = segment_keys(
            source.segment_name,
            source.segment,
            engine=self.engine,
            query=query,
            columns=columns,
        )
        if keys is None:
            return None
        duplicates: dict[str, int] = {}
        for value, rows in keys.repeated:
            key = segment_key(source, value)
            if isinstance(key, str):
                duplicates[key] = rows
        return KeyCensus(keys.rows, duplicates)

    def normaliser(self, normalise: RowNormaliser) -> JobNormaliser:
        return PayloadNormaliser(normalise)

    @contextlib.contextmanager
    def chunks(self) -> Iterator[Iterator[KeyedChunk]]:
        with read_payloads(self.source, self.engine) as chunks:
            yield self._fingerprinted(chunks)

    @staticmethod
    def _fingerprinted(chunks: Iterator[PayloadChunk]) -> Iterator[KeyedChunk]:
        for rows, issues, keyed in chunks:
            fingerprinted = []
            for key, payload in keyed:
                text, raw_fp = fingerprinted_text(payload)
                fingerprinted.append((key, raw_fp, text))
            yield rows, issues, fingerprinted


class StreamedFirstSync:
    """Reads, normalises and sends one sync's segment in a single pass (or, for a dry run,
    counts what it would send)."""

    def __init__(
        self,
        segment: StreamedSegment,
        census: KeyCensus,
        *,
        connection: sa.Connection,
        result: RunResult,
        reporter: Reporter,
        normalise: RowNormaliser,
        skip_settings: str,
    ):
        """`census` is the segment's (`segment.census()`). Rows not sent are recorded on the
        state `connection` (that of the delivery), counted in `result` and reported as
        progress."""
        self.segment = segment
        self.source = segment.source
        self.census = census
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
            delivery.send("add", changes, batch_size=batch_size, estimated_rows=self.census.rows)
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
        """The segment's adds (shown as `phase` with the segment's size); the rows not sent
        are written, or counted, once they are consumed."""
        self.reporter.phase(f"{self.source.sync}: {phase}", self.census.rows)
        with self.segment.chunks() as chunks:
            try:
                yield self._changes(chunks)
            except DestinationError:
                self._keep_issues_of_failed_run()
                raise
        self._write_issues()

    def _keep_issues_of_failed_run(self) -> None:
        """The destination failed: the rows read so far and not sendable are recorded all
        the same, so the failed run reports them. Every checkpoint so far is whole (a
        destination error is raised between them), so only issues are left to commit."""
        try:
            self._write_issues()
            self.connection.commit()
        except sa.exc.SQLAlchemyError as error:  # the destination's error is the one to report
            self.connection.rollback()
            log.warning("%s: could not record the skipped rows: %s", self.source.sync, error)

    def _changes(self, chunks: Iterator[KeyedChunk]) -> Iterator[PlannedChange]:
        """The segment's rows as adds, in segment order; the others recorded as issues.

        Each chunk's rows are checked by key here and normalised by the pool (in a second
        process for a large segment) while the next chunk is read and earlier ones are sent."""
        with NormalisingPool(
            self.segment.normaliser(self.normalise),
            parallel=second_process_pays(self.census.rows),
            share_when_behind=WORKER_JOBS_QUEUED,
        ) as pool:
            for (keys, fingerprints), outcomes in pool.in_order(
                self._jobs(chunks), ahead=JOBS_AHEAD
            ):
                yield from self._adds(keys, fingerprints, outcomes)

    def _jobs(
        self, chunks: Iterator[KeyedChunk]
    ) -> Iterator[tuple[tuple[list[str], list[str]], list[Any]]]:
        """The rows to normalise, a job at a time, with their keys and fingerprints; rows with
        a bad or repeated key are recorded as issues instead."""
        duplicates, seen_duplicates = self.census.duplicates, set[str]()
        for rows, issues, keyed in chunks:
            self._issues += issues
            keys, fingerprints, values = [], [], []
            for key, raw_fp, value in keyed:
                if key in duplicates:
                    if key in seen_duplicates:
                        continue  # counted by duplicate_key_issues below
                    seen_duplicates.add(key)
                    self._issues += duplicate_key_issues(key, duplicates[key])
                keys.append(key)
                fingerprints.append(raw_fp)
                values.append(value)
            self.result.segment_rows += rows
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
            # A key met again (the segment changed after its census) keeps its first row.
            insert_new_snapshot_rows(self.connection, skipped_rows)
        result.skipped += sum(1 for issue in issues if issue.kind == "skipped")
        self.reporter.advance(sum(1 for issue in issues if issue.kind != "dropped"))
