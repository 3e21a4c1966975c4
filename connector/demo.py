"""`winback init --demo`: a small, deterministic DuckDB warehouse and a config that uses it.

The warehouse holds a few thousand customers of a fictional online shop with realistic
inactivity: regular buyers, people who drifted away, dormant sign-ups who never bought, B2B
accounts with several contacts, email engagement, open support tickets, and a few dirty rows
(malformed emails, missing identifiers) so skipped-row reporting has something to show.
"""

from __future__ import annotations

import csv
import datetime as dt
import random
import tempfile
from pathlib import Path

import duckdb

DEMO_AS_OF = dt.date(2026, 11, 1)
DEMO_WAREHOUSE = "demo_warehouse.duckdb"
CUSTOMERS = 3000
COUNTRIES = ["US", "GB", "FR", "DE", "ES", "IT", "NL", "CA"]
FIRST_NAMES = [
    "Ana",
    "Ben",
    "Chloé",
    "David",
    "Emma",
    "Farid",
    "Grace",
    "Hugo",
    "Inès",
    "Jonas",
    "Kenji",
    "Lena",
    "Marta",
    "Noah",
    "Olga",
    "Pablo",
    "Quinn",
    "Rosa",
    "Sam",
    "Tariq",
]
LAST_NAMES = [
    "Martin",
    "Smith",
    "García",
    "Müller",
    "Rossi",
    "Dubois",
    "Jansen",
    "Lee",
    "Brown",
    "Novak",
    "Silva",
    "Khan",
    "O'Brien",
    "Schmidt",
    "Moreau",
    "Costa",
]
PHONE_PREFIX = {
    "US": "+1415555",
    "CA": "+1604555",
    "GB": "+4479460",
    "FR": "+336120",
    "DE": "+4915123",
    "ES": "+346123",
    "IT": "+393123",
    "NL": "+316123",
}

DEMO_CONFIG = """\
# winback demo configuration, written by `winback init --demo`.
# Edit it freely; `winback config validate` checks it. Every option: config.example.toml.

[warehouse]
url = "duckdb:///{warehouse}"

[state]
url = "sqlite:///.winback/state.db"

# Customers whose last non-cancelled order is more than 180 days old, who opted in to marketing
# and have no open support ticket. `:as_of` is the run's reference date (--as-of, default today).
[segments.lapsed_buyers]
key = "customer_id"
as_of = 2026-11-01          # fixed so the demo gives the same result every day; remove for "today"
sql = \"\"\"
SELECT c.customer_id, c.email, c.phone, c.first_name, c.last_name, c.country,
       max(o.ordered_at)::DATE AS last_order_on,
       date_diff('day', max(o.ordered_at)::DATE, CAST(:as_of AS DATE)) AS days_inactive
FROM customers c
JOIN orders o ON o.customer_id = c.customer_id AND o.status <> 'cancelled'
WHERE c.marketing_opt_in
  AND NOT EXISTS (SELECT 1 FROM support_tickets t
                  WHERE t.customer_id = c.customer_id AND t.status = 'open')
GROUP BY ALL
HAVING max(o.ordered_at)::DATE < CAST(:as_of AS DATE) - INTERVAL 180 DAY
   AND max(o.ordered_at)::DATE >= CAST(:as_of AS DATE) - INTERVAL 730 DAY
\"\"\"

# Sign-ups who never ordered anything: dormant prospects.
[segments.dormant_prospects]
key = "customer_id"
sql = \"\"\"
SELECT c.customer_id, c.email, c.first_name, c.country
FROM customers c
WHERE c.marketing_opt_in
  AND NOT EXISTS (SELECT 1 FROM orders o WHERE o.customer_id = c.customer_id)
\"\"\"

[destinations.exports]
type = "file"
path = "exports/{{sync}}/{{run_id}}.csv"

[destinations.exports_jsonl]
type = "file"
path = "exports/{{sync}}/{{run_id}}.jsonl"

[syncs.lapsed_to_csv]
segment = "lapsed_buyers"
destination = "exports"
mode = "mirror"
identifiers = {{ email = "email", phone = "phone", country = "country", first_name = "first_name" }}
fields = {{ days_inactive = "days_inactive", last_order_on = "last_order_on" }}
default_country = "US"

[syncs.prospects_to_jsonl]
segment = "dormant_prospects"
destination = "exports_jsonl"
mode = "mirror"
identifiers = {{ email = "email", country = "country" }}
fields = {{ first_name = "first_name" }}
"""


