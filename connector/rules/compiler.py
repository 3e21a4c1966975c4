"""Check a rules segment against the warehouse, compile it, and explain what it selects.

``compile_rules`` reflects every table and column the segment names (reporting all the missing
ones at once, with their TOML paths), learns how each `at` column stores time, builds the query
(see ``connector.rules.query``) and runs it with ``LIMIT 0`` so that a `where` or `having` that
is not a valid expression is a config error, not a failed sync.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import date
from typing import Any, NamedTuple

import sqlalchemy as sa
from sqlalchemy.types import NullType

from connector.errors import ConfigError, ConfigProblem, WarehouseError
from connector.rules.dialects import AtKind
from connector.rules.model import RulesSegment, Signal
from connector.rules.query import RulesQuery, build_rules_query, condition, table_of
from connector.warehouse import first_line

_LISTED_NAMES = 30


class SignalCounts(NamedTuple):
    """How the segment's population splits on one signal."""

    name: str
    inactive: int
    active: int
    never: int


@dataclass(frozen=True)
class RulesExplanation:
    """What ``winback segments preview`` shows about a rules segment."""

    sql: str
    """The query, compiled for the warehouse's dialect with the values inlined."""
    signals: list[SignalCounts]
    """Per signal, over the `from` rows that pass `where`: inactive, active, no events."""
    qualifying: int
    """Rows the segment returns."""


def compile_rules(
    name: str, segment: RulesSegment, *, as_of: date, engine: sa.Engine
) -> sa.Select[Any]:
    """Compile segment ``name`` to one SELECT for ``engine``'s warehouse, as of ``as_of``.

    Raises ``ConfigError`` listing every unknown table or column and any SQL fragment the
    warehouse rejects; ``WarehouseError`` when the warehouse cannot be reached.
    """
    return _compile(name, segment, as_of=as_of, engine=engine).select


def explain_rules(
    name: str,
    segment: RulesSegment,
    *,
    as_of: date,
    engine: sa.Engine,
    on_sql: Callable[[str], None] | None = None,
) -> RulesExplanation:
    """Compile segment ``name`` and count, per signal and overall, whom it selects.

    ``on_sql`` receives the SQL before the counting queries run, so a caller can show it even
    when counting fails (a data-dependent error); that failure is a ``WarehouseError`` naming
    the option at fault when it can be found.
    """
    query = _compile(name, segment, as_of=as_of, engine=engine)
    sql = printable_sql(query.select, engine.dialect)
    if on_sql is not None:
        on_sql(sql)
    total = sa.select(sa.func.count()).select_from(query.select.subquery())
    try:
        with engine.connect() as connection:
            counts = connection.execute(query.signal_counts()).one()
            qualifying = connection.execute(total).scalar_one()
    except sa.exc.DBAPIError as error:
        failure = first_line(error)
        problems = locate_run_failure(name, segment, as_of=as_of, engine=engine, failure=failure)
        raise WarehouseError(run_failure_message(name, problems, failure), segment=name) from error
    signals = [
        SignalCounts(signal.name, *(int(counts[3 * i + j]) for j in range(3)))
        for i, signal in enumerate(segment.signals)
    ]
    return RulesExplanation(sql=sql, signals=signals, qualifying=int(qualifying))


def printable_sql(query: sa.Select[Any], dialect: sa.Dialect) -> str:
    """``query`` in ``dialect``'s SQL with the values inlined, as one would paste it into the
    warehouse's console: drivers with ``%s`` placeholders (psycopg) would otherwise double
    every ``%`` of a LIKE pattern."""
    if dialect.identifier_preparer._double_percents:
        dialect = copy.copy(dialect)
        dialect.paramstyle = "named"
        dialect.identifier_preparer = dialect.preparer(dialect)
    return str(query.compile(dialect=dialect, compile_kwargs={"literal_binds": True}))


def locate_run_failure(
    name: str, segment: RulesSegment, *, as_of: date, engine: sa.Engine, failure: str
) -> list[ConfigProblem]:
    """The options of segment ``name`` at fault when its query failed while running (not when
    compiled: a data-dependent error, such as a text column compared with a number): each SQL
    fragment and key join is tried on all the rows of its table. Empty when none fails alone.

    Costs a scan of each table with a fragment, so call it only once the query failed.
    """
    try:
        resolver = _Resolver(name, engine)
        resolved, at_kinds = resolver.resolve(segment)
        if resolver.problems:
            return resolver.problems
        problems = _locate_failure(
            name, resolved, engine, as_of, at_kinds, failure, whole_tables=True
        )
    except sa.exc.DBAPIError:
        return []
    return [problem for problem in problems if problem.location != f"segments.{name}"]


