"""SQL segments (`sql` / `file`) on DuckDB, SQLite and PostgreSQL: how their text is run."""

from __future__ import annotations

from datetime import date
from typing import Any

import pytest
import sqlalchemy as sa

from connector.config import QuerySegment
from connector.errors import ConfigError
from connector.segments import (
    probe_columns,
    read_segment,
    segment_keys,
    segment_query,
    segment_subquery,
)

AS_OF = date(2024, 3, 1)


@pytest.fixture
def engine(empty_warehouse: sa.Engine) -> sa.Engine:
    """A warehouse of each kind with `people (id, seen)`."""
    with empty_warehouse.begin() as connection:
        connection.execute(sa.text("CREATE TABLE people (id INTEGER, seen DATE)"))
        connection.execute(
            sa.text("INSERT INTO people VALUES (1, '2024-01-01'), (2, '2024-02-29')")
        )
    return empty_warehouse


def rows_of(engine: sa.Engine, segment: QuerySegment) -> tuple[list[str], list[tuple[Any, ...]]]:
    """The segment's columns as probed (the query wrapped in a subquery) and its rows."""
    columns = probe_columns("people", segment, engine=engine, as_of=AS_OF)
    with read_segment("people", segment, engine=engine, as_of=AS_OF, chunk_size=10) as (
        _,
        chunks,
    ):
        rows = [tuple(row) for chunk in chunks for row in chunk]
    return columns, rows


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT id FROM people ORDER BY id -- every person",
        "SELECT id FROM people ORDER BY id\n-- every person\n",
        "SELECT id FROM people ORDER BY id;\n-- every person",
    ],
)
def test_query_ending_with_a_comment(engine: sa.Engine, sql: str) -> None:
    segment = QuerySegment(key="id", sql=sql)
    columns, rows = rows_of(engine, segment)
    assert columns == ["id"]
    assert rows == [(1,), (2,)]
    query = segment_query("people", segment, as_of=AS_OF, engine=engine)
    counted = sa.select(sa.func.count()).select_from(segment_subquery(query, columns, "s"))
    with engine.connect() as connection:
        assert connection.execute(counted).scalar_one() == 2
    if engine.dialect.name == "sqlite":
        keys = segment_keys("people", segment, engine=engine, query=query, columns=columns)
        assert keys is not None and keys.rows == 2


def test_as_of_with_a_postgres_cast(engine: sa.Engine) -> None:
    if engine.dialect.name == "sqlite":
        pytest.skip("SQLite has no `::` casts (and no DATE type to cast to)")
    segment = QuerySegment(key="id", sql="SELECT id FROM people WHERE seen < :as_of::date - 30")
    columns, rows = rows_of(engine, segment)
    assert columns == ["id"]
    assert rows == [(1,)]


@pytest.mark.parametrize(
    ("sql", "problem"),
    [
        ("SELECT id FROM people WHERE id > :minimum", "unknown parameter `:minimum`"),
        ("SELECT id FROM people WHERE 'x :admin' <> ''", "unknown parameter `:admin`"),
        ("  -- nothing yet\n", "the query is empty"),
        (";", "the query is empty"),
    ],
)
def test_a_query_winback_cannot_run_as_written_is_a_configuration_error(
    engine: sa.Engine, sql: str, problem: str
) -> None:
    """Before, SQLAlchemy's 'A value is required for bind parameter' escaped as an unexpected
    error (exit 1, 'report it'), and an empty query as the warehouse's syntax error."""
    with pytest.raises(ConfigError) as caught:
        segment_query("people", QuerySegment(key="id", sql=sql), as_of=AS_OF, engine=engine)
    assert caught.value.problems[0].location == "segments.people.sql"
    assert problem in caught.value.problems[0].message


def test_an_escaped_colon_is_a_colon(engine: sa.Engine) -> None:
    segment = QuerySegment(key="id", sql=r"SELECT id, '10\:30' AS at FROM people ORDER BY id")
    assert rows_of(engine, segment)[1] == [(1, "10:30"), (2, "10:30")]
