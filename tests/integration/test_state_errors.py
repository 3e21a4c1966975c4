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
from pathlib import Path

import pytest
import sqlalchemy as sa

from connector.errors import StateError
from connector.state import StateStore, snapshot
from tests.helpers import CliResult, prepared_database, run_cli


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
