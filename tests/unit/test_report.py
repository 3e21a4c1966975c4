"""What the CLI prints about runs and rows (`connector.report`)."""

from __future__ import annotations

import io

from rich.console import Console

from connector.report import TABLE_CELL_MAX, TerminalConsole, counted, rows_output, terminal_safe


def printed(output: str, rows: list[list[object]]) -> str:
    buffer = io.StringIO()
    console = Console(file=buffer, width=10_000, markup=False)
    rows_output(["key", "note"], rows, output=output, console=console)
    return buffer.getvalue()


def test_a_huge_value_is_cut_in_a_table_and_whole_in_json_and_csv() -> None:
    huge = "x" * 5_000_000
    table = printed("table", [["1", huge]])
    assert len(table) < 10 * TABLE_CELL_MAX  # the cut value and its table borders
    assert "5,000,000 characters; --output json or csv shows all" in table
    assert huge in printed("csv", [["1", huge]])
    assert huge in printed("json", [["1", huge]])


def test_counts_read_as_english() -> None:
    assert [counted(n, "batch", "batches") for n in (0, 1, 2)] == [
        "0 batches",
        "1 batch",
        "2 batches",
    ]
    assert counted(1, "sync") == "1 sync"
    assert counted(3, "sync") == "3 syncs"


def test_control_characters_of_data_reach_the_terminal_as_escapes() -> None:
    """A destination's reason or a customer's name holding escape sequences (window title,
    clear screen, a hidden link) or a direction override is shown, not acted on."""
    hostile = "\x1b]0;PWNED\x07\x1b[2Jgone \x1b]8;;http://evil\x1b\\link \u202eevil\u202c"
    buffer = io.StringIO()
    console = TerminalConsole(file=buffer, force_terminal=True, width=300, markup=False)
    rows_output(["key", "reason"], [["1", hostile]], output="table", console=console)
    console.print(f"error: {hostile}", highlight=False)
    shown = buffer.getvalue()
    for sequence in ("\x1b]", "\x1b[2J", "\x07", "\u202e"):
        assert sequence not in shown
    assert "\\x1b]0;PWNED\\x07\\x1b[2Jgone" in shown
    assert "\\u202eevil\\u202c" in shown


def test_terminal_safe_keeps_ordinary_text() -> None:
    text = "José 日本 O'Brien\tnext\nline [bold]"
    assert terminal_safe(text) == text