def run_failure_message(
    name: str,
    problems: Sequence[ConfigProblem],
    failure: str,
    *,
    what: str = "the query failed",
) -> str:
    """The message of a rules segment's query that failed while running: the options at fault
    (``locate_run_failure``), else the database's message and where to look."""
    if problems:
        located = "; ".join(f"{problem.location}: {problem.message}" for problem in problems)
        return f"{what} at {located}"
    return f"{what}: {failure}; check segments.{name} (run `winback segments explain {name}`)"


def _compile(name: str, segment: RulesSegment, *, as_of: date, engine: sa.Engine) -> RulesQuery:
    try:
        resolver = _Resolver(name, engine)
        resolved, at_kinds = resolver.resolve(segment)
    except sa.exc.DBAPIError as error:
        raise WarehouseError(
            f"cannot read the warehouse's tables: {first_line(error)}", segment=name
        ) from error
    if resolver.problems:
        raise ConfigError(resolver.problems)
    dialect = engine.dialect.name
    query = build_rules_query(
        resolved,
        as_of=as_of,
        dialect=dialect,
        at_kinds=at_kinds,
        output_names=[segment.key, *segment.columns],
    )
    failure = _try_run(engine, query.select)
    if failure is not None:
        raise ConfigError(_locate_failure(name, resolved, engine, as_of, at_kinds, failure))
    return query


def _try_run(engine: sa.Engine, query: sa.Select[Any], *, whole: bool = False) -> str | None:
    """Run ``query`` with LIMIT 0, or over all its rows (``whole``: errors that depend on the
    data, such as a text compared with a number, show only then); the database's error
    message, or None when it runs."""
    probe = sa.select(sa.func.count()).select_from(query.subquery()) if whole else query.limit(0)
    try:
        with engine.connect() as connection:
            connection.execute(probe).close()
    except sa.exc.DBAPIError as error:
        return first_line(error)
    return None


def _locate_failure(
    name: str,
    segment: RulesSegment,
    engine: sa.Engine,
    as_of: date,
    at_kinds: Sequence[AtKind],
    failure: str,
    *,
    whole_tables: bool = False,
) -> list[ConfigProblem]:
    """Find which SQL fragment made the compiled query fail, by trying each one on its table
    (on all its rows with ``whole_tables``)."""
    base = f"segments.{name}"
    fragments: list[tuple[str, str, str | None]] = [(f"{base}.where", segment.from_, segment.where)]
    fragments += [
        (f"{base}.signals[{i}].where", s.table, s.where) for i, s in enumerate(segment.signals)
    ]
    fragments += [
        (f"{base}.exclude[{i}].where", e.table, e.where) for i, e in enumerate(segment.exclude)
    ]
    problems = []
    for location, table, fragment in fragments:
        if fragment is None:
            continue
        probe = sa.select(sa.literal(1)).select_from(table_of(table, [])).where(condition(fragment))
        error = _try_run(engine, probe, whole=whole_tables)
        if error is not None:
            verdict = "fails on rows of" if whole_tables else "is not a valid condition on"
            problems.append(ConfigProblem(location, f"`{fragment}` {verdict} `{table}`: {error}"))
    problems += _key_problems(base, segment, engine, whole=whole_tables)
    if problems:
        return problems
    if segment.having is not None:
        dialect = engine.dialect.name
        without = build_rules_query(
            segment, as_of=as_of, dialect=dialect, at_kinds=at_kinds, with_having=False
        )
        if _try_run(engine, without.select, whole=whole_tables) is None:
            return [
                ConfigProblem(
                    f"{base}.having",
                    f"`{segment.having}` is not a valid condition on the segment's columns and "
                    f"computed columns: {failure}",
                )
            ]
    return [ConfigProblem(base, f"the compiled rules query fails in the warehouse: {failure}")]


def _key_problems(
    base: str, segment: RulesSegment, engine: sa.Engine, *, whole: bool = False
) -> list[ConfigProblem]:
    """Keys of signal and exclusion tables that the warehouse cannot compare with the `from` key."""
    people = table_of(segment.from_, [segment.key])
    joins = [
        (f"{base}.signals[{i}].key", s.table, s.key) for i, s in enumerate(segment.signals)
    ] + [(f"{base}.exclude[{i}].key", e.table, e.key) for i, e in enumerate(segment.exclude)]
    problems = []
    for location, table, key in joins:
        other = table_of(table, [key])
        probe = sa.select(sa.literal(1)).select_from(
            people.join(other, other.c[key] == people.c[segment.key])
        )
        error = _try_run(engine, probe, whole=whole)
        if error is not None:
            message = (
                f"`{table}` or `{segment.from_}` may not be read by the warehouse user: {error}; "
                "grant it SELECT on both"
                if _refused_access(error)
                else f"`{table}.{key}` cannot be joined to `{segment.from_}.{segment.key}` "
                f"(different types?): {error}"
            )
            problems.append(ConfigProblem(location, message))
    return problems


