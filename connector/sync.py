"""Runs one sync: lock → read segment → plan → guard → deliver with checkpoints → record.

The engine owns the loop; adapters only talk to their platform. After every acknowledged batch
the snapshot is updated in its own transaction, so a crash or `kill -9` at any point loses
nothing: the next run re-sends exactly what was not acknowledged.
"""

from __future__ import annotations

import datetime as dt
import gc
import logging
import time
import uuid
from dataclasses import dataclass

import sqlalchemy as sa

from connector.config import WinbackConfig
from connector.delivery import Delivery, Reporter, SilentReporter
from connector.diff import ChangePlanner
from connector.errors import (
    ConfigError,
    ConfigProblem,
    GuardError,
    LockedError,
    Terminated,
    WinbackError,
)
from connector.first_sync import StreamedFirstSync, StreamedSegment, streamable_segment
from connector.identity import NORMALISATION_VERSION
from connector.interrupts import interrupts_held
from connector.json_text import fingerprinted_text
from connector.pushdown import KeyCensus, supports_pushdown
from connector.report import counted
from connector.row_normaliser import RowNormaliser
from connector.run_result import EXIT_CODES, RunResult, combined_exit_code
from connector.segments import effective_as_of
from connector.staging import SegmentSource, SegmentStager
from connector.state import (
    StateStore,
    is_database_error,
    raised_through,
    state_failure,
    utcnow,
)
from connector.timing import PhaseClock
from connector.warehouse import create_warehouse_engine, first_line
from destinations.base import Destination, SyncContext, redact_text

__all__ = [
    "EXIT_CODES",
    "RunOptions",
    "RunResult",
    "SyncRunner",
    "combined_exit_code",
]

log = logging.getLogger("winback.sync")

MATCHING_IDENTIFIERS = frozenset({"email", "phone", "external_id", "mobile_id"})
GUARD_MIN_AUDIENCE = 100


def _matching_identifiers(adapter: Destination) -> frozenset[str]:
    """The identifiers a row needs one of to be sent to this destination."""
    if adapter.required_identifiers:
        return frozenset(adapter.required_identifiers)
    return frozenset(MATCHING_IDENTIFIERS & adapter.accepted_identifiers)


def new_run_id() -> str:
    return f"{utcnow():%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"


@dataclass(frozen=True)
class RunOptions:
    dry_run: bool = False
    force: bool = False
    full_resync: bool = False
    as_of: dt.date | None = None


def percent_over(share: float, limit: float) -> str:
    """`share` (a percentage over `limit`) with as many decimals as it takes to show it is
    over: 50.01, not 50.0, for 7508 of 15014 against 50."""
    digits = next((d for d in range(1, 7) if round(share, d) > limit), 6)
    return f"{share:.{digits}f}"


