"""End to end through the real CLI process: demo, webhook syncs, modes, guards, errors, exit codes.

Every test starts `python -m connector` as a subprocess against real DuckDB warehouses, a real
SQLite (or PostgreSQL) state store and the fake webhook receiver listening on 127.0.0.1.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import socket
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from connector.sync import percent_over
from destinations.testing.http_server import FakeHttpServer, ScriptedResponse
from tests.fakes.webhook_receiver import WebhookReceiver
from tests.helpers import (
    SECRET,
    CliResult,
    build_warehouse,
    database_dump,
    run_cli,
    run_many,
    segment_members,
    snapshot_members,
    sqlite_rows,
    state_db,
    warehouse_sql,
    webhook_destination,
    webhook_project,
    webhook_sync,
    write_config,
)

RUN_FIELDS = {
    "sync",
    "run_id",
    "status",
    "segment_rows",
    "skipped",
    "planned",
    "sent",
    "rejected",
    "batches",
    "retries",
    "duration_s",
    "error",
}
ACTION_FIELDS = {"add", "remove", "update"}


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    with WebhookReceiver(secret=SECRET) as server:
        yield server


def emails(receiver: WebhookReceiver) -> dict[str, str]:
    """The receiver's audience: key -> email."""
    return {key: record["identifiers"]["email"] for key, record in receiver.members.items()}


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def change_segment(warehouse: Path) -> None:
    """Customers 1-5 leave, 6-8 change email, 51-55 join (on top of a 50-customer warehouse)."""
    warehouse_sql(
        warehouse,
        "UPDATE customers SET lapsed = false WHERE customer_id <= 5",
        "UPDATE customers SET email = 'NEW.' || email WHERE customer_id BETWEEN 6 AND 8",
        "INSERT INTO customers SELECT i, 'user' || i || '@example.com', NULL, 'Name' || i, 'US', "
        "'t0', true FROM range(51, 56) AS r(i)",
    )


# -- the demo -----------------------------------------------------------------------------------


