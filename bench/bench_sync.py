"""Benchmark: end-to-end `winback sync run` of a big segment to a local webhook sink.

    python bench/bench_sync.py --customers 1000000
    python bench/bench_sync.py --customers 200000 1000000          # is memory flat?
    python bench/bench_sync.py --customers 1000000 --profile cprofile

For each size it builds (once, cached in ``--workdir``) a deterministic DuckDB warehouse of N
customers with DuckDB SQL: ``customers_day1`` and ``customers_day2`` ("the next day": ~1% of the
segment joins, ~1% leaves, ~0.5% changes email). The segment (``WHERE lapsed``) is ~50% of the
customers, with email, phone, country and first_name in realistic shapes (mixed case, spaces,
national phone formats, country names).

A minimal webhook sink runs in its own process (plain HTTP/1.1, keep-alive, answers 200 at once)
and counts requests and records; it also measures its own busy time (the union of the intervals
where it handles at least one request), so "winback time beyond the sink" can be reported.

winback runs through its CLI as a subprocess (``python -m connector sync run --output json``),
three times per size against a fresh state store:

1. full sync (empty snapshot: every segment row is an add);
2. unchanged rerun (must send 0 requests);
3. next day: the segment reads ``customers_day2`` (config ``${WINBACK_BENCH_DAY}``).

With ``--plan``, ``sync plan`` runs first, against the empty state store (what a user runs before
a first sync).

For each run: wall time (interpreter start included), rows/s, peak RSS of the winback process
(``os.wait4`` rusage of that very child, or the sampled sum over it and its normalising worker
when that is higher), requests and records received by the sink. Targets (from
the issue, 2-core machine): full sync <= 5 s beyond the sink, unchanged rerun 0 requests,
incremental <= 1.5 s, peak RSS <= 300 MB and flat across sizes.

``--profile cprofile|pyinstrument`` runs winback under a profiler and writes the profiles to the
work dir (the timings then include the profiler's overhead).
"""

from __future__ import annotations

import argparse
import compileall
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
GENERATOR_VERSION = 1
"""Bump when the generated data changes, so cached warehouses are rebuilt."""

TARGETS = {"full_beyond_sink_s": 5.0, "incremental_s": 1.5, "peak_rss_mb": 300.0}

# ------------------------------------------------------------------------------------ warehouse

FIRST_NAMES = [
    "Anna", "Ben", "Chloé", "David", "Emma", "François", "Greta", "Hugo", "Inès", "Jonas",
    "Karin", "Liam", "Marta", "Noah", "Olga", "Pedro", "Quinn", "Rosa", "Sven", "Zoë",
]  # fmt: skip
LAST_NAMES = [
    "smith", "muller", "dupont", "rossi", "garcia", "jones", "schmidt", "martin", "bernard",
    "brown", "weber", "moreau", "taylor", "wagner", "lefebvre", "wilson",
]  # fmt: skip
DOMAINS = [
    "gmail.com", "yahoo.com", "outlook.com", "hotmail.co.uk", "web.de", "orange.fr",
    "icloud.com", "example.org", "mail.example.com", "gmx.net",
]  # fmt: skip


def _sql_list(values: list[str]) -> str:
    return "[" + ", ".join("'" + v.replace("'", "''") + "'" for v in values) + "]"


