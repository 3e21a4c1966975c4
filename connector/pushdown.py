"""Finds a segment's changes inside the warehouse, so unchanged rows never reach Python.

The state-database diff (`connector.diff`) stages every segment row there; its cost follows the
segment. When the warehouse can run the comparison itself (DuckDB, the embedded default, and
PostgreSQL), the sync's snapshot fingerprints (key, raw_fp) are copied into a temporary table of
the warehouse connection instead (page by page: as NumPy columns DuckDB scans in place, by COPY
into PostgreSQL), and one pass of the segment query joined with them leaves in a temporary
table what the planner needs:

- the rows that are new or whose raw fingerprint changed, in segment order (PostgreSQL: the
  order the query returned them in);
- the snapshot keys that left the segment;
- duplicate keys (the first row of each is kept) and rows whose key is null, blank or too long;
- the number of rows.

With nothing to compare against (no snapshot yet, `--full-resync`) there is no join and nothing
is materialised: every row is streamed with its key text and fingerprint (`every_row`) and the
state database finds duplicates and departures, as for other warehouses.

The raw fingerprint is computed by the warehouse: its hash of the mapped columns and of a seed
naming the mapping (DuckDB's `hash`; PostgreSQL's `hashtextextended` of the row's text, both
64-bit), so a changed mapping re-checks every row. It is not the state database's
fingerprint (a SHA-1 of the staged JSON): switching between the two re-checks every row once,
and rows whose normalised identifiers and fields did not change are not sent again.

Only temporary objects of this connection are created; a DuckDB warehouse is opened read-only.
A PostgreSQL connection that may not create them (a read replica, a user without the TEMPORARY
privilege) raises TemporaryTablesRefused before any row is read, and the caller compares in the
state database instead.
DuckDB's memory is bounded by its `memory_limit` (96MB unless the warehouse URL sets one, e.g.
``duckdb:///w.duckdb?memory_limit=256MB&temp_directory=/tmp/duckdb``: it then spills to disk).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.expression import ClauseElement, Executable

from connector.errors import WarehouseError
from connector.segments import segment_subquery
from connector.state import insert_rows
from connector.warehouse import query_problem

PUSHDOWN_DIALECTS = frozenset({"duckdb", "postgresql"})
MAX_KEY_LENGTH = 500
"""Longest key the state store holds (snapshot.key is VARCHAR(500))."""
KEY_COLUMN = "winback_key"
FP_COLUMN = "winback_fp"
CHANGED_COLUMN = "winback_changed"
ROW_COLUMN = "winback_row"
"""The segment row's number in the order the query returns rows, given before the join with the
snapshot: the join's output (and so `rowid` or `ctid`) follows whichever side the warehouse
hashes, and a duplicate key's first row would then differ from the one the first sync sent
(~0.05 s for 500k rows on DuckDB, ~0.5 s on PostgreSQL)."""

_SEGMENT = "winback_segment"
_SNAPSHOT = "winback_snapshot"
_SNAPSHOT_PAGE = "winback_snapshot_page"
_DUPLICATES = "winback_duplicates"
_POSTGRES_SETTINGS = (
    # Accepted only before the session's first temporary table (a pooled connection may have
    # had one): first, so that refusing it rolls back nothing else.
    "SET temp_buffers = '256MB'",
    "SET LOCAL work_mem = '64MB'",  # this transaction only
)
_ALLOCATOR_SETTINGS = ("allocator_flush_threshold", "allocator_bulk_deallocation_flush_threshold")
KEY_WHITESPACE = " \t\n\r\x0b\x0c"
"""What a blank key consists of (the warehouse's test and Python's `str.strip` agree)."""


class TemporaryTablesRefused(WarehouseError):
    """The warehouse connection may not create temporary tables (a PostgreSQL read replica, a
    user without the TEMPORARY privilege): the comparison has to run in the state database."""


def supports_pushdown(engine: sa.Engine) -> bool:
    """Whether this warehouse can compute the diff itself."""
    return engine.dialect.name in PUSHDOWN_DIALECTS


def valid_key_sql(key: str, dialect: str = "duckdb") -> str:
    """Condition: the key text is not null, not blank, not too long and holds no NUL character
    (which a PostgreSQL state store cannot keep; PostgreSQL text never holds one). Blank is
    tested with a regular expression: in DuckDB ~6x cheaper than `trim` over 500k keys."""
    blank = (
        f"regexp_full_match({key}, '[{KEY_WHITESPACE}]*')"
        if dialect == "duckdb"
        else f"{key} ~ '^[{KEY_WHITESPACE}]*$'"
    )
    nul = f" AND strpos({key}, chr(0)) = 0" if dialect == "duckdb" else ""
    return f"({key} IS NOT NULL AND length({key}) <= {MAX_KEY_LENGTH} AND NOT {blank}{nul})"


class _CreateTempTableAs(Executable, ClauseElement):
    """`CREATE TEMP TABLE name AS <select>`, bind parameters kept."""

    inherit_cache = False

    def __init__(self, name: str, select: sa.Select[Any]):
        self.name = name
        self.select = select


@compiles(_CreateTempTableAs)
def _compile_create_temp_table_as(element: _CreateTempTableAs, compiler: Any, **kw: Any) -> str:
    return f"CREATE TEMP TABLE {element.name} AS {compiler.process(element.select, **kw)}"


@dataclass(frozen=True)
class BadKeyRow:
    """A segment row that cannot be synced because of its key."""

    key: str | None
    """The key, cut to MAX_KEY_LENGTH characters; None when null."""
    length: int


@dataclass(frozen=True)
class KeyCensus:
    """The segment's number of rows and its duplicate keys (key text → number of rows)."""

    rows: int
    duplicates: dict[str, int]


