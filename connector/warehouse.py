"""Connections to the warehouse (read-only) and streaming of query results in chunks."""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from connector.errors import WarehouseError
from connector.interrupts import statement_interruptible
from destinations.base import redact_query_values

URL_ENCODING_HINT = (
    "special characters in a password must be URL-encoded (@ → %40, : → %3A, / → %2F, # → %23, "
    "% → %25)"
)


def parse_database_url(url: str) -> sa.URL:
    """`url` parsed, or a ValueError saying what is wrong with it that quotes no part of its
    password: an unencoded `@`, `:` or `/` in a password makes SQLAlchemy read the rest of it as
    the host, port or database."""
    try:
        parsed = sa.engine.make_url(url)
    except (sa.exc.ArgumentError, ValueError):
        if "@" in url:  # user info: whatever was parsed from it may be a piece of the password
            raise ValueError(f"not a valid SQLAlchemy URL: {URL_ENCODING_HINT}") from None
        raise ValueError(
            f"`{redact_query_values(url)}` is not a SQLAlchemy URL such as "
            "postgresql://user:password@host:5432/database"
        ) from None
    if parsed.host and url.count("@") > 1:
        # A second `@` in what was read as the host, database or query: the rest of a password
        # (connecting would look that piece up as a host name, and messages would show it).
        raise ValueError(f"holds more than one `@`: {URL_ENCODING_HINT}")
    return parsed


def redact_url(url: str | sa.URL) -> str:
    """The URL without its password and the values of credential-named query parameters
    (`?password=`, `?sslpassword=`, `?token=`...), for messages."""
    try:
        parsed = url if isinstance(url, sa.URL) else sa.engine.make_url(url)
    except (sa.exc.ArgumentError, ValueError):
        return "<invalid URL>"
    if parsed.host and "@" in parsed.host:  # the end of a password holding an unencoded `@`
        parsed = parsed.set(host=parsed.host.rsplit("@", 1)[1])
    return redact_query_values(parsed.render_as_string(hide_password=True))


def first_line(error: BaseException) -> str:
    """The database's own message, first line only: drivers append long context, and
    SQLAlchemy the statement, its parameters (rows of customer data) and a link."""
    original = getattr(error, "orig", None) or error
    text = str(original).strip().splitlines()
    line = text[0] if text else type(original).__name__
    return _SQLALCHEMY_CONTEXT.split(line, maxsplit=1)[0].rstrip() or type(original).__name__


_SQLALCHEMY_CONTEXT = re.compile(r"\s*(?:\[SQL: |\[parameters: |\(Background on this error)")


DUCKDB_MEMORY_LIMIT = "96MB"
"""DuckDB's memory limit when the warehouse URL sets none (DuckDB's own default is 80% of the
machine's memory). The in-warehouse diff of a 500k-row segment runs within it no slower; larger
segments and heavy segment queries spill to DuckDB's `temp_directory` instead of growing. DuckDB
keeps the blocks a scan read up to this limit: with winback's own ~110 MB (its libraries) and
the normalising worker's ~35 MB, 96MB keeps a 1M-row first sync under 300 MB in all."""


def query_problem(error: BaseException) -> str:
    """What went wrong with a warehouse query: the database's first line, and for DuckDB
    running out of its memory limit, how to give it more room."""
    text = first_line(error)
    undecodable = re.search(r"Could not decode to UTF-8 column '([^']*)'", text)
    if undecodable:
        column = undecodable.group(1)
        return (
            f"column `{column}` holds text that is not valid UTF-8 in some row (SQLite keeps "
            f"the bytes it was given, e.g. Latin-1 text loaded as is); load that data as UTF-8, "
            f"or read the column as `hex({column})` in the query"
        )
    if text.startswith("Out of Memory Error"):
        text += (
            f" (DuckDB's memory_limit, {DUCKDB_MEMORY_LIMIT} unless the warehouse URL sets "
            "`memory_limit`, is too small for this query: raise it, e.g. "
            "`duckdb:///w.duckdb?memory_limit=1GB`; rows with very large values (long texts, "
            "lists) need it, while `temp_directory` only lets large joins and sorts spill to disk)"
        )
    return text


def with_installed_driver(url: sa.URL) -> sa.URL:
    """`postgresql://` means psycopg2 to SQLAlchemy, but `winback[postgres]` installs psycopg 3:
    use it when psycopg2 is not installed (a driver named in the URL is kept)."""
    if (
        url.drivername == "postgresql"
        and importlib.util.find_spec("psycopg2") is None
        and importlib.util.find_spec("psycopg") is not None
    ):
        return url.set(drivername="postgresql+psycopg")
    return url


POSTGRES_CONNECT_TIMEOUT_S = 15
"""Seconds a PostgreSQL server (warehouse or state store) has to accept a connection
(`?connect_timeout=N` in the URL overrides)."""


def connect_timeout_args(url: sa.URL) -> dict[str, Any]:
    """Driver arguments bounding how long connecting to `url` may take: libpq otherwise waits
    as long as the operating system does (~2 minutes for a host that accepts the connection
    and never answers)."""
    if url.get_backend_name() == "postgresql" and "connect_timeout" not in url.query:
        return {"connect_timeout": POSTGRES_CONNECT_TIMEOUT_S}
    return {}


