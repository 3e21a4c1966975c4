"""CSV or JSON Lines file: every change of a run becomes one line (used by the demo and for audits).

CSV files start with the header ``action,key,<identifiers...>,<fields...>`` (the sync's mapped
identifier and field names, in config order; a field may not be named like another column, which
the config refuses); JSON Lines files hold one object per change,
``{"action": "add", "key": "42", "identifiers": {...}, "fields": {...}}``. Dates are written in
ISO 8601 and missing values as empty cells (CSV) or ``null`` (JSONL).

The file is opened on the first batch (a run without changes creates no file); each batch is
appended, flushed and fsync'd before it is acknowledged. A path without ``{run_id}`` collects
every run (a different CSV header is refused) and may serve one sync only (the config refuses
two syncs writing one file, see `exclusive_target`).

Crash repair: before its first write a run leaves a marker beside the file (``.NAME.writing``,
naming the sync) and removes it when it closes the file whole. A marker left behind means a
killed run may have torn the file's last record: the sync's next run cuts the file back to its
last complete record (the rows cut were never acknowledged, so that run sends them again), for
its own file and for every earlier run's file of the same path pattern (``{run_id}`` as a
wildcard), then removes the marker. In CSV a line break inside a quoted cell does not end a
record: a record ends at a ``\n`` preceded by an even number of ``"`` (quotes in cells are
doubled), so the whole file is counted. JSON lines never hold a raw line break.

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
import errno
import glob
import io
import json
import logging
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
    ExclusiveTarget,
    Member,
    SyncContext,
    json_bytes,
    json_value,
)

log = logging.getLogger("winback.file")

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
        path = path.replace(f"{{{name}}}", _file_name_part(str(getattr(context, name))))
    return Path(path)


def _file_name_part(value: str) -> str:
    """`value` as `{sync}` or `{run_id}` puts it in a path: `eu/lapsed` and `eu lapsed` are
    both `eu_lapsed`."""
    return re.sub(r"[^\w.-]", "_", value).lstrip(".") or "_"


MARKER_SUFFIX = ".writing"


def marker_path(path: Path) -> Path:
    """The marker a run keeps beside the file it writes until it closes it whole."""
    return path.with_name(f".{path.name}{MARKER_SUFFIX}")


def _marker_pattern(template: str, sync: str) -> str:
    """A glob matching the marker of every file `template` gives `sync`, whatever the run."""
    marker = str(marker_path(Path(template.replace("{sync}", _file_name_part(sync)))))
    return "*".join(glob.escape(part) for part in marker.split("{run_id}"))


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
        self._marker: Path | None = None
        """This run's marker, from before its first write until the file is whole again."""
        self._created = False
        """This run created the file."""
        self._written = False
        """A batch was written whole (and acknowledged)."""
        self._torn = False
        """A write failed or was interrupted and was not undone: the last record may be torn."""
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

    @classmethod
    def exclusive_target(cls, options: DestinationOptions, *, sync: str) -> ExclusiveTarget | None:
        """Without `{run_id}` every run of a sync appends to one file, which no other sync may
        write: two runs at the same time would mix their rows and headers."""
        if not isinstance(options, FileOptions) or "{run_id}" in options.path:
            return None  # each run writes a file of its own
        path = os.path.normpath(options.path.replace("{sync}", _file_name_part(sync)))
        if "{sync}" in options.path:
            hint = (
                f"`{{sync}}` writes both sync names as `{_file_name_part(sync)}`: rename one "
                "of the syncs, or give each a destination with a different `path`"
            )
        else:
            hint = (
                "put `{sync}` in `path` (e.g. `exports/{sync}.csv`), or give each sync a "
                "destination with a different `path`"
            )
        return ExclusiveTarget(f"the file `{path}`", hint)

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
        """Close the file; a file this run created but never wrote a batch to whole is removed
        (a failed first write left it empty or torn), and the marker goes once the file is
        whole: a run killed before this keeps it, for the next run to repair the file."""
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None
            if self._created and not self._written:
                self._discard()
            if self._marker is not None and not self._torn:
                with contextlib.suppress(OSError):
                    self._marker.unlink(missing_ok=True)
                    self._marker = None

    def _write(self, action: str, batch: Batch) -> BatchResult:
        # An empty batch is a no-op: nothing to write, and no file is created for it.
        if not batch.members:
            return BatchResult()
        with self._lock:
            handle, columns = self._open(batch)
            start = handle.seek(0, os.SEEK_END)
            header = self._header(columns) if start == 0 else b""
            self._torn = True
            try:
                _write_all(handle, header + self._render(action, batch, columns))
                os.fsync(handle.fileno())
            except OSError as error:
                # Leave no partial batch behind: it is not acknowledged and will be resent.
                with contextlib.suppress(OSError):
                    handle.truncate(start)
                    self._torn = False
                if self._created and not self._written:
                    self._discard()  # an empty file (no CSV header) is of no use to anyone
                raise self._error(f"could not write `{self.path}`: {error.strerror}") from error
            self._torn = False
            self._written = True
        return BatchResult.all_acknowledged(batch)

    def _discard(self) -> None:
        """Remove the file this run created (and its marker): nothing of it was acknowledged."""
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file, self._columns = None, None
        with contextlib.suppress(OSError):
            self.path.unlink(missing_ok=True)
            self._created = self._torn = False
            _fsync_folder(self.path.parent)

    def _open(self, batch: Batch) -> tuple[IO[bytes], Columns]:
        """The open file (opened on first use) and the columns chosen for this run; before
        that, the files earlier runs of the sync were killed writing are repaired."""
        if self._file is not None and self._columns is not None:
            return self._file, self._columns
        columns = self._choose_columns(batch)
        header = self._header(columns)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise self._error(f"could not open `{self.path}`: {error.strerror}") from error
        self._repair_interrupted_runs()
        if header:
            self._check_header(header)
        marker = marker_path(self.path)
        try:
            _write_marker(marker, sync=self.context.sync, run_id=self.context.run_id)
        except OSError as error:
            with contextlib.suppress(OSError):
                marker.unlink(missing_ok=True)
            raise self._error(f"could not write `{marker}`: {error.strerror}") from error
        self._marker = marker
        try:
            created = not self.path.exists()
            handle = _open_unlinked(self.path, "a+b")
        except OSError as error:
            raise self._error(f"could not open `{self.path}`: {error.strerror}") from error
        self._created = created
        _fsync_folder(self.path.parent)  # the marker's directory entry, and a new file's
        self._file, self._columns = handle, columns
        return handle, columns

    def _check_header(self, header: bytes) -> None:
        """Refuse an existing CSV whose header is not this run's (the sync's mapping changed)."""
        try:
            with _open_unlinked(self.path, "rb") as existing:
                first = existing.read(len(header))
                if not first or first == header:
                    return
                first += existing.readline()
        except FileNotFoundError:
            return
        except OSError as error:
            raise self._error(f"could not read `{self.path}`: {error.strerror}") from error
        raise self._error(
            f"`{self.path}` already holds a CSV with other columns "
            f"(`{first.decode(errors='replace').strip()}`)",
            "put {run_id} in `path` or move the file away",
        )

    def _repair_interrupted_runs(self) -> None:
        """Cut the torn last record of the files earlier runs of this sync left a marker beside
        (killed while writing), and of this run's file if it does not end a line."""
        own = marker_path(self.path)
        repaired = False
        for found in sorted(glob.glob(_marker_pattern(self.options.path, self.context.sync))):
            marker = Path(found)
            # The pattern may match another sync's files (`{sync}-{run_id}.csv` for syncs `a`
            # and `a-b`): only this sync's markers are of dead runs (its runs hold a lock).
            if marker == own or _marker_sync(marker) == self.context.sync:
                self._repair(marker.with_name(marker.name[1 : -len(MARKER_SUFFIX)]), marker)
                repaired = repaired or marker == own
        if not repaired and not _ends_a_line(self.path):
            self._repair(self.path, None)  # torn with no marker: by an older winback

    def _repair(self, path: Path, marker: Path | None) -> None:
        """Cut `path` back to its last complete record (removing it when none is left), then
        remove `marker`."""
        try:
            try:
                with _open_unlinked(path, "r+b") as handle:
                    size = handle.seek(0, os.SEEK_END)
                    keep = _last_record_end(handle, size, quoted=self.format == "csv")
                    if keep < size:
                        handle.truncate(keep)
                        os.fsync(handle.fileno())
                        log.warning(
                            "destination `%s`: cut the last %d bytes of `%s`, a record left "
                            "half-written by an interrupted run (not acknowledged: sent again)",
                            self.display_name,
                            size - keep,
                            path,
                        )
                if keep == 0:
                    path.unlink()  # an empty file is of no use (a CSV without its header)
            except FileNotFoundError:
                pass  # the run was killed before it created the file
            if marker is not None:
                marker.unlink(missing_ok=True)
        except OSError as error:
            raise self._error(
                f"could not repair `{path}`, left half-written by an interrupted run: "
                f"{error.strerror}"
            ) from error
        _fsync_folder(path.parent)

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


