"""Reads a sync's segment from the warehouse into the planner's stage.

Two ways, same plan:

- **in the warehouse** (`connector.pushdown`, DuckDB): the warehouse compares the segment with the
  snapshot's fingerprints and returns only the new and changed rows and the keys that left; an
  unchanged rerun moves no segment row into Python;
- **in the state database** (every other warehouse, or `[warehouse] pushdown = false`): every row
  is streamed in chunks, checked (null, blank or too long key), fingerprinted and staged; the
  state database then finds the changes.

Either way rows that cannot be synced because of their key are skipped with a reason.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from connector.config import Segment, mapped_options
from connector.delivery import Reporter
from connector.diff import ChangePlanner, duplicate_key_issues
from connector.pushdown import (
    KEY_WHITESPACE,
    MAX_KEY_LENGTH,
    BadKeyRow,
    TemporaryTablesRefused,
    WarehouseDiff,
)
from connector.row_normaliser import JSON_NATIVE, PayloadBuilder
from connector.segments import (
    check_columns,
    probe_columns,
    read_segment,
    segment_query,
    where_to_fix,
)
from connector.state import RowIssue
from connector.warehouse import warehouse_connection
from destinations.base import json_value

log = logging.getLogger("winback.staging")

Payload = dict[str, dict[str, Any]]


@dataclass(frozen=True)
class SegmentSource:
    """What to read: the segment, the sync's column mapping and the reading options."""

    sync: str
    segment_name: str
    segment: Segment
    identifiers: dict[str, str]
    """Identifier name → segment column."""
    fields: dict[str, str]
    """Field name → segment column."""
    as_of: dt.date
    chunk_size: int

    def mapping(self) -> list[tuple[str, str, str]]:
        """(kind, name, column) in payload order: identifiers then fields, by name."""
        return [("i", n, c) for n, c in sorted(self.identifiers.items())] + [
            ("f", n, c) for n, c in sorted(self.fields.items())
        ]

    def mapped_options(self) -> dict[str, str]:
        """Option path under the sync (``identifiers.email``) → segment column (for errors)."""
        return mapped_options(self.identifiers, self.fields)

    def mapped_columns(self) -> list[str]:
        """The segment columns the mapping reads, each once, in payload order."""
        return list(dict.fromkeys(column for _, _, column in self.mapping()))


@dataclass
class StagedSegment:
    rows: int
    issues: list[RowIssue]
    compared_in: str
    """Where the segment was compared with the snapshot (shown by `sync run -v`)."""


IN_WAREHOUSE = "in the warehouse"
IN_STATE_DATABASE = "in the state database"


def null_key_issue(source: SegmentSource) -> RowIssue:
    return RowIssue(
        "skipped",
        None,
        f"null key: a row of segment `{source.segment_name}` has no `{source.segment.key}` "
        "(NULL, empty or only spaces); fix the segment so every row has a key",
    )


def long_key_issue(source: SegmentSource, key: str, length: int) -> RowIssue:
    return RowIssue(
        "skipped",
        key[:MAX_KEY_LENGTH],
        f"key of {length} characters is longer than {MAX_KEY_LENGTH}; use a shorter "
        f"identifier as `{source.segment.key}`",
    )


def nul_key_issue(source: SegmentSource, key: str) -> RowIssue:
    return RowIssue(
        "skipped",
        key[:MAX_KEY_LENGTH],
        f"key holds a NUL character (shown as \\x00), which the state store cannot keep; "
        f"remove it from `{source.segment.key}` in the segment",
    )


def segment_key(source: SegmentSource, value: Any) -> str | RowIssue:
    """A key as the warehouse driver returned it, as the text the state store keeps (JSON's
    text for what JSON lacks: dates, decimals...), or why the row cannot be synced."""
    if value is None:
        return null_key_issue(source)
    key = str(value if type(value) in JSON_NATIVE else json_value(value))
    return warehouse_key_issue(source, key) or key


