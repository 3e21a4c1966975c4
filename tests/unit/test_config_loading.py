"""Loading a config file: encodings, `${VAR}` references and every problem reported at once.

Each case writes a real file and calls `load_config`; one runs `winback config validate` to
check the CLI prints it as one paragraph with exit code 2 and no traceback.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from connector.config import load_config
from connector.errors import ConfigError
from destinations.registry import Registry
from tests.fakes.memory_destination import HashedMemoryDestination
from tests.helpers import run_cli

UNSET = "WINBACK_TEST_UNSET_VARIABLE"

VALID = """\
[warehouse]
url = "duckdb:///warehouse.duckdb"

[segments.lapsed]
key = "customer_id"
sql = "SELECT customer_id, email FROM customers"

[destinations.export]
type = "file"
path = "exports/{sync}/{run_id}.csv"

[syncs.s]
segment = "lapsed"
destination = "export"
identifiers = { email = "email" }
"""


@pytest.fixture(autouse=True)
def _unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(UNSET, raising=False)


def write(folder: Path, text: str | bytes, name: str = "winback.toml") -> Path:
    path = folder / name
    if isinstance(text, str):
        path.write_text(text, encoding="utf-8")
    else:
        path.write_bytes(text)
    return path


def problems_of(path: Path, *, registry: Registry | None = None) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as caught:
        load_config(path, registry=registry)
    assert caught.value.source == str(path) or caught.value.source == str(path.resolve())
    return [(p.location, p.message) for p in caught.value.problems]


# -- encodings ---------------------------------------------------------------------------------


def test_a_file_that_is_not_utf8_names_the_line_and_offset(tmp_path: Path) -> None:
    data = b'[warehouse]\nurl = "duckdb:///caf\xe9.duckdb"\n'
    path = write(tmp_path, data)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert str(path) in message
    assert "not UTF-8" in message
    assert "0xe9" in message
    assert "line 2" in message
    assert f"byte offset {data.index(0xE9)}" in message
    assert "save the file as UTF-8" in message
    assert "\n" not in message


def test_a_utf8_byte_order_mark_is_accepted(tmp_path: Path) -> None:
    plain = load_config(write(tmp_path, VALID))
    marked = load_config(write(tmp_path, b"\xef\xbb\xbf" + VALID.encode(), "marked.toml"))
    assert marked.syncs == plain.syncs
    assert marked.segments == plain.segments
    assert marked.warehouse == plain.warehouse


def test_toml_errors_after_a_byte_order_mark_keep_their_line(tmp_path: Path) -> None:
    path = write(tmp_path, b"\xef\xbb\xbf" + VALID.replace('"email" }', '"email" ').encode())
    (problem,) = problems_of(path)
    assert "not valid TOML" in problem[1]
    assert f"line {VALID.count(chr(10))}" in problem[1]


# -- ${VAR} references -------------------------------------------------------------------------


BAD_REFERENCES = {
    "unclosed": ("${UNCLOSED/x.csv", "`${UNCLOSED/x.csv` has no closing `}`"),
    "empty": ("exports/${}.csv", "`${}` is empty"),
    "bad-name": ("exports/${1st}.csv", "`${1st}` is not a valid environment variable reference"),
    "no-dash": ("${OUT:exports/x.csv}", "`${OUT:exports/x.csv}` is not a valid environment"),
    "nested-default": (
        "${OUT:-${OTHER}}/x.csv",
        "`${OUT:-${OTHER}}/x.csv`: a default cannot hold another `${...}`",
    ),
}


@pytest.mark.parametrize("case", list(BAD_REFERENCES))
def test_a_malformed_reference_is_a_problem_naming_its_key(tmp_path: Path, case: str) -> None:
    value, fragment = BAD_REFERENCES[case]
    text = VALID.replace('path = "exports/{sync}/{run_id}.csv"', f'path = "{value}"')
    ((location, message),) = problems_of(write(tmp_path, text))
    assert location == "destinations.export.path"
    assert fragment in message
    assert "write `${NAME}` or `${NAME:-default}`" in message


def test_well_formed_references_and_other_dollars_and_braces_are_unchanged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WINBACK_TEST_FOLDER", "out")
    text = VALID.replace(
        'path = "exports/{sync}/{run_id}.csv"',
        f'path = "${{WINBACK_TEST_FOLDER}}/${{{UNSET}:-x}}/{{sync}}/$HOME/$$.csv"',
    )
    config = load_config(write(tmp_path, text))
    path = config.destinations["export"].options.model_dump()["path"]
    assert path == str(tmp_path / "out/x/{sync}/$HOME/$$.csv")


@pytest.mark.parametrize(
    ("old", "new", "location"),
    [
        ('url = "duckdb:///warehouse.duckdb"', f'url = "${{{UNSET}}}"', "warehouse.url"),
        ("[warehouse]", f'[warehouse]\nchunk_size = "${{{UNSET}}}"', "warehouse.chunk_size"),
        ('segment = "lapsed"', f'segment = "${{{UNSET}}}"', "syncs.s.segment"),
        ('destination = "export"', f'destination = "${{{UNSET}}}"', "syncs.s.destination"),
        (
            'sql = "SELECT customer_id, email FROM customers"',
            f'sql = "${{{UNSET}}}"',
            "segments.lapsed.sql",
        ),
    ],
    ids=["warehouse-url", "chunk-size", "sync-segment", "sync-destination", "segment-sql"],
)
def test_an_unset_variable_is_reported_once_without_knock_on_problems(
    tmp_path: Path, old: str, new: str, location: str
) -> None:
    """The empty text that stands in for the variable is not reported again (not a URL, not a
    number, an undefined segment, an empty query), nor its table as undefined."""
    assert old in VALID
    problems = problems_of(write(tmp_path, VALID.replace(old, new, 1)))
    assert problems == [
        (
            location,
            f"environment variable `{UNSET}` is not set; export it before running winback "
            f"(or write `${{{UNSET}:-default}}`)",
        )
    ]


def test_an_unset_variable_does_not_hide_other_problems_of_its_table(tmp_path: Path) -> None:
    text = VALID.replace(
        'path = "exports/{sync}/{run_id}.csv"',
        f'path = "${{{UNSET}}}/x.csv"\nformatt = "csv"',
    )
    problems = problems_of(write(tmp_path, text))
    assert [location for location, _ in problems] == [
        "destinations.export.path",
        "destinations.export.formatt",
    ]


# -- every problem at once ---------------------------------------------------------------------


def test_every_problem_is_reported_in_one_run(tmp_path: Path) -> None:
    """An unknown key, a wrong mode, an out-of-range number, an undefined segment and an unset
    variable: one load reports all five, each with its usual wording and TOML path."""
    text = (
        VALID.replace("[warehouse]", "[warehouse]\nchunk_sise = 5000")
        .replace('segment = "lapsed"', 'segment = "lapsd"\nmode = "mirrror"')
        .replace("[syncs.s]", "[syncs.s]\nmax_removal_pct = 150")
        .replace('path = "exports/{sync}/{run_id}.csv"', f'path = "${{{UNSET}}}.csv"')
    )
    problems = dict(problems_of(write(tmp_path, text)))
    assert list(problems) == [
        "destinations.export.path",
        "warehouse.chunk_sise",
        "syncs.s.mode",
        "syncs.s.max_removal_pct",
        "syncs.s.segment",
    ]
    assert f"`{UNSET}` is not set" in problems["destinations.export.path"]
    assert "unknown key; check its spelling" in problems["warehouse.chunk_sise"]
    assert "'mirror', 'add_only' or 'upsert'" in problems["syncs.s.mode"]
    assert "less than or equal to 100" in problems["syncs.s.max_removal_pct"]
    assert problems["syncs.s.segment"] == "segment `lapsd` is not defined; defined: lapsed"


def test_a_wrong_section_does_not_stop_the_checks_of_the_others(tmp_path: Path) -> None:
    text = (
        VALID.replace("[warehouse]", "[warehouse]\npushdown = 3")
        .replace('url = "duckdb:///warehouse.duckdb"', 'url = "not a url"')
        .replace(
            '[segments.lapsed]\nkey = "customer_id"', '[segments.lapsed]\nkey = "id"\nsqll = ""'
        )
        .replace('destination = "export"', 'destination = "nowhere"')
        + '\n[retry]\nmax_attempts = 0\n\n[syncs.t]\nsegment = "lapsed"\ndestination = 7\n'
    )
    problems = dict(problems_of(write(tmp_path, text)))
    assert set(problems) == {
        "warehouse.pushdown",
        "warehouse.url",
        "retry.max_attempts",
        "segments.lapsed.sqll",
        "syncs.s.destination",
        "syncs.t.destination",
    }
    assert "is not a SQLAlchemy URL" in problems["warehouse.url"]
    assert "`nowhere` is not defined; defined: export" in problems["syncs.s.destination"]
    # The segment is reported once: its syncs do not call it undefined.
    assert not any("`lapsed` is not defined" in message for message in problems.values())


def test_a_section_that_is_not_a_table_does_not_make_its_names_undefined(tmp_path: Path) -> None:
    text = 'segments = "lapsed"\n' + VALID[VALID.index("[destinations.export]") :]
    problems = problems_of(write(tmp_path, text))
    assert [location for location, _ in problems] == ["segments"]


def test_wrong_values_of_a_sync_are_not_reported_again_by_its_cross_checks(
    tmp_path: Path,
) -> None:
    """The audience is required by the destination and the fields depend on the mode: when
    those keys are wrong, their defaults stand in without being reported."""
    text = (
        VALID.replace('type = "file"\npath = "exports/{sync}/{run_id}.csv"', 'type = "hashed"')
        .replace("[syncs.s]", '[syncs.s]\naudience = 42\nmode = "add-only"')
        .replace(
            'identifiers = { email = "email" }',
            'identifiers = { email = "email" }\nfields = { FNAME = "first_name" }',
        )
    )
    registry = Registry(adapters={"hashed": HashedMemoryDestination})
    problems = problems_of(write(tmp_path, text), registry=registry)
    assert [location for location, _ in problems] == ["syncs.s.audience", "syncs.s.mode"]


def test_a_sync_name_longer_than_the_state_store_keeps_is_refused(tmp_path: Path) -> None:
    """PostgreSQL refuses sync names over 200 characters at the run's first write."""
    name = "s" * 201
    problems = problems_of(write(tmp_path, VALID.replace("[syncs.s]", f"[syncs.{name}]")))
    assert problems == [
        (
            f"syncs.{name}",
            "a sync name of 201 characters is longer than 200 (the state store keeps it); "
            "use a shorter name",
        )
    ]
    config = load_config(write(tmp_path, VALID.replace("[syncs.s]", f"[syncs.{name[1:]}]")))
    assert list(config.syncs) == [name[1:]]


