"""The file destination: exact CSV/JSONL contents, placeholders, lazy creation, durable appends."""

from __future__ import annotations

import csv
import datetime as dt
import decimal
import errno
import io
import json
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from connector.config import load_config
from connector.errors import ConfigError, FatalDestinationError
from destinations import file as file_module
from destinations.base import Batch, Member, NoSyncOptions, RetrySettings, SyncContext
from destinations.file import FileDestination, FileOptions, csv_cell, marker_path
from destinations.testing.contract import ContractHarness, DestinationContract
from tests.helpers import run_cli


def context(
    run_id: str = "run-1", identifiers: tuple[str, ...] = ("email", "phone"), sync: str = "lapsed"
) -> SyncContext:
    return SyncContext(
        sync, run_id, None, NoSyncOptions(), RetrySettings(), identifiers, ("FNAME", "since")
    )


def make(
    path: Path | str, run_id: str = "run-1", *, sync: str = "lapsed", **options: Any
) -> FileDestination:
    return FileDestination(
        FileOptions(type="file", path=str(path), **options), context(run_id, sync=sync)
    )


def replay(folder: Path) -> dict[str, dict[str, Any]]:
    """Membership as a consumer of the change log sees it: add/update set, remove drops."""
    members: dict[str, dict[str, Any]] = {}
    for path in sorted(folder.rglob("*.*")):
        with path.open(newline="", encoding="utf-8") as handle:
            rows = [json.loads(line) for line in handle] if path.suffix == ".jsonl" else []
            if path.suffix == ".csv":
                rows = list(csv.DictReader(handle))
        for row in rows:
            if row["action"] == "remove":
                members.pop(row["key"], None)
            else:
                members[row["key"]] = row
    return members


def change_lines(folder: Path) -> int:
    files = [p for p in folder.rglob("*.*") if p.is_file()]
    return sum(len(p.read_text().splitlines()) - (p.suffix == ".csv") for p in files)


class TestFileContract(DestinationContract):
    @pytest.fixture(params=["csv", "jsonl"])
    def harness(self, request: pytest.FixtureRequest, tmp_path: Path) -> ContractHarness:
        template = str(tmp_path / "out" / f"{{sync}}-{{run_id}}.{request.param}")
        return ContractHarness(
            build=lambda ctx: FileDestination(FileOptions(type="file", path=template), ctx),
            members=lambda: replay(tmp_path),
            calls=lambda: change_lines(tmp_path),
        )


MEMBERS = [
    Member(
        "k1",
        {"email": "zoë@example.com", "phone": "+33612345678"},
        {"FNAME": 'Zoë, "Z"', "since": dt.date(2024, 5, 1)},
    ),
    Member("k2", {"email": "b@example.com"}, {"FNAME": None, "since": None}),
]


def test_csv_contents(tmp_path: Path) -> None:
    adapter = make(tmp_path / "out.csv")
    adapter.add(Batch(1, MEMBERS))
    adapter.remove(Batch(2, MEMBERS[1:]))
    adapter.close()
    assert (tmp_path / "out.csv").read_text(encoding="utf-8") == (
        "action,key,email,phone,FNAME,since\n"
        'add,k1,zoë@example.com,+33612345678,"Zoë, ""Z""",2024-05-01\n'
        "add,k2,b@example.com,,,\n"
        "remove,k2,b@example.com,,,\n"
    )


def test_cells_with_line_breaks_are_quoted_and_read_back_whole(tmp_path: Path) -> None:
    multiline = Member("k1", {"email": "a@example.com"}, {"FNAME": "a\rb", "since": "c\r\nd\ne"})
    adapter = make(tmp_path / "out.csv")
    adapter.add(Batch(1, [multiline, *MEMBERS[1:]]))
    adapter.close()
    assert (tmp_path / "out.csv").read_bytes() == (
        b'action,key,email,phone,FNAME,since\nadd,k1,a@example.com,,"a\rb","c\r\nd\ne"\n'
        b"add,k2,b@example.com,,,\n"
    )
    with (tmp_path / "out.csv").open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert [(row["key"], row["FNAME"], row["since"]) for row in rows] == [
        ("k1", "a\rb", "c\r\nd\ne"),
        ("k2", "", ""),
    ]


