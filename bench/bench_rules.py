"""Benchmark: a compiled rules segment against the same definition hand-written for DuckDB.

    python bench/bench_rules.py --customers 1000000

Builds a deterministic DuckDB warehouse (N customers, 5N orders, 10N email events, 2N usage
rows; hash-based generation inside DuckDB, so it takes seconds), then times streaming the whole
result of the 4-signal score segment with cadence (``compile_rules``) and of a hand-written
DuckDB query of the same definition, both fetched in partitions and thrown away. Prints both
times, the ratio and checks both return the same rows. Targets: <= 10 s at 1,000,000 customers
and within 2x of the hand-written query.
"""

from __future__ import annotations

import argparse
import hashlib
import resource
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import duckdb
import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from connector.rules import RulesSegment, compile_rules

AS_OF = date(2026, 11, 1)
PARTITION = 50_000

SEGMENT = RulesSegment.model_validate(
    {
        "from": "customers",
        "key": "customer_id",
        "columns": ["email", "first_name", "country"],
        "where": "opt_in",
        "match": "score",
        "min_score": 3,
        "lost_after": "730d",
        "signals": [
            {
                "name": "purchase",
                "table": "orders",
                "key": "customer_id",
                "at": "ordered_at",
                "where": "status <> 'cancelled'",
                "inactive_after": "180d",
                "cadence": 2.0,
                "weight": 2,
            },
            {
                "name": "email_open",
                "table": "email_events",
                "key": "customer_id",
                "at": "occurred_at",
                "where": "kind = 'open'",
                "inactive_after": "90d",
            },
            {
                "name": "email_click",
                "table": "email_events",
                "key": "customer_id",
                "at": "occurred_at",
                "where": "kind = 'click'",
                "inactive_after": "120d",
            },
            {
                "name": "usage",
                "table": "usage_daily",
                "key": "customer_id",
                "at": "day",
                "value": "credits",
                "window": "30d",
                "baseline": "180d",
                "drop_below": 0.3,
            },
        ],
    }
)

HAND_WRITTEN = """
WITH
purchases AS (
    SELECT customer_id AS k, ordered_at AS d FROM orders
    WHERE status <> 'cancelled' AND ordered_at <= DATE '{as_of}'),
p AS (SELECT k, max(d) AS last, count(*) AS n FROM purchases GROUP BY k),
p_gap AS (
    SELECT k, median(gap) AS med, count(*) + 1 AS dates FROM (
        SELECT k, d - lag(d) OVER (PARTITION BY k ORDER BY d) AS gap
        FROM (SELECT DISTINCT k, d FROM purchases))
    WHERE gap IS NOT NULL GROUP BY k),
emails AS (
    SELECT customer_id AS k, kind, CAST(timezone('UTC', occurred_at) AS DATE) AS d
    FROM email_events),
o AS (SELECT k, max(d) AS last, count(*) AS n FROM emails
      WHERE kind = 'open' AND d <= DATE '{as_of}' GROUP BY k),
c AS (SELECT k, max(d) AS last, count(*) AS n FROM emails
      WHERE kind = 'click' AND d <= DATE '{as_of}' GROUP BY k),
u AS (
    SELECT customer_id AS k, max(day) AS last, count(*) AS n,
        coalesce(sum(credits) FILTER (WHERE day > DATE '{as_of}' - 30), 0) AS w,
        coalesce(sum(credits) FILTER (
            WHERE day <= DATE '{as_of}' - 30 AND day > DATE '{as_of}' - 210), 0) AS b
    FROM usage_daily WHERE day <= DATE '{as_of}' GROUP BY customer_id),
flags AS (
    SELECT cu.customer_id, cu.email, cu.first_name, cu.country,
        CASE WHEN p.k IS NULL THEN 1
             WHEN p_gap.dates >= 3 THEN (DATE '{as_of}' - p.last) > 2.0 * p_gap.med
             ELSE (DATE '{as_of}' - p.last) > 180 END::INT AS s_purchase,
        CASE WHEN o.k IS NULL THEN 1 ELSE (DATE '{as_of}' - o.last) > 90 END::INT AS s_open,
        CASE WHEN c.k IS NULL THEN 1 ELSE (DATE '{as_of}' - c.last) > 120 END::INT AS s_click,
        CASE WHEN u.k IS NULL THEN 1
             ELSE u.w < 0.3 * u.b * 30 / 180 OR (u.w = 0 AND u.b = 0) END::INT AS s_usage,
        greatest(p.last, o.last, c.last, u.last) AS last_activity_at,
        coalesce(p.n, 0) + coalesce(o.n, 0) + coalesce(c.n, 0) + coalesce(u.n, 0) AS events
    FROM customers cu
    LEFT JOIN p ON p.k = cu.customer_id LEFT JOIN p_gap ON p_gap.k = cu.customer_id
    LEFT JOIN o ON o.k = cu.customer_id LEFT JOIN c ON c.k = cu.customer_id
    LEFT JOIN u ON u.k = cu.customer_id
    WHERE cu.opt_in)
SELECT customer_id, email, first_name, country, last_activity_at,
    DATE '{as_of}' - last_activity_at AS days_inactive,
    2 * s_purchase + s_open + s_click + s_usage AS score,
    concat_ws(',', CASE WHEN s_purchase = 1 THEN 'purchase' END,
        CASE WHEN s_open = 1 THEN 'email_open' END, CASE WHEN s_click = 1 THEN 'email_click' END,
        CASE WHEN s_usage = 1 THEN 'usage' END) AS inactive_signals,
    events
FROM flags
WHERE 2 * s_purchase + s_open + s_click + s_usage >= 3
  AND (last_activity_at IS NULL OR DATE '{as_of}' - last_activity_at <= 730)
ORDER BY customer_id
"""


