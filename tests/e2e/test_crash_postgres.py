"""`kill -9` with PostgreSQL as both the warehouse and the state store loses nothing.

The same proof as `test_crash.py` (which runs on DuckDB and SQLite) on the other supported
pair: the segment is compared in PostgreSQL (pushdown), the snapshot, runs and lock live in a
second PostgreSQL database. `winback sync run` is SIGKILLed while it adds, then while it
removes during a second run; each time the next run must finish the job: the receiver's
audience and the state snapshot equal the segment, the only keys added twice are those of the
batch in flight at a kill, and no run is left shown as running.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.e2e.test_crash import (
    BATCH,
    RUN,
    complete_run,
    duplicate_adds,
    kill_when,
    kill_while_removing,
)
from tests.helpers import (
    SEGMENT_SQL,
    LoggedReceiverProcess,
    finish,
    start_cli,
    webhook_destination,
    webhook_sync,
    write_config,
)

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

CUSTOMERS = 8_000


@pytest.fixture
def second_postgres_url(postgres_admin_engine: sa.Engine) -> Iterator[str]:
    """Another brand-new PostgreSQL database (the state store's), dropped after the test."""
    name = f"wb_{uuid.uuid4().hex[:12]}"
    with postgres_admin_engine.connect() as connection:
        connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
    yield postgres_admin_engine.url.set(database=name).render_as_string(hide_password=False)
    with postgres_admin_engine.connect() as connection:
        connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def warehouse_sql(url: str, *statements: str) -> None:
    engine = sa.create_engine(url)
    try:
        with engine.begin() as connection:
            for statement in statements:
                connection.execute(sa.text(statement))
    finally:
        engine.dispose()


def query(url: str, sql: str) -> list[sa.Row[tuple[object, ...]]]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as connection:
            return list(connection.execute(sa.text(sql)))
    finally:
        engine.dispose()


def segment(url: str) -> dict[str, str]:
    return {
        str(key): email
        for key, email in query(url, f"SELECT customer_id, email FROM ({SEGMENT_SQL}) s")
    }


def assert_in_sync(warehouse: str, state: str, receiver: LoggedReceiverProcess) -> None:
    expected = segment(warehouse)
    members = receiver.members()
    assert {k: m["identifiers"]["email"] for k, m in members.items()} == expected
    snapshot = query(state, "SELECT key FROM snapshot WHERE sync = 's' AND status = 'member'")
    assert {key for (key,) in snapshot} == set(expected)
    assert query(state, "SELECT sync FROM locks") == []
    assert query(state, "SELECT run_id FROM runs WHERE status = 'running'") == []


def test_kill_with_postgresql_warehouse_and_state_loses_nothing(
    tmp_path: Path, postgres_url: str, second_postgres_url: str
) -> None:
    warehouse, state = postgres_url, second_postgres_url
    warehouse_sql(
        warehouse,
        "CREATE TABLE customers AS SELECT i AS customer_id, "
        "'user' || i || '@example.com' AS email, "
        "CASE WHEN i % 3 = 0 THEN '+1415555' || lpad((i % 10000)::text, 4, '0') END AS phone, "
        "'Name' || i AS first_name, (ARRAY['US', 'GB', 'FR', 'DE'])[i % 4 + 1] AS country, "
        f"'t' || (i % 5) AS tier, true AS lapsed FROM generate_series(1, {CUSTOMERS}) AS i",
    )
    # 50 ms a request: the kills below land with hundreds of ms to spare on a loaded machine.
    with LoggedReceiverProcess(tmp_path, delay_s=0.05) as receiver:
        write_config(
            tmp_path,
            destinations={"hook": webhook_destination(receiver.url, batch_size=BATCH)},
            syncs={"s": webhook_sync()},
            warehouse_url=warehouse,
            state_url=state,
        )
        # 1. Killed while adding (the first sync streams the segment).
        first = start_cli(*RUN, cwd=tmp_path)
        kill_when(first, lambda: receiver.requests() >= 10)
        (killed,) = query(state, "SELECT sent_add, batches FROM runs WHERE status = 'running'")
        assert 0 < killed[0] == killed[1] * BATCH <= receiver.requests() * BATCH
        assert 0 < len(receiver.members()) < CUSTOMERS

        run = complete_run(tmp_path)
        assert run["status"] == "success"
        assert_in_sync(warehouse, state, receiver)
        again = duplicate_adds(receiver.log())
        assert len(again) <= BATCH, len(again)  # only the batch in flight at the kill
        assert set(again.values()) <= {1}

        # 2. 30% leave, 300 change email, 500 join; killed during the removals (sent first).
        warehouse_sql(
            warehouse,
            "UPDATE customers SET lapsed = false WHERE customer_id % 10 IN (1, 2, 3)",
            "UPDATE customers SET email = 'moved.' || email "
            "WHERE customer_id % 10 = 5 AND customer_id <= 3000",
            "INSERT INTO customers SELECT i, 'user' || i || '@example.com', NULL, 'Name' || i, "
            f"'US', 't0', true FROM generate_series({CUSTOMERS + 1}, {CUSTOMERS + 500}) AS i",
        )
        kill_while_removing(tmp_path, receiver, requests=3)
        run = complete_run(tmp_path)
        assert run["status"] == "success"
        planned = run["planned"]
        assert isinstance(planned, dict)
        assert (planned["add"], planned["update"]) == (500, 300)
        # What the killed run removed and checkpointed is not removed again.
        assert 0 < planned["remove"] <= 2400 - 2 * BATCH
        assert_in_sync(warehouse, state, receiver)
        again = duplicate_adds(receiver.log())
        assert len(again) <= 2 * BATCH
        assert set(again.values()) <= {1}

        final = complete_run(tmp_path)
        assert final["planned"] == {"add": 0, "remove": 0, "update": 0}
        history = finish(start_cli("sync", "history", "s", "-o", "json", cwd=tmp_path), RUN)
        assert [r["status"] for r in history.json()] == [
            "success",
            "success",
            "interrupted",
            "success",
            "interrupted",
        ]