FORMULAS = [
    Member("=k", {"email": "a@example.com", "phone": "+15550100"}, {"FNAME": "=HYPERLINK(1)"}),
    Member("k2", {"email": "@b@x.com"}, {"FNAME": "-2+3", "since": "\tx"}),
    Member("k3", {"email": "c@example.com"}, {"FNAME": "\rCR", "since": -5}),
    Member("k4", {"email": "d@example.com"}, {"FNAME": "a=b+c", "since": " =spaced"}),
]


def test_escape_formulas_prefixes_cells_a_spreadsheet_would_run(tmp_path: Path) -> None:
    adapter = make(tmp_path / "out.csv", escape_formulas=True)
    adapter.add(Batch(1, FORMULAS))
    adapter.close()
    text = (tmp_path / "out.csv").read_bytes().decode()  # read_text would turn \r into \n
    assert text == (
        "action,key,email,phone,FNAME,since\n"
        "add,'=k,a@example.com,'+15550100,'=HYPERLINK(1),\n"
        "add,k2,'@b@x.com,,'-2+3,'\tx\n"
        "add,k3,c@example.com,,\"'\rCR\",'-5\n"
        "add,k4,d@example.com,,a=b+c, =spaced\n"
    )
    with (tmp_path / "out.csv").open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["phone"] for row in rows] == ["'+15550100", "", "", ""]


def test_cells_are_written_as_they_are_by_default(tmp_path: Path) -> None:
    adapter = make(tmp_path / "out.csv")
    adapter.add(Batch(1, FORMULAS[:1]))
    adapter.close()
    assert (tmp_path / "out.csv").read_text().splitlines()[1] == (
        "add,=k,a@example.com,+15550100,=HYPERLINK(1),"
    )


def test_escape_formulas_is_refused_for_json_lines() -> None:
    with pytest.raises(ValidationError, match="escape_formulas applies to CSV files only"):
        FileOptions(type="file", path="out.jsonl", escape_formulas=True)
    assert FileOptions(type="file", path="out.jsonl").escape_formulas is False


def test_jsonl_contents(tmp_path: Path) -> None:
    adapter = make(tmp_path / "out.jsonl")
    adapter.update(Batch(1, MEMBERS))
    adapter.close()
    lines = (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()
    assert lines == [
        '{"action":"update","key":"k1","identifiers":{"email":"zoë@example.com","phone":'
        '"+33612345678"},"fields":{"FNAME":"Zoë, \\"Z\\"","since":"2024-05-01"}}',
        '{"action":"update","key":"k2","identifiers":{"email":"b@example.com"},'
        '"fields":{"FNAME":null,"since":null}}',
    ]


@pytest.mark.parametrize(
    ("value", "cell"),
    [
        (None, ""),
        (True, "true"),
        (3, "3"),
        (1.5, "1.5"),
        (float("nan"), ""),
        (decimal.Decimal("12.50"), "12.50"),
        (dt.datetime(2024, 5, 1, 12, 30), "2024-05-01T12:30:00"),
        (["a", 1], '["a", 1]'),
    ],
)
def test_csv_cells(value: Any, cell: str) -> None:
    assert csv_cell(value) == cell


def test_placeholders_and_unsafe_characters(tmp_path: Path) -> None:
    ctx = SyncContext("team/lapsed", "2026-11-01T10:00:00Z", None, NoSyncOptions(), RetrySettings())
    options = FileOptions(type="file", path=str(tmp_path / "{sync}" / "{run_id}.jsonl"))
    adapter = FileDestination(options, ctx)
    adapter.add(Batch(1, MEMBERS[:1]))
    adapter.close()
    assert adapter.path == tmp_path / "team_lapsed" / "2026-11-01T10_00_00Z.jsonl"
    assert adapter.path.exists()


def test_default_path_is_relative_to_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    adapter = FileDestination(FileOptions(type="file"), context("r7"))
    adapter.add(Batch(1, MEMBERS))
    adapter.close()
    assert (tmp_path / "exports" / "lapsed" / "r7.csv").is_file()


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        ({"path": "out.txt"}, "cannot tell it from the extension"),
        ({"path": "{date}.csv"}, "unknown placeholder `{date}`"),
        ({"path": "out.csv", "format": "xml"}, "csv"),
        ({"path": " "}, "must not be empty"),
    ],
)
def test_invalid_options(options: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValidationError, match=problem):
        FileOptions(type="file", **options)


