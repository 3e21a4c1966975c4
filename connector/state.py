"""The state store: snapshots, run history, row issues and per-sync locks.

Any SQLAlchemy database works (SQLite by default, PostgreSQL for teams). The schema is created on
first use and carries a version number so later releases can migrate it in place.

Tables:
- ``snapshot``: one row per (sync, key) that winback added to the destination (``status =
  'member'``), that the destination rejected (``'rejected'``, so it is not re-sent until it
  changes), that has no usable identifier (``'skipped'``, with its ``reason``, so it is not
  re-checked until it changes or the normalisation settings do) or that a stopped run sent
  without seeing the answer (``'unconfirmed'``: the destination may or may not have it). It
  keeps what later runs need: fingerprints for the diff, the normalised identifiers and the
  platform id to remove the member again.
- ``sync_targets``: where each sync's snapshot was sent (destination type and audience): a
  sync pointed elsewhere must start over (`sync reset`), or the new target would only get
  changes.
- ``in_flight``: one row per batch handed to the destination and not yet recorded, with what
  was sent; written before the batch goes out and deleted by its checkpoint. What a stopped run
  leaves there becomes ``'unconfirmed'`` snapshot rows at the start of the next run
  (`StateStore.settle_unconfirmed`).
- ``runs``: one row per run with its counts, duration and outcome.
- ``row_issues``: rows skipped before sending (null/duplicate key, no usable identifier) and rows
  the destination rejected, with the reason; kept for the newest runs only (`prune_history`),
  older runs keep one row of kind ``'pruned'`` instead.
- ``locks``: who runs which sync now (host, PID namespace and pid); a lock whose heartbeat is
  older than ``LOCK_TTL``, or whose process is gone (known only in the namespace it was taken
  in), is taken over (`StateStore._stale_because`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import logging
import os
import socket
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import orjson
import sqlalchemy as sa

from connector.errors import LockedError, StateError
from connector.warehouse import (
    connect_timeout_args,
    first_line,
    parse_database_url,
    redact_url,
    with_installed_driver,
)

log = logging.getLogger("winback.state")
T = TypeVar("T")

SCHEMA_VERSION = 4
"""1: first release; 2: snapshot.reason and rows with status 'skipped'; 3: the `in_flight`
and `sync_targets` tables and snapshot rows with status 'unconfirmed'; 4: locks.pid_namespace."""
ISSUES_PAGE_ROWS = 5000
"""Row issues read at a time by `StateStore.each_issue`."""
PRUNED_ISSUES = "pruned"
"""`row_issues.kind` of the one row left for a run whose row issues were pruned (so `sync
issues` can tell them apart from a run that recorded none); never shown as an issue."""
LOCK_TTL = dt.timedelta(minutes=30)
HEARTBEAT_EVERY_S = 60.0
"""How often a running sync refreshes its lock's heartbeat (`StateStore.lock_kept_alive`)."""

metadata = sa.MetaData()

schema_info = sa.Table(
    "winback_schema",
    metadata,
    sa.Column("version", sa.Integer, nullable=False),
)

snapshot = sa.Table(
    "snapshot",
    metadata,
    sa.Column("sync", sa.String(200), primary_key=True),
    sa.Column("key", sa.String(500), primary_key=True),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("raw_fp", sa.String(40), nullable=False),
    sa.Column("identity_fp", sa.String(40), nullable=False),
    sa.Column("fields_fp", sa.String(40), nullable=False),
    sa.Column("identifiers", sa.Text, nullable=False),
    sa.Column("platform_id", sa.String(200)),
    sa.Column("first_added_at", sa.DateTime),
    sa.Column("last_sent_at", sa.DateTime),
    sa.Column("reason", sa.Text),
)
SKIPPED_INDEX = sa.Index(
    "snapshot_skipped",
    snapshot.c.sync,
    snapshot.c.key,
    sqlite_where=snapshot.c.status == "skipped",
    postgresql_where=snapshot.c.status == "skipped",
)
"""Finds a sync's skipped rows without scanning its members (partial: members are not in it)."""

runs = sa.Table(
    "runs",
    metadata,
    sa.Column("run_id", sa.String(40), primary_key=True),
    sa.Column("sync", sa.String(200), nullable=False, index=True),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("started_at", sa.DateTime, nullable=False),
    sa.Column("finished_at", sa.DateTime),
    sa.Column("duration_s", sa.Float),
    sa.Column("segment_rows", sa.Integer, nullable=False, default=0),
    sa.Column("skipped", sa.Integer, nullable=False, default=0),
    sa.Column("planned_add", sa.Integer, nullable=False, default=0),
    sa.Column("planned_remove", sa.Integer, nullable=False, default=0),
    sa.Column("planned_update", sa.Integer, nullable=False, default=0),
    sa.Column("sent_add", sa.Integer, nullable=False, default=0),
    sa.Column("sent_remove", sa.Integer, nullable=False, default=0),
    sa.Column("sent_update", sa.Integer, nullable=False, default=0),
    sa.Column("rejected", sa.Integer, nullable=False, default=0),
    sa.Column("batches", sa.Integer, nullable=False, default=0),
    sa.Column("retries", sa.Integer, nullable=False, default=0),
    sa.Column("error", sa.Text),
)

