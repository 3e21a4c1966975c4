"""Config models of a `rules` segment: signals, exclusions and the segment itself.

Everything that can be checked without a warehouse is checked here, so ``winback config
validate`` reports it with its TOML path: durations, the combination of options a signal kind
needs, SQL fragments that try to be more than a condition, duplicate names.
"""

from __future__ import annotations

import re
from datetime import date
from fractions import Fraction
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    model_validator,
)

COMPUTED_COLUMNS = ("last_activity_at", "days_inactive", "score", "inactive_signals", "events")
"""Columns a rules segment adds after the key and the `columns` (usable in `having` and `fields`)."""

_DURATION = re.compile(r"^\s*(\d+)\s*([dw])\s*$", re.IGNORECASE)
_DAYS_PER_UNIT = {"d": 1, "w": 7}

# Statement keywords and comment markers that have no business in a boolean condition.
_FORBIDDEN_WORDS = [
    *("select", "insert", "update", "delete", "drop", "alter", "create", "grant", "revoke"),
    *("union", "intersect", "except", "truncate", "merge", "copy", "attach", "detach"),
    *("pragma", "vacuum", "exec", "execute", "call", "commit", "rollback"),
]
_FORBIDDEN_WORD = re.compile(r"\b(" + "|".join(_FORBIDDEN_WORDS) + r")\b", re.IGNORECASE)
_QUOTED = re.compile(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"")
_QUOTED_WITH_ESCAPES = re.compile(r"'(?:[^'\\]|\\.|'')*'|\"(?:[^\"]|\"\")*\"", re.DOTALL)
"""Quoted text where a backslash escapes the next character (PostgreSQL's E'...' strings,
MySQL): a fragment is checked as read both ways, so no quoting trick hides a statement."""


def parse_duration(text: str) -> int:
    """Return the number of days in a duration such as ``"180d"`` or ``"26w"`` (= 182)."""
    match = _DURATION.match(text) if isinstance(text, str) else None
    if match is None:
        raise ValueError(
            f"invalid duration `{text}`: write a whole number of days or weeks, like `180d` or `26w`"
        )
    days = int(match.group(1)) * _DAYS_PER_UNIT[match.group(2).lower()]
    if days <= 0:
        raise ValueError(f"invalid duration `{text}`: it must be at least one day (`1d`)")
    return days


def check_condition(fragment: str) -> str:
    """Accept a SQL condition fragment; refuse one that could run another statement."""
    if not fragment.strip():
        raise ValueError("the SQL condition is empty; remove the option or write a condition")
    for quoted in (_QUOTED, _QUOTED_WITH_ESCAPES):
        unquoted = quoted.sub("''", fragment)
        for marker in (";", "--", "/*", "*/"):
            if marker in unquoted:
                raise ValueError(
                    f"`{fragment}` contains `{marker}`: write one SQL condition, "
                    "without statement separators or comments"
                )
        word = _FORBIDDEN_WORD.search(unquoted)
        if word is not None:
            raise ValueError(
                f"`{fragment}` contains the keyword `{word.group(1)}`: write one SQL condition "
                "on the table's columns (no subqueries or statements)"
            )
    return fragment


def exact_fraction(number: float) -> Fraction:
    """The decimal a user wrote (``0.57`` is 57/100, not the nearest binary float), so the
    query compares whole numbers and a boundary lands where the config says."""
    return Fraction(str(number))


Days = Annotated[int, BeforeValidator(parse_duration)]
"""A duration written as ``Nd`` or ``Nw`` in TOML, held as a number of days."""

Condition = Annotated[str, AfterValidator(check_condition)]
"""A SQL boolean expression on the columns of one table, spliced into the query as text."""

Name = Annotated[str, Field(min_length=1)]


