"""What compile_rules learns from the warehouse before running a rules segment, and how a
rules query that fails while running is reported (DuckDB, SQLite, PostgreSQL)."""

from __future__ import annotations

from datetime import date
from typing import Any

import pytest
import sqlalchemy as sa

from connector.errors import ConfigError, WarehouseError
from connector.rules import RulesSegment, compile_rules, explain_rules, printable_sql
from connector.segments import read_segment

AS_OF = date(2026, 11, 1)
SEEN = {"name": "seen", "table": "events", "key": "id", "at": "ts", "inactive_after": "30d"}


@pytest.fixture
def engine(empty_warehouse: sa.Engine) -> sa.Engine:
    """An empty warehouse of each kind."""
    return empty_warehouse


def execute(engine: sa.Engine, *statements: str) -> None:
    with engine.begin() as connection:
        for statement in statements:
            connection.execute(sa.text(statement))


def rules(**config: Any) -> RulesSegment:
    return RulesSegment.model_validate({"from": "people", "key": "id", **config})


def problems(engine: sa.Engine, segment: RulesSegment) -> dict[str, str]:
    with pytest.raises(ConfigError) as caught:
        compile_rules("s", segment, as_of=AS_OF, engine=engine)
    return {problem.location: problem.message for problem in caught.value.problems}


def rows(engine: sa.Engine, segment: RulesSegment) -> list[tuple[Any, ...]]:
    query = compile_rules("s", segment, as_of=AS_OF, engine=engine)
    with engine.connect() as connection:
        return [tuple(row) for row in connection.execute(query)]


# -- SQLite: times date() cannot read --------------------------------------------------------


@pytest.fixture
def sqlite_engine() -> Any:
    engine = sa.create_engine("sqlite://")
    yield engine
    engine.dispose()


@pytest.mark.parametrize(
    ("value", "hint"),
    [
        ("1792490400", "unixepoch"),  # Unix seconds, 2026-10-20
        ("20746", "unixepoch"),  # Unix days: a Julian day in antiquity to date()
        ("'2026-10-20 10:00:00+00'", "ISO-8601"),
        ("'2026/10/20'", "ISO-8601"),
        ("'20/10/2026'", "ISO-8601"),
        ("'2026-10-20 10:00:00 +0200'", "ISO-8601"),
        ("'2026-10-20 10:00:00 UTC'", "ISO-8601"),
    ],
)
def test_sqlite_times_that_date_cannot_read(
    sqlite_engine: sa.Engine, value: str, hint: str
) -> None:
    execute(
        sqlite_engine,
        "CREATE TABLE people (id INTEGER)",
        "CREATE TABLE events (id INTEGER, ts, kind TEXT)",
        "INSERT INTO people VALUES (1)",
        "INSERT INTO events VALUES (1, '2026-10-20T10:00:00Z', 'ok')",
        f"INSERT INTO events VALUES (1, {value}, 'odd')",
    )
    found = problems(sqlite_engine, rules(signals=[SEEN]))
    assert list(found) == ["segments.s.signals[0].at"]
    message = found["segments.s.signals[0].at"]
    assert message.startswith("column `ts` of table `events` holds values SQLite's date() cannot")
    assert f"such as `{value.strip(chr(39))}`" in message
    assert hint in message
    # Rows the signal's `where` leaves out do not matter (the person is active: 12 days).
    assert rows(sqlite_engine, rules(signals=[{**SEEN, "where": "kind = 'ok'"}])) == []


def test_sqlite_unix_seconds_through_a_view(sqlite_engine: sa.Engine) -> None:
    execute(
        sqlite_engine,
        "CREATE TABLE people (id INTEGER)",
        "CREATE TABLE raw_events (id INTEGER, ts INTEGER)",
        "INSERT INTO people VALUES (1), (2)",
        "INSERT INTO raw_events VALUES (1, 1792490400), (2, 1790000000)",
        "CREATE VIEW events AS SELECT id, datetime(ts, 'unixepoch') AS ts FROM raw_events",
    )
    # 2026-10-20 is 12 days before as_of; 1790000000 is 2026-09-21, 41 days before.
    assert rows(sqlite_engine, rules(signals=[SEEN])) == [(2, date(2026, 9, 21), 41, 1, "seen", 1)]


# -- DuckDB: the time zone of `at` is read in the table's own schema ------------------------


