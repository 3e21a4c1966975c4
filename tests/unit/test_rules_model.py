"""Validation of rules segment configs: what is refused, where, and with which message."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from connector.rules import RulesSegment, parse_duration

RECENCY = {
    "name": "purchase",
    "table": "orders",
    "key": "customer_id",
    "at": "ordered_at",
    "inactive_after": "180d",
}
USAGE = {
    "name": "usage",
    "table": "usage_daily",
    "key": "customer_id",
    "at": "day",
    "value": "credits_used",
    "window": "30d",
    "baseline": "180d",
    "drop_below": 0.3,
}


def segment(**overrides: Any) -> dict[str, Any]:
    return {"from": "customers", "key": "customer_id", "signals": [RECENCY], **overrides}


def error_of(config: dict[str, Any]) -> tuple[tuple[str | int, ...], str]:
    """The single validation error's location and message."""
    with pytest.raises(ValidationError) as caught:
        RulesSegment.model_validate(config)
    errors = caught.value.errors()
    assert len(errors) == 1, errors
    return errors[0]["loc"], errors[0]["msg"]


@pytest.mark.parametrize(
    ("text", "days"), [("180d", 180), ("26w", 182), ("1d", 1), (" 7D ", 7), ("2W", 14)]
)
def test_parse_duration(text: str, days: int) -> None:
    assert parse_duration(text) == days


@pytest.mark.parametrize("text", ["6 months", "180", "d", "1.5d", "-3d", "0d", "3y", ""])
def test_parse_duration_refuses_other_forms(text: str) -> None:
    with pytest.raises(ValueError, match=r"`180d` or `26w`|at least one day"):
        parse_duration(text)


def test_full_design_example_is_valid() -> None:
    parsed = RulesSegment.model_validate(
        segment(
            columns=["email", "phone"],
            where="marketing_opt_in",
            match="score",
            min_score=3,
            lost_after="730d",
            group_by="account_id",
            having="days_inactive < 400",
            as_of="2026-11-01",
            signals=[
                {**RECENCY, "where": "status <> 'cancelled'", "cadence": 2.0, "weight": 2},
                USAGE,
            ],
            exclude=[
                {"table": "support_tickets", "key": "customer_id", "where": "status = 'open'"}
            ],
        )
    )
    assert parsed.from_ == "customers"
    assert parsed.lost_after == 730
    assert parsed.signals[0].inactive_after == 180
    assert parsed.signals[1].window == 30
    assert parsed.signals[0].min_events == 3
    assert parsed.signals[0].never == "inactive"
    assert parsed.signals[1].weight == 1


def test_from_by_field_name_too() -> None:
    parsed = RulesSegment(from_="customers", key="id", signals=[RECENCY])
    assert parsed.from_ == "customers"


def test_bad_duration_points_at_the_option() -> None:
    location, message = error_of(segment(signals=[{**USAGE, "window": "6 months"}]))
    assert location == ("signals", 0, "window")
    assert "`6 months`" in message and "`180d` or `26w`" in message


def test_min_score_needs_score_match() -> None:
    _, message = error_of(segment(min_score=2))
    assert "`min_score` only applies" in message


def test_score_match_needs_min_score() -> None:
    _, message = error_of(segment(match="score"))
    assert "needs `min_score`" in message


def test_usage_signal_needs_window_baseline_and_drop_below() -> None:
    usage = {key: value for key, value in USAGE.items() if key not in ("baseline", "drop_below")}
    location, message = error_of(segment(signals=[usage]))
    assert location == ("signals", 0)
    assert "baseline, drop_below" in message


@pytest.mark.parametrize("option", ["window", "baseline", "drop_below"])
def test_usage_options_need_value(option: str) -> None:
    _, message = error_of(segment(signals=[{**RECENCY, option: USAGE[option]}]))
    assert f"{option} only apply to a usage signal" in message


def test_usage_signal_cannot_also_be_recency() -> None:
    _, message = error_of(segment(signals=[{**USAGE, "inactive_after": "30d"}]))
    assert "separate recency signal" in message


def test_recency_signal_needs_inactive_after() -> None:
    recency = {key: value for key, value in RECENCY.items() if key != "inactive_after"}
    _, message = error_of(segment(signals=[{**recency, "cadence": 2.0}]))
    assert "needs `inactive_after`" in message


@pytest.mark.parametrize("cadence", [0, -1.5])
def test_cadence_must_be_positive(cadence: float) -> None:
    location, message = error_of(segment(signals=[{**RECENCY, "cadence": cadence}]))
    assert location == ("signals", 0, "cadence")
    assert "greater than 0" in message


