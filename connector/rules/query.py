"""Build the SQLAlchemy Core query of a rules segment (no warehouse access here).

The query is one ``SELECT`` made of CTEs, read top to bottom:

``wb_people``
    the ``from`` table: key, ``columns``, the ``group_by`` column. Its ``where`` filters rows here,
    or, with ``group_by``, becomes a ``_wb_wanted`` flag (the account check needs every contact).
``wb_events_N``
    signal N's rows (its ``where``, non-null key and time) with the UTC event date ``d``;
    events after ``as_of`` are left out here.
``wb_stats_N``
    per person: ``last`` date, ``n`` events and, for usage signals, ``w``/``b``: SUM(value) over
    the window and the baseline (rows compared with boundary dates computed in Python, so no
    per-row date arithmetic).
``wb_median_N`` (cadence signals)
    per person: twice the median gap between distinct event dates (``LAG`` gives the gaps) and
    the count of dates. The warehouse's median aggregate where it has one (DuckDB, Snowflake
    ``MEDIAN``, PostgreSQL ``percentile_cont``: exact for integers), else portable SQL:
    ``MIN + MAX`` of the one or two middle gaps ranked with ``ROW_NUMBER``.
``wb_flags``
    the people left-joined to every signal: ``_wb_has_N``, ``_wb_inactive_N`` (0/1, judged on
    elapsed = ``as_of`` - last date) and the per-signal last date and event count.
``wb_segment``
    computed columns (score, inactive_signals, days_inactive, last_activity_at, events) and
    ``_wb_keep``: match (or, with ``group_by``, match of every contact of the group), no
    ``never = "exclude"`` signal without events, not lost, wanted.

A signal with ``never = "exclude"`` counts as inactive (for match and score) for someone without
events, so such a contact never keeps an account active; that person is then left out.

The final ``SELECT`` reads ``wb_segment`` where ``_wb_keep = 1``, no exclusion matches
(``NOT EXISTS``) and ``having`` holds, ordered by key (NULL keys last).

All arithmetic is on whole days and integers, so DuckDB, SQLite and PostgreSQL agree:
``cadence`` and ``drop_below`` are taken as the exact fractions p/q written in the config
(0.57 is 57/100), the median is kept doubled, and the rules are compared as
``2 * elapsed * q > p * (2 * median)`` and, for ``W < drop_below * B * window / baseline``,
``W * baseline * q < p * B * window`` (in NUMERIC on PostgreSQL, whose integer sums overflow). ``inactive_signals`` is an empty string (not NULL)
when no signal is inactive. ``events`` counts event rows (duplicates included, a usage row
whatever its value) dated on or before ``as_of``, over all signals.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.sql.elements import ColumnElement, TextClause

from connector.rules.dialects import AtKind, as_of_literal, days_between, median_of, utc_date
from connector.rules.model import COMPUTED_COLUMNS, RulesSegment, Signal

_WANTED = "_wb_wanted"
_KEEP = "_wb_keep"
_NEVER_VALUE = {"inactive": 1, "active": 0, "exclude": 1}


@dataclass(frozen=True)
class RulesQuery:
    """The segment query and the per-person flags it is built on (``explain_rules`` reads them)."""

    select: sa.Select[Any]
    flags: sa.CTE
    signals: tuple[Signal, ...]

    def signal_counts(self) -> sa.Select[Any]:
        """One row: for every signal, how many people are inactive, active, and without events."""
        has_wanted = _WANTED in self.flags.c
        columns: list[ColumnElement[Any]] = []
        for index, _ in enumerate(self.signals):
            has = self.flags.c[f"_wb_has_{index}"]
            inactive = self.flags.c[f"_wb_inactive_{index}"]
            columns += [
                _count_if((has == 1) & (inactive == 1)),
                _count_if((has == 1) & (inactive == 0)),
                _count_if(has == 0),
            ]
        query = sa.select(*columns).select_from(self.flags)
        return query.where(self.flags.c[_WANTED] == 1) if has_wanted else query


def build_rules_query(
    segment: RulesSegment,
    *,
    as_of: date,
    dialect: str,
    at_kinds: Sequence[AtKind],
    with_having: bool = True,
    output_names: Sequence[str] | None = None,
) -> RulesQuery:
    """Compile ``segment`` for ``dialect``; ``at_kinds[i]`` tells how signal i stores its time.

    Table and column names are used as given (``compile_rules`` resolves them against the
    warehouse first); SQL fragments are spliced in as ``text()``. ``output_names`` labels the
    key and ``columns`` in the result (the names as configured, when the warehouse spells
    them in another case); by default they keep the names used.
    """
    as_of_value = as_of_literal(as_of, dialect)
    people = _people(segment)
    joined: sa.FromClause = people
    flag_columns: list[ColumnElement[Any]] = [*people.c]
    person = people.c[segment.key]
    for index, signal in enumerate(segment.signals):
        events = _events(index, signal, at_kinds[index], as_of_value, dialect)
        stats = _stats(index, signal, events, as_of, dialect)
        median = _median(index, events, dialect) if signal.cadence is not None else None
        joined = joined.outerjoin(stats, stats.c.k == person)
        if median is not None:
            joined = joined.outerjoin(median, median.c.k == person)
        elapsed = days_between(as_of_value, stats.c["last"], dialect)
        flag_columns += _signal_flags(index, signal, stats, median, elapsed, dialect)
    flags = sa.select(*flag_columns).select_from(joined).cte("wb_flags")
    scored = _scored(segment, flags, as_of_value, dialect)
    final = _final(segment, scored, with_having=with_having, output_names=output_names)
    return RulesQuery(select=final, flags=flags, signals=tuple(segment.signals))


def condition(fragment: str) -> TextClause:
    """A user SQL condition as ``text()``, parenthesised, with ``:`` never read as a parameter."""
    return sa.text("(" + fragment.replace(":", "\\:") + ")")


def table_of(qualified: str, columns: Iterable[str]) -> sa.TableClause:
    """A lightweight table construct (``schema.table`` allowed) with the named columns."""
    schema, _, name = qualified.rpartition(".")
    return sa.table(name, *(sa.column(c) for c in dict.fromkeys(columns)), schema=schema or None)


def _count_if(predicate: ColumnElement[bool]) -> ColumnElement[int]:
    return sa.func.coalesce(sa.func.sum(sa.case((predicate, 1), else_=0)), 0)


def _people(segment: RulesSegment) -> sa.CTE:
    names = [segment.key, *segment.columns, *([segment.group_by] if segment.group_by else [])]
    source = table_of(segment.from_, names)
    columns: list[ColumnElement[Any]] = [source.c[name] for name in dict.fromkeys(names)]
    query = sa.select(*columns)
    if segment.where is not None:
        if segment.group_by is not None:
            wanted = sa.case((condition(segment.where), 1), else_=0)
            query = query.add_columns(wanted.label(_WANTED))
        else:
            query = query.where(condition(segment.where))
    return query.cte("wb_people")


def _events(
    index: int, signal: Signal, kind: AtKind, as_of: ColumnElement[date], dialect: str
) -> sa.CTE:
    value = [signal.value] if signal.value is not None else []
    source = table_of(signal.table, [signal.key, signal.at, *value])
    day = utc_date(source.c[signal.at], kind, dialect)
    columns: list[ColumnElement[Any]] = [source.c[signal.key].label("k"), day.label("d")]
    if signal.value is not None:
        columns.append(source.c[signal.value].label("v"))
    query = sa.select(*columns).where(
        source.c[signal.key].is_not(None), source.c[signal.at].is_not(None), day <= as_of
    )
    if signal.where is not None:
        query = query.where(condition(signal.where))
    return query.cte(f"wb_events_{index}")


def _stats(index: int, signal: Signal, events: sa.CTE, as_of: date, dialect: str) -> sa.CTE:
    columns: list[ColumnElement[Any]] = [
        events.c.k,
        sa.func.max(events.c.d).label("last"),
        sa.func.count().label("n"),
    ]
    if signal.window is not None and signal.baseline is not None:
        # Day boundaries computed here, so rows are compared with constants, not differenced.
        window_start = as_of_literal(as_of - timedelta(days=signal.window), dialect)
        baseline_start = as_of_literal(
            as_of - timedelta(days=signal.window + signal.baseline), dialect
        )
        in_window = events.c.d > window_start
        in_baseline = (events.c.d <= window_start) & (events.c.d > baseline_start)
        columns += [
            sa.func.sum(sa.case((in_window, events.c.v))).label("w"),
            sa.func.sum(sa.case((in_baseline, events.c.v))).label("b"),
        ]
    return sa.select(*columns).group_by(events.c.k).cte(f"wb_stats_{index}")


def _median(index: int, events: sa.CTE, dialect: str) -> sa.CTE:
    dates = sa.select(events.c.k, events.c.d).distinct().subquery()
    previous = sa.func.lag(dates.c.d).over(partition_by=dates.c.k, order_by=dates.c.d)
    gap = days_between(dates.c.d, previous, dialect)
    gaps = sa.select(dates.c.k, gap.label("gap")).subquery()
    median = median_of(gaps.c.gap, dialect)
    if median is not None:
        query = sa.select(
            gaps.c.k,
            # Twice the median of whole numbers is a whole number (exact in a double).
            sa.cast(2 * median, sa.BigInteger()).label("median2"),
            (sa.func.count() + 1).label("dates"),
        ).where(gaps.c.gap.is_not(None))
        return query.group_by(gaps.c.k).cte(f"wb_median_{index}")
    ranked = (
        sa.select(
            gaps.c.k,
            gaps.c.gap,
            sa.func.row_number().over(partition_by=gaps.c.k, order_by=gaps.c.gap).label("rn"),
            sa.func.count().over(partition_by=gaps.c.k).label("c"),
        )
        .where(gaps.c.gap.is_not(None))
        .subquery()
    )
    # The middle gap (odd count) or the two middle gaps (even count): 2*rn in [c, c + 2].
    middle = (2 * ranked.c.rn >= ranked.c.c) & (2 * ranked.c.rn <= ranked.c.c + 2)
    return (
        sa.select(
            ranked.c.k,
            (sa.func.min(ranked.c.gap) + sa.func.max(ranked.c.gap)).label("median2"),
            (sa.func.max(ranked.c.c) + 1).label("dates"),
        )
        .where(middle)
        .group_by(ranked.c.k)
        .cte(f"wb_median_{index}")
    )


def _inactive_rule(
    signal: Signal,
    stats: sa.CTE,
    median: sa.CTE | None,
    elapsed: ColumnElement[int],
    dialect: str,
) -> ColumnElement[bool]:
    """Whether a person *with* events is inactive on ``signal``."""
    share = signal.drop_below_ratio
    if signal.window is not None and signal.baseline is not None and share is not None:
        recent: ColumnElement[Any] = sa.func.coalesce(stats.c.w, 0)
        before: ColumnElement[Any] = sa.func.coalesce(stats.c.b, 0)
        if dialect == "postgresql":
            recent, before = sa.cast(recent, sa.Numeric()), sa.cast(before, sa.Numeric())
        # W < (p/q) * B * window / baseline, multiplied out: W * baseline * q < p * B * window.
        left = recent * (signal.baseline * share.denominator)
        below = left < before * (share.numerator * signal.window)
        return below | ((recent == 0) & (before == 0))
    recency = elapsed > (signal.inactive_after or 0)
    cadence = signal.cadence_ratio
    if median is None or cadence is None:
        return recency
    enough = median.c.dates >= signal.min_events
    # elapsed > (p/q) * median, with the median doubled: 2 * elapsed * q > p * median2.
    doubled = sa.cast(elapsed, sa.BigInteger()) * (2 * cadence.denominator)
    by_cadence = doubled > median.c.median2 * cadence.numerator
    return (enough & by_cadence) | (
        sa.func.coalesce(median.c.dates, 0) < signal.min_events
    ) & recency


def _signal_flags(
    index: int,
    signal: Signal,
    stats: sa.CTE,
    median: sa.CTE | None,
    elapsed: ColumnElement[int],
    dialect: str,
) -> list[ColumnElement[Any]]:
    no_events = stats.c.k.is_(None)
    inactive = sa.case(
        (no_events, _NEVER_VALUE[signal.never]),
        (_inactive_rule(signal, stats, median, elapsed, dialect), 1),
        else_=0,
    )
    return [
        sa.case((no_events, 0), else_=1).label(f"_wb_has_{index}"),
        inactive.label(f"_wb_inactive_{index}"),
        stats.c["last"].label(f"_wb_last_{index}"),
        sa.func.coalesce(stats.c.n, 0).label(f"_wb_n_{index}"),
    ]


def _fold(values: list[ColumnElement[Any]]) -> ColumnElement[Any]:
    """NULL-ignoring GREATEST (SQLite's scalar MAX returns NULL on any NULL)."""
    result = values[0]
    for value in values[1:]:
        later = value.is_not(None) & (value > result)
        result = sa.case((result.is_(None) | later, value), else_=result)
    return result


def _total(values: Sequence[ColumnElement[Any]]) -> ColumnElement[Any]:
    result = values[0]
    for value in values[1:]:
        result = result + value
    return result


def _sql_string(text: str) -> ColumnElement[str]:
    return sa.literal_column("'" + text.replace("'", "''") + "'", sa.String())


def _scored(
    segment: RulesSegment, flags: sa.CTE, as_of: ColumnElement[date], dialect: str
) -> sa.CTE:
    signals = list(enumerate(segment.signals))
    inactive = [flags.c[f"_wb_inactive_{i}"] for i, _ in signals]
    score = _total([s.weight * flag for (_, s), flag in zip(signals, inactive, strict=True)])
    count = _total(inactive)
    names: ColumnElement[str] = _sql_string("")
    for (_, signal), flag in zip(signals, inactive, strict=True):
        names = names + sa.case((flag == 1, _sql_string("," + signal.name)), else_=_sql_string(""))
    last = _fold([flags.c[f"_wb_last_{i}"] for i, _ in signals])
    days_inactive = days_between(as_of, last, dialect)
    events = _total([flags.c[f"_wb_n_{i}"] for i, _ in signals])

    if segment.match == "all":
        matched = count == len(signals)
    elif segment.match == "any":
        matched = count >= 1
    else:
        matched = score >= (segment.min_score or 0)
    match = sa.case((matched, 1), else_=0)
    if segment.group_by is not None:
        group = flags.c[segment.group_by]
        match = sa.case((group.is_(None), match), else_=sa.func.min(match).over(partition_by=group))

    keep = [match == 1]
    never_excluded = [flags.c[f"_wb_has_{i}"] == 0 for i, s in signals if s.never == "exclude"]
    if never_excluded:
        keep.append(sa.not_(sa.or_(*never_excluded)))
    if segment.lost_after is not None:
        keep.append(days_inactive.is_(None) | (days_inactive <= segment.lost_after))
    if _WANTED in flags.c:
        keep.append(flags.c[_WANTED] == 1)

    computed: dict[str, ColumnElement[Any]] = {
        "last_activity_at": sa.type_coerce(last, sa.Date()),
        "days_inactive": sa.cast(days_inactive, sa.Integer()),
        "score": sa.cast(score, sa.Integer()),
        "inactive_signals": sa.func.substr(names, 2, type_=sa.String()),
        "events": sa.cast(events, sa.Integer()),
    }
    own = [flags.c[name] for name in dict.fromkeys([segment.key, *segment.columns])]
    return sa.select(
        *own,
        *(computed[name].label(name) for name in COMPUTED_COLUMNS),
        sa.case((sa.and_(*keep), 1), else_=0).label(_KEEP),
    ).cte("wb_segment")


def _final(
    segment: RulesSegment,
    scored: sa.CTE,
    *,
    with_having: bool,
    output_names: Sequence[str] | None,
) -> sa.Select[Any]:
    key = scored.c[segment.key]
    own = [key, *(scored.c[name] for name in segment.columns)]
    names = output_names if output_names is not None else [column.name for column in own]
    labelled = [
        column if column.name == label else column.label(label)
        for column, label in zip(own, names, strict=True)
    ]
    query = sa.select(*labelled, *(scored.c[c] for c in COMPUTED_COLUMNS)).where(
        scored.c[_KEEP] == 1
    )
    for index, exclusion in enumerate(segment.exclude):
        source = table_of(exclusion.table, [exclusion.key])
        excluded = sa.select(source.c[exclusion.key].label("k"))
        if exclusion.where is not None:
            excluded = excluded.where(condition(exclusion.where))
        rows = excluded.cte(f"wb_exclude_{index}")
        query = query.where(~sa.exists().where(rows.c.k == key))
    if with_having and segment.having is not None:
        query = query.where(condition(segment.having))
    return query.order_by(key.asc().nulls_last())
