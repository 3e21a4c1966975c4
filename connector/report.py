"""Turns run results, histories and previews into text, JSON or CSV for the CLI."""

from __future__ import annotations

import csv
import json
import unicodedata
from collections.abc import Iterable, Sequence
from typing import IO, Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from connector.run_result import RunResult
from destinations.base import json_value

STATUS_STYLE = {
    "success": "green",
    "dry_run": "cyan",
    "partial": "yellow",
    "aborted": "red",
    "failed": "red",
    "locked": "magenta",
    "running": "blue",
}


def runs_json(results: Sequence[RunResult], exit_code: int, error: str | None = None) -> str:
    """The `--output json` document; `error` says why the runs stopped (a configuration error
    before any run, Ctrl-C or SIGTERM) when no run's own error does."""
    document: dict[str, object] = {"runs": [r.to_json() for r in results], "exit_code": exit_code}
    if error is not None:
        document["error"] = error
    return json.dumps(document, indent=2)


def counted(number: int, noun: str, plural: str | None = None) -> str:
    """`1 batch`, `2 batches`, `0 retries`."""
    if number == 1:
        return f"{number} {noun}"
    return f"{number} {plural or noun + 's'}"


def run_summary(result: RunResult) -> str:
    """One line per run: counts planned and sent."""
    planned, sent = result.planned, result.sent
    if result.status == "dry_run":
        changes = (
            f"would add {planned['add']}, remove {planned['remove']}, update {planned['update']}"
        )
    else:
        changes = (
            f"added {sent['add']}/{planned['add']}, removed {sent['remove']}/{planned['remove']}, "
            f"updated {sent['update']}/{planned['update']}"
        )
    parts = [
        f"{result.sync}: {result.status}",
        f"{result.segment_rows} segment rows",
        f"{result.skipped} skipped",
        changes,
    ]
    if result.status != "dry_run":
        parts += [
            f"{result.rejected} rejected",
            counted(result.batches, "batch", "batches"),
            counted(result.retries, "retry", "retries"),
        ]
    parts.append(f"{result.duration_s:.2f}s")
    return " · ".join(parts)


def print_runs(console: Console, results: Sequence[RunResult]) -> None:
    for result in results:
        style = STATUS_STYLE.get(result.status, "white")
        console.print(run_summary(result), style=style, highlight=False, soft_wrap=True)
        if result.status != "dry_run" and (result.skipped or result.rejected):
            console.print(
                f"  why rows were not sent: winback sync issues {result.sync}", highlight=False
            )
        if result.status == "dry_run":
            for action, keys in result.samples.items():
                if keys:
                    console.print(f"  {action} e.g. {', '.join(keys)}", highlight=False)
            if result.audience_size is not None:
                console.print(f"  audience now: {result.audience_size} members", highlight=False)


_BIDI_CONTROLS = frozenset(chr(c) for c in (*range(0x202A, 0x202F), *range(0x2066, 0x206A)))


def terminal_safe(text: str) -> str:
    """`text` with the characters a terminal would act on shown as escapes (`\x1b`, `\u202e`):
    control characters but line feeds and tabs (escape sequences that set the window title,
    clear the screen or hide a link) and the direction overrides that reorder what is shown.
    Customer data and destination answers reach tables and messages."""
    if text.isprintable():
        return text
    return "".join(
        c
        if c.isprintable() or c in "\n\t"
        else c.encode("unicode_escape").decode("ascii")
        if unicodedata.category(c) == "Cc" or c in _BIDI_CONTROLS
        else c
        for c in text
    )


class TerminalConsole(Console):
    """A rich Console that prints every text through `terminal_safe` (messages and table
    cells); what is written to its file directly (JSON, CSV) is left as it is."""

    def render_str(self, text: str, **kwargs: Any) -> Text:
        return super().render_str(terminal_safe(text), **kwargs)


def rows_output(
    columns: Sequence[str],
    rows: Iterable[Sequence[Any]],
    *,
    output: str,
    console: Console,
    title: str | None = None,
) -> None:
    """Print rows as a rich table, JSON (a list of objects, one per line) or CSV. JSON and CSV
    are written as the rows come, so a million row issues take no more memory than ten."""
    if output == "json":
        _write_json_rows(columns, rows, console.file)
        return
    if output == "csv":
        writer = csv.writer(console.file, lineterminator="\n")
        writer.writerow(columns)
        for row in rows:
            writer.writerow([json_value(v) for v in row])
        return
    table = Table(title=title, show_lines=False)
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*(_cell(json_value(v)) for v in row))
    console.print(table)


def _write_json_rows(columns: Sequence[str], rows: Iterable[Sequence[Any]], file: IO[str]) -> None:
    separator = "[\n"
    for row in rows:
        document = dict(zip(columns, (json_value(v) for v in row), strict=True))
        file.write(separator + "  " + json.dumps(document, ensure_ascii=False))
        separator = ",\n"
    file.write("[]\n" if separator == "[\n" else "\n]\n")


TABLE_CELL_MAX = 500
"""Longest value a table shows in full; json and csv output keep every value whole."""


def _cell(value: Any) -> str:
    text = "" if value is None else str(value)
    if len(text) <= TABLE_CELL_MAX:
        return text
    return f"{text[:TABLE_CELL_MAX]}… ({len(text):,} characters; --output json or csv shows all)"
