"""The diff inside the warehouse (DuckDB, PostgreSQL) plans exactly what the state-database diff
plans.

Each test runs the real engine twice over the same warehouse: once with the diff pushed
down (`[warehouse] pushdown = true`, the default) and once staging every row in the state
database (`pushdown = false`), each against its own state store and audience, and compares
everything a user sees: counts, skipped rows and their reasons, and the audience.
"""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from pathlib import Path
from typing import Any

import duckdb
import pytest
import sqlalchemy as sa
from hypothesis import example, given, settings
from hypothesis import strategies as st

from connector.config import QuerySegment, build_config
from connector.pushdown import KEY_WHITESPACE, valid_key_sql
from connector.staging import SegmentSource, segment_key, warehouse_key_issue
from connector.state import StateStore
from connector.sync import RunOptions, RunResult, SyncRunner
from connector.warehouse import DUCKDB_MEMORY_LIMIT
from destinations.registry import Registry
from tests.fakes.memory_destination import MemoryDestination

LONG_KEY = "x" * 600

DAY_ONE = """
CREATE OR REPLACE TABLE people AS SELECT * FROM (VALUES
    (1, 'a@example.com', DATE '2026-01-05', 12.50::DECIMAL(9, 2), 'US'),
    (2, '  B@Example.COM ', DATE '2026-02-01', 3.00::DECIMAL(9, 2), 'GB'),
    (3, 'not-an-email', NULL, NULL, 'FR'),
    (4, 'd@example.com', DATE '2026-03-01', 1.25::DECIMAL(9, 2), NULL),
    (4, 'second-row-of-4@example.com', NULL, NULL, NULL),
    (NULL, 'nokey@example.com', NULL, NULL, NULL),
    (5, NULL, NULL, NULL, 'DE'),
    (6, 'f@example.com', DATE '2026-04-01', 7.00::DECIMAL(9, 2), 'us'),
    (7, 'g@example.com', NULL, NULL, 'Germany')
) AS t(id, email, last_order, ltv, country)
"""

# Day two: 1 changes email, 2 changes a field only, 6 leaves, 8 joins, 4 is no longer duplicated,
# 3 becomes valid, 7 is unchanged.
DAY_TWO = """
CREATE OR REPLACE TABLE people AS SELECT * FROM (VALUES
    (1, 'a.new@example.com', DATE '2026-01-05', 12.50::DECIMAL(9, 2), 'US'),
    (2, '  B@Example.COM ', DATE '2026-02-01', 4.00::DECIMAL(9, 2), 'GB'),
    (3, 'c@example.com', NULL, NULL, 'FR'),
    (4, 'd@example.com', DATE '2026-03-01', 1.25::DECIMAL(9, 2), NULL),
    (5, NULL, NULL, NULL, 'DE'),
    (7, 'g@example.com', NULL, NULL, 'Germany'),
    (8, 'h@example.com', DATE '2026-05-01', 0.10::DECIMAL(9, 2), 'FR')
) AS t(id, email, last_order, ltv, country)
"""

_NULLS = "CAST(NULL AS DATE), CAST(NULL AS DECIMAL(9, 2)), CAST(NULL AS VARCHAR)"
SEGMENT_SQL = (
    "SELECT CAST(id AS VARCHAR) AS id, email, last_order, ltv, country FROM people UNION ALL "
    f"SELECT * FROM (VALUES ('   ', 'blank@example.com', {_NULLS}), "
    f"('{LONG_KEY}', 'long@example.com', {_NULLS})) "
    "AS extra(id, email, last_order, ltv, country)"
)


@pytest.fixture(params=["duckdb", pytest.param("postgresql", marks=pytest.mark.postgres)])
def warehouse_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "duckdb":
        return f"duckdb:///{tmp_path / 'warehouse.duckdb'}"
    return str(request.getfixturevalue("postgres_url"))


def write_warehouse(url: str, sql: str) -> None:
    """Run `sql` (statements separated by `;`, DuckDB's `CREATE OR REPLACE TABLE` included)."""
    if url.startswith("duckdb"):
        with duckdb.connect(url.removeprefix("duckdb:///")) as db:
            db.execute(sql)
        return
    engine = sa.create_engine(url)
    try:
        with engine.begin() as connection:
            for statement in filter(str.strip, sql.split(";")):
                if "CREATE OR REPLACE TABLE" in statement:
                    name = statement.split("CREATE OR REPLACE TABLE")[1].split()[0]
                    connection.exec_driver_sql(f"DROP TABLE IF EXISTS {name}")
                    statement = statement.replace("CREATE OR REPLACE TABLE", "CREATE TABLE")
                connection.exec_driver_sql(statement)
    finally:
        engine.dispose()


