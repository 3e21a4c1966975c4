"""Plans the changes of one run as SQL in the state database.

The segment is staged into a temporary table (key, fingerprint of the raw values, payload); the
plan is then computed by joining the stage against the sync's snapshot, so memory stays flat and
the cost of an unchanged rerun is one indexed join. When the warehouse compared the segment with
the snapshot itself (`connector.pushdown`), the stage holds only the new and changed rows and the
keys that left the segment are handed over instead:

- staged key absent from the snapshot → normalise → ``add`` (or skipped with a reason);
- raw fingerprint changed → normalise → ``update``, or ``remove`` + ``add`` when the identity
  changed on a destination that matches on hashes, or ``refresh`` (state only) when nothing the
  destination sees changed;
- snapshot member absent from the stage → ``remove`` (mirror mode only);
- ``unconfirmed`` snapshot row (a stopped run sent it without seeing the answer): in the stage
  → ``add`` again (after a ``remove`` of the identity it sent, when that changed on a
  destination that matches on hashes); absent → ``remove`` (mirror mode only);
- snapshot row the destination had rejected and that left the segment → ``forget`` (state only).

Only rows that changed are normalised in Python; the plan lands in a second temporary table that
delivery reads back in pages.
"""

from __future__ import annotations

import hashlib
import json
import json.scanner
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import sqlalchemy as sa

from connector.json_text import compact_text, loads_text
from connector.row_normaliser import (
    Normalised,
    NormalisingPool,
    Outcome,
    PayloadNormaliser,
    Ready,
    RowNormaliser,
    joined_problems,
    outcome_of,
    second_process_pays,
)
from connector.state import (
    MEMBER_STATUSES,
    RowIssue,
    StateStore,
    insert_rows,
    row_issues,
    snapshot,
    storable_text,
)

Action = Literal["add", "remove", "update", "refresh", "forget"]
SENT_ACTIONS: tuple[Action, ...] = ("remove", "update", "add")
PAGE_SIZE = 5000
PAGES_AHEAD = 4
"""Pages of candidates handed to normalising before the oldest one is planned."""
WORKER_PAGES_QUEUED = 3
"""When this many pages wait for the normalising process, the next one is normalised here:
both processes normalise, and the worker never runs dry while this one plans a page."""
_NO_FIELDS = "{}"
"""The fields of a removal (none are sent)."""
DEPARTURES_PAGE = 500
"""Departed keys looked up per query (stays under every database's bind-parameter limit)."""


Normaliser = Callable[[dict[str, Any]], Normalised]
SnapshotPage = tuple[list[str], list[str]]
"""A page of the snapshot's keys and raw fingerprints, as two columns of the same length."""


class PlannedChange(NamedTuple):
    """One planned change as read back from the plan (a tuple: cheap to build per row)."""

    seq: int
    action: str
    key: str
    raw_fp: str
    identity_fp: str
    fields_fp: str
    identifiers: dict[str, str]
    fields: dict[str, Any]
    platform_id: str | None
    identifiers_text: str
    """`identifiers` as stored in the plan: the exact text the snapshot keeps."""
    in_snapshot: bool = True
    """False when the planner saw no snapshot row for the key: an add then needs no DELETE."""


class _Candidate(NamedTuple):
    """A staged row to plan, with what the snapshot holds for its key (None when absent)."""

    seq: int
    key: str
    raw_fp: str
    payload: str
    status: str | None
    old_fp: str | None
    identity_fp: str | None
    fields_fp: str | None
    identifiers: str | None
    platform_id: str | None


def _driver_statement(connection: sa.Connection, query: sa.Select[Any]) -> tuple[str, Any]:
    """`query` as SQL text and parameters for the driver's own cursor."""
    compiled = query.compile(dialect=connection.dialect)
    parameters: Any = compiled.construct_params()
    if compiled.positional:
        parameters = tuple(parameters[name] for name in compiled.positiontup or ())
    return compiled.string, parameters


def _driver_cursor(connection: sa.Connection) -> Any:
    dbapi_connection = connection.connection.dbapi_connection
    if dbapi_connection is None:  # pragma: no cover - an open connection always has one
        raise RuntimeError("the state connection is closed")
    return dbapi_connection.cursor()