# -- through the CLI ---------------------------------------------------------------------------


def test_config_validate_prints_every_problem_with_exit_code_2(tmp_path: Path) -> None:
    write(
        tmp_path,
        VALID.replace('segment = "lapsed"', 'segment = "lapsd"\nmode = "mirrror"').replace(
            'path = "exports/{sync}/{run_id}.csv"', 'path = "${UNCLOSED/x.csv"'
        ),
    )
    write(tmp_path, b'[warehouse]\nurl = "caf\xe9"\n', "latin1.toml")
    result = run_cli("config", "validate", cwd=tmp_path)
    assert result.returncode == 2, result
    assert result.stderr.startswith("error: invalid configuration in "), result
    for fragment in (
        "winback.toml",
        "destinations.export.path: `${UNCLOSED/x.csv` has no closing `}`",
        "syncs.s.mode",
        "syncs.s.segment: segment `lapsd` is not defined",
    ):
        assert fragment in result.stderr, (fragment, result)
    latin1 = run_cli("--config", "latin1.toml", "config", "validate", cwd=tmp_path)
    assert latin1.returncode == 2, latin1
    assert latin1.stderr.count("error:") == 1
    assert "latin1.toml" in latin1.stderr
    assert "line 2" in latin1.stderr
    assert "save the file as UTF-8" in latin1.stderr
    for output in (result, latin1):
        assert "Traceback" not in output.stdout + output.stderr
        assert "unexpected" not in output.stderr