def day1_sql(customers: int) -> str:
    """Day one: N customers, `lapsed` for ~50%; values derived from multiplicative hashes."""
    return f"""
    CREATE TABLE customers_day1 AS
    WITH base AS (
        SELECT i AS customer_id,
               (i * 2654435761) % 4294967296 AS h,
               (i * 40503 + 12345) % 1000003 AS g
        FROM range(1, {customers + 1}) AS t(i)
    ), picked AS (
        SELECT customer_id, h, g,
               {_sql_list(FIRST_NAMES)}[1 + g % {len(FIRST_NAMES)}] AS fname,
               {_sql_list(LAST_NAMES)}[1 + (g // 20) % {len(LAST_NAMES)}] AS lname,
               {_sql_list(DOMAINS)}[1 + (h // 7) % {len(DOMAINS)}] AS domain,
               (h // 65536) % 10 AS region
        FROM base
    )
    SELECT
        customer_id,
        h % 100 < 50 AS lapsed,
        CASE
            WHEN (h // 256) % 50 = 0 THEN NULL
            WHEN (h // 256) % 10 = 1
                THEN '  ' || fname || '.' || upper(lname) || customer_id || '@' || upper(domain)
            ELSE lower(fname) || '.' || lname || customer_id || '@' || domain
        END AS email,
        CASE
            WHEN (h // 4096) % 5 = 0 THEN NULL
            WHEN region < 3 THEN '+1 212-' || (200 + g % 800) || '-'
                || lpad((customer_id % 10000)::VARCHAR, 4, '0')
            WHEN region < 5 THEN '(415) ' || (200 + g % 800) || '-'
                || lpad((customer_id % 10000)::VARCHAR, 4, '0')
            WHEN region < 7 THEN '020 7946 0' || lpad((g % 1000)::VARCHAR, 3, '0')
            WHEN region = 7 THEN '06 ' || lpad((customer_id % 100000000)::VARCHAR, 8, '0')
            ELSE '+49 30 ' || (10000000 + customer_id % 90000000)
        END AS phone,
        CASE
            WHEN region < 5 THEN ['US', 'United States', 'us', 'USA'][1 + g % 4]
            WHEN region < 7 THEN ['GB', 'United Kingdom', 'UK'][1 + g % 3]
            WHEN region = 7 THEN ['FR', 'France'][1 + g % 2]
            ELSE ['DE', 'Germany', 'deu'][1 + g % 3]
        END AS country,
        CASE WHEN g % 97 = 0 THEN NULL ELSE fname END AS first_name
    FROM picked
    """


DAY2_SQL = """
CREATE TABLE customers_day2 AS
WITH r AS (SELECT *, (customer_id * 2246822519) % 4294967291 % 1000 AS r FROM customers_day1)
SELECT
    customer_id,
    CASE
        WHEN NOT lapsed AND r % 100 = 0 THEN TRUE      -- joins: ~1% of the segment
        WHEN lapsed AND r % 100 = 1 THEN FALSE         -- leaves: ~1% of the segment
        ELSE lapsed
    END AS lapsed,
    CASE WHEN lapsed AND r % 200 = 2                   -- new email: ~0.5% of the segment
        THEN 'moved' || customer_id || '@example.net' ELSE email END AS email,
    phone,
    country,
    first_name
FROM r
"""

SEGMENT_SQL = (
    "SELECT customer_id, email, phone, country, first_name "
    "FROM customers_day${WINBACK_BENCH_DAY:-1} WHERE lapsed"
)


def in_own_process(function: Callable[..., Any], *args: Any) -> Any:
    """Run a preparation step (building or copying a warehouse) in a process of its own: a
    winback run forked from a bench process that grew during it would report that process's
    size as its own peak (`ru_maxrss` counts the pages a forked child shares)."""
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=spawn) as pool:
        return pool.submit(function, *args).result()


def build_warehouse(workdir: Path, customers: int) -> Path:
    """The cached warehouse for this size, built with DuckDB SQL when missing."""
    import duckdb

    path = workdir / f"warehouse-{customers}-v{GENERATOR_VERSION}.duckdb"
    if path.exists():
        return path
    started = time.perf_counter()
    partial = path.with_suffix(".partial")
    partial.unlink(missing_ok=True)
    with duckdb.connect(str(partial)) as db:
        db.execute(day1_sql(customers))
        db.execute(DAY2_SQL)
        counts = db.execute(
            "SELECT (SELECT count(*) FILTER (WHERE lapsed) FROM customers_day1), "
            "(SELECT count(*) FILTER (WHERE lapsed) FROM customers_day2)"
        ).fetchone()
    partial.rename(path)
    print(
        f"built {path.name} in {time.perf_counter() - started:.1f}s: segment day 1 = "
        f"{counts[0]:,} rows, day 2 = {counts[1]:,} rows",
        file=sys.stderr,
    )
    return path