class Signal(BaseModel):
    """One kind of activity and the rule that makes a person inactive on it.

    A *recency* signal needs ``inactive_after`` (optionally ``cadence``); a *usage* signal sets
    ``value`` with ``window``, ``baseline`` and ``drop_below``.
    """

    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_-]*$")]
    table: Name
    key: Name
    at: Name
    where: Condition | None = None
    inactive_after: Days | None = None
    cadence: Annotated[float, Field(gt=0)] | None = None
    min_events: Annotated[int, Field(ge=2)] = 3
    never: Literal["inactive", "active", "exclude"] = "inactive"
    weight: Annotated[int, Field(ge=0)] = 1
    value: Name | None = None
    window: Days | None = None
    baseline: Days | None = None
    drop_below: Annotated[float, Field(ge=0)] | None = None

    @property
    def is_usage(self) -> bool:
        """Whether this is a usage-drop signal (judged on ``value``) rather than recency."""
        return self.value is not None

    @property
    def cadence_ratio(self) -> Fraction | None:
        """``cadence`` as the exact fraction written in the config."""
        return None if self.cadence is None else exact_fraction(self.cadence)

    @property
    def drop_below_ratio(self) -> Fraction | None:
        """``drop_below`` as the exact fraction written in the config."""
        return None if self.drop_below is None else exact_fraction(self.drop_below)

    @model_validator(mode="after")
    def _check_kind(self) -> Signal:
        usage_options = {
            "window": self.window,
            "baseline": self.baseline,
            "drop_below": self.drop_below,
        }
        if self.value is None:
            given = [name for name, option in usage_options.items() if option is not None]
            if given:
                raise ValueError(
                    f"{', '.join(given)} only apply to a usage signal: set `value` to the column "
                    "to sum, or remove them"
                )
            if self.inactive_after is None:
                raise ValueError(
                    "a recency signal needs `inactive_after` (e.g. `180d`); with `cadence` it is "
                    "the rule for people with fewer than `min_events` events"
                )
            if self.cadence is None and "min_events" in self.model_fields_set:
                raise ValueError(
                    "`min_events` only applies with `cadence` (the events needed before the "
                    "person's own rhythm is trusted): set `cadence` (e.g. 2.0) or remove "
                    "`min_events`"
                )
            return self
        missing = [name for name, option in usage_options.items() if option is None]
        if missing:
            raise ValueError(
                f"a usage signal (`value` = `{self.value}`) also needs {', '.join(missing)} "
                '(e.g. window = "30d", baseline = "180d", drop_below = 0.3)'
            )
        if self.inactive_after is not None or self.cadence is not None:
            raise ValueError(
                "a usage signal (`value`) is judged on window/baseline/drop_below: remove "
                "inactive_after/cadence, or put them on a separate recency signal"
            )
        return self


class Exclusion(BaseModel):
    """Anyone with a matching row in ``table`` (joined on ``key``) is left out of the segment."""

    model_config = ConfigDict(extra="forbid")

    table: Name
    key: Name
    where: Condition | None = None


class RulesSegment(BaseModel):
    """A segment defined by inactivity rules, compiled to one SQL query by ``compile_rules``."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    from_: Annotated[str, Field(alias="from", min_length=1)]
    key: Name
    columns: list[Name] = Field(default_factory=list)
    where: Condition | None = None
    match: Literal["all", "any", "score"] = "all"
    min_score: int | None = None
    lost_after: Days | None = None
    group_by: Name | None = None
    having: Condition | None = None
    as_of: date | None = None
    description: str | None = None
    signals: Annotated[list[Signal], Field(min_length=1)]
    exclude: list[Exclusion] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check_combination(self) -> RulesSegment:
        if self.match == "score" and self.min_score is None:
            raise ValueError('match = "score" needs `min_score` (the sum of weights to reach)')
        if self.match != "score" and self.min_score is not None:
            raise ValueError(
                f'`min_score` only applies with match = "score" (match is "{self.match}")'
            )
        if self.match == "score":
            self._check_score()
        else:
            weighted = [
                f"signals[{i}]"
                for i, signal in enumerate(self.signals)
                if "weight" in signal.model_fields_set
            ]
            if weighted:
                raise ValueError(
                    f"`weight` is set on {', '.join(weighted)} but only counts with "
                    f'match = "score" (match is "{self.match}"): set match = "score" with '
                    "`min_score`, or remove `weight`"
                )
        names = [signal.name for signal in self.signals]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"signal names must be unique: `{'`, `'.join(duplicates)}` repeated")
        clashes = [c for c in self.columns if c in COMPUTED_COLUMNS]
        if clashes:
            raise ValueError(
                f"columns `{'`, `'.join(clashes)}` clash with computed columns; rename them in a "
                "view or leave them out"
            )
        if self.key in self.columns:
            raise ValueError(f"`columns` repeats the key `{self.key}`; it is always returned first")
        if len(set(self.columns)) != len(self.columns):
            raise ValueError("`columns` lists a column more than once")
        return self

    def _check_score(self) -> None:
        """A `min_score` that every person reaches, or nobody can, is a mistake in the config."""
        min_score = self.min_score or 0
        if min_score <= 0:
            raise ValueError(
                f"`min_score` = {min_score} selects everyone (a score is never below 0): set it "
                "to the sum of the inactive signals' weights that qualifies someone (at least 1)"
            )
        total = sum(signal.weight for signal in self.signals)
        if min_score > total:
            raise ValueError(
                f"`min_score` = {min_score} can never be reached: the signals' weights sum to "
                f"{total}; lower `min_score` or raise the signals' `weight`"
            )