def _customers(rng: random.Random) -> list[list[object]]:
    rows: list[list[object]] = []
    for n in range(1, CUSTOMERS + 1):
        country = rng.choice(COUNTRIES)
        first, last = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES)
        email: str | None = f"{first.lower()}.{n}@example-shop.com".replace("é", "e")
        email = email.replace("è", "e").replace("ü", "u").replace("í", "i")
        phone: str | None = (
            f"{PHONE_PREFIX[country]}{n % 10000:04d}" if rng.random() < 0.6 else None
        )
        if n % 97 == 0:
            email = f"{first.lower()}{n}@"  # malformed: skipped unless a phone is there
        elif n % 89 == 0:
            email = None
        if n % 131 == 0:
            email, phone = None, None  # no identifier at all: skipped with a reason
        if email and rng.random() < 0.1:
            email = "  " + email.upper() + " "  # messy casing and spaces, normalised
        account = f"ACME-{(n - 1) // 4:04d}" if n > CUSTOMERS - 400 else None
        role = rng.choice(["buyer", "finance", "it"]) if account else None
        signup = DEMO_AS_OF - dt.timedelta(days=rng.randint(30, 1500))
        rows.append(
            [
                n,
                email,
                phone,
                first,
                last,
                country,
                signup.isoformat(),
                rng.random() < 0.9,
                account,
                role,
            ]
        )
    return rows


def _orders(rng: random.Random) -> list[list[object]]:
    rows: list[list[object]] = []
    order_id = 0
    for n in range(1, CUSTOMERS + 1):
        if rng.random() < 0.12:
            continue  # never bought
        cadence = rng.choice([20, 45, 90, 180])
        last = DEMO_AS_OF - dt.timedelta(days=int(rng.expovariate(1 / 240)))
        count = rng.randint(1, 8)
        for i in range(count):
            when = last - dt.timedelta(days=i * cadence + rng.randint(0, 10))
            order_id += 1
            status = "cancelled" if rng.random() < 0.05 else "paid"
            hour = rng.randint(0, 23)
            rows.append(
                [
                    order_id,
                    n,
                    f"{when.isoformat()} {hour:02d}:15:00",
                    round(rng.uniform(9, 400), 2),
                    status,
                ]
            )
    return rows


def _email_events(rng: random.Random) -> list[list[object]]:
    rows: list[list[object]] = []
    for n in range(1, CUSTOMERS + 1):
        for _ in range(rng.randint(0, 6)):
            when = DEMO_AS_OF - dt.timedelta(days=int(rng.expovariate(1 / 200)))
            rows.append([n, rng.choice(["open", "click"]), f"{when.isoformat()} 09:00:00"])
    return rows


def _tickets(rng: random.Random) -> list[list[object]]:
    rows: list[list[object]] = []
    for n in range(1, CUSTOMERS + 1):
        if rng.random() < 0.06:
            status = "open" if rng.random() < 0.5 else "closed"
            opened = DEMO_AS_OF - dt.timedelta(days=rng.randint(1, 400))
            rows.append([n, status, opened.isoformat()])
    return rows


TABLES = {
    "customers": (
        "customer_id INTEGER PRIMARY KEY, email VARCHAR, phone VARCHAR, first_name VARCHAR, "
        "last_name VARCHAR, country VARCHAR, signup_date DATE, marketing_opt_in BOOLEAN, "
        "account_id VARCHAR, role VARCHAR",
        _customers,
    ),
    "orders": (
        "order_id INTEGER PRIMARY KEY, customer_id INTEGER, ordered_at TIMESTAMP, "
        "amount DECIMAL(10,2), status VARCHAR",
        _orders,
    ),
    "email_events": (
        "customer_id INTEGER, event_type VARCHAR, occurred_at TIMESTAMP",
        _email_events,
    ),
    "support_tickets": ("customer_id INTEGER, status VARCHAR, opened_at DATE", _tickets),
}


def build_demo_warehouse(path: Path) -> dict[str, int]:
    """(Re)create the demo DuckDB file; returns the row count per table."""
    if path.exists():
        path.unlink()
    counts: dict[str, int] = {}
    connection = duckdb.connect(str(path))
    try:
        with tempfile.TemporaryDirectory() as folder:
            for name, (schema, generate) in TABLES.items():
                rows = generate(random.Random(f"winback-demo-{name}"))
                csv_path = Path(folder) / f"{name}.csv"
                with csv_path.open("w", newline="", encoding="utf-8") as handle:
                    csv.writer(handle).writerows(rows)
                connection.execute(f"CREATE TABLE {name} ({schema})")
                connection.execute(
                    f"INSERT INTO {name} SELECT * FROM read_csv(?, header = false, "
                    "all_varchar = true, nullstr = '')",
                    [str(csv_path)],
                )
                counts[name] = len(rows)
    finally:
        connection.close()
    return counts


def demo_config_text(warehouse_file: str = DEMO_WAREHOUSE) -> str:
    return DEMO_CONFIG.format(warehouse=warehouse_file)