def sqlite_copy(duckdb_path: Path) -> Path:
    """The same two tables in a SQLite file (cached next to the DuckDB one): a warehouse that
    cannot compare in itself, as PostgreSQL and the others."""
    import sqlite3

    import duckdb

    path = duckdb_path.with_suffix(".sqlite")
    if path.exists():
        return path
    started = time.perf_counter()
    partial = path.with_suffix(".partial")
    partial.unlink(missing_ok=True)
    columns = "customer_id INTEGER, lapsed INTEGER, email TEXT, phone TEXT, country TEXT, "
    columns += "first_name TEXT"
    with duckdb.connect(str(duckdb_path), read_only=True) as source:
        target = sqlite3.connect(partial)
        for table in ("customers_day1", "customers_day2"):
            target.execute(f"CREATE TABLE {table} ({columns})")
            cursor = source.execute(
                f"SELECT customer_id, lapsed::INTEGER, email, phone, country, first_name "
                f"FROM {table} ORDER BY customer_id"
            )
            while rows := cursor.fetchmany(100_000):
                target.executemany(f"INSERT INTO {table} VALUES (?, ?, ?, ?, ?, ?)", rows)
        target.commit()
        target.close()
    partial.rename(path)
    print(f"copied to {path.name} in {time.perf_counter() - started:.1f}s", file=sys.stderr)
    return path


def postgres_copy(duckdb_path: Path, customers: int, url: str) -> str:
    """The same two tables in a schema `winback_bench_N` of the PostgreSQL database at `url`
    (copied once, kept); returns the warehouse URL whose search_path is that schema."""
    import duckdb
    import psycopg
    import sqlalchemy as sa

    schema = f"winback_bench_{customers}"
    target = sa.make_url(url)
    conninfo = target.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(conninfo) as connection:
        copied = connection.execute(
            "SELECT 1 FROM information_schema.tables WHERE table_schema = %s "
            "AND table_name = 'copy_complete'",
            (schema,),
        ).fetchone()
        if copied is None:
            started = time.perf_counter()
            connection.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
            connection.execute(f"CREATE SCHEMA {schema}")
            columns = "customer_id BIGINT, lapsed BOOLEAN, email TEXT, phone TEXT, country TEXT, "
            columns += "first_name TEXT"
            with duckdb.connect(str(duckdb_path), read_only=True) as source:
                for table in ("customers_day1", "customers_day2"):
                    connection.execute(f"CREATE TABLE {schema}.{table} ({columns})")
                    cursor = source.execute(
                        f"SELECT customer_id, lapsed, email, phone, country, first_name "
                        f"FROM {table} ORDER BY customer_id"
                    )
                    with connection.cursor().copy(f"COPY {schema}.{table} FROM STDIN") as copy:
                        while rows := cursor.fetchmany(100_000):
                            for row in rows:
                                copy.write_row(row)
                    connection.execute(f"ANALYZE {schema}.{table}")
            connection.execute(f"CREATE TABLE {schema}.copy_complete ()")
            connection.commit()
            print(
                f"copied to PostgreSQL schema {schema} in {time.perf_counter() - started:.1f}s",
                file=sys.stderr,
            )
    options = target.query.get("options", "")
    return target.update_query_dict(
        {"options": f"{options} -csearch_path={schema}".strip()}
    ).render_as_string(hide_password=False)


# ----------------------------------------------------------------------------------------- sink