def test_format_is_inferred_or_explicit() -> None:
    assert FileOptions(type="file", path="a.NDJSON").format == "jsonl"
    assert FileOptions(type="file", path="a.log", format="jsonl").format == "jsonl"


def test_no_file_when_nothing_is_sent(tmp_path: Path) -> None:
    adapter = make(tmp_path / "sub" / "out.csv")
    adapter.check()
    adapter.add(Batch(1, []))
    adapter.close()
    assert not (tmp_path / "sub").exists()


def spy_fsync(monkeypatch: pytest.MonkeyPatch, fail: bool = False) -> list[int]:
    """Record fsync calls (and optionally fail them like a full disk would)."""
    calls: list[int] = []
    real: Callable[[int], None] = os.fsync

    def fsync(descriptor: int) -> None:
        calls.append(descriptor)
        if fail:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(descriptor)

    monkeypatch.setattr(os, "fsync", fsync)
    return calls


def test_every_batch_is_on_disk_before_it_is_acknowledged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    adapter = make(tmp_path / "out.csv")
    adapter.add(Batch(1, MEMBERS[:1]))  # creates the file and its folder entry
    calls = spy_fsync(monkeypatch)
    adapter.add(Batch(2, MEMBERS[1:]))
    assert len(calls) == 1
    # Another reader sees both batches while the adapter still holds the file open.
    assert len((tmp_path / "out.csv").read_text().splitlines()) == 3
    adapter.close()


def test_a_failed_write_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    adapter = make(tmp_path / "out.csv")
    adapter.add(Batch(1, MEMBERS[:1]))
    before = (tmp_path / "out.csv").read_bytes()
    spy_fsync(monkeypatch, fail=True)
    with pytest.raises(FatalDestinationError, match="No space left"):
        adapter.add(Batch(2, MEMBERS[1:]))
    monkeypatch.undo()
    adapter.close()
    assert (tmp_path / "out.csv").read_bytes() == before


def test_later_runs_append_and_a_half_written_line_is_cut(tmp_path: Path) -> None:
    first = make(tmp_path / "log.csv", run_id="r1")
    first.add(Batch(1, MEMBERS[:1]))
    first.close()
    with (tmp_path / "log.csv").open("ab") as handle:
        handle.write(b"add,k9,half-writ")  # a crash in the middle of a line
    second = make(tmp_path / "log.csv", run_id="r2")
    second.remove(Batch(1, MEMBERS[:1]))
    second.close()
    lines = (tmp_path / "log.csv").read_text().splitlines()
    assert lines[0] == "action,key,email,phone,FNAME,since" and len(lines) == 3
    assert [line.split(",")[0] for line in lines[1:]] == ["add", "remove"]


def test_a_csv_with_other_columns_is_refused(tmp_path: Path) -> None:
    (tmp_path / "log.csv").write_text("action,key,email\nadd,k1,a@example.com\n")
    adapter = make(tmp_path / "log.csv")
    with pytest.raises(FatalDestinationError, match="other columns"):
        adapter.add(Batch(1, MEMBERS))
    adapter.close()


