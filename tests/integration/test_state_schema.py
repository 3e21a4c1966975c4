"""The state store's schema: created on first use, migrated in place, refused when newer."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa

from connector.errors import StateError
from connector.state import SCHEMA_VERSION, StateStore, metadata, schema_info, snapshot


def version_one_store(path: Path) -> str:
    """A state store as the first schema version left it: no identity index."""
    url = f"sqlite:///{path}"
    engine = sa.create_engine(url)
    with engine.begin() as connection:
        metadata.create_all(connection)
        connection.execute(sa.text("DROP INDEX snapshot_identity"))
        connection.execute(schema_info.insert().values(version=1))
        connection.execute(
            snapshot.insert().values(
                sync="s",
                key="k1",
                status="member",
                raw_fp="r",
                identity_fp="i",
                fields_fp="f",
                identifiers="{}",
            )
        )
    engine.dispose()
    return url


def index_names(url: str) -> set[str]:
    engine = sa.create_engine(url)
    try:
        return {index["name"] for index in sa.inspect(engine).get_indexes("snapshot")}
    finally:
        engine.dispose()


def test_a_version_one_store_is_migrated_in_place(tmp_path: Path) -> None:
    url = version_one_store(tmp_path / "state.db")
    assert "snapshot_identity" not in index_names(url)
    store = StateStore(url)
    try:
        with store.connect() as connection:
            assert connection.execute(sa.select(schema_info.c.version)).scalar_one() == 2
        assert store.audience_size(None, "s") == 1  # the snapshot is kept
    finally:
        store.dispose()
    assert "snapshot_identity" in index_names(url)
    StateStore(url).dispose()  # opening again is a no-op


def test_a_new_store_has_the_current_schema(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'state.db'}"
    StateStore(url).dispose()
    assert "snapshot_identity" in index_names(url)
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
