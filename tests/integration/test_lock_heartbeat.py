"""A running sync keeps its lock's heartbeat fresh even while no batch is checkpointed (a long
segment query or plan), so a run on another host does not take the lock over (LOCK_TTL)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from connector.state import StateStore, locks


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> StateStore:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'state.db'}"
    else:
        url = str(request.getfixturevalue("postgres_url"))
    return StateStore(url)


def heartbeat_at(store: StateStore) -> object:
    with store.engine.connect() as connection:
        return connection.execute(sa.select(locks.c.heartbeat_at)).scalar_one()


def test_the_lock_is_kept_alive_while_the_run_is_busy_elsewhere(store: StateStore) -> None:
    try:
        store.acquire_lock("s", "run-1")
        taken = heartbeat_at(store)
        with store.lock_kept_alive("s", "run-1", every_s=0.05):
            time.sleep(0.4)  # a segment query that checkpoints nothing
        refreshed = heartbeat_at(store)
        assert refreshed > taken  # type: ignore[operator]
        time.sleep(0.2)
        assert heartbeat_at(store) == refreshed  # the thread stopped with the block
    finally:
        store.dispose()