def warehouse_key_issue(source: SegmentSource, key: str | None) -> RowIssue | None:
    """Why a key as text cannot be synced (null, blank, too long, a NUL character). Blank is
    ASCII whitespace only, as the warehouse's own key test (`valid_key_sql`) counts it, so
    every path keeps or skips the same keys."""
    if key is None or not key.strip(KEY_WHITESPACE):
        return null_key_issue(source)
    if len(key) > MAX_KEY_LENGTH:
        return long_key_issue(source, key, len(key))
    if "\x00" in key:
        return nul_key_issue(source, key)
    return None


def payload_builder(columns: Sequence[str], source: SegmentSource) -> PayloadBuilder:
    """Builds the staged payload ({"i": identifiers, "f": fields}) of a warehouse row."""
    return PayloadBuilder.for_columns(columns, source.identifiers, source.fields)


def checked_query(source: SegmentSource, engine: sa.Engine) -> tuple[sa.Executable, list[str]]:
    """The segment's query and its columns, checked against the warehouse: it runs and returns
    the key and the mapped columns (WarehouseError naming what is wrong otherwise)."""
    name, segment = source.segment_name, source.segment
    query = segment_query(name, segment, as_of=source.as_of, engine=engine)
    columns = probe_columns(name, segment, engine=engine, as_of=source.as_of, query=query)
    check_columns(name, segment, columns, sync=source.sync, mapping=source.mapped_options())
    return query, columns


PayloadChunk = tuple[int, list[RowIssue], list[tuple[str, Payload]]]
"""A chunk of the segment as read: its number of rows, the issues of its rows with a bad key,
and (key, payload) of the others."""


@contextlib.contextmanager
def read_payloads(source: SegmentSource, engine: sa.Engine) -> Iterator[Iterator[PayloadChunk]]:
    """Stream the segment from the warehouse as keys (the state store's texts) and payloads,
    a chunk at a time, in segment order."""
    with read_segment(
        source.segment_name,
        source.segment,
        engine=engine,
        as_of=source.as_of,
        chunk_size=source.chunk_size,
        sync=source.sync,
        mapping=source.mapped_options(),
    ) as (columns, chunks):
        yield _payload_chunks(source, columns, chunks)


def _payload_chunks(
    source: SegmentSource, columns: Sequence[str], chunks: Iterator[Sequence[Any]]
) -> Iterator[PayloadChunk]:
    key_at = list(columns).index(source.segment.key)
    payload = payload_builder(columns, source)
    for chunk in chunks:
        issues: list[RowIssue] = []
        keyed: list[tuple[str, Payload]] = []
        for row in chunk:
            key = segment_key(source, row[key_at])
            if isinstance(key, str):
                keyed.append((key, payload(row)))
            else:
                issues.append(key)
        yield len(chunk), issues, keyed


KeyedChunk = tuple[int, list[RowIssue], list[tuple[str, str, Any]]]
"""A chunk of the segment: its number of rows, the issues of its rows with a bad key, and
(key, raw fingerprint, a value made of the row) for the others."""


def keyed_chunks(
    source: SegmentSource, diff: WarehouseDiff, value: Callable[[Sequence[Any]], Any]
) -> Iterator[KeyedChunk]:
    """Every row of the segment with the warehouse's key text and fingerprint
    (`WarehouseDiff.every_row`: mapped columns, then key, then fingerprint), a chunk at a
    time; rows whose key cannot be synced become issues, the others (key, fingerprint,
    `value(row)`)."""
    for chunk in diff.every_row(chunk_size=source.chunk_size):
        issues: list[RowIssue] = []
        keyed: list[tuple[str, str, Any]] = []
        for row in chunk:
            key = row[-2]
            issue = warehouse_key_issue(source, key)
            if issue is None:
                keyed.append((key, row[-1], value(row)))
            else:
                issues.append(issue)
        yield len(chunk), issues, keyed


@contextlib.contextmanager
def warehouse_diff(source: SegmentSource, engine: sa.Engine) -> Iterator[WarehouseDiff]:
    """The segment's query, checked against the warehouse (it runs and returns the mapped
    columns), ready to compare or stream on a connection of its own."""
    query, columns = checked_query(source, engine)
    with warehouse_connection(engine) as connection:
        yield WarehouseDiff(
            connection,
            query,
            segment_columns=columns,
            key=source.segment.key,
            mapping=source.mapping(),
            where_to_fix=where_to_fix(source.segment_name, source.segment),
        )


