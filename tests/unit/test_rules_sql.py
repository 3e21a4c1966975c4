"""The SQL a rules segment compiles to, per dialect, without a warehouse."""

from __future__ import annotations

from datetime import date
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as postgresql_module
from sqlalchemy.dialects import sqlite as sqlite_module

from connector.rules import RulesSegment
from connector.rules.dialects import AtKind
from connector.rules.query import build_rules_query

SEGMENT = RulesSegment.model_validate(
    {
        "from": "analytics.customers",
        "key": "customer_id",
        "columns": ["email", "first name"],
        "where": "marketing_opt_in AND note <> 'a :b'",
        "match": "score",
        "min_score": 2,
        "lost_after": "730d",
        "group_by": "account_id",
        "having": "days_inactive < 400",
        "signals": [
            {
                "name": "purchase",
                "table": "orders",
                "key": "customer_id",
                "at": "ordered_at",
                "where": "status <> 'cancelled'",
                "inactive_after": "180d",
                "cadence": 2.0,
                "weight": 2,
            },
            {
                "name": "email",
                "table": "email_events",
                "key": "customer_id",
                "at": "occurred_at",
                "inactive_after": "90d",
            },
            {
                "name": "usage",
                "table": "usage_daily",
                "key": "customer_id",
                "at": "day",
                "value": "credits_used",
                "window": "30d",
                "baseline": "180d",
                "drop_below": 0.3,
            },
        ],
        "exclude": [{"table": "support_tickets", "key": "customer_id", "where": "status = 'open'"}],
    }
)
postgresql: Any = postgresql_module
sqlite: Any = sqlite_module
KINDS: list[AtKind] = ["timestamp", "timestamptz", "date"]


def render(dialect: Any, name: str) -> str:
    query = build_rules_query(SEGMENT, as_of=date(2026, 11, 1), dialect=name, at_kinds=KINDS)
    return str(query.select.compile(dialect=dialect, compile_kwargs={"literal_binds": True}))


def test_snowflake_compiles_with_its_date_functions() -> None:
    snowdialect = pytest.importorskip("snowflake.sqlalchemy.snowdialect")
    sql = render(snowdialect.dialect(), "snowflake")
    assert "convert_timezone('UTC', email_events.occurred_at)" in sql
    assert "datediff(day, " in sql
    assert "analytics.customers" in sql
    assert "'2026-11-01'" in sql


def test_postgres_uses_date_subtraction_and_timezone() -> None:
    sql = render(postgresql.dialect(), "postgresql")
    assert "timezone('UTC', email_events.occurred_at)" in sql
    assert "CAST(CAST('2026-11-01' AS DATE) - wb_stats_0.last AS INTEGER)" in sql


def test_sqlite_reads_every_time_with_date_and_julianday() -> None:
    sql = render(sqlite.dialect(), "sqlite")
    assert "date(email_events.occurred_at)" in sql
    assert "julianday('2026-11-01')" in sql


def test_identifiers_are_quoted_and_fragments_kept_verbatim() -> None:
    sql = render(postgresql.dialect(), "postgresql")
    assert 'customers."first name"' in sql
    assert "(marketing_opt_in AND note <> 'a :b')" in sql
    assert "(days_inactive < 400)" in sql
    assert "ORDER BY wb_segment.customer_id ASC NULLS LAST" in sql


def test_result_columns_in_order() -> None:
    query = build_rules_query(SEGMENT, as_of=date(2026, 11, 1), dialect="duckdb", at_kinds=KINDS)
    assert [c.name for c in query.select.selected_columns] == [
        "customer_id",
        "email",
        "first name",
        "last_activity_at",
        "days_inactive",
        "score",
        "inactive_signals",
        "events",
    ]


def test_as_of_is_a_bound_parameter_when_not_rendered() -> None:
    query = build_rules_query(SEGMENT, as_of=date(2026, 11, 1), dialect="duckdb", at_kinds=KINDS)
    compiled = query.select.compile(dialect=postgresql.dialect())
    assert date(2026, 11, 1) in compiled.params.values()
    assert "2026-11-01" not in str(compiled)
    assert isinstance(query.select, sa.Select)


def test_median_uses_the_warehouse_aggregate_or_portable_ranking() -> None:
    assert "percentile_cont(0.5) WITHIN GROUP" in render(postgresql.dialect(), "postgresql")
    assert "row_number() OVER" in render(sqlite.dialect(), "sqlite")
    duckdb = render(postgresql.dialect(), "duckdb")  # duckdb-engine compiles as PostgreSQL
    assert "median(" in duckdb
    assert "epoch_us(email_events.occurred_at)" in duckdb
