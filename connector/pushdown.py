"""Finds a segment's changes inside the warehouse, so unchanged rows never reach Python.

The state-database diff (`connector.diff`) stages every segment row there; its cost follows the
segment. When the warehouse can run the comparison itself (DuckDB, the embedded default), the
sync's snapshot fingerprints (key, raw_fp) are copied into a temporary table of the warehouse
connection instead (an Arrow stream: no per-row Python on the warehouse side) and the warehouse
returns only what the planner needs:

- the rows that are new or whose raw fingerprint changed, in segment order;
- the snapshot keys that left the segment;
- duplicate keys (the first row of each is kept) and rows whose key is null, blank or too long;
- the number of rows.

The raw fingerprint is computed by the warehouse: md5 over the text of the mapped columns and a
seed naming the mapping, so a changed mapping re-checks every row. It is not the state
database's fingerprint (a SHA-1 of the staged JSON): switching between the two re-checks every
row once, and rows whose normalised identifiers and fields did not change are not sent again.

Only temporary objects of this connection are created; the warehouse may be opened read-only.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.expression import ClauseElement, Executable

from connector.errors import WarehouseError
from connector.warehouse import first_line

PUSHDOWN_DIALECTS = frozenset({"duckdb"})
MAX_KEY_LENGTH = 500
"""Longest key the state store holds (snapshot.key is VARCHAR(500))."""
KEY_COLUMN = "winback_key"
FP_COLUMN = "winback_fp"
SNAPSHOT_PAGE = 50_000

_SEGMENT = "winback_segment"
_SNAPSHOT = "winback_snapshot"
_SNAPSHOT_SOURCE = "winback_snapshot_source"
_DUPLICATES = "winback_duplicates"
_FIELD_SEPARATOR = "\x1f"
_NULL_MARK = "\x1e"
_WHITESPACE = " \t\n\r\x0b\x0c"


def supports_pushdown(engine: sa.Engine) -> bool:
    """Whether this warehouse can compute the diff itself."""
    return engine.dialect.name in PUSHDOWN_DIALECTS


class _CreateTempTableAs(Executable, ClauseElement):
    """`CREATE OR REPLACE TEMP TABLE name AS <select>`, bind parameters kept."""

    inherit_cache = False

    def __init__(self, name: str, select: sa.Select[Any]):
        self.name = name
        self.select = select


@compiles(_CreateTempTableAs)
def _compile_create_temp_table_as(element: _CreateTempTableAs, compiler: Any, **kw: Any) -> str:
    return (
        f"CREATE OR REPLACE TEMP TABLE {element.name} AS {compiler.process(element.select, **kw)}"
    )


@dataclass(frozen=True)
class BadKeyRow:
    """A segment row that cannot be synced because of its key."""

    key: str | None
    """The key, cut to MAX_KEY_LENGTH characters; None when null."""
    length: int


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
        reserved = {KEY_COLUMN, FP_COLUMN} & set(segment_columns)
        if reserved:
            raise WarehouseError(
                f"the query returns a column named {', '.join(f'`{c}`' for c in sorted(reserved))}"
                f", which winback uses itself; rename it ({where_to_fix})"
            )
        if isinstance(query, sa.Select):
            source = query.subquery("winback_source")
        elif isinstance(query, sa.TextClause):
            source = query.columns(*(sa.column(c) for c in segment_columns)).subquery(
                "winback_source"
            )
        else:  # pragma: no cover - segment_query returns one of the two
            raise TypeError(f"cannot push down a {type(query).__name__}")
        self._source = source
        self._key = key
        self._mapping = list(mapping)

    # -- set-up ------------------------------------------------------------------------------

    def load_segment(self) -> None:
        """Materialise the segment with its key text and raw fingerprint (one warehouse pass)."""
        source = self._source
        texts = [
            sa.func.coalesce(sa.cast(source.c[column], sa.String), sa.literal(_NULL_MARK))
            for _, _, column in self._mapping
        ]
        raw_fp = sa.func.md5(
            sa.func.concat_ws(
                sa.literal(_FIELD_SEPARATOR), sa.literal(fingerprint_seed(self._mapping)), *texts
            )
        )
        select = sa.select(
            *(source.c[column] for column in self.columns),
            sa.cast(source.c[self._key], sa.String).label(KEY_COLUMN),
            raw_fp.label(FP_COLUMN),
        )
        self._execute(_CreateTempTableAs(_SEGMENT, select), "the query failed")

    def load_snapshot(self, pages: Iterator[Sequence[tuple[str, str]]]) -> None:
        """Copy the snapshot's (key, raw_fp) pages into the warehouse connection."""
        import pyarrow as pa  # only this path needs it; a ~0.2 s import

        schema = pa.schema([("snapshot_key", pa.string()), ("snapshot_fp", pa.string())])

        def batches() -> Iterator[Any]:
            for page in pages:
                keys, fps = zip(*page, strict=True) if page else ((), ())
                yield pa.record_batch(
                    [pa.array(keys, pa.string()), pa.array(fps, pa.string())], schema=schema
                )

        reader = pa.RecordBatchReader.from_batches(schema, batches())
        raw = self.connection.connection.dbapi_connection
        if raw is None:  # pragma: no cover - an open connection always has one
            raise WarehouseError("the warehouse connection is closed")
        raw.register(_SNAPSHOT_SOURCE, reader)
        try:
            self._execute(
                sa.text(
                    f"CREATE OR REPLACE TEMP TABLE {_SNAPSHOT} AS "
                    f"SELECT snapshot_key, snapshot_fp FROM {_SNAPSHOT_SOURCE}"
                ),
                "copying the snapshot into the warehouse connection failed",
            )
        finally:
            raw.unregister(_SNAPSHOT_SOURCE)
        self._execute(
            sa.text(
                f"CREATE OR REPLACE TEMP TABLE {_DUPLICATES} AS "
                f"SELECT {KEY_COLUMN} AS duplicate_key, count(*) AS n, min(rowid) AS first_row "
                f"FROM {_SEGMENT} WHERE {self._valid_key()} "
                f"GROUP BY {KEY_COLUMN} HAVING count(*) > 1"
            ),
            "finding duplicate keys failed",
        )

    def drop(self) -> None:
        for name in (_DUPLICATES, _SNAPSHOT, _SEGMENT):
            self.connection.execute(sa.text(f"DROP TABLE IF EXISTS {name}"))

    # -- results -----------------------------------------------------------------------------

    def total_rows(self) -> int:
        return int(self._scalar(f"SELECT count(*) FROM {_SEGMENT}"))

    def bad_keys(self) -> list[BadKeyRow]:
        rows = self._all(
            f"SELECT left({KEY_COLUMN}, {MAX_KEY_LENGTH}), length({KEY_COLUMN}) "
            f"FROM {_SEGMENT} WHERE NOT coalesce({self._valid_key()}, false) ORDER BY rowid"
        )
        return [BadKeyRow(key, int(length or 0)) for key, length in rows]

    def duplicates(self) -> list[tuple[str, int]]:
        """(key, number of rows) of every key the segment returns more than once."""
        rows = self._all(f"SELECT duplicate_key, n FROM {_DUPLICATES} ORDER BY first_row")
        return [(key, int(n)) for key, n in rows]

    def changed_rows(
        self, *, chunk_size: int, full_resync: bool
    ) -> Iterator[Sequence[sa.Row[Any]]]:
        """New and changed rows (all valid first rows with `full_resync`), in segment order."""
        quote = self.connection.dialect.identifier_preparer.quote
        selected = [f"s.{quote(c)}" for c in self.columns] + [f"s.{KEY_COLUMN}", f"s.{FP_COLUMN}"]
        changed = (
            "" if full_resync else "AND (p.snapshot_key IS NULL OR p.snapshot_fp <> s.winback_fp)"
        )
        sql = (
            f"SELECT {', '.join(selected)} FROM {_SEGMENT} AS s "
            f"LEFT JOIN {_SNAPSHOT} AS p ON p.snapshot_key = s.{KEY_COLUMN} "
            f"LEFT JOIN {_DUPLICATES} AS d ON d.duplicate_key = s.{KEY_COLUMN} "
            f"WHERE {self._valid_key('s.')} AND (d.duplicate_key IS NULL OR s.rowid = d.first_row) "
            f"{changed} ORDER BY s.rowid"
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
        key = f"{prefix}{KEY_COLUMN}"
        return (
            f"({key} IS NOT NULL AND length(trim({key}, '{_WHITESPACE}')) > 0 "
            f"AND length({key}) <= {MAX_KEY_LENGTH})"
        )

    def _execute(self, statement: sa.Executable, what: str) -> None:
        try:
            self.connection.execute(statement)
        except sa.exc.DBAPIError as error:
            raise WarehouseError(f"{what}: {first_line(error)}; {self.where_to_fix}") from None

    def _all(self, sql: str) -> list[sa.Row[Any]]:
        try:
            return list(self.connection.execute(sa.text(sql)).all())
        except sa.exc.DBAPIError as error:
            raise WarehouseError(f"the diff failed: {first_line(error)}") from None

    def _scalar(self, sql: str) -> Any:
        return self._all(sql)[0][0]

    def _stream(self, sql: str, chunk_size: int) -> Iterator[Sequence[sa.Row[Any]]]:
        try:
            result = self.connection.execution_options(stream_results=True).execute(sa.text(sql))
            yield from result.partitions(chunk_size)
        except sa.exc.DBAPIError as error:
            raise WarehouseError(f"the diff failed: {first_line(error)}") from None