def test_demo_commands_end_to_end(tmp_path: Path) -> None:
    init = run_cli("init", "--demo", cwd=tmp_path)
    assert init.returncode == 0, init
    assert (tmp_path / "winback.toml").is_file()

    # Commands that write nothing, side by side.
    init_again, validate, explain, twice, unwritable, plan, status, history = run_many(
        ("init", "--demo"),
        ("config", "validate"),
        ("segments", "explain", "lapsed_buyers"),
        ("sync", "plan", "lapsed_to_csv", "lapsed_to_csv", "-o", "json"),
        ("--config", "/proc/winback-test/winback.toml", "init"),
        ("sync", "plan", "--output", "json"),
        ("sync", "status"),
        ("sync", "history", "lapsed_to_csv"),
        cwd=tmp_path,
    )
    assert init_again.returncode == 2, init_again  # never overwrites silently

    assert validate.returncode == 0, validate
    assert "valid" in validate.stdout

    assert explain.returncode == 0, explain
    assert explain.stdout.lstrip().upper().startswith(("SELECT", "WITH")), explain.stdout[:200]
    assert "qualifying people:" in explain.stdout

    assert [run["sync"] for run in twice.json()["runs"]] == ["lapsed_to_csv"]  # runs once

    assert unwritable.returncode == 1 and "Traceback" not in unwritable.stderr
    assert "error: cannot write `/proc/winback-test`" in unwritable.stderr

    assert plan.returncode == 0, plan
    assert {r["status"] for r in plan.json()["runs"]} == {"dry_run"}
    assert plan.run("lapsed_to_csv")["planned"]["add"] > 0
    assert status.returncode == 0, status
    assert history.returncode == 0, history
    assert not (tmp_path / "exports").exists()
    assert not state_db(tmp_path).exists()  # no writes anywhere, not even a new state store

    first = run_cli("sync", "run", "--output", "json", cwd=tmp_path)
    assert first.returncode == 0, first
    document = first.json()
    assert set(document) == {"runs", "exit_code"}
    assert document["exit_code"] == 0
    syncs = list(tomllib.loads((tmp_path / "winback.toml").read_text())["syncs"])
    assert {"lapsed_to_csv", "prospects_to_jsonl"} <= set(syncs)
    assert [r["sync"] for r in document["runs"]] == syncs
    for run in document["runs"]:
        assert set(run) == RUN_FIELDS
        assert set(run["planned"]) == set(run["sent"]) == ACTION_FIELDS
        assert run["status"] == "success"
        assert run["error"] is None
        assert run["sent"] == run["planned"]
        assert run["planned"]["add"] == run["segment_rows"] - run["skipped"] > 0
        assert run["batches"] >= 1
        assert run["retries"] == 0
        assert isinstance(run["duration_s"], float)
    lapsed = first.run("lapsed_to_csv")
    export = tmp_path / "exports" / "lapsed_to_csv" / f"{lapsed['run_id']}.csv"
    with export.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == lapsed["sent"]["add"]
    assert {row["action"] for row in rows} == {"add"}
    assert len({row["key"] for row in rows}) == len(rows)
    prospects = first.run("prospects_to_jsonl")
    jsonl = tmp_path / "exports" / "prospects_to_jsonl" / f"{prospects['run_id']}.jsonl"
    lines = [json.loads(line) for line in jsonl.read_text(encoding="utf-8").splitlines()]
    assert len(lines) == prospects["sent"]["add"]
    assert snapshot_members(tmp_path, "lapsed_to_csv") == {row["key"] for row in rows}

    # An unchanged rerun sends nothing and writes no file.
    again = run_cli("sync", "run", "--output", "json", cwd=tmp_path)
    assert again.returncode == 0, again
    for run in again.json()["runs"]:
        assert run["status"] == "success"
        assert run["planned"] == run["sent"] == dict.fromkeys(ACTION_FIELDS, 0)
        assert run["batches"] == 0
    assert len(list((tmp_path / "exports" / "lapsed_to_csv").iterdir())) == 1

    # Some lapsed buyers leave: `sync plan` shows the removals and writes nothing anywhere.
    gone = sorted(int(row["key"]) for row in rows)[:7]
    warehouse_sql(
        tmp_path / "demo_warehouse.duckdb",
        f"DELETE FROM customers WHERE customer_id IN ({', '.join(map(str, gone))})",
    )
    before = database_dump(state_db(tmp_path))
    plan = run_cli("sync", "plan", "lapsed_to_csv", "--output", "json", cwd=tmp_path)
    assert plan.returncode == 0, plan
    assert plan.run()["status"] == "dry_run"
    assert plan.run()["planned"] == {"add": 0, "remove": 7, "update": 0}
    assert plan.run()["sent"] == dict.fromkeys(ACTION_FIELDS, 0)
    assert database_dump(state_db(tmp_path)) == before
    assert len(list((tmp_path / "exports" / "lapsed_to_csv").iterdir())) == 1

    removal = run_cli("sync", "run", "lapsed_to_csv", "--output", "json", cwd=tmp_path)
    assert removal.returncode == 0, removal
    assert removal.run()["sent"] == {"add": 0, "remove": 7, "update": 0}
    removal_file = tmp_path / "exports" / "lapsed_to_csv" / f"{removal.run()['run_id']}.csv"
    with removal_file.open(newline="", encoding="utf-8") as handle:
        removed = list(csv.DictReader(handle))
    assert sorted(int(row["key"]) for row in removed) == gone
    assert {row["action"] for row in removed} == {"remove"}
    audience = len(rows) - 7

    # Read-only commands, side by side.
    status, history, text_history, refused, segments, preview, as_csv, adapters = run_many(
        ("sync", "status"),
        ("sync", "history", "lapsed_to_csv", "--output", "json"),
        ("sync", "history", "lapsed_to_csv", "--limit", "1"),
        ("sync", "reset", "lapsed_to_csv"),
        ("segments", "list"),
        ("segments", "preview", "lapsed_buyers", "--limit", "5", "--output", "json"),
        ("segments", "preview", "lapsed_buyers", "-n", "4", "--output", "csv"),
        ("destinations", "list"),
        cwd=tmp_path,
    )
    assert status.returncode == 0, status
    assert "lapsed_to_csv" in status.stdout and "prospects_to_jsonl" in status.stdout
    assert str(audience) in status.stdout
    assert "success" in status.stdout

    assert history.returncode == 0, history
    runs = history.json()
    assert [r["run_id"] for r in runs] == [
        removal.run()["run_id"],
        again.run("lapsed_to_csv")["run_id"],
        lapsed["run_id"],
    ]
    assert [r["sent_remove"] for r in runs] == [7, 0, 0]
    assert runs[-1]["sent_add"] == lapsed["sent"]["add"]
    assert text_history.returncode == 0, text_history
    assert removal.run()["run_id"] in text_history.stdout
    assert lapsed["run_id"] not in text_history.stdout

    assert segments.returncode == 0, segments
    assert "lapsed_buyers" in segments.stdout and "dormant_prospects" in segments.stdout
    assert preview.returncode == 0, preview
    previewed = preview.json()
    assert len(previewed) == 5
    assert {"customer_id", "email", "days_inactive"} <= set(previewed[0])
    assert as_csv.returncode == 0, as_csv
    table = list(csv.reader(io.StringIO(as_csv.stdout)))
    assert table[0][:2] == ["customer_id", "email"]
    assert len(table) == 5

    assert adapters.returncode == 0, adapters
    assert "file" in adapters.stdout and "webhook" in adapters.stdout
    assert "secret" in adapters.stdout  # the webhook's options are listed

    assert refused.returncode == 2, refused
    assert "--yes" in refused.stderr
    assert len(snapshot_members(tmp_path, "lapsed_to_csv")) == audience
    # Members and the rows kept as skipped (no usable identifier) are all forgotten.
    kept = sqlite_rows(state_db(tmp_path), "SELECT * FROM snapshot WHERE sync = 'lapsed_to_csv'")
    assert len(kept) > audience
    reset = run_cli("sync", "reset", "lapsed_to_csv", "--yes", cwd=tmp_path)
    assert reset.returncode == 0, reset
    assert f"forgot {len(kept)} snapshot rows" in reset.stdout
    assert not snapshot_members(tmp_path, "lapsed_to_csv")
    assert snapshot_members(tmp_path, "prospects_to_jsonl")  # the other sync is untouched
    resend = run_cli("sync", "run", "lapsed_to_csv", "--output", "json", cwd=tmp_path)
    assert resend.returncode == 0, resend
    assert resend.run()["sent"] == {"add": audience, "remove": 0, "update": 0}


