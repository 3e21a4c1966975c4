"""Delivery: sends a run's planned changes in batches and checkpoints each acknowledged one.

Several batches may be in flight when the adapter allows it; results are checkpointed in the
calling thread, each in its own transaction. Each batch is noted in the state store before it
is sent (`in_flight`) and the note goes with its checkpoint, so a crash loses nothing: the next
run settles what the stopped one sent without seeing the answer (the destination may or may not
have applied it) and sends it again, or removes it when it has left the segment (at-least-once;
adapters use idempotent calls).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any, Protocol

import sqlalchemy as sa

from connector.diff import SENT_ACTIONS, Action, ChangePlanner, PlannedChange
from connector.errors import (
    BatchFailedError,
    DestinationError,
    PayloadTooLargeError,
    WinbackError,
)
from connector.run_result import RunResult
from connector.state import (
    MEMBER_STATUSES,
    RowIssue,
    StateStore,
    in_lists,
    insert_rows,
    snapshot,
    utcnow,
)
from destinations.base import (
    Batch,
    BatchResult,
    Destination,
    Member,
    Rejection,
    redact_text,
)

log = logging.getLogger("winback.delivery")

MAX_CONSECUTIVE_BATCH_FAILURES = 3
SMALL_REQUEST_BYTES = 64 * 1024
"""A single row refused as too large in a request smaller than this is not the row's fault:
every destination winback targets takes 1 MB or more (the batch fails and stays pending)."""


def _batch_error(batch: Batch, error: BaseException | None) -> BaseException | None:
    """What a batch's error means for delivery: as raised, except a single small row that the
    destination's answer refused as too large, which is not the row's fault: the batch fails
    (and stays pending) instead of its row being rejected for good. A row over the adapter's
    own documented limit (an error without a status, raised before sending) is the row's."""
    if (
        isinstance(error, PayloadTooLargeError)
        and error.status is not None
        and len(batch) == 1
        and (error.request_bytes or 0) < SMALL_REQUEST_BYTES
    ):
        return BatchFailedError(
            f"{error}; a single row of {error.request_bytes or 0:,} bytes was refused as too "
            "large, so the destination refuses any request: check its URL (a proxy or another "
            "endpoint may be answering) and its request size limit",
            maybe_applied=False,
        )
    return error


def repeated_key_issue(key: str, *, sent: bool) -> RowIssue:
    """The skipped-row issue of a row whose key an earlier row of the run already had, found
    while sending (the segment's rows changed between its key census and its read)."""
    kept = (
        "both rows were sent, the first one recorded is kept and the next run sends the key's "
        "row again"
        if sent
        else "the first row was sent"
    )
    return RowIssue(
        "skipped",
        key,
        f"duplicate key `{key}`: the segment returned it again while it was read (a table "
        f"loaded during the run, or a query whose rows vary); {kept}; make the segment return "
        "one row per key",
    )


def insert_new_snapshot_rows(
    connection: sa.Connection, rows: Sequence[tuple[Any, ...]]
) -> list[tuple[Any, ...]]:
    """Insert snapshot rows (`insert_rows`) except those whose key the snapshot already has or
    an earlier one of `rows` repeats; returns the rows left out.

    One insert in a savepoint; only when it hits a key already there (a streamed first sync
    whose segment changed between its key census and its read) are the keys looked up."""
    if not rows:
        return []
    connection_errors: tuple[type[Exception], ...] = (sa.exc.IntegrityError,)
    dbapi = connection.dialect.dbapi
    if dbapi is not None:  # COPY (PostgreSQL) raises the driver's own error
        connection_errors += (dbapi.IntegrityError,)
    try:
        with connection.begin_nested():
            insert_rows(connection, snapshot, rows)
        return []
    except connection_errors:
        pass
    keys = sorted({row[1] for row in rows})
    existing = StateStore.snapshot_keys_among(connection, rows[0][0], keys)
    new, left_out = [], []
    for row in rows:
        if row[1] in existing:
            left_out.append(row)
        else:
            existing.add(row[1])
            new.append(row)
    insert_rows(connection, snapshot, new)
    return left_out


