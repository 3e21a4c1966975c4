"""The config written by a plain `winback init` (without --demo)."""

STARTER_CONFIG = """\
# winback configuration. Every option is documented in config.example.toml.
# Check it with `winback config validate`, preview with `winback sync plan`.

[warehouse]
url = "duckdb:///warehouse.duckdb"        # any SQLAlchemy URL; ${ENV_VAR} allowed

[state]
url = "sqlite:///.winback/state.db"       # where winback remembers what it sent

[segments.lapsed_buyers]
key = "customer_id"
sql = \"\"\"
SELECT customer_id, email, phone, country
FROM customers
WHERE last_order_at < CURRENT_DATE - INTERVAL 180 DAY
\"\"\"

[destinations.exports]
type = "file"
path = "exports/{sync}/{run_id}.csv"

[syncs.lapsed_to_file]
segment = "lapsed_buyers"
destination = "exports"
identifiers = { email = "email", phone = "phone", country = "country" }
"""