def make_runner(folder: Path, url: str, *, pushdown: bool, audience: str, sql: str) -> SyncRunner:
    document: dict[str, Any] = {
        "warehouse": {"url": url, "pushdown": pushdown},
        "state": {"url": f"sqlite:///{folder / f'state-{audience}.db'}"},
        "segments": {"people": {"key": "id", "sql": sql}},
        "destinations": {"mem": {"type": "memory"}},
        "syncs": {
            "s": {
                "segment": "people",
                "destination": "mem",
                "audience": audience,
                "identifiers": {"email": "email", "country": "country"},
                "fields": {"LAST_ORDER": "last_order", "LTV": "ltv"},
            }
        },
    }
    registry = Registry(adapters={"memory": MemoryDestination})
    return SyncRunner(build_config(document, path=folder / "winback.toml", registry=registry))


def outcome(runner: SyncRunner, result: RunResult) -> dict[str, Any]:
    """What a user sees of a run, without what differs by nature (run id, duration)."""
    store = StateStore(runner.config.state.url)
    issues = sorted((i.kind, i.key or "", i.reason) for i in store.issues(result.run_id, 100))
    store.dispose()
    return {
        "status": result.status,
        "error": result.error,
        "segment_rows": result.segment_rows,
        "skipped": result.skipped,
        "planned": result.planned,
        "sent": result.sent,
        "rejected": result.rejected,
        "issues": issues,
    }


def members(audience: str) -> dict[str, Any]:
    """The audience without the platform ids (a counter shared by both runs)."""
    return {
        key: {"identifiers": m["identifiers"], "fields": m["fields"]}
        for key, m in MemoryDestination.audiences.get(audience, {}).items()
    }


def run_both(
    folder: Path, url: str, sql: str = SEGMENT_SQL, **options: Any
) -> list[dict[str, Any]]:
    outcomes = []
    for pushdown, audience in ((True, "pushed"), (False, "staged")):
        runner = make_runner(folder, url, pushdown=pushdown, audience=audience, sql=sql)
        try:
            outcomes.append(outcome(runner, runner.run("s", RunOptions(**options))))
        finally:
            runner.close()
    return outcomes


def test_both_diffs_plan_and_send_the_same_over_two_days(
    tmp_path: Path, warehouse_url: str
) -> None:
    MemoryDestination.reset()
    write_warehouse(warehouse_url, DAY_ONE)
    pushed, staged = run_both(tmp_path, warehouse_url)
    assert pushed == staged
    assert pushed["status"] == "success", pushed["error"]
    assert pushed["segment_rows"] == 11
    assert pushed["planned"] == {"add": 5, "remove": 0, "update": 0}
    reasons = {(kind, key[:5]): reason for kind, key, reason in pushed["issues"]}
    assert "duplicate key `4`" in reasons["skipped", "4"]
    assert "null key" in reasons["skipped", ""]
    assert "600 characters" in reasons["skipped", "xxxxx"]
    assert members("pushed") == members("staged")
    assert members("pushed")["1"]["fields"] == {
        "LAST_ORDER": "2026-01-05",
        "LTV": 12.5,
    }

    write_warehouse(warehouse_url, DAY_TWO)
    pushed, staged = run_both(tmp_path, warehouse_url)
    assert pushed == staged
    assert pushed["planned"] == {"add": 2, "remove": 1, "update": 2}
    assert members("pushed") == members("staged")
    assert sorted(MemoryDestination.audiences["pushed"]) == ["1", "2", "3", "4", "7", "8"]

    pushed, staged = run_both(tmp_path, warehouse_url)  # unchanged
    assert pushed == staged
    assert pushed["planned"] == {"add": 0, "remove": 0, "update": 0}

    pushed, staged = run_both(tmp_path, warehouse_url, full_resync=True)
    assert pushed == staged
    assert pushed["planned"] == {"add": 6, "remove": 0, "update": 0}