class SegmentStager:
    """Stages one sync's segment into its planner."""

    def __init__(
        self,
        source: SegmentSource,
        *,
        engine: sa.Engine,
        planner: ChangePlanner,
        reporter: Reporter,
    ):
        self.source = source
        self.engine = engine
        self.planner = planner
        self.reporter = reporter

    def stage(self, *, in_warehouse: bool) -> StagedSegment:
        self.reporter.phase(f"{self.source.sync}: reading segment", None)
        if in_warehouse:
            return self._stage_changes_found_by_warehouse()
        return self._stage_every_row()

    # -- diff in the state database ----------------------------------------------------------

    def _stage_every_row(self) -> StagedSegment:
        source, planner = self.source, self.planner
        issues: list[RowIssue] = []
        rows = 0
        with read_payloads(source, self.engine) as chunks:
            for read, bad_keys, staged in chunks:
                issues += bad_keys
                planner.stage_rows(staged)
                rows += read
                self.reporter.advance(read)
        issues += planner.finish_staging()
        return StagedSegment(rows, issues, IN_STATE_DATABASE)

    # -- diff in the warehouse ---------------------------------------------------------------

    def _stage_changes_found_by_warehouse(self) -> StagedSegment:
        """The diff inside the warehouse; in the state database when the warehouse refuses
        the temporary tables it needs (checked before any row is read)."""
        try:
            return self._compare_in_warehouse()
        except TemporaryTablesRefused as refused:
            log.warning(
                "%s: %s; comparing in the state database instead (set [warehouse] pushdown = "
                "false to skip this attempt, or allow the warehouse user temporary tables)",
                self.source.sync,
                refused,
            )
            return self._stage_every_row()

    def _compare_in_warehouse(self) -> StagedSegment:
        source, planner = self.source, self.planner
        with warehouse_diff(source, self.engine) as diff:
            if planner.full_resync or planner.snapshot_is_empty():
                return self._stage_every_fingerprinted_row(diff)
            try:
                diff.load(planner.snapshot_fingerprints(), full_resync=planner.full_resync)
                rows = diff.total_rows()
                self.reporter.advance(rows)
                issues = [self._bad_key_issue(bad) for bad in diff.bad_keys()]
                for key, count in diff.duplicates():
                    issues += duplicate_key_issues(key, count)
                payload = payload_builder(diff.columns, source)  # then key, fingerprint
                for chunk in diff.changed_rows(chunk_size=source.chunk_size):
                    planner.stage_fingerprinted_rows(
                        [(row[-2], row[-1], payload(row)) for row in chunk]
                    )
                planner.finish_partial_staging(diff.departed_keys(chunk_size=source.chunk_size))
            finally:
                diff.drop()
        return StagedSegment(rows, issues, IN_WAREHOUSE)

    def _stage_every_fingerprinted_row(self, diff: WarehouseDiff) -> StagedSegment:
        """Nothing to compare with (no snapshot yet, `--full-resync`): every row is streamed
        with the warehouse's key text and fingerprint and staged, and the state database finds
        duplicates and departures, so the warehouse holds no copy of the segment. The keys and
        fingerprints are the ones later runs compare in the warehouse."""
        source, planner = self.source, self.planner
        issues: list[RowIssue] = []
        rows = 0
        payload = payload_builder(diff.columns, source)  # then key, fingerprint
        for read, bad_keys, staged in keyed_chunks(source, diff, payload):
            issues += bad_keys
            planner.stage_fingerprinted_rows(staged)
            rows += read
            self.reporter.advance(read)
        issues += planner.finish_staging()
        return StagedSegment(rows, issues, IN_STATE_DATABASE)

    def _bad_key_issue(self, bad: BadKeyRow) -> RowIssue:
        if bad.key is None or not bad.key.strip():
            return null_key_issue(self.source)
        if bad.length <= MAX_KEY_LENGTH and "\x00" in bad.key:
            return nul_key_issue(self.source, bad.key)
        return long_key_issue(self.source, bad.key, bad.length)
