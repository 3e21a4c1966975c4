"""Shared helpers for the end-to-end tests: a small DuckDB warehouse, configs, the CLI as a process.

Everything here drives real components: DuckDB files, the `winback` CLI started with
``python -m connector`` and the fake webhook receiver (in-process, or as its own process with a
log of every change it applied, for the crash tests).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import pytest
import sqlalchemy as sa

from connector.config import build_config
from connector.sync import SyncRunner
from destinations.registry import Registry
from tests.fakes.memory_destination import MemoryDestination

REPO_ROOT = Path(__file__).resolve().parent.parent
SECRET = (
    "whsec_dGVzdC1zZWNyZXQtZm9yLXdpbmJhY2stZTJl"  # whsec_ + base64("test-secret-for-winback-e2e")
)
SECRET_ENV = "WINBACK_E2E_WEBHOOK_SECRET"
FAST_RETRY = {"max_attempts": 3, "initial_backoff_s": 0.01, "max_backoff_s": 0.2, "timeout_s": 5}
SEGMENT_SQL = (
    "SELECT customer_id, email, phone, first_name, country, tier FROM customers WHERE lapsed "
    "ORDER BY customer_id"
)


# -- warehouse ----------------------------------------------------------------------------------


PEOPLE_IDENTIFIERS = {"email": "email", "phone": "phone", "country": "country"}
PEOPLE_TWO_SKIPPED = [
    ("1", "one@example.com", None, None),
    ("2", "bad@", None, None),  # invalid email, no phone: skipped on every run
    ("3", None, None, "FR"),  # no identifier at all: skipped on every run
]
"""`people` rows (`write_people`) of which every run sends one and skips two."""


def dead_pid() -> int:
    """The pid of a process that has just ended (no process has it now)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def write_people_at(url: str, rows: Iterable[tuple[Any, ...]]) -> str:
    """`write_people` into the database at `url` (PostgreSQL): the `people` table replaced by
    one holding `rows`; returns `url`."""
    columns = ("id", "email", "phone", "country")
    engine = sa.create_engine(url)
    try:
        with engine.begin() as connection:
            connection.execute(sa.text("DROP TABLE IF EXISTS people"))
            connection.execute(
                sa.text("CREATE TABLE people (id TEXT, email TEXT, phone TEXT, country TEXT)")
            )
            connection.execute(
                sa.text("INSERT INTO people VALUES (:id, :email, :phone, :country)"),
                [dict(zip(columns, row, strict=True)) for row in rows],
            )
    finally:
        engine.dispose()
    return url


def write_people(folder: Path, kind: str, rows: Iterable[tuple[Any, ...]]) -> str:
    """A warehouse with one table `people (id, email, phone, country)`; returns its URL.

    `kind` is "duckdb" (the in-warehouse diff) or "sqlite" (the state-database diff)."""
    create = "CREATE TABLE people (id TEXT, email TEXT, phone TEXT, country TEXT)"
    if kind == "duckdb":
        path = folder / "warehouse.duckdb"
        with duckdb.connect(str(path)) as db:
            db.execute("DROP TABLE IF EXISTS people")
            db.execute(create)
            db.executemany("INSERT INTO people VALUES (?, ?, ?, ?)", list(rows))
        return f"duckdb:///{path}"
    path = folder / "warehouse.db"
    with sqlite3.connect(path) as db:
        db.execute("DROP TABLE IF EXISTS people")
        db.execute(create)
        db.executemany("INSERT INTO people VALUES (?, ?, ?, ?)", rows)
    return f"sqlite:///{path}"


def memory_runner(
    folder: Path,
    warehouse_url: str,
    *,
    state_url: str | None = None,
    state: Mapping[str, Any] | None = None,
    identifiers: Mapping[str, str] = PEOPLE_IDENTIFIERS,
    warehouse: Mapping[str, Any] | None = None,
    adapter: type[MemoryDestination] = MemoryDestination,
    **sync: Any,
) -> SyncRunner:
    """A SyncRunner of one sync `s`: segment `SELECT * FROM people` (key `id`) to audience `A`
    of the in-memory destination; state in `folder`/state.db unless `state_url` is given;
    `state` and `warehouse` add options of `[state]` and `[warehouse]`."""
    document: dict[str, Any] = {
        "warehouse": {"url": warehouse_url, **(warehouse or {})},
        "state": {"url": state_url or f"sqlite:///{folder / 'state.db'}", **(state or {})},
        "segments": {"people": {"key": "id", "sql": "SELECT * FROM people"}},
        "destinations": {"mem": {"type": "memory"}},
        "syncs": {
            "s": {
                "segment": "people",
                "destination": "mem",
                "audience": "A",
                "identifiers": dict(identifiers),
                **sync,
            }
        },
    }
    registry = Registry(adapters={"memory": adapter})
    return SyncRunner(build_config(document, path=folder / "winback.toml", registry=registry))