def test_concurrent_batches_never_interleave(tmp_path: Path) -> None:
    adapter = make(tmp_path / "out.jsonl")
    batches = [
        Batch(n, [Member(f"k{n}-{i}", {"email": f"{n}.{i}@example.com"}) for i in range(50)])
        for n in range(8)
    ]
    threads = [threading.Thread(target=adapter.add, args=(batch,)) for batch in batches]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    adapter.close()
    keys = [json.loads(line)["key"] for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert len(keys) == 400 and len(set(keys)) == 400


def test_check_reports_the_target(tmp_path: Path) -> None:
    description = make(tmp_path / "new" / "out.csv").check()
    assert str(tmp_path / "new" / "out.csv") in description and "will be created" in description
    (tmp_path / "a-file").write_text("")
    with pytest.raises(FatalDestinationError, match="is not a folder"):
        make(tmp_path / "a-file" / "out.csv").check()
    (tmp_path / "dir.csv").mkdir()
    with pytest.raises(FatalDestinationError, match="not a writable file"):
        make(tmp_path / "dir.csv").check()


def test_check_shows_the_path_pattern_and_the_folder_it_checked(tmp_path: Path) -> None:
    (tmp_path / "exports").mkdir()
    cases = [
        ("exports/{sync}/{run_id}.csv", "exports", "`{root}/exports` is writable"),
        ("new/deeper/{run_id}.jsonl", "new/deeper", "will be created in `{root}`"),
        ("{sync}.csv", "", "`{root}` is writable"),
    ]
    for template, checked, outcome in cases:
        description = make(f"{tmp_path}/{template}").check()
        fmt = template.rsplit(".", 1)[1].upper()
        assert description.startswith(f"writes {fmt} to {tmp_path}/{template} ("), description
        folder = f"{tmp_path}/{checked}".rstrip("/")
        assert f"`{folder}`" in description and outcome.format(root=tmp_path) in description
        assert "lapsed" not in description and "run-1" not in description  # the context's
    assert (
        "({sync} and {run_id} are filled in at each run)"
        in make(f"{tmp_path}/{{sync}}/{{run_id}}.csv").check()
    )
    assert make(tmp_path / "plain.csv").check() == (
        f"writes CSV to {tmp_path}/plain.csv; `{tmp_path}` is writable"
    )


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_check_refuses_a_read_only_folder(tmp_path: Path) -> None:
    (tmp_path / "ro").mkdir(mode=0o500)
    with pytest.raises(FatalDestinationError, match="cannot write"):
        make(tmp_path / "ro" / "out.csv").check()


def test_a_header_cut_by_a_crash_is_rewritten(tmp_path: Path) -> None:
    (tmp_path / "log.csv").write_bytes(b"action,ke")
    adapter = make(tmp_path / "log.csv")
    adapter.add(Batch(1, MEMBERS[1:]))
    adapter.close()
    assert (tmp_path / "log.csv").read_text() == (
        "action,key,email,phone,FNAME,since\nadd,k2,b@example.com,,,\n"
    )


# --- crash repair ----------------------------------------------------------------------------

NOTES = [
    Member(f"n{i}", {"email": f"n{i}@example.com"}, {"FNAME": f'line 1\nline "2", {i}\n'})
    for i in range(3)
]
"""Members whose CSV rows span lines (and hold quotes)."""


def kill_after(adapter: FileDestination, tail: bytes) -> None:
    """Leave the disk as a `kill -9` of the run would while it wrote `tail` after what it wrote
    whole: the file ends with `tail` and the run's marker stays (close() never ran)."""
    marker = marker_path(adapter.path)
    written, note = adapter.path.read_bytes(), marker.read_bytes()
    adapter.close()
    adapter.path.write_bytes(written + tail)
    marker.write_bytes(note)


def read_csv(path: Path) -> list[list[str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.reader(handle, strict=True))  # an unclosed quote is an error


TORN_CSV = [
    b"",  # killed between two batches: nothing to cut
    b"add,n9,n9@example.com,,",  # in the middle of a row
    b'add,n9,n9@example.com,,"line 1\n',  # right after a line break inside a quoted cell
    b'add,n9,n9@example.com,,"line 1\nline ""2"", 9\n',  # its last byte is a line break too
    b'add,n9,n9@example.com,,"line 1\nline ""2',  # between the two quotes of a pair
    b'add,n9,n9@example.com,,"line 1\nline ""2"", 9\n",',  # after its closing quote
]


@pytest.mark.parametrize("tail", TORN_CSV)
def test_a_csv_torn_by_a_killed_run_is_cut_to_its_last_whole_record(
    tmp_path: Path, tail: bytes
) -> None:
    first = make(tmp_path / "log.csv", run_id="r1")
    first.add(Batch(1, NOTES[:2]))
    assert marker_path(first.path).exists()  # from before the first write
    kill_after(first, tail)

    second = make(tmp_path / "log.csv", run_id="r2")
    second.add(Batch(1, NOTES[2:]))
    second.close()
    header, *rows = read_csv(tmp_path / "log.csv")
    assert header == ["action", "key", "email", "phone", "FNAME", "since"]
    assert [(row[1], row[4]) for row in rows] == [(m.key, m.fields["FNAME"]) for m in NOTES]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.csv"]  # the marker is gone


@pytest.mark.parametrize("tail", [b"", b'{"action": "add", "key": "n9", "ident'])
def test_a_jsonl_file_torn_by_a_killed_run_is_cut_to_its_last_line(
    tmp_path: Path, tail: bytes
) -> None:
    first = make(tmp_path / "log.jsonl", run_id="r1")
    first.add(Batch(1, NOTES[:2]))
    kill_after(first, tail)
    second = make(tmp_path / "log.jsonl", run_id="r2")
    second.add(Batch(1, NOTES[2:]))
    second.close()
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["key"] for line in lines] == ["n0", "n1", "n2"]
    assert not marker_path(tmp_path / "log.jsonl").exists()


def test_files_of_killed_runs_are_repaired_by_the_next_run_of_their_sync(tmp_path: Path) -> None:
    template = f"{tmp_path}/out/{{sync}}-{{run_id}}.csv"
    killed = make(template, run_id="r1")
    killed.add(Batch(1, NOTES[:2]))
    kill_after(killed, b'add,n9,n9@example.com,,"line 1\n')
    # Killed before its first byte: an empty file, no use to anyone.
    empty = make(template, run_id="r2")
    empty.add(Batch(1, NOTES[:1]))
    kill_after(empty, b"")
    empty.path.write_bytes(b"")
    # `lapsed-b-r7.csv` matches `lapsed-{run_id}.csv` but is another sync's, maybe running.
    other = make(template, run_id="r7", sync="lapsed-b")
    other.add(Batch(1, NOTES[:1]))
    kill_after(other, b"add,n9,")
    other_bytes = other.path.read_bytes()

    fresh = make(template, run_id="r3")
    fresh.add(Batch(1, NOTES[2:]))
    fresh.close()
    out = tmp_path / "out"
    assert [row[1] for row in read_csv(out / "lapsed-r1.csv")[1:]] == ["n0", "n1"]
    assert not (out / "lapsed-r2.csv").exists()
    assert [row[1] for row in read_csv(out / "lapsed-r3.csv")[1:]] == ["n2"]
    assert sorted(p.name for p in out.glob(".*")) == [".lapsed-b-r7.csv.writing"]
    assert (out / "lapsed-b-r7.csv").read_bytes() == other_bytes


def test_a_file_closed_whole_is_not_scanned_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = make(tmp_path / "log.csv", run_id="r1")
    first.add(Batch(1, NOTES[:2]))
    first.close()
    assert not marker_path(tmp_path / "log.csv").exists()

    def scan(*args: Any, **kwargs: Any) -> int:
        raise AssertionError("a file closed whole was scanned")

    monkeypatch.setattr(file_module, "_last_record_end", scan)
    second = make(tmp_path / "log.csv", run_id="r2")
    second.add(Batch(1, NOTES[2:]))
    second.close()
    assert len(read_csv(tmp_path / "log.csv")) == 4


def test_the_last_record_end_is_found_across_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    members = [*NOTES, Member('q"', {"email": '"a,b"@example.com'}, {"FNAME": "\n\n"})]
    adapter = make("unused.csv")
    columns = (("email", "phone"), ("FNAME", "since"))
    records = [adapter._header(columns)]
    records += [adapter._render("add", Batch(1, [m]), columns) for m in members * 3]
    data = b"".join(records)
    ends = [sum(len(r) for r in records[: n + 1]) for n in range(len(records))]
    for chunk in (1, 4, 7, 64, 1 << 20):
        monkeypatch.setattr(file_module, "CHUNK", chunk)
        for size in range(len(data) + 1):
            expected = max([0, *(end for end in ends if end <= size)])
            found = file_module._last_record_end(io.BytesIO(data), size, quoted=True)
            assert found == expected, (chunk, size)


def fail_writes_after(monkeypatch: pytest.MonkeyPatch, written: int) -> None:
    """Writes put `written` bytes on disk, then fail as a full disk does."""

    def write_all(handle: Any, data: bytes) -> None:
        handle.write(data[:written])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(file_module, "_write_all", write_all)


@pytest.mark.parametrize("written", [0, 20])
def test_a_failed_first_write_leaves_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, written: int
) -> None:
    adapter = make(tmp_path / "out.csv")
    fail_writes_after(monkeypatch, written)
    with pytest.raises(FatalDestinationError, match="No space left"):
        adapter.add(Batch(1, NOTES))
    adapter.close()
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_to_an_existing_file_keeps_it_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = make(tmp_path / "log.csv", run_id="r1")
    first.add(Batch(1, NOTES[:1]))
    first.close()
    before = (tmp_path / "log.csv").read_bytes()
    fail_writes_after(monkeypatch, 30)
    second = make(tmp_path / "log.csv", run_id="r2")
    with pytest.raises(FatalDestinationError, match="No space left"):
        second.add(Batch(1, NOTES[1:]))
    second.close()
    assert (tmp_path / "log.csv").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.csv"]


