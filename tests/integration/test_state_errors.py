"""A state store winback cannot use is refused when it is opened, in one paragraph naming
`[state] url`, the path and what to do: a file where a folder should be, a folder it may not
create, a folder where the file should be, another application's tables of the same names.

Each case uses real files (and a real PostgreSQL database where marked); the CLI cases run
`winback` as a process and check exit code 1 and that no traceback is printed.
"""

from __future__ import annotations

import os
import re
import sqlite3
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy as sa

from connector.errors import StateError
from connector.state import PERMISSION_HINT, StateStore, snapshot, state_failure
from destinations.testing.http_server import FakeHttpServer, RecordedRequest, ScriptedResponse
from tests.fakes.webhook_receiver import WebhookReceiver
from tests.helpers import SECRET, CliResult, prepared_database, run_cli, webhook_project


def open_fails(url: str) -> str:
    with pytest.raises(StateError) as caught:
        StateStore(url)
    message = str(caught.value)
    assert "[state] url" in message
    assert "\n" not in message
    return message


def test_reading_commands_report_a_url_that_is_not_one() -> None:
    with pytest.raises(StateError, match=r"cannot use state URL .*check \[state\] url"):
        StateStore.for_reading("not a url")


# -- the SQLite file and its folder ------------------------------------------------------------


def test_a_file_in_place_of_the_folder_is_named(tmp_path: Path) -> None:
    (tmp_path / "taken").write_text("not a folder")
    for database in (tmp_path / "taken" / "state.db", tmp_path / "taken" / "sub" / "state.db"):
        message = open_fails(f"sqlite:///{database}")
        assert f"`{database}`" in message
        assert f"`{tmp_path / 'taken'}` is a file, not a folder" in message
        assert "pick another path in [state] url" in message
    assert (tmp_path / "taken").read_text() == "not a folder"


