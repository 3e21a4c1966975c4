"""Random people, events and rules segments: the SQL must agree with the Python reference.

Each example loads a small warehouse (events around `as_of`, after it, duplicated, as dates,
naive and aware timestamps) into DuckDB, SQLite or PostgreSQL, compiles a random segment with
`compile_rules` and compares every returned row, computed columns included, with
`tests/rules_reference.py`.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta, timezone
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from connector.rules import RulesSegment, compile_rules
from tests.rules_reference import PREDICATES, load_warehouse, reference_rows

AS_OF = date(2024, 3, 1)
MAX_PEOPLE = 7

keys = st.one_of(st.none(), st.integers(1, MAX_PEOPLE + 1))  # + orphans and NULL keys
days = st.integers(-90, 4).map(lambda offset: AS_OF + timedelta(days=offset))
times = st.times().map(lambda t: t.replace(microsecond=0))
offsets = st.integers(-12, 14).map(lambda hours: timezone(timedelta(hours=hours)))


def _aware(day: date, at: time, zone: timezone) -> datetime:
    return datetime.combine(day, at, tzinfo=zone)


@st.composite
def warehouses(draw: st.DrawFn) -> dict[str, list[dict[str, Any]]]:
    """Tables of a small random warehouse."""
    people = [
        {
            "customer_id": number,
            "account_id": draw(st.sampled_from([None, 1, 2, 3])),
            "email": f"p{number}@example.com",
            "opt_in": draw(st.sampled_from([0, 1, None])),
        }
        for number in range(1, draw(st.integers(0, MAX_PEOPLE) | st.just(MAX_PEOPLE)) + 1)
    ]

    def rows(size: int = 20, **columns: st.SearchStrategy[Any]) -> list[dict[str, Any]]:
        return draw(st.lists(st.fixed_dictionaries(columns), max_size=size))

    return {
        "customers": people,
        "orders": rows(
            customer_id=keys, ordered_at=days, status=st.sampled_from(["paid", "cancelled", None])
        ),
        "email_events": rows(
            customer_id=keys,
            occurred_at=st.builds(_aware, days, times, offsets),
            kind=st.sampled_from(["open", "click"]),
        ),
        "visits": rows(customer_id=keys, visited_at=st.builds(datetime.combine, days, times)),
        "usage_daily": rows(
            customer_id=keys, day=days, credits=st.one_of(st.none(), st.integers(0, 20))
        ),
        "tickets": rows(3, customer_id=keys, status=st.sampled_from(["open", "closed"])),
        "unsubscribes": rows(2, customer_id=keys),
    }


durations = st.builds(
    lambda n, unit: f"{n}{unit}",
    st.integers(1, 8),
    st.sampled_from(["d", "w"]),
) | st.integers(1, 60).map(lambda n: f"{n}d")

# Decimals that are not binary fractions too: the SQL must use them as written, like the
# reference (0.57 is 57/100, not the float just below it).
cadences = st.sampled_from([0.5, 0.57, 1.0, 1.1, 1.5, 2.0, 2.5, 3.0, 0.3])
shares = st.sampled_from([0.0, 0.25, 0.3, 0.5, 0.55, 0.75, 1.0, 1.1, 1.5])


@st.composite
def signals(draw: st.DrawFn, name: str, *, weighted: bool) -> dict[str, Any]:
    """One random signal config: recency (with or without cadence) or usage drop; with a
    `weight` when the segment is scored."""
    kind = draw(st.sampled_from(["orders", "email_events", "visits", "usage_daily"]))
    common = {
        "name": name,
        "table": kind,
        "key": "customer_id",
        "never": draw(st.sampled_from(["inactive", "inactive", "active", "exclude"])),
        **({"weight": draw(st.integers(0, 3))} if weighted else {}),
    }
    if kind == "usage_daily":
        where = draw(st.sampled_from([None, "credits > 0"]))
        return {
            **common,
            "at": "day",
            "value": "credits",
            "window": draw(durations),
            "baseline": draw(durations),
            "drop_below": draw(shares),
            **({"where": where} if where else {}),
        }
    at = {"orders": "ordered_at", "email_events": "occurred_at", "visits": "visited_at"}[kind]
    where = {"orders": "status <> 'cancelled'", "email_events": "kind = 'open'"}.get(kind)
    config = {**common, "at": at, "inactive_after": draw(durations)}
    if where and draw(st.booleans()):
        config["where"] = where
    if draw(st.booleans()):
        config["cadence"] = draw(cadences)
        config["min_events"] = draw(st.integers(2, 4))
    return config


@st.composite
def segments(draw: st.DrawFn) -> RulesSegment:
    """A random rules segment over the test warehouse."""
    match = draw(st.sampled_from(["all", "any", "score"]))
    scored = match == "score"
    chosen = [draw(signals(f"s{i}", weighted=scored)) for i in range(draw(st.integers(1, 3)))]
    config: dict[str, Any] = {
        "from": "customers",
        "key": "customer_id",
        "columns": draw(st.sampled_from([[], ["email"], ["email", "opt_in"], ["account_id"]])),
        "match": match,
        "signals": chosen,
        "exclude": draw(
            st.lists(
                st.sampled_from(
                    [
                        {"table": "tickets", "key": "customer_id", "where": "status = 'open'"},
                        {"table": "tickets", "key": "customer_id"},
                        {"table": "unsubscribes", "key": "customer_id"},
                    ]
                ),
                max_size=2,
            )
        ),
    }
    if scored:
        if not any(s["weight"] for s in chosen):
            chosen[0]["weight"] = 1  # a score nobody can reach is a config error
        config["min_score"] = draw(st.integers(1, sum(s["weight"] for s in chosen)))
    optional = {
        "where": st.just("opt_in = 1"),
        "lost_after": durations,
        "group_by": st.just("account_id"),
        "having": st.sampled_from(["days_inactive < 30", "events >= 2", "score >= 1"]),
    }
    for option, values in optional.items():
        if draw(st.integers(0, 2)) == 0:
            config[option] = draw(values)
    return RulesSegment.model_validate(config)


def check_against_reference(
    engine: sa.Engine, tables: dict[str, list[dict[str, Any]]], segment: RulesSegment
) -> None:
    """Load ``tables``, run the compiled segment and compare with the reference rows."""
    load_warehouse(engine, tables)
    query = compile_rules("random", segment, as_of=AS_OF, engine=engine)
    with engine.connect() as connection:
        got = [tuple(row) for row in connection.execute(query)]
    expected = reference_rows(segment, tables, as_of=AS_OF, predicates=PREDICATES)
    assert got == expected, segment.model_dump(exclude_defaults=True)
    event(f"rows returned: {min(len(got), 3)}{'+' if len(got) >= 3 else ''}")
    # Everyone (but `never = "exclude"` drop-outs) with their computed columns: checks each
    # signal's verdict for every person, whatever the filters above left.
    everyone = segment.model_copy(
        update={
            "match": "score",
            "min_score": 0,
            "where": None,
            "having": None,
            "lost_after": None,
            "group_by": None,
            "exclude": [],
        }
    )
    query = compile_rules("everyone", everyone, as_of=AS_OF, engine=engine)
    with engine.connect() as connection:
        got = [tuple(row) for row in connection.execute(query)]
    expected = reference_rows(everyone, tables, as_of=AS_OF, predicates=PREDICATES)
    assert got == expected, everyone.model_dump(exclude_defaults=True)
    event(f"people judged: {min(len(got), 3)}{'+' if len(got) >= 3 else ''}")


EXAMPLES = settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@EXAMPLES
@given(tables=warehouses(), segment=segments())
def test_duckdb_matches_reference(
    tables: dict[str, list[dict[str, Any]]], segment: RulesSegment
) -> None:
    engine = sa.create_engine("duckdb:///:memory:")
    try:
        check_against_reference(engine, tables, segment)
    finally:
        engine.dispose()


@settings(EXAMPLES, max_examples=60)
@given(tables=warehouses(), segment=segments())
def test_sqlite_matches_reference(
    tables: dict[str, list[dict[str, Any]]], segment: RulesSegment
) -> None:
    engine = sa.create_engine("sqlite://")
    try:
        check_against_reference(engine, tables, segment)
    finally:
        engine.dispose()


@pytest.fixture
def postgres_engine(postgres_url: str) -> Any:
    engine = sa.create_engine(postgres_url)
    yield engine
    engine.dispose()


@pytest.mark.postgres
@EXAMPLES
@given(tables=warehouses(), segment=segments())
def test_postgres_matches_reference(
    postgres_engine: sa.Engine, tables: dict[str, list[dict[str, Any]]], segment: RulesSegment
) -> None:
    check_against_reference(postgres_engine, tables, segment)


def test_aware_timestamps_are_generated_in_many_zones() -> None:
    """Guard the generator: an event late in the evening west of UTC lands on the next UTC day."""
    event = _aware(date(2024, 2, 29), time(23, 0), timezone(timedelta(hours=-5)))
    assert event.astimezone(UTC).date() == date(2024, 3, 1)
