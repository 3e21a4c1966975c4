"""The state store's schema: created on first use with its version, refused when newer."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa

from connector.errors import StateError
from connector.state import SCHEMA_VERSION, StateStore, schema_info, snapshot


def test_a_new_store_has_the_current_schema(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'state.db'}"
    StateStore(url).dispose()
    StateStore(url).dispose()  # opening again changes nothing
    engine = sa.create_engine(url)
    with engine.connect() as connection:
        assert connection.execute(sa.select(schema_info.c.version)).scalar_one() == SCHEMA_VERSION
    engine.dispose()


def test_a_store_from_a_newer_winback_is_refused(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'state.db'}"
    StateStore(url).dispose()
    engine = sa.create_engine(url)
    with engine.begin() as connection:
        connection.execute(schema_info.update().values(version=SCHEMA_VERSION + 1))
    engine.dispose()
    with pytest.raises(StateError, match="newer than this winback"):
        StateStore(url)


V1_TABLES = (
    "CREATE TABLE winback_schema (version INTEGER NOT NULL)",
    "CREATE TABLE snapshot (sync VARCHAR(200) NOT NULL, key VARCHAR(500) NOT NULL, "
    "status VARCHAR(16) NOT NULL, raw_fp VARCHAR(40) NOT NULL, identity_fp VARCHAR(40) NOT NULL, "
    "fields_fp VARCHAR(40) NOT NULL, identifiers TEXT NOT NULL, platform_id VARCHAR(200), "
    "first_added_at TIMESTAMP, last_sent_at TIMESTAMP, PRIMARY KEY (sync, key))",
    "INSERT INTO winback_schema (version) VALUES (1)",
    "INSERT INTO snapshot VALUES ('s', '1', 'member', 'r', 'i', 'f', '{\"email\": \"a@b.co\"}', "
    "NULL, NULL, NULL)",
)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def v1_store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A store as winback with schema version 1 left it, holding one member."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'state.db'}"
    else:
        url = str(request.getfixturevalue("postgres_url"))
    engine = sa.create_engine(url)
    with engine.begin() as connection:
        for statement in V1_TABLES:
            connection.exec_driver_sql(statement)
    engine.dispose()
    return url


def test_a_version_1_store_is_migrated_in_place(v1_store_url: str) -> None:
    store = StateStore(v1_store_url)
    try:
        with store.engine.connect() as connection:
            version = connection.execute(sa.select(schema_info.c.version)).scalar_one()
            member = connection.execute(
                sa.select(snapshot.c.key, snapshot.c.status, snapshot.c.reason)
            ).one()
            indexes = {i["name"] for i in sa.inspect(connection).get_indexes("snapshot")}
        assert version == SCHEMA_VERSION == 2
        assert tuple(member) == ("1", "member", None)
        assert "snapshot_skipped" in indexes
        assert store.audience_size(None, "s") == 1
    finally:
        store.dispose()
    StateStore(v1_store_url).dispose()  # opening again changes nothing
