"""Turns a segment definition into one query and reads it from the warehouse in chunks."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from connector.config import QuerySegment, Segment
from connector.errors import ConfigError, ConfigProblem, WarehouseError
from connector.rules import (
    RulesSegment,
    compile_rules,
    locate_run_failure,
    run_failure_message,
)
from connector.warehouse import query_problem, stream_rows, warehouse_connection

# `:as_of::date` (a PostgreSQL-style cast): the `::` hides the parameter from SQLAlchemy.
_AS_OF_CAST = re.compile(
    r"(?<![:\w\\]):as_of::(\w+(?:\s+with(?:out)?\s+time\s+zone)?(?:\s*\([\d\s,]*\))?)",
    re.IGNORECASE,
)


def effective_as_of(segment: Segment, as_of: dt.date | None) -> dt.date:
    """`--as-of`, else the segment's `as_of`, else today (UTC)."""
    if as_of is not None:
        return as_of
    if segment.as_of is not None:
        return segment.as_of
    return dt.datetime.now(dt.UTC).date()


def segment_query(
    name: str, segment: Segment, *, as_of: dt.date, engine: sa.Engine
) -> sa.Executable:
    """The segment's query; SQL segments may use the `:as_of` bind parameter."""
    if isinstance(segment, RulesSegment):
        return compile_rules(name, segment, as_of=as_of, engine=engine)
    sql = segment.sql if segment.sql is not None else _read_sql_file(name, segment)
    where = f"segments.{name}.sql" if segment.sql is not None else f"segments.{name}.file"
    if all(not line.strip(" \t;") or line.lstrip().startswith("--") for line in sql.splitlines()):
        raise ConfigError([ConfigProblem(where, "the query is empty; write a SELECT")])
    query = sa.text(query_text(sql))
    unknown = sorted(set(query._bindparams) - {"as_of"})
    if unknown:
        raise ConfigError(
            [
                ConfigProblem(
                    where,
                    f"unknown parameter {', '.join(f'`:{p}`' for p in unknown)}: winback "
                    "provides only `:as_of`; a colon before a name, even inside a quoted "
                    r"string, reads as a parameter: write it `\:`"
                    + (" (`\\\\:` in a TOML basic string)" if segment.sql is not None else ""),
                )
            ]
        )
    if "as_of" in query._bindparams:
        query = query.bindparams(as_of=as_of)
    return query


def query_text(sql: str) -> str:
    """A SQL segment's query, ready to be wrapped as a subquery: no final `;` (nor a comment
    line after it), `:as_of::TYPE` written `CAST(:as_of AS TYPE)` so that `:as_of` is still a
    parameter, and a final newline so that a closing parenthesis never lands in a trailing
    `-- comment`."""
    text = sql.strip()
    lines = text.splitlines()
    # Comment lines after the final `;` are dropped with it; anywhere else they stay.
    while len(lines) > 1 and lines[-1].lstrip().startswith("--"):
        lines.pop()
    if "\n".join(lines).rstrip().endswith(";"):
        text = "\n".join(lines)
    text = _AS_OF_CAST.sub(lambda match: f"CAST(:as_of AS {match.group(1)})", text)
    return text.rstrip().rstrip(";").rstrip() + "\n"


def probe_columns(
    name: str,
    segment: Segment,
    *,
    engine: sa.Engine,
    as_of: dt.date,
    query: sa.Executable | None = None,
) -> list[str]:
    """Run the segment with `LIMIT 0` and return its columns; WarehouseError if it fails.

    `query` is the segment's query when the caller already built it (a rules segment checks its
    tables against the warehouse while compiling: once is enough).
    """
    if query is None:
        query = segment_query(name, segment, as_of=as_of, engine=engine)
    if isinstance(query, sa.Select):
        probe: sa.Executable = query.limit(0)
    else:
        sql = query.text if isinstance(query, sa.TextClause) else str(query)
        probe = sa.text(f"SELECT * FROM ({sql}) AS winback_probe LIMIT 0")
        if "as_of" in probe._bindparams:
            probe = probe.bindparams(as_of=as_of)
    with warehouse_connection(engine) as connection:
        try:
            columns = list(connection.execute(probe).keys())
        except sa.exc.DBAPIError as error:
            raise WarehouseError(
                f"the query failed: {query_problem(error)}; {where_to_fix(name, segment)}",
                segment=name,
            ) from None
    check_columns(name, segment, columns)
    return columns


@dataclass(frozen=True)
class SegmentKeys:
    """What one aggregate pass of the segment query tells of its keys."""

    rows: int
    repeated: list[tuple[Any, int]]
    """(key as the driver returns it, number of rows) of the non-null keys returned more than
    once."""


EXACT_KEY_TYPES = frozenset({"integer", "text"})
"""SQLite storage classes whose keys group as their texts in the state database do."""


def segment_subquery(query: sa.Executable, columns: Sequence[str], name: str) -> sa.Subquery:
    """The segment's query (`segment_query`) as a named subquery with its `columns`."""
    if isinstance(query, sa.Select):
        return query.subquery(name)
    if isinstance(query, sa.TextClause):
        return query.columns(*(sa.column(c) for c in columns)).subquery(name)
    raise TypeError(f"not a segment query: {type(query).__name__}")  # pragma: no cover


