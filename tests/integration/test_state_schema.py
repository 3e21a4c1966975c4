"""The state store's schema: created on first use with its version, refused when newer."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa

from connector.errors import StateError
from connector.state import SCHEMA_VERSION, StateStore, schema_info


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