@pytest.mark.parametrize(
    ("table", "day"), [("events", date(2026, 10, 2)), ("archive.events", date(2026, 10, 1))]
)
def test_duckdb_same_table_name_in_two_schemas(table: str, day: date) -> None:
    engine = sa.create_engine("duckdb:///:memory:")
    try:
        execute(
            engine,
            "CREATE SCHEMA archive",
            "CREATE TABLE people (id INTEGER)",
            "INSERT INTO people VALUES (1)",
            # 23:30 at UTC-5 is the next day in UTC, if the column knows its time zone.
            "CREATE TABLE archive.events (id INTEGER, ts TIMESTAMP)",
            "INSERT INTO archive.events VALUES (1, '2026-10-01 23:30:00')",
            "CREATE TABLE main.events (id INTEGER, ts TIMESTAMPTZ)",
            "INSERT INTO main.events VALUES (1, '2026-10-01 23:30:00-05')",
        )
        found = rows(engine, rules(signals=[{**SEEN, "table": table, "inactive_after": "1d"}]))
        assert [row[1] for row in found] == [day]
    finally:
        engine.dispose()


# -- usage `value` must be numeric ------------------------------------------------------------


def test_usage_value_must_be_numeric(engine: sa.Engine) -> None:
    execute(
        engine,
        "CREATE TABLE people (id INTEGER)",
        "CREATE TABLE events (id INTEGER, ts DATE, credits VARCHAR(10), used INTEGER)",
        "INSERT INTO people VALUES (1)",
        "INSERT INTO events VALUES (1, '2026-10-30', 'ten', 10)",
    )
    usage = {
        "name": "usage",
        "table": "events",
        "key": "id",
        "at": "ts",
        "window": "7d",
        "baseline": "28d",
        "drop_below": 0.5,
    }
    found = problems(engine, rules(signals=[{**usage, "value": "credits"}]))
    assert list(found) == ["segments.s.signals[0].value"]
    message = found["segments.s.signals[0].value"]
    assert message.startswith("column `credits` of table `events` has type VARCHAR")
    assert "`value` must be a numeric column" in message
    assert [row[0] for row in rows(engine, rules(signals=[{**usage, "value": "used"}]))] == []


# -- failures that depend on the data --------------------------------------------------------


def test_run_time_failure_names_the_option(engine: sa.Engine) -> None:
    """A `where` valid as SQL that fails on some rows (a text read as a number) fails the run,
    naming the option; `segments explain` gets the SQL before the counting fails."""
    if engine.dialect.name == "sqlite":
        pytest.skip("SQLite's CAST never fails")
    execute(
        engine,
        "CREATE TABLE people (id INTEGER)",
        "CREATE TABLE events (id INTEGER, ts DATE, status VARCHAR(10))",
        "INSERT INTO people VALUES (1)",
        "INSERT INTO events VALUES (1, '2026-10-30', '1'), (1, '2026-10-30', 'open')",
    )
    segment = rules(signals=[{**SEEN, "where": "CAST(status AS INTEGER) = 1"}])
    compile_rules("s", segment, as_of=AS_OF, engine=engine)  # the query is valid SQL
    reading = read_segment("s", segment, engine=engine, as_of=AS_OF, chunk_size=10)
    with pytest.raises(WarehouseError) as caught, reading as (_, chunks):
        list(chunks)
    message = str(caught.value)
    assert message.startswith("segment `s`: ")
    assert "at segments.s.signals[0].where: `CAST(status AS INTEGER) = 1` fails on rows of" in (
        message
    )
    shown: list[str] = []
    with pytest.raises(WarehouseError, match=r"segments\.s\.signals\[0\]\.where"):
        explain_rules("s", segment, as_of=AS_OF, engine=engine, on_sql=shown.append)
    assert len(shown) == 1 and "CAST(status AS INTEGER) = 1" in shown[0]


def test_explained_sql_is_as_one_would_paste_it(engine: sa.Engine) -> None:
    execute(
        engine,
        "CREATE TABLE people (id INTEGER, email VARCHAR(50))",
        "CREATE TABLE events (id INTEGER, ts DATE)",
        "INSERT INTO people VALUES (1, 'c1@example.com'), (2, 'c2@example.org')",
    )
    segment = rules(where="email LIKE '%.com' AND email NOT LIKE '%%zz'", signals=[SEEN])
    explanation = explain_rules("s", segment, as_of=AS_OF, engine=engine)
    assert "email LIKE '%.com' AND email NOT LIKE '%%zz'" in explanation.sql
    assert explanation.qualifying == 1
    query = compile_rules("s", segment, as_of=AS_OF, engine=engine)
    assert printable_sql(query, engine.dialect) == explanation.sql
    with engine.connect() as connection:  # the printed SQL runs as printed, without parameters
        cursor = connection.connection.cursor()
        cursor.execute(explanation.sql)
        assert len(cursor.fetchall()) == 1
