"""Opening the state store: runs starting together on a new PostgreSQL database all find one
schema, and commands that only read never create or migrate anything, on any database."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from connector.errors import StateError
from connector.state import SCHEMA_VERSION, StateStore, schema_info
from tests.integration.test_state_schema import V1_TABLES


def table_names(url: str) -> set[str]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as connection:
            return set(sa.inspect(connection).get_table_names())
    finally:
        engine.dispose()


@pytest.fixture
def fresh_postgres_urls(postgres_admin_engine: sa.Engine) -> Iterator[list[str]]:
    """Three brand-new, empty PostgreSQL databases."""
    names = [f"wb_{uuid.uuid4().hex[:12]}" for _ in range(3)]
    with postgres_admin_engine.connect() as connection:
        for name in names:
            connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
    yield [
        postgres_admin_engine.url.set(database=name).render_as_string(hide_password=False)
        for name in names
    ]
    with postgres_admin_engine.connect() as connection:
        for name in names:
            connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def open_together(url: str, count: int) -> list[BaseException]:
    """Open the store from `count` threads at the same moment; what they raised."""
    start = threading.Barrier(count)
    failures: list[BaseException] = []

    def open_store() -> None:
        start.wait()
        try:
            StateStore(url).dispose()
        except BaseException as error:
            failures.append(error)

    threads = [threading.Thread(target=open_store) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return failures


@pytest.mark.postgres
def test_stores_opened_together_on_a_new_postgres_database_share_one_schema(
    fresh_postgres_urls: list[str],
) -> None:
    for url in fresh_postgres_urls:
        assert open_together(url, 6) == []
        engine = sa.create_engine(url)
        with engine.connect() as connection:
            versions = connection.execute(sa.select(schema_info.c.version)).scalars().all()
        engine.dispose()
        assert versions == [SCHEMA_VERSION]


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def empty_database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An existing database without any table."""
    if request.param == "sqlite":
        path = tmp_path / "state.db"
        engine = sa.create_engine(f"sqlite:///{path}")
        with engine.connect() as connection:
            connection.exec_driver_sql("VACUUM")  # the file exists, empty
        engine.dispose()
        assert path.exists()
        return f"sqlite:///{path}"
    url: str = request.getfixturevalue("postgres_url")
    return url


def test_reading_an_empty_database_creates_nothing(empty_database_url: str) -> None:
    store = StateStore.for_reading(empty_database_url)
    try:
        assert store.history("s", 10) == []
        assert store.audience_size(None, "s") == 0
    finally:
        store.dispose()
    assert table_names(empty_database_url) == set()


def test_reading_a_store_reads_it_and_changes_nothing(empty_database_url: str) -> None:
    StateStore(empty_database_url).dispose()
    writer = StateStore(empty_database_url)
    writer.start_run("s", "run-1")
    writer.dispose()
    before = table_names(empty_database_url)
    store = StateStore.for_reading(empty_database_url)
    try:
        assert [row.run_id for row in store.history("s", 10)] == ["run-1"]
    finally:
        store.dispose()
    assert table_names(empty_database_url) == before


def test_reading_an_older_store_does_not_migrate_it(empty_database_url: str) -> None:
    engine = sa.create_engine(empty_database_url)
    with engine.begin() as connection:
        for statement in V1_TABLES:
            connection.exec_driver_sql(statement)
    engine.dispose()
    with pytest.raises(StateError, match=r"schema version 1, older .*`winback sync run` upgrades"):
        StateStore.for_reading(empty_database_url)
    assert table_names(empty_database_url) == {"winback_schema", "snapshot"}


def test_a_new_sqlite_store_is_readable_by_its_owner_only(tmp_path: Path) -> None:
    """It holds customers' emails and phones: a new folder is 0700, a new file 0600 (and so
    are SQLite's -wal and -shm files, which take the database file's permissions)."""
    database = tmp_path / "new" / ".winback" / "state.db"
    store = StateStore(f"sqlite:///{database}")
    try:
        with store.engine.begin() as connection:  # a write: the -wal file exists meanwhile
            connection.execute(schema_info.update().values(version=SCHEMA_VERSION))
            for path in database.parent.iterdir():
                assert path.stat().st_mode & 0o777 == 0o600, path
    finally:
        store.dispose()
    assert database.parent.stat().st_mode & 0o777 == 0o700
    assert database.stat().st_mode & 0o777 == 0o600


def test_an_existing_folder_keeps_its_permissions(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    StateStore(f"sqlite:///{shared / 'state.db'}").dispose()
    assert shared.stat().st_mode & 0o777 == 0o755