class SyncRunner:
    """Runs the syncs of one config against one state store."""

    def __init__(
        self, config: WinbackConfig, *, reporter: Reporter | None = None, dry_run: bool = False
    ):
        """`dry_run`: only dry runs will be made, so a state store that does not exist yet is
        not created (`StateStore.for_reading`)."""
        self.config = config
        self.reporter = reporter or SilentReporter()
        self.dry_run = dry_run
        self.last_result: RunResult | None = None
        """The run started last (recorded even when it was stopped by Ctrl-C or SIGTERM)."""
        self._store: StateStore | None = None
        self._warehouse: sa.Engine | None = None

    @property
    def store(self) -> StateStore:
        if self._store is None:
            url = self.config.state.url
            self._store = StateStore.for_reading(url) if self.dry_run else StateStore(url)
        return self._store

    @property
    def warehouse(self) -> sa.Engine:
        if self._warehouse is None:
            self._warehouse = create_warehouse_engine(self.config.warehouse.url)
        return self._warehouse

    def close(self) -> None:
        if self._store is not None:
            self._store.dispose()
        if self._warehouse is not None:
            self._warehouse.dispose()

    def build_adapter(self, sync_name: str, run_id: str) -> Destination:
        sync = self.config.syncs[sync_name]
        destination = self.config.destinations[sync.destination]
        context = SyncContext(
            sync=sync_name,
            run_id=run_id,
            audience=sync.audience,
            options=self.config.sync_options[sync_name],
            retry=self.config.retry,
            identifier_names=tuple(sync.identifiers),
            field_names=tuple(sync.fields),
            destination_name=sync.destination,
        )
        return destination.adapter(destination.options, context)

    def run(self, sync_name: str, options: RunOptions) -> RunResult:
        """Run one sync; never raises for problems that belong in the run record."""
        result = self.last_result = RunResult(sync=sync_name, run_id=new_run_id())
        started = time.monotonic()
        locked = False
        interrupted: type[KeyboardInterrupt] | None = None
        try:
            if not options.dry_run:
                with interrupts_held():  # no lock without its run
                    self.store.acquire_lock(sync_name, result.run_id)
                    locked = True
                    self.store.start_run(sync_name, result.run_id)
                with self.store.lock_kept_alive(sync_name, result.run_id):
                    self._run_locked(sync_name, options, result)
            else:
                self._run_locked(sync_name, options, result)
        except LockedError as error:
            result.status, result.error = "locked", str(error)
        except GuardError as error:
            result.status, result.error = "aborted", redact_text(str(error))
        except ConfigError as error:  # found at run time (a column, a changed target...)
            located = ConfigError(error.problems, source=error.source or str(self.config.path))
            result.status, result.error = "failed", redact_text(str(located))
            result.config_error = True
        except WinbackError as error:  # warehouse, state, destination
            result.status, result.error = "failed", redact_text(str(error))
        except KeyboardInterrupt as interrupt:
            # Raised again below, once the run is recorded: the frames it interrupted (and any
            # state-store statement they left half done, whose transaction keeps the database
            # locked) must be gone first, or recording the run would wait for that lock.
            result.status = "failed"
            result.error = (
                "stopped by SIGTERM"
                if isinstance(interrupt, Terminated)
                else "interrupted by the user"
            )
            interrupted = type(interrupt)
        except Exception as error:  # a bug, or a state-store statement that failed: the other
            # syncs of a scheduled run go on (statement parameters are hidden from the log)
            log.debug("unexpected error in sync %s", sync_name, exc_info=True)
            result.status = "failed"
            result.error = redact_text(self._database_problem(error))
        finally:
            result.duration_s = round(time.monotonic() - started, 3)
            if interrupted is not None:
                gc.collect()  # frames in reference cycles too
            if locked:
                with interrupts_held():  # a run left `running` would look like it still is
                    try:
                        self._finish(sync_name, result)
                    except sa.exc.DBAPIError as error:
                        raise state_failure(self.store.url, error) from None
        if interrupted is not None:
            raise interrupted
        return result

    def _database_problem(self, error: Exception) -> str:
        """What a run stopped by an error no layer above turned into a WinbackError says: the
        state store's failure in its words (`state_failure`) when it comes from there, else the
        error's first line (SQLAlchemy's text goes on with the statement and its parameters)."""
        store = self._store
        if (
            store is not None
            and is_database_error(error, store.engine)
            and raised_through(error, store.engine)
        ):
            return str(state_failure(store.url, error))
        shown = first_line(error) if isinstance(error, sa.exc.SQLAlchemyError) else str(error)
        return f"unexpected {type(error).__name__}: {shown} (rerun with -vv for details)"

    def _finish(self, sync_name: str, result: RunResult) -> None:
        try:
            self.store.finish_run(
                result.run_id,
                status=result.status,
                counts=result.counts(),
                duration_s=result.duration_s,
                error=result.error,
            )
            self.store.prune_history(
                sync_name,
                keep_runs=self.config.state.keep_runs,
                keep_issue_runs=self.config.state.keep_issue_runs,
            )
        finally:
            self.store.release_lock(sync_name, result.run_id)

    # -- the run -----------------------------------------------------------------------------

    def _run_locked(self, sync_name: str, options: RunOptions, result: RunResult) -> None:
        sync = self.config.syncs[sync_name]
        adapter = self.build_adapter(sync_name, result.run_id)
        connection = self.store.connect()
        clock = PhaseClock(sync_name)
        try:
            planner = ChangePlanner(
                connection,
                sync=sync_name,
                mode=sync.mode,
                matches_on_identifiers=adapter.matches_on_identifiers,
                supports_update=adapter.supports_update,
                full_resync=options.full_resync,
                skip_settings=self._skip_settings(sync_name, adapter),
            )
            self._check_target(connection, sync_name, adapter, record=not options.dry_run)
            self._settle_unconfirmed(connection, sync_name, dry_run=options.dry_run)
            source = self._segment_source(sync_name, options)
            in_warehouse = self.config.warehouse.pushdown and supports_pushdown(self.warehouse)
            batch_size = sync.batch_size or adapter.batch_size
            streamable = None
            if not options.full_resync and planner.snapshot_is_empty():  # nothing to compare
                streamable = streamable_segment(source, self.warehouse, in_warehouse=in_warehouse)
            if streamable is not None:  # send the segment straight to the destination
                segment, census = streamable
                self._stream_first_sync(
                    segment,
                    census,
                    connection,
                    planner,
                    adapter,
                    result,
                    batch_size=batch_size,
                    dry_run=options.dry_run,
                )
                clock.done("streamed the segment (first sync)", f"{result.segment_rows:,} rows")
                return
            staged = SegmentStager(
                source, engine=self.warehouse, planner=planner, reporter=self.reporter
            ).stage(in_warehouse=in_warehouse)
            result.segment_rows, issues = staged.rows, staged.issues
            clock.done(
                f"read and compared the segment {staged.compared_in}",
                f"{result.segment_rows:,} rows",
            )
            # Planning writes the skipped rows (rolled back by a dry run), then the run records
            # its row issues, in one transaction that writes from its start (see start_writing).
            StateStore.start_writing(connection)
            issues += planner.build(self._normaliser(sync_name, adapter), run_id=result.run_id)
            result.skipped = planner.skipped_again + sum(
                1 for issue in issues if issue.kind == "skipped"
            )
            result.planned = planner.summary.planned()
            clock.done("planned", ", ".join(f"{n:,} to {a}" for a, n in result.planned.items()))
            audience_size = self.store.audience_size(connection, sync_name)
            result.audience_size = audience_size
            if options.dry_run:
                result.samples = {a: planner.samples(a) for a in ("add", "remove", "update")}
                result.status = "dry_run"
                if not options.force:  # say so now, not when the scheduled run stops
                    try:
                        self._guard(sync_name, result, audience_size, max_pct=sync.max_removal_pct)
                    except GuardError as guard:
                        result.error = f"a real run would be aborted: {guard.reason}"
                return
            StateStore.record_issues(
                connection, run_id=result.run_id, sync=sync_name, issues=issues
            )
            StateStore.record_progress(connection, result.run_id, result.counts())
            connection.commit()
            clock.done("recorded row issues", f"{len(issues) + planner.skipped_again:,}")
            if not options.force:
                self._guard(sync_name, result, audience_size, max_pct=sync.max_removal_pct)
            delivery = Delivery(self.store, connection, planner, adapter, result, self.reporter)
            delivery.run(batch_size=batch_size)
            result.status = "partial" if result.rejected else "success"
            clock.done("delivered", f"{result.batches:,} batches")
        finally:
            result.retries = adapter.retries
            adapter.close()
            connection.rollback()
            connection.close()

    def _stream_first_sync(
        self,
        segment: StreamedSegment,
        census: KeyCensus,
        connection: sa.Connection,
        planner: ChangePlanner,
        adapter: Destination,
        result: RunResult,
        *,
        batch_size: int,
        dry_run: bool,
    ) -> None:
        """Normalise and send every row as it is read (`connector.first_sync`); a dry run
        counts what would be sent."""
        result.audience_size = 0
        streamed = StreamedFirstSync(
            segment,
            census,
            connection=connection,
            result=result,
            reporter=self.reporter,
            normalise=self._normaliser(segment.source.sync, adapter),
            skip_settings=planner.skip_settings,
        )
        if dry_run:
            result.samples = {"add": streamed.plan(), "remove": [], "update": []}
            result.status = "dry_run"
            return
        delivery = Delivery(self.store, connection, planner, adapter, result, self.reporter)
        streamed.send(delivery, batch_size=batch_size)
        result.status = "partial" if result.rejected else "success"

    def _settle_unconfirmed(
        self, connection: sa.Connection, sync_name: str, *, dry_run: bool
    ) -> None:
        """What an earlier run sent without seeing the answer becomes unconfirmed snapshot
        rows; a dry run writes nothing and only says they are not in its counts."""
        if dry_run:
            pending = StateStore.unconfirmed_in_flight(connection, sync_name)
            if pending and self.store.lock_holder(sync_name, live_only=True) is not None:
                log.warning(
                    "%s: a run of this sync is in progress; this plan does not count its %s "
                    "in flight",
                    sync_name,
                    counted(pending, "row"),
                )
            elif pending:
                log.warning(
                    "%s: %s sent by an earlier run that stopped before the destination "
                    "answered are not counted here; the real run adds them again if still "
                    "in the segment, removes them if not",
                    sync_name,
                    counted(pending, "row"),
                )
            return
        StateStore.start_writing(connection)
        settled = StateStore.settle_unconfirmed(connection, sync_name)
        connection.commit()
        if settled:
            log.info(
                "%s: %s sent by an earlier run that stopped before the destination answered: "
                "added again if still in the segment, removed if not",
                sync_name,
                counted(settled, "row"),
            )

    def _check_target(
        self, connection: sa.Connection, sync_name: str, adapter: Destination, *, record: bool
    ) -> None:
        """Refuse to go on when the sync now sends to another destination type or audience
        than the one its snapshot describes: only changes would reach the new one. `record`
        (not in a dry run): keep the target of a sync that has sent nothing yet."""
        audience = self.config.syncs[sync_name].audience
        target = f"{adapter.name} audience {audience!r}" if audience else adapter.name
        if record:
            StateStore.start_writing(connection)
        recorded = self.store.check_target(connection, sync_name, target, record=record)
        if recorded is not None:
            raise ConfigError(
                [
                    ConfigProblem(
                        f"syncs.{sync_name}",
                        f"it sent its members to {recorded}, and now points to {target}; "
                        "winback would send the new target only the changes, not the members "
                        f"it already has. To start over with a full sync there, run `winback "
                        f"sync reset {sync_name} --yes` (the old target keeps its members); "
                        "otherwise put back the old destination or audience",
                    )
                ],
            )
        if record:
            connection.commit()

    def _segment_source(self, sync_name: str, options: RunOptions) -> SegmentSource:
        sync = self.config.syncs[sync_name]
        segment = self.config.segments[sync.segment]
        return SegmentSource(
            sync=sync_name,
            segment_name=sync.segment,
            segment=segment,
            identifiers=dict(sync.identifiers),
            fields=dict(sync.fields),
            as_of=effective_as_of(segment, options.as_of),
            chunk_size=self.config.warehouse.chunk_size,
        )

    def _normaliser(self, sync_name: str, adapter: Destination) -> RowNormaliser:
        return RowNormaliser(
            default_country=self.config.syncs[sync_name].default_country,
            accepted=frozenset(adapter.accepted_identifiers),
            matching=_matching_identifiers(adapter),
        )

    def _skip_settings(self, sync_name: str, adapter: Destination) -> str:
        """Fingerprint of what, besides a row's values, decides that it has no usable
        identifier: rows skipped under other settings are checked again."""
        sync = self.config.syncs[sync_name]
        settings = [
            NORMALISATION_VERSION,
            sync.default_country or "",
            sorted(adapter.accepted_identifiers),
            sorted(_matching_identifiers(adapter)),
        ]
        return fingerprinted_text(settings)[1]

    def _guard(self, sync_name: str, result: RunResult, audience: int, *, max_pct: float) -> None:
        remaining = result.segment_rows - result.skipped
        if remaining == 0 and audience > 0 and result.planned["remove"] > 0:
            segment = (
                "the segment is empty"
                if result.segment_rows == 0
                else f"none of the segment's {result.segment_rows} rows can be sent (all "
                "skipped: see `winback sync issues`)"
            )
            raise GuardError(
                sync_name, f"{segment} but the audience has {audience} members winback added"
            )
        removals = result.planned["remove"]
        if audience >= GUARD_MIN_AUDIENCE and removals * 100 > max_pct * audience:
            shown = percent_over(removals * 100 / audience, max_pct)
            raise GuardError(
                sync_name,
                f"{removals} of {audience} members ({shown}%) would be removed, more than "
                f"max_removal_pct = {max_pct:g}",
            )