def fingerprint_seed(mapping: Sequence[tuple[str, str, str]]) -> str:
    """Text naming the mapping: (kind, name, column) in the order they are fingerprinted."""
    return ";".join(f"{kind}:{name}={column}" for kind, name, column in mapping)


class WarehouseDiff:
    """The changes of one segment against one snapshot, computed by the warehouse.

    `mapping` lists (kind, name, column): kind ``i`` for identifiers, ``f`` for fields. The
    changed rows carry the mapped columns (`columns`), then `winback_key` and `winback_fp`.
    """

    def __init__(
        self,
        connection: sa.Connection,
        query: sa.Executable,
        *,
        segment_columns: Sequence[str],
        key: str,
        mapping: Sequence[tuple[str, str, str]],
        where_to_fix: str,
    ):
        self.connection = connection
        self.where_to_fix = where_to_fix
        self.columns = list(dict.fromkeys(column for _, _, column in mapping))
        reserved = {KEY_COLUMN, FP_COLUMN, CHANGED_COLUMN, ROW_COLUMN} & set(segment_columns)
        if reserved:
            raise WarehouseError(
                f"the query returns a column named {', '.join(f'`{c}`' for c in sorted(reserved))}"
                f", which winback uses itself; rename it ({where_to_fix})"
            )
        self._source = segment_subquery(query, segment_columns, "winback_source")
        self._key = key
        self._mapping = list(mapping)
        self._duckdb = connection.dialect.name == "duckdb"

    # -- set-up ------------------------------------------------------------------------------

    def load(
        self, snapshot_pages: Iterator[tuple[list[str], list[str]]], *, full_resync: bool
    ) -> None:
        """Hand over the snapshot's (key, raw_fp) pages, then materialise the segment.

        One pass over the segment query: each row gets its key as text, its raw fingerprint and
        whether it is new or changed (every row with `full_resync`); the mapped columns are kept
        only for those rows, so an unchanged segment costs the warehouse its keys and hashes.
        """
        self._tune_memory()
        self._load_snapshot(snapshot_pages)
        self._replace_temp_table(_SEGMENT)
        self._execute(
            _CreateTempTableAs(_SEGMENT, self._segment_select(full_resync=full_resync)),
            "the query failed",
        )
        if not self._duckdb:  # without statistics PostgreSQL found the departures of 500k
            # keys by a merge join of two sorts: 1.1 s instead of 0.28 s by hash join
            self._execute(sa.text(f"ANALYZE {_SEGMENT}"), "the query failed")
        self._replace_temp_table(_DUPLICATES)
        self._execute(
            sa.text(  # keys checked once a group, not once a row
                f"CREATE TEMP TABLE {_DUPLICATES} AS SELECT * FROM ("
                f"SELECT {KEY_COLUMN}, count(*) AS n, min({ROW_COLUMN}) AS first_row "
                f"FROM {_SEGMENT} GROUP BY {KEY_COLUMN} HAVING count(*) > 1) AS repeated "
                f"WHERE {self._valid_key()}"
            ),
            "finding duplicate keys failed",
        )

    def _replace_temp_table(self, name: str) -> None:
        """Drop what a run before left on this (pooled) connection."""
        self._execute(sa.text(f"DROP TABLE IF EXISTS {name}"), "cleaning up the diff failed")

    def _load_snapshot(self, pages: Iterator[tuple[list[str], list[str]]]) -> None:
        """Copy the pages into a temporary table, one page in memory at a time (none read when
        the warehouse refuses the table: TemporaryTablesRefused)."""
        if self._duckdb:
            self._load_snapshot_into_duckdb(pages)
            return
        snapshot = sa.Table(
            _SNAPSHOT,
            sa.MetaData(),
            sa.Column("snapshot_key", sa.Text),
            sa.Column("snapshot_fp", sa.Text),
            prefixes=["TEMPORARY"],
        )
        try:
            snapshot.drop(self.connection, checkfirst=True)
            snapshot.create(self.connection)
        except sa.exc.DBAPIError as error:
            raise TemporaryTablesRefused(
                f"the warehouse refuses temporary tables ({query_problem(error)})"
            ) from None
        what = "copying the snapshot into the warehouse connection failed"
        try:
            for keys, fingerprints in pages:
                insert_rows(self.connection, snapshot, list(zip(keys, fingerprints, strict=True)))
        except sa.exc.DBAPIError as error:
            raise WarehouseError(f"{what}: {query_problem(error)}") from None
        # Autovacuum never analyses temporary tables: PostgreSQL would plan the joins over
        # them blind (see `load`).
        self._execute(sa.text(f"ANALYZE {_SNAPSHOT}"), what)

    def _load_snapshot_into_duckdb(self, pages: Iterator[tuple[list[str], list[str]]]) -> None:
        """Each page is handed over as NumPy columns (scanned by DuckDB in place, no per-row
        Python)."""
        import numpy as np  # only this path needs it

        self._replace_temp_table(_SNAPSHOT)
        raw = self.connection.connection.dbapi_connection
        if raw is None:  # pragma: no cover - an open connection always has one
            raise WarehouseError("the warehouse connection is closed")
        self._execute(
            sa.text(f"CREATE TEMP TABLE {_SNAPSHOT} (snapshot_key VARCHAR, snapshot_fp UBIGINT)"),
            "creating the snapshot table in the warehouse connection failed",
        )
        # Fingerprints are the warehouse's 64-bit hashes, kept as numbers (half the memory of
        # text); one the state database computed (SHA-1 hex) becomes NULL: its row is re-checked.
        insert = (
            f"INSERT INTO {_SNAPSHOT} SELECT snapshot_key, TRY_CAST(snapshot_fp AS UBIGINT) "
            f"FROM {_SNAPSHOT_PAGE}"
        )
        for keys, fingerprints in pages:
            columns = {
                "snapshot_key": np.array(keys, dtype=object),
                "snapshot_fp": np.array(fingerprints, dtype=object),
            }
            raw.register(_SNAPSHOT_PAGE, columns)
            try:
                self._execute(
                    sa.text(insert), "copying the snapshot into the warehouse connection failed"
                )
            finally:
                raw.unregister(_SNAPSHOT_PAGE)
            # DuckDB keeps a scanned page referenced until its transaction ends: without this
            # commit every page (and its 100k strings) would stay in memory.
            self.connection.commit()

    def _keyed_select(self, *, numbered: bool = False) -> sa.Select[Any]:
        """The segment's mapped columns with its key as text and its raw fingerprint (and,
        `numbered`, the row's number in the order the query returns them: `ROW_COLUMN`).

        The fingerprint is DuckDB's 64-bit hash of a seed naming the mapping and the mapped
        columns (the cheapest function that keeps columns and NULLs apart), or PostgreSQL's
        64-bit hash of the row (seed, columns...) as text, where NULL and '' differ too
        (`hashtextextended`, the hash of text partitioning: ~40% cheaper than md5 here, and
        available where FIPS mode disables md5). Should a new
        warehouse version hash differently, every row is re-checked once (and re-sent only if
        its normalised identifiers or fields changed).
        """
        source = self._source
        seed = fingerprint_seed(self._mapping)
        mapped = [source.c[column] for _, _, column in self._mapping]
        raw_fp = (
            sa.func.hash(sa.literal(seed), *mapped)
            if self._duckdb
            else sa.cast(
                sa.func.hashtextextended(
                    sa.cast(sa.tuple_(sa.literal(seed, sa.Text), *mapped), sa.Text), 0
                ),
                sa.Text,
            )
        )
        numbers = [sa.func.row_number().over().label(ROW_COLUMN)] if numbered else []
        # Keys are grouped, joined and compared as bytes, as the state database compares them:
        # a NOCASE (or nondeterministic) key column would make 'A' and 'a' one key.
        key_text = sa.cast(source.c[self._key], sa.String).collate(
            "binary" if self._duckdb else "C"
        )
        return sa.select(
            *(source.c[column] for column in self.columns),
            key_text.label(KEY_COLUMN),
            raw_fp.label(FP_COLUMN),
            *numbers,
        )

    def _segment_select(self, *, full_resync: bool) -> sa.Select[Any]:
        """The segment rows with key text, raw fingerprint and changed flag."""
        keyed_select = self._keyed_select(numbered=True)
        if not self._duckdb:  # OFFSET 0 keeps PostgreSQL from inlining the subquery, which
            keyed_select = keyed_select.offset(0)  # would hash each row once per CASE below
        keyed = keyed_select.subquery("winback_keyed")
        snapshot = sa.table(_SNAPSHOT, sa.column("snapshot_key"), sa.column("snapshot_fp"))
        changed: sa.ColumnElement[bool] = (
            sa.true()
            if full_resync
            else snapshot.c.snapshot_fp.is_distinct_from(keyed.c[FP_COLUMN])
        )
        return sa.select(
            *(sa.case((changed, keyed.c[column])).label(column) for column in self.columns),
            keyed.c[KEY_COLUMN],
            keyed.c[FP_COLUMN],
            changed.label(CHANGED_COLUMN),
            keyed.c[ROW_COLUMN],
        ).select_from(keyed.outerjoin(snapshot, snapshot.c.snapshot_key == keyed.c[KEY_COLUMN]))

    def every_row(self, *, chunk_size: int) -> Iterator[Sequence[sa.Row[Any]]]:
        """Every segment row, streamed in segment order: the mapped columns (`columns`), then
        the key as text and the raw fingerprint as text (how the state store keeps it).

        For a sync with nothing to compare against (no snapshot yet, `--full-resync`): nothing
        is materialised in the warehouse and the state database finds duplicates and departures.
        """
        keyed = self._keyed_select().subquery("winback_keyed")
        select = sa.select(
            *(keyed.c[column] for column in self.columns),
            keyed.c[KEY_COLUMN],
            sa.cast(keyed.c[FP_COLUMN], sa.String),
        )
        return self._stream(select, chunk_size, what="the query failed", fix=self.where_to_fix)

    def key_census(self) -> KeyCensus:
        """One aggregate pass of the segment query, nothing kept in the warehouse: how many rows
        it returns and which valid keys it returns more than once (for a first sync that is
        streamed straight to the destination, which keeps the first row of each)."""
        keyed = self._keyed_select().subquery("winback_keyed")
        key, rows, is_total = (
            keyed.c[KEY_COLUMN],
            sa.func.count(),
            sa.func.grouping(keyed.c[KEY_COLUMN]),
        )
        query = (
            sa.select(key, rows, is_total)
            .group_by(sa.func.rollup(key))
            .having(sa.or_(is_total == 1, sa.and_(rows > 1, sa.text(self._valid_key()))))
        )
        total, duplicates = 0, {}
        for chunk in self._stream(query, 10_000, what="the query failed", fix=self.where_to_fix):
            for duplicate_key, n, total_row in chunk:
                if total_row:
                    total = int(n)
                else:
                    duplicates[duplicate_key] = int(n)
        self._release_memory()  # DuckDB: the aggregate's hash table (~45 MB for 500k keys)
        return KeyCensus(total, duplicates)

    def drop(self) -> None:
        """Free what `load` created (the warehouse connection goes back to the pool). A failed
        statement (e.g. DuckDB out of memory) leaves its transaction aborted: it is rolled back
        first, so the cleanup works and the failure is the one reported. On PostgreSQL that
        rollback is the cleanup: nothing of the diff was committed."""
        self.connection.rollback()
        if not self._duckdb:
            return
        for name in (_DUPLICATES, _SEGMENT, _SNAPSHOT):
            self.connection.execute(sa.text(f"DROP TABLE IF EXISTS {name}"))
        self._release_memory()

    def _tune_memory(self) -> None:
        """DuckDB: have the allocator return freed memory after each task instead of keeping up
        to 128 MB (peak of a 500k-row rerun ~10-17 MB lower, no slower). PostgreSQL: give this
        transaction's joins and aggregates, and this session's temporary tables, the memory a
        diff of a few hundred thousand rows needs (the defaults, 4MB and 8MB, spill to disk).
        Best effort: a warehouse that refuses a setting keeps its own."""
        if not self._duckdb:
            for setting in _POSTGRES_SETTINGS:
                self._set_if_possible(setting)
            return
        for setting in _ALLOCATOR_SETTINGS:
            self._set_if_possible(f"SET {setting} = '8MB'")

    def _release_memory(self) -> None:
        """Make DuckDB hand back the buffers of the dropped tables for the rest of the run.

        DuckDB keeps freed buffers until its memory limit needs them; lowering the limit for a
        moment releases them (~80 MB after a 500k-row full sync). The limit and the allocator
        settings are then restored: those set in the warehouse URL, else DuckDB's defaults.
        """
        self.connection.commit()  # the transaction holds the dropped tables until it ends
        if not self._duckdb:
            return
        try:  # could not shrink now: nothing lost, the buffers stay cached
            self._set_if_possible("SET memory_limit = '16MB'")
        finally:
            for setting in ("memory_limit", *_ALLOCATOR_SETTINGS):
                self._restore(setting)
            self.connection.commit()

    def _restore(self, setting: str) -> None:
        """The warehouse URL's value of a DuckDB setting, else DuckDB's default."""
        configured = self.connection.engine.url.query.get(setting)
        statement = (
            f"SET {setting} = '{configured}'"
            if isinstance(configured, str) and "'" not in configured
            else f"RESET {setting}"
        )
        self._set_if_possible(statement)

    def _set_if_possible(self, statement: str) -> None:
        """Run a SET/RESET; one this DuckDB refuses (unknown setting, limit below what is in
        use) is rolled back and the run goes on with the setting as it was."""
        try:
            self.connection.execute(sa.text(statement))
        except sa.exc.DBAPIError:
            self.connection.rollback()

    # -- results -----------------------------------------------------------------------------

    def total_rows(self) -> int:
        return int(self._scalar(f"SELECT count(*) FROM {_SEGMENT}"))

    def bad_keys(self) -> list[BadKeyRow]:
        rows = self._all(
            f"SELECT left({KEY_COLUMN}, {MAX_KEY_LENGTH}), length({KEY_COLUMN}) "
            f"FROM {_SEGMENT} WHERE NOT coalesce({self._valid_key()}, false) ORDER BY {ROW_COLUMN}"
        )
        return [BadKeyRow(key, int(length or 0)) for key, length in rows]

    def duplicates(self) -> list[tuple[str, int]]:
        """(key, number of rows) of every key the segment returns more than once."""
        rows = self._all(f"SELECT {KEY_COLUMN}, n FROM {_DUPLICATES} ORDER BY first_row")
        return [(key, int(n)) for key, n in rows]

    def changed_rows(self, *, chunk_size: int) -> Iterator[Sequence[sa.Row[Any]]]:
        """New and changed rows (every valid row with `full_resync`), in segment order; the
        first row of a duplicate key only."""
        quote = self.connection.dialect.identifier_preparer.quote
        selected = [f"s.{quote(c)}" for c in self.columns] + [
            f"s.{KEY_COLUMN}",
            f"CAST(s.{FP_COLUMN} AS VARCHAR)",  # stored as text in the state store
        ]
        sql = (
            f"SELECT {', '.join(selected)} FROM {_SEGMENT} AS s "
            f"LEFT JOIN {_DUPLICATES} AS d ON d.{KEY_COLUMN} = s.{KEY_COLUMN} "
            f"WHERE s.{CHANGED_COLUMN} AND {self._valid_key('s.')} "
            f"AND (d.{KEY_COLUMN} IS NULL OR s.{ROW_COLUMN} = d.first_row) ORDER BY s.{ROW_COLUMN}"
        )
        return self._stream(sql, chunk_size)

    def departed_keys(self, *, chunk_size: int) -> Iterator[Sequence[sa.Row[Any]]]:
        """Snapshot keys the segment no longer returns."""
        sql = (
            f"SELECT p.snapshot_key FROM {_SNAPSHOT} AS p WHERE NOT EXISTS ("
            f"SELECT 1 FROM {_SEGMENT} AS s WHERE s.{KEY_COLUMN} = p.snapshot_key) "
            "ORDER BY p.snapshot_key"
        )
        return self._stream(sql, chunk_size)

    # -- helpers -----------------------------------------------------------------------------

    def _valid_key(self, prefix: str = "") -> str:
        return valid_key_sql(f"{prefix}{KEY_COLUMN}", self.connection.dialect.name)

    def _execute(self, statement: sa.Executable, what: str) -> None:
        try:
            self.connection.execute(statement)
        except sa.exc.DBAPIError as error:
            raise WarehouseError(f"{what}: {query_problem(error)}; {self.where_to_fix}") from None

    def _all(self, sql: str) -> list[sa.Row[Any]]:
        try:
            return list(self.connection.execute(sa.text(sql)).all())
        except sa.exc.DBAPIError as error:
            raise WarehouseError(f"the diff failed: {query_problem(error)}") from None

    def _scalar(self, sql: str) -> Any:
        return self._all(sql)[0][0]

    def _stream(
        self,
        query: str | sa.Executable,
        chunk_size: int,
        *,
        what: str = "the diff failed",
        fix: str | None = None,
    ) -> Iterator[Sequence[sa.Row[Any]]]:
        statement = sa.text(query) if isinstance(query, str) else query
        try:
            result = self.connection.execute(statement, execution_options={"stream_results": True})
            yield from result.partitions(chunk_size)
        except sa.exc.DBAPIError as error:
            raise WarehouseError(
                f"{what}: {query_problem(error)}" + (f"; {fix}" if fix else "")
            ) from None