def _write_all(handle: IO[bytes], data: bytes) -> None:
    """Write `data` to an unbuffered file (a short write is continued; an error leaves no bytes
    in a buffer to be written later, after the failed batch was cut off)."""
    view = memoryview(data)
    while view:
        view = view[handle.write(view) or 0 :]


CHUNK = 1 << 20


def _last_record_end(handle: IO[bytes], size: int, *, quoted: bool) -> int:
    """Where the last complete record of the first `size` bytes ends (0: none).

    A record ends at a `\n`; in CSV (`quoted`) only at one preceded by an even number of `"`,
    as a line break inside a quoted cell follows an odd number (the cell's quotes are doubled),
    so the quotes of the whole file are counted first, then those after each line break from
    the end."""
    quotes = position = 0
    handle.seek(0)
    while quoted and position < size:
        block = handle.read(min(CHUNK, size - position))
        if not block:
            break
        quotes += block.count(b'"')
        position += len(block)
    end = size
    while end > 0:
        start = max(0, end - CHUNK)
        handle.seek(start)
        chunk = handle.read(end - start)
        right = len(chunk)  # quotes counts the quotes before start + right
        while (newline := chunk.rfind(b"\n", 0, right)) >= 0:
            if quoted:
                quotes -= chunk.count(b'"', newline, right)
            if quotes % 2 == 0:
                return start + newline + 1
            right = newline
        if quoted:
            quotes -= chunk.count(b'"', 0, right)
        end = start
    return 0


