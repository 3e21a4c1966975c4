"""Where a sync's members went (`sync_targets`): a sync pointed elsewhere must start over."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from connector.state import StateStore, insert_rows, snapshot

OLD, NEW = "webhook audience 'a'", "webhook audience 'b'"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[StateStore]:
    store = StateStore(f"sqlite:///{tmp_path / 'state.db'}")
    yield store
    store.dispose()


def test_a_new_target_is_refused_while_the_old_one_may_have_members(store: StateStore) -> None:
    with store.engine.begin() as connection:
        assert store.check_target(connection, "s", OLD) is None
        # Only a batch sent without an answer (a first sync killed): the old audience may
        # have those members.
        StateStore.record_in_flight(
            connection,
            sync="s",
            run_id="r1",
            batch=1,
            action="add",
            members=[("k1", "id1", '{"email":"a@example.com"}', None)],
        )
        assert store.check_target(connection, "s", NEW) == OLD


def test_a_new_target_decides_again_the_rows_refused_or_skipped_for_the_old_one(
    store: StateStore,
) -> None:
    with store.engine.begin() as connection:
        assert store.check_target(connection, "s", OLD) is None
        rows = [
            ("s", key, status, "fp", "id", "", "{}", None, None, None, None)
            for key, status in (("k1", "rejected"), ("k2", "skipped"))
        ]
        insert_rows(connection, snapshot, rows)
        assert store.check_target(connection, "s", NEW) is None
        assert connection.execute(sa.select(snapshot.c.key)).scalars().all() == []
        assert store.check_target(connection, "s", NEW) is None
