"""CSV or JSON Lines file: every change of a run becomes one line (used by the demo and for audits).

CSV files start with the header ``action,key,<identifiers...>,<fields...>`` (the sync's mapped
identifier and field names, in config order; a field may not be named like another column, which
the config refuses); JSON Lines files hold one object per change,
``{"action": "add", "key": "42", "identifiers": {...}, "fields": {...}}``. Dates are written in
ISO 8601 and missing values as empty cells (CSV) or ``null`` (JSONL).

The file is opened on the first batch (a run without changes creates no file); each batch is
appended, flushed and fsync'd before it is acknowledged. A path without ``{run_id}`` collects
every run: a line left half-written by a crash is cut off first, a different CSV header refused.

Config example::

    [destinations.export]
    type = "file"
    path = "exports/{sync}/{run_id}.csv"   # the default; {sync} and {run_id} are filled in
    format = "csv"                         # csv | jsonl; inferred from .csv / .jsonl / .ndjson
    escape_formulas = false                # CSV: ' before cells starting with = + - @ tab CR

    [syncs.lapsed_to_file]
    segment = "lapsed_buyers"
    destination = "export"
    identifiers = { email = "email", phone = "phone" }
    fields = { first_name = "first_name" }
"""

from __future__ import annotations

import contextlib
import csv
import decimal
import io
import json
import os
import re
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from connector.errors import FatalDestinationError
from destinations.base import (
    Batch,
    BatchResult,
    Destination,
    DestinationOptions,
    Member,
    SyncContext,
    json_bytes,
    json_value,
)

FileFormat = Literal["csv", "jsonl"]
Columns = tuple[tuple[str, ...], tuple[str, ...]]
"""Identifier names, then field names: the CSV columns after `action,key`."""

PLACEHOLDERS = ("sync", "run_id")
EXTENSIONS: dict[str, FileFormat] = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}


class FileOptions(DestinationOptions):
    """Options of the ``file`` destination."""

    path: str = Field(
        "exports/{sync}/{run_id}.csv",
        description="File to write; may contain {sync} and {run_id}. Relative to the config file.",
    )
    format: FileFormat | None = Field(
        None, validate_default=True, description="csv or jsonl; inferred from the extension."
    )
    escape_formulas: bool = Field(
        False,
        description="CSV only: prefix with ' the cells that start with = + - @ tab or CR, so a "
        "spreadsheet shows them as text instead of running them as formulas.",
    )

    @field_validator("path")
    @classmethod
    def _check_placeholders(cls, value: str) -> str:
        unknown = sorted(set(re.findall(r"\{([^{}]*)\}", value)) - set(PLACEHOLDERS))
        if unknown:
            raise ValueError(f"unknown placeholder `{{{unknown[0]}}}`; use {{sync}} or {{run_id}}")
        if not value.strip():
            raise ValueError("must not be empty")
        return value

    @field_validator("format")
    @classmethod
    def _infer_format(cls, value: FileFormat | None, info: ValidationInfo) -> FileFormat | None:
        path = info.data.get("path")
        if value is None and path is not None:
            value = EXTENSIONS.get(Path(path).suffix.lower())
            if value is None:
                raise ValueError(
                    f"cannot tell it from the extension of `{path}`; "
                    'set format = "csv" or "jsonl", or end the path with .csv or .jsonl'
                )
        return value

    @model_validator(mode="after")
    def _escape_only_csv(self) -> FileOptions:
        if self.escape_formulas and self.format == "jsonl":
            raise ValueError("escape_formulas applies to CSV files only; remove it for JSON Lines")
        return self


def render_path(template: str, context: SyncContext) -> Path:
    """The template with its placeholders filled (characters unsafe in file names become `_`)."""
    path = template
    for name in PLACEHOLDERS:
        value = re.sub(r"[^\w.-]", "_", str(getattr(context, name))).lstrip(".") or "_"
        path = path.replace(f"{{{name}}}", value)
    return Path(path)