def test_default_country_must_be_an_assigned_code(tmp_path: Path) -> None:
    with_country = VALID.replace('segment = "lapsed"', 'segment = "lapsed"\ndefault_country = "XX"')
    ((location, message),) = problems_of(write(tmp_path, with_country))
    assert location == "syncs.s.default_country"
    assert "`XX` is not an ISO 3166 alpha-2 code" in message
    everyday = with_country.replace('"XX"', '"uk"')
    assert load_config(write(tmp_path, everyday)).syncs["s"].default_country == "GB"


@pytest.mark.parametrize(
    ("path_line", "expected"),
    [
        ("", "{config}/exports/{{sync}}/{{run_id}}.csv"),  # the file destination's default
        ('path = "out/{sync}.csv"', "{config}/out/{{sync}}.csv"),
        ('path = "~/winback/{sync}.csv"', "{home}/winback/{{sync}}.csv"),
    ],
)
def test_file_paths_resolve_against_the_config_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, path_line: str, expected: str
) -> None:
    """A file destination's path, set or defaulted, is relative to the config file's folder
    (not the folder winback is run from); `~` is the user's home."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    folder = tmp_path / "project"
    folder.mkdir()
    text = VALID.replace('path = "exports/{sync}/{run_id}.csv"', path_line)
    config = load_config(write(folder, text))
    options = config.destinations["export"].options
    assert options.path == expected.format(config=folder, home=tmp_path / "home")  # type: ignore[attr-defined]


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///:memory:", "sqlite+pysqlite://"])
def test_an_in_memory_state_store_is_refused(tmp_path: Path, url: str) -> None:
    """It validated and ran, but forgot every snapshot on exit: each run sent everyone again
    (duplicate adds to a file destination) and removals never happened."""
    path = write(tmp_path, VALID + f'\n[state]\nurl = "{url}"\n')
    [(location, message)] = problems_of(path)
    assert location == "state.url" and "in-memory" in message and "sqlite:///" in message


def test_row_issues_are_kept_for_the_newest_10_runs_by_default(tmp_path: Path) -> None:
    state = load_config(write(tmp_path, VALID)).state
    assert (state.keep_runs, state.keep_issue_runs) == (100, 10)


@pytest.mark.parametrize(
    ("lines", "kept"),
    [
        ("keep_issue_runs = 3", (100, 3)),
        ("keep_runs = 5", (5, 5)),  # the default 10 is more than history keeps
        ("keep_runs = 20\nkeep_issue_runs = 50", (20, 20)),
        ("keep_runs = 20\nkeep_issue_runs = 20", (20, 20)),
    ],
)
def test_row_issues_are_kept_for_at_most_the_runs_in_history(
    tmp_path: Path, lines: str, kept: tuple[int, int]
) -> None:
    state = load_config(write(tmp_path, VALID + f"\n[state]\n{lines}\n")).state
    assert (state.keep_runs, state.keep_issue_runs) == kept


@pytest.mark.parametrize("value", ["0", "-1", '"ten"', "2.5"])
def test_a_bad_keep_issue_runs_is_a_problem_naming_the_key(tmp_path: Path, value: str) -> None:
    path = write(tmp_path, VALID + f"\n[state]\nkeep_issue_runs = {value}\n")
    [(location, message)] = problems_of(path)
    assert location == "state.keep_issue_runs", message
    assert message


# -- syncs sharing an audience -----------------------------------------------------------------

SHARED_AUDIENCE = """\
[warehouse]
url = "duckdb:///warehouse.duckdb"

