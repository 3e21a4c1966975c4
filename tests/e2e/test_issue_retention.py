"""`winback sync issues --run RUN` of a run still in the history whose row issues were pruned
(`[state] keep_issue_runs`) says so and where its counts are, instead of listing nothing."""

from __future__ import annotations

from pathlib import Path

from connector.config import load_config
from connector.sync import RunOptions, SyncRunner
from tests.helpers import PEOPLE_TWO_SKIPPED, run_many, write_people


def test_issues_of_a_pruned_run_say_they_were_pruned(tmp_path: Path, state_url: str) -> None:
    write_people(tmp_path, "duckdb", PEOPLE_TWO_SKIPPED)
    config = tmp_path / "winback.toml"
    config.write_text(
        f"""\
[warehouse]
url = "duckdb:///warehouse.duckdb"

[state]
url = "{state_url}"
keep_runs = 11

[segments.people]
key = "id"
sql = "SELECT * FROM people"

[destinations.export]
type = "file"
path = "exports/{{sync}}/{{run_id}}.csv"

[syncs.s]
segment = "people"
destination = "export"
identifiers = {{ email = "email", phone = "phone", country = "country" }}
""",
        encoding="utf-8",
    )
    run_ids = []
    for _ in range(12):  # in this process: a CLI start costs most of a second
        runner = SyncRunner(load_config(config))
        try:
            result = runner.run("s", RunOptions())
        finally:
            runner.close()
        assert (result.status, result.skipped) == ("success", 2), result.error
        run_ids.append(result.run_id)
    pruned, kept = run_ids[1], run_ids[2]  # run_ids[0] left the history (keep_runs = 11)

    as_table, as_json, latest, oldest_kept, history = run_many(
        ("sync", "issues", "s", "--run", pruned),
        ("sync", "issues", "s", "--run", pruned, "-o", "json"),
        ("sync", "issues", "s", "-o", "json"),
        ("sync", "issues", "s", "--run", kept, "-o", "json"),
        ("sync", "history", "s", "-o", "json"),
        cwd=tmp_path,
    )

    for refused in (as_table, as_json):
        assert refused.returncode == 2, refused
        assert refused.stdout == ""
        message = " ".join(refused.stderr.split())
        assert f"the row issues of run `{pruned}` of sync `s` were pruned" in message
        assert "`[state] keep_issue_runs = 10` keeps them for the newest 10 runs" in message
        assert "the run's counts are in `winback sync history s`" in message
    for listed in (latest, oldest_kept):
        assert listed.returncode == 0, listed
        assert sorted((i["kind"], i["key"]) for i in listed.json()) == [
            ("skipped", "2"),
            ("skipped", "3"),
        ]
    assert history.returncode == 0, history
    runs = {run["run_id"]: run for run in history.json()}
    assert len(runs) == 11 and run_ids[0] not in runs
    assert runs[pruned]["skipped"] == 2