def _driver_rows(connection: sa.Connection, query: sa.Select[Any]) -> list[Any]:
    """Every row of `query` as the driver's own tuples, without SQLAlchemy's result rows (~40%
    less CPU). Only for columns the driver returns as they are (text, integers)."""
    cursor = _driver_cursor(connection)
    try:
        cursor.execute(*_driver_statement(connection, query))
        return list(cursor.fetchall())
    finally:
        cursor.close()


def _sqlite_has_json(connection: sa.Connection) -> bool:
    """Whether this SQLite has its JSON functions (built in since 3.38, an option before)."""
    try:  # a failed statement leaves SQLite's transaction (and the temporary tables) as is
        connection.exec_driver_sql("SELECT json_group_array(1)").scalar()
    except sa.exc.OperationalError:
        return False
    return True


@dataclass
class PlanSummary:
    add: int = 0
    remove: int = 0
    update: int = 0
    refresh: int = 0
    forget: int = 0

    def planned(self) -> dict[str, int]:
        return {"add": self.add, "remove": self.remove, "update": self.update}


def dropped_issue(key: str, dropped: Sequence[str]) -> RowIssue:
    """The row is sent without the identifiers normalisation left out as invalid."""
    return RowIssue(
        "dropped",
        key,
        joined_problems(dropped) + "; left out, the row goes with its other identifiers",
    )


def skipped_snapshot_row(
    sync: str, key: str, raw_fp: str, reason: str, skip_settings: str
) -> tuple[Any, ...]:
    """The snapshot row (columns in order) that keeps a row without a usable identifier, so
    later runs report it again without checking it again; identity_fp holds the settings it
    was skipped under."""
    reason = storable_text(reason[:2000]) or ""
    return (sync, key, "skipped", raw_fp, skip_settings, "", "{}", None, None, None, reason)


def duplicate_key_issues(key: str, rows: int) -> list[RowIssue]:
    """One skipped-row issue per extra row of a key the segment returns `rows` times."""
    reason = (
        f"duplicate key `{key}`: the segment returns it {rows} times; the first row was kept; "
        "make the segment return one row per key"
    )
    return [RowIssue("skipped", key, reason) for _ in range(rows - 1)]


def _temp_tables() -> tuple[sa.Table, sa.Table, sa.Table]:
    temp = sa.MetaData()
    stage = sa.Table(
        "winback_stage",
        temp,
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("key", sa.String(500), nullable=False),
        sa.Column("raw_fp", sa.String(40), nullable=False),
        sa.Column("payload", sa.Text, nullable=False),
        prefixes=["TEMPORARY"],
    )
    plan = sa.Table(
        "winback_plan",
        temp,
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("action", sa.String(16), nullable=False),
        sa.Column("key", sa.String(500), nullable=False),
        sa.Column("raw_fp", sa.String(40), nullable=False),
        sa.Column("identity_fp", sa.String(40), nullable=False),
        sa.Column("fields_fp", sa.String(40), nullable=False),
        sa.Column("identifiers", sa.Text, nullable=False),
        sa.Column("fields", sa.Text, nullable=False),
        sa.Column("platform_id", sa.String(200)),
        # 0/1 in an Integer: no bind/result processors, so the plan rows stay plain tuples.
        sa.Column("in_snapshot", sa.Integer, nullable=False),
        prefixes=["TEMPORARY"],
    )
    departed = sa.Table(
        "winback_departed",
        temp,
        sa.Column("key", sa.String(500), primary_key=True),
        prefixes=["TEMPORARY"],
    )
    return stage, plan, departed


