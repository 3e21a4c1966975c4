"""compile_rules against a real warehouse: unknown names and broken fragments are config errors."""

from __future__ import annotations

import uuid
from datetime import date
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from connector.config import build_config
from connector.errors import ConfigError
from connector.rules import RulesSegment, compile_rules
from connector.segments import read_segment
from connector.sync import RunOptions, SyncRunner
from destinations.registry import Registry
from tests.fakes.memory_destination import MemoryDestination
from tests.rules_reference import load_warehouse

AS_OF = date(2024, 3, 1)
PURCHASE = {
    "name": "purchase",
    "table": "orders",
    "key": "customer_id",
    "at": "ordered_at",
    "inactive_after": "60d",
}
EMAIL = {
    "name": "email",
    "table": "email_events",
    "key": "customer_id",
    "at": "occurred_at",
    "inactive_after": "30d",
}


@pytest.fixture
def engine(empty_warehouse: sa.Engine) -> sa.Engine:
    """A warehouse of each kind holding the (empty) test tables."""
    load_warehouse(empty_warehouse, {})
    return empty_warehouse


def problems(engine: sa.Engine, **config: Any) -> dict[str, str]:
    """Compile and return the reported problems as {location: message}."""
    segment = RulesSegment.model_validate(
        {"from": "customers", "key": "customer_id", "signals": [PURCHASE], **config}
    )
    with pytest.raises(ConfigError) as caught:
        compile_rules("lapsed", segment, as_of=AS_OF, engine=engine)
    return {problem.location: problem.message for problem in caught.value.problems}


def test_unknown_column_names_segment_signal_and_column(engine: sa.Engine) -> None:
    found = problems(engine, signals=[EMAIL, {**PURCHASE, "at": "ordred_at"}])
    assert list(found) == ["segments.lapsed.signals[1].at"]
    message = found["segments.lapsed.signals[1].at"]
    assert message.startswith("column `ordred_at` not found in table `orders` (columns: ")
    assert "ordered_at" in message


def test_every_problem_is_reported_at_once(engine: sa.Engine) -> None:
    found = problems(
        engine,
        columns=["email", "phone"],
        group_by="acount_id",
        signals=[{**PURCHASE, "table": "ordres"}, {**EMAIL, "key": "cust"}],
        exclude=[{"table": "tickets", "key": "id"}],
    )
    assert sorted(found) == [
        "segments.lapsed.columns[1]",
        "segments.lapsed.exclude[0].key",
        "segments.lapsed.group_by",
        "segments.lapsed.signals[0].table",
        "segments.lapsed.signals[1].key",
    ]
    assert "table `ordres` not found in the warehouse" in found["segments.lapsed.signals[0].table"]
    assert "orders" in found["segments.lapsed.signals[0].table"]  # the known tables are listed


def test_unknown_from_table(engine: sa.Engine) -> None:
    segment = RulesSegment.model_validate(
        {"from": "custmers", "key": "customer_id", "signals": [PURCHASE]}
    )
    with pytest.raises(ConfigError, match=r"segments\.lapsed\.from: table `custmers` not found"):
        compile_rules("lapsed", segment, as_of=AS_OF, engine=engine)


def test_where_that_is_not_an_expression(engine: sa.Engine) -> None:
    found = problems(engine, signals=[{**PURCHASE, "where": "status = "}])
    assert list(found) == ["segments.lapsed.signals[0].where"]
    assert found["segments.lapsed.signals[0].where"].startswith(
        "`status = ` is not a valid condition on `orders`: "
    )


def test_where_naming_an_unknown_column(engine: sa.Engine) -> None:
    found = problems(
        engine,
        where="opted_in = 1",
        exclude=[{"table": "tickets", "key": "customer_id", "where": "state = 'open'"}],
    )
    assert sorted(found) == ["segments.lapsed.exclude[0].where", "segments.lapsed.where"]
    assert (
        "`opted_in = 1` is not a valid condition on `customers`" in found["segments.lapsed.where"]
    )


def test_having_on_an_unknown_column(engine: sa.Engine) -> None:
    found = problems(engine, having="days_inactiv > 3")
    assert list(found) == ["segments.lapsed.having"]
    assert "`days_inactiv > 3`" in found["segments.lapsed.having"]


def test_message_of_the_raised_error(engine: sa.Engine) -> None:
    segment = RulesSegment.model_validate(
        {"from": "customers", "key": "customer_id", "signals": [{**PURCHASE, "at": "ordred_at"}]}
    )
    with pytest.raises(ConfigError) as caught:
        compile_rules("lapsed", segment, as_of=AS_OF, engine=engine)
    assert str(caught.value).startswith(
        "invalid configuration: segments.lapsed.signals[0].at: column `ordred_at` not found"
    )


