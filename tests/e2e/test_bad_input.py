"""Bad input through the real CLI: one clear paragraph, the documented exit code, no traceback,
no lost state and no leaked secret.

A module-wide project is synced once to the fake webhook receiver; each case then runs the CLI
with a broken copy of its config (`--config bad.toml`, same folder, same state store) and checks
the message names the file, key or row and says what to do, and that the snapshot is untouched.
"""

from __future__ import annotations

import re
import socket
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from destinations.testing.http_server import FakeHttpServer, RecordedRequest, ScriptedResponse
from tests.fakes.webhook_receiver import WebhookReceiver
from tests.helpers import (
    SECRET,
    SECRET_ENV,
    CliResult,
    database_dump,
    run_cli,
    segment_members,
    sqlite_rows,
    state_db,
    warehouse_sql,
    webhook_project,
)

WAREHOUSE_PASSWORD = "pw-Warehouse-s3cret"


@dataclass
class Project:
    folder: Path
    config: str
    receiver: WebhookReceiver

    def bad_config(self, old: str, new: str) -> str:
        assert old in self.config, old
        return self.config.replace(old, new, 1)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Project]:
    folder = tmp_path_factory.mktemp("bad-input")
    with WebhookReceiver(secret=SECRET) as receiver:
        path = webhook_project(folder, receiver.url, customers=20)
        synced = run_cli("sync", "run", cwd=folder)
        assert synced.returncode == 0, synced
        yield Project(folder, path.read_text(encoding="utf-8"), receiver)


@pytest.fixture
def unchanged_state(project: Project) -> Iterator[None]:
    """Whatever the case does, the snapshot stays as the good run left it."""
    before = snapshot_rows(project.folder)
    requests = len(project.receiver.requests)
    yield
    assert snapshot_rows(project.folder) == before
    assert len(project.receiver.requests) == requests


def snapshot_rows(folder: Path) -> list[tuple[object, ...]]:
    return sqlite_rows(state_db(folder), "SELECT * FROM snapshot ORDER BY sync, key")


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def run_bad(
    project: Project, text: str, *args: str, env: dict[str, str] | None = None
) -> CliResult:
    (project.folder / "bad.toml").write_text(text, encoding="utf-8")
    return run_cli("--config", "bad.toml", *args, cwd=project.folder, env=env)


def assert_one_paragraph(result: CliResult, code: int, *fragments: str) -> str:
    """Exit `code`; stderr ends with one `error:` paragraph holding every fragment (log lines
    such as warnings may come before it); no traceback, no secret."""
    assert result.returncode == code, result
    stderr = result.stderr.strip()
    starts = [m.start() for m in re.finditer(r"(?m)^error:", stderr)]
    assert len(starts) == 1, result
    message = stderr[starts[0] :]
    assert "\n\n" not in message, result
    assert "Traceback" not in result.stderr + result.stdout, result
    for fragment in fragments:
        assert fragment in message, (fragment, result)
    assert SECRET not in result.stdout + result.stderr
    return message


# -- configuration errors: exit 2, nothing ran --------------------------------------------------