class ChangePlanner:
    """Stages a segment and plans its changes against one sync's snapshot.

    Everything happens on one connection (temporary tables are per connection); the caller
    commits and closes it.
    """

    def __init__(
        self,
        connection: sa.Connection,
        *,
        sync: str,
        mode: str,
        matches_on_identifiers: bool,
        supports_update: bool,
        full_resync: bool = False,
        skip_settings: str = "",
    ):
        """`skip_settings` names what decides whether a row has a usable identifier besides
        its values (normalisation version, default country, the identifiers the destination
        matches on): a row skipped under other settings is checked again."""
        self.connection = connection
        self.sync = sync
        self.mode = mode
        self.matches_on_identifiers = matches_on_identifiers
        self.supports_update = supports_update
        self.full_resync = full_resync
        self.skip_settings = skip_settings
        self.skipped_again = 0
        """Rows skipped again unchanged that `build(run_id=...)` recorded itself."""
        self.stage, self.plan, self.departed = _temp_tables()
        for table in (self.stage, self.plan, self.departed):
            table.drop(connection, checkfirst=True)
            table.create(connection)
        self._stage_seq = 0
        self._plan_seq = 0
        self._plan_buffer: list[tuple[Any, ...]] = []
        self._skipped_buffer: list[tuple[str, str, str, bool]] = []
        self.summary = PlanSummary()

    # -- staging -----------------------------------------------------------------------------

    def stage_rows(self, rows: Sequence[tuple[str, dict[str, Any]]]) -> None:
        """Add (key, payload) rows of the segment to the stage; the raw fingerprint is the
        SHA-1 of the payload's compact JSON."""
        sha1, compact = hashlib.sha1, compact_text
        self._append_to_stage(
            [
                (
                    key,
                    sha1((text := compact(payload)).encode(), usedforsecurity=False).hexdigest(),
                    text,
                )
                for key, payload in rows
            ]
        )

    def stage_fingerprinted_rows(self, rows: Sequence[tuple[str, str, dict[str, Any]]]) -> None:
        """Add (key, raw fingerprint, payload) rows whose fingerprint the warehouse computed."""
        self._append_to_stage((key, raw_fp, compact_text(payload)) for key, raw_fp, payload in rows)

    def _append_to_stage(self, rows: Iterable[tuple[str, str, str]]) -> None:
        """Insert (key, raw_fp, payload text) rows, numbered on from the last staged row."""
        start = self._stage_seq
        values = [(n, *row) for n, row in enumerate(rows, start + 1)]
        if values:
            self._stage_seq = start + len(values)
            insert_rows(self.connection, self.stage, values)

    def finish_staging(self) -> list[RowIssue]:
        """The stage holds the whole segment: index it, drop duplicate keys (the first row of
        each key is kept) and find the snapshot keys that left the segment."""
        self._index_stage()
        issues = self._drop_duplicates()
        snap, stage = snapshot, self.stage
        gone = sa.select(snap.c.key).where(
            snap.c.sync == self.sync, ~sa.exists().where(stage.c.key == snap.c.key)
        )
        self.connection.execute(self.departed.insert().from_select(["key"], gone))
        return issues

    def finish_partial_staging(self, departed: Iterable[Sequence[Any]]) -> None:
        """The stage holds only the new and changed rows (the warehouse compared the others):
        index it and record the snapshot keys that left the segment, given in pages."""
        self._index_stage()
        for page in departed:
            insert_rows(self.connection, self.departed, [(row[0],) for row in page])

    def _index_stage(self) -> None:
        sa.Index("winback_stage_key", self.stage.c.key).create(self.connection)

    def _drop_duplicates(self) -> list[RowIssue]:
        counts = (
            sa.select(
                self.stage.c.key,
                sa.func.min(self.stage.c.seq).label("first_seq"),
                sa.func.count().label("n"),
            )
            .group_by(self.stage.c.key)
            .having(sa.func.count() > 1)
        )
        issues: list[RowIssue] = []
        for key, first_seq, n in self.connection.execute(counts).all():
            issues.extend(duplicate_key_issues(key, n))
            self.connection.execute(
                self.stage.delete().where(self.stage.c.key == key, self.stage.c.seq != first_seq)
            )
        return issues

    def snapshot_is_empty(self) -> bool:
        """Whether the sync has no snapshot row at all (first run, or after `sync reset`)."""
        query = sa.select(snapshot.c.key).where(snapshot.c.sync == self.sync).limit(1)
        return self.connection.execute(query).first() is None

    def snapshot_fingerprints(self, page_size: int = 100_000) -> Iterator[SnapshotPage]:
        """The sync's snapshot as pages of (keys, raw_fps), every status, for the warehouse diff."""
        if self.connection.dialect.name == "sqlite" and _sqlite_has_json(self.connection):
            return self._sqlite_snapshot_fingerprints(page_size)
        return self._cursor_snapshot_fingerprints(page_size)

    def _sqlite_snapshot_fingerprints(self, page_size: int) -> Iterator[SnapshotPage]:
        """SQLite: each page is a range of rowids, aggregated by SQLite into two texts (a JSON
        array of the keys, the fingerprints joined by commas) that Python splits in C: about a
        third of the cost of 500k result rows. A range scan reads the table in storage order;
        the primary-key index would cost one table lookup per row."""
        last = self.connection.execute(sa.text("SELECT max(rowid) FROM snapshot")).scalar()
        page = sa.text(
            "SELECT json_group_array(\"key\"), group_concat(CASE WHEN status = 'skipped' "
            "AND identity_fp != :settings THEN '' ELSE raw_fp END, ',') FROM snapshot "
            "NOT INDEXED WHERE rowid > :low AND rowid <= :high AND sync = :sync"
        )
        for low in range(0, int(last or 0), page_size):
            keys, fingerprints = self.connection.execute(
                page,
                {
                    "low": low,
                    "high": low + page_size,
                    "sync": self.sync,
                    "settings": self.skip_settings,
                },
            ).one()
            # NULL when no row of this sync is in the range; '' is a page of rows whose raw
            # fingerprint is '' (unconfirmed, or skipped under other settings)
            if fingerprints is not None:
                yield json.loads(keys), fingerprints.split(",")

    def _cursor_snapshot_fingerprints(self, page_size: int) -> Iterator[SnapshotPage]:
        """Other databases: read through the driver's own cursor (half the cost of result
        rows for 500k keys)."""
        query = sa.select(snapshot.c.key, self._comparable_fp()).where(snapshot.c.sync == self.sync)
        cursor = _driver_cursor(self.connection)
        try:
            cursor.execute(*_driver_statement(self.connection, query))
            while rows := cursor.fetchmany(page_size):
                keys, fingerprints = zip(*rows, strict=True)
                yield list(keys), list(fingerprints)
        finally:
            cursor.close()

    def _stale_skip(self) -> sa.ColumnElement[bool]:
        """A skipped snapshot row decided under other settings: it is checked again."""
        return sa.and_(snapshot.c.status == "skipped", snapshot.c.identity_fp != self.skip_settings)

    def _comparable_fp(self) -> sa.ColumnElement[Any]:
        """The snapshot's raw fingerprint, empty for stale skipped rows (never equal)."""
        return sa.case((self._stale_skip(), ""), else_=snapshot.c.raw_fp)

    # -- planning ----------------------------------------------------------------------------

    def build(self, normalise: Normaliser, *, run_id: str | None = None) -> list[RowIssue]:
        """Fill the plan table; returns the rows skipped because they cannot be sent. With
        `run_id`, the rows skipped again unchanged are recorded as that run's issues in the
        state database itself (`skipped_again` counts them: a segment of a million rows that
        cannot be sent costs no memory), else they are returned with the others."""
        issues: list[RowIssue] = []
        if self.full_resync:
            pass
        elif run_id is None:
            issues = self._unchanged_skipped_rows()
        else:
            self.skipped_again = self._record_unchanged_skipped_rows(run_id)
        issues += self._plan_candidates(normalise)
        self._flush_plan()
        self._flush_skipped()
        self._plan_departures()
        if self.matches_on_identifiers:
            self._keep_shared_identities()
        return issues

    def _keep_shared_identities(self) -> None:
        """Turn removals into `forget` when another member staying in the audience still
        needs the same identity.

        On platforms that match on hashes, two keys with the same identifiers are one audience
        member: removing the identity for one key would drop the other one too. An identity
        only this run's adds need is removed anyway: removals go first and the add puts it
        back, and should that add be refused or fail, the identity is not left behind with
        no key holding it.
        """
        plan, snap = self.plan, snapshot
        other = plan.alias("other_plan")
        removing_keys = sa.select(other.c.key).where(other.c.action == "remove")
        removing_identities = sa.select(other.c.identity_fp).where(other.c.action == "remove")
        # Set-based, computed once: the identities of this run's removals that a member staying
        # in the audience still has. (One lookup per removal would scan the snapshot each time.)
        still_needed = sa.select(snap.c.identity_fp).where(
            snap.c.sync == self.sync,
            snap.c.status == "member",
            snap.c.identity_fp.in_(removing_identities),
            snap.c.key.not_in(sa.select(self.departed.c.key)),
            snap.c.key.not_in(removing_keys),
        )
        shared = plan.update().where(
            plan.c.action == "remove", plan.c.identity_fp.in_(still_needed)
        )
        kept = self.connection.execute(shared.values(action="forget")).rowcount or 0
        self.summary.remove -= kept
        self.summary.forget += kept

    def _unchanged_skipped_rows(self) -> list[RowIssue]:
        """Rows skipped by an earlier run that are still in the segment, unchanged, under the
        same settings: skipped again with the stored reason, without being checked again.

        Read before planning writes this run's skipped rows (which are reported as planned)."""
        query = sa.select(snapshot.c.key, self._skipped_reason()).where(*self._skipped_unchanged())
        return [
            RowIssue("skipped", key, reason) for key, reason in _driver_rows(self.connection, query)
        ]

    def _record_unchanged_skipped_rows(self, run_id: str) -> int:
        """`_unchanged_skipped_rows` written as `run_id`'s row issues by one INSERT ... SELECT
        in the state database; returns how many."""
        query = sa.select(
            sa.literal(run_id),
            sa.literal(self.sync),
            sa.literal("skipped"),
            sa.null(),
            snapshot.c.key,
            self._skipped_reason(),
        ).where(*self._skipped_unchanged())
        names = ["run_id", "sync", "kind", "action", "key", "reason"]
        count = sa.select(sa.func.count()).where(row_issues.c.run_id == run_id)
        before = int(self.connection.execute(count).scalar_one())
        self.connection.execute(row_issues.insert().from_select(names, query))
        # counted, not the INSERT's rowcount: psycopg's is -1 for INSERT ... SELECT
        return int(self.connection.execute(count).scalar_one()) - before

    def _skipped_unchanged(self) -> list[sa.ColumnElement[bool]]:
        snap, stage, departed = snapshot, self.stage, self.departed
        return [
            snap.c.sync == self.sync,
            snap.c.status == "skipped",
            snap.c.identity_fp == self.skip_settings,
            ~sa.exists().where(departed.c.key == snap.c.key),
            ~sa.exists().where(stage.c.key == snap.c.key, stage.c.raw_fp != snap.c.raw_fp),
        ]

    @staticmethod
    def _skipped_reason() -> sa.ColumnElement[str]:
        return sa.func.coalesce(snapshot.c.reason, "no usable identifier")

    def _candidate_query(self, after_seq: int) -> sa.Select[Any]:
        s, snap = self.stage, snapshot
        joined = s.outerjoin(snap, sa.and_(snap.c.sync == self.sync, snap.c.key == s.c.key))
        query = sa.select(
            s.c.seq,
            s.c.key,
            s.c.raw_fp,
            s.c.payload,
            snap.c.status,
            snap.c.raw_fp.label("old_fp"),
            snap.c.identity_fp,
            snap.c.fields_fp,
            snap.c.identifiers,
            snap.c.platform_id,
        ).select_from(joined)
        if not self.full_resync:
            query = query.where(
                sa.or_(snap.c.key.is_(None), snap.c.raw_fp != s.c.raw_fp, self._stale_skip())
            )
        return query.where(s.c.seq > after_seq).order_by(s.c.seq).limit(PAGE_SIZE)

    def _candidate_pages(self) -> Iterator[list[_Candidate]]:
        """The rows to plan, in stage order, a page at a time. Reading a page ahead of
        planning the previous ones is safe: planning a row writes only rows of its own key."""
        after = 0
        while page := _driver_rows(self.connection, self._candidate_query(after)):
            after = page[-1][0]
            yield list(map(_Candidate._make, page))

    def _plan_candidates(self, normalise: Normaliser) -> list[RowIssue]:
        """Normalise and plan the candidates. Many of them (a first sync, or its plan, on a
        warehouse that does not diff; `--full-resync`) are normalised by a second process too,
        pages ahead, while this one plans: normalising is most of the work."""
        issues: list[RowIssue] = []
        pages = self._candidate_pages()
        if not isinstance(normalise, RowNormaliser):  # any other normaliser runs here
            for page in pages:
                outcomes = [outcome_of(normalise(loads_text(row.payload))) for row in page]
                issues += self._plan_page(page, outcomes)
            return issues
        jobs = PayloadNormaliser(normalise)
        planned_here = 0
        for page in pages:  # here until there are enough rows to pay for a second process
            issues += self._plan_page(page, jobs([row.payload for row in page]))
            planned_here += len(page)
            if second_process_pays(planned_here):
                break
        else:
            return issues
        with NormalisingPool(jobs, parallel=True, share_when_behind=WORKER_PAGES_QUEUED) as pool:
            payloads = ((page, [row.payload for row in page]) for page in pages)
            for page, outcomes in pool.in_order(payloads, ahead=PAGES_AHEAD):
                issues += self._plan_page(page, outcomes)
        return issues

    def _plan_page(self, page: list[_Candidate], outcomes: list[Outcome]) -> list[RowIssue]:
        issues: list[RowIssue] = []
        for row, outcome in zip(page, outcomes, strict=True):
            if isinstance(outcome, str):  # no usable identifier
                issues.append(self._plan_skipped(row, outcome))
                continue
            self._plan_candidate(row, outcome)
            if outcome.dropped:
                issues.append(dropped_issue(row.key, outcome.dropped))
        return issues

    def _plan_skipped(self, row: _Candidate, reason: str) -> RowIssue:
        if row.status in MEMBER_STATUSES:
            if self.mode == "mirror":
                self._remove_old_identity(row)
            # a member's row stays until its removal is acknowledged
        else:
            self._record_skipped(row, reason)
        return RowIssue("skipped", row.key, reason)

    def _plan_candidate(self, row: _Candidate, new: Ready) -> None:
        identity_fp, fields_fp = new.identity_fp, new.fields_fp
        values = (
            row.key,
            row.raw_fp,
            identity_fp,
            fields_fp,
            new.identifiers_text,
            new.fields_text,
        )
        if row.status == "unconfirmed":
            # A stopped run sent it without seeing the answer: add it again, after removing
            # the identity it sent if that changed on a destination that matches on it.
            if identity_fp != row.identity_fp and self.matches_on_identifiers:
                if self.mode == "mirror":
                    self._remove_old_identity(row)
                self._add_to_plan("add", *values, None)
            else:
                self._add_to_plan("add", *values, row.platform_id)
        elif row.status != "member":
            self._add_to_plan("add", *values, None, in_snapshot=row.status is not None)
        elif self.full_resync:
            self._add_to_plan("add", *values, row.platform_id)
        elif identity_fp != row.identity_fp and self.matches_on_identifiers:
            if self.mode == "mirror":
                self._remove_old_identity(row)
            self._add_to_plan("add", *values, None)
        elif identity_fp == row.identity_fp and fields_fp == row.fields_fp:
            self._add_to_plan("refresh", *values, row.platform_id)
        elif self.supports_update and self.mode in ("mirror", "upsert"):
            self._add_to_plan("update", *values, row.platform_id)
        elif identity_fp != row.identity_fp and self.mode in ("mirror", "upsert"):
            # No update call, members known by the key: adding it again (adds are idempotent
            # per key) is how the platform learns its new identifiers.
            self._add_to_plan("add", *values, row.platform_id)
        elif not self.supports_update:
            self._add_to_plan("refresh", *values, row.platform_id)

    def _remove_old_identity(self, row: _Candidate) -> None:
        """Plan the removal of what the snapshot says was sent for this key (a member, or an
        unconfirmed row, whose fingerprints are empty)."""
        old_fp, identity_fp, fields_fp = row.old_fp, row.identity_fp, row.fields_fp
        assert old_fp is not None and identity_fp and row.identifiers, "not in the snapshot"
        assert fields_fp is not None
        self._add_to_plan(
            "remove",
            row.key,
            old_fp,
            identity_fp,
            fields_fp,
            row.identifiers,
            _NO_FIELDS,
            row.platform_id,
        )

    def _add_to_plan(
        self,
        action: Action,
        key: str,
        raw_fp: str,
        identity_fp: str,
        fields_fp: str,
        identifiers_text: str,
        fields_text: str,
        platform_id: str | None,
        *,
        in_snapshot: bool = True,
    ) -> None:
        """Buffer one plan row; identifiers and fields come as their JSON text."""
        self._plan_seq += 1
        self._plan_buffer.append(
            (
                self._plan_seq,
                action,
                key,
                raw_fp,
                identity_fp,
                fields_fp,
                identifiers_text,
                fields_text,
                platform_id,
                1 if in_snapshot else 0,
            )
        )
        setattr(self.summary, action, getattr(self.summary, action) + 1)
        if len(self._plan_buffer) >= PAGE_SIZE:
            self._flush_plan()

    def _record_skipped(self, row: _Candidate, reason: str) -> None:
        self._skipped_buffer.append((row.key, row.raw_fp, reason, row.status is not None))
        if len(self._skipped_buffer) >= PAGE_SIZE:
            self._flush_skipped()

    def _flush_skipped(self) -> None:
        """Keep this run's skipped rows in the snapshot (replacing an older skipped or rejected
        row of the key): committed with the run's row issues, never by a dry run."""
        if not self._skipped_buffer:
            return
        # Keys the planner saw with a skipped or rejected row (members are never recorded here).
        replaced = [key for key, _, _, in_snapshot in self._skipped_buffer if in_snapshot]
        StateStore.delete_snapshot_keys(self.connection, self.sync, replaced)
        rows = [
            skipped_snapshot_row(self.sync, key, raw_fp, reason, self.skip_settings)
            for key, raw_fp, reason, _ in self._skipped_buffer
        ]
        insert_rows(self.connection, snapshot, rows)
        self._skipped_buffer = []

    def _flush_plan(self) -> None:
        if self._plan_buffer:
            insert_rows(self.connection, self.plan, self._plan_buffer)
            self._plan_buffer = []

    def _plan_departures(self) -> None:
        """Members and rejected rows whose key is no longer in the segment, in key order.

        Departed keys are read in pages and each page is looked up by the snapshot's primary
        key: joining the two tables lets SQLite scan the whole snapshot instead.
        """
        snap, departed = snapshot, self.departed
        columns = (
            snap.c.key,
            snap.c.status,
            snap.c.raw_fp,
            snap.c.identity_fp,
            snap.c.fields_fp,
            snap.c.identifiers,
            snap.c.platform_id,
        )
        page = sa.select(departed.c.key).order_by(departed.c.key).limit(DEPARTURES_PAGE)
        after: str | None = None
        while True:
            query = page if after is None else page.where(departed.c.key > after)
            keys = list(self.connection.execute(query).scalars())
            if not keys:
                break
            after = keys[-1]
            rows = self.connection.execute(
                sa.select(*columns)
                .where(snap.c.sync == self.sync, snap.c.key.in_(keys))
                .order_by(snap.c.key)
            ).all()
            for row in rows:
                if row.status not in MEMBER_STATUSES:
                    action: Action = "forget"
                elif self.mode == "mirror":
                    action = "remove"
                else:
                    continue
                self._add_to_plan(
                    action,
                    row.key,
                    row.raw_fp,
                    row.identity_fp,
                    row.fields_fp,
                    row.identifiers,
                    _NO_FIELDS,
                    row.platform_id,
                )
        self._flush_plan()

    # -- reading the plan --------------------------------------------------------------------

    def changes(self, action: Action, page_size: int = PAGE_SIZE) -> Iterator[PlannedChange]:
        """The planned changes of one action, in plan order, read back in pages."""
        plan, loads = self.plan, loads_text
        query = sa.select(
            plan.c.seq,
            plan.c.key,
            plan.c.raw_fp,
            plan.c.identity_fp,
            plan.c.fields_fp,
            plan.c.identifiers,
            plan.c.fields,
            plan.c.platform_id,
            plan.c.in_snapshot,
        ).where(plan.c.action == action)
        after = 0
        while True:
            page = _driver_rows(
                self.connection,
                query.where(plan.c.seq > after).order_by(plan.c.seq).limit(page_size),
            )
            if not page:
                return
            after = page[-1][0]
            for seq, key, raw_fp, identity_fp, fields_fp, ids, fields, pid, in_snap in page:
                yield PlannedChange(
                    seq,
                    action,
                    key,
                    raw_fp,
                    identity_fp,
                    fields_fp,
                    loads(ids),
                    loads(fields),
                    pid,
                    ids,
                    in_snap == 1,
                )

    def samples(self, action: Action, limit: int = 5) -> list[str]:
        rows = self.connection.execute(
            sa.select(self.plan.c.key)
            .where(self.plan.c.action == action)
            .order_by(self.plan.c.seq)
            .limit(limit)
        )
        return [row.key for row in rows]

    def drop(self) -> None:
        for table in (self.plan, self.stage, self.departed):
            table.drop(self.connection, checkfirst=True)
