"""A plain-Python reading of DESIGN.md's rules semantics, to check the SQL against.

Written for obviousness, not speed: every person is judged by walking the rows. SQL fragments
(`where`, exclusion `where`) are given as Python predicates keyed by their text; `having` is
limited to ``<computed column> <op> <integer>``, evaluated here with SQL's NULL rules.
"""

from __future__ import annotations

import operator
import re
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from fractions import Fraction
from itertools import pairwise
from typing import Any

from connector.rules import RulesSegment, Signal

Row = Mapping[str, Any]
Predicate = Callable[[Row], bool]

_HAVING = re.compile(r"^\s*(\w+)\s*(<=|>=|<>|=|<|>)\s*(-?\d+)\s*$")
_OPERATORS: dict[str, Callable[[Any, Any], bool]] = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
    "=": operator.eq,
    "<>": operator.ne,
}


@dataclass(frozen=True)
class Verdict:
    """How one person fares on one signal."""

    has_events: bool
    inactive: bool
    last: date | None
    events: int


def utc_day(value: date | datetime) -> date:
    """The UTC date of an event: aware timestamps converted, naive ones taken as UTC."""
    if isinstance(value, datetime):
        if value.tzinfo is not None:
            value = value.astimezone(UTC)
        return value.date()
    return value


def median_gap(days: Sequence[date]) -> Fraction:
    """Median of the differences between consecutive distinct dates."""
    distinct = sorted(set(days))
    gaps = [(later - earlier).days for earlier, later in pairwise(distinct)]
    return Fraction(statistics.median(gaps))


def judge(
    signal: Signal,
    person_key: Any,
    rows: Sequence[Row],
    *,
    as_of: date,
    where: Predicate,
) -> Verdict:
    """Apply one signal to one person."""
    mine = [
        row
        for row in rows
        if row[signal.key] is not None
        and row[signal.key] == person_key
        and row[signal.at] is not None
        and where(row)
        and utc_day(row[signal.at]) <= as_of
    ]
    if not mine:
        return Verdict(False, signal.never != "active", None, 0)
    days = [utc_day(row[signal.at]) for row in mine]
    last = max(days)
    elapsed = (as_of - last).days
    if signal.value is not None:
        assert signal.window and signal.baseline and signal.drop_below is not None
        window, baseline = signal.window, signal.baseline
        recent = sum(
            (row[signal.value] or 0)
            for row, day in zip(mine, days, strict=True)
            if 0 <= (as_of - day).days < window
        )
        before_total = sum(
            (row[signal.value] or 0)
            for row, day in zip(mine, days, strict=True)
            if window <= (as_of - day).days < window + baseline
        )
        before = Fraction(before_total) * window / baseline
        share = Fraction(str(signal.drop_below))  # the decimal as written: 0.55 is 55/100
        inactive = recent < share * before or (recent == 0 and before == 0)
    else:
        assert signal.inactive_after is not None
        threshold = Fraction(signal.inactive_after)
        if signal.cadence is not None and len(set(days)) >= signal.min_events:
            threshold = Fraction(str(signal.cadence)) * median_gap(days)
        inactive = elapsed > threshold
    return Verdict(True, inactive, last, len(mine))


def having_holds(having: str, row: Mapping[str, Any]) -> bool:
    """Evaluate ``column op integer``; a NULL column makes it false, as in SQL."""
    match = _HAVING.match(having)
    if match is None:
        raise ValueError(f"the reference only understands `column op integer`, not `{having}`")
    column, op, number = match.groups()
    value = row[column]
    return value is not None and _OPERATORS[op](value, int(number))