class SinkStats:
    """Counters of the sink; `busy_s` is the union of the intervals with a request in hand."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        self.requests = 0
        self.records = 0
        self.by_action: dict[str, int] = {}
        self.busy_s = 0.0
        self._active = 0
        self._since = 0.0

    def enter(self) -> None:
        with self.lock:
            if self._active == 0:
                self._since = time.perf_counter()
            self._active += 1

    def leave(self, action: str, records: int) -> None:
        with self.lock:
            self._active -= 1
            if self._active == 0:
                self.busy_s += time.perf_counter() - self._since
            self.requests += 1
            self.records += records
            self.by_action[action] = self.by_action.get(action, 0) + records

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return {
                "requests": self.requests,
                "records": self.records,
                "by_action": dict(self.by_action),
                "busy_s": round(self.busy_s, 4),
            }


_ACTION = re.compile(rb'"action":"(\w+)"')


def serve_sink() -> None:
    """Run the sink until stdin closes; prints its base URL on the first line of stdout."""
    stats = SinkStats()

    class Handler(BaseHTTPRequestHandler):
        disable_nagle_algorithm = True
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _answer(self, body: bytes = b"") -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if body:
                self.wfile.write(body)

        def do_POST(self) -> None:
            if self.path == "/__reset":
                stats.reset()
                self._answer()
                return
            stats.enter()
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            match = _ACTION.search(body, 0, 400)
            records = body.count(b'"key":')  # one per record; keys are plain ids here
            self._answer()
            stats.leave(match.group(1).decode() if match else "?", records)

        def do_HEAD(self) -> None:
            self._answer()

        def do_GET(self) -> None:
            self._answer(json.dumps(stats.snapshot()).encode())

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print(f"http://127.0.0.1:{server.server_address[1]}", flush=True)
    sys.stdin.read()  # the parent closes our stdin (or dies): stop


class Sink:
    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--serve-sink"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        self.url = self.process.stdout.readline().strip()

    def _call(self, method: str, path: str) -> bytes:
        import http.client

        connection = http.client.HTTPConnection(self.url.removeprefix("http://"), timeout=10)
        try:
            connection.request(method, path)
            return connection.getresponse().read()
        finally:
            connection.close()

    def reset(self) -> None:
        self._call("POST", "/__reset")

    def stats(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self._call("GET", "/__stats"))
        return data

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait(timeout=10)


# ------------------------------------------------------------------------------------------ run


@dataclass
class Measure:
    size: int
    name: str
    wall_s: float
    cpu_s: float
    peak_rss_mb: float
    sink: dict[str, Any]
    run: dict[str, Any] = field(default_factory=dict)
    exit_code: int = 0

    @property
    def beyond_sink_s(self) -> float:
        return self.wall_s - float(self.sink["busy_s"])

    @property
    def rows_per_s(self) -> float:
        return int(self.run.get("segment_rows", 0)) / self.wall_s if self.wall_s else 0.0


def duckdb_settings(workdir: Path, args: Any) -> str:
    """URL query bounding DuckDB's memory (it spills to a folder of the work dir beyond it)."""
    if not args.duckdb_memory_limit:
        return ""
    spill = workdir / "duckdb-spill"
    spill.mkdir(exist_ok=True)
    return f"?memory_limit={args.duckdb_memory_limit}&temp_directory={spill}"


def warehouse_url(workdir: Path, customers: int, warehouse: Path, args: Any) -> str:
    if args.warehouse == "sqlite":
        return f"sqlite:///{in_own_process(sqlite_copy, warehouse)}"
    if args.warehouse == "postgresql":
        return str(in_own_process(postgres_copy, warehouse, customers, args.postgres_url))
    return f"duckdb:///{warehouse}{duckdb_settings(workdir, args)}"


