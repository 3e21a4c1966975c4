"""Hand-computed edge cases of the rules semantics, on DuckDB, SQLite and PostgreSQL.

Each case states the expected rows outright (worked out from DESIGN.md) and also checks that the
reference implementation agrees, so the reference itself is pinned down.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta, timezone
from typing import Any

import pytest
import sqlalchemy as sa

from connector.rules import RulesSegment, SignalCounts, compile_rules, explain_rules
from tests.rules_reference import PREDICATES, load_warehouse, reference_rows

AS_OF = date(2024, 3, 1)


def ago(days: int) -> date:
    return AS_OF - timedelta(days=days)


def person(number: int, *, account: int | None = None, opt_in: int = 1) -> dict[str, Any]:
    return {
        "customer_id": number,
        "account_id": account,
        "email": f"p{number}@example.com",
        "opt_in": opt_in,
    }


def order(number: int, day: date, status: str = "paid") -> dict[str, Any]:
    return {"customer_id": number, "ordered_at": day, "status": status}


def usage(number: int, day: date, credits: int) -> dict[str, Any]:
    return {"customer_id": number, "day": day, "credits": credits}


PURCHASE = {
    "name": "purchase",
    "table": "orders",
    "key": "customer_id",
    "at": "ordered_at",
    "inactive_after": "60d",
}
USAGE = {
    "name": "usage",
    "table": "usage_daily",
    "key": "customer_id",
    "at": "day",
    "value": "credits",
    "window": "10d",
    "baseline": "20d",
    "drop_below": 0.5,
}


@pytest.fixture
def engine(empty_warehouse: sa.Engine) -> sa.Engine:
    """An empty warehouse of each kind."""
    return empty_warehouse


def everyone(segment: RulesSegment) -> RulesSegment:
    """``segment`` returning every person with their computed columns: a score of 0 qualifies
    (a config cannot say so, `min_score` must be at least 1, but tests want to see everyone)."""
    return segment.model_copy(update={"match": "score", "min_score": 0})


def run(
    engine: sa.Engine,
    tables: dict[str, list[dict[str, Any]]],
    config: dict[str, Any],
    *,
    all_people: bool = False,
) -> list[tuple[Any, ...]]:
    """Load, compile, run; and check the reference says the same."""
    segment = RulesSegment.model_validate({"from": "customers", "key": "customer_id", **config})
    if all_people:
        segment = everyone(segment)
    load_warehouse(engine, {"customers": [], **tables})
    query = compile_rules("edge", segment, as_of=AS_OF, engine=engine)
    with engine.connect() as connection:
        rows = [tuple(row) for row in connection.execute(query)]
    expected = reference_rows(
        segment, {"customers": [], **tables}, as_of=AS_OF, predicates=PREDICATES
    )
    assert rows == expected
    return rows


def test_no_events_follow_never(engine: sa.Engine) -> None:
    tables = {"customers": [person(1)], "orders": []}
    inactive = run(engine, tables, {"signals": [PURCHASE]})
    assert inactive == [(1, None, None, 1, "purchase", 0)]
    active = run(engine, tables, {"signals": [{**PURCHASE, "never": "active"}]})
    assert active == []
    # `exclude` drops the person even when another signal makes them qualify.
    other = {**PURCHASE, "name": "other", "never": "inactive"}
    dropped = run(
        engine, tables, {"match": "any", "signals": [{**PURCHASE, "never": "exclude"}, other]}
    )
    assert dropped == []


def test_one_event_with_cadence_uses_inactive_after(engine: sa.Engine) -> None:
    tables = {"customers": [person(1), person(2)], "orders": [order(1, ago(61)), order(2, ago(60))]}
    rows = run(engine, tables, {"signals": [{**PURCHASE, "cadence": 1.0}]})
    assert rows == [(1, ago(61), 61, 1, "purchase", 1)]


def test_events_after_as_of_are_ignored(engine: sa.Engine) -> None:
    tables = {
        "customers": [person(1), person(2)],
        "orders": [order(1, ago(90)), order(1, AS_OF + timedelta(days=1)), order(2, ago(-5))],
    }
    rows = run(engine, tables, {"signals": [PURCHASE]})
    # Person 2's only order is in the future: no event at all, so `never` (inactive) applies.
    assert rows == [(1, ago(90), 90, 1, "purchase", 1), (2, None, None, 1, "purchase", 0)]


def test_median_gap_with_even_count_and_ties(engine: sa.Engine) -> None:
    cadence = {**PURCHASE, "inactive_after": "365d", "cadence": 2.0, "min_events": 3}
    orders = []
    # Persons 1, 2: gaps 10 and 20 (an even count) -> median 15, threshold 30 days.
    for number, last in ((1, 30), (2, 31)):
        orders += [
            order(number, ago(last + 30)),
            order(number, ago(last + 20)),
            order(number, ago(last)),
        ]
    # Person 3: gaps 5, 5, 40 (a tie in the middle) -> median 5, threshold 10; elapsed 11.
    # A duplicated date adds no zero gap.
    for days in (61, 21, 16, 11, 11):
        orders.append(order(3, ago(days)))
    tables = {"customers": [person(1), person(2), person(3)], "orders": orders}
    rows = run(engine, tables, {"signals": [cadence]})
    assert [row[0] for row in rows] == [2, 3]
    assert rows[1] == (3, ago(11), 11, 1, "purchase", 5)


def test_usage_drop_including_zero_usage(engine: sa.Engine) -> None:
    tables = {
        "customers": [person(n) for n in range(1, 6)],
        "usage_daily": [
            usage(1, ago(1), 0),  # W = 0 and B = 0: inactive
            usage(1, ago(15), 0),
            usage(2, ago(1), 4),  # W = 4, B = 20 * 10/20 = 10: 4 < 5, inactive
            usage(2, ago(15), 20),
            usage(3, ago(1), 5),  # W = 5, B = 10: 5 < 5 is false, active
            usage(3, ago(15), 20),
            usage(4, ago(1), 1),  # B = 0 but W > 0: active
            usage(5, ago(40), 9),  # only older than window + baseline: W = B = 0, inactive
        ],
    }
    rows = run(engine, tables, {"signals": [USAGE]})
    assert [(row[0], row[-2]) for row in rows] == [(1, "usage"), (2, "usage"), (5, "usage")]


def test_account_with_one_active_contact_is_left_out(engine: sa.Engine) -> None:
    tables = {
        "customers": [
            person(1, account=7),
            person(2, account=7),
            person(3, account=7, opt_in=0),
            person(4, account=8),
            person(5, account=8, opt_in=0),
            person(6),
        ],
        "orders": [
            order(1, ago(100)),
            order(2, ago(100)),
            order(3, ago(5)),  # the one active contact, not even a campaign recipient
            order(4, ago(100)),
            order(5, ago(200)),
            order(6, ago(5)),
        ],
    }
    config = {"signals": [PURCHASE], "group_by": "account_id", "where": "opt_in = 1"}
    rows = run(engine, tables, config)
    assert [row[0] for row in rows] == [4]


def test_overlapping_exclusions(engine: sa.Engine) -> None:
    tables = {
        "customers": [person(n) for n in range(1, 5)],
        "orders": [],
        "tickets": [
            {"customer_id": 1, "status": "open"},
            {"customer_id": 1, "status": "open"},
            {"customer_id": 2, "status": "closed"},
            {"customer_id": 3, "status": "open"},
        ],
        "unsubscribes": [{"customer_id": 1}, {"customer_id": 2}],
    }
    config = {
        "signals": [PURCHASE],
        "exclude": [
            {"table": "tickets", "key": "customer_id", "where": "status = 'open'"},
            {"table": "unsubscribes", "key": "customer_id"},
        ],
    }
    assert [row[0] for row in run(engine, tables, config)] == [4]


def test_time_zones_and_timestamps_count_on_the_utc_date(engine: sa.Engine) -> None:
    east, west = timezone(timedelta(hours=9)), timezone(timedelta(hours=-5))
    tables = {
        "customers": [person(1), person(2), person(3)],
        # 2024-02-29 23:30 at UTC-5 is 2024-03-01 04:30 UTC: elapsed 0.
        # 2024-03-01 08:00 at UTC+9 is 2024-02-29 23:00 UTC: elapsed 1.
        # 2024-03-01 23:30 at UTC-5 is 2024-03-02 UTC: after as_of, ignored.
        "email_events": [
            {
                "customer_id": 1,
                "occurred_at": datetime(2024, 2, 29, 23, 30, tzinfo=west),
                "kind": "open",
            },
            {
                "customer_id": 2,
                "occurred_at": datetime(2024, 3, 1, 8, 0, tzinfo=east),
                "kind": "open",
            },
            {
                "customer_id": 3,
                "occurred_at": datetime(2024, 3, 1, 23, 30, tzinfo=west),
                "kind": "open",
            },
        ],
        # Naive timestamps are UTC: the last second of a day is still that day.
        "visits": [{"customer_id": 3, "visited_at": datetime(2024, 2, 28, 23, 59, 59)}],
    }
    email = {"name": "email", "table": "email_events", "key": "customer_id", "at": "occurred_at"}
    visit = {"name": "visit", "table": "visits", "key": "customer_id", "at": "visited_at"}
    config = {"signals": [{**email, "inactive_after": "1d"}, {**visit, "inactive_after": "1d"}]}
    rows = run(engine, tables, config, all_people=True)
    assert rows == [
        (1, AS_OF, 0, 1, "visit", 1),
        (2, ago(1), 1, 1, "visit", 1),
        (3, ago(2), 2, 2, "email,visit", 1),
    ]


def test_lost_after_leaves_out_the_long_gone_but_not_the_never_active(engine: sa.Engine) -> None:
    tables = {
        "customers": [person(1), person(2), person(3)],
        "orders": [order(1, ago(91)), order(2, ago(90))],
    }
    rows = run(engine, tables, {"signals": [PURCHASE], "lost_after": "90d"})
    assert [row[0] for row in rows] == [2, 3]


def test_having_and_inactive_signals_in_config_order(engine: sa.Engine) -> None:
    tables = {
        "customers": [person(1), person(2)],
        "orders": [order(1, ago(100)), order(2, ago(1))],
        "usage_daily": [usage(1, ago(2), 0), usage(2, ago(2), 3)],
    }
    config = {
        "match": "score",
        "min_score": 1,
        "signals": [{**USAGE, "weight": 2}, PURCHASE],
        "having": "score >= 0",
    }
    rows = run(engine, tables, config, all_people=True)
    assert rows == [(1, ago(2), 2, 3, "usage,purchase", 2), (2, ago(1), 1, 0, "", 2)]
    narrowed = run(engine, tables, {**config, "having": "days_inactive > 1"}, all_people=True)
    assert [row[0] for row in narrowed] == [1]


def test_explain_counts_signals_over_the_population(engine: sa.Engine) -> None:
    tables = {
        "customers": [person(1), person(2), person(3), person(4, opt_in=0)],
        "orders": [order(1, ago(100)), order(2, ago(1)), order(4, ago(100))],
    }
    load_warehouse(engine, tables)
    segment = RulesSegment.model_validate(
        {"from": "customers", "key": "customer_id", "where": "opt_in = 1", "signals": [PURCHASE]}
    )
    explanation = explain_rules("lapsed", segment, as_of=AS_OF, engine=engine)
    assert explanation.signals == [SignalCounts("purchase", inactive=1, active=1, never=1)]
    assert explanation.qualifying == 2
    assert "2024-03-01" in explanation.sql
    assert "opt_in = 1" in explanation.sql


@pytest.mark.parametrize(
    "warehouse", ["duckdb", pytest.param("postgresql", marks=pytest.mark.postgres)]
)
def test_session_time_zone_does_not_move_events(
    warehouse: str, request: pytest.FixtureRequest
) -> None:
    """Events count on their UTC date even when the warehouse session runs in Tokyo."""
    if warehouse == "duckdb":
        tokyo = sa.create_engine("duckdb:///:memory:")

        @sa.event.listens_for(tokyo, "connect")
        def _in_tokyo(connection: Any, _: Any) -> None:
            connection.execute("SET TimeZone = 'Asia/Tokyo'")

    else:
        tokyo = sa.create_engine(
            request.getfixturevalue("postgres_url"),
            connect_args={"options": "-c timezone=Asia/Tokyo"},
        )
    try:
        with tokyo.connect() as connection:
            zone = connection.execute(sa.text("SELECT current_setting('TimeZone')")).scalar()
        assert zone == "Asia/Tokyo"
        rows = run(
            tokyo,
            {
                "customers": [person(1)],
                # 20:00 UTC on Feb 28 is already Feb 29 in Tokyo: still Feb 28 here.
                "email_events": [
                    {
                        "customer_id": 1,
                        "occurred_at": datetime(2024, 2, 28, 20, 0, tzinfo=UTC),
                        "kind": "open",
                    }
                ],
                "visits": [{"customer_id": 1, "visited_at": datetime(2024, 2, 28, 20, 0)}],
            },
            {
                "signals": [
                    {
                        "name": "email",
                        "table": "email_events",
                        "key": "customer_id",
                        "at": "occurred_at",
                        "inactive_after": "1d",
                    },
                    {
                        "name": "visit",
                        "table": "visits",
                        "key": "customer_id",
                        "at": "visited_at",
                        "inactive_after": "1d",
                    },
                ],
            },
            all_people=True,
        )
        assert rows == [(1, ago(2), 2, 2, "email,visit", 2)]
    finally:
        tokyo.dispose()


def test_views_and_reserved_words_as_names(engine: sa.Engine) -> None:
    """`from` and signal tables may be views; identifiers like `order` and `at` are quoted."""
    statements = [
        'CREATE TABLE t_people (id INTEGER, "order" INTEGER)',
        'CREATE TABLE t_events (id INTEGER, "at" TIMESTAMP)',
        "INSERT INTO t_people VALUES (1, 10), (2, 20)",
        "INSERT INTO t_events VALUES (1, '2024-01-01 10:00:00')",
        "CREATE VIEW v_people AS SELECT * FROM t_people",
        'CREATE VIEW v_events AS SELECT id, "at" FROM t_events',
    ]
    with engine.begin() as connection:
        for statement in statements:
            connection.execute(sa.text(statement))
    segment = RulesSegment.model_validate(
        {
            "from": "v_people",
            "key": "id",
            "columns": ["order"],
            "signals": [
                {
                    "name": "seen",
                    "table": "v_events",
                    "key": "id",
                    "at": "at",
                    "inactive_after": "9w",
                }
            ],
        }
    )
    query = compile_rules("views", everyone(segment), as_of=AS_OF, engine=engine)
    with engine.connect() as connection:
        rows = [tuple(row) for row in connection.execute(query)]
    assert rows == [(1, 10, date(2024, 1, 1), 60, 0, "", 1), (2, 20, None, None, 1, "seen", 0)]


def test_schema_qualified_tables(engine: sa.Engine) -> None:
    if engine.dialect.name == "sqlite":
        pytest.skip("SQLite has schemas only through ATTACH")
    with engine.begin() as connection:
        connection.execute(sa.text("CREATE SCHEMA analytics"))
        connection.execute(sa.text("CREATE TABLE analytics.people (id INTEGER)"))
        connection.execute(sa.text("CREATE TABLE analytics.events (id INTEGER, ts TIMESTAMPTZ)"))
        connection.execute(sa.text("INSERT INTO analytics.people VALUES (1), (2)"))
        connection.execute(
            sa.text("INSERT INTO analytics.events VALUES (1, '2024-01-01 23:30:00-05')")
        )
    segment = RulesSegment.model_validate(
        {
            "from": "analytics.people",
            "key": "id",
            "signals": [
                {
                    "name": "seen",
                    "table": "analytics.events",
                    "key": "id",
                    "at": "ts",
                    "inactive_after": "10d",
                }
            ],
        }
    )
    query = compile_rules("schemas", everyone(segment), as_of=AS_OF, engine=engine)
    with engine.connect() as connection:
        rows = [tuple(row) for row in connection.execute(query)]
    # 23:30 at UTC-5 is the next day in UTC: the time zone was recognised inside the schema.
    assert rows == [(1, date(2024, 1, 2), 59, 1, "seen", 1), (2, None, None, 1, "seen", 0)]


def test_cadence_boundary_is_exact(engine: sa.Engine) -> None:
    """cadence 0.57 with gaps of 100 days: the threshold is exactly 57 days (not 56.99...)."""
    cadence = {**PURCHASE, "inactive_after": "365d", "cadence": 0.57}
    # Person 1 last ordered 57 days ago (active), person 2 58 days ago (inactive).
    orders = [order(n, ago(last + gap)) for n, last in ((1, 57), (2, 58)) for gap in (200, 100, 0)]
    tables = {"customers": [person(1), person(2)], "orders": orders}
    rows = run(engine, tables, {"signals": [cadence]})
    assert [row[0] for row in rows] == [2]


@pytest.mark.parametrize(("recent", "inactive"), [(55, False), (54, True)])
def test_drop_below_boundary_is_exact(engine: sa.Engine, recent: int, inactive: bool) -> None:
    """drop_below 0.55 against an average of 100 per window: 55 is not below 55."""
    share = {**USAGE, "drop_below": 0.55}  # window 10d, baseline 20d: B = 200 * 10 / 20 = 100
    tables = {
        "customers": [person(1)],
        "usage_daily": [usage(1, ago(1), recent), usage(1, ago(12), 150), usage(1, ago(25), 50)],
    }
    rows = run(engine, tables, {"signals": [share]})
    assert [row[0] for row in rows] == ([1] if inactive else [])