# --- config validation -----------------------------------------------------------------------


def file_config(folder: Path, fields: str, *, path: str = "out/{run_id}.csv") -> Path:
    config = folder / "winback.toml"
    config.write_text(
        f"""
[segments.lapsed]
key = "customer_id"
sql = "SELECT 1 AS customer_id, 'a@example.com' AS email"

[destinations.export]
type = "file"
path = "{path}"

[syncs.to_csv]
segment = "lapsed"
destination = "export"
identifiers = {{ email = "email", phone = "phone" }}
fields = {fields}
""",
        encoding="utf-8",
    )
    return config


def test_a_field_named_like_another_csv_column_is_a_config_error(tmp_path: Path) -> None:
    config = file_config(tmp_path, '{ email = "note", key = "rate", action = "name", ok = "x" }')
    with pytest.raises(ConfigError) as caught:
        load_config(config)
    header = "action,key,email,phone,email,key,action,ok"
    assert [(p.location, p.message) for p in caught.value.problems] == [
        (
            "syncs.to_csv.fields.email",
            "`email` is already the column of the identifier `email`, so the CSV header would "
            f"hold it twice (`{header}`); give this field another name, e.g. `email_field`",
        ),
        (
            "syncs.to_csv.fields.key",
            "`key` is already the `key` column every CSV row starts with, so the CSV header "
            f"would hold it twice (`{header}`); give this field another name, e.g. `key_field`",
        ),
        (
            "syncs.to_csv.fields.action",
            "`action` is already the `action` column every CSV row starts with, so the CSV "
            f"header would hold it twice (`{header}`); give this field another name, e.g. "
            "`action_field`",
        ),
    ]

    result = run_cli("config", "validate", cwd=tmp_path)
    assert result.returncode == 2, result
    assert "syncs.to_csv.fields.email: `email` is already" in result.stderr
    assert not (tmp_path / "out").exists()