def write_config(workdir: Path, customers: int, warehouse: Path, sink_url: str, args: Any) -> Path:
    state = workdir / f"state-{customers}" / "state.db"
    path = workdir / f"winback-{customers}.toml"
    path.write_text(
        f"""# written by bench/bench_sync.py
[warehouse]
url = "{warehouse_url(workdir, customers, warehouse, args)}"
chunk_size = {args.chunk_size}
pushdown = {"false" if args.no_pushdown else "true"}

[state]
url = "sqlite:///{state}"

[retry]
max_attempts = 3
initial_backoff_s = 0.1
timeout_s = 30

[segments.lapsed]
key = "customer_id"
sql = "{SEGMENT_SQL}"

[destinations.sink]
type = "webhook"
url = "{sink_url}/hook"
secret = "${{WINBACK_BENCH_SECRET:-whsec_YmVuY2gtc2VjcmV0LWtleQ==}}"
batch_size = {args.batch_size}
max_concurrency = {args.concurrency}

[syncs.lapsed_to_sink]
segment = "lapsed"
destination = "sink"
audience = "bench"
identifiers = {{ email = "email", phone = "phone", country = "country", first_name = "first_name" }}
fields = {{ FNAME = "first_name" }}
""",
        encoding="utf-8",
    )
    return path


STATE_SUFFIXES = ("", "-wal", "-shm", "-journal")


def reset_state(workdir: Path, customers: int) -> None:
    folder = workdir / f"state-{customers}"
    for suffix in STATE_SUFFIXES:
        (folder / f"state.db{suffix}").unlink(missing_ok=True)


def kept_state_name(args: Any) -> str:
    """The kept state of a full sync depends on where its fingerprints were computed."""
    return f"after-full-{args.warehouse}{'-no-pushdown' if args.no_pushdown else ''}.db"


def keep_first_sync_state(workdir: Path, customers: int, name: str) -> None:
    """Copy the state a full sync left, so `--only unchanged incremental` can start from it."""
    folder = workdir / f"state-{customers}"
    for suffix in STATE_SUFFIXES:
        kept = folder / f"{name}{suffix}"
        kept.unlink(missing_ok=True)
        if (folder / f"state.db{suffix}").exists():
            shutil.copyfile(folder / f"state.db{suffix}", kept)


def restore_first_sync_state(workdir: Path, customers: int, name: str) -> None:
    folder = workdir / f"state-{customers}"
    if not (folder / name).exists():
        raise SystemExit(
            f"no state kept from a full sync of {customers:,} customers: run the bench once "
            "with the full sync (without --only, or with --only full)"
        )
    reset_state(workdir, customers)
    for suffix in STATE_SUFFIXES:
        if (folder / f"{name}{suffix}").exists():
            shutil.copyfile(folder / f"{name}{suffix}", folder / f"state.db{suffix}")


def run_winback(
    config: Path,
    *,
    day: int,
    sink: Sink,
    profile: str | None,
    profile_path: Path,
    source: Path = ROOT,
    phases: bool = False,
    command_name: str = "run",
) -> tuple[float, float, float, dict[str, Any], int, str]:
    """Run `sync run` (or `sync plan`) once: wall s, CPU s, peak RSS MB, the run's JSON, exit
    code, stderr."""
    command = [sys.executable]
    if profile == "py-spy":  # samples every thread and the normalising worker (pip install py-spy)
        command = ["py-spy", "record", "--subprocesses", "--threads", "--nonblocking", "-r", "100"]
        command += [
            "-f",
            "raw",
            "-o",
            str(profile_path.with_suffix(".pyspy")),
            "--",
            sys.executable,
        ]
    elif profile == "cprofile":
        command += ["-m", "cProfile", "-o", str(profile_path.with_suffix(".prof"))]
    elif profile == "pyinstrument":
        command += ["-m", "pyinstrument", "-r", "text", "--show-all", "-o"]
        command += [str(profile_path.with_suffix(".txt"))]
    command += ["-m", "connector", "--config", str(config)]
    command += ["-v"] if phases else []
    command += ["sync", command_name, "--output", "json"]
    env = {**os.environ, "WINBACK_BENCH_DAY": str(day), "COLUMNS": "200"}
    if source != ROOT:  # another checkout (e.g. `git archive <rev> connector destinations`)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(source), env.get("PYTHONPATH")]))
    out_path = profile_path.with_suffix(".stdout")
    err_path = profile_path.with_suffix(".stderr")
    sink.reset()
    with out_path.open("wb") as out, err_path.open("wb") as err:
        started = time.perf_counter()
        process = subprocess.Popen(command, stdout=out, stderr=err, env=env, cwd=source)
        tree = TreeMemory(process.pid)
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - started
        tree.stop()
    process.returncode = os.waitstatus_to_exitcode(status)
    # The process's own peak (KiB on Linux), or that of the whole tree when winback runs a
    # second process (sampled, so a short peak may be missed by a few MB).
    peak_mb = max(usage.ru_maxrss / 1024, tree.peak_mb)
    cpu = usage.ru_utime + usage.ru_stime
    text = out_path.read_text(encoding="utf-8", errors="replace")
    try:
        document = json.loads(text)
        run = document["runs"][0]
    except (ValueError, KeyError, IndexError):
        run = {}
    stderr = err_path.read_text(encoding="utf-8", errors="replace")
    return wall, cpu, peak_mb, run, process.returncode, stderr