@pytest.mark.parametrize(
    "fragment",
    [
        "1=1; DROP TABLE customers",
        "status = 'x' -- comment",
        "status /* hidden */ = 'x'",
        "id IN (SELECT id FROM vip)",
        "1=1 UNION select 1",
        "Delete",
        "grant is not null",
        # a backslash-escaped quote (PostgreSQL E'' strings, MySQL) reads as the end of the
        # literal in standard SQL: the rest must not hide a statement
        "status = E'\\'' )) SELECT 1; COPY (FROM customers) TO 'x.csv'; SELECT (''='' ",
        "name = E'\\'' OR id IN (SELECT id FROM vip) OR ''=''",
    ],
)
@pytest.mark.parametrize("where", ["segment", "signal", "exclusion", "having"])
def test_sql_fragments_are_single_conditions(fragment: str, where: str) -> None:
    expected: tuple[str | int, ...]
    if where == "segment":
        config, expected = segment(where=fragment), ("where",)
    elif where == "having":
        config, expected = segment(having=fragment), ("having",)
    elif where == "signal":
        config, expected = (
            segment(signals=[{**RECENCY, "where": fragment}]),
            ("signals", 0, "where"),
        )
    else:
        config = segment(exclude=[{"table": "t", "key": "k", "where": fragment}])
        expected = ("exclude", 0, "where")
    location, message = error_of(config)
    assert location == expected
    assert f"`{fragment}`" in message


@pytest.mark.parametrize(
    "fragment",
    [
        "status <> 'cancelled'",
        "note <> 'please delete; -- me'",  # keywords and markers inside a string literal
        "last_update > created_at",  # keywords only count as whole words
        "ordered_at::date > '2024-01-01'",
        "marketing_opt_in",
        "name = 'O\\'Brien'",  # a backslash in a literal, read either way
        "note LIKE '%\\%'",
    ],
)
def test_ordinary_conditions_are_accepted(fragment: str) -> None:
    RulesSegment.model_validate(segment(where=fragment))


def test_duplicate_signal_names() -> None:
    _, message = error_of(segment(signals=[RECENCY, USAGE, {**RECENCY}]))
    assert "unique" in message and "`purchase`" in message


def test_at_least_one_signal() -> None:
    location, _ = error_of(segment(signals=[]))
    assert location == ("signals",)


def test_unknown_options_are_refused() -> None:
    location, _ = error_of(segment(signals=[{**RECENCY, "inactive_afer": "3d"}]))
    assert location == ("signals", 0, "inactive_afer")
    location, _ = error_of(segment(match_mode="all"))
    assert location == ("match_mode",)


def test_columns_cannot_shadow_computed_columns_or_the_key() -> None:
    _, message = error_of(segment(columns=["email", "score"]))
    assert "`score`" in message
    _, message = error_of(segment(columns=["customer_id"]))
    assert "repeats the key" in message


@pytest.mark.parametrize(
    ("option", "value"), [("never", "sometimes"), ("match", "most"), ("min_events", 1)]
)
def test_enumerations_and_bounds(option: str, value: Any) -> None:
    config = (
        segment(**{option: value})
        if option == "match"
        else segment(signals=[{**RECENCY, option: value}])
    )
    location, _ = error_of(config)
    assert location[-1] == option


@pytest.mark.parametrize("min_score", [0, -1])
def test_min_score_that_selects_everyone(min_score: int) -> None:
    _, message = error_of(segment(match="score", min_score=min_score))
    assert f"`min_score` = {min_score} selects everyone" in message
    assert "at least 1" in message


def test_min_score_above_the_sum_of_weights() -> None:
    signals = [{**RECENCY, "weight": 2}, {**USAGE, "weight": 1}]
    _, message = error_of(segment(match="score", min_score=4, signals=signals))
    assert "`min_score` = 4 can never be reached" in message
    assert "weights sum to 3" in message
    RulesSegment.model_validate(segment(match="score", min_score=3, signals=signals))


def test_min_events_needs_cadence() -> None:
    location, message = error_of(segment(signals=[{**RECENCY, "min_events": 5}]))
    assert location == ("signals", 0)
    assert "`min_events` only applies with `cadence`" in message
    RulesSegment.model_validate(segment(signals=[{**RECENCY, "cadence": 2.0, "min_events": 5}]))


@pytest.mark.parametrize("match", ["all", "any"])
def test_weight_needs_score_match(match: str) -> None:
    signals = [RECENCY, {**USAGE, "weight": 2}]
    _, message = error_of(segment(match=match, signals=signals))
    assert "`weight` is set on signals[1]" in message
    assert f'(match is "{match}")' in message


def test_description_is_accepted() -> None:
    parsed = RulesSegment.model_validate(segment(description="Lapsed buyers, for Meta"))
    assert parsed.description == "Lapsed buyers, for Meta"


@pytest.mark.parametrize(
    ("written", "numerator", "denominator"), [(0.57, 57, 100), (2.0, 2, 1), (0.3, 3, 10)]
)
def test_cadence_and_drop_below_are_the_decimals_written(
    written: float, numerator: int, denominator: int
) -> None:
    parsed = RulesSegment.model_validate(
        segment(signals=[{**RECENCY, "cadence": written}, {**USAGE, "drop_below": written}])
    )
    for ratio in (parsed.signals[0].cadence_ratio, parsed.signals[1].drop_below_ratio):
        assert ratio is not None
        assert (ratio.numerator, ratio.denominator) == (numerator, denominator)