def test_jsonl_and_unmapped_identifier_names_are_accepted(tmp_path: Path) -> None:
    # JSON Lines keeps fields apart from identifiers; `country` is not a column of this CSV.
    fields = '{ email = "note", key = "rate", action = "name" }'
    assert load_config(file_config(tmp_path, fields, path="out/{run_id}.jsonl")).syncs
    assert load_config(file_config(tmp_path, '{ country = "c", Email = "e" }')).syncs


def shared_file_config(folder: Path, *destinations: tuple[str, str], syncs: str) -> Path:
    """A config with file destinations (name, path) and the given sync tables."""
    tables = "".join(
        f'\n[destinations.{n}]\ntype = "file"\npath = "{p}"\n' for n, p in destinations
    )
    config = folder / "winback.toml"
    config.write_text(
        '[segments.lapsed]\nkey = "customer_id"\n'
        "sql = \"SELECT 1 AS customer_id, 'a@example.com' AS email\"\n" + tables + syncs,
        encoding="utf-8",
    )
    return config


def sync_table(name: str, destination: str) -> str:
    return (
        f'\n[syncs."{name}"]\nsegment = "lapsed"\ndestination = "{destination}"\n'
        'identifiers = { email = "email" }\n'
    )


def test_two_syncs_writing_one_file_is_a_config_error(tmp_path: Path) -> None:
    # `{sync}` writes both names as `eu_lapsed`: both syncs would append to eu_lapsed.csv.
    config = shared_file_config(
        tmp_path,
        ("export", "exports/{sync}.csv"),
        syncs=sync_table("eu/lapsed", "export") + sync_table("eu lapsed", "export"),
    )
    with pytest.raises(ConfigError) as caught:
        load_config(config)
    file = tmp_path / "exports" / "eu_lapsed.csv"
    assert [(p.location, p.message) for p in caught.value.problems] == [
        (
            "syncs.eu lapsed.destination",
            f"syncs `eu/lapsed` and `eu lapsed` both write to the file `{file}` (destination "
            "`export`): runs of both would mix their rows in it; `{sync}` writes both sync "
            "names as `eu_lapsed`: rename one of the syncs, or give each a destination with a "
            "different `path`",
        )
    ]
    result = run_cli("config", "validate", cwd=tmp_path)
    assert result.returncode == 2, result
    assert "syncs `eu/lapsed` and `eu lapsed` both write to the file" in result.stderr
    # A run refuses it too, before anything is written.
    result = run_cli("sync", "run", cwd=tmp_path)
    assert result.returncode == 2, result
    assert "eu_lapsed.csv" in result.stderr and not (tmp_path / "exports").exists()