class TreeMemory:
    """Samples the summed RSS of a process and its descendants every 20 ms, in a thread."""

    def __init__(self, pid: int):
        import psutil  # dev dependency

        self.peak_mb = 0.0
        self._root = psutil.Process(pid)
        self._psutil = psutil
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stopped.wait(0.02):
            try:
                processes = [self._root, *self._root.children(recursive=True)]
                total = 0
                for process in processes:
                    total += process.memory_info().rss
            except self._psutil.Error:  # gone between listing and reading
                continue
            self.peak_mb = max(self.peak_mb, total / 2**20)

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join()


def bench_size(customers: int, sink: Sink, args: Any) -> list[Measure]:
    workdir: Path = args.workdir
    warehouse = in_own_process(build_warehouse, workdir, customers)
    config = write_config(workdir, customers, warehouse, sink.url, args)
    runs = [("full", 1), ("unchanged", 1), ("incremental", 2)]
    if args.plan:  # `sync plan` before the first sync: what a user runs first
        runs.insert(0, ("plan", 1))
    if args.only:
        runs = [(name, day) for name, day in runs if name in args.only]
    if runs[0][0] in ("unchanged", "incremental"):
        restore_first_sync_state(workdir, customers, kept_state_name(args))
    else:
        reset_state(workdir, customers)
    measures = []
    for name, day in runs:
        profile_path = workdir / f"run-{customers}-{name}"
        wall, cpu, peak, run, code, stderr = run_winback(
            config,
            day=day,
            sink=sink,
            profile=args.profile,
            profile_path=profile_path,
            source=args.source,
            phases=args.phases,
            command_name="plan" if name == "plan" else "run",
        )
        if name == "full" and code == 0:
            keep_first_sync_state(workdir, customers, kept_state_name(args))
        measure = Measure(customers, name, wall, cpu, peak, sink.stats(), run, code)
        measures.append(measure)
        print(format_row(measure), flush=True)
        if args.phases:
            for line in stderr.splitlines():
                if "peak memory" in line:
                    print(f"    {line.strip()}", flush=True)
        if code != 0 or run.get("status") != ("dry_run" if name == "plan" else "success"):
            print(f"  winback exit {code}: {run.get('error')}\n{stderr[-2000:]}", file=sys.stderr)
    return measures


HEADER = (
    f"{'customers':>10} {'run':<12} {'wall s':>7} {'cpu s':>6} {'in-run s':>8} {'sink s':>7} "
    f"{'beyond s':>8} {'rows/s':>9} {'RSS MB':>7} {'requests':>8} {'records':>8}  "
    "planned add/remove/update"
)


def format_row(m: Measure) -> str:
    planned = m.run.get("planned") or {}
    plan = "/".join(str(planned.get(a, "?")) for a in ("add", "remove", "update"))
    return (
        f"{m.size:>10,} {m.name:<12} {m.wall_s:>7.2f} {m.cpu_s:>6.2f} "
        f"{m.run.get('duration_s', 0):>8.2f} "
        f"{m.sink['busy_s']:>7.2f} {m.beyond_sink_s:>8.2f} {m.rows_per_s:>9,.0f} "
        f"{m.peak_rss_mb:>7.0f} {m.sink['requests']:>8} {m.sink['records']:>8}  {plan}"
    )