[segments.lapsed]
key = "customer_id"
sql = "SELECT customer_id, email FROM customers"

[destinations.lists]
type = "hashed"

[syncs.a]
segment = "lapsed"
destination = "lists"
audience = "{audience_a}"
mode = "{mode_a}"
identifiers = {{ email = "email" }}

[syncs.b]
segment = "lapsed"
destination = "lists"
audience = "L1"
mode = "{mode_b}"
identifiers = {{ email = "email" }}
"""


@pytest.mark.parametrize(
    ("audience_a", "mode_a", "mode_b", "remover"),
    [
        ("L1", "mirror", "mirror", "a"),
        ("L1", "add_only", "mirror", "b"),
        ("L1", "add_only", "upsert", None),  # neither removes: two segments feed one list
        ("L2", "mirror", "mirror", None),
    ],
)
def test_two_syncs_sharing_an_audience_are_refused_when_one_removes_members(
    tmp_path: Path, audience_a: str, mode_a: str, mode_b: str, remover: str | None
) -> None:
    text = SHARED_AUDIENCE.format(audience_a=audience_a, mode_a=mode_a, mode_b=mode_b)
    registry = Registry(adapters={"hashed": HashedMemoryDestination})
    path = write(tmp_path, text)
    if remover is None:
        load_config(path, registry=registry)
        return
    ((location, message),) = problems_of(path, registry=registry)
    assert location == "syncs.b.audience"
    assert message.startswith(
        "syncs `a` and `b` both send to audience `L1` of destination `lists`, and "
        f"`{remover}` removes members"
    )
    assert "Give each sync its own audience" in message