def reference_rows(
    segment: RulesSegment,
    tables: Mapping[str, Sequence[Row]],
    *,
    as_of: date,
    predicates: Mapping[str, Predicate],
) -> list[tuple[Any, ...]]:
    """The rows segment returns: key, columns, then the computed columns, ordered by key."""

    def condition(fragment: str | None) -> Predicate:
        return (lambda row: True) if fragment is None else predicates[fragment]

    people = tables[segment.from_]
    computed: list[dict[str, Any]] = []
    for person in people:
        verdicts = [
            judge(
                signal,
                person[segment.key],
                tables[signal.table],
                as_of=as_of,
                where=condition(signal.where),
            )
            for signal in segment.signals
        ]
        inactive = [verdict.inactive for verdict in verdicts]
        score = sum(s.weight for s, flag in zip(segment.signals, inactive, strict=True) if flag)
        if segment.match == "all":
            matched = all(inactive)
        elif segment.match == "any":
            matched = any(inactive)
        else:
            assert segment.min_score is not None
            matched = score >= segment.min_score
        lasts = [verdict.last for verdict in verdicts if verdict.last is not None]
        last = max(lasts) if lasts else None
        computed.append(
            {
                "matched": matched,
                "never_excluded": any(
                    s.never == "exclude" and not v.has_events
                    for s, v in zip(segment.signals, verdicts, strict=True)
                ),
                "last_activity_at": last,
                "days_inactive": (as_of - last).days if last is not None else None,
                "score": score,
                "inactive_signals": ",".join(
                    s.name for s, flag in zip(segment.signals, inactive, strict=True) if flag
                ),
                "events": sum(verdict.events for verdict in verdicts),
            }
        )

    result = []
    for person, facts in zip(people, computed, strict=True):
        qualifies = facts["matched"]
        group_by = segment.group_by
        group = person[group_by] if group_by else None
        if group_by is not None and group is not None:
            qualifies = all(
                other_facts["matched"]
                for other, other_facts in zip(people, computed, strict=True)
                if other[group_by] == group
            )
        if not qualifies or facts["never_excluded"]:
            continue
        days_inactive = facts["days_inactive"]
        lost = segment.lost_after is not None and days_inactive is not None
        if lost and days_inactive > segment.lost_after:
            continue
        if not condition(segment.where)(person):
            continue
        if any(
            row[exclusion.key] is not None
            and row[exclusion.key] == person[segment.key]
            and condition(exclusion.where)(row)
            for exclusion in segment.exclude
            for row in tables[exclusion.table]
        ):
            continue
        if segment.having is not None and not having_holds(segment.having, facts):
            continue
        result.append(
            (
                person[segment.key],
                *(person[column] for column in segment.columns),
                facts["last_activity_at"],
                facts["days_inactive"],
                facts["score"],
                facts["inactive_signals"],
                facts["events"],
            )
        )
    return sorted(result, key=lambda row: (row[0] is None, row[0]))


# --- The test warehouse -------------------------------------------------------------------------
# One schema loaded into DuckDB, SQLite and PostgreSQL by the rules tests. Times come in all three
# shapes: `orders.ordered_at` is a DATE, `visits.visited_at` a naive TIMESTAMP (taken as UTC) and
# `email_events.occurred_at` a TIMESTAMP WITH TIME ZONE (ISO text with an offset in SQLite).


def warehouse_metadata(dialect: str) -> Any:
    """The test tables for ``dialect`` (SQLite keeps aware timestamps as ISO-8601 text)."""
    import sqlalchemy as sa

    aware: Any = sa.String() if dialect == "sqlite" else sa.DateTime(timezone=True)
    metadata = sa.MetaData()
    sa.Table(
        "customers",
        metadata,
        sa.Column("customer_id", sa.Integer),
        sa.Column("account_id", sa.Integer),
        sa.Column("email", sa.String),
        sa.Column("opt_in", sa.Integer),
    )
    sa.Table(
        "orders",
        metadata,
        sa.Column("customer_id", sa.Integer),
        sa.Column("ordered_at", sa.Date),
        sa.Column("status", sa.String),
    )
    sa.Table(
        "email_events",
        metadata,
        sa.Column("customer_id", sa.Integer),
        sa.Column("occurred_at", aware),
        sa.Column("kind", sa.String),
    )
    sa.Table(
        "visits",
        metadata,
        sa.Column("customer_id", sa.Integer),
        sa.Column("visited_at", sa.DateTime),
    )
    sa.Table(
        "usage_daily",
        metadata,
        sa.Column("customer_id", sa.Integer),
        sa.Column("day", sa.Date),
        sa.Column("credits", sa.Integer),
    )
    sa.Table(
        "tickets", metadata, sa.Column("customer_id", sa.Integer), sa.Column("status", sa.String)
    )
    sa.Table("unsubscribes", metadata, sa.Column("customer_id", sa.Integer))
    return metadata


TABLE_NAMES = (
    "customers",
    "orders",
    "email_events",
    "visits",
    "usage_daily",
    "tickets",
    "unsubscribes",
)

PREDICATES: dict[str, Predicate] = {
    "opt_in = 1": lambda row: row["opt_in"] == 1,
    "status <> 'cancelled'": lambda row: row["status"] is not None and row["status"] != "cancelled",
    "kind = 'open'": lambda row: row["kind"] == "open",
    "status = 'open'": lambda row: row["status"] == "open",
    "credits > 0": lambda row: row["credits"] is not None and row["credits"] > 0,
}
"""The SQL fragments the tests use, with their Python meaning (NULL compares as false)."""


def load_warehouse(engine: Any, tables: Mapping[str, Sequence[Row]]) -> None:
    """Replace the test tables in ``engine``'s database with ``tables`` (missing ones empty)."""
    metadata = warehouse_metadata(engine.dialect.name)
    metadata.drop_all(engine)
    metadata.create_all(engine)
    with engine.begin() as connection:
        for name, rows in tables.items():
            if not rows:
                continue
            table = metadata.tables[name]
            connection.execute(
                table.insert(), [_storable(engine.dialect.name, row) for row in rows]
            )


def _storable(dialect: str, row: Row) -> dict[str, Any]:
    if dialect != "sqlite":
        return dict(row)
    return {
        column: value.isoformat() if isinstance(value, datetime) and value.tzinfo else value
        for column, value in row.items()
    }