def build_warehouse(path: Path, customers: int, *, start: int = 1) -> Path:
    """A DuckDB file with a `customers` table of `customers` lapsed people, ids start..."""
    if path.exists():
        path.unlink()
    connection = duckdb.connect(str(path))
    try:
        connection.execute(
            "CREATE TABLE customers (customer_id INTEGER, email VARCHAR, phone VARCHAR, "
            "first_name VARCHAR, country VARCHAR, tier VARCHAR, lapsed BOOLEAN)"
        )
        connection.execute(
            """
            INSERT INTO customers
            SELECT i, 'user' || i || '@example.com',
                   CASE WHEN i % 3 = 0 THEN '+1415555' || lpad(CAST(i % 10000 AS VARCHAR), 4, '0')
                   END,
                   'Name' || i, ['US', 'GB', 'FR', 'DE'][i % 4 + 1], 't' || (i % 5), true
            FROM range(?, ?) AS r(i)
            """,
            [start, start + customers],
        )
    finally:
        connection.close()
    return path


def warehouse_sql(path: Path, *statements: str, params: Iterable[Any] | None = None) -> None:
    """Change the warehouse (the CLI opens it read-only, so only while no run is active)."""
    connection = duckdb.connect(str(path))
    try:
        for statement in statements:
            connection.execute(statement, list(params) if params is not None else None)
    finally:
        connection.close()


def segment_members(path: Path, sql: str = SEGMENT_SQL) -> dict[str, str]:
    """The segment as the sync should see it: key -> normalised email."""
    connection = duckdb.connect(str(path), read_only=True)
    try:
        rows = connection.execute(f"SELECT customer_id, email FROM ({sql})").fetchall()
    finally:
        connection.close()
    return {str(key): (email or "").strip().lower() for key, email in rows}


# -- config -------------------------------------------------------------------------------------