def segment_keys(
    name: str,
    segment: Segment,
    *,
    engine: sa.Engine,
    query: sa.Executable,
    columns: Sequence[str],
) -> SegmentKeys | None:
    """Count a SQLite segment's rows and find its repeated keys, in the warehouse (GROUP BY
    over the segment query, keys compared as bytes; nothing of the segment is held in Python).
    None when the keys are not all integers or all texts: 1 and '1' are two keys to SQLite but
    one text to the state database, and a REAL's text rounds."""
    source = segment_subquery(query, columns, "winback_segment")
    key: sa.ColumnElement[Any] = source.c[segment.key]
    key_type = sa.func.typeof(key)
    totals = sa.select(
        sa.func.count(),
        sa.func.count(sa.distinct(key_type)).filter(key.is_not(None)),
        sa.func.max(key_type).filter(key.is_not(None)),
    ).select_from(source)
    repeated = (
        sa.select(key.collate("BINARY"), sa.func.count())  # a NOCASE column: 'A' is not 'a'
        .where(key.is_not(None))
        .group_by(key.collate("BINARY"))
        .having(sa.func.count() > 1)
    )
    with warehouse_connection(engine) as connection:
        try:
            rows, types, some_type = connection.execute(totals).one()
            if int(types) > 1 or (some_type is not None and some_type not in EXACT_KEY_TYPES):
                return None
            repeats = [(value, int(n)) for value, n in connection.execute(repeated)]
        except sa.exc.DBAPIError as error:
            raise WarehouseError(
                f"the query failed: {query_problem(error)}; {where_to_fix(name, segment)}",
                segment=name,
            ) from None
    return SegmentKeys(int(rows), repeats)


def _read_sql_file(name: str, segment: QuerySegment) -> str:
    sql_path = segment.file
    if sql_path is None:
        raise WarehouseError("has neither `sql` nor `file`", segment=name)
    try:
        return sql_path.read_text(encoding="utf-8")
    except OSError as error:
        raise WarehouseError(f"cannot read `{sql_path}`: {error.strerror}", segment=name) from None


def where_to_fix(name: str, segment: Segment) -> str:
    if isinstance(segment, RulesSegment):
        return f"check segments.{name} (run `winback segments explain {name}`)"
    if segment.file is not None:
        return f"check the query in `{segment.file}`"
    return f"check segments.{name}.sql"


@contextmanager
def read_segment(
    name: str,
    segment: Segment,
    *,
    engine: sa.Engine,
    as_of: dt.date,
    chunk_size: int,
    sync: str | None = None,
    mapping: Mapping[str, str] | None = None,
) -> Iterator[tuple[Sequence[str], Iterator[Sequence[sa.Row[Any]]]]]:
    """Open the segment and yield its column names and a chunk iterator.

    Raises WarehouseError naming the segment when the query fails, ConfigError when the key or
    a column the sync maps (`mapping`, see `column_problems`) is absent.
    """
    query = segment_query(name, segment, as_of=as_of, engine=engine)
    with warehouse_connection(engine) as connection:
        try:
            columns, chunks = stream_rows(connection, query, chunk_size=chunk_size)
        except sa.exc.DBAPIError as error:
            connection.rollback()
            raise run_failure(name, segment, error, engine=engine, as_of=as_of) from None
        check_columns(name, segment, columns, sync=sync, mapping=mapping)
        yield columns, _guarded(name, segment, chunks, connection=connection, as_of=as_of)


def run_failure(
    name: str,
    segment: Segment,
    error: BaseException,
    *,
    engine: sa.Engine,
    as_of: dt.date,
    what: str = "the query failed",
) -> WarehouseError:
    """The error of a segment query that failed while running. For a rules segment, which
    compiled and passed its checks, the failure depends on the data: name the option at fault
    when trying each fragment alone finds it."""
    problem = query_problem(error)
    if isinstance(segment, RulesSegment):
        found = locate_run_failure(name, segment, as_of=as_of, engine=engine, failure=problem)
        if found:
            return WarehouseError(
                run_failure_message(name, found, problem, what=what), segment=name
            )
    return WarehouseError(f"{what}: {problem}; {where_to_fix(name, segment)}", segment=name)


def column_problems(
    name: str,
    segment: Segment,
    columns: Sequence[str],
    *,
    sync: str | None = None,
    mapping: Mapping[str, str] | None = None,
) -> list[ConfigProblem]:
    """Configuration problems of a segment whose query does not return its key column or a
    column the sync maps (`mapping`: option such as ``identifiers.email`` → column)."""
    returned = ", ".join(columns) or "nothing"
    problems = []
    if segment.key not in columns:
        problems.append(
            ConfigProblem(
                f"segments.{name}.key",
                f"the query returns no column `{segment.key}` (it returns {returned}); "
                f"{where_to_fix(name, segment)} or the key",
            )
        )
    for option, column in (mapping or {}).items():
        if column not in columns:
            problems.append(
                ConfigProblem(
                    f"syncs.{sync}.{option}",
                    f"column `{column}` is not returned by segment `{name}` (it returns {returned})",
                )
            )
    return problems


def check_columns(
    name: str,
    segment: Segment,
    columns: Sequence[str],
    *,
    sync: str | None = None,
    mapping: Mapping[str, str] | None = None,
) -> None:
    """ConfigError listing `column_problems`, if any."""
    problems = column_problems(name, segment, columns, sync=sync, mapping=mapping)
    if problems:
        raise ConfigError(problems)


def _guarded(
    name: str,
    segment: Segment,
    chunks: Iterator[Sequence[sa.Row[Any]]],
    *,
    connection: sa.Connection,
    as_of: dt.date,
) -> Iterator[Sequence[sa.Row[Any]]]:
    try:
        yield from chunks
    except sa.exc.DBAPIError as error:
        # The failed transaction is over: an in-memory warehouse has only this connection.
        connection.rollback()
        raise run_failure(
            name,
            segment,
            error,
            engine=connection.engine,
            as_of=as_of,
            what="reading the result failed",
        ) from None