CONFIG_CASES = {
    "malformed-toml": (
        ('audience = "winback-e2e"', 'audience = "winback-e2e'),
        ["bad.toml", "not valid TOML", "line {audience_line}"],
    ),
    "unknown-key": (
        ('audience = "winback-e2e"', 'audience = "winback-e2e"\nmodee = "mirror"'),
        ["bad.toml", "syncs.s.modee", "unknown key", "spelling"],
    ),
    "wrong-type": (
        ('audience = "winback-e2e"', 'audience = "winback-e2e"\nmax_removal_pct = "lots"'),
        ["bad.toml", "syncs.s.max_removal_pct", "number"],
    ),
    "wrong-mode": (
        ('audience = "winback-e2e"', 'audience = "winback-e2e"\nmode = "mirrror"'),
        ["bad.toml", "syncs.s.mode", "mirror", "add_only", "upsert"],
    ),
    "missing-segment": (
        ('segment = "lapsed"', 'segment = "lapsd"'),
        ["bad.toml", "syncs.s.segment", "`lapsd` is not defined", "defined: lapsed"],
    ),
    "missing-destination": (
        ('destination = "hook"', 'destination = "hok"'),
        ["bad.toml", "syncs.s.destination", "`hok` is not defined", "defined: hook"],
    ),
    "unset-env-var": (
        (SECRET_ENV, "WINBACK_E2E_UNSET_VARIABLE"),
        [
            "bad.toml",
            "destinations.hook.secret",
            "`WINBACK_E2E_UNSET_VARIABLE` is not set",
            "export",
        ],
    ),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
@pytest.mark.usefixtures("unchanged_state")
def test_config_errors(project: Project, case: str) -> None:
    (old, new), fragments = CONFIG_CASES[case]
    audience_line = project.config.splitlines().index('audience = "winback-e2e"') + 1
    fragments = [f.format(audience_line=audience_line) for f in fragments]
    before = database_dump(state_db(project.folder))
    result = run_bad(project, project.bad_config(old, new), "sync", "run", "--output", "json")
    assert_one_paragraph(result, 2, *fragments)
    document = result.json()  # nothing ran; the JSON says why too
    assert (document["runs"], document["exit_code"]) == ([], 2)
    assert all(fragment in document["error"] for fragment in fragments), document
    assert database_dump(state_db(project.folder)) == before  # nothing ran, nothing recorded


def test_config_error_traceback_only_with_v(project: Project) -> None:
    text = project.bad_config('audience = "winback-e2e"', 'audience = "winback-e2e"\nmodee = 1')
    result = run_bad(project, text, "-v", "sync", "run")
    assert result.returncode == 2, result
    assert "Traceback" in result.stderr
    assert "syncs.s.modee" in result.stderr


@pytest.mark.usefixtures("unchanged_state")
def test_usage_errors(project: Project) -> None:
    before = database_dump(state_db(project.folder))
    as_of = run_bad(project, project.config, "sync", "run", "--as-of", "notadate")
    assert_one_paragraph(as_of, 2, "--as-of", "`notadate`", "YYYY-MM-DD")
    unknown = run_bad(project, project.config, "sync", "run", "nosuch", "--output", "json")
    assert_one_paragraph(unknown, 2, "unknown sync `nosuch`", "defined: s")
    assert unknown.json() == {
        "runs": [],
        "exit_code": 2,
        "error": "unknown sync `nosuch`; defined: s",
    }
    # Click refuses the command line itself: its message on stderr, the document on stdout.
    for option in (["--output", "json"], ["-o", "json"], ["--output=json"]):
        bad_option = run_bad(project, project.config, "sync", "plan", "--bogus", *option)
        assert bad_option.returncode == 2 and "No such option: --bogus" in bad_option.stderr
        assert bad_option.json()["runs"] == [] and bad_option.json()["exit_code"] == 2
        assert bad_option.json()["error"].startswith("usage error:")
    text_output = run_bad(project, project.config, "sync", "run", "--bogus")
    assert text_output.returncode == 2 and text_output.stdout == ""
    assert database_dump(state_db(project.folder)) == before


# -- the warehouse: sync run exits 1 naming what to fix, config validate exits 2 ---------------


WAREHOUSE_CASES = {
    "unreachable-postgres": (
        (
            'url = "duckdb:///warehouse.duckdb"',
            f'url = "postgresql+psycopg://winback:{WAREHOUSE_PASSWORD}@127.0.0.1:{closed_port()}/x"',
        ),
        ["cannot connect to the warehouse", "[warehouse] url", "***"],
    ),
    "missing-duckdb-file": (
        ('url = "duckdb:///warehouse.duckdb"', 'url = "duckdb:///no-such-warehouse.duckdb"'),
        ["no-such-warehouse.duckdb", "does not exist", "[warehouse] url"],
    ),
    "sql-error": (
        ("FROM customers WHERE", "FROM customerz WHERE"),
        ["segment `lapsed`", "customerz", "segments.lapsed.sql"],
    ),
}


@pytest.mark.parametrize("case", list(WAREHOUSE_CASES))
@pytest.mark.usefixtures("unchanged_state")
def test_warehouse_errors(project: Project, case: str) -> None:
    (old, new), fragments = WAREHOUSE_CASES[case]
    text = project.bad_config(old, new)
    result = run_bad(project, text, "sync", "run", "--output", "json")
    message = assert_one_paragraph(result, 1, *fragments)
    assert WAREHOUSE_PASSWORD not in result.stdout + message
    run = result.run()
    assert run["status"] == "failed"
    assert all(fragment in run["error"] for fragment in fragments)
    history = sqlite_rows(
        state_db(project.folder), "SELECT status, error FROM runs WHERE run_id = ?", [run["run_id"]]
    )
    assert history == [("failed", run["error"])]
    if "[warehouse] url" in fragments:  # text output keeps bracketed TOML tables too
        text_run = run_bad(project, text, "sync", "run")
        assert text_run.returncode == 1, text_run
        assert all(fragment in text_run.stderr for fragment in fragments)
    # `config validate` reports the same problem as a configuration error.
    validate = run_bad(project, text, "config", "validate")
    assert_one_paragraph(validate, 2, "bad.toml", fragments[1])


CONFIG_FOUND_AT_RUN_TIME = {
    "no-key-column": (
        ("SELECT customer_id, email", "SELECT email"),
        ["segments.lapsed.key", "`customer_id`", "segments.lapsed.sql"],
    ),
    "unmapped-column": (
        ('FNAME = "first_name"', 'FNAME = "firstname"'),
        ["syncs.s.fields.FNAME", "`firstname`", "it returns customer_id, email"],
    ),
}


@pytest.mark.parametrize("case", list(CONFIG_FOUND_AT_RUN_TIME))
@pytest.mark.usefixtures("unchanged_state")
def test_configuration_problems_found_at_run_time_exit_2(project: Project, case: str) -> None:
    """A query that does not return the key or a mapped column is a configuration problem:
    the run fails before reading a row, the error names the file and the option (as `config
    validate` does), and the command exits 2."""
    (old, new), fragments = CONFIG_FOUND_AT_RUN_TIME[case]
    text = project.bad_config(old, new)
    result = run_bad(project, text, "sync", "run", "--output", "json")
    assert_one_paragraph(result, 2, "invalid configuration in", "bad.toml", *fragments)
    run = result.run()
    assert (run["status"], result.json()["exit_code"]) == ("failed", 2)
    assert all(fragment in run["error"] for fragment in fragments)
    validate = run_bad(project, text, "config", "validate")
    assert_one_paragraph(validate, 2, "bad.toml", *fragments[:2])


# -- rows the sync cannot send: skipped with a reason, the run succeeds -------------------------


def test_null_duplicate_and_unusable_rows_are_skipped_with_reasons(tmp_path: Path) -> None:
    with WebhookReceiver(secret=SECRET) as receiver:
        webhook_project(tmp_path, receiver.url, customers=10)
        (tmp_path / "winback.toml").write_text(
            (tmp_path / "winback.toml")
            .read_text()
            .replace("ORDER BY customer_id", "ORDER BY customer_id, first_name"),
        )
        warehouse_sql(
            tmp_path / "warehouse.duckdb",
            "INSERT INTO customers VALUES "
            "(NULL, 'nokey@example.com', NULL, 'N', 'US', 't0', true), "
            "(7, 'first7@example.com', NULL, 'A-first', 'US', 't0', true), "
            "(101, 'not-an-email', NULL, 'B', 'US', 't0', true), "
            "(102, 'not-an-email', '+14155550102', 'B', 'US', 't0', true), "
            "(103, 'ok103@example.com', '12', 'B', 'US', 't0', true), "
            "(104, NULL, 'garbage', 'B', 'US', 't0', true), "
            "(105, NULL, NULL, 'B', 'US', 't0', true)",
        )
        result = run_cli("sync", "run", "--output", "json", cwd=tmp_path)
        assert result.returncode == 0, result
        run = result.run()
        assert run["status"] == "success"
        assert run["segment_rows"] == 17
        assert run["skipped"] == 5
        assert run["sent"]["add"] == 12
        reasons = dict(
            sqlite_rows(
                state_db(tmp_path),
                "SELECT coalesce(key, '<null>'), reason FROM row_issues "
                "WHERE run_id = ? AND kind = 'skipped'",
                [run["run_id"]],
            )
        )
        assert set(reasons) == {"<null>", "7", "101", "104", "105"}
        assert "null key" in reasons["<null>"] and "`customer_id`" in reasons["<null>"]
        assert "duplicate key `7`" in reasons["7"] and "first row was kept" in reasons["7"]
        assert "no usable identifier" in reasons["101"] and "`not-an-email`" in reasons["101"]
        assert "`garbage`" in reasons["104"]
        assert "no usable identifier" in reasons["105"]
        # The first of the duplicates is sent; rows with one usable identifier go with it alone.
        members = receiver.members
        assert members["7"]["identifiers"]["email"] == "first7@example.com"
        assert members["102"]["identifiers"] == {"phone": "+14155550102", "country": "US"}
        assert members["103"]["identifiers"] == {"email": "ok103@example.com", "country": "US"}
        assert not {"101", "104", "105"} & set(members)
        shown = run_cli("sync", "issues", "s", "-o", "json", cwd=tmp_path).json()
        null_key = next(issue for issue in shown if "null key" in issue["reason"])
        assert (null_key["key"], null_key["action"]) == (None, None)  # not ""


# -- destinations answering badly ---------------------------------------------------------------


def destination_project(folder: Path, url: str) -> None:
    webhook_project(folder, url, customers=10)


def test_a_2xx_html_answer_acknowledges(tmp_path: Path) -> None:
    html = ScriptedResponse(200, "<html><body>OK</body></html>", {"Content-Type": "text/html"})
    with FakeHttpServer(lambda request: html) as server:
        destination_project(tmp_path, server.url + "/hook")
        result = run_cli("sync", "run", "--output", "json", cwd=tmp_path)
        assert result.returncode == 0, result
        assert result.run()["sent"]["add"] == 10
        assert len(server.requests) == 1


def test_a_400_with_garbage_fails_naming_the_status(tmp_path: Path) -> None:
    def answer(request: RecordedRequest) -> ScriptedResponse:
        # A broken receiver: terminal escapes, a NUL, then its own secret across the cut at
        # 200 characters where error messages end their excerpt of a body.
        garbage = "\x00\x1b[31m<pre>"
        return ScriptedResponse(400, garbage + "g" * (190 - len(garbage)) + SECRET + "]]>{")

    with FakeHttpServer(answer) as server:
        destination_project(tmp_path, server.url + "/hook")
        result = run_cli("sync", "run", "--output", "json", cwd=tmp_path)
        message = assert_one_paragraph(result, 1, "400", "POST /hook")
        assert result.run()["status"] == "failed"
        assert "400" in result.run()["error"]
        assert "***" in message
        assert SECRET[:8] not in result.stdout + result.stderr
        assert not {"\x00", "\x1b"} & set(result.stdout + result.stderr)
        assert len(server.requests) == 1  # other 4xx are not retried
        assert not sqlite_rows(state_db(tmp_path), "SELECT * FROM snapshot")
        assert SECRET.encode() not in database_dump(state_db(tmp_path))


def test_connection_refused_fails_after_retries(tmp_path: Path) -> None:
    destination_project(tmp_path, f"http://127.0.0.1:{closed_port()}/hook")
    result = run_cli("sync", "run", "--output", "json", cwd=tmp_path)
    assert_one_paragraph(
        result, 1, "destination `hook`: POST /hook: connection refused talking to 127.0.0.1:"
    )
    run = result.run()
    assert run["status"] == "failed"
    assert run["retries"] == 2  # three attempts
    assert not sqlite_rows(state_db(tmp_path), "SELECT * FROM snapshot")
    # Once the receiver is there, the next run sends everything.
    with WebhookReceiver(secret=SECRET) as receiver:
        config = tmp_path / "winback.toml"
        config.write_text(
            re.sub(
                r'url = "http://127\.0\.0\.1:\d+/hook"',
                f'url = "{receiver.url}"',
                config.read_text(),
            )
        )
        healed = run_cli("sync", "run", "--output", "json", cwd=tmp_path)
        assert healed.returncode == 0, healed
        assert set(receiver.members) == set(segment_members(tmp_path / "warehouse.duckdb"))


def test_secrets_never_reach_output_or_state(project: Project) -> None:
    """Neither the commands' output (debug logs included) nor the state store hold the secret."""
    outputs = [
        run_cli("sync", "status", cwd=project.folder),
        run_cli("-vv", "sync", "run", "--full-resync", "--output", "json", cwd=project.folder),
    ]
    for result in outputs:
        assert result.returncode == 0, result
        assert SECRET not in result.stdout + result.stderr
    assert SECRET.encode() not in database_dump(state_db(project.folder))


def test_a_token_in_the_webhook_url_never_reaches_debug_logs_or_tracebacks(tmp_path: Path) -> None:
    """urllib3's debug log shows each request's path with its query string, and requests'
    connection errors quote the URL: with -vv both are printed, without the token."""
    token = "tok-5f1d9c2e77"
    failing = ScriptedResponse(500, "down")
    with FakeHttpServer(lambda request: failing) as server:
        destination_project(tmp_path, f"{server.url}/hook?token={token}")
        failed = run_cli("-vv", "sync", "run", "--output", "json", cwd=tmp_path)
        assert failed.returncode == 1, failed
        assert "POST /hook?token=***" in failed.stderr  # the debug log is there, redacted
    unreachable = run_cli("-vv", "destinations", "check", "hook", cwd=tmp_path)
    assert unreachable.returncode == 1, unreachable
    assert "Traceback" in unreachable.stderr
    for result in (failed, unreachable):
        assert token not in result.stdout + result.stderr, result
    assert token.encode() not in database_dump(state_db(tmp_path))


@pytest.mark.usefixtures("unchanged_state")
def test_duckdb_out_of_memory_says_how_to_give_it_more(project: Project) -> None:
    """A segment query that needs more than DuckDB's memory limit (here 4MB with spilling
    switched off) fails naming the limit and where to raise it."""
    text = project.bad_config(
        'url = "duckdb:///warehouse.duckdb"',
        'url = "duckdb:///warehouse.duckdb?memory_limit=4MB&temp_directory="',
    )
    text = text.replace(
        "FROM customers WHERE",
        "FROM customers WHERE customer_id NOT IN "
        "(SELECT -1 - range FROM range(2000000) ORDER BY md5(range::VARCHAR)) AND",
        1,
    )
    result = run_bad(project, text, "sync", "run", "--output", "json")
    assert_one_paragraph(
        result, 1, "the query failed", "Out of Memory", "memory_limit", "segments.lapsed.sql"
    )
    assert result.run()["status"] == "failed"


def test_text_that_is_not_utf8_in_a_sqlite_warehouse_names_the_column(tmp_path: Path) -> None:
    """SQLite stores whatever bytes it is given; reading Latin-1 text as TEXT fails in the
    driver. The error names the column and says what to do; nothing is recorded as sent."""
    with sqlite3.connect(tmp_path / "warehouse.sqlite") as db:
        db.execute("CREATE TABLE people (id TEXT, email TEXT)")
        db.execute("INSERT INTO people VALUES (CAST(x'636166e9' AS TEXT), 'a@example.com')")
    (tmp_path / "winback.toml").write_text(
        '[warehouse]\nurl = "sqlite:///warehouse.sqlite"\n'
        '[segments.s]\nkey = "id"\nsql = "SELECT id, email FROM people"\n'
        '[destinations.f]\ntype = "file"\n'
        '[syncs.s]\nsegment = "s"\ndestination = "f"\nidentifiers = { email = "email" }\n'
    )
    result = run_cli("sync", "run", "--output", "json", cwd=tmp_path)
    assert_one_paragraph(
        result, 1, "column `id` holds text that is not valid UTF-8", "`hex(id)`", "segments.s.sql"
    )
    assert result.run()["sent"]["add"] == 0


# -- database passwords: never in output, state or history --------------------------------------


@pytest.mark.usefixtures("unchanged_state")
def test_a_password_in_a_warehouse_url_query_never_reaches_output_or_state(
    project: Project,
) -> None:
    password = "TopSecretPw-4c1e9"
    url = f"postgresql+psycopg://winback@127.0.0.1:{closed_port()}/nope?password={password}"
    text = project.bad_config('url = "duckdb:///warehouse.duckdb"', f'url = "{url}"')
    failed = run_bad(project, text, "sync", "run", "--output", "json")
    assert_one_paragraph(failed, 1, "cannot connect to the warehouse", "?password=***`: ")
    run = failed.run()
    history = run_bad(project, text, "sync", "history", "s")
    validate = run_bad(project, text, "config", "validate")
    assert_one_paragraph(validate, 2, "?password=***`: ", "check [warehouse] url")
    stored = sqlite_rows(
        state_db(project.folder), "SELECT error FROM runs WHERE run_id = ?", [run["run_id"]]
    )
    assert stored == [(run["error"],)]
    assert "?password=***`: " in run["error"]
    for result in (failed, history, validate):
        assert password not in result.stdout + result.stderr, result
    assert password.encode() not in database_dump(state_db(project.folder))


@pytest.mark.parametrize(
    ("password", "pieces"),
    [("Xy7@LeakMe99", ["LeakMe99", "Xy7"]), ("p@ss:w/rd#1%", ["'w'", "rd#1", "ss:w", "int()"])],
)
@pytest.mark.usefixtures("unchanged_state")
def test_special_characters_in_a_password_from_the_environment_are_explained(
    project: Project, password: str, pieces: list[str]
) -> None:
    url = f"postgresql://user:${{WINBACK_E2E_WH_PW}}@127.0.0.1:{closed_port()}/db"
    text = project.bad_config('url = "duckdb:///warehouse.duckdb"', f'url = "{url}"')
    env = {"WINBACK_E2E_WH_PW": password}
    for args in (("sync", "run", "--output", "json"), ("config", "validate")):
        result = run_bad(project, text, *args, env=env)
        message = assert_one_paragraph(
            result,
            2,
            "warehouse.url",
            "special characters in a password must be URL-encoded (@ → %40, : → %3A, / → %2F, "
            "# → %23, % → %25)",
        )
        shown = result.stdout + message.split("must be URL-encoded")[0]
        for piece in pieces:
            assert piece not in shown, (piece, result)