def toml_value(value: Any) -> str:
    """A Python value as a TOML value (strings, numbers, booleans, inline tables, arrays)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def toml_table(header: str, values: Mapping[str, Any]) -> str:
    lines = [f"[{header}]"]
    lines += [f"{key} = {toml_value(value)}" for key, value in values.items()]
    return "\n".join(lines) + "\n"


def webhook_destination(url: str, **options: Any) -> dict[str, Any]:
    """A webhook destination table whose secret comes from the environment."""
    return {"type": "webhook", "url": url, "secret": f"${{{SECRET_ENV}}}", **options}


def webhook_sync(
    *, segment: str = "lapsed", destination: str = "hook", **options: Any
) -> dict[str, Any]:
    sync: dict[str, Any] = {
        "segment": segment,
        "destination": destination,
        "audience": "winback-e2e",
        "identifiers": {"email": "email", "phone": "phone", "country": "country"},
        "fields": {"FNAME": "first_name", "tier": "tier"},
    }
    sync.update(options)
    return sync


def write_config(
    folder: Path,
    *,
    destinations: Mapping[str, Mapping[str, Any]],
    syncs: Mapping[str, Mapping[str, Any]],
    segments: Mapping[str, Mapping[str, Any]] | None = None,
    warehouse_url: str = "duckdb:///warehouse.duckdb",
    state_url: str | None = None,
    retry: Mapping[str, Any] | None = None,
    name: str = "winback.toml",
) -> Path:
    """Write a config: one `lapsed` SQL segment by default, fast retries."""
    if segments is None:
        segments = {"lapsed": {"key": "customer_id", "sql": SEGMENT_SQL}}
    parts = [toml_table("warehouse", {"url": warehouse_url})]
    if state_url is not None:
        parts.append(toml_table("state", {"url": state_url}))
    parts.append(toml_table("retry", dict(retry or FAST_RETRY)))
    for section, tables in (
        ("segments", segments),
        ("destinations", destinations),
        ("syncs", syncs),
    ):
        for table_name, table in tables.items():
            parts.append(toml_table(f"{section}.{table_name}", table))
    path = folder / name
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def webhook_project(
    folder: Path,
    url: str,
    *,
    customers: int = 50,
    destination: Mapping[str, Any] | None = None,
    sync: Mapping[str, Any] | None = None,
    state_url: str | None = None,
) -> Path:
    """A warehouse of `customers` people and a config with one sync `s` to the webhook at `url`."""
    build_warehouse(folder / "warehouse.duckdb", customers)
    return write_config(
        folder,
        destinations={"hook": webhook_destination(url, **(destination or {}))},
        syncs={"s": webhook_sync(**(sync or {}))},
        state_url=state_url,
    )


# -- the CLI as a process -----------------------------------------------------------------------


@dataclass
class CliResult:
    args: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)

    def run(self, sync: str | None = None) -> dict[str, Any]:
        """The run record of `sync` (or the only run) from `--output json`."""
        runs: list[dict[str, Any]] = self.json()["runs"]
        if sync is None:
            assert len(runs) == 1, runs
            return runs[0]
        return next(r for r in runs if r["sync"] == sync)

    def __str__(self) -> str:
        return (
            f"winback {' '.join(self.args)} -> {self.returncode}\n"
            f"--- stdout\n{self.stdout}\n--- stderr\n{self.stderr}"
        )


def cli_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a CLI process: the webhook secret set, no proxies, no user config."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k.lower() not in ("http_proxy", "https_proxy", "all_proxy", "winback_config")
    }
    env.update({SECRET_ENV: SECRET, "NO_PROXY": "127.0.0.1,localhost", "PYTHONUNBUFFERED": "1"})
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.update(extra or {})
    return env


def cli_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "connector", *args]


def run_cli(
    *args: str,
    cwd: Path,
    env: Mapping[str, str] | None = None,
    timeout: float = 60,
) -> CliResult:
    """Run `winback ARGS` in `cwd` and wait for it."""
    completed = subprocess.run(
        cli_command(*args),
        cwd=cwd,
        env=cli_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return CliResult(tuple(args), completed.returncode, completed.stdout, completed.stderr)


def run_many(
    *commands: tuple[str, ...], cwd: Path, env: Mapping[str, str] | None = None
) -> list[CliResult]:
    """Run independent read-only commands side by side (each CLI start costs most of a second)."""
    processes = [start_cli(*args, cwd=cwd, env=env) for args in commands]
    return [finish(process, args) for process, args in zip(processes, commands, strict=True)]


def start_cli(*args: str, cwd: Path, env: Mapping[str, str] | None = None) -> subprocess.Popen[str]:
    """Start `winback ARGS` without waiting (for kills and concurrent runs)."""
    return subprocess.Popen(
        cli_command(*args),
        cwd=cwd,
        env=cli_env(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(
    process: subprocess.Popen[str], args: Iterable[str] = (), timeout: float = 60
) -> CliResult:
    stdout, stderr = process.communicate(timeout=timeout)
    return CliResult(tuple(args), process.returncode, stdout, stderr)


def wait_until(condition: Callable[[], bool], *, timeout: float = 30, every: float = 0.01) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(every)


# -- the state store ----------------------------------------------------------------------------


def prepared_database(
    request: pytest.FixtureRequest, folder: Path, filename: str, statements: Iterable[str]
) -> str:
    """The URL of a database after `statements`: a SQLite file in `folder`, or the test's own
    PostgreSQL database when the fixture's param is "postgresql"."""
    if request.param == "postgresql":
        url = str(request.getfixturevalue("postgres_url"))
    else:
        url = f"sqlite:///{folder / filename}"
    engine = sa.create_engine(url)
    with engine.begin() as connection:
        for statement in statements:
            connection.exec_driver_sql(statement)
    engine.dispose()
    return url


def state_db(folder: Path) -> Path:
    """The default SQLite state store of a project folder."""
    return folder / ".winback" / "state.db"


def sqlite_rows(path: Path, sql: str, params: Iterable[Any] = ()) -> list[tuple[Any, ...]]:
    if not path.exists():
        return []
    connection = sqlite3.connect(path, timeout=30)
    try:
        return connection.execute(sql, tuple(params)).fetchall()
    except sqlite3.OperationalError as error:
        if "no such table" in str(error):
            return []
        raise
    finally:
        connection.close()


def snapshot_members(folder: Path, sync: str) -> set[str]:
    rows = sqlite_rows(
        state_db(folder),
        "SELECT key FROM snapshot WHERE sync = ? AND status = 'member'",
        [sync],
    )
    return {key for (key,) in rows}


