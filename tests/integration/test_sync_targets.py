"""Where a sync's members went (`sync_targets`): a sync pointed elsewhere must start over."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa

from connector.state import StateStore, insert_rows, snapshot


def test_a_new_target_is_refused_while_the_old_one_has_or_may_have_members(
    tmp_path: Path,
) -> None:
    store = StateStore(f"sqlite:///{tmp_path / 'state.db'}")
    try:
        with store.engine.begin() as connection:
            assert store.check_target(connection, "s", "webhook audience 'a'") is None
            # Only a batch sent without an answer (a first sync killed): the old audience
            # may have those members.
            StateStore.record_in_flight(
                connection,
                sync="s",
                run_id="r1",
                batch=1,
                action="add",
                members=[("k1", "id1", '{"email":"a@example.com"}', None)],
            )
            refused = store.check_target(connection, "s", "webhook audience 'b'")
            assert refused == "webhook audience 'a'"
    finally:
        store.dispose()


def test_a_new_target_decides_again_the_rows_refused_or_skipped_for_the_old_one(
    tmp_path: Path,
) -> None:
    store = StateStore(f"sqlite:///{tmp_path / 'state.db'}")
    try:
        with store.engine.begin() as connection:
            assert store.check_target(connection, "s", "webhook audience 'a'") is None
            rows = [
                ("s", key, status, "fp", "id", "", "{}", None, None, None, None)
                for key, status in (("k1", "rejected"), ("k2", "skipped"))
            ]
            insert_rows(connection, snapshot, rows)
            assert store.check_target(connection, "s", "webhook audience 'b'") is None
            left = connection.execute(sa.select(snapshot.c.key)).scalars().all()
            assert left == []
            assert store.check_target(connection, "s", "webhook audience 'b'") is None
    finally:
        store.dispose()