def test_reset_forgets_a_sync_removed_from_the_config(tmp_path: Path) -> None:
    """A renamed sync's snapshot, runs and issues stay in the store; `sync reset OLD --yes`
    is how to forget them (no other command reaches a sync the config does not have)."""
    build_warehouse(tmp_path / "warehouse.duckdb", 5)
    out = {"out": {"type": "file", "path": "out/{sync}/{run_id}.csv"}}
    sync = {"segment": "lapsed", "destination": "out", "identifiers": {"email": "email"}}
    write_config(tmp_path, destinations=out, syncs={"old": sync})
    assert run_cli("sync", "run", cwd=tmp_path).returncode == 0
    write_config(tmp_path, destinations=out, syncs={"new": sync})
    unknown = run_cli("sync", "reset", "never", "--yes", cwd=tmp_path)
    assert unknown.returncode == 2 and "unknown sync `never`" in unknown.stderr, unknown
    reset = run_cli("sync", "reset", "old", "--yes", cwd=tmp_path)
    assert reset.returncode == 0, reset
    assert "old: not in the config any more; forgot its 5 snapshot rows, its runs" in reset.stdout
    for table in ("snapshot", "runs", "row_issues", "locks"):
        assert sqlite_rows(state_db(tmp_path), f"SELECT * FROM {table} WHERE sync = 'old'") == []