def database_dump(path: Path) -> bytes:
    """Everything a SQLite database holds, as text (to prove a command changed nothing)."""
    if not path.exists():
        return b""
    connection = sqlite3.connect(path)
    try:
        return "\n".join(connection.iterdump()).encode()
    finally:
        connection.close()


# -- receiver as a separate process -------------------------------------------------------------


class LoggedReceiverProcess:
    """The fake webhook receiver in its own process, logging every change it applies.

    Each applied request (a `webhook-id` seen for the first time) appends one JSON line
    ``{"action", "keys"}`` to ``log_file``; the state file holds the number of POST requests
    received (for tests that act after N requests) and ``GET /state`` answers the membership.
    """

    def __init__(self, folder: Path, *, delay_s: float = 0.0, secret: str = SECRET):
        self.state_file = folder / "receiver-state.json"
        self.log_file = folder / "receiver-log.jsonl"
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.helpers",
                "--secret",
                secret,
                "--state-file",
                str(self.state_file),
                "--log-file",
                str(self.log_file),
                "--delay-s",
                str(delay_s),
            ],
            cwd=REPO_ROOT,
            env=cli_env(),
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        self.url = self.process.stdout.readline().strip()
        if not self.url.startswith("http://"):
            self.close()
            raise RuntimeError(f"the receiver did not start: {self.url!r}")

    def requests(self) -> int:
        """POST requests received so far (failed ones included)."""
        with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
            return int(json.loads(self.state_file.read_text())["requests"])
        return 0

    def members(self) -> dict[str, Any]:
        """The receiver's audience now: key -> {"identifiers", "fields"}."""
        state_url = self.url.rsplit("/", 1)[0] + "/state"
        with urllib.request.urlopen(state_url, timeout=30) as response:
            members: dict[str, Any] = json.loads(response.read())["members"]
        return members

    def log(self) -> list[dict[str, Any]]:
        if not self.log_file.exists():
            return []
        return [json.loads(line) for line in self.log_file.read_text().splitlines() if line]

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()

    def __enter__(self) -> LoggedReceiverProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def receiver_main(argv: list[str] | None = None) -> int:
    """`python -m tests.helpers`: the fake receiver with a log of applied changes."""
    import argparse
    import threading

    from destinations.testing.http_server import RecordedRequest, ScriptedResponse
    from tests.fakes.webhook_receiver import WebhookReceiver

    parser = argparse.ArgumentParser()
    parser.add_argument("--secret", required=True)
    parser.add_argument("--state-file", required=True, type=Path)
    parser.add_argument("--log-file", required=True, type=Path)
    parser.add_argument("--delay-s", type=float, default=0.0)
    args = parser.parse_args(argv)
    log_handle = args.log_file.open("a", encoding="utf-8")

    class LoggingReceiver(WebhookReceiver):
        def _apply(self, action: str, records: list[dict[str, Any]]) -> dict[str, Any]:
            answer = super()._apply(action, records)
            entry = {"action": action, "keys": [r["key"] for r in records]}
            log_handle.write(json.dumps(entry) + "\n")
            log_handle.flush()
            return answer

        def _process(self, request: RecordedRequest) -> ScriptedResponse:
            if request.method == "GET" and request.path == "/state":
                # A copy taken under the receiver's lock: the answer is encoded after it.
                members = {key: dict(record) for key, record in self._members.items()}
                return ScriptedResponse(200, {"members": members})
            return super()._process(request)

        def _save(self) -> None:
            # Only the request count: the membership (20,000 members in the crash tests) is
            # served by `GET /state` instead of being rewritten to disk after every request.
            assert self.state_file is not None
            posts = sum(1 for r in self.requests if r.method == "POST")
            temporary = self.state_file.with_name(self.state_file.name + ".tmp")
            temporary.write_text(json.dumps({"requests": posts}))
            os.replace(temporary, self.state_file)

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    receiver = LoggingReceiver(secret=args.secret, delay_s=args.delay_s, state_file=args.state_file)
    with receiver:
        print(receiver.url, flush=True)
        stop.wait()
    log_handle.close()
    return 0


@contextlib.contextmanager
def killed_on_exit(process: subprocess.Popen[str]) -> Iterator[subprocess.Popen[str]]:
    """Make sure a started CLI process does not outlive the test."""
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate()


if __name__ == "__main__":
    sys.exit(receiver_main())