def check_targets(measures: list[Measure]) -> list[str]:
    """One line per target: PASS/FAIL with the measured value."""
    lines = []
    for m in measures:
        label = f"{m.size:,} {m.name}"
        if m.exit_code != 0:
            lines.append(f"FAIL {label}: exit code {m.exit_code}")
            continue
        if m.name == "full":
            ok = m.beyond_sink_s <= TARGETS["full_beyond_sink_s"]
            lines.append(
                f"{'PASS' if ok else 'FAIL'} {label}: {m.beyond_sink_s:.2f} s beyond the sink "
                f"(target <= {TARGETS['full_beyond_sink_s']} s)"
            )
        elif m.name == "unchanged":
            ok = m.sink["requests"] == 0
            lines.append(f"{'PASS' if ok else 'FAIL'} {label}: {m.sink['requests']} requests")
        elif m.name == "incremental":
            ok = m.wall_s <= TARGETS["incremental_s"]
            lines.append(
                f"{'PASS' if ok else 'FAIL'} {label}: {m.wall_s:.2f} s wall "
                f"(target <= {TARGETS['incremental_s']} s)"
            )
        ok = m.peak_rss_mb <= TARGETS["peak_rss_mb"]
        lines.append(
            f"{'PASS' if ok else 'FAIL'} {label}: peak RSS {m.peak_rss_mb:.0f} MB "
            f"(target <= {TARGETS['peak_rss_mb']:.0f} MB)"
        )
    sizes = sorted({m.size for m in measures})
    if len(sizes) > 1:
        small = max(m.peak_rss_mb for m in measures if m.size == sizes[0])
        large = max(m.peak_rss_mb for m in measures if m.size == sizes[-1])
        ok = large <= small * 1.25 + 10
        lines.append(
            f"{'PASS' if ok else 'FAIL'} memory flat: peak {small:.0f} MB at {sizes[0]:,} vs "
            f"{large:.0f} MB at {sizes[-1]:,} customers"
        )
    return lines


def print_profile(path: Path, limit: int) -> None:
    import pstats

    stats = pstats.Stats(str(path))
    stats.sort_stats("cumulative").print_stats(limit)
    stats.sort_stats("tottime").print_stats(limit)