def test_destinations_check_shows_a_file_destination_path_pattern(tmp_path: Path) -> None:
    build_warehouse(tmp_path / "warehouse.duckdb", 5)
    identifiers = {"email": "email"}
    write_config(
        tmp_path,
        destinations={
            "export": {"type": "file", "path": "exports/{sync}/{run_id}.csv"},
            "unused": {"type": "file", "path": "audit/{run_id}.jsonl"},
        },
        syncs={
            "first": {"segment": "lapsed", "destination": "export", "identifiers": identifiers},
            "second": {"segment": "lapsed", "destination": "export", "identifiers": identifiers},
        },
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    config = str(tmp_path / "winback.toml")
    used, unused = run_many(
        ("--config", config, "destinations", "check", "export"),
        ("--config", config, "destinations", "check", "unused"),
        cwd=elsewhere,
    )
    assert used.returncode == 0, used
    assert unused.returncode == 0, unused
    assert " ".join(used.stdout.split()) == (
        f"export (file): ok — writes CSV to {tmp_path}/exports/{{sync}}/{{run_id}}.csv "
        f"({{sync}} and {{run_id}} are filled in at each run); `{tmp_path}/exports` will be "
        f"created in `{tmp_path}`, which is writable"
    )
    assert " ".join(unused.stdout.split()) == (
        f"unused (file): ok — writes JSONL to {tmp_path}/audit/{{run_id}}.jsonl ({{run_id}} is "
        f"filled in at each run); `{tmp_path}/audit` will be created in `{tmp_path}`, which is "
        "writable"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "elsewhere",
        "warehouse.duckdb",
        "winback.toml",
    ]


def test_file_destination_csv_layout_across_runs(tmp_path: Path) -> None:
    warehouse = build_warehouse(tmp_path / "warehouse.duckdb", 6)
    write_config(
        tmp_path,
        destinations={
            "sheet": {"type": "file", "path": "out/{run_id}.csv", "escape_formulas": True}
        },
        syncs={
            "s": {
                "segment": "lapsed",
                "destination": "sheet",
                "identifiers": {"email": "email", "phone": "phone"},
                "fields": {"first_name": "first_name", "tier": "tier"},
            }
        },
    )

    def run_file(result: CliResult) -> bytes:
        assert result.returncode == 0, result
        return (tmp_path / "out" / f"{result.run()['run_id']}.csv").read_bytes()

    first = run_file(run_cli("sync", "run", "--output", "json", cwd=tmp_path))
    assert first.splitlines(keepends=True)[:4] == [  # UTF-8, no BOM, LF
        b"action,key,email,phone,first_name,tier\n",
        b"add,1,user1@example.com,,Name1,t1\n",
        b"add,2,user2@example.com,,Name2,t2\n",
        b"add,3,user3@example.com,'+14155550003,Name3,t3\n",
    ]
    warehouse_sql(
        warehouse,
        "UPDATE customers SET lapsed = false WHERE customer_id = 1",
        "UPDATE customers SET first_name = '=cmd()', tier = 'a,\"b\"' WHERE customer_id = 2",
        "UPDATE customers SET phone = NULL WHERE customer_id = 3",
        "UPDATE customers SET first_name = NULL WHERE customer_id = 6",
    )
    second = run_file(run_cli("sync", "run", "--output", "json", cwd=tmp_path))
    assert second.decode() == (
        "action,key,email,phone,first_name,tier\n"
        "remove,1,user1@example.com,,,\n"  # as last sent; no fields
        'update,2,user2@example.com,,\'=cmd(),"a,""b"""\n'
        "update,3,user3@example.com,,Name3,t3\n"  # the phone is gone
        "update,6,user6@example.com,'+14155550006,,t1\n"  # the whole record, NULL empty
    )
    files = sorted((tmp_path / "out").iterdir())
    assert run_cli("sync", "run", cwd=tmp_path).returncode == 0
    assert sorted((tmp_path / "out").iterdir()) == files  # nothing to send: no file


# -- webhook syncs ------------------------------------------------------------------------------


def test_webhook_mirror_follows_the_segment(tmp_path: Path, receiver: WebhookReceiver) -> None:
    webhook_project(tmp_path, receiver.url, customers=50, destination={"batch_size": 20})
    warehouse = tmp_path / "warehouse.duckdb"

    first = run_cli("sync", "run", "--output", "json", cwd=tmp_path)
    assert first.returncode == 0, first
    run = first.run("s")
    assert run["sent"] == {"add": 50, "remove": 0, "update": 0}
    assert run["batches"] == 3
    assert emails(receiver) == segment_members(warehouse)
    assert receiver.members["3"]["identifiers"]["phone"] == "+14155550003"
    assert receiver.members["3"]["fields"] == {"FNAME": "Name3", "tier": "t3"}
    assert receiver.signature_failures == 0
    assert {d.audience for d in receiver.deliveries} == {"winback-e2e"}

    change_segment(warehouse)
    second = run_cli("sync", "run", "s", "--output", "json", cwd=tmp_path)
    assert second.returncode == 0, second
    assert second.run()["sent"] == {"add": 5, "remove": 5, "update": 3}
    assert emails(receiver) == segment_members(warehouse)
    assert receiver.members["6"]["identifiers"]["email"] == "new.user6@example.com"
    assert snapshot_members(tmp_path, "s") == set(segment_members(warehouse))

    requests = len(receiver.requests)
    third = run_cli("sync", "run", "--output", "json", cwd=tmp_path)
    assert third.returncode == 0, third
    assert third.run()["planned"] == {"add": 0, "remove": 0, "update": 0}
    assert len(receiver.requests) == requests

    # --full-resync re-sends every member (idempotent on the receiver's side).
    full = run_cli("sync", "run", "--full-resync", "--output", "json", cwd=tmp_path)
    assert full.returncode == 0, full
    assert full.run()["sent"] == {"add": 50, "remove": 0, "update": 0}
    assert len(receiver.requests) == requests + 3
    assert emails(receiver) == segment_members(warehouse)


@pytest.mark.parametrize("mode", ["add_only", "upsert"])
def test_webhook_modes(tmp_path: Path, receiver: WebhookReceiver, mode: str) -> None:
    webhook_project(tmp_path, receiver.url, customers=50, sync={"mode": mode})
    warehouse = tmp_path / "warehouse.duckdb"
    assert run_cli("sync", "run", cwd=tmp_path).returncode == 0
    original = segment_members(warehouse)
    assert emails(receiver) == original

    change_segment(warehouse)
    result = run_cli("sync", "run", "--output", "json", cwd=tmp_path)
    assert result.returncode == 0, result
    now = segment_members(warehouse)
    if mode == "add_only":
        # Nobody is removed and nobody is updated: only newcomers are sent.
        assert result.run()["sent"] == {"add": 5, "remove": 0, "update": 0}
        assert emails(receiver) == {**now, **original}
    else:
        # Members are added and updated, never removed.
        assert result.run()["sent"] == {"add": 5, "remove": 0, "update": 3}
        assert emails(receiver) == {**original, **now}
    assert set(receiver.members) == set(original) | set(now)


@pytest.mark.postgres
def test_state_store_on_postgres(
    tmp_path: Path, receiver: WebhookReceiver, postgres_url: str
) -> None:
    webhook_project(tmp_path, receiver.url, customers=50, state_url=postgres_url)
    warehouse = tmp_path / "warehouse.duckdb"
    first = run_cli("sync", "run", "--output", "json", cwd=tmp_path)
    assert first.returncode == 0, first
    assert first.run()["sent"]["add"] == 50
    change_segment(warehouse)
    second = run_cli("sync", "run", "--output", "json", cwd=tmp_path)
    assert second.returncode == 0, second
    assert second.run()["sent"] == {"add": 5, "remove": 5, "update": 3}
    assert emails(receiver) == segment_members(warehouse)
    rerun = run_cli("sync", "run", "--output", "json", cwd=tmp_path)
    assert rerun.run()["planned"] == {"add": 0, "remove": 0, "update": 0}

    engine = sa.create_engine(postgres_url)
    try:
        with engine.connect() as connection:
            keys = connection.execute(
                sa.text("SELECT key FROM snapshot WHERE sync = 's' AND status = 'member'")
            ).scalars()
            assert set(keys) == set(segment_members(warehouse))
            statuses = connection.execute(
                sa.text("SELECT status FROM runs WHERE sync = 's'")
            ).scalars()
            assert list(statuses) == ["success"] * 3
            assert connection.execute(sa.text("SELECT count(*) FROM locks")).scalar_one() == 0
    finally:
        engine.dispose()
    assert not state_db(tmp_path).exists()
    history = run_cli("sync", "history", "s", "--output", "json", cwd=tmp_path)
    assert [r["status"] for r in history.json()] == ["success"] * 3
    status = run_cli("sync", "status", cwd=tmp_path)
    assert status.returncode == 0, status
    assert " 50 " in status.stdout


# -- guards -------------------------------------------------------------------------------------


def test_empty_segment_guard_and_force(tmp_path: Path, receiver: WebhookReceiver) -> None:
    webhook_project(tmp_path, receiver.url, customers=40)
    warehouse = tmp_path / "warehouse.duckdb"
    assert run_cli("sync", "run", cwd=tmp_path).returncode == 0
    assert len(receiver.members) == 40

    # An audience under 100 members may shrink by more than half.
    warehouse_sql(warehouse, "UPDATE customers SET lapsed = false WHERE customer_id <= 25")
    shrunk = run_cli("sync", "run", "--output", "json", cwd=tmp_path)
    assert shrunk.returncode == 0, shrunk
    assert shrunk.run()["sent"]["remove"] == 25
    assert emails(receiver) == segment_members(warehouse)

    # But an empty segment never empties the audience without --force.
    warehouse_sql(warehouse, "UPDATE customers SET lapsed = false")
    requests = len(receiver.requests)

    aborted = run_cli("sync", "run", "--output", "json", cwd=tmp_path)
    assert aborted.returncode == 4, aborted
    run = aborted.run()
    assert run["status"] == "aborted"
    assert run["planned"]["remove"] == 15
    assert run["sent"] == {"add": 0, "remove": 0, "update": 0}
    assert "empty" in run["error"] and "--force" in run["error"]
    assert len(receiver.requests) == requests
    assert len(snapshot_members(tmp_path, "s")) == 15

    forced = run_cli("sync", "run", "--force", "--output", "json", cwd=tmp_path)
    assert forced.returncode == 0, forced
    assert forced.run()["sent"]["remove"] == 15
    assert receiver.members == {}
    assert snapshot_members(tmp_path, "s") == set()


def test_a_segment_of_skipped_rows_is_not_called_empty(
    tmp_path: Path, receiver: WebhookReceiver
) -> None:
    webhook_project(tmp_path, receiver.url, customers=30)
    assert run_cli("sync", "run", cwd=tmp_path).returncode == 0
    warehouse_sql(tmp_path / "warehouse.duckdb", "UPDATE customers SET email = NULL, phone = NULL")
    aborted = run_cli("sync", "run", "--output", "json", cwd=tmp_path)
    assert aborted.returncode == 4, aborted
    assert aborted.run()["error"].startswith(
        "nothing was sent: none of the segment's 30 rows can be sent (all skipped: see `winback sync issues`) but "
        "the audience has 30 members winback added"
    )


@pytest.mark.parametrize(
    ("share", "limit", "shown"),
    [
        (7508 * 100 / 15014, 50, "50.01"),
        (60.0, 50, "60.0"),
        (50.001, 50, "50.001"),
        (20.04, 20, "20.04"),
    ],
)
def test_the_removal_share_shows_it_is_over_the_limit(
    share: float, limit: float, shown: str
) -> None:
    assert percent_over(share, limit) == shown


def test_mass_removal_guard(tmp_path: Path, receiver: WebhookReceiver) -> None:
    webhook_project(tmp_path, receiver.url, customers=120, destination={"batch_size": 500})
    warehouse = tmp_path / "warehouse.duckdb"
    assert run_cli("sync", "run", cwd=tmp_path).returncode == 0
    warehouse_sql(warehouse, "UPDATE customers SET lapsed = false WHERE customer_id <= 70")
    requests = len(receiver.requests)

    plan = run_cli("sync", "plan", "--output", "json", cwd=tmp_path)  # warns, still exit 0
    assert plan.returncode == 0, plan
    assert plan.run()["status"] == "dry_run"
    assert plan.run()["error"].startswith("a real run would be aborted: 70 of 120 members")
    assert "warning: sync `s` dry_run: a real run would be aborted" in plan.stderr

    aborted = run_cli("sync", "run", "--output", "json", cwd=tmp_path)
    assert aborted.returncode == 4, aborted
    assert aborted.run()["status"] == "aborted"
    assert "70 of 120" in aborted.run()["error"]
    assert len(receiver.requests) == requests
    assert len(receiver.members) == 120

    forced = run_cli("sync", "run", "--force", "--output", "json", cwd=tmp_path)
    assert forced.returncode == 0, forced
    assert emails(receiver) == segment_members(warehouse)


def test_max_removal_pct_is_respected(tmp_path: Path, receiver: WebhookReceiver) -> None:
    webhook_project(tmp_path, receiver.url, customers=100, sync={"max_removal_pct": 20})
    warehouse = tmp_path / "warehouse.duckdb"
    assert run_cli("sync", "run", cwd=tmp_path).returncode == 0

    warehouse_sql(warehouse, "UPDATE customers SET lapsed = false WHERE customer_id <= 25")
    aborted = run_cli("sync", "run", "--output", "json", cwd=tmp_path)
    assert aborted.returncode == 4, aborted
    assert "max_removal_pct = 20" in aborted.run()["error"]
    assert len(receiver.members) == 100

    # 15% is within the limit.
    warehouse_sql(warehouse, "UPDATE customers SET lapsed = true WHERE customer_id <= 10")
    allowed = run_cli("sync", "run", "--output", "json", cwd=tmp_path)
    assert allowed.returncode == 0, allowed
    assert allowed.run()["sent"]["remove"] == 15
    assert emails(receiver) == segment_members(warehouse)


# -- partial, retries, failures -----------------------------------------------------------------


def test_rejected_rows_are_recorded_and_not_resent(
    tmp_path: Path, receiver: WebhookReceiver
) -> None:
    webhook_project(tmp_path, receiver.url, customers=30, destination={"batch_size": 10})
    warehouse = tmp_path / "warehouse.duckdb"
    receiver.reject_keys({"4", "17"})

    partial = run_cli("sync", "run", "--output", "json", cwd=tmp_path)
    assert partial.returncode == 3, partial
    run = partial.run()
    assert run["status"] == "partial"
    assert run["rejected"] == 2
    assert run["sent"]["add"] == 28
    assert set(receiver.members) == set(segment_members(warehouse)) - {"4", "17"}
    issues = sqlite_rows(
        state_db(tmp_path),
        "SELECT key, kind, action, reason FROM row_issues WHERE run_id = ? ORDER BY key",
        [run["run_id"]],
    )
    assert [(key, kind, action) for key, kind, action, _ in issues] == [
        ("17", "rejected", "add"),
        ("4", "rejected", "add"),
    ]
    assert all("rejected by the fake receiver" in reason for *_, reason in issues)
    history, text = run_many(
        ("sync", "history", "s", "--output", "json"), ("sync", "history", "s"), cwd=tmp_path
    )
    assert history.returncode == 0, history
    assert history.json()[0]["status"] == "partial"
    assert history.json()[0]["rejected"] == 2
    assert "partial" in text.stdout
    rerun_text = run_cli("sync", "run", "--full-resync", cwd=tmp_path)
    assert "why rows were not sent: winback sync issues s" in rerun_text.stdout
    shown, latest, unknown, first_only = run_many(
        ("sync", "issues", "s", "--run", run["run_id"], "-o", "json"),
        ("sync", "issues", "s", "-o", "csv"),  # the last run's
        ("sync", "issues", "s", "--run", "nope"),
        ("sync", "issues", "s", "--run", run["run_id"], "-n", "1"),
        cwd=tmp_path,
    )
    assert shown.returncode == 0, shown
    assert sorted((i["key"], i["kind"], i["action"]) for i in shown.json()) == [
        ("17", "rejected", "add"),
        ("4", "rejected", "add"),
    ]
    assert latest.stdout.splitlines()[0] == "kind,action,key,reason"
    assert {line.split(",")[2] for line in latest.stdout.splitlines()[1:]} == {"4", "17"}
    assert unknown.returncode == 2, unknown
    assert "see `winback sync history s`" in unknown.stderr
    assert "(the first 1; --limit N, or -o csv for all)" in first_only.stdout, first_only

    # The unchanged rejected rows are not sent again, even once the receiver would take them.
    receiver.reject_keys(set())
    requests = len(receiver.requests)
    rerun = run_cli("sync", "run", "--output", "json", cwd=tmp_path)
    assert rerun.returncode == 0, rerun
    assert rerun.run()["planned"] == {"add": 0, "remove": 0, "update": 0}
    assert len(receiver.requests) == requests
    nothing = run_cli("sync", "issues", "s", cwd=tmp_path)
    assert f"s: run {rerun.run()['run_id']} recorded no row issues" in nothing.stdout, nothing

    # Once a rejected row changes it is tried again.
    warehouse_sql(
        warehouse, "UPDATE customers SET email = 'fixed4@example.com' WHERE customer_id = 4"
    )
    retried = run_cli("sync", "run", "--output", "json", cwd=tmp_path)
    assert retried.returncode == 0, retried
    assert retried.run()["sent"] == {"add": 1, "remove": 0, "update": 0}
    assert receiver.members["4"]["identifiers"]["email"] == "fixed4@example.com"


def test_a_refused_update_is_not_resent_until_the_row_changes_but_a_refused_removal_is(
    tmp_path: Path, receiver: WebhookReceiver
) -> None:
    """The receiver keeps the old values of a member whose update it refuses: the next runs do
    not send that update again (nor fail as partial) until the row changes again. A refused
    removal is tried again by every run: the person must leave the audience."""
    webhook_project(tmp_path, receiver.url, customers=10)
    warehouse = tmp_path / "warehouse.duckdb"
    assert run_cli("sync", "run", cwd=tmp_path).returncode == 0
    warehouse_sql(warehouse, "UPDATE customers SET tier = 'gold' WHERE customer_id IN (2, 3)")
    receiver.reject_keys({"2"})

    refused = run_cli("sync", "run", "--output", "json", cwd=tmp_path)
    assert refused.returncode == 3, refused
    assert (refused.run()["sent"]["update"], refused.run()["rejected"]) == (1, 1)
    assert receiver.members["2"]["fields"]["tier"] == "t2"
    assert receiver.members["3"]["fields"]["tier"] == "gold"

    quiet = run_cli("sync", "run", "--output", "json", cwd=tmp_path)
    assert quiet.returncode == 0, quiet
    assert quiet.run()["planned"] == {"add": 0, "remove": 0, "update": 0}

    receiver.reject_keys(set())
    warehouse_sql(warehouse, "UPDATE customers SET tier = 'platinum' WHERE customer_id = 2")
    changed = run_cli("sync", "run", "--output", "json", cwd=tmp_path)
    assert changed.run()["sent"] == {"add": 0, "remove": 0, "update": 1}, changed
    assert receiver.members["2"]["fields"]["tier"] == "platinum"

    warehouse_sql(warehouse, "UPDATE customers SET lapsed = false WHERE customer_id = 5")
    receiver.reject_keys({"5"})
    for _ in range(2):
        kept = run_cli("sync", "run", "--output", "json", cwd=tmp_path)
        assert kept.returncode == 3, kept
        assert (kept.run()["planned"]["remove"], kept.run()["rejected"]) == (1, 1)
    receiver.reject_keys(set())
    removed = run_cli("sync", "run", "--output", "json", cwd=tmp_path)
    assert removed.run()["sent"]["remove"] == 1, removed
    assert set(receiver.members) == set(segment_members(warehouse))


def test_throttling_and_server_errors_are_retried(
    tmp_path: Path, receiver: WebhookReceiver
) -> None:
    webhook_project(tmp_path, receiver.url, customers=30, destination={"batch_size": 10})
    receiver.fail_next(429, 503, retry_after=0.05)
    result = run_cli("sync", "run", "--output", "json", cwd=tmp_path)
    assert result.returncode == 0, result
    run = result.run()
    assert run["status"] == "success"
    assert run["retries"] == 2
    assert run["sent"]["add"] == 30
    assert run["batches"] == 3
    assert len(receiver.requests) == 5
    assert emails(receiver) == segment_members(tmp_path / "warehouse.duckdb")
    history = run_cli("sync", "history", "s", "--output", "json", cwd=tmp_path)
    assert history.json()[0]["retries"] == 2


def test_exhausted_retries_fail_and_the_next_run_sends_what_is_missing(
    tmp_path: Path, receiver: WebhookReceiver
) -> None:
    webhook_project(tmp_path, receiver.url, customers=30, destination={"batch_size": 10})
    warehouse = tmp_path / "warehouse.duckdb"
    assert run_cli("sync", "run", cwd=tmp_path).returncode == 0
    change_segment(warehouse)

    receiver.fail_always(500)
    failed = run_cli("sync", "run", "--output", "json", cwd=tmp_path)
    assert failed.returncode == 1, failed
    run = failed.run()
    assert run["status"] == "failed"
    assert "500" in run["error"]
    assert run["sent"] == {"add": 0, "remove": 0, "update": 0}
    assert run["retries"] == 2  # max_attempts = 3
    assert "500" in failed.stderr  # the reason is on stderr too, not only in the JSON
    status = run_cli("sync", "status", cwd=tmp_path)
    assert "at least +5 -5 ~3" in status.stdout, status  # what the failed run had planned

    receiver.fail_always(None)
    before = len(receiver.deliveries)
    healed = run_cli("sync", "run", "--output", "json", cwd=tmp_path)
    assert healed.returncode == 0, healed
    assert healed.run()["sent"] == {"add": 5, "remove": 5, "update": 3}
    sent = receiver.deliveries[before:]
    assert sorted(k for d in sent if d.action == "remove" for k in d.keys) == list("12345")
    assert sorted(k for d in sent if d.action == "update" for k in d.keys) == ["6", "7", "8"]
    added = sorted(k for d in sent if d.action == "add" for k in d.keys)
    assert added == ["51", "52", "53", "54", "55"]
    assert emails(receiver) == segment_members(warehouse)


def test_unauthorised_fails_at_once(tmp_path: Path, receiver: WebhookReceiver) -> None:
    webhook_project(tmp_path, receiver.url, customers=30, destination={"batch_size": 10})
    receiver.fail_always(401)
    result = run_cli("sync", "run", "--output", "json", cwd=tmp_path)
    assert result.returncode == 1, result
    run = result.run()
    assert run["status"] == "failed"
    assert "401" in run["error"]
    assert "credentials" in run["error"]
    assert run["retries"] == 0
    assert len(receiver.requests) == 1
    assert snapshot_members(tmp_path, "s") == set()


@pytest.mark.parametrize("status", [302, 307, 308])
def test_a_redirecting_receiver_fails_the_run_and_nothing_is_lost(
    tmp_path: Path, receiver: WebhookReceiver, status: int
) -> None:
    webhook_project(tmp_path, receiver.url, customers=30, destination={"batch_size": 10})
    warehouse = tmp_path / "warehouse.duckdb"
    assert run_cli("sync", "run", cwd=tmp_path).returncode == 0
    change_segment(warehouse)
    before = snapshot_members(tmp_path, "s")
    requests_before = len(receiver.requests)

    # `moved` answers 200 to anything: a followed 302 (a GET) or 307 (the signed POST again)
    # would have counted as delivered.
    with FakeHttpServer() as moved:
        redirect = ScriptedResponse(status, "", {"Location": f"{moved.url}/new?token=t0k3n"})
        handler, receiver.server.handler = receiver.server.handler, lambda request: redirect
        try:
            failed = run_cli("sync", "run", "--output", "json", cwd=tmp_path)
            check = run_cli("destinations", "check", "hook", cwd=tmp_path)
        finally:
            receiver.server.handler = handler
    assert not moved.requests
    assert failed.returncode == 1, failed
    run = failed.run()
    assert run["status"] == "failed"
    assert run["sent"] == {"add": 0, "remove": 0, "update": 0} and run["retries"] == 0
    assert f"answered {status}, a redirect to `{moved.url}/new`" in run["error"]
    assert "configure the final URL" in run["error"] and "t0k3n" not in failed.stderr
    assert snapshot_members(tmp_path, "s") == before
    assert len(receiver.requests) > requests_before
    assert check.returncode == 1, check
    assert f"HEAD /hook answered {status}" in check.stderr

    # Nothing was lost: once the URL answers again, the next run brings the receiver in line.
    healed = run_cli("sync", "run", "--output", "json", cwd=tmp_path)
    assert healed.returncode == 0, healed
    assert emails(receiver) == segment_members(warehouse)


def test_payload_too_large_splits_batches(tmp_path: Path, receiver: WebhookReceiver) -> None:
    webhook_project(tmp_path, receiver.url, customers=50, destination={"batch_size": 50})
    receiver.max_records = 7
    result = run_cli("sync", "run", "--output", "json", cwd=tmp_path)
    assert result.returncode == 0, result
    run = result.run()
    assert run["sent"]["add"] == 50
    assert run["rejected"] == 0
    assert all(len(d.keys) <= 7 for d in receiver.deliveries)
    assert sum(len(d.keys) for d in receiver.deliveries) == 50
    assert emails(receiver) == segment_members(tmp_path / "warehouse.duckdb")


def test_exit_code_combines_several_syncs(tmp_path: Path) -> None:
    build_warehouse(tmp_path / "warehouse.duckdb", 20)
    with (
        WebhookReceiver(secret=SECRET) as healthy,
        WebhookReceiver(secret=SECRET) as picky,
        WebhookReceiver(secret=SECRET) as other,
    ):
        picky.reject_keys({"12"})
        write_config(
            tmp_path,
            segments={
                "lapsed": {"key": "customer_id", "sql": "SELECT * FROM customers WHERE lapsed"},
                "few": {
                    "key": "customer_id",
                    "sql": "SELECT * FROM customers WHERE lapsed AND customer_id <= 5",
                },
            },
            destinations={
                "healthy": webhook_destination(healthy.url),
                "picky": webhook_destination(picky.url),
                "other": webhook_destination(other.url),
                "down": webhook_destination(f"http://127.0.0.1:{closed_port()}/hook"),
            },
            syncs={
                "ok": webhook_sync(destination="healthy"),
                "partial": webhook_sync(destination="picky"),
                "aborted": webhook_sync(segment="few", destination="other"),
                "locked": webhook_sync(destination="healthy"),
                "failed": webhook_sync(destination="down"),
            },
        )
        assert run_cli("sync", "run", "aborted", cwd=tmp_path).returncode == 0
        warehouse_sql(tmp_path / "warehouse.duckdb", "DELETE FROM customers WHERE customer_id <= 5")
        # A live run of `locked` on another machine.
        now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
        engine = sa.create_engine(f"sqlite:///{state_db(tmp_path)}")
        with engine.begin() as connection:
            connection.execute(
                sa.text(
                    "INSERT INTO locks (sync, run_id, host, pid, acquired_at, heartbeat_at) "
                    "VALUES ('locked', 'elsewhere-1', 'another-host', 1, :now, :now)"
                ),
                {"now": now},
            )
        engine.dispose()

        cases = [
            (["ok"], 0),
            (["ok", "partial"], 3),
            (["partial", "locked", "ok"], 5),
            (["locked", "aborted", "partial"], 4),
            (["aborted", "failed", "locked", "partial", "ok"], 1),
        ]
        expected_status = {
            "ok": "success",
            "partial": "partial",
            "locked": "locked",
            "aborted": "aborted",
            "failed": "failed",
        }
        for names, code in cases:
            # --full-resync re-sends the rejected row, so `partial` stays partial every time.
            result = run_cli(
                "sync", "run", *names, "--full-resync", "--output", "json", cwd=tmp_path
            )
            assert result.returncode == code, result
            assert result.json()["exit_code"] == code
            assert [r["sync"] for r in result.json()["runs"]] == names
            for name in names:
                assert result.run(name)["status"] == expected_status[name], result
        text = run_cli("sync", "run", "locked", cwd=tmp_path)
        assert text.returncode == 5, text
        assert "another-host" in text.stderr


def test_a_sync_pointed_at_another_audience_must_start_over(
    tmp_path: Path, receiver: WebhookReceiver
) -> None:
    """Changing a sync's audience (or destination type) would send the new audience only the
    changes: the run refuses, names the sync and says how to start over; after `sync reset`
    the new audience gets everyone."""
    webhook_project(tmp_path, receiver.url, customers=5)
    assert run_cli("sync", "run", cwd=tmp_path).returncode == 0
    write_config(
        tmp_path,
        destinations={"hook": webhook_destination(receiver.url)},
        syncs={"s": webhook_sync(audience="spring-relaunch")},
    )
    requests = len(receiver.requests)
    for command in (("sync", "run"), ("sync", "plan")):
        refused = run_cli(*command, "--output", "json", cwd=tmp_path)
        assert refused.returncode == 2, refused  # a configuration problem, found at run time
        assert refused.json()["exit_code"] == 2 and refused.run()["status"] == "failed"
        error = refused.run()["error"]
        assert (
            f"invalid configuration in {tmp_path / 'winback.toml'}: syncs.s: it sent its members to webhook audience 'winback-e2e'"
            in error
        )
        assert "now points to webhook audience 'spring-relaunch'" in error
        assert "winback sync reset s --yes" in error
    assert len(receiver.requests) == requests
    assert run_cli("sync", "reset", "s", "--yes", cwd=tmp_path).returncode == 0
    assert "full sync" in run_cli("sync", "status", cwd=tmp_path).stdout
    restarted = run_cli("sync", "run", "--output", "json", cwd=tmp_path)
    assert restarted.returncode == 0, restarted
    assert restarted.run()["sent"]["add"] == 5
    assert {d.audience for d in receiver.deliveries[requests:]} == {"spring-relaunch"}
