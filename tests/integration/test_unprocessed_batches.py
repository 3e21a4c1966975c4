"""A batch whose retries run out, or that stops the sync: pending when the destination said it
did not process it (429, 401, a refused connection), in doubt (unconfirmed) when it may have
applied it (5xx).

Driven through the CLI against the fake webhook receiver, a real server on 127.0.0.1."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tests.fakes.webhook_receiver import WebhookReceiver
from tests.helpers import SECRET, run_cli, warehouse_sql, webhook_project

CUSTOMERS = 20


def audience_cell(folder: Path) -> str:
    """The sync's members as `sync status` shows them: `20`, or `18 (+2 unconfirmed)`."""
    status = run_cli("sync", "status", cwd=folder)
    assert status.returncode == 0, status
    row = next(line for line in status.stdout.splitlines() if line.startswith("│ s "))
    return row.split("│")[4].strip()  # sync, destination, audience, members


@pytest.mark.parametrize(
    ("status", "audience", "resent_as"),
    [
        (429, f"{CUSTOMERS}", {"add": 0, "remove": 0, "update": 2}),  # not processed: pending
        (503, f"{CUSTOMERS - 2} (+2 unconfirmed)", {"add": 2, "remove": 0, "update": 0}),
        (401, f"{CUSTOMERS}", {"add": 0, "remove": 0, "update": 2}),  # refused: pending
    ],
)
def test_an_update_batch_refused_until_retries_run_out(
    tmp_path: Path, status: int, audience: str, resent_as: dict[str, int]
) -> None:
    with WebhookReceiver(secret=SECRET) as receiver:
        webhook_project(tmp_path, receiver.url, customers=CUSTOMERS)
        first = run_cli("sync", "run", "--output", "json", cwd=tmp_path)
        assert (first.returncode, first.run()["sent"]["add"]) == (0, CUSTOMERS), first
        warehouse_sql(
            tmp_path / "warehouse.duckdb",
            "UPDATE customers SET first_name = 'Changed' WHERE customer_id <= 2",
        )

        receiver.fail_always(status)
        failed = run_cli("sync", "run", "--output", "json", cwd=tmp_path)
        run = failed.run()
        retries = 0 if status == 401 else 2  # a 401 stops the sync at once
        assert (failed.returncode, run["status"], run["retries"]) == (1, "failed", retries), failed
        assert f"POST /hook answered {status}" in run["error"]
        assert audience_cell(tmp_path) == audience

        receiver.fail_always(None)
        again = run_cli("sync", "run", "--output", "json", cwd=tmp_path)
        assert (again.returncode, again.run()["sent"]) == (0, resent_as), again
        members = receiver.members
    assert {members[k]["fields"]["FNAME"] for k in ("1", "2")} == {"Changed"}
    assert len(members) == CUSTOMERS


def test_a_destination_that_refuses_connections_leaves_the_batch_pending(tmp_path: Path) -> None:
    with socket.socket() as unused:  # a port nobody listens on
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    webhook_project(tmp_path, f"http://127.0.0.1:{port}/hook", customers=5)
    failed = run_cli("sync", "run", "--output", "json", cwd=tmp_path)
    assert failed.returncode == 1 and "connection refused" in failed.run()["error"], failed
    assert audience_cell(tmp_path) == "0"  # nothing in doubt: the rows are simply new