def print_pyspy(path: Path, limit: int) -> None:
    """Summarise a py-spy raw profile: samples per thread, then the top leaf and inclusive frames.

    Each line of the raw (collapsed) format is ``frame;frame;...;leaf count``; with
    ``--subprocesses --threads`` the first frames name the process and the thread."""
    from collections import Counter

    threads: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        owner = [f for f in frames[:2] if f.startswith(("process", "thread"))]
        code = frames[len(owner) :]
        total += count
        threads[" ".join(owner)] += count
        if code:
            leaves[code[-1]] += count
        for frame in set(code):
            inclusive[frame] += count
    print(f"{total} samples (100 a second, running threads only)")
    for title, counter in (("thread", threads), ("leaf", leaves), ("inclusive", inclusive)):
        print(f"--- by {title} ---")
        for name, count in counter.most_common(limit):
            print(f"{count / 100:8.2f} s  {name[:150]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--customers", type=int, nargs="+", default=[1_000_000])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/winback-bench"))
    parser.add_argument("--batch-size", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--chunk-size", type=int, default=10_000)
    parser.add_argument(
        "--duckdb-memory-limit",
        metavar="SIZE",
        help="DuckDB memory_limit in the warehouse URL, e.g. 128MB (spills beyond it)",
    )
    parser.add_argument(
        "--warehouse",
        choices=("duckdb", "sqlite", "postgresql"),
        default="duckdb",
        help="sqlite: the same tables copied to a SQLite file; postgresql: to a schema "
        "winback_bench_N of --postgres-url (warehouses that cannot compare in themselves)",
    )
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get("WINBACK_TEST_POSTGRES_URL"),
        help="SQLAlchemy URL of the PostgreSQL database for --warehouse postgresql "
        "(default: $WINBACK_TEST_POSTGRES_URL)",
    )
    parser.add_argument(
        "--no-pushdown",
        action="store_true",
        help="diff in the state database ([warehouse] pushdown = false) instead of in DuckDB",
    )
    parser.add_argument("--profile", choices=("cprofile", "pyinstrument", "py-spy"))
    parser.add_argument("--profile-lines", type=int, default=35)
    parser.add_argument(
        "--only",
        nargs="+",
        choices=("plan", "full", "unchanged", "incremental"),
        help="runs to keep; without `full`, the others start from the state the last full "
        "sync of that size left",
    )
    parser.add_argument(
        "--plan", action="store_true", help="also time `sync plan` before the first sync"
    )
    parser.add_argument("--json", type=Path, help="also write the measures to this file")
    parser.add_argument(
        "--phases",
        action="store_true",
        help="run winback with -v and print its phase timings and peak memory",
    )
    parser.add_argument(
        "--source",
        type=Path,
        default=ROOT,
        help="run winback from this checkout (folder holding connector/ and destinations/)",
    )
    parser.add_argument("--serve-sink", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_sink:
        serve_sink()
        return 0
    if args.warehouse == "postgresql" and not args.postgres_url:
        parser.error("--warehouse postgresql needs --postgres-url (or $WINBACK_TEST_POSTGRES_URL)")
    args.workdir.mkdir(parents=True, exist_ok=True)
    args.workdir = args.workdir.resolve()
    args.source = args.source.resolve()
    # Bytecode as an installed package has it (pip compiles it; an editable checkout under
    # PYTHONDONTWRITEBYTECODE would recompile winback's modules on every run, ~0.1-0.2 s).
    for package in ("connector", "destinations"):
        compileall.compile_dir(args.source / package, quiet=1)
    sink = Sink()
    measures: list[Measure] = []
    print(
        f"batch_size {args.batch_size}, max_concurrency {args.concurrency}, chunk_size "
        f"{args.chunk_size}, {args.warehouse} warehouse, pushdown {not args.no_pushdown}, "
        f"{os.cpu_count()} CPUs, "
        f"work dir {args.workdir}"
    )
    print(HEADER)
    try:
        for customers in args.customers:
            measures += bench_size(customers, sink, args)
    finally:
        sink.close()
    print()
    for line in check_targets(measures):
        print(line)
    if args.profile == "cprofile":
        for m in measures:
            print(f"\n=== profile {m.size:,} {m.name} ===")
            print_profile(args.workdir / f"run-{m.size}-{m.name}.prof", args.profile_lines)
    elif args.profile == "py-spy":
        for m in measures:
            print(f"\n=== py-spy {m.size:,} {m.name} ===")
            print_pyspy(args.workdir / f"run-{m.size}-{m.name}.pyspy", args.profile_lines)
    elif args.profile == "pyinstrument":
        for m in measures:
            print(f"profile of {m.size:,} {m.name}: {args.workdir}/run-{m.size}-{m.name}.txt")
    if args.json:
        args.json.write_text(
            json.dumps(
                [
                    {
                        "customers": m.size,
                        "run": m.name,
                        "wall_s": round(m.wall_s, 3),
                        "cpu_s": round(m.cpu_s, 3),
                        "beyond_sink_s": round(m.beyond_sink_s, 3),
                        "peak_rss_mb": round(m.peak_rss_mb, 1),
                        "sink": m.sink,
                        "winback": m.run,
                    }
                    for m in measures
                ],
                indent=2,
            )
        )
    return 1 if any(m.exit_code != 0 for m in measures) else 0


if __name__ == "__main__":
    sys.exit(main())