def _refused_access(error: str) -> bool:
    """Whether a warehouse's error says the user may not read a table (PostgreSQL's
    "permission denied for table", MySQL's "command denied", Snowflake's "insufficient
    privileges"...), rather than that the query is wrong."""
    text = error.lower()
    return any(
        words in text for words in ("permission denied", "insufficient privilege", "denied to user")
    )


@dataclass
class _Resolver:
    """Checks names against the warehouse, collecting every problem with its TOML path."""

    segment_name: str
    engine: sa.Engine
    problems: list[ConfigProblem] = field(default_factory=list)
    _columns: dict[str, dict[str, Any] | None] = field(default_factory=dict)
    _actual: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._inspector = sa.inspect(self.engine)

    def resolve(self, segment: RulesSegment) -> tuple[RulesSegment, list[AtKind]]:
        """The segment with names spelled as in the warehouse, and each signal's time kind."""
        base = f"segments.{self.segment_name}"
        names = {"key": segment.key}
        names.update({f"columns[{i}]": column for i, column in enumerate(segment.columns)})
        if segment.group_by is not None:
            names["group_by"] = segment.group_by
        found = self._columns_of(f"{base}.from", base, segment.from_, names)
        signals, kinds = [], []
        for index, signal in enumerate(segment.signals):
            resolved, kind = self._resolve_signal(f"{base}.signals[{index}]", signal)
            signals.append(resolved)
            kinds.append(kind)
        exclusions = []
        for index, exclusion in enumerate(segment.exclude):
            location = f"{base}.exclude[{index}]"
            key = self._columns_of(
                f"{location}.table", location, exclusion.table, {"key": exclusion.key}
            )
            exclusions.append(
                exclusion.model_copy(update={**key, "table": self.actual_table(exclusion.table)})
            )
        update: dict[str, Any] = {
            "from_": self.actual_table(segment.from_),
            "key": found.get("key", segment.key),
            "group_by": found.get("group_by", segment.group_by),
            "columns": [found.get(f"columns[{i}]", c) for i, c in enumerate(segment.columns)],
            "signals": signals,
            "exclude": exclusions,
        }
        return segment.model_copy(update=update), kinds

    def _resolve_signal(self, location: str, signal: Signal) -> tuple[Signal, AtKind]:
        names = {"key": signal.key, "at": signal.at}
        if signal.value is not None:
            names["value"] = signal.value
        found = self._columns_of(f"{location}.table", location, signal.table, names)
        table = self.actual_table(signal.table)
        resolved = signal.model_copy(update={**found, "table": table})
        reflected = self._columns.get(signal.table)
        if reflected is None:
            return resolved, "text"
        if "value" in found:
            self._check_value(location, table, found["value"], reflected[found["value"]]["type"])
        if "at" not in found:
            return resolved, "text"
        if self.engine.dialect.name == "sqlite":
            self._check_sqlite_dates(location, resolved)
            return resolved, "text"
        kind = self._at_kind(location, table, found["at"], reflected[found["at"]]["type"])
        return resolved, kind

    def _check_value(self, location: str, table: str, column: str, column_type: Any) -> None:
        """`value` is summed: a text column would fail, or (SQLite) silently count as 0."""
        if isinstance(column_type, sa.Integer | sa.Numeric | NullType):
            return
        self.problems.append(
            ConfigProblem(
                f"{location}.value",
                f"column `{column}` of table `{table}` has type {column_type}; `value` must be "
                f"a numeric column (it is summed): cast it in a view, e.g. "
                f"`CAST({column} AS NUMERIC)`",
            )
        )

    def _check_sqlite_dates(self, location: str, signal: Signal) -> None:
        """SQLite keeps times as text or numbers and reads them with date(), which gives NULL
        for forms it does not know (the event would silently not count) and reads a number as
        a Julian day (Unix days would land in antiquity): look for one such value. A scan of
        the signal's rows when all are readable; SQLite warehouses are local files."""
        source = table_of(signal.table, [signal.at])
        at = source.c[signal.at]
        day = sa.func.date(at)
        number = sa.func.typeof(at).in_(["integer", "real"])
        unreadable = day.is_(None) | (number & (day < "1900-01-01"))
        probe = sa.select(at).where(at.is_not(None), unreadable).limit(1)
        if signal.where is not None:
            probe = probe.where(condition(signal.where))
        try:
            with self.engine.connect() as connection:
                found = connection.execute(probe).first()
        except sa.exc.DBAPIError:
            return  # a broken `where` is reported when the whole query is tried
        if found is None:
            return
        value = found[0]
        if isinstance(value, int | float):
            how = (
                f"a view with `datetime({signal.at}, 'unixepoch')` for Unix seconds "
                f"(`datetime({signal.at} / 1000, 'unixepoch')` for milliseconds, "
                f"`date({signal.at} * 86400, 'unixepoch')` for days)"
            )
        else:
            how = (
                "a view that rewrites the column as ISO-8601 text (e.g. with `replace()` and "
                "`substr()`)"
            )
        self.problems.append(
            ConfigProblem(
                f"{location}.at",
                f"column `{signal.at}` of table `{signal.table}` holds values SQLite's date() "
                f"cannot read as a date, such as `{value}`: those events would be missed. "
                "SQLite understands ISO-8601 text ('YYYY-MM-DD', 'YYYY-MM-DD HH:MM:SS' with an "
                "optional 'T', fractional seconds and a 'Z' or '+HH:MM' offset) and Julian day "
                f"numbers; convert the column, e.g. with {how}",
            )
        )

    def _columns_of(
        self, table_location: str, location: str, table: str, names: dict[str, str]
    ) -> dict[str, str]:
        """Resolve ``{option: column}`` in ``table``; unknown tables and columns are problems."""
        columns = self._reflect(table_location, table)
        if columns is None:
            return {}
        found = {}
        for option, wanted in names.items():
            actual = _match_name(wanted, columns)
            if actual is not None:
                found[option] = actual
                continue
            listed = ", ".join(list(columns)[:_LISTED_NAMES])
            message = f"column `{wanted}` not found in table `{table}` (columns: {listed})"
            self.problems.append(ConfigProblem(f"{location}.{option}", message))
        return found

    def _reflect(self, location: str, table: str) -> dict[str, Any] | None:
        """The columns of ``table`` by name, or None (and a problem) when it does not exist."""
        if table in self._columns:
            return self._columns[table]
        schema, _, name = table.rpartition(".")
        actual = self._table_name(name, schema or None)
        columns: dict[str, Any] | None = None
        if actual is not None:
            reflected = self._inspector.get_columns(actual, schema=schema or None)
            columns = {str(column["name"]): column for column in reflected}
            self._actual[table] = f"{schema}.{actual}" if schema else actual
        elif not any(p.location == location for p in self.problems):
            known = self._known_tables(schema or None)
            listed = ", ".join(sorted(known)[:_LISTED_NAMES]) or "none"
            message = f"table `{table}` not found in the warehouse (tables: {listed})"
            self.problems.append(ConfigProblem(location, message))
        self._columns[table] = columns
        return columns

    def _table_name(self, name: str, schema: str | None) -> str | None:
        """The warehouse's spelling of a table or view: exact, else the only case-insensitive one."""
        if self._inspector.has_table(name, schema=schema):
            return name
        return _match_name(name, dict.fromkeys(self._known_tables(schema)))

    def _known_tables(self, schema: str | None) -> list[str]:
        return self._inspector.get_table_names(schema) + self._inspector.get_view_names(schema)

    def actual_table(self, table: str) -> str:
        """The warehouse's spelling of a configured table name (itself if unknown)."""
        return self._actual.get(table, table)

    def _at_kind(self, location: str, table: str, column: str, column_type: Any) -> AtKind:
        dialect = self.engine.dialect.name
        if dialect == "sqlite":
            return "text"
        type_name = type(column_type).__name__.upper()
        if isinstance(column_type, sa.DateTime) or type_name.startswith("TIMESTAMP"):
            aware = bool(getattr(column_type, "timezone", False)) or type_name in (
                "TIMESTAMP_TZ",
                "TIMESTAMP_LTZ",
            )
            if dialect == "duckdb":
                aware = "TIME ZONE" in self._duckdb_type(table, column).upper()
            return "timestamptz" if aware else "timestamp"
        if isinstance(column_type, sa.Date):
            return "date"
        self.problems.append(
            ConfigProblem(
                f"{location}.at",
                f"column `{column}` of table `{table}` has type {column_type}; `at` must be a DATE "
                "or TIMESTAMP column (cast it in a view)",
            )
        )
        return "text"

    def _duckdb_type(self, table: str, column: str) -> str:
        """DuckDB reflects TIMESTAMPTZ as a naive TIMESTAMP; its information schema does not.
        Only the table's own schema counts (the same name may exist in several)."""
        schema, _, name = table.rpartition(".")
        query = sa.text(
            "SELECT data_type FROM information_schema.columns "
            "WHERE table_name = :table AND column_name = :column AND table_schema = "
            + (":schema" if schema else "current_schema()")
        )
        params = {"table": name, "column": column, **({"schema": schema} if schema else {})}
        with self.engine.connect() as connection:
            return str(connection.execute(query, params).scalar() or "")


def _match_name(wanted: str, columns: dict[str, Any]) -> str | None:
    """The warehouse's spelling of a column: exact, else the only case-insensitive match."""
    if wanted in columns:
        return wanted
    folded = [name for name in columns if name.lower() == wanted.lower()]
    return folded[0] if len(folded) == 1 else None