class Reporter(Protocol):
    """Progress sink (a rich progress bar in the CLI, nothing in tests)."""

    def phase(self, description: str, total: int | None) -> None: ...

    def advance(self, amount: int) -> None: ...


class SilentReporter:
    def phase(self, description: str, total: int | None) -> None:
        pass

    def advance(self, amount: int) -> None:
        pass


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
        """Apply and send the planner's plan.

        Rows are forgotten only once everything was sent: a removal the planner turned into
        `forget` because another member takes over the identity must still happen next run
        if that member's add did not (its removal failed, its batch failed or was unanswered).
        """
        self._apply_state_only("refresh")
        for action in SENT_ACTIONS:
            planned = self.result.planned[action]
            if planned:
                self.reporter.phase(f"{self.result.sync}: {action}", planned)
                self._send_action(
                    action, self.planner.changes(action), batch_size, planned_rows=planned
                )
        self._raise_if_batches_failed()
        self._apply_state_only("forget")

    def send(
        self,
        action: Action,
        changes: Iterable[PlannedChange],
        *,
        batch_size: int,
        estimated_rows: int | None = None,
    ) -> None:
        """Send changes produced as they are read (a streamed first sync), not from the plan;
        `estimated_rows` (the segment's rows, those that cannot be sent included) becomes the
        batches' `planned_rows`.

        `changes` is consumed in the calling thread, between checkpoints: it may write to the
        state connection, and what it writes is committed with the next checkpoint."""
        self._send_action(action, changes, batch_size, planned_rows=estimated_rows)
        self._raise_if_batches_failed()

    def _raise_if_batches_failed(self) -> None:
        if self.batch_errors:
            failed = len(self.batch_errors)
            raise BatchFailedError(
                f"{failed} batch(es) failed and stay pending for the next run; first error: "
                f"{self.batch_errors[0]}"
            )

    def _next_batch(
        self,
        changes: Sequence[PlannedChange],
        *,
        sequence: int,
        last: bool,
        planned_rows: int | None,
    ) -> tuple[Batch, dict[str, PlannedChange]]:
        self._batch_number += 1
        members = [Member(c.key, c.identifiers, c.fields, c.platform_id) for c in changes]
        batch = Batch(
            self._batch_number, members, sequence=sequence, last=last, planned_rows=planned_rows
        )
        return batch, {c.key: c for c in changes}

    def _batches(
        self, action: Action, changes: Iterable[PlannedChange], size: int
    ) -> Iterator[list[PlannedChange]]:
        """`changes` in batches of `size`. A key repeated within a batch (a streamed segment
        whose rows changed while it was read) is sent once: the later row is skipped."""
        batch: list[PlannedChange] = []
        keys: set[str] = set()
        for change in changes:
            if action == "add" and change.key in self.unremoved:
                continue
            if change.key in keys:
                self._skip_repeated([change.key], sent=False)
                continue
            keys.add(change.key)
            batch.append(change)
            if len(batch) >= size:
                yield batch
                batch, keys = [], set()
        if batch:
            yield batch

    def _skip_repeated(self, keys: Sequence[str], *, sent: bool) -> None:
        """Record rows of keys already sent or recorded by this run as skipped duplicates
        (committed with the next checkpoint)."""
        StateStore.record_issues(
            self.connection,
            run_id=self.result.run_id,
            sync=self.result.sync,
            issues=[repeated_key_issue(key, sent=sent) for key in keys],
        )
        self.result.skipped += len(keys)
        if not sent:
            self.reporter.advance(len(keys))

    def _send_action(
        self,
        action: Action,
        changes: Iterable[PlannedChange],
        batch_size: int,
        *,
        planned_rows: int | None,
    ) -> None:
        call: Callable[[Batch], BatchResult] = getattr(self.adapter, action)
        batch_size = min(batch_size, self.adapter.max_batch_size(action) or batch_size)
        fatal: BaseException | None = None
        in_flight: dict[Future[BatchResult], tuple[Batch, dict[str, PlannedChange]]] = {}
        queue = self._batches(action, changes, batch_size)
        upcoming = next(queue, None)  # read one batch ahead, to tell the adapter the last one
        retry_queue: list[list[PlannedChange]] = []
        sequence = 0
        with self._batch_threads() as pool:
            while True:
                while fatal is None and len(in_flight) < self.adapter.max_concurrency:
                    if retry_queue:
                        next_changes = retry_queue.pop()
                    elif upcoming is not None:
                        next_changes, upcoming = upcoming, next(queue, None)
                    else:
                        break
                    sequence += 1
                    batch, by_key = self._next_batch(
                        next_changes,
                        sequence=sequence,
                        last=upcoming is None and not retry_queue,
                        planned_rows=planned_rows,
                    )
                    self._note_in_flight(action, batch, next_changes)
                    submitted = pool.submit(self._call_adapter, action, call, batch)
                    in_flight[submitted] = (batch, by_key)
                if not in_flight:
                    break
                done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                for future in done:
                    batch, by_key = in_flight.pop(future)
                    error = _batch_error(batch, future.exception())
                    if error is None:
                        self._checkpoint(action, batch, by_key, future.result())
                    elif isinstance(error, PayloadTooLargeError):
                        retry_queue.extend(self._split(action, batch, by_key, error))
                        if batch.sequence == sequence:  # refused whole: its first half
                            sequence -= 1  # takes its number, so the numbers have no gap
                    elif isinstance(error, BatchFailedError):
                        self._batch_failed(batch, error)
                        if action == "remove":
                            self.unremoved.update(m.key for m in batch.members)
                        if self._consecutive_failures >= MAX_CONSECUTIVE_BATCH_FAILURES:
                            fatal = fatal or error
                    else:
                        if isinstance(error, DestinationError) and not error.maybe_applied:
                            self._forget_unapplied(batch)  # refused, or never got it (401, 429)
                        fatal = fatal or error
        if fatal is not None:
            raise fatal

    def _call_adapter(
        self, action: Action, call: Callable[[Batch], BatchResult], batch: Batch
    ) -> BatchResult:
        """`call(batch)` in a batch thread, within the adapter's `batch_call` scope. Any other
        exception than winback's own (an adapter reading an answer it did not expect: a
        KeyError, a TypeError) fails the batch, naming the destination, the action and the
        batch; its rows stay in doubt, as the platform may have applied them."""
        with self.adapter.batch_call():
            try:
                return call(batch)
            except WinbackError:
                raise
            except Exception as error:
                log.debug("%s of batch %d raised", action, batch.number, exc_info=True)
                raise BatchFailedError(
                    f"{action} of batch {batch.number} ({len(batch):,} rows) failed with an "
                    f"unexpected {type(error).__name__}: {redact_text(str(error))[:200]}; the "
                    "adapter may not understand the platform's answer (-vv shows where). The "
                    "batch's rows stay in doubt and are settled by the next run",
                    destination=self.adapter.display_name,
                ) from error

    @contextlib.contextmanager
    def _batch_threads(self) -> Iterator[ThreadPoolExecutor]:
        """Threads sending batches. Left as any other error is, they finish their batches
        first; on Ctrl-C or SIGTERM the adapter is told to stop (no more retries or waits)
        and they are not waited for: a batch in flight is not recorded, and the next run sends
        it again."""
        pool = ThreadPoolExecutor(max_workers=self.adapter.max_concurrency)
        try:
            yield pool
        except KeyboardInterrupt:
            self.adapter.stop()
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        except BaseException:
            pool.shutdown(wait=True)
            raise
        pool.shutdown(wait=True)

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
                batch,
                by_key,
                BatchResult(
                    rejected=[
                        Rejection(only.key, f"too large for the destination even alone: {error}")
                    ]
                ),
            )
            return []
        # Refused whole, so not applied: its halves are noted when they are sent.
        StateStore.forget_in_flight(
            self.connection, sync=self.result.sync, run_id=self.result.run_id, batch=batch.number
        )
        middle = len(changes) // 2
        log.info("batch %d too large for %s; splitting into two", batch.number, self.adapter.name)
        return [changes[middle:], changes[:middle]]

    def _batch_failed(self, batch: Batch, error: BatchFailedError) -> None:
        """The batch stays pending; unless the destination's answer says it applied none of
        it, it also stays noted as in flight, for the next run to settle."""
        if not error.maybe_applied:
            self._forget_unapplied(batch)
        self._consecutive_failures += 1
        self.batch_errors.append(str(error))
        log.warning("batch %d failed: %s", batch.number, error)

    def _forget_unapplied(self, batch: Batch) -> None:
        """The destination says it applied nothing of `batch`: its rows are simply pending,
        no longer in flight."""
        StateStore.forget_in_flight(
            self.connection, sync=self.result.sync, run_id=self.result.run_id, batch=batch.number
        )
        self.connection.commit()

    def _note_in_flight(
        self,
        action: Action,
        batch: Batch,
        changes: Sequence[PlannedChange],
        *,
        commit: bool = True,
    ) -> None:
        """Record what this batch sends before it goes (committed): should the run stop before
        its outcome is recorded, the next run knows the destination may have applied it."""
        StateStore.record_in_flight(
            self.connection,
            sync=self.result.sync,
            run_id=self.result.run_id,
            batch=batch.number,
            action=action,
            members=[(c.key, c.identity_fp, c.identifiers_text, c.platform_id) for c in changes],
        )
        if commit:
            self.connection.commit()

    def _unconfirmed(self, action: Action, batch: Batch, outcome: BatchResult) -> list[str]:
        """Keys of the batch the destination may or may not have applied: those the adapter
        says it cannot confirm and those it left out of both `acknowledged` and `rejected`
        (a warning names the adapter: its answer does not account for every row)."""
        keys = [m.key for m in batch.members]
        declared = set(outcome.unconfirmed)
        answered = {a.key for a in outcome.acknowledged} | {r.key for r in outcome.rejected}
        left_out = [key for key in keys if key not in answered and key not in declared]
        if left_out:
            log.warning(
                "%s: adapter `%s` neither acknowledged nor rejected %d row(s) of batch %d (%s), "
                "e.g. key `%s`; the destination may have applied them: the next run settles "
                "them and sends them again",
                self.result.sync,
                self.adapter.name,
                len(left_out),
                batch.number,
                action,
                left_out[0],
            )
        in_doubt = [key for key in keys if key in declared]
        if in_doubt:
            log.warning(
                "%s: the destination could not confirm %d row(s) of batch %d (%s); the next "
                "run settles them and sends them again",
                self.result.sync,
                len(in_doubt),
                batch.number,
                action,
            )
        return [key for key in keys if key in declared or key not in answered]

    def _checkpoint(
        self,
        action: Action,
        batch: Batch,
        by_key: dict[str, PlannedChange],
        outcome: BatchResult,
    ) -> None:
        """Record one answered batch in its own transaction (it is no longer in flight)."""
        self._consecutive_failures = 0
        now = utcnow()
        connection = self.connection
        StateStore.forget_in_flight(
            connection, sync=self.result.sync, run_id=self.result.run_id, batch=batch.number
        )
        in_doubt = self._unconfirmed(action, batch, outcome)
        if in_doubt:
            # Still in flight: the next run settles these rows as it does a lost answer's.
            self._note_in_flight(action, batch, [by_key[key] for key in in_doubt], commit=False)
            if action == "remove":
                self.unremoved.update(in_doubt)
        doubted = set(in_doubt)
        acknowledged = [a for a in outcome.acknowledged if a.key in by_key and a.key not in doubted]
        rejected = [r for r in outcome.rejected if r.key in by_key and r.key not in doubted]
        unattributed = min(max(outcome.unattributed_rejections, 0), len(by_key))
        if action == "remove":
            StateStore.delete_snapshot_keys(
                connection, self.result.sync, [a.key for a in acknowledged]
            )
        elif action == "add":
            # A refused add of a key the destination has or may have (a member re-added, an
            # unconfirmed row) keeps that row, which a later removal needs.
            held = self._possibly_held([by_key[r.key] for r in rejected])
            if held:
                self._keep_refused_change(held)
            refused = [by_key[r.key] for r in rejected if r.key not in {c.key for c in held}]
            # Keys the planner saw absent from the snapshot are still absent (only this run's
            # checkpoint of their batch writes them): no DELETE for them.
            keys = [a.key for a in acknowledged if by_key[a.key].in_snapshot]
            keys += [c.key for c in refused if c.in_snapshot]
            StateStore.delete_snapshot_keys(connection, self.result.sync, keys)
            rows = self._snapshot_rows(
                [(by_key[a.key], a.platform_id) for a in acknowledged], "member", now
            )
            rows += self._snapshot_rows([(c, None) for c in refused], "rejected", now)
            left_out = insert_new_snapshot_rows(connection, rows)
            if left_out:
                repeated = self._record_repeated_adds(left_out)
                acknowledged = [a for a in acknowledged if a.key not in repeated]
        elif action == "update":
            if acknowledged:
                self._update_snapshot(
                    [
                        (by_key[a.key], a.platform_id or by_key[a.key].platform_id)
                        for a in acknowledged
                    ],
                    now,
                )
            if rejected:
                self._keep_refused_change([by_key[r.key] for r in rejected])
        issues = [RowIssue("rejected", r.key, r.reason, action) for r in rejected]
        if unattributed:
            reason = outcome.unattributed_reason.strip() or "no reason given"
            issues.append(
                RowIssue(
                    "rejected",
                    None,
                    f"{unattributed} row(s) of batch {batch.number} refused by the destination "
                    f"without saying which ({reason}); the rows of that batch count as sent",
                    action,
                )
            )
        StateStore.record_issues(
            connection, run_id=self.result.run_id, sync=self.result.sync, issues=issues
        )
        self.result.sent[action] += len(acknowledged)
        self.result.rejected += len(rejected) + unattributed
        self.result.batches += 1
        # The run's counts so far, with the batch: a run killed later shows what it sent.
        counts = {**self.result.counts(), "retries": self.adapter.retries}
        StateStore.record_progress(connection, self.result.run_id, counts)
        self.store.heartbeat(connection, self.result.sync, self.result.run_id)
        connection.commit()
        self.reporter.advance(len(by_key))

    def _record_repeated_adds(self, left_out: Sequence[tuple[Any, ...]]) -> set[str]:
        """Snapshot rows of acknowledged adds whose key an earlier batch of this run recorded
        (`insert_new_snapshot_rows` left them out): the segment returned the key again.

        Over a row the destination does not hold (skipped, rejected) the acknowledged one is
        recorded instead. A member's row stays (the first one recorded) and the later row is
        a skipped duplicate; as the destination got both, the kept row's fingerprints are
        cleared where the two differ, so the next run sends the key's row again. Returns the
        keys of those skipped duplicates."""
        sync, connection = self.result.sync, self.connection
        added = {row[1]: row for row in left_out if row[2] == "member"}
        held = StateStore.snapshot_keys_among(connection, sync, sorted(added), MEMBER_STATUSES)
        replaced = [key for key in added if key not in held]
        StateStore.delete_snapshot_keys(connection, sync, replaced)
        insert_rows(connection, snapshot, [added[key] for key in replaced])
        repeated = sorted(set(added) - set(replaced))
        if repeated:
            connection.execute(
                snapshot.update()
                .where(
                    snapshot.c.sync == sync,
                    snapshot.c.key == sa.bindparam("b_key"),
                    snapshot.c.raw_fp != sa.bindparam("b_raw_fp"),
                )
                .values(raw_fp="", fields_fp=""),
                [{"b_key": key, "b_raw_fp": added[key][3]} for key in repeated],
            )
            self._skip_repeated(repeated, sent=True)
        return set(repeated)

    def _snapshot_rows(
        self,
        changes: Sequence[tuple[PlannedChange, str | None]],
        status: str,
        now: dt.datetime,
    ) -> list[tuple[Any, ...]]:
        """Snapshot rows in the column order of `snapshot` (for `insert_rows`): each change
        with the platform id its acknowledgement returned, else the one it had."""
        sync = self.result.sync
        return [
            (
                sync,
                c.key,
                status,
                c.raw_fp,
                c.identity_fp,
                c.fields_fp,
                c.identifiers_text,
                platform_id or c.platform_id,
                now,
                now,
                None,  # reason: only skipped rows have one
            )
            for c, platform_id in changes
        ]

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
        if now is not None:  # acknowledged: the destination holds the member
            values["last_sent_at"] = now
            values["status"] = "member"
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
                    "b_identifiers": c.identifiers_text,
                    "b_platform_id": platform_id,
                }
                for c, platform_id in changes
            ],
        )

    def _forgettable(self, page: Sequence[PlannedChange]) -> list[PlannedChange]:
        """The `forget` rows to delete now that everything was sent: each as the planner saw
        it (a key re-added by this run has a new row, which stays), and, for a member whose
        removal was skipped because another member shares its identity, only while a member
        still holds that identity (its add may have been refused): otherwise the row stays
        and the next run plans the removal."""
        keys = [c.key for c in page]
        seen: dict[str, tuple[str, str, str]] = {}
        for some in in_lists(keys):
            for key, status, raw_fp, identity_fp in self.connection.execute(
                sa.select(
                    snapshot.c.key, snapshot.c.status, snapshot.c.raw_fp, snapshot.c.identity_fp
                ).where(snapshot.c.sync == self.result.sync, snapshot.c.key.in_(some))
            ):
                seen[key] = (status, raw_fp, identity_fp)
        current = [c for c in page if c.key in seen and seen[c.key][1] == c.raw_fp]
        shared = {seen[c.key][2] for c in current if seen[c.key][0] in MEMBER_STATUSES}
        identities = sorted(shared)
        holders: dict[str, set[str]] = {}
        for some in in_lists(identities):
            for key, identity_fp in self.connection.execute(
                sa.select(snapshot.c.key, snapshot.c.identity_fp).where(
                    snapshot.c.sync == self.result.sync,
                    snapshot.c.status == "member",
                    snapshot.c.identity_fp.in_(some),
                )
            ):
                holders.setdefault(identity_fp, set()).add(key)
        return [
            c
            for c in current
            if seen[c.key][0] not in MEMBER_STATUSES or holders.get(seen[c.key][2], set()) - {c.key}
        ]

    def _possibly_held(self, changes: Sequence[PlannedChange]) -> list[PlannedChange]:
        """Those of `changes` whose snapshot row says the destination has or may have the key
        (`member`, `unconfirmed`)."""
        held = StateStore.snapshot_keys_among(
            self.connection,
            self.result.sync,
            [c.key for c in changes if c.in_snapshot],
            MEMBER_STATUSES,
        )
        return [c for c in changes if c.key in held]

    def _keep_refused_change(self, changes: Sequence[PlannedChange]) -> None:
        """The destination refused to update (or add again) these keys and keeps what it had:
        the snapshot keeps its rows too (to compare and remove), with the new raw fingerprint,
        so the refused change is not sent again until the row changes (and a row changed back
        to the old values is only refreshed)."""
        self.connection.execute(
            snapshot.update()
            .where(snapshot.c.sync == self.result.sync, snapshot.c.key == sa.bindparam("b_key"))
            .values(raw_fp=sa.bindparam("b_raw_fp")),
            [{"b_key": c.key, "b_raw_fp": c.raw_fp} for c in changes],
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
            forgotten = self._forgettable(page)
            if forgotten:
                self.connection.execute(
                    snapshot.delete().where(
                        snapshot.c.sync == self.result.sync,
                        snapshot.c.key == sa.bindparam("b_key"),
                        snapshot.c.raw_fp == sa.bindparam("b_raw_fp"),
                    ),
                    [{"b_key": c.key, "b_raw_fp": c.raw_fp} for c in forgotten],
                )
        else:
            self._update_snapshot([(c, c.platform_id) for c in page], None)
        self.connection.commit()
