"""Runs one sync: lock → read segment → plan → guard → deliver with checkpoints → record.

The engine owns the loop; adapters only talk to their platform. After every acknowledged batch
the snapshot is updated in its own transaction, so a crash or `kill -9` at any point loses
nothing: the next run re-sends exactly what was not acknowledged.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Protocol

import sqlalchemy as sa

from connector.config import WinbackConfig
from connector.diff import (
    SENT_ACTIONS,
    STATE_ONLY_ACTIONS,
    Action,
    ChangePlanner,
    Normalised,
    PlannedChange,
)
from connector.errors import (
    BatchFailedError,
    ConfigError,
    DestinationError,
    GuardError,
    LockedError,
    PayloadTooLargeError,
    StateError,
    WarehouseError,
    WinbackError,
)
from connector.identity import normalise_identifiers
from connector.segments import effective_as_of, read_segment
from connector.state import RowIssue, StateStore, insert_rows, snapshot, utcnow
from connector.warehouse import create_warehouse_engine
from destinations.base import Batch, BatchResult, Destination, Member, Rejection, SyncContext

log = logging.getLogger("winback.sync")

MATCHING_IDENTIFIERS = frozenset({"email", "phone", "external_id", "mobile_id"})
GUARD_MIN_AUDIENCE = 100
MAX_KEY_LENGTH = 500
"""Longest key the state store holds (snapshot.key is VARCHAR(500))."""
MAX_CONSECUTIVE_BATCH_FAILURES = 3
EXIT_CODES = {
    "success": 0,
    "dry_run": 0,
    "partial": 3,
    "locked": 5,
    "aborted": 4,
    "failed": 1,
}


class Reporter(Protocol):
    """Progress sink (a rich progress bar in the CLI, nothing in tests)."""

    def phase(self, description: str, total: int | None) -> None: ...

    def advance(self, amount: int) -> None: ...


class SilentReporter:
    def phase(self, description: str, total: int | None) -> None:
        pass

    def advance(self, amount: int) -> None:
        pass


@dataclass
class RunResult:
    """The record of one run, as printed by `sync run --output json`."""

    sync: str
    run_id: str
    status: str = "running"
    segment_rows: int = 0
    skipped: int = 0
    planned: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(("add", "remove", "update"), 0)
    )
    sent: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(("add", "remove", "update"), 0)
    )
    rejected: int = 0
    batches: int = 0
    retries: int = 0
    duration_s: float = 0.0
    error: str | None = None
    samples: dict[str, list[str]] = field(default_factory=dict)
    audience_size: int | None = None

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.status, 1)

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "sync": self.sync,
            "run_id": self.run_id,
            "status": self.status,
            "segment_rows": self.segment_rows,
            "skipped": self.skipped,
            "planned": dict(self.planned),
            "sent": dict(self.sent),
            "rejected": self.rejected,
            "batches": self.batches,
            "retries": self.retries,
            "duration_s": self.duration_s,
            "error": self.error,
        }
        if self.status == "dry_run":
            data["samples"] = self.samples
        return data

    def counts(self) -> dict[str, int]:
        return {
            "segment_rows": self.segment_rows,
            "skipped": self.skipped,
            "planned_add": self.planned["add"],
            "planned_remove": self.planned["remove"],
            "planned_update": self.planned["update"],
            "sent_add": self.sent["add"],
            "sent_remove": self.sent["remove"],
            "sent_update": self.sent["update"],
            "rejected": self.rejected,
            "batches": self.batches,
            "retries": self.retries,
        }


def combined_exit_code(results: Sequence[RunResult]) -> int:
    """1 if any failed, else 4, else 5, else 3, else 0."""
    codes = {result.exit_code for result in results}
    for code in (1, 4, 5, 3):
        if code in codes:
            return code
    return 0


def new_run_id() -> str:
    return f"{utcnow():%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"


_JSON_NATIVE = frozenset({str, int, float, bool, type(None)})
"""Types `jsonable` returns unchanged; checked inline in the per-row staging loop."""


def jsonable(value: Any) -> Any:
    """Warehouse values as JSON: dates ISO, decimals as int or float."""
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, bytes):
        return value.hex()
    return value


@dataclass(frozen=True)
class RunOptions:
    dry_run: bool = False
    force: bool = False
    full_resync: bool = False
    as_of: dt.date | None = None


class SyncRunner:
    """Runs the syncs of one config against one state store."""

    def __init__(self, config: WinbackConfig, *, reporter: Reporter | None = None):
        self.config = config
        self.reporter = reporter or SilentReporter()
        self._store: StateStore | None = None
        self._warehouse: sa.Engine | None = None

    @property
    def store(self) -> StateStore:
        if self._store is None:
            self._store = StateStore(self.config.state.url)
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
        )
        return destination.adapter(destination.options, context)

    def run(self, sync_name: str, options: RunOptions) -> RunResult:
        """Run one sync; never raises for problems that belong in the run record."""
        result = RunResult(sync=sync_name, run_id=new_run_id())
        started = time.monotonic()
        locked = False
        try:
            if not options.dry_run:
                self.store.acquire_lock(sync_name, result.run_id)
                locked = True
                self.store.start_run(sync_name, result.run_id)
            self._run_locked(sync_name, options, result)
        except LockedError as error:
            result.status, result.error = "locked", str(error)
        except GuardError as error:
            result.status, result.error = "aborted", str(error)
        except (WarehouseError, DestinationError, StateError, ConfigError) as error:
            result.status, result.error = "failed", str(error)
        except WinbackError as error:
            result.status, result.error = "failed", str(error)
        except KeyboardInterrupt:
            result.status, result.error = "failed", "interrupted by the user"
            raise
        except Exception as error:  # a bug must not stop the other syncs of a scheduled run
            log.debug("unexpected error in sync %s", sync_name, exc_info=True)
            result.status = "failed"
            result.error = (
                f"unexpected {type(error).__name__}: {error} (rerun with -vv for details)"
            )
        finally:
            result.duration_s = round(time.monotonic() - started, 3)
            if locked:
                self._finish(sync_name, result)
        return result

    def _finish(self, sync_name: str, result: RunResult) -> None:
        try:
            self.store.finish_run(
                result.run_id,
                status=result.status,
                counts=result.counts(),
                duration_s=result.duration_s,
                error=result.error,
            )
            self.store.prune_history(sync_name, self.config.state.keep_runs)
        finally:
            self.store.release_lock(sync_name, result.run_id)

    # -- the run -----------------------------------------------------------------------------

    def _run_locked(self, sync_name: str, options: RunOptions, result: RunResult) -> None:
        sync = self.config.syncs[sync_name]
        adapter = self.build_adapter(sync_name, result.run_id)
        connection = self.store.connect()
        try:
            planner = ChangePlanner(
                connection,
                sync=sync_name,
                mode=sync.mode,
                hashes_identifiers=adapter.hashes_identifiers,
                supports_update=adapter.supports_update,
                full_resync=options.full_resync,
            )
            issues = self._stage_segment(sync_name, options, planner, result)
            issues += planner.build(self._normaliser(sync_name, adapter))
            result.skipped = sum(1 for issue in issues if issue.kind == "skipped")
            result.planned = planner.summary.planned()
            audience_size = self.store.audience_size(connection, sync_name)
            result.audience_size = audience_size
            if options.dry_run:
                result.samples = {a: planner.samples(a) for a in ("add", "remove", "update")}
                result.status = "dry_run"
                return
            StateStore.record_issues(
                connection, run_id=result.run_id, sync=sync_name, issues=issues
            )
            connection.commit()
            if not options.force:
                self._guard(sync_name, result, audience_size, max_pct=sync.max_removal_pct)
            delivery = Delivery(self.store, connection, planner, adapter, result, self.reporter)
            delivery.run(batch_size=sync.batch_size or adapter.batch_size)
            result.status = "partial" if result.rejected else "success"
        finally:
            result.retries = adapter.retries
            adapter.close()
            connection.rollback()
            connection.close()

    def _stage_segment(
        self, sync_name: str, options: RunOptions, planner: ChangePlanner, result: RunResult
    ) -> list[RowIssue]:
        sync = self.config.syncs[sync_name]
        segment = self.config.segments[sync.segment]
        identifier_columns = dict(sync.identifiers)
        field_columns = dict(sync.fields)
        needed = sorted({*identifier_columns.values(), *field_columns.values()})
        as_of = effective_as_of(segment, options.as_of)
        issues: list[RowIssue] = []
        self.reporter.phase(f"{sync_name}: reading segment", None)
        with read_segment(
            sync.segment,
            segment,
            engine=self.warehouse,
            as_of=as_of,
            chunk_size=self.config.warehouse.chunk_size,
            required_columns=needed,
        ) as (columns, chunks):
            position = {name: index for index, name in enumerate(columns)}
            key_index = position[segment.key]
            identifier_at = [(n, position[c]) for n, c in identifier_columns.items()]
            field_at = [(n, position[c]) for n, c in field_columns.items()]
            native = _JSON_NATIVE
            for chunk in chunks:
                staged: list[tuple[str, dict[str, Any]]] = []
                for row in chunk:
                    key = row[key_index]
                    if key is None or (isinstance(key, str) and not key.strip()):
                        issues.append(
                            RowIssue(
                                "skipped",
                                None,
                                f"null key: a row of segment `{sync.segment}` has no "
                                f"`{segment.key}`; fix the segment so every row has a key",
                            )
                        )
                        continue
                    key = str(key if type(key) in native else jsonable(key))
                    if len(key) > MAX_KEY_LENGTH:
                        issues.append(
                            RowIssue(
                                "skipped",
                                key[:MAX_KEY_LENGTH],
                                f"key of {len(key)} characters is longer than {MAX_KEY_LENGTH}; "
                                f"use a shorter identifier as `{segment.key}`",
                            )
                        )
                        continue
                    staged.append(
                        (
                            key,
                            {
                                "i": {
                                    n: v if type(v := row[i]) in native else jsonable(v)
                                    for n, i in identifier_at
                                },
                                "f": {
                                    n: v if type(v := row[i]) in native else jsonable(v)
                                    for n, i in field_at
                                },
                            },
                        )
                    )
                planner.stage_rows(staged)
                result.segment_rows += len(chunk)
                self.reporter.advance(len(chunk))
        issues += planner.finish_staging()
        return issues

    def _normaliser(
        self, sync_name: str, adapter: Destination
    ) -> Callable[[dict[str, Any]], Normalised]:
        sync = self.config.syncs[sync_name]
        matching = (
            MATCHING_IDENTIFIERS & adapter.accepted_identifiers
        ) | adapter.required_identifiers
        if adapter.required_identifiers:
            matching = adapter.required_identifiers

        def normalise(payload: dict[str, Any]) -> Normalised:
            normalised = normalise_identifiers(payload["i"], default_country=sync.default_country)
            identifiers = {
                name: value
                for name, value in normalised.identifiers.items()
                if name in adapter.accepted_identifiers
            }
            fields = payload["f"]
            if not matching & identifiers.keys():
                why = "; ".join(normalised.problems) or "all identifier columns are empty"
                return Normalised(
                    identifiers,
                    fields,
                    skip_reason=f"no usable identifier ({', '.join(sorted(matching))}): {why}",
                )
            return Normalised(identifiers, fields, dropped=tuple(normalised.problems))

        return normalise

    def _guard(self, sync_name: str, result: RunResult, audience: int, *, max_pct: float) -> None:
        remaining = result.segment_rows - result.skipped
        if remaining == 0 and audience > 0 and result.planned["remove"] > 0:
            raise GuardError(
                sync_name,
                f"the segment is empty but the audience has {audience} members winback added",
            )
        removals = result.planned["remove"]
        if audience >= GUARD_MIN_AUDIENCE and removals * 100 > max_pct * audience:
            raise GuardError(
                sync_name,
                f"{removals} of {audience} members ({removals * 100 / audience:.1f}%) would be "
                f"removed, more than max_removal_pct = {max_pct:g}",
            )


class Delivery:
    """Sends the plan in batches (several in flight when the adapter allows) and checkpoints."""

    def __init__(
        self,
        store: StateStore,
        connection: sa.Connection,
        planner: ChangePlanner,
        adapter: Destination,
        result: RunResult,
        reporter: Reporter,
    ):
        self.store = store
        self.connection = connection
        self.planner = planner
        self.adapter = adapter
        self.result = result
        self.reporter = reporter
        self._batch_number = 0
        self._consecutive_failures = 0
        self.batch_errors: list[str] = []
        self.unremoved: set[str] = set()
        """Keys whose removal failed: their re-add (new identity) waits for the next run, so
        the snapshot keeps the old identity until the platform has dropped it."""

    def run(self, *, batch_size: int) -> None:
        for state_action in STATE_ONLY_ACTIONS:
            self._apply_state_only(state_action)
        for action in SENT_ACTIONS:
            planned = self.result.planned[action]
            if planned:
                self.reporter.phase(f"{self.result.sync}: {action}", planned)
                self._send_action(action, batch_size)
        if self.batch_errors:
            failed = len(self.batch_errors)
            raise BatchFailedError(
                f"{failed} batch(es) failed and stay pending for the next run; first error: "
                f"{self.batch_errors[0]}"
            )

    def _next_batch(
        self, changes: Sequence[PlannedChange]
    ) -> tuple[Batch, dict[str, PlannedChange]]:
        self._batch_number += 1
        members = [
            Member(key=c.key, identifiers=c.identifiers, fields=c.fields, platform_id=c.platform_id)
            for c in changes
        ]
        return Batch(self._batch_number, members), {c.key: c for c in changes}

    def _batches(self, action: Action, size: int) -> Iterator[list[PlannedChange]]:
        batch: list[PlannedChange] = []
        for change in self.planner.changes(action):
            if action == "add" and change.key in self.unremoved:
                continue
            batch.append(change)
            if len(batch) >= size:
                yield batch
                batch = []
        if batch:
            yield batch

    def _send_action(self, action: Action, batch_size: int) -> None:
        call: Callable[[Batch], BatchResult] = getattr(self.adapter, action)
        fatal: BaseException | None = None
        in_flight: dict[Future[BatchResult], tuple[Batch, dict[str, PlannedChange]]] = {}
        queue = self._batches(action, batch_size)
        retry_queue: list[list[PlannedChange]] = []
        with ThreadPoolExecutor(max_workers=self.adapter.max_concurrency) as pool:
            while True:
                while fatal is None and len(in_flight) < self.adapter.max_concurrency:
                    changes = retry_queue.pop() if retry_queue else next(queue, None)
                    if changes is None:
                        break
                    batch, by_key = self._next_batch(changes)
                    in_flight[pool.submit(call, batch)] = (batch, by_key)
                if not in_flight:
                    break
                done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                for future in done:
                    batch, by_key = in_flight.pop(future)
                    error = future.exception()
                    if error is None:
                        self._checkpoint(action, by_key, future.result())
                    elif isinstance(error, PayloadTooLargeError):
                        retry_queue.extend(self._split(action, batch, by_key, error))
                    elif isinstance(error, BatchFailedError):
                        self._batch_failed(batch, error)
                        if action == "remove":
                            self.unremoved.update(m.key for m in batch.members)
                        if self._consecutive_failures >= MAX_CONSECUTIVE_BATCH_FAILURES:
                            fatal = fatal or error
                    else:
                        fatal = fatal or error
        if fatal is not None:
            raise fatal

    def _split(
        self,
        action: Action,
        batch: Batch,
        by_key: dict[str, PlannedChange],
        error: PayloadTooLargeError,
    ) -> list[list[PlannedChange]]:
        changes = [by_key[m.key] for m in batch.members]
        if len(changes) == 1:
            only = changes[0]
            self._checkpoint(
                action,
                by_key,
                BatchResult(
                    rejected=[
                        Rejection(only.key, f"too large for the destination even alone: {error}")
                    ]
                ),
            )
            return []
        middle = len(changes) // 2
        log.info("batch %d too large for %s; splitting into two", batch.number, self.adapter.name)
        return [changes[middle:], changes[:middle]]

    def _batch_failed(self, batch: Batch, error: BatchFailedError) -> None:
        self._consecutive_failures += 1
        self.batch_errors.append(str(error))
        log.warning("batch %d failed: %s", batch.number, error)

    def _checkpoint(
        self, action: Action, by_key: dict[str, PlannedChange], outcome: BatchResult
    ) -> None:
        """Record one acknowledged batch in its own transaction."""
        self._consecutive_failures = 0
        now = utcnow()
        connection = self.connection
        acknowledged = [a for a in outcome.acknowledged if a.key in by_key]
        rejected = [r for r in outcome.rejected if r.key in by_key]
        if action == "remove":
            StateStore.delete_snapshot_keys(
                connection, self.result.sync, [a.key for a in acknowledged]
            )
        elif action == "add":
            keys = [a.key for a in acknowledged] + [r.key for r in rejected]
            StateStore.delete_snapshot_keys(connection, self.result.sync, keys)
            rows = [
                self._snapshot_row(by_key[a.key], "member", a.platform_id, now)
                for a in acknowledged
            ]
            rows += [self._snapshot_row(by_key[r.key], "rejected", None, now) for r in rejected]
            insert_rows(connection, snapshot, rows)
        elif action == "update" and acknowledged:
            self._update_snapshot(
                [(by_key[a.key], a.platform_id or by_key[a.key].platform_id) for a in acknowledged],
                now,
            )
        StateStore.record_issues(
            connection,
            run_id=self.result.run_id,
            sync=self.result.sync,
            issues=[RowIssue("rejected", r.key, r.reason, action) for r in rejected],
        )
        self.store.heartbeat(connection, self.result.sync, self.result.run_id)
        connection.commit()
        self.result.sent[action] += len(acknowledged)
        self.result.rejected += len(rejected)
        self.result.batches += 1
        self.reporter.advance(len(by_key))

    def _snapshot_row(
        self, change: PlannedChange, status: str, platform_id: str | None, now: dt.datetime
    ) -> tuple[Any, ...]:
        """A snapshot row, in the column order of `snapshot` (for `insert_rows`)."""
        return (
            self.result.sync,
            change.key,
            status,
            change.raw_fp,
            change.identity_fp,
            change.fields_fp,
            json.dumps(change.identifiers, sort_keys=True),
            platform_id or change.platform_id,
            now,
            now,
        )

    def _update_snapshot(
        self, changes: Sequence[tuple[PlannedChange, str | None]], now: dt.datetime | None
    ) -> None:
        values: dict[str, Any] = {
            "raw_fp": sa.bindparam("b_raw_fp"),
            "identity_fp": sa.bindparam("b_identity_fp"),
            "fields_fp": sa.bindparam("b_fields_fp"),
            "identifiers": sa.bindparam("b_identifiers"),
            "platform_id": sa.bindparam("b_platform_id"),
        }
        if now is not None:
            values["last_sent_at"] = now
        statement = (
            snapshot.update()
            .where(snapshot.c.sync == self.result.sync, snapshot.c.key == sa.bindparam("b_key"))
            .values(**values)
        )
        self.connection.execute(
            statement,
            [
                {
                    "b_key": c.key,
                    "b_raw_fp": c.raw_fp,
                    "b_identity_fp": c.identity_fp,
                    "b_fields_fp": c.fields_fp,
                    "b_identifiers": json.dumps(c.identifiers, sort_keys=True),
                    "b_platform_id": platform_id,
                }
                for c, platform_id in changes
            ],
        )

    def _apply_state_only(self, action: Action) -> None:
        """`refresh` and `forget`: nothing to send, only the snapshot changes."""
        page: list[PlannedChange] = []
        for change in self.planner.changes(action):
            page.append(change)
            if len(page) >= 1000:
                self._apply_state_page(action, page)
                page = []
        if page:
            self._apply_state_page(action, page)

    def _apply_state_page(self, action: Action, page: list[PlannedChange]) -> None:
        if action == "forget":
            StateStore.delete_snapshot_keys(
                self.connection, self.result.sync, [c.key for c in page]
            )
        else:
            self._update_snapshot([(c, c.platform_id) for c in page], None)
        self.connection.commit()
