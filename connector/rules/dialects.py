"""The few expressions that differ between warehouses: event dates in UTC and day differences.

Everything else in a rules query is plain SQL that DuckDB, SQLite, PostgreSQL and Snowflake
share (CTEs, CASE, window functions, ``||``). Each helper is keyed on ``dialect.name``; an
unknown dialect gets the ANSI form, which PostgreSQL-compatible warehouses accept.
"""

from __future__ import annotations

from datetime import date
from typing import Literal

import sqlalchemy as sa
from sqlalchemy.sql.elements import ColumnElement

AtKind = Literal["date", "timestamp", "timestamptz", "text"]
"""How an `at` column stores time: a date, a naive timestamp (taken as UTC), an aware one, text."""


_MICROSECONDS_PER_DAY = 86_400_000_000
_EPOCH = sa.literal_column("DATE '1970-01-01'", sa.Date())


def median_of(values: ColumnElement[int], dialect: str) -> ColumnElement[float] | None:
    """The median aggregate where the warehouse has one (exact for integers); else None."""
    if dialect in ("duckdb", "snowflake"):
        return sa.func.median(values, type_=sa.Float())
    if dialect == "postgresql":
        return sa.func.percentile_cont(0.5).within_group(values)
    return None


def as_of_literal(as_of: date, dialect: str) -> ColumnElement[date]:
    """The reference date as a DATE expression (a bound parameter, or a literal when rendered)."""
    value = sa.literal(as_of, sa.Date())
    if dialect == "sqlite":
        # SQLite has no DATE type: dates are ISO text, which its date functions read directly.
        return value
    return sa.cast(value, sa.Date())


def utc_date(column: ColumnElement[object], kind: AtKind, dialect: str) -> ColumnElement[date]:
    """The UTC calendar date of an event time, whatever the column's type."""
    if dialect == "sqlite":
        # date() understands 'YYYY-MM-DD', 'YYYY-MM-DD HH:MM:SS' and a trailing '+HH:MM' offset,
        # which it converts to UTC; so one form serves dates, naive and aware timestamps.
        return sa.func.date(column, type_=sa.Date())
    if kind == "date":
        return sa.cast(column, sa.Date())
    if kind == "timestamptz":
        if dialect == "duckdb":
            # A TIMESTAMPTZ is microseconds since the epoch in UTC: flooring them to days is
            # exact in a double (< 2**53) and ten times faster than timezone('UTC', ...).
            days = sa.func.floor(sa.func.epoch_us(column) / _MICROSECONDS_PER_DAY)
            return sa.cast(_EPOCH + sa.cast(days, sa.Integer()), sa.Date())
        if dialect == "snowflake":
            utc = sa.func.convert_timezone(sa.literal_column("'UTC'"), column)
        else:
            # PostgreSQL and DuckDB: timezone('UTC', timestamptz) is the UTC wall-clock time.
            utc = sa.func.timezone(sa.literal_column("'UTC'"), column)
        return sa.cast(utc, sa.Date())
    return sa.cast(column, sa.Date())


def days_between(
    later: ColumnElement[date], earlier: ColumnElement[date], dialect: str
) -> ColumnElement[int]:
    """Whole days from ``earlier`` to ``later`` (both DATE expressions), as an integer."""
    if dialect == "sqlite":
        # julianday() of two midnights differs by an exact whole number.
        difference = sa.func.julianday(later) - sa.func.julianday(earlier)
        return sa.cast(difference, sa.Integer())
    if dialect == "duckdb":
        return sa.func.date_diff(sa.literal_column("'day'"), earlier, later, type_=sa.Integer())
    if dialect == "snowflake":
        return sa.func.datediff(sa.literal_column("day"), earlier, later, type_=sa.Integer())
    # PostgreSQL and the ANSI default: date - date is an integer number of days.
    return sa.cast(later - earlier, sa.Integer())