def csv_cell(value: Any) -> str:
    """A value as CSV text: ISO dates, exact decimals, true/false, empty for missing values."""
    if isinstance(value, decimal.Decimal) and value.is_finite():
        return str(value)
    value = json_value(value)
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | dict):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
"""First characters that make a spreadsheet read a cell as a formula (OWASP's CSV injection list)."""


def escape_formula(cell: str) -> str:
    """`cell` with a leading `'` when a spreadsheet would run it as a formula: `=1+1` becomes
    `'=1+1` (shown as text), and so does an E.164 phone, `+15550100`."""
    return "'" + cell if cell.startswith(FORMULA_STARTS) else cell


class FileDestination(Destination):
    """Appends each change batch to a CSV or JSON Lines file."""

    name = "file"
    options_model = FileOptions
    requires_audience = False
    supports_update = True
    default_batch_size = 5000

    options: FileOptions

    def __init__(self, options: DestinationOptions, context: SyncContext):
        if not isinstance(options, FileOptions):
            raise TypeError(f"FileDestination needs FileOptions, got {type(options).__name__}")
        super().__init__(options, context)
        self.path = render_path(options.path, context)
        self.format: FileFormat = options.format or "csv"
        self._columns: Columns | None = None
        self._file: IO[bytes] | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"FileDestination(path='{self.path}', format='{self.format}')"

    @classmethod
    def mapping_problems(
        cls, options: DestinationOptions, *, identifiers: Sequence[str], fields: Sequence[str]
    ) -> list[tuple[str, str]]:
        """A CSV field named like another column (`action`, `key` or a mapped identifier)
        would repeat that name in the header: readers keep one of the two columns."""
        if not isinstance(options, FileOptions) or (options.format or "csv") != "csv":
            return []  # JSON Lines keeps identifiers and fields in objects of their own
        header = ",".join(["action", "key", *identifiers, *fields])
        problems = []
        for name in fields:
            if name in ("action", "key"):
                taken = f"the `{name}` column every CSV row starts with"
            elif name in identifiers:
                taken = f"the column of the identifier `{name}`"
            else:
                continue
            problems.append(
                (
                    f"fields.{name}",
                    f"`{name}` is already {taken}, so the CSV header would hold it twice "
                    f"(`{header}`); give this field another name, e.g. `{name}_field`",
                )
            )
        return problems

    def check(self) -> str:
        """The folder files go to exists (or can be created) and is writable; nothing is written.

        A check serves no sync or run in particular: it shows the configured `path` with its
        placeholders as they are, and checks the part of its folder they do not change."""
        pattern = Path(self.options.path).absolute()
        fixed = Path(pattern.anchor)
        for part in pattern.parent.parts[1:]:
            if re.search(r"\{(?:sync|run_id)\}", part):
                break
            fixed /= part
        existing = fixed
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            raise self._error(f"`{existing}` is not a folder", "choose another `path`")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise self._error(f"cannot write in `{existing}`", "fix its permissions")
        if pattern.exists() and not (pattern.is_file() and os.access(pattern, os.W_OK)):
            raise self._error(f"`{pattern}` exists and is not a writable file", "move it")
        placeholders = [f"{{{name}}}" for name in PLACEHOLDERS if f"{{{name}}}" in str(pattern)]
        filled = ""
        if placeholders:
            verb = "are" if len(placeholders) > 1 else "is"
            filled = f" ({' and '.join(placeholders)} {verb} filled in at each run)"
        checked = f"`{fixed}` is writable"
        if existing != fixed:
            checked = f"`{fixed}` will be created in `{existing}`, which is writable"
        return f"writes {self.format.upper()} to {pattern}{filled}; {checked}"

    def add(self, batch: Batch) -> BatchResult:
        return self._write("add", batch)

    def remove(self, batch: Batch) -> BatchResult:
        return self._write("remove", batch)

    def update(self, batch: Batch) -> BatchResult:
        return self._write("update", batch)

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    def _write(self, action: str, batch: Batch) -> BatchResult:
        # An empty batch is a no-op: nothing to write, and no file is created for it.
        if not batch.members:
            return BatchResult()
        with self._lock:
            handle, columns = self._open(batch)
            start = handle.seek(0, os.SEEK_END)
            header = self._header(columns) if start == 0 else b""
            try:
                handle.write(header + self._render(action, batch, columns))
                handle.flush()
                os.fsync(handle.fileno())
            except OSError as error:
                # Leave no partial batch behind: it is not acknowledged and will be resent.
                with contextlib.suppress(OSError):
                    handle.truncate(start)
                raise self._error(f"could not write `{self.path}`: {error.strerror}") from error
        return BatchResult.all_acknowledged(batch)

    def _open(self, batch: Batch) -> tuple[IO[bytes], Columns]:
        """The open file (opened on first use) and the columns chosen for this run."""
        if self._file is not None and self._columns is not None:
            return self._file, self._columns
        columns = self._choose_columns(batch)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            created = not self.path.exists()
            handle = self.path.open("a+b")
        except OSError as error:
            raise self._error(f"could not open `{self.path}`: {error.strerror}") from error
        if created:
            _fsync_folder(self.path.parent)
        header = self._header(columns)
        if _cut_partial_line(handle) and header:
            handle.seek(0)
            first = handle.readline()
            if first != header:
                handle.close()
                raise self._error(
                    f"`{self.path}` already holds a CSV with other columns "
                    f"(`{first.decode(errors='replace').strip()}`)",
                    "put {run_id} in `path` or move the file away",
                )
        self._file, self._columns = handle, columns
        return handle, columns

    def _choose_columns(self, batch: Batch) -> Columns:
        """The sync's mapped names; outside the engine, the names present in the first batch."""
        members = batch.members
        return (
            self.context.identifier_names
            or tuple(dict.fromkeys(n for m in members for n in m.identifiers)),
            self.context.field_names or tuple(dict.fromkeys(n for m in members for n in m.fields)),
        )

    def _header(self, columns: Columns) -> bytes:
        if self.format != "csv":
            return b""
        identifiers, fields = columns
        return _csv_line(["action", "key", *identifiers, *fields])

    def _render(self, action: str, batch: Batch, columns: Columns) -> bytes:
        identifiers, fields = columns
        if self.format == "jsonl":
            return b"".join(_jsonl_line(action, member) for member in batch.members)
        escape = escape_formula if self.options.escape_formulas else _as_is

        def row(member: Member) -> bytes:
            cells = [
                member.key,
                *(csv_cell(member.identifiers.get(name)) for name in identifiers),
                *(csv_cell(member.fields.get(name)) for name in fields),
            ]
            return _csv_line([action, *map(escape, cells)])

        return b"".join(row(member) for member in batch.members)

    def _error(self, problem: str, hint: str = "check the disk and `path`") -> Exception:
        return FatalDestinationError(f"{problem}; {hint}", destination=self.display_name)