def create_warehouse_engine(url: str) -> sa.Engine:
    """An engine for the warehouse; DuckDB files are opened read-only and must exist, and
    DuckDB's memory is bounded (`DUCKDB_MEMORY_LIMIT` unless the URL sets `memory_limit`)."""
    try:
        parsed = with_installed_driver(parse_database_url(url))
    except ValueError as error:
        raise WarehouseError(f"cannot use warehouse URL ({error}); check [warehouse] url") from None
    backend = parsed.get_backend_name()
    connect_args: dict[str, Any] = {}
    database = parsed.database
    if backend in ("duckdb", "sqlite") and database and database != ":memory:":
        if not Path(database).exists():
            raise WarehouseError(
                f"warehouse file `{database}` does not exist; check [warehouse] url "
                "(relative paths are relative to the config file); for the demo warehouse, run "
                "`winback init --demo --force` (it also rewrites winback.toml)"
            )
        if backend == "duckdb":
            connect_args["read_only"] = True
    if backend == "duckdb" and "memory_limit" not in parsed.query:
        parsed = parsed.update_query_dict({"memory_limit": DUCKDB_MEMORY_LIMIT})
    connect_args.update(connect_timeout_args(parsed))
    try:
        # Statement parameters (customer data) never go into an error's text.
        engine = sa.create_engine(parsed, connect_args=connect_args, hide_parameters=True)
    except (sa.exc.ArgumentError, sa.exc.NoSuchModuleError, ImportError) as error:
        raise WarehouseError(
            f"cannot use warehouse URL `{redact_url(url)}`: {first_line(error)}; install the "
            "driver for this database (e.g. pip install 'winback[postgres]')"
        ) from None
    if backend in ("duckdb", "sqlite"):
        sa.event.listen(engine, "do_connect", _connect_interruptible)
    return engine


def _connect_interruptible(
    dialect: sa.Dialect, _record: Any, cargs: list[Any], cparams: dict[str, Any]
) -> InterruptibleConnection:
    """The `do_connect` hook of a DuckDB or SQLite warehouse: the driver's connection,
    wrapped."""
    return InterruptibleConnection(dialect.connect(*cargs, **cparams))


class InterruptibleConnection:
    """A DBAPI connection (DuckDB's through duckdb-engine, or sqlite3's) whose statements
    Ctrl-C and SIGTERM interrupt at once (`statement_interruptible`), as psycopg's are: DuckDB
    otherwise holds the signal until the query ends, then fails it with its own "Query
    interrupted", and sqlite3 holds it until the query ends. Both drivers' `interrupt()` may be
    called from another thread. Everything else is the wrapped connection's."""

    def __init__(self, connection: Any) -> None:
        object.__setattr__(self, "_connection", connection)

    def cursor(self) -> InterruptibleCursor:
        return InterruptibleCursor(self._connection.cursor(), self._connection.interrupt)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._connection, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._connection, name, value)


class InterruptibleCursor:
    """A cursor of `InterruptibleConnection`: the calls that run a query (executing it,
    fetching a chunk or all of its rows) are interruptible; `fetchone`, called once per row
    when a result is iterated, is left as it is."""

    def __init__(self, cursor: Any, interrupt: Callable[[], object]) -> None:
        object.__setattr__(self, "_cursor", cursor)
        object.__setattr__(self, "_interrupt", interrupt)

    def execute(self, *args: Any, **kwargs: Any) -> Any:
        with statement_interruptible(self._interrupt):
            return self._cursor.execute(*args, **kwargs)

    def executemany(self, *args: Any, **kwargs: Any) -> Any:
        with statement_interruptible(self._interrupt):
            return self._cursor.executemany(*args, **kwargs)

    def fetchmany(self, *args: Any, **kwargs: Any) -> Any:
        with statement_interruptible(self._interrupt):
            return self._cursor.fetchmany(*args, **kwargs)

    def fetchall(self) -> Any:
        with statement_interruptible(self._interrupt):
            return self._cursor.fetchall()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cursor, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._cursor, name, value)


@contextmanager
def warehouse_connection(engine: sa.Engine) -> Iterator[sa.Connection]:
    """Connect, turning an unreachable warehouse into a WarehouseError that says what to check."""
    try:
        connection = engine.connect()
    except sa.exc.DBAPIError as error:
        raise WarehouseError(
            f"cannot connect to the warehouse `{redact_url(engine.url)}`: "
            f"{first_line(error)}; check [warehouse] url, the network and the credentials"
        ) from None
    try:
        yield connection
    finally:
        connection.close()


def stream_rows(
    connection: sa.Connection, query: sa.Executable, *, chunk_size: int
) -> tuple[Sequence[str], Iterator[Sequence[sa.Row[Any]]]]:
    """Execute with a server-side cursor; return the column names and an iterator of chunks.

    `stream_results` + `partitions` keep memory flat whatever the segment size (duckdb-engine
    ignores `yield_per` for text queries).
    """
    result = connection.execute(query, execution_options={"stream_results": True})
    return list(result.keys()), result.partitions(chunk_size)