row_issues = sa.Table(
    "row_issues",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("run_id", sa.String(40), nullable=False, index=True),
    sa.Column("sync", sa.String(200), nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("action", sa.String(16)),
    sa.Column("key", sa.String(500)),
    sa.Column("reason", sa.Text, nullable=False),
)

sync_targets = sa.Table(
    "sync_targets",
    metadata,
    sa.Column("sync", sa.String(200), primary_key=True),
    sa.Column("target", sa.Text, nullable=False),
    sa.Column("since", sa.DateTime, nullable=False),
)

in_flight = sa.Table(
    "in_flight",
    metadata,
    sa.Column("sync", sa.String(200), primary_key=True),
    sa.Column("run_id", sa.String(40), primary_key=True),
    sa.Column("batch", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("action", sa.String(16), nullable=False),
    # JSON: [[key, identity_fp, identifiers (their JSON text), platform_id], ...] as sent
    sa.Column("members", sa.Text, nullable=False),
)

locks = sa.Table(
    "locks",
    metadata,
    sa.Column("sync", sa.String(200), primary_key=True),
    sa.Column("run_id", sa.String(40), nullable=False),
    sa.Column("host", sa.String(200), nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
    sa.Column("acquired_at", sa.DateTime, nullable=False),
    sa.Column("heartbeat_at", sa.DateTime, nullable=False),
    # The PID namespace `pid` belongs to (Linux: "pid:[4026531836]"); NULL where it cannot be
    # read and in rows of a winback before schema 4, which are judged by host and pid alone.
    sa.Column("pid_namespace", sa.String(64)),
)

MEMBER_STATUSES = ("member", "unconfirmed")
"""Snapshot statuses of keys the destination has, or may have (see `settle_unconfirmed`)."""

RUN_COUNT_COLUMNS = (
    "segment_rows",
    "skipped",
    "planned_add",
    "planned_remove",
    "planned_update",
    "sent_add",
    "sent_remove",
    "sent_update",
    "rejected",
    "batches",
    "retries",
)


IN_LIST_SIZE = 500
"""Values per `IN (...)` list: under every database's bind-parameter limit."""


def in_lists(values: Sequence[T]) -> Iterator[Sequence[T]]:
    """`values` in slices of IN_LIST_SIZE, one `IN (...)` list each."""
    for start in range(0, len(values), IN_LIST_SIZE):
        yield values[start : start + IN_LIST_SIZE]


def utcnow() -> dt.datetime:
    """Naive UTC timestamp (portable across SQLite, DuckDB and PostgreSQL)."""
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


@dataclass(frozen=True)
class RowIssue:
    kind: str  # "skipped" (not sent) | "rejected" (by the destination) | "dropped" (an identifier)
    key: str | None
    reason: str
    action: str | None = None


def insert_rows(connection: sa.Connection, table: sa.Table, rows: Sequence[Sequence[Any]]) -> None:
    """Insert rows given as tuples in the order of `table`'s columns (every column, no defaults).

    On SQLite this is one raw DBAPI `executemany`, ~4x less CPU than Core's per-row parameter
    dicts; on PostgreSQL (psycopg) one COPY (`_copy_rows`); elsewhere it is a Core insert.
    SQLite binds each value of each row (~0.5 us a value), so a column holding the same short
    text, timestamp or NULL in every row (the sync, the status, a checkpoint's time) is written
    into the statement once instead (`_inline_value`): a checkpoint of snapshot rows binds 6
    values a row instead of 11.
    """
    if not rows:
        return
    dialect = connection.dialect
    if dialect.name == "postgresql" and dialect.driver == "psycopg":
        _copy_rows(connection, table, rows)
        return
    if dialect.name != "sqlite":
        names = [column.key for column in table.columns]
        connection.execute(table.insert(), [dict(zip(names, row, strict=True)) for row in rows])
        return
    columns: list[Sequence[Any]] = list(zip(*rows, strict=True))
    placeholders, bound = [], []
    for index, (column, values) in enumerate(zip(table.columns, columns, strict=True)):
        first = values[0]
        inline = None
        # The first column stays bound: executemany needs a value a row to insert each row.
        if index and len(values) > 1 and all(value is first for value in values):
            inline = _inline_value(column, first, dialect)
        if inline is not None:
            placeholders.append(inline)
            continue
        placeholders.append("?")
        process = _bind_processor(column, dialect)
        bound.append(values if process is None else [process(value) for value in values])
    preparer = dialect.identifier_preparer
    statement = (
        f"INSERT INTO {preparer.format_table(table)} "
        f"({', '.join(preparer.format_column(column) for column in table.columns)}) "
        f"VALUES ({', '.join(placeholders)})"
    )
    connection.exec_driver_sql(statement, list(zip(*bound, strict=True)))


def _copy_rows(connection: sa.Connection, table: sa.Table, rows: Sequence[Sequence[Any]]) -> None:
    """PostgreSQL through psycopg 3: one `COPY ... FROM STDIN`, ~6x less CPU than Core's
    executemany of parameter dicts (100k snapshot rows: 2.7 → 0.4 s). It runs in the
    connection's transaction, begun here when none is, so it commits and rolls back with the
    statements around it."""
    if not connection.in_transaction():
        connection.begin()
    dialect = connection.dialect
    processors = [_bind_processor(column, dialect) for column in table.columns]
    if any(processors):
        rows = [
            tuple(v if p is None else p(v) for p, v in zip(processors, row, strict=True))
            for row in rows
        ]
    preparer = dialect.identifier_preparer
    columns = ", ".join(preparer.format_column(column) for column in table.columns)
    statement = f"COPY {preparer.format_table(table)} ({columns}) FROM STDIN"
    dbapi_connection = connection.connection.dbapi_connection
    if dbapi_connection is None:  # pragma: no cover - an open connection always has one
        raise StateError("the state connection is closed")
    cursor: Any = dbapi_connection.cursor()  # psycopg's own cursor, with its copy()
    try:
        with cursor.copy(statement) as copy:
            for row in rows:
                copy.write_row(row)
    finally:
        cursor.close()


def _bind_processor(column: sa.Column[Any], dialect: sa.Dialect) -> Callable[[Any], Any] | None:
    """What SQLAlchemy applies to a value of `column` before the driver gets it (None: nothing),
    for the inserts that bypass Core."""
    processor: Callable[[Any], Any] | None = column.type.dialect_impl(dialect).bind_processor(
        dialect
    )
    return processor


_MAX_INLINE_TEXT = 200


def _inline_value(column: sa.Column[Any], value: Any, dialect: sa.Dialect) -> str | None:
    """`value` as an SQL literal of `column`'s type, rendered by SQLAlchemy (quotes doubled),
    for NULL, timestamps and short text without NUL characters; None for anything else."""
    if value is None:
        return "NULL"
    if not (
        isinstance(value, dt.datetime)
        or (isinstance(value, str) and len(value) <= _MAX_INLINE_TEXT and "\x00" not in value)
    ):
        return None
    literal = sa.literal(value, column.type)
    return str(literal.compile(dialect=dialect, compile_kwargs={"literal_binds": True}))


MIGRATED_COLUMNS: tuple[tuple[int, str, str], ...] = (
    (2, "snapshot", "reason"),
    (4, "locks", "pid_namespace"),
)
"""(version, table, column): columns `_migrate` adds to a store older than that version."""


def _migrate(connection: sa.Connection, version: int) -> None:
    """Bring a store written by an older winback to SCHEMA_VERSION, in the caller's transaction
    (after `create_all`, which made the tables that store did not have yet, columns included)."""
    inspector = sa.inspect(connection)
    preparer = connection.dialect.identifier_preparer
    for since, table_name, column_name in MIGRATED_COLUMNS:
        if version >= since:
            continue
        if column_name in {c["name"] for c in inspector.get_columns(table_name)}:
            continue
        column = metadata.tables[table_name].c[column_name]
        connection.execute(
            sa.text(
                f"ALTER TABLE {preparer.format_table(column.table)} ADD COLUMN "
                f"{preparer.format_column(column)} {column.type.compile(connection.dialect)}"
            )
        )
    if version < 2:
        SKIPPED_INDEX.create(connection, checkfirst=True)
    connection.execute(schema_info.update().values(version=SCHEMA_VERSION))


def storable_text(text: str | None) -> str | None:
    """A key or reason as every state store keeps it: a NUL character (a value quoted from the
    warehouse) is written `\\x00`, which PostgreSQL's text refuses to hold."""
    return text.replace("\x00", "\\x00") if text and "\x00" in text else text


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    # Checkpoint the WAL every ~40 MB instead of 4 MB: a checkpoint batch writes 5000
    # snapshot rows over many pages, so the default checkpoints (and fsyncs) at most commits.
    cursor.execute("PRAGMA wal_autocheckpoint=10000")
    cursor.close()


def _prepare_sqlite_file(database: Path, *, create_folder: bool = True) -> None:
    """Create the folder of a SQLite state file, or say in one sentence why it cannot be.

    Without `create_folder` nothing is created: only a file standing where a folder should
    be, or a folder where the database should be, is reported (for commands that only read)."""
    folder = database.parent
    try:
        if create_folder:
            new_folder = not folder.exists()
            folder.mkdir(parents=True, exist_ok=True)
            if new_folder:  # the store holds customers' emails and phones: owner only
                folder.chmod(0o700)
        elif _file_in_the_way(folder) is not None:
            raise NotADirectoryError
    except (FileExistsError, NotADirectoryError):
        blocker = _file_in_the_way(folder) or folder
        raise StateError(
            f"cannot create the state database `{database}` ([state] url): `{blocker}` is a "
            "file, not a folder; pick another path in [state] url, or move that file away"
        ) from None
    except PermissionError as error:
        denied = error.filename or folder
        raise StateError(
            f"cannot create the folder `{denied}` for the state database `{database}` ([state] "
            "url): permission denied; pick a path winback may write to in [state] url, or fix "
            "the permissions of that folder's parent"
        ) from None
    except OSError as error:
        raise StateError(
            f"cannot create the folder `{error.filename or folder}` for the state database "
            f"`{database}` ([state] url): {error.strerror}; pick another path in [state] url"
        ) from None
    if database.is_dir():
        raise StateError(
            f"the state database `{database}` ([state] url) is a folder; name a file in it "
            f"instead, e.g. sqlite:///{database / 'state.db'}"
        )
    if create_folder:  # a new file readable by its owner only (SQLite gives its -wal the same)
        with contextlib.suppress(FileExistsError, PermissionError):
            os.close(os.open(database, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))


def _file_in_the_way(folder: Path) -> Path | None:
    """The file standing where `folder` or one of its parents should be, if any."""
    return next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)


SCHEMA_LOCK_KEY = 0x77696E6261636B  # "winback"
"""The PostgreSQL advisory lock (`pg_advisory_xact_lock`) held while the schema is checked and
created or migrated."""


def create_state_engine(url: sa.URL) -> sa.Engine:
    """An engine for the state store; statement parameters (customer identifiers) never go into
    an error's text."""
    engine = sa.create_engine(
        with_installed_driver(url), connect_args=connect_timeout_args(url), hide_parameters=True
    )
    if engine.dialect.name == "sqlite":
        sa.event.listen(engine, "connect", _sqlite_pragmas)
    return engine


PERMISSION_HINT = (
    "grant the state role SELECT, INSERT, UPDATE, DELETE on winback's tables, TEMPORARY on the "
    "database (each run compares in temporary tables) and CREATE on the schema for the first run"
)


def state_failure(url: str, error: BaseException, *, opening: bool = False) -> StateError:
    """A StateError for a statement of the state store that failed (`error`: a DBAPIError, or
    the driver's own error): the database's first line (never SQLAlchemy's statement and
    parameters, which hold customer identifiers) and what to do about it."""
    problem = first_line(error)
    lowered = problem.lower()
    original = getattr(error, "orig", None) or error
    sqlstate = getattr(original, "sqlstate", None)
    lost = getattr(error, "connection_invalidated", False) or any(
        kind.__name__ == "OperationalError" for kind in type(original).__mro__
    )
    sqlite = url.startswith("sqlite")
    if "temporary tables" in lowered and (sqlstate == "42501" or "permission denied" in lowered):
        hint = (
            "grant the state role TEMPORARY on the state database (GRANT TEMPORARY ON DATABASE "
            "... TO ...): each run compares the segment with the snapshot in temporary tables"
        )
    elif sqlstate == "42501" or "permission denied" in lowered:
        hint = PERMISSION_HINT
    elif "statement timeout" in lowered or "lock timeout" in lowered:
        hint = (
            "a statement ran longer than the state database allows (its statement_timeout or "
            "lock_timeout for this role); raise it for the role running winback, or in [state] "
            "url with `?options=-cstatement_timeout%3D0`"
        )
        if not opening:
            hint += "; the next run sends what this one could not record"
    elif "readonly database" in lowered or "read-only" in lowered:
        hint = "make the state database writable by the user running winback"
    elif sqlite and "database is locked" in lowered:
        hint = (
            "another process kept the state file locked longer than 30 seconds (a long "
            "`--full-resync` plan, or a tool holding the file open); retry, and for many large "
            "syncs in parallel use a PostgreSQL state store"
        )
        if not opening:
            hint += "; the next run sends what this one could not record"
    elif sqlite and ("disk is full" in lowered or "disk i/o" in lowered):
        hint = "free space on the disk of the state file (or move it with [state] url)"
        if not opening:
            hint += "; the next run sends what this one could not record"
    elif sqlite and "unable to open database file" in lowered:
        hint = (
            "check [state] url: its folder must exist or be creatable, and be readable and "
            "writable by the user running winback"
        )
    elif lost:
        hint = "check [state] url and that the database server is up and reachable"
        if not opening:  # batches in doubt are settled by the next run (`settle_unconfirmed`)
            hint += "; the next run sends what this one could not record"
    else:
        hint = "check [state] url"
    if opening:
        return StateError(f"cannot open the state store `{redact_url(url)}`: {problem}; {hint}")
    return StateError(f"the state store `{redact_url(url)}` failed: {problem}; {hint}")


def raised_through(error: BaseException, engine: sa.Engine) -> bool:
    """Whether `error` was raised while `engine` or one of its connections was at work: the
    innermost frame of its traceback holding an engine or a connection decides (the state store
    and the warehouse may both be PostgreSQL, with the same error classes)."""
    verdict = False
    frame = error.__traceback__
    while frame is not None:
        names = frame.tb_frame.f_locals
        owner = names.get("self")
        held = (
            [owner]
            if isinstance(owner, sa.Connection | sa.Engine)
            else [v for v in names.values() if isinstance(v, sa.Connection | sa.Engine)]
        )
        if held:
            verdict = any(
                item is engine or (isinstance(item, sa.Connection) and item.engine is engine)
                for item in held
            )
        frame = frame.tb_next
    return verdict


def is_database_error(error: BaseException, engine: sa.Engine) -> bool:
    """Whether `error` is a database error of `engine`'s driver, wrapped by SQLAlchemy or raw
    (statements sent through the driver itself, such as `_copy_rows`)."""
    dbapi = engine.dialect.loaded_dbapi
    return isinstance(error, (sa.exc.DBAPIError, dbapi.Error))


@functools.cache
def pid_namespace() -> str | None:
    """This process's PID namespace, as Linux names it ("pid:[4026531836]"): a pid means a
    process only in its own namespace (containers sharing a host name each have theirs).
    None where it cannot be read (another system, no /proc)."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class StateStore:
    """Opens (and creates or migrates) the state database."""

    @classmethod
    def for_reading(cls, url: str) -> StateStore:
        """The store for commands that only read it (`sync plan`, `status`, `history`...).

        Nothing is created or migrated, on any database: where winback's tables are not there
        yet (a SQLite file that does not exist, an empty PostgreSQL database), an empty
        in-memory store stands in for them (nothing was synced yet)."""
        try:
            parsed = parse_database_url(url)
        except ValueError:
            return cls(url)  # which says what is wrong with the URL
        database = parsed.database
        if (
            parsed.get_backend_name() == "sqlite"
            and database
            and database != ":memory:"
            and not Path(database).exists()
        ):
            _prepare_sqlite_file(Path(database), create_folder=False)
            return cls("sqlite://")
        store = cls(url, read_only=True)
        if not store._has_tables:
            store.dispose()
            return cls("sqlite://")
        return store

    def __init__(self, url: str, *, read_only: bool = False):
        """`read_only`: check the schema there but neither create nor migrate it (see
        `for_reading`)."""
        self.url = url
        self.read_only = read_only
        self._has_tables = True
        try:
            parsed = parse_database_url(url)
        except ValueError as error:
            raise StateError(f"cannot use state URL ({error}); check [state] url") from None
        try:
            database = parsed.database
            if (
                not read_only
                and parsed.get_backend_name() == "sqlite"
                and database
                and database != ":memory:"
            ):
                _prepare_sqlite_file(Path(database))
            self.engine = create_state_engine(parsed)
        except (sa.exc.ArgumentError, sa.exc.NoSuchModuleError, ImportError) as error:
            raise StateError(
                f"cannot use state URL `{redact_url(url)}`: {first_line(error)}; check [state] "
                "url and install the driver for this database (e.g. pip install 'winback[postgres]')"
            ) from None
        try:
            self._ensure_schema()
        except BaseException:
            self.engine.dispose()  # nobody else holds the engine to close its connection
            raise

    def _ensure_schema(self) -> None:
        """Create the schema, or migrate an older one, in one transaction. The transaction
        first takes an advisory lock (PostgreSQL) or the write lock (SQLite), so that runs
        starting together against a new database wait for the first to create the tables
        instead of creating them at the same time ("table ... already exists"), then see them."""
        try:
            with self.engine.begin() as connection:
                if connection.dialect.name == "postgresql" and not self.read_only:
                    connection.execute(
                        sa.select(sa.func.pg_advisory_xact_lock(SCHEMA_LOCK_KEY))
                    ).all()
                elif not self.read_only:  # SQLite: the write lock, for the same reason
                    StateStore.start_writing(connection)
                version = self._check_existing_schema(connection)
                if self.read_only:
                    self._check_readable(connection, version)
                    return
                metadata.create_all(connection)
                if version is None:
                    connection.execute(schema_info.insert().values(version=SCHEMA_VERSION))
                elif version < SCHEMA_VERSION:
                    _migrate(connection, version)
        except sa.exc.DBAPIError as error:
            raise state_failure(self.url, error, opening=True) from None

    def _check_readable(self, connection: sa.Connection, version: int | None) -> None:
        """For reading only: note whether winback's tables are there at all; refuse a store
        that only a migration would make readable (nothing is migrated when only reading)."""
        existing = set(sa.inspect(connection).get_table_names())
        self._has_tables = any(table.name in existing for table in metadata.sorted_tables)
        if not self._has_tables:
            return
        missing = [t.name for t in metadata.sorted_tables if t.name not in existing]
        if version is not None and version < SCHEMA_VERSION:
            found = f"has schema version {version}, older than this winback's ({SCHEMA_VERSION})"
        elif missing:
            found = f"has no table `{missing[0]}`"
        else:
            return
        raise StateError(
            f"the state store `{redact_url(self.url)}` ([state] url) {found}, and commands that "
            "only read never change it; the next `winback sync run` upgrades it"
        )

    def _check_existing_schema(self, connection: sa.Connection) -> int | None:
        """The version of the store there already (None: new), before anything is written.

        Refuses a store from a newer winback, and a database whose tables of the same names
        belong to another application (a `runs` table without winback's columns): winback
        would otherwise add its own tables to that database and fail mid-run."""
        inspector = sa.inspect(connection)
        existing = set(inspector.get_table_names())
        found = [table for table in metadata.sorted_tables if table.name in existing]
        if not found:
            return None
        columns = {t.name: {c["name"] for c in inspector.get_columns(t.name)} for t in found}
        version = None
        if "version" in columns.get(schema_info.name, set()):
            version = connection.execute(sa.select(sa.func.max(schema_info.c.version))).scalar()
        if version is not None and version > SCHEMA_VERSION:
            raise StateError(
                f"the state store `{redact_url(self.url)}` has schema version {version}, "
                f"newer than this winback ({SCHEMA_VERSION}); upgrade winback"
            )
        mismatches = []
        for table in found:
            later = {
                column
                for since, name, column in MIGRATED_COLUMNS
                if name == table.name and version is not None and version < since
            }
            missing = [c.name for c in table.columns if c.name not in columns[table.name] | later]
            if missing:
                shown = ", ".join(f"`{name}`" for name in missing[:3])
                more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
                mismatches.append(f"table `{table.name}` has no column {shown}{more}")
        if mismatches:
            raise StateError(
                f"the state store `{redact_url(self.url)}` ([state] url) is not a winback "
                f"database: {'; '.join(mismatches)}, so those tables belong to another "
                "application; point [state] url at winback's own database (a new file such as "
                "sqlite:///.winback/state.db, or an empty PostgreSQL database)"
            )
        return version

    def connect(self) -> sa.Connection:
        return self.engine.connect()

    def dispose(self) -> None:
        self.engine.dispose()

    # -- locks -------------------------------------------------------------------------------

    def acquire_lock(self, sync: str, run_id: str) -> None:
        """Take the sync's lock or raise LockedError; stale locks are taken over."""
        now = utcnow()
        host, pid = socket.gethostname(), os.getpid()
        with self.engine.begin() as connection:
            held = connection.execute(sa.select(locks).where(locks.c.sync == sync)).first()
            if held is not None:
                stale_because = self._stale_because(held, now)
                if stale_because is None:
                    elsewhere = (
                        " (in another PID namespace)" if self._other_pid_namespace(held) else ""
                    )
                    raise LockedError(
                        sync,
                        f"run {held.run_id}, process {held.pid} on {held.host}{elsewhere}, "
                        f"since {held.acquired_at:%Y-%m-%d %H:%M:%S} UTC",
                    )
                connection.execute(
                    locks.delete().where(locks.c.sync == sync, locks.c.run_id == held.run_id)
                )
                # The previous run died holding the lock (killed, machine lost): say so.
                connection.execute(
                    runs.update()
                    .where(runs.c.run_id == held.run_id, runs.c.status == "running")
                    .values(status="interrupted", error=stale_because)
                )
        try:
            with self.engine.begin() as connection:
                connection.execute(
                    locks.insert().values(
                        sync=sync,
                        run_id=run_id,
                        host=host,
                        pid=pid,
                        pid_namespace=pid_namespace(),
                        acquired_at=now,
                        heartbeat_at=now,
                    )
                )
        except sa.exc.IntegrityError:
            raise LockedError(sync, "another process took the lock at the same moment") from None

    @staticmethod
    def _stale_because(held: sa.Row[Any], now: dt.datetime) -> str | None:
        """Why the lock row `held` no longer stands for a running run (the run's error when it
        is taken over), or None while it may.

        A running run refreshes its heartbeat every minute (`lock_kept_alive`), so one older
        than LOCK_TTL is stale on any host, whatever process has its pid now. Before that, a
        lock taken on this host in this PID namespace is stale at once when its process is
        gone (a `kill -9`: the next run starts at once). Elsewhere the pid names another
        process or none (another machine, or a container sharing this host name), so only the
        heartbeat decides. A row without a namespace (taken where it cannot be read, or by a
        winback before schema 4) is judged by host and pid."""
        heartbeat: dt.datetime = held.heartbeat_at
        if now - heartbeat > LOCK_TTL:
            minutes = int(LOCK_TTL.total_seconds() // 60)
            return f"the run stopped refreshing its lock (no heartbeat for over {minutes} minutes)"
        if held.host != socket.gethostname() or StateStore._other_pid_namespace(held):
            return None
        return None if _pid_alive(held.pid) else "the process died during the run"

    @staticmethod
    def _other_pid_namespace(held: sa.Row[Any]) -> bool:
        """Whether the lock row `held` was taken on this host in a PID namespace other than
        this process's (a row that does not say is taken to be ours)."""
        return (
            held.host == socket.gethostname()
            and held.pid_namespace is not None
            and held.pid_namespace != pid_namespace()
        )

    def heartbeat(self, connection: sa.Connection, sync: str, run_id: str) -> None:
        connection.execute(
            locks.update()
            .where(locks.c.sync == sync, locks.c.run_id == run_id)
            .values(heartbeat_at=utcnow())
        )

    @contextlib.contextmanager
    def lock_kept_alive(
        self, sync: str, run_id: str, *, every_s: float = HEARTBEAT_EVERY_S
    ) -> Iterator[None]:
        """Refresh the lock's heartbeat from a thread of its own while the block runs, so a
        long segment query or plan (no checkpoint for more than LOCK_TTL) does not let a run on
        another host take the lock over. A heartbeat that fails (the database busy or gone) is
        only logged: the run's own statements report such problems."""
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(every_s):
                try:
                    with self.engine.begin() as connection:
                        self.heartbeat(connection, sync, run_id)
                except sa.exc.SQLAlchemyError as error:
                    log.debug("%s: heartbeat of the lock failed: %s", sync, first_line(error))

        thread = threading.Thread(target=beat, name=f"winback-heartbeat-{sync}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=5)

    def release_lock(self, sync: str, run_id: str) -> None:
        with self.engine.begin() as connection:
            connection.execute(locks.delete().where(locks.c.sync == sync, locks.c.run_id == run_id))

    def lock_holder(self, sync: str, *, live_only: bool = False) -> sa.Row[Any] | None:
        """Who holds the sync's lock; with `live_only`, None for a stale lock (its heartbeat is
        older than LOCK_TTL, or its process on this host and PID namespace is gone), which the
        next run takes over (`_stale_because`)."""
        with self.engine.connect() as connection:
            held = connection.execute(sa.select(locks).where(locks.c.sync == sync)).first()
        if held is not None and live_only and self._stale_because(held, utcnow()) is not None:
            return None
        return held

    # -- runs --------------------------------------------------------------------------------

    def start_run(self, sync: str, run_id: str) -> None:
        values: dict[str, Any] = dict.fromkeys(RUN_COUNT_COLUMNS, 0)
        with self.engine.begin() as connection:
            connection.execute(
                runs.insert().values(
                    run_id=run_id, sync=sync, status="running", started_at=utcnow(), **values
                )
            )

    def finish_run(
        self,
        run_id: str,
        *,
        status: str,
        counts: dict[str, int],
        duration_s: float,
        error: str | None,
    ) -> None:
        with self.engine.begin() as connection:
            connection.execute(
                runs.update()
                .where(runs.c.run_id == run_id)
                .values(
                    status=status,
                    finished_at=utcnow(),
                    duration_s=round(duration_s, 3),
                    error=error,
                    **counts,
                )
            )

    @staticmethod
    def start_writing(connection: sa.Connection) -> None:
        """Begin a transaction that will write, on a connection that may have read before.

        SQLite (WAL): a transaction that read, then writes after another process committed,
        fails at once with "database is locked" (its snapshot is stale; waiting cannot help),
        which made syncs run in parallel on one state file fail. So the reads' transaction
        ends here (temporary tables stay) and the write lock is taken now, waiting up to the
        busy timeout for another run's checkpoint. Other databases: nothing to do."""
        if connection.dialect.name != "sqlite":
            return
        driver = connection.connection.dbapi_connection  # sqlite3 begins on its own, at DML
        if driver is not None and driver.in_transaction:
            driver.commit()
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    @staticmethod
    def record_progress(connection: sa.Connection, run_id: str, counts: dict[str, int]) -> None:
        """A running run's counts so far (in the caller's transaction: a checkpoint's)."""
        connection.execute(runs.update().where(runs.c.run_id == run_id).values(**counts))

    def prune_history(self, sync: str, *, keep_runs: int, keep_issue_runs: int) -> None:
        """Keep the newest `keep_runs` runs of a sync, and the row issues of its newest
        `keep_issue_runs` runs only (never more than `keep_runs`).

        The issues of an older run are replaced by one row of kind PRUNED_ISSUES, one
        transaction per run, so a store that kept many runs' issues is thinned a run at a time
        (its first prune after an upgrade may delete millions of rows)."""
        keep_issue_runs = min(keep_runs, keep_issue_runs)
        with self.engine.connect() as connection:
            older = (
                connection.execute(
                    sa.select(runs.c.run_id)
                    .where(runs.c.sync == sync)
                    .order_by(runs.c.started_at.desc())
                    .offset(keep_issue_runs)
                )
                .scalars()
                .all()
            )
        kept_without_issues = older[: keep_runs - keep_issue_runs]
        forgotten = older[keep_runs - keep_issue_runs :]
        if forgotten:
            with self.engine.begin() as connection:
                for chunk in in_lists(forgotten):
                    connection.execute(row_issues.delete().where(row_issues.c.run_id.in_(chunk)))
                    connection.execute(runs.delete().where(runs.c.run_id.in_(chunk)))
        for chunk in in_lists(kept_without_issues):
            with self.engine.connect() as connection:
                with_issues = self._runs_with_issues(connection, chunk)
            for run_id in with_issues:
                with self.engine.begin() as connection:
                    connection.execute(row_issues.delete().where(row_issues.c.run_id == run_id))
                    connection.execute(
                        row_issues.insert().values(
                            run_id=run_id,
                            sync=sync,
                            kind=PRUNED_ISSUES,
                            reason="row issues pruned ([state] keep_issue_runs)",
                        )
                    )

    @staticmethod
    def _runs_with_issues(connection: sa.Connection, run_ids: Sequence[str]) -> list[str]:
        """Those of `run_ids` that still have row issues (not only the pruned marker)."""
        has_issues = sa.exists().where(
            row_issues.c.run_id == runs.c.run_id, row_issues.c.kind != PRUNED_ISSUES
        )
        query = sa.select(runs.c.run_id).where(runs.c.run_id.in_(run_ids), has_issues)
        return list(connection.execute(query).scalars())

    def issues_pruned(self, run_id: str) -> bool:
        """Whether the run's row issues were pruned (`prune_history`): it had some, and only
        its counts in `runs` remain."""
        query = sa.select(row_issues.c.id).where(
            row_issues.c.run_id == run_id, row_issues.c.kind == PRUNED_ISSUES
        )
        with self.engine.connect() as connection:
            return connection.execute(query.limit(1)).first() is not None

    def history(self, sync: str, limit: int) -> list[sa.Row[Any]]:
        with self.engine.connect() as connection:
            return list(
                connection.execute(
                    sa.select(runs)
                    .where(runs.c.sync == sync)
                    .order_by(runs.c.started_at.desc())
                    .limit(limit)
                )
            )

    def issues(self, run_id: str, limit: int | None = 20) -> list[sa.Row[Any]]:
        """A run's row issues in the order they were recorded; `limit` None: all of them."""
        return list(self.each_issue(run_id, limit))

    def each_issue(self, run_id: str, limit: int | None = None) -> Iterator[sa.Row[Any]]:
        """`issues`, read a page at a time as they are consumed (a run may have millions)."""
        query = (
            sa.select(row_issues)
            .where(row_issues.c.run_id == run_id, row_issues.c.kind != PRUNED_ISSUES)
            .order_by(row_issues.c.id)
        )
        with self.engine.connect() as connection:
            result = connection.execution_options(yield_per=ISSUES_PAGE_ROWS).execute(
                query if limit is None else query.limit(limit)
            )
            yield from result

    # -- snapshot ----------------------------------------------------------------------------

    def audience_size(self, connection: sa.Connection | None, sync: str) -> int:
        """Members winback added to the destination, counting those a stopped run may have
        added or failed to remove (`unconfirmed`); rejected and skipped rows do not count."""
        query: sa.Executable = (
            sa.select(sa.func.count())
            .select_from(snapshot)
            .where(snapshot.c.sync == sync, snapshot.c.status.in_(MEMBER_STATUSES))
        )
        if self.engine.dialect.name == "sqlite":
            # A scan reads the status next to the key; through the primary-key index each row
            # costs a table lookup (0.1 s instead of 0.16-0.23 s for 500k members).
            query = sa.text(
                "SELECT count(*) FROM snapshot NOT INDEXED WHERE sync = :sync "
                "AND status IN ('member', 'unconfirmed')"
            ).bindparams(sync=sync)
        if connection is not None:
            return int(connection.execute(query).scalar_one())
        with self.engine.connect() as own:
            return int(own.execute(query).scalar_one())

    def member_counts(self, sync: str) -> tuple[int, int]:
        """(members the destination acknowledged, rows it may or may not hold): the latter are
        settled `unconfirmed` snapshot rows and the keys of batches still noted in flight (a
        stopped run's, or the running run's), a member being removed among them."""
        with self.engine.connect() as connection:
            rows = connection.execute(
                sa.select(snapshot.c.status, sa.func.count())
                .where(snapshot.c.sync == sync, snapshot.c.status.in_(MEMBER_STATUSES))
                .group_by(snapshot.c.status)
            ).all()
            counts: dict[str, int] = {status: int(n) for status, n in rows}
            noted = connection.execute(
                sa.select(in_flight.c.members).where(in_flight.c.sync == sync)
            ).scalars()
            in_flight_keys = sorted(
                {member[0] for batch in noted for member in orjson.loads(batch)}
            )
            being_removed = StateStore.snapshot_keys_among(
                connection, sync, in_flight_keys, statuses=("member",)
            )
        members = counts.get("member", 0) - len(being_removed)
        return members, counts.get("unconfirmed", 0) + len(in_flight_keys)

    def reset(self, sync: str) -> int:
        """Forget a sync's snapshot (and the batches a stopped run left unconfirmed); returns
        how many snapshot rows were forgotten."""
        with self.engine.begin() as connection:
            connection.execute(in_flight.delete().where(in_flight.c.sync == sync))
            connection.execute(sync_targets.delete().where(sync_targets.c.sync == sync))
            result = connection.execute(snapshot.delete().where(snapshot.c.sync == sync))
            return int(result.rowcount or 0)

    def known_syncs(self) -> set[str]:
        """Names of the syncs with anything in the store (a snapshot or a run)."""
        with self.engine.connect() as connection:
            names = set(connection.execute(sa.select(runs.c.sync).distinct()).scalars())
            names.update(connection.execute(sa.select(snapshot.c.sync).distinct()).scalars())
        return names

    def forget_sync(self, sync: str) -> int:
        """Forget everything of a sync the config no longer has: its snapshot (`reset`), runs,
        row issues and lock; returns how many snapshot rows were forgotten."""
        forgotten = self.reset(sync)
        with self.engine.begin() as connection:
            connection.execute(row_issues.delete().where(row_issues.c.sync == sync))
            connection.execute(runs.delete().where(runs.c.sync == sync))
            connection.execute(locks.delete().where(locks.c.sync == sync))
        return forgotten

    def starts_over(self, sync: str) -> bool:
        """Whether the sync's next run is a full sync: nothing in its snapshot and no target
        recorded (never run, or `sync reset`)."""
        with self.engine.connect() as connection:
            for table in (snapshot, sync_targets):
                if connection.execute(
                    sa.select(table.c.sync).where(table.c.sync == sync).limit(1)
                ).first():
                    return False
        return True

    def check_target(
        self, connection: sa.Connection, sync: str, target: str, *, record: bool = True
    ) -> str | None:
        """Compare where the sync sends now with where its snapshot was sent; with `record`,
        keep `target` when nothing was sent yet (or nothing is left: the rows refused or
        skipped for another target are then decided again). Returns the recorded target when
        it differs while the old one has, or may have, members (the caller refuses the run);
        the caller commits."""
        recorded = connection.execute(
            sa.select(sync_targets.c.target).where(sync_targets.c.sync == sync)
        ).scalar()
        if recorded == target:
            return None
        if recorded is not None and (
            self.audience_size(connection, sync) > 0
            or StateStore.unconfirmed_in_flight(connection, sync) > 0
        ):
            return str(recorded)
        if not record:
            return None
        if recorded is not None:  # rows refused or skipped for the old target: decided again
            connection.execute(
                snapshot.delete().where(
                    snapshot.c.sync == sync, snapshot.c.status.not_in(MEMBER_STATUSES)
                )
            )
        connection.execute(sync_targets.delete().where(sync_targets.c.sync == sync))
        connection.execute(sync_targets.insert().values(sync=sync, target=target, since=utcnow()))
        return None

    # -- batches in flight -------------------------------------------------------------------

    @staticmethod
    def record_in_flight(
        connection: sa.Connection,
        *,
        sync: str,
        run_id: str,
        batch: int,
        action: str,
        members: Sequence[tuple[str, str, str, str | None]],
    ) -> None:
        """Note a batch about to be sent: (key, identity_fp, identifiers text, platform_id) of
        each member, as sent. The caller commits before sending it."""
        connection.execute(
            in_flight.insert().values(
                sync=sync,
                run_id=run_id,
                batch=batch,
                action=action,
                members=orjson.dumps(members).decode(),
            )
        )

    @staticmethod
    def forget_in_flight(connection: sa.Connection, *, sync: str, run_id: str, batch: int) -> None:
        """The batch's outcome is recorded (or it was refused whole and is split): it is no
        longer in doubt."""
        connection.execute(
            in_flight.delete().where(
                in_flight.c.sync == sync, in_flight.c.run_id == run_id, in_flight.c.batch == batch
            )
        )

    @staticmethod
    def unconfirmed_in_flight(connection: sa.Connection, sync: str) -> int:
        """How many rows stopped runs left in flight (what `settle_unconfirmed` would settle,
        counting a key sent twice twice); nothing is written."""
        batches = connection.execute(
            sa.select(in_flight.c.members).where(in_flight.c.sync == sync)
        ).scalars()
        return sum(len(orjson.loads(members)) for members in batches)

    @staticmethod
    def settle_unconfirmed(connection: sa.Connection, sync: str) -> int:
        """Turn the batches an earlier run sent without recording their outcome (it was killed
        or stopped, or the batch failed) into `unconfirmed` snapshot rows; returns how many.

        The destination may or may not have applied such a batch, so neither the old snapshot
        row nor its absence can be trusted: an unconfirmed row keeps what was last sent (to
        remove it again) and an empty raw fingerprint, which no segment row matches, so the
        planner sees the key again: still in the segment, it is added again (adds are
        idempotent); gone, it is removed (mirror mode). Runs under the sync's lock, before
        planning; the caller commits.
        """
        batches = connection.execute(
            sa.select(in_flight.c.members)
            .where(in_flight.c.sync == sync)
            .order_by(in_flight.c.run_id, in_flight.c.batch)
        ).scalars()
        sent: dict[str, tuple[str, str, str | None]] = {}
        for members in batches:
            for key, identity_fp, identifiers, platform_id in orjson.loads(members):
                sent[key] = (identity_fp, identifiers, platform_id)  # the last sending counts
        if not sent:
            return 0
        present = StateStore.snapshot_keys_among(connection, sync, list(sent))
        changed = [
            {
                "b_key": key,
                "b_identity_fp": identity_fp,
                "b_identifiers": identifiers,
                "b_platform_id": platform_id,
            }
            for key, (identity_fp, identifiers, platform_id) in sent.items()
            if key in present
        ]
        if changed:
            connection.execute(
                snapshot.update()
                .where(snapshot.c.sync == sync, snapshot.c.key == sa.bindparam("b_key"))
                .values(
                    status="unconfirmed",
                    raw_fp="",
                    fields_fp="",
                    identity_fp=sa.bindparam("b_identity_fp"),
                    identifiers=sa.bindparam("b_identifiers"),
                    platform_id=sa.func.coalesce(
                        sa.bindparam("b_platform_id", type_=sa.String), snapshot.c.platform_id
                    ),
                    reason=None,
                ),
                changed,
            )
        unknown = (None, None, None)  # first_added_at, last_sent_at, reason
        added = [
            (sync, key, "unconfirmed", "", identity_fp, "", identifiers, platform_id, *unknown)
            for key, (identity_fp, identifiers, platform_id) in sent.items()
            if key not in present
        ]
        insert_rows(connection, snapshot, added)
        connection.execute(in_flight.delete().where(in_flight.c.sync == sync))
        return len(sent)

    @staticmethod
    def record_issues(
        connection: sa.Connection, *, run_id: str, sync: str, issues: Iterable[RowIssue]
    ) -> None:
        rows = [
            (run_id, sync, i.kind, i.action, storable_text(i.key), storable_text(i.reason[:2000]))
            for i in issues
        ]
        if not rows:
            return
        if connection.dialect.name == "sqlite":  # the driver's executemany: ~5x less CPU
            connection.exec_driver_sql(
                "INSERT INTO row_issues (run_id, sync, kind, action, key, reason) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                rows,
            )
            return
        names = ("run_id", "sync", "kind", "action", "key", "reason")
        connection.execute(
            row_issues.insert(), [dict(zip(names, row, strict=True)) for row in rows]
        )

    @staticmethod
    def delete_snapshot_keys(connection: sa.Connection, sync: str, keys: Sequence[str]) -> None:
        for some in in_lists(keys):
            connection.execute(
                snapshot.delete().where(snapshot.c.sync == sync, snapshot.c.key.in_(some))
            )

    @staticmethod
    def snapshot_keys_among(
        connection: sa.Connection,
        sync: str,
        keys: Sequence[str],
        statuses: Sequence[str] | None = None,
    ) -> set[str]:
        """Those of `keys` the sync's snapshot holds (with one of `statuses`, when given)."""
        found: set[str] = set()
        for some in in_lists(keys):
            query = sa.select(snapshot.c.key).where(
                snapshot.c.sync == sync, snapshot.c.key.in_(some)
            )
            if statuses is not None:
                query = query.where(snapshot.c.status.in_(statuses))
            found.update(connection.execute(query).scalars())
        return found