def _as_is(cell: str) -> str:
    return cell


def _csv_line(cells: list[str]) -> bytes:
    """One CSV record ending in LF. The writer's terminator is CRLF only because its minimal
    quoting quotes the characters of the terminator: a cell holding a bare CR is quoted too (RFC
    4180), where with LF it was not and readers split the row there."""
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\r\n").writerow(cells)
    return buffer.getvalue()[:-2].encode() + b"\n"


def _jsonl_line(action: str, member: Member) -> bytes:
    document = {
        "action": action,
        "key": member.key,
        "identifiers": member.identifiers,
        "fields": member.fields,
    }
    return json_bytes(document) + b"\n"


def _cut_partial_line(handle: IO[bytes]) -> int:
    """Truncate a last line left unfinished by a crash; returns the size kept."""
    end = keep = handle.seek(0, os.SEEK_END)
    while keep > 0:
        start = max(0, keep - 65536)
        handle.seek(start)
        newline = handle.read(keep - start).rfind(b"\n")
        keep = start + newline + 1 if newline >= 0 else start
        if newline >= 0:
            break
    if keep != end:
        handle.truncate(keep)
        os.fsync(handle.fileno())
    return keep


def _fsync_folder(folder: Path) -> None:
    """Make a newly created file's directory entry durable (POSIX; skipped where unsupported)."""
    with contextlib.suppress(OSError):
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
