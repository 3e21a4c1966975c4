"""A destination that answers 413 gets smaller batches, down to single rows, through the CLI.

The first run of a sync on DuckDB is streamed (`connector.first_sync`), later runs are planned:
both paths halve a refused batch until the receiver takes it, and a row too large even alone is
recorded as rejected (exit 3) instead of blocking the others, unless that row is small: then the
destination refuses everything and the batch fails, pending for the next run.
"""

from __future__ import annotations

from pathlib import Path

from tests.fakes.webhook_receiver import WebhookReceiver
from tests.helpers import (
    SECRET,
    build_warehouse,
    run_cli,
    warehouse_sql,
    webhook_destination,
    webhook_sync,
    write_config,
)

RUN = ("sync", "run", "--output", "json")


def hook_config(folder: Path, receiver: WebhookReceiver, *, batch_size: int) -> None:
    """One sync `s` of the default segment to the receiver, in batches of `batch_size`."""
    write_config(
        folder,
        destinations={"hook": webhook_destination(receiver.url, batch_size=batch_size)},
        syncs={"s": webhook_sync()},
    )


def test_refused_batches_are_halved_until_the_receiver_takes_them(tmp_path: Path) -> None:
    build_warehouse(tmp_path / "warehouse.duckdb", 40)
    with WebhookReceiver(secret=SECRET, max_records=3) as receiver:
        hook_config(tmp_path, receiver, batch_size=16)
        first = run_cli(*RUN, cwd=tmp_path)
        assert first.returncode == 0, first
        run = first.json()["runs"][0]
        assert run["sent"]["add"] == 40 and run["rejected"] == 0
        assert set(receiver.members) == {str(i) for i in range(1, 41)}
        assert max(len(d.keys) for d in receiver.deliveries) <= 3
        assert not any(d.duplicate for d in receiver.deliveries)

        warehouse_sql(  # 10 join: planned, not streamed
            tmp_path / "warehouse.duckdb",
            "INSERT INTO customers SELECT i, 'user' || i || '@example.com', NULL, 'Name' || i, "
            "'US', 't0', true FROM range(41, 51) AS r(i)",
        )
        second = run_cli(*RUN, cwd=tmp_path)
        assert second.returncode == 0, second
        assert second.json()["runs"][0]["sent"]["add"] == 10
        assert set(receiver.members) == {str(i) for i in range(1, 51)}


def test_a_row_too_large_even_alone_is_rejected_and_the_others_are_sent(tmp_path: Path) -> None:
    warehouse = tmp_path / "warehouse.duckdb"
    build_warehouse(warehouse, 6)
    warehouse_sql(
        warehouse, "UPDATE customers SET first_name = repeat('x', 100000) WHERE customer_id = 3"
    )
    with WebhookReceiver(secret=SECRET, max_body_bytes=64 * 1024) as receiver:
        hook_config(tmp_path, receiver, batch_size=4)
        result = run_cli(*RUN, cwd=tmp_path)
        again = run_cli(*RUN, cwd=tmp_path)
    assert result.returncode == 3, result
    run = result.json()["runs"][0]
    assert run["status"] == "partial"
    assert (run["sent"]["add"], run["rejected"]) == (5, 1)
    assert set(receiver.members) == {"1", "2", "4", "5", "6"}
    # Rejected rows are not retried until they change.
    assert again.returncode == 0, again
    assert again.json()["runs"][0]["planned"] == {"add": 0, "remove": 0, "update": 0}


def test_a_destination_refusing_even_small_single_rows_fails_and_keeps_them_pending(
    tmp_path: Path,
) -> None:
    """A wrong endpoint (or a proxy) answering 413 to everything: rows of a few hundred bytes
    are not rejected for good as too large; the run fails and the next one, once the URL is
    right, sends them all."""
    build_warehouse(tmp_path / "warehouse.duckdb", 6)
    with WebhookReceiver(secret=SECRET, max_records=0) as receiver:
        hook_config(tmp_path, receiver, batch_size=4)
        failed = run_cli(*RUN, cwd=tmp_path)
        assert failed.returncode == 1, failed
        run = failed.json()["runs"][0]
        assert (run["status"], run["sent"]["add"], run["rejected"]) == ("failed", 0, 0)
        assert "refuses any request: check its URL" in run["error"]
        assert receiver.members == {}

        receiver.max_records = None  # the URL is fixed
        healed = run_cli(*RUN, cwd=tmp_path)
    assert healed.returncode == 0, healed
    assert healed.json()["runs"][0]["sent"]["add"] == 6
    assert set(receiver.members) == {str(i) for i in range(1, 7)}