def test_switching_where_the_diff_runs_sends_nothing_again(
    tmp_path: Path, warehouse_url: str
) -> None:
    MemoryDestination.reset()
    write_warehouse(warehouse_url, DAY_ONE)
    for pushdown in (True, False, True):
        runner = make_runner(
            tmp_path, warehouse_url, pushdown=pushdown, audience="A", sql=SEGMENT_SQL
        )
        try:
            result = runner.run("s", RunOptions())
        finally:
            runner.close()
        assert result.status == "success", result.error
        sent = sum(result.sent.values())
        assert sent == (5 if pushdown and result.sent["add"] else 0), result.sent
    assert len(MemoryDestination.audiences["A"]) == 5


def test_a_rules_segment_is_diffed_in_the_warehouse_too(tmp_path: Path, warehouse_url: str) -> None:
    MemoryDestination.reset()
    write_warehouse(
        warehouse_url,
        DAY_ONE
        + "; CREATE OR REPLACE TABLE orders AS SELECT * FROM (VALUES (1, DATE '2026-01-01'), "
        "(2, DATE '2026-06-01')) AS o(customer_id, ordered_at)",
    )
    document: dict[str, Any] = {
        "warehouse": {"url": warehouse_url},
        "state": {"url": f"sqlite:///{tmp_path / 'state.db'}"},
        "segments": {
            "lapsed": {
                "from": "people",
                "key": "id",
                "columns": ["email"],
                "where": "id IS NOT NULL",
                "as_of": "2026-07-01",
                "signals": [
                    {"name": "purchase", "table": "orders", "key": "customer_id", "at": "ordered_at",
                     "inactive_after": "90d", "never": "exclude"}
                ],
            }
        },
        "destinations": {"mem": {"type": "memory"}},
        "syncs": {
            "s": {
                "segment": "lapsed",
                "destination": "mem",
                "audience": "R",
                "identifiers": {"email": "email"},
                "fields": {"DAYS": "days_inactive"},
            }
        },
    }  # fmt: skip
    registry = Registry(adapters={"memory": MemoryDestination})
    runner = SyncRunner(build_config(document, path=tmp_path / "winback.toml", registry=registry))
    try:
        first = runner.run("s", RunOptions())
        again = runner.run("s", RunOptions())
    finally:
        runner.close()
    assert first.status == "success", first.error
    audience = MemoryDestination.audiences["R"]
    assert list(audience) == ["1"]
    assert audience["1"]["identifiers"] == {"email": "a@example.com"}
    assert audience["1"]["fields"] == {"DAYS": 181}
    assert again.planned == {"add": 0, "remove": 0, "update": 0}


@pytest.mark.parametrize("column", ["winback_key", "winback_fp", "winback_changed", "winback_row"])
def test_a_segment_column_named_like_winbacks_own_is_refused(
    tmp_path: Path, warehouse_url: str, column: str
) -> None:
    write_warehouse(warehouse_url, DAY_ONE)
    sql = f"SELECT id, email, country, last_order, ltv, 1 AS {column} FROM people"
    runner = make_runner(tmp_path, warehouse_url, pushdown=True, audience="A", sql=sql)
    try:
        result = runner.run("s", RunOptions())
    finally:
        runner.close()
    assert result.status == "failed"
    assert f"`{column}`" in (result.error or "")
    assert "rename it" in (result.error or "")


SETTINGS = (
    "SELECT name, value FROM duckdb_settings() WHERE name IN "
    "('memory_limit', 'allocator_flush_threshold', 'allocator_bulk_deallocation_flush_threshold')"
    " ORDER BY name"
)


@pytest.mark.parametrize("query", ["", "?memory_limit=200MB", "?allocator_flush_threshold=64MB"])
def test_the_warehouse_memory_settings_are_restored_after_the_diff(
    tmp_path: Path, query: str
) -> None:
    """The diff lowers DuckDB's memory limit for a moment to release its buffers and its
    allocator's flush thresholds while it runs; the URL's values or the defaults come back
    (winback's own memory limit, DUCKDB_MEMORY_LIMIT, when the URL sets none)."""
    url = f"duckdb:///{tmp_path / 'warehouse.duckdb'}"
    write_warehouse(url, DAY_ONE)
    runner = make_runner(tmp_path, url, pushdown=True, audience="A", sql=SEGMENT_SQL)
    url += query
    runner.config.warehouse.url = url
    fresh = sa.create_engine(
        url
        if "memory_limit" in query
        else f"{url}{'&' if query else '?'}memory_limit={DUCKDB_MEMORY_LIMIT}",
        connect_args={"read_only": True},
    )
    try:
        with fresh.connect() as connection:
            expected = [connection.exec_driver_sql(SETTINGS).all()]
        fresh.dispose()
        for _ in range(2):  # the second run compares with the first run's snapshot
            result = runner.run("s", RunOptions())
            assert result.status == "success", result.error
            with runner.warehouse.connect() as connection:
                assert [connection.exec_driver_sql(SETTINGS).all()] == expected
    finally:
        runner.close()


