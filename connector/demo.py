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
PHONE_PREFIX = {  # + 4 digits: a number phonenumbers finds valid for that country
    "US": "+1415555",
    "CA": "+1604555",
    "GB": "+44740012",
    "FR": "+3361230",
    "DE": "+491512345",
    "ES": "+3461230",
    "IT": "+3934712",
    "NL": "+3161230",
}

DEMO_CONFIG = """\
# winback demo configuration, written by `winback init --demo`.
# Edit it freely; `winback config validate` checks it. Every option: config.example.toml.
# Try: winback segments explain lapsed_buyers · winback sync plan · winback sync run

[warehouse]
url = "duckdb:///{warehouse}"

[state]
url = "sqlite:///.winback/state.db"

# Lapsed buyers, scored: a purchase lapse (beyond 180 days, or beyond twice the person's own
# buying rhythm) weighs 2, email silence for 90 days weighs 1; a score of 2 qualifies. People
# with an open support ticket are left out, and so are those gone for more than two years.
[segments.lapsed_buyers]
from = "customers"
key = "customer_id"
columns = ["email", "phone", "first_name", "country"]
where = "marketing_opt_in"
match = "score"
min_score = 2
lost_after = "730d"
as_of = 2026-11-01          # fixed so the demo gives the same result every day; remove for "today"

[[segments.lapsed_buyers.signals]]
name = "purchase"
table = "orders"
key = "customer_id"
at = "ordered_at"
where = "status <> 'cancelled'"
inactive_after = "180d"
cadence = 2.0
never = "exclude"
weight = 2

[[segments.lapsed_buyers.signals]]
name = "email"
table = "email_events"
key = "customer_id"
at = "occurred_at"
inactive_after = "90d"
weight = 1

[[segments.lapsed_buyers.exclude]]
table = "support_tickets"
key = "customer_id"
where = "status = 'open'"

# Dormant prospects: signed up more than a month ago, never ordered anything.
[segments.dormant_prospects]
from = "customers"
key = "customer_id"
columns = ["email", "first_name", "country"]
where = "marketing_opt_in AND signup_date < DATE '2026-10-01'"
as_of = 2026-11-01

[[segments.dormant_prospects.signals]]
name = "purchase"
table = "orders"
key = "customer_id"
at = "ordered_at"
inactive_after = "36500d"   # nobody with an order is inactive: only `never` people qualify
never = "inactive"

# B2B: an account qualifies only when none of its contacts bought for 120 days; the campaign
# goes to the buyers of those accounts.
[segments.dormant_accounts]
from = "customers"
key = "customer_id"
columns = ["email", "first_name", "account_id", "role"]
group_by = "account_id"
where = "account_id IS NOT NULL AND role = 'buyer'"
as_of = 2026-11-01

[[segments.dormant_accounts.signals]]
name = "purchase"
table = "orders"
key = "customer_id"
at = "ordered_at"
inactive_after = "120d"

# A plain SQL segment works too; `:as_of` is the run's reference date.
[segments.big_spenders_lapsed]
key = "customer_id"
as_of = 2026-11-01
sql = \"\"\"
SELECT c.customer_id, c.email, c.first_name, sum(o.amount) AS lifetime_value
FROM customers c JOIN orders o USING (customer_id)
WHERE c.marketing_opt_in AND o.status <> 'cancelled'
GROUP BY ALL
HAVING sum(o.amount) > 1000
   AND max(o.ordered_at)::DATE < CAST(:as_of AS DATE) - INTERVAL 180 DAY
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
fields = {{ days_inactive = "days_inactive", inactive_signals = "inactive_signals" }}
default_country = "US"

[syncs.prospects_to_jsonl]
segment = "dormant_prospects"
destination = "exports_jsonl"
identifiers = {{ email = "email", country = "country" }}
fields = {{ first_name = "first_name" }}

[syncs.accounts_to_csv]
segment = "dormant_accounts"
destination = "exports"
identifiers = {{ email = "email" }}
fields = {{ account_id = "account_id", days_inactive = "days_inactive" }}

[syncs.big_spenders_to_jsonl]
segment = "big_spenders_lapsed"
destination = "exports_jsonl"
mode = "upsert"
identifiers = {{ email = "email" }}
fields = {{ lifetime_value = "lifetime_value" }}
"""


def _customers(rng: random.Random) -> list[list[object]]:
    rows: list[list[object]] = []
    for n in range(1, CUSTOMERS + 1):
        country = rng.choice(COUNTRIES)
        first, last = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES)
        plain_first = first.lower().replace("é", "e").replace("è", "e").replace("ü", "u")
        email: str | None = f"{plain_first}.{n}@example-shop.com"
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
