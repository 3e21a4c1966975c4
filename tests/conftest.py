"""Shared fixtures: real PostgreSQL databases, DuckDB/SQLite files, isolated environments."""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

POSTGRES_ENV = "WINBACK_TEST_POSTGRES_URL"


def _postgres_admin_url() -> str | None:
    return os.environ.get(POSTGRES_ENV)


def _unavailable(reason: str) -> None:
    """Skip locally; fail in CI, where PostgreSQL must be there."""
    if os.environ.get("CI"):
        pytest.fail(f"PostgreSQL is required in CI: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def postgres_admin_engine() -> Iterator[sa.Engine]:
    url = _postgres_admin_url()
    if not url:
        _unavailable(f"{POSTGRES_ENV} is not set (e.g. postgresql+psycopg://user:pw@127.0.0.1/db)")
    assert url is not None
    engine = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as connection:
            connection.execute(sa.text("SELECT 1"))
    except sa.exc.OperationalError as error:
        _unavailable(f"cannot connect to PostgreSQL at {POSTGRES_ENV}: {error.orig}")
    yield engine
    engine.dispose()


@pytest.fixture
def postgres_url(postgres_admin_engine: sa.Engine) -> Iterator[str]:
    """URL of a brand-new, empty PostgreSQL database, dropped after the test."""
    name = f"wb_{uuid.uuid4().hex[:12]}"
    with postgres_admin_engine.connect() as connection:
        connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = postgres_admin_engine.url.set(database=name)
    yield url.render_as_string(hide_password=False)
    with postgres_admin_engine.connect() as connection:
        connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def state_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A state store of each kind: a SQLite file in `tmp_path`, a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state.db'}"
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
def live_pid() -> Iterator[int]:
    """The pid of a live process that is no winback run (what a reused pid points at)."""
    process = subprocess.Popen(["sleep", "600"])
    try:
        yield process.pid
    finally:
        process.kill()
        process.wait()


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never read a user's config or send traffic through a proxy."""
    monkeypatch.delenv("WINBACK_CONFIG", raising=False)
    for proxy in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY"):
        monkeypatch.delenv(proxy, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
