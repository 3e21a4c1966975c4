"""Fixtures shared by the integration tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa


@pytest.fixture(params=["duckdb", "sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def empty_warehouse(request: pytest.FixtureRequest) -> Iterator[sa.Engine]:
    """An empty warehouse of each kind: in-memory DuckDB and SQLite, a fresh PostgreSQL database."""
    if request.param == "duckdb":
        url = "duckdb:///:memory:"
    elif request.param == "sqlite":
        url = "sqlite://"
    else:
        url = request.getfixturevalue("postgres_url")
    created = sa.create_engine(url)
    yield created
    created.dispose()