@pytest.fixture(params=["duckdb", "sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def warehouse_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of an empty warehouse file of each kind (a sync opens its own connections)."""
    if request.param == "duckdb":
        return f"duckdb:///{tmp_path / 'warehouse.duckdb'}"
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'warehouse.db'}"
    return str(request.getfixturevalue("postgres_url"))


def test_names_match_case_insensitively(engine: sa.Engine) -> None:
    """The segment returns the key and columns under the names of the config."""
    with engine.begin() as connection:
        connection.execute(sa.text("INSERT INTO customers VALUES (1, NULL, 'a@example.com', 1)"))
    segment = RulesSegment.model_validate(
        {
            "from": "Customers",
            "key": "Customer_ID",
            "columns": ["EMAIL"],
            "signals": [{**PURCHASE, "table": "ORDERS", "at": "Ordered_At"}],
            "exclude": [{"table": "Tickets", "key": "customer_id"}],
        }
    )
    query = compile_rules("lapsed", segment, as_of=AS_OF, engine=engine)
    assert [column.name for column in query.selected_columns][:2] == ["Customer_ID", "EMAIL"]
    with read_segment("lapsed", segment, engine=engine, as_of=AS_OF, chunk_size=100) as (
        columns,
        chunks,
    ):
        rows = [tuple(row) for chunk in chunks for row in chunk]
    assert list(columns)[:2] == ["Customer_ID", "EMAIL"]
    assert [row[:2] for row in rows] == [(1, "a@example.com")]


def test_warehouse_names_in_another_case_preview_and_plan(
    warehouse_url: str, tmp_path: Path
) -> None:
    """Tables and columns created as `Customers(CustomerID, Email)`, configured in lower case:
    the segment compiles, previews and plans a sync that maps its columns by the config's
    names."""
    engine = sa.create_engine(warehouse_url)
    statements = [
        'CREATE TABLE "Customers" ("CustomerID" INTEGER, "Email" VARCHAR(100))',
        'CREATE TABLE "Orders" ("CustomerID" INTEGER, "OrderedAt" DATE)',
        "INSERT INTO \"Customers\" VALUES (1, 'one@example.com'), (2, 'two@example.com'), "
        "(3, 'three@example.com')",
        "INSERT INTO \"Orders\" VALUES (1, '2024-02-20'), (2, '2023-11-01')",
    ]
    with engine.begin() as connection:
        for statement in statements:
            connection.execute(sa.text(statement))
    table = {
        "from": "customers",
        "key": "customerid",
        "columns": ["email"],
        "as_of": "2024-03-01",
        "signals": [
            {
                "name": "purchase",
                "table": "orders",
                "key": "customerid",
                "at": "orderedat",
                "inactive_after": "60d",
            }
        ],
    }
    segment = RulesSegment.model_validate(table)
    with read_segment("lapsed", segment, engine=engine, as_of=AS_OF, chunk_size=100) as (
        columns,
        chunks,
    ):
        rows = [tuple(row) for chunk in chunks for row in chunk]
    engine.dispose()
    assert list(columns)[:2] == ["customerid", "email"]
    assert [row[:2] for row in rows] == [(2, "two@example.com"), (3, "three@example.com")]

    document: dict[str, Any] = {
        "warehouse": {"url": warehouse_url},
        "state": {"url": f"sqlite:///{tmp_path / 'state.db'}"},
        "segments": {"lapsed": table},
        "destinations": {"mem": {"type": "memory"}},
        "syncs": {
            "s": {
                "segment": "lapsed",
                "destination": "mem",
                "audience": "A",
                "identifiers": {"email": "email"},
                "fields": {"idle": "days_inactive"},
            }
        },
    }
    registry = Registry(adapters={"memory": MemoryDestination})
    config = build_config(document, path=tmp_path / "winback.toml", registry=registry)
    runner = SyncRunner(config, dry_run=True)
    try:
        result = runner.run("s", RunOptions(dry_run=True))
    finally:
        runner.close()
    assert result.error is None, result.error
    assert result.status == "dry_run"
    assert result.segment_rows == 2
    assert result.planned == {"add": 2, "remove": 0, "update": 0}


def test_at_column_must_hold_dates(engine: sa.Engine) -> None:
    if engine.dialect.name == "sqlite":
        pytest.skip("SQLite stores dates as text; any column is read with date()")
    found = problems(engine, signals=[{**PURCHASE, "at": "status"}])
    assert "`at` must be a DATE or TIMESTAMP column" in found["segments.lapsed.signals[0].at"]


def test_key_of_another_type_names_the_signal(engine: sa.Engine) -> None:
    if engine.dialect.name != "postgresql":
        pytest.skip("DuckDB and SQLite convert between VARCHAR and INTEGER keys when comparing")
    with engine.begin() as connection:
        connection.execute(sa.text("CREATE TABLE web_visits (customer_ref VARCHAR, seen DATE)"))
    web = {"name": "web", "table": "web_visits", "key": "customer_ref", "at": "seen"}
    found = problems(engine, signals=[PURCHASE, {**web, "inactive_after": "30d"}])
    assert list(found) == ["segments.lapsed.signals[1].key"]
    message = found["segments.lapsed.signals[1].key"]
    assert message.startswith(
        "`web_visits.customer_ref` cannot be joined to `customers.customer_id`"
    )


@pytest.mark.postgres
def test_a_table_the_warehouse_user_may_not_read_is_not_called_a_type_mismatch(
    postgres_url: str,
) -> None:
    owner = sa.create_engine(postgres_url)
    role = f"wb_reader_{uuid.uuid4().hex[:8]}"
    try:
        load_warehouse(owner, {})
        with owner.begin() as connection:
            connection.execute(sa.text(f"CREATE ROLE {role} LOGIN PASSWORD 'pw'"))
            connection.execute(sa.text(f"GRANT SELECT ON orders TO {role}"))  # not customers
        url = sa.engine.make_url(postgres_url).set(username=role, password="pw")
        reader = sa.create_engine(url)
        try:
            found = problems(reader)
        finally:
            reader.dispose()
        message = found["segments.lapsed.signals[0].key"]
        assert message.startswith("`orders` or `customers` may not be read by the warehouse user")
        assert "permission denied for table customers" in message
        assert message.endswith("grant it SELECT on both")
        assert "different types" not in message
    finally:
        with owner.begin() as connection:
            connection.execute(sa.text(f"DROP OWNED BY {role}"))
            connection.execute(sa.text(f"DROP ROLE {role}"))
        owner.dispose()