def _ends_a_line(path: Path) -> bool:
    """Whether `path` is missing, empty or ends with a line break (a cheap test for a file
    torn with no marker)."""
    try:
        with _open_unlinked(path, "rb") as handle:
            size = handle.seek(0, os.SEEK_END)
            if size == 0:
                return True
            handle.seek(size - 1)
            return handle.read(1) == b"\n"
    except FileNotFoundError:
        return True
    except OSError:
        return True  # opening it to write says what is wrong


_OPEN_FLAGS = {
    "rb": os.O_RDONLY,
    "r+b": os.O_RDWR,
    "a+b": os.O_RDWR | os.O_APPEND | os.O_CREAT,
    "wb": os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
}


def _open_unlinked(path: Path, mode: str) -> IO[bytes]:
    """`path` opened unbuffered in `mode`, refusing a symbolic link in its place (ELOOP): in a
    folder others may write to (a shared hand-off folder), a link swapped in between runs
    would have customer data appended to, or a torn record cut from, a file of its choosing."""
    flags = _OPEN_FLAGS[mode] | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        descriptor = os.open(path, flags, 0o666)
    except OSError as error:
        if error.errno == errno.ELOOP:
            error.strerror = (
                "it is a symbolic link, which winback does not follow; point `path` at the "
                "file itself"
            )
        raise
    return os.fdopen(descriptor, mode, buffering=0)


def _write_marker(marker: Path, *, sync: str, run_id: str) -> None:
    """Create the marker (durably: a crash must not leave a torn file without it)."""
    with _open_unlinked(marker, "wb") as handle:
        handle.write(json_bytes({"sync": sync, "run_id": run_id, "pid": os.getpid()}) + b"\n")
        handle.flush()
        os.fsync(handle.fileno())


def _marker_sync(marker: Path) -> str | None:
    """The sync a marker names (None when it cannot be read)."""
    try:
        document = json.loads(marker.read_bytes())
    except (OSError, ValueError):
        return None
    sync = document.get("sync") if isinstance(document, dict) else None
    return sync if isinstance(sync, str) else None


def _fsync_folder(folder: Path) -> None:
    """Make a newly created file's directory entry durable (POSIX; skipped where unsupported)."""
    with contextlib.suppress(OSError):
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