def over_keys(test: Any) -> Any:
    """The keys both dialects' validity checks are compared with Python's on."""
    keys = st.one_of(st.none(), st.text(alphabet=KEY_WHITESPACE + "a\u00a0\u2003é", max_size=8))
    for edge in ("k" * 500, "k" * 501, " " * 600):
        test = example(edge)(test)
    return settings(max_examples=300, deadline=None)(given(keys)(test))


KEY_SOURCE = SegmentSource(
    sync="s",
    segment_name="seg",
    segment=QuerySegment(key="id", sql="SELECT 1 AS id"),
    identifiers={"email": "email"},
    fields={},
    as_of=dt.date(2026, 1, 1),
    chunk_size=1000,
)


def valid_in_python(key: str | None) -> bool:
    """Python's check of a key read row by row (`segment_key`, the streamed first sync and the
    state-database diff), which must agree with the warehouse's."""
    valid = key is not None and bool(key.strip(KEY_WHITESPACE)) and len(key) <= 500
    assert isinstance(segment_key(KEY_SOURCE, key), str) is valid
    assert (warehouse_key_issue(KEY_SOURCE, key) is None) is valid
    return valid


@over_keys
def test_the_warehouse_and_python_agree_on_valid_keys(key: str | None) -> None:
    """The streamed first sync checks keys in Python, the in-warehouse diff in DuckDB."""
    connection = duckdb.connect()
    try:
        sql = f"SELECT {valid_key_sql('k')} FROM (SELECT CAST(? AS VARCHAR) AS k)"
        in_warehouse = connection.execute(sql, [key]).fetchone()[0]  # type: ignore[index]
    finally:
        connection.close()
    assert bool(in_warehouse) is valid_in_python(key)


@pytest.mark.postgres
def test_postgresql_and_python_agree_on_valid_keys(postgres_url: str) -> None:
    """The same check in PostgreSQL's dialect (a regular-expression match)."""
    engine = sa.create_engine(postgres_url)

    @over_keys
    def agree(key: str | None) -> None:
        sql = (
            f"SELECT {valid_key_sql('k', 'postgresql')} FROM (SELECT CAST(:key AS TEXT) AS k) AS t"
        )
        in_warehouse = connection.execute(sa.text(sql), {"key": key}).scalar()
        assert bool(in_warehouse) is valid_in_python(key)

    try:
        with engine.connect() as connection:
            agree()
    finally:
        engine.dispose()