def build_warehouse(path: Path, customers: int) -> None:
    """Create the tables with DuckDB's own generators (deterministic: hash of the row number)."""
    as_of = AS_OF.isoformat()
    statements = [
        f"""CREATE TABLE customers AS SELECT i AS customer_id, 'c' || i || '@example.com' AS email,
            'Name' || (i % 997) AS first_name, ['FR', 'DE', 'GB', 'US'][1 + i % 4] AS country,
            i // 3 AS account_id, hash(i, 'opt') % 10 < 8 AS opt_in
            FROM range(1, {customers} + 1) t(i)""",
        f"""CREATE TABLE orders AS SELECT CAST(1 + hash(i, 'who') % {customers} AS BIGINT) AS customer_id,
            DATE '{as_of}' - CAST(hash(i, 'when') % 900 AS INTEGER) + 3 AS ordered_at,
            CASE WHEN hash(i, 'st') % 20 = 0 THEN 'cancelled' ELSE 'paid' END AS status
            FROM range({5 * customers}) t(i)""",
        f"""CREATE TABLE email_events AS SELECT CAST(1 + hash(i, 'who') % {customers} AS BIGINT) AS customer_id,
            TIMESTAMPTZ '{as_of} 12:00:00+00' - to_seconds(CAST(hash(i, 'when') % 60000000 AS BIGINT))
                AS occurred_at,
            CASE WHEN hash(i, 'kind') % 4 = 0 THEN 'click' ELSE 'open' END AS kind
            FROM range({10 * customers}) t(i)""",
        f"""CREATE TABLE usage_daily AS SELECT CAST(1 + hash(i, 'who') % {customers // 2} AS BIGINT) AS customer_id,
            DATE '{as_of}' - CAST(hash(i, 'when') % 240 AS INTEGER) AS day,
            CAST(hash(i, 'credits') % 50 AS INTEGER) AS credits
            FROM range({2 * customers}) t(i)""",
    ]
    with duckdb.connect(str(path)) as connection:
        for statement in statements:
            connection.execute(statement)


@dataclass(frozen=True)
class Run:
    """One timed, streamed execution."""

    rows: int
    digest: str
    wall_s: float
    cpu_s: float


def cpu_seconds() -> float:
    """CPU time of this process, DuckDB's worker threads included."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def stream(engine: sa.Engine, query: Any) -> Run:
    """Fetch every row in partitions, keeping only a count and a digest of the rows."""
    count, digest = 0, hashlib.sha256()
    wall, cpu = time.perf_counter(), cpu_seconds()
    with engine.connect() as connection:
        result = connection.execution_options(stream_results=True).execute(query)
        for partition in result.partitions(PARTITION):
            count += len(partition)
            digest.update(repr([tuple(row) for row in partition]).encode())
    return Run(count, digest.hexdigest(), time.perf_counter() - wall, cpu_seconds() - cpu)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--customers", type=int, default=1_000_000)
    parser.add_argument("--keep", type=Path, help="build (or reuse) the warehouse at this path")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        path = args.keep or Path(folder) / "bench.duckdb"
        started = time.perf_counter()
        if not path.exists():
            build_warehouse(path, args.customers)
        print(
            f"warehouse: {args.customers:,} customers, built in {time.perf_counter() - started:.1f} s"
        )
        engine = sa.create_engine(f"duckdb:///{path}")
        try:
            started = time.perf_counter()
            query = compile_rules("bench", SEGMENT, as_of=AS_OF, engine=engine)
            compile_s = time.perf_counter() - started
            hand = sa.text(HAND_WRITTEN.format(as_of=AS_OF.isoformat()))
            rules, handwritten = stream(engine, query), stream(engine, hand)
        finally:
            engine.dispose()

    print(f"compile_rules (reflection + LIMIT 0 check): {compile_s:.2f} s")
    for label, run in (("rules segment", rules), ("hand-written", handwritten)):
        print(f"{label:14} {run.wall_s:6.2f} s wall, {run.cpu_s:6.2f} s CPU, {run.rows:,} rows")
    print(
        f"ratio rules / hand-written: {rules.wall_s / handwritten.wall_s:.2f}x wall, "
        f"{rules.cpu_s / handwritten.cpu_s:.2f}x CPU"
    )
    same = rules.rows == handwritten.rows
    print(
        f"same rows: {'yes' if same else 'NO'}; same content: {rules.digest == handwritten.digest}"
    )
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