def test_the_same_fixed_path_in_two_destinations_is_a_config_error(tmp_path: Path) -> None:
    config = shared_file_config(
        tmp_path,
        ("a", "exports/all.csv"),
        ("b", "./exports/../exports/all.csv"),
        ("c", "exports/{sync}/{run_id}.csv"),
        syncs=sync_table("one", "a")
        + sync_table("two", "b")
        + sync_table("three", "a")
        # Each run of a path with {run_id} writes a file of its own: shared freely.
        + sync_table("four", "c")
        + sync_table("five", "c"),
    )
    with pytest.raises(ConfigError) as caught:
        load_config(config)
    file = tmp_path / "exports" / "all.csv"
    hint = (
        "put `{sync}` in `path` (e.g. `exports/{sync}.csv`), or give each sync a destination "
        "with a different `path`"
    )
    assert [(p.location, p.message) for p in caught.value.problems] == [
        (
            "syncs.two.destination",
            f"syncs `one` and `two` both write to the file `{file}` (destinations `a` and "
            f"`b`): runs of both would mix their rows in it; {hint}",
        ),
        (
            "syncs.three.destination",
            f"syncs `one` and `three` both write to the file `{file}` (destination `a`): runs "
            f"of both would mix their rows in it; {hint}",
        ),
    ]


def test_syncs_with_files_of_their_own_are_accepted(tmp_path: Path) -> None:
    config = shared_file_config(
        tmp_path,
        ("export", "exports/{sync}.csv"),
        syncs=sync_table("eu/lapsed", "export") + sync_table("us/lapsed", "export"),
    )
    assert set(load_config(config).syncs) == {"eu/lapsed", "us/lapsed"}


def test_a_symbolic_link_in_place_of_the_file_is_not_followed(tmp_path: Path) -> None:
    """In a folder others may write to, a link swapped in between runs must not have customer
    data appended to a file of its choosing."""
    elsewhere = tmp_path / "elsewhere.txt"
    elsewhere.write_bytes(b"someone else's file")
    exports = tmp_path / "exports"
    exports.mkdir()
    (exports / "lapsed.csv").symlink_to(elsewhere)
    adapter = make(exports / "{sync}.csv")
    with pytest.raises(FatalDestinationError) as caught:
        adapter.add(Batch(1, MEMBERS))
    adapter.close()
    assert "is a symbolic link, which winback does not follow" in str(caught.value)
    assert elsewhere.read_bytes() == b"someone else's file"