@pytest.mark.postgres
@pytest.mark.parametrize("refusal", ["no TEMPORARY privilege", "read-only (a replica)"])
def test_a_postgresql_warehouse_that_refuses_temporary_tables_compares_in_the_state_database(
    tmp_path: Path, postgres_url: str, refusal: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The in-warehouse diff needs temporary tables; a user without the privilege, or a read
    replica (every transaction read-only), gets the state-database diff and a warning that says
    how to skip the attempt."""
    write_warehouse(postgres_url, DAY_ONE)
    admin = sa.make_url(postgres_url)
    role = f"wb_reader_{uuid.uuid4().hex[:8]}"
    engine = sa.create_engine(admin)
    with engine.begin() as connection:
        connection.exec_driver_sql(f"CREATE ROLE {role} LOGIN PASSWORD 'reader'")
        connection.exec_driver_sql(f"GRANT SELECT ON people TO {role}")
        if refusal == "no TEMPORARY privilege":
            connection.exec_driver_sql(
                f'REVOKE TEMPORARY ON DATABASE "{admin.database}" FROM PUBLIC'
            )
        else:
            connection.exec_driver_sql(f"ALTER ROLE {role} SET default_transaction_read_only = on")
    reader = admin.set(username=role, password="reader").render_as_string(hide_password=False)
    caplog.set_level(logging.INFO, logger="winback")
    try:
        MemoryDestination.reset()
        runner = make_runner(tmp_path, reader, pushdown=True, audience="A", sql=SEGMENT_SQL)
        try:
            first = runner.run("s", RunOptions())  # streamed: no temporary table needed
            write_warehouse(postgres_url, DAY_TWO)  # a new table: granted again
            with engine.begin() as connection:
                connection.exec_driver_sql(f"GRANT SELECT ON people TO {role}")
            second = runner.run("s", RunOptions())
        finally:
            runner.close()
    finally:
        with engine.begin() as connection:
            connection.exec_driver_sql(f"DROP OWNED BY {role}")
            connection.exec_driver_sql(f"DROP ROLE {role}")
        engine.dispose()

    assert first.status == "success", first.error
    assert second.status == "success", second.error
    assert second.planned == {"add": 2, "remove": 1, "update": 2}
    assert sorted(MemoryDestination.audiences["A"]) == ["1", "2", "3", "4", "7", "8"]
    log = caplog.text
    assert "refuses temporary tables" in log and "pushdown = false" in log, log
    assert "read and compared the segment in the state database" in log, log


def test_keys_of_a_case_insensitive_column_are_told_apart_as_texts(
    tmp_path: Path, warehouse_url: str
) -> None:
    """DuckDB's NOCASE and PostgreSQL's nondeterministic collations make 'A' and 'a' one key
    to GROUP BY and joins; the state database keeps them as two texts. The diff compares key
    texts as bytes, as the state database does: both are members, the second 'a' is the
    duplicate, and a rerun sends nothing."""
    MemoryDestination.reset()
    values = (
        "('A', 'upper@example.com', NULL, NULL, NULL), "
        "('a', 'lower@example.com', NULL, NULL, NULL), "
        "('a', 'again@example.com', NULL, NULL, NULL)"
    )
    if warehouse_url.startswith("duckdb"):
        setup, case_insensitive = "", "VARCHAR COLLATE NOCASE"
    else:
        setup = (
            "CREATE COLLATION IF NOT EXISTS winback_ci "
            "(provider = icu, locale = 'und-u-ks-level2', deterministic = false); "
        )
        case_insensitive = "TEXT COLLATE winback_ci"
    write_warehouse(
        warehouse_url,
        f"{setup}CREATE OR REPLACE TABLE people (id {case_insensitive}, email VARCHAR, "
        "last_order DATE, ltv DECIMAL(9, 2), country VARCHAR); "
        f"INSERT INTO people VALUES {values}",
    )
    sql = "SELECT id, email, last_order, ltv, country FROM people"
    for _ in range(2):  # the first sync, then a rerun compared in the warehouse
        pushed, staged = run_both(tmp_path, warehouse_url, sql=sql)
        assert pushed == staged
        assert pushed["status"] == "success", pushed["error"]
    assert pushed["planned"] == {"add": 0, "remove": 0, "update": 0}
    assert members("pushed") == members("staged")
    assert {k: m["identifiers"]["email"] for k, m in members("pushed").items()} == {
        "A": "upper@example.com",
        "a": "lower@example.com",
    }


def test_the_first_row_of_a_duplicate_key_is_the_same_on_every_run(
    tmp_path: Path, warehouse_url: str
) -> None:
    """The first sync keeps the first row of each duplicate key as the query returns them; the
    warehouse diff of the next runs must pick that same row, or an unchanged segment would
    send the other row as an update (the join with the snapshot reorders rows)."""
    MemoryDestination.reset()
    rows = ", ".join(
        f"('{n % 40}', '{f'u{n}@example.com' if n % 3 else f'bad{n}'}', 'US')" for n in range(200)
    )
    write_warehouse(
        warehouse_url,
        f"CREATE OR REPLACE TABLE people AS SELECT * FROM (VALUES {rows}) AS t(id, email, country)",
    )
    sql = "SELECT id, email, country, NULL AS last_order, NULL AS ltv FROM people WHERE country = 'US'"
    for run in range(3):
        runner = make_runner(tmp_path, warehouse_url, pushdown=True, audience="A", sql=sql)
        try:
            result = runner.run("s", RunOptions())
        finally:
            runner.close()
        assert result.status == "success", result.error
        assert result.skipped == 160 + 14  # the other rows of each key; keys without email
        assert sum(result.sent.values()) == (26 if run == 0 else 0), result.sent
    first_rows = {str(n): f"u{n}@example.com" for n in range(40) if n % 3}
    assert {k: m["identifiers"]["email"] for k, m in members("A").items()} == first_rows