@pytest.mark.skipif(not Path("/sys/kernel").is_dir(), reason="needs Linux sysfs")
def test_a_folder_that_may_not_be_created_is_named() -> None:
    """Nobody, root included, may create a folder in sysfs."""
    message = open_fails("sqlite:////sys/winback-state-test/state.db")
    assert "cannot create the folder `/sys/winback-state-test`" in message
    assert "permission denied" in message
    assert "fix the permissions" in message


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root may write anywhere")
def test_a_read_only_parent_folder_is_named(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        message = open_fails(f"sqlite:///{locked / 'winback' / 'state.db'}")
    finally:
        locked.chmod(0o700)
    assert f"cannot create the folder `{locked / 'winback'}`" in message
    assert "permission denied" in message


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux procfs")
def test_a_folder_that_cannot_exist_is_named() -> None:
    message = open_fails("sqlite:////proc/winback-state-test/state.db")
    assert "cannot create the folder `/proc/winback-state-test`" in message
    assert "No such file or directory" in message
    assert "pick another path in [state] url" in message


def test_a_folder_in_place_of_the_file_is_named(tmp_path: Path) -> None:
    message = open_fails(f"sqlite:///{tmp_path}")
    assert f"`{tmp_path}` ([state] url) is a folder" in message
    assert f"sqlite:///{tmp_path / 'state.db'}" in message


# -- another application's database ------------------------------------------------------------


FOREIGN_TABLES = (
    "CREATE TABLE runs (id INTEGER PRIMARY KEY, pipeline TEXT, started TIMESTAMP)",
    "CREATE TABLE snapshot (id INTEGER, taken_at TIMESTAMP, payload TEXT)",
    "INSERT INTO runs (id, pipeline) VALUES (1, 'nightly')",
)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def foreign_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A database of another application with its own `runs` and `snapshot` tables."""
    return prepared_database(request, tmp_path, "other-app.db", FOREIGN_TABLES)


def table_names(url: str) -> set[str]:
    engine = sa.create_engine(url)
    try:
        return set(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_another_applications_tables_are_refused_untouched(foreign_url: str) -> None:
    message = open_fails(foreign_url)
    shown = sa.engine.make_url(foreign_url).render_as_string(hide_password=True)
    assert f"`{shown}`" in message
    assert "is not a winback database" in message
    assert "table `runs` has no column `run_id`, `sync`, `status` and 15 more" in message
    assert "table `snapshot` has no column `sync`, `key`, `status` and 8 more" in message
    assert "point [state] url at winback's own database" in message
    assert "SELECT" not in message and "sqlalche.me" not in message
    # Nothing was created in that database.
    assert table_names(foreign_url) == {"runs", "snapshot"}


def test_a_database_shared_with_other_tables_of_other_names_is_fine(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    with sqlite3.connect(tmp_path / "shared.db") as db:
        db.execute("CREATE TABLE customers (id INTEGER, email TEXT)")
    StateStore(url).dispose()
    StateStore(url).dispose()
    assert {"customers", "runs", "snapshot", "winback_schema"} <= table_names(url)


def test_a_store_missing_a_column_of_its_version_is_refused(tmp_path: Path) -> None:
    """A version 2 store must have `snapshot.reason` (version 1 stores get it by migration)."""
    url = f"sqlite:///{tmp_path / 'state.db'}"
    StateStore(url).dispose()
    with sqlite3.connect(tmp_path / "state.db") as db:
        db.execute(f"ALTER TABLE {snapshot.name} DROP COLUMN reason")
    message = open_fails(url)
    assert "table `snapshot` has no column `reason`" in message


# -- through the CLI ---------------------------------------------------------------------------


CONFIG = """\
[state]
url = "{state_url}"

[segments.lapsed]
key = "customer_id"
sql = "SELECT customer_id, email FROM customers"

[destinations.export]
type = "file"

[syncs.s]
segment = "lapsed"
destination = "export"
identifiers = {{ email = "email" }}
"""


def one_paragraph(result: CliResult, *fragments: str) -> str:
    """Exit 1; stderr is one `error:` paragraph holding every fragment; no traceback."""
    assert result.returncode == 1, result
    stderr = result.stderr.strip()
    assert len(re.findall(r"(?m)^error:", stderr)) == 1, result
    assert "\n" not in stderr, result
    assert "Traceback" not in result.stdout + result.stderr, result
    assert "unexpected" not in stderr, result
    for fragment in fragments:
        assert fragment in stderr, (fragment, result)
    return stderr


def test_the_cli_reports_unusable_state_stores_in_one_paragraph(tmp_path: Path) -> None:
    (tmp_path / "taken").write_text("not a folder")
    with sqlite3.connect(tmp_path / "other-app.db") as db:
        for statement in FOREIGN_TABLES:
            db.execute(statement)
    cases = {
        "sqlite:///taken/state.db": [f"`{tmp_path / 'taken'}` is a file, not a folder"],
        "sqlite:///other-app.db": [
            f"{tmp_path / 'other-app.db'}",
            "is not a winback database",
            "table `runs` has no column `run_id`",
        ],
    }
    for state_url, fragments in cases.items():
        (tmp_path / "winback.toml").write_text(CONFIG.format(state_url=state_url))
        status = run_cli("sync", "status", cwd=tmp_path)
        one_paragraph(status, "[state] url", *fragments)
    if Path("/sys/kernel").is_dir():  # found when the store is created: by a run, not `status`
        sys_url = "sqlite:////sys/winback-state-test/state.db"
        (tmp_path / "winback.toml").write_text(CONFIG.format(state_url=sys_url))
        one_paragraph(run_cli("sync", "run", cwd=tmp_path), "[state] url", "permission denied")
    # A run says the same, in its JSON too, and writes nothing into the other database.
    (tmp_path / "winback.toml").write_text(CONFIG.format(state_url="sqlite:///other-app.db"))
    run = run_cli("sync", "run", "--output", "json", cwd=tmp_path)
    assert run.returncode == 1, run
    assert "Traceback" not in run.stdout + run.stderr
    assert run.json()["runs"] == []  # one error for the command, not one per sync
    assert "is not a winback database" in run.json()["error"]
    assert table_names("sqlite:///" + str(tmp_path / "other-app.db")) == {"runs", "snapshot"}


# -- a state role that may not write: named, with the grants to give, no customer data ---------


@pytest.fixture
def state_role(postgres_url: str, postgres_admin_engine: sa.Engine) -> Iterator[RestrictedRole]:
    """A PostgreSQL login role on the `postgres_url` database, dropped after the test."""
    name = f"wb_role_{uuid.uuid4().hex[:8]}"
    password = f"pw{uuid.uuid4().hex[:12]}"
    with postgres_admin_engine.connect() as connection:
        connection.execute(sa.text(f"CREATE ROLE {name} LOGIN PASSWORD '{password}'"))
    url = sa.engine.make_url(postgres_url).set(username=name, password=password)
    admin = sa.create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    try:
        yield RestrictedRole(name, url.render_as_string(hide_password=False), admin)
    finally:
        with admin.connect() as connection:
            connection.execute(
                sa.text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = :n"
                ),
                {"n": name},
            )
            connection.execute(sa.text(f"DROP OWNED BY {name}"))
        admin.dispose()
        with postgres_admin_engine.connect() as connection:
            connection.execute(sa.text(f"DROP ROLE {name}"))


@dataclass
class RestrictedRole:
    name: str
    url: str
    admin: sa.Engine

    def grant(self, *statements: str) -> None:
        with self.admin.connect() as connection:
            for statement in statements:
                connection.execute(sa.text(statement.format(role=self.name)))

    def tables(self) -> list[str]:
        with self.admin.connect() as connection:
            return list(
                connection.execute(
                    sa.text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
                ).scalars()
            )


def role_project(folder: Path, receiver_url: str, state_url: str) -> None:
    (folder / "winback.toml").unlink(missing_ok=True)
    webhook_project(folder, receiver_url, customers=30, state_url=state_url)


def refused_run(folder: Path, state_role: RestrictedRole) -> CliResult:
    """`sync run --output json` as `state_role`, which the state store refuses: exit 1,
    nothing sent."""
    with WebhookReceiver(secret=SECRET) as receiver:
        role_project(folder, receiver.url, state_role.url)
        result = run_cli("sync", "run", "--output", "json", cwd=folder)
        assert not receiver.requests
    assert result.returncode == 1, result
    return result


def assert_no_statement_or_customer_data(*texts: str) -> None:
    for text in texts:
        assert "[SQL:" not in text and "parameters" not in text, text
        assert "@example.com" not in text, text
        assert "Background on this error" not in text, text


@pytest.mark.postgres
def test_a_state_role_without_temporary_tables_is_told_to_grant_them(
    tmp_path: Path, postgres_url: str, state_role: RestrictedRole
) -> None:
    """Every grant but TEMPORARY (PostgreSQL gives it to PUBLIC by default)."""
    StateStore(postgres_url).dispose()
    database = sa.engine.make_url(postgres_url).database
    state_role.grant(
        f'REVOKE TEMPORARY ON DATABASE "{database}" FROM PUBLIC',
        "GRANT USAGE ON SCHEMA public TO {role}",
        "GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role}",
        "GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {role}",
    )
    error = refused_run(tmp_path, state_role).run()["error"]
    assert "permission denied to create temporary tables" in error, error
    assert "grant the state role TEMPORARY on the state database" in error, error


@pytest.mark.postgres
def test_a_statement_timeout_of_the_state_database_is_named(postgres_url: str) -> None:
    engine = sa.create_engine(postgres_url)
    try:
        with engine.connect() as connection, pytest.raises(sa.exc.DBAPIError) as caught:
            connection.execute(sa.text("SET statement_timeout = 10"))
            connection.execute(sa.text("SELECT pg_sleep(5)"))
    finally:
        engine.dispose()
    message = str(state_failure(postgres_url, caught.value))
    assert "canceling statement due to statement timeout" in message
    assert "raise it for the role running winback" in message
    assert "the next run sends what this one could not record" in message


@pytest.mark.postgres
def test_a_select_only_state_role_is_told_which_grants_it_needs(
    tmp_path: Path, postgres_url: str, state_role: RestrictedRole
) -> None:
    StateStore(postgres_url).dispose()  # the tables, created by their owner
    state_role.grant(
        "GRANT USAGE ON SCHEMA public TO {role}",
        "GRANT SELECT ON ALL TABLES IN SCHEMA public TO {role}",
    )
    result = refused_run(tmp_path, state_role)
    error = result.run()["error"]
    assert error.startswith("the state store `postgresql"), error
    assert "permission denied for table locks" in error
    assert PERMISSION_HINT in error
    assert "Traceback" not in result.stderr
    assert PERMISSION_HINT in result.stderr
    assert_no_statement_or_customer_data(result.stdout, result.stderr)


@pytest.mark.postgres
def test_a_state_write_refused_mid_run_shows_no_statement_and_no_customer_data(
    tmp_path: Path, postgres_url: str, state_role: RestrictedRole
) -> None:
    """Every table may be written but `in_flight`: the run fails when it notes the first batch
    (whose members, emails included, are that statement's parameters) and records why."""
    StateStore(postgres_url).dispose()
    writable = [table for table in state_role.tables() if table != "in_flight"]
    state_role.grant(
        "GRANT USAGE ON SCHEMA public TO {role}",
        "GRANT SELECT ON ALL TABLES IN SCHEMA public TO {role}",
        *(f"GRANT INSERT, UPDATE, DELETE ON {table} TO {{role}}" for table in writable),
        "GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {role}",
    )
    with WebhookReceiver(secret=SECRET) as receiver:
        role_project(tmp_path, receiver.url, state_role.url)
        result = run_cli("sync", "run", "--output", "json", cwd=tmp_path)
        verbose = run_cli("-vv", "sync", "run", "--output", "json", cwd=tmp_path)
    assert result.returncode == 1, result
    error = result.run()["error"]
    assert "the state store `postgresql" in error
    assert "permission denied for table in_flight" in error
    assert PERMISSION_HINT in error
    with state_role.admin.connect() as connection:
        stored = connection.execute(sa.text("SELECT error FROM runs")).scalars().all()
    assert stored and all(PERMISSION_HINT in text for text in stored)
    assert_no_statement_or_customer_data(result.stdout, result.stderr, *stored)
    assert "@example.com" not in verbose.stdout + verbose.stderr  # the -vv traceback too


def test_a_state_store_lost_during_a_run_still_gets_every_run_reported(tmp_path: Path) -> None:
    """The state store goes away while the first sync sends (its `runs` table renamed by the
    receiver, as a dropped database would fail): that run cannot be recorded at its end. The
    JSON document still holds it, and the second sync's run, with exit code 1."""
    state = tmp_path / ".winback" / "state.db"

    def lose_the_runs_table(_request: RecordedRequest) -> ScriptedResponse:
        with sqlite3.connect(state) as connection:
            connection.execute("ALTER TABLE runs RENAME TO runs_lost")
        connection.close()
        return ScriptedResponse(200, b"{}")

    with FakeHttpServer(lose_the_runs_table) as server:
        webhook_project(tmp_path, server.url + "/hook", customers=5)
        config = tmp_path / "winback.toml"
        config.write_text(
            config.read_text() + '\n[syncs.t]\nsegment = "lapsed"\ndestination = "hook"\n'
            'identifiers = { email = "email" }\n'
        )
        result = run_cli("sync", "run", "--output", "json", cwd=tmp_path)
    assert result.returncode == 1, result
    document = result.json()
    assert document["exit_code"] == 1
    assert [(run["sync"], run["status"]) for run in document["runs"]] == [
        ("s", "failed"),
        ("t", "failed"),
    ]
    for run in document["runs"]:
        assert run["error"].startswith("the state store `sqlite:"), run
        assert run["error"].count("no such table: runs") == 1, run
    assert "Traceback" not in result.stderr
