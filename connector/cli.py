"""The `winback` command line. Only this module uses typer and turns errors into exit codes.

Results go to stdout; progress, logs and errors go to stderr. Exit codes: 0 success, 1 a sync
failed, 2 usage or configuration error, 3 partial (rows rejected), 4 aborted by a guard, 5 locked.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import signal
import sys
import traceback
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.logging import RichHandler
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from connector import __version__
from connector.collector import tune_garbage_collector
from connector.config import WinbackConfig, load_config, resolve_config_path
from connector.errors import (
    ConfigError,
    ConfigProblem,
    StateError,
    Terminated,
    WarehouseError,
    WinbackError,
)
from connector.interrupts import redeliver_dropped_stops, stop_on_sigterm
from connector.report import TerminalConsole
from destinations.base import RedactingLogFilter, SyncContext, redact_text
from destinations.registry import load_registry

if TYPE_CHECKING:
    from connector.run_result import RunResult

app = typer.Typer(
    help="winback: keep inactive-customer segments from your warehouse in sync with ad "
    "platforms and email tools.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,  # plain help, as the README shows it (rich's boxes added `<bool>`
)  # to every flag with recent typer releases)
config_app = typer.Typer(
    help="Check the configuration file.", no_args_is_help=True, rich_markup_mode=None
)
segments_app = typer.Typer(help="Inspect segments.", no_args_is_help=True, rich_markup_mode=None)
destinations_app = typer.Typer(
    help="Inspect destination adapters.", no_args_is_help=True, rich_markup_mode=None
)
sync_app = typer.Typer(help="Run and inspect syncs.", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(config_app, name="config")
app.add_typer(segments_app, name="segments")
app.add_typer(destinations_app, name="destinations")
app.add_typer(sync_app, name="sync")

# Pipes and CI logs get wide tables instead of the 80-column fallback.
# markup=False: messages and table cells carry user text (`[warehouse] url`, SQL errors, warehouse
# values) that rich would otherwise read as markup, dropping it or failing on `[/...]`.
# TerminalConsole: control characters of customer data or a destination's answer are shown as
# escapes, never sent to the terminal.
stdout = TerminalConsole(soft_wrap=True, width=None if sys.stdout.isatty() else 160, markup=False)
stderr = TerminalConsole(stderr=True, markup=False, soft_wrap=not sys.stderr.isatty())


class TextOrJson(StrEnum):
    text = "text"
    json = "json"


class RowsFormat(StrEnum):
    table = "table"
    json = "json"
    csv = "csv"


@dataclass
class Settings:
    config_path: Path | None = None
    verbosity: int = 0
    document_written: bool = False
    """Set once the command printed its JSON document on stdout."""
    leave_at_once: bool = False
    """Set once a stopped run is recorded: exit without waiting for requests still in flight."""


settings = Settings()


class CommandRefused(Exception):
    """The command cannot run as asked (an unknown sync, a bad date...): `main` prints the
    message as an error paragraph and exits with `code`."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def fail(message: str, code: int) -> NoReturn:
    raise CommandRefused(message, code)


def exit_code_for(error: WinbackError) -> int:
    return 2 if isinstance(error, ConfigError) else 1


def open_config() -> WinbackConfig:
    return load_config(resolve_config_path(settings.config_path))


def parse_as_of(value: str | None) -> dt.date | None:
    if value is None:
        return None
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        fail(f"--as-of `{value}` is not a date; use YYYY-MM-DD", 2)


def _print_version(value: bool) -> None:
    if value:
        stdout.print(f"winback {__version__}", highlight=False)
        raise typer.Exit(0)


@app.callback()
def global_options(
    config: Annotated[
        Path | None,
        typer.Option(
            "--config", "-c", help="Config file (default: ./winback.toml, or $WINBACK_CONFIG)."
        ),
    ] = None,
    verbose: Annotated[
        int,
        typer.Option("--verbose", "-v", count=True, help="More logs and tracebacks; -vv debug."),
    ] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only errors on stderr.")] = False,
    version: Annotated[
        bool,
        typer.Option(
            "--version", help="Print the version and exit.", is_eager=True, callback=_print_version
        ),
    ] = False,
) -> None:
    """Global options apply to every command."""
    settings.config_path = config
    settings.verbosity = -1 if quiet else verbose
    level = {-1: logging.ERROR, 0: logging.WARNING, 1: logging.INFO}.get(
        settings.verbosity, logging.DEBUG
    )
    handler = _log_handler()
    handler.addFilter(RedactingLogFilter())
    logging.basicConfig(level=level, format="%(message)s", force=True, handlers=[handler])


def _log_handler() -> logging.Handler:
    """Rich's layout on a terminal; elsewhere (cron, an orchestrator's log) one plain line per
    record with its time, never wrapped or cut at 80 columns."""
    if stderr.is_terminal:
        return RichHandler(console=stderr, show_path=False, show_time=False)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    return handler


# -- init ---------------------------------------------------------------------------------------


@app.command()
def init(
    demo: Annotated[
        bool, typer.Option("--demo", help="Also build a DuckDB demo warehouse.")
    ] = False,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing config.")] = False,
) -> None:
    """Write winback.toml (with --demo: a demo warehouse and syncs to local files)."""
    path = resolve_config_path(settings.config_path)
    if path.exists() and not force:
        fail(f"`{path}` already exists; pass --force to overwrite it", 2)
    try:
        _write_starter_files(path, demo=demo)
    except OSError as error:
        where = error.filename or path
        fail(
            f"cannot write `{where}`: {error.strerror or error}; run `winback init` in a folder "
            "you may write to, or pass --config with such a path",
            1,
        )


def _write_starter_files(path: Path, *, demo: bool) -> None:
    from connector.demo import DEMO_WAREHOUSE, build_demo_warehouse, demo_config_text
    from connector.starter import STARTER_CONFIG

    path.parent.mkdir(parents=True, exist_ok=True)
    if demo:
        counts = build_demo_warehouse(path.parent / DEMO_WAREHOUSE)
        path.write_text(demo_config_text(), encoding="utf-8")
        summary = ", ".join(f"{n} {table}" for table, n in counts.items())
        stderr.print(f"built demo warehouse {path.parent / DEMO_WAREHOUSE} ({summary})")
        winback = _winback_for(path)
        stderr.print(f"wrote {path}; next: `{winback} sync plan`, then `{winback} sync run`")
    else:
        path.write_text(STARTER_CONFIG, encoding="utf-8")
        stderr.print(f"wrote {path}; edit it, then run `{_winback_for(path)} config validate`")


def _winback_for(config: Path) -> str:
    """The command to type for this config from here: `winback`, or with its `--config`."""
    if resolve_config_path(None).resolve() == config.resolve():
        return "winback"
    return f"winback --config {config}"


# -- config -------------------------------------------------------------------------------------


@config_app.command("validate")
def config_validate() -> None:
    """Parse the config, resolve env vars, check that every segment compiles and runs."""
    from connector.report import counted
    from connector.segments import column_problems, effective_as_of, probe_columns
    from connector.warehouse import create_warehouse_engine

    config = open_config()
    try:
        engine = create_warehouse_engine(config.warehouse.url)
    except WarehouseError as error:  # e.g. a missing DuckDB file: reported like any problem
        raise ConfigError(
            [ConfigProblem("warehouse.url", str(error))], source=str(config.path)
        ) from None
    problems: list[ConfigProblem] = []
    columns_of: dict[str, list[str]] = {}  # each segment is probed once, then reused per sync
    try:
        for name, segment in config.segments.items():
            try:
                columns_of[name] = probe_columns(
                    name, segment, engine=engine, as_of=effective_as_of(segment, None)
                )
            except ConfigError as error:
                problems.extend(error.problems)
            except WinbackError as error:
                problems.append(ConfigProblem(f"segments.{name}", str(error)))
        for name, sync in config.syncs.items():
            columns = columns_of.get(sync.segment)
            if columns is None:
                continue  # the segment's problem is already reported
            segment, mapping = config.segments[sync.segment], sync.mapped_options()
            problems += column_problems(sync.segment, segment, columns, sync=name, mapping=mapping)
    finally:
        engine.dispose()
    if problems:
        raise ConfigError(problems, source=str(config.path))
    stdout.print(
        f"{config.path}: valid — {counted(len(config.segments), 'segment')}, "
        f"{counted(len(config.destinations), 'destination')}, "
        f"{counted(len(config.syncs), 'sync')}",
        highlight=False,
    )


# -- segments -----------------------------------------------------------------------------------


@segments_app.command("list")
def segments_list() -> None:
    """List the segments of the config and the syncs that use them."""
    from connector.rules import RulesSegment

    config = open_config()
    table = Table("segment", "type", "key", "used by")
    for name, segment in config.segments.items():
        kind = "rules" if isinstance(segment, RulesSegment) else ("file" if segment.file else "sql")
        users = [s for s, sync in config.syncs.items() if sync.segment == name]
        table.add_row(name, kind, segment.key, ", ".join(users) or "-")
    stdout.print(table)


@segments_app.command("preview")
def segments_preview(
    name: Annotated[str, typer.Argument(help="Segment name.")],
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, help="Rows to show.")] = 20,
    as_of: Annotated[str | None, typer.Option("--as-of", help="Reference date YYYY-MM-DD.")] = None,
    output: Annotated[
        RowsFormat, typer.Option("--output", "-o", help="table, json or csv.")
    ] = RowsFormat.table,
) -> None:
    """Show the first rows of a segment as the warehouse returns them."""
    from connector.report import rows_output
    from connector.segments import effective_as_of, read_segment
    from connector.warehouse import create_warehouse_engine

    config = open_config()
    segment = config.segments.get(name)
    if segment is None:
        fail(f"segment `{name}` is not defined; defined: {', '.join(config.segments) or 'none'}", 2)
    engine = create_warehouse_engine(config.warehouse.url)
    try:
        rows: list[Any] = []
        reference = effective_as_of(segment, parse_as_of(as_of))
        chunk = limit if output is not RowsFormat.csv else 10_000
        with read_segment(
            name, segment, engine=engine, as_of=reference, chunk_size=min(chunk, 10_000)
        ) as (columns, chunks):
            for part in chunks:
                rows.extend(part)
                if len(rows) >= limit:
                    break
        rows = rows[:limit]
    finally:
        engine.dispose()
    title = f"{name} (as of {reference}, first {len(rows)} rows)"
    rows_output(columns, rows, output=output.value, console=stdout, title=title)


@segments_app.command("explain")
def segments_explain(
    name: Annotated[str, typer.Argument(help="Rules segment name.")],
    as_of: Annotated[str | None, typer.Option("--as-of", help="Reference date YYYY-MM-DD.")] = None,
) -> None:
    """Print a rules segment's compiled SQL and how many people each signal finds inactive."""
    from connector.rules import RulesSegment, explain_rules
    from connector.segments import effective_as_of
    from connector.warehouse import create_warehouse_engine

    config = open_config()
    segment = config.segments.get(name)
    if segment is None:
        fail(f"segment `{name}` is not defined; defined: {', '.join(config.segments) or 'none'}", 2)
    if not isinstance(segment, RulesSegment):
        fail(
            f"segment `{name}` is a SQL segment; explain works on rules segments (`from = ...`)", 2
        )
    engine = create_warehouse_engine(config.warehouse.url)
    try:
        explanation = explain_rules(  # the SQL is printed first, even when counting fails
            name,
            segment,
            as_of=effective_as_of(segment, parse_as_of(as_of)),
            engine=engine,
            on_sql=lambda sql: stdout.print(sql, highlight=False),
        )
    finally:
        engine.dispose()
    table = Table("signal", "inactive", "active", "never", title=f"{name}: signals")
    for rule_signal in explanation.signals:
        table.add_row(
            rule_signal.name,
            str(rule_signal.inactive),
            str(rule_signal.active),
            str(rule_signal.never),
        )
    stdout.print(table)
    stdout.print(f"qualifying people: {explanation.qualifying}", highlight=False)


# -- destinations -------------------------------------------------------------------------------


@destinations_app.command("list")
def destinations_list() -> None:
    """Installed adapters (from the `winback.destinations` entry points) and their options."""
    registry = load_registry()
    table = Table("type", "options", "sync options", "identifiers", "updates", title="adapters")
    for name, adapter in sorted(registry.adapters.items()):
        options = [
            f"{field}{'' if info.is_required() else '?'}"
            for field, info in adapter.options_model.model_fields.items()
            if field != "type"
        ]
        sync_options = list(adapter.sync_options_model.model_fields)
        table.add_row(
            name,
            ", ".join(options),
            ", ".join(sync_options) or "-",
            ", ".join(sorted(adapter.accepted_identifiers)),
            "yes" if adapter.supports_update else "no",
        )
    stdout.print(table)
    for name, problem in sorted(registry.broken.items()):
        stderr.print(f"warning: adapter `{name}` unavailable: {problem}", style="yellow")


@destinations_app.command("check")
def destinations_check(
    name: Annotated[str, typer.Argument(help="Destination name from the config.")],
    audience: Annotated[
        str | None,
        typer.Option(
            "--audience",
            help="Target id to check (default: the audience of the first sync using it).",
        ),
    ] = None,
) -> None:
    """Check credentials and that the target is reachable (read-only call)."""
    config = open_config()
    destination = config.destinations.get(name)
    if destination is None:
        fail(
            f"destination `{name}` is not defined; defined: {', '.join(config.destinations) or 'none'}",
            2,
        )
    sync_name = next((s for s, sync in config.syncs.items() if sync.destination == name), None)
    sync = config.syncs.get(sync_name) if sync_name else None
    context = SyncContext(
        sync=sync_name or "check",
        run_id="check",
        audience=audience or (sync.audience if sync else None),
        options=config.sync_options[sync_name]
        if sync_name
        else destination.adapter.sync_options_model(),
        retry=config.retry,
        identifier_names=tuple(sync.identifiers) if sync else (),
        field_names=tuple(sync.fields) if sync else (),
        destination_name=name,
    )
    adapter = destination.adapter(destination.options, context)
    try:
        description = adapter.check()
    finally:
        adapter.close()
    stdout.print(f"{name} ({destination.adapter.name}): ok — {description}", highlight=False)


# -- sync ---------------------------------------------------------------------------------------


class RichReporter:
    """Progress bars on stderr, only when stderr is a terminal."""

    def __init__(self) -> None:
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.completed:,}"),
            TimeElapsedColumn(),
            console=stderr,
            transient=True,
        )
        self.task: TaskID | None = None

    def phase(self, description: str, total: int | None) -> None:
        if self.task is not None:
            self.progress.remove_task(self.task)
        self.task = self.progress.add_task(description, total=total)

    def advance(self, amount: int) -> None:
        if self.task is not None:
            self.progress.advance(self.task, amount)


def _selected_syncs(config: WinbackConfig, names: list[str] | None) -> list[str]:
    if not names:
        if not config.syncs:
            fail(f"{config.path} defines no [syncs.*]; add one (see config.example.toml)", 2)
        return list(config.syncs)
    unknown = [n for n in names if n not in config.syncs]
    if unknown:
        fail(
            f"unknown sync {', '.join(f'`{u}`' for u in unknown)}; defined: "
            f"{', '.join(config.syncs) or 'none'}",
            2,
        )
    return list(dict.fromkeys(names))  # a name given twice runs once


def _run_syncs(
    names: list[str] | None,
    *,
    dry_run: bool,
    force: bool,
    full_resync: bool,
    as_of: str | None,
    output: TextOrJson,
) -> None:
    from connector.report import print_runs
    from connector.run_result import combined_exit_code
    from connector.sync import RunOptions, SyncRunner

    try:
        config = open_config()
        selected = _selected_syncs(config, names)
        options = RunOptions(
            dry_run=dry_run, force=force, full_resync=full_resync, as_of=parse_as_of(as_of)
        )
    except (WinbackError, CommandRefused) as error:
        _nothing_ran(output, error)
        raise
    use_progress = stderr.is_terminal and settings.verbosity >= 0 and output is TextOrJson.text
    reporter = RichReporter() if use_progress else None
    runner = SyncRunner(config, reporter=reporter, dry_run=dry_run)
    try:
        runner.store  # noqa: B018 - unusable, it is one error for the command, not one per sync
    except StateError as error:
        runner.close()
        _nothing_ran(output, error)
        raise
    results = []
    try:
        if reporter is not None:
            reporter.progress.start()
        for name in selected:
            try:
                result = runner.run(name, options)
            except StateError as error:  # the run ended but could not be recorded
                result = _unrecorded(runner.last_result, error)
            results.append(result)
            if settings.verbosity > 1 and result.error and sys.exc_info()[0] is None:
                logging.getLogger("winback").debug("run %s: %s", result.run_id, result.error)
    except KeyboardInterrupt as interrupt:
        terminated = isinstance(interrupt, Terminated)
        kept = (
            "nothing was sent"
            if dry_run
            else "every batch the destination acknowledged is recorded (see `winback sync "
            "history`) and the next run sends the rest"
        )
        message = f"{'stopped by SIGTERM' if terminated else 'interrupted'}; {kept}"
        code = 143 if terminated else 130
        stopped = runner.last_result
        if stopped is not None and stopped not in results:
            results.append(stopped)  # recorded as failed by the runner
        if output is TextOrJson.json:
            _print_runs_document(results, code, message)
        else:  # the syncs that finished before it too
            print_runs(stdout, results)
        stderr.print(f"error: {message}", style="red", highlight=False, soft_wrap=True)
        settings.leave_at_once = True
        raise typer.Exit(code) from None
    finally:
        if reporter is not None:
            reporter.progress.stop()
        runner.close()
    code = combined_exit_code(results)
    if output is TextOrJson.json:
        _print_runs_document(results, code)
    else:
        print_runs(stdout, results)
    # Results go to stdout; the reason a sync did not succeed goes to stderr, in both formats.
    for result in results:
        if result.error:
            kind = "warning" if result.status == "dry_run" else "error"
            stderr.print(
                f"{kind}: sync `{result.sync}` {result.status}: {result.error}",
                style="red",
                highlight=False,
                soft_wrap=True,
            )
    raise typer.Exit(code)


def _unrecorded(result: RunResult | None, error: StateError) -> RunResult:
    """A run the state store failed to record at its end (the database went away): failed,
    with its own error (if any) and the state store's; the other syncs still run."""
    if result is None:  # pragma: no cover - `run` sets it first thing
        raise error
    failure = redact_text(str(error))
    if not result.error:
        result.error = f"recording the run failed: {failure}"
    elif failure not in result.error:  # else the run's own error says it already
        result.error = f"{result.error}; then recording the run failed: {failure}"
    result.status = "failed"
    return result


def _nothing_ran(output: TextOrJson, error: WinbackError | CommandRefused) -> None:
    """Before any run: stderr will say why (`main`), and so does the JSON document."""
    if output is TextOrJson.json:
        code = error.code if isinstance(error, CommandRefused) else exit_code_for(error)
        _print_runs_document([], code, redact_text(str(error)))


def _print_runs_document(results: list[RunResult], code: int, error: str | None = None) -> None:
    """The JSON document of `sync run|plan --output json` on stdout (once per command)."""
    from connector.report import runs_json

    stdout.file.write(runs_json(results, code, error) + "\n")
    settings.document_written = True


SyncNames = Annotated[list[str] | None, typer.Argument(help="Sync names (default: all).")]
AsOf = Annotated[
    str | None,
    typer.Option("--as-of", help="Reference date YYYY-MM-DD for rules segments and `:as_of`."),
]
Output = Annotated[
    TextOrJson, typer.Option("--output", "-o", help="text or json (one document on stdout).")
]


@sync_app.command("run")
def sync_run(
    names: SyncNames = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Plan only: counts and samples, no writes.")
    ] = False,
    force: Annotated[
        bool, typer.Option("--force", help="Override the empty-segment and mass-removal guards.")
    ] = False,
    full_resync: Annotated[
        bool, typer.Option("--full-resync", help="Re-send every member, not only changes.")
    ] = False,
    as_of: AsOf = None,
    output: Output = TextOrJson.text,
) -> None:
    """Read each segment, diff it with the last sync and send the changes."""
    _run_syncs(
        names, dry_run=dry_run, force=force, full_resync=full_resync, as_of=as_of, output=output
    )


@sync_app.command("plan")
def sync_plan(
    names: SyncNames = None,
    full_resync: Annotated[
        bool, typer.Option("--full-resync", help="Plan re-sending every member.")
    ] = False,
    as_of: AsOf = None,
    output: Output = TextOrJson.text,
) -> None:
    """Same as `sync run --dry-run`: counts and samples, no writes anywhere; says when a
    guard would abort the real run."""
    _run_syncs(
        names, dry_run=True, force=False, full_resync=full_resync, as_of=as_of, output=output
    )


@sync_app.command("status")
def sync_status(names: SyncNames = None) -> None:
    """Last run, audience size and lock of each sync."""
    from connector.state import StateStore

    config = open_config()
    store = StateStore.for_reading(config.state.url)
    table = Table(
        "sync",
        "destination",
        "audience",
        "members",
        "last run (UTC)",
        "status",
        "pending",
        "running",
    )
    try:
        for name in _selected_syncs(config, names):
            sync = config.syncs[name]
            last = store.history(name, 1)
            holder = store.lock_holder(name, live_only=True)  # a dead run's lock is no run
            status = last[0].status if last else "-"
            if status == "running" and holder is None:
                status = "interrupted"  # its process is gone (the next run records it so)
            table.add_row(
                name,
                sync.destination,
                sync.audience or "-",
                _members(store, name),
                f"{last[0].started_at:%Y-%m-%d %H:%M:%S}" if last else "never",
                status,
                _pending(last[0], status) if last and not store.starts_over(name) else "full sync",
                f"pid {holder.pid} on {holder.host}" if holder else "no",
            )
    finally:
        store.dispose()
    stdout.print(table)


def _members(store: Any, sync: str) -> str:
    """Members the destination acknowledged, then those in doubt: sent by a run that stopped
    (or is still running) before the destination answered; the next run settles them."""
    members, in_doubt = store.member_counts(sync)
    return f"{members} (+{in_doubt} unconfirmed)" if in_doubt else str(members)


def _pending(run: Any, status: str) -> str:
    """Changes the last run (in `status`) planned but did not get acknowledged (resent by the
    next run)."""
    left = {
        "+": run.planned_add - run.sent_add,
        "-": run.planned_remove - run.sent_remove,
        "~": run.planned_update - run.sent_update,
    }
    if status in ("success", "partial"):
        return "none"
    parts = " ".join(f"{sign}{count}" for sign, count in left.items() if count > 0)
    if status == "aborted":  # planned in full, nothing sent
        return parts or "none"
    if status == "running":
        return "run in progress"
    # Failed or interrupted: a first sync stops before it has read the whole segment.
    return f"at least {parts}" if parts else "unknown (`winback sync plan` counts it)"


@sync_app.command("history")
def sync_history(
    name: Annotated[str, typer.Argument(help="Sync name.")],
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, help="Runs to show.")] = 20,
    output: Output = TextOrJson.text,
) -> None:
    """Past runs of a sync, newest first."""
    import json

    from connector.state import StateStore

    config = open_config()
    _selected_syncs(config, [name])
    store = StateStore.for_reading(config.state.url)
    try:
        rows = store.history(name, limit)
        holder = store.lock_holder(name, live_only=True)
    finally:
        store.dispose()
    live_run = holder.run_id if holder is not None else None

    def status(run: Any) -> str:
        """`running` only for the run holding a live lock; one whose process died shows as
        `interrupted` (the next run records it so)."""
        return "interrupted" if run.status == "running" and run.run_id != live_run else run.status

    if output is TextOrJson.json:
        records = [
            {k: _history_value(v) for k, v in r._mapping.items()} | {"status": status(r)}
            for r in rows
        ]
        stdout.file.write(json.dumps(records, indent=2) + "\n")
        return
    table = Table(
        "run",
        "started (UTC)",
        "status",
        "rows",
        "skipped",
        "+",
        "-",
        "~",
        "rejected",
        "retries",
        "s",
        "error",
    )
    for r in rows:
        table.add_row(
            r.run_id,
            f"{r.started_at:%Y-%m-%d %H:%M:%S}",
            status(r),
            str(r.segment_rows),
            str(r.skipped),
            f"{r.sent_add}/{r.planned_add}",
            f"{r.sent_remove}/{r.planned_remove}",
            f"{r.sent_update}/{r.planned_update}",
            str(r.rejected),
            str(r.retries),
            f"{r.duration_s or 0:.2f}",
            r.error or "",
        )
    stdout.print(table)


def _history_value(value: Any) -> Any:
    """A run record's value as JSON; its times are UTC and say so (`...+00:00`)."""
    from destinations.base import json_value

    if isinstance(value, dt.datetime) and value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return json_value(value)


@sync_app.command("issues")
def sync_issues(
    name: Annotated[str, typer.Argument(help="Sync name.")],
    run: Annotated[
        str | None, typer.Option("--run", help="Run id (default: the sync's last run).")
    ] = None,
    limit: Annotated[
        int | None,
        typer.Option(
            "--limit",
            "-n",
            min=1,
            help="Rows to show (default: 50 in a table, all in json or csv).",
        ),
    ] = None,
    output: Annotated[
        RowsFormat, typer.Option("--output", "-o", help="table, json or csv.")
    ] = RowsFormat.table,
) -> None:
    """Rows a run could not send as they were, with the reason: skipped (no usable
    identifier, null or repeated key), sent without an invalid identifier (dropped), or
    rejected by the destination."""
    from connector.report import rows_output
    from connector.state import StateStore

    config = open_config()
    _selected_syncs(config, [name])
    store = StateStore.for_reading(config.state.url)
    try:
        if run is None:
            last = store.history(name, 1)
            if not last:
                fail(f"sync `{name}` has not run yet; run `winback sync run {name}` first", 2)
            run = str(last[0].run_id)
        elif not any(r.run_id == run for r in store.history(name, config.state.keep_runs)):
            fail(f"no run `{run}` of sync `{name}`; see `winback sync history {name}`", 2)
        if store.issues_pruned(run):
            kept = config.state.keep_issue_runs
            fail(
                f"the row issues of run `{run}` of sync `{name}` were pruned: `[state] "
                f"keep_issue_runs = {kept}` keeps them for the newest {kept} runs of each sync "
                f"(raise it to keep more); the run's counts are in `winback sync history {name}`",
                2,
            )
        columns = ["kind", "action", "key", "reason"]
        if output is not RowsFormat.table:  # written as they are read: there may be millions
            issues = store.each_issue(run, limit)
            rows_output(
                columns,
                ([r.kind, r.action, r.key, r.reason] for r in issues),  # None: null in json
                output=output.value,
                console=stdout,
            )
            return
        limit = limit or ISSUES_SHOWN
        rows = store.issues(run, limit + 1)
    finally:
        store.dispose()
    more = len(rows) > limit
    rows = rows[:limit]
    if not rows:
        stdout.print(f"{name}: run {run} recorded no row issues", highlight=False)
        return
    rows_output(
        columns,
        ([r.kind, r.action, r.key, r.reason] for r in rows),  # None: empty in a table
        output=output.value,
        console=stdout,
        title=f"{name}: row issues of run {run}"
        + (f" (the first {limit}; --limit N, or -o csv for all)" if more else ""),
    )


ISSUES_SHOWN = 50
"""Row issues `sync issues` shows in a table unless `--limit` says otherwise."""


@sync_app.command("reset")
def sync_reset(
    name: Annotated[str, typer.Argument(help="Sync name.")],
    yes: Annotated[bool, typer.Option("--yes", help="Confirm: forget the snapshot.")] = False,
) -> None:
    """Forget a sync's snapshot: the next run sends the whole segment as adds. For a sync no
    longer in the config (removed or renamed), forget its history too."""
    from connector.state import StateStore

    config = open_config()
    removed = name not in config.syncs
    if removed:
        reader = StateStore.for_reading(config.state.url)
        try:
            known = name in reader.known_syncs()
        finally:
            reader.dispose()
        if not known:
            _selected_syncs(config, [name])  # says which syncs there are
    if not yes:
        fail(
            "this forgets what winback sent for this sync (removals will no longer be possible "
            "for those members); rerun with --yes to confirm",
            2,
        )
    store = StateStore(config.state.url)
    try:
        holder = store.lock_holder(name, live_only=True)  # a dead run's lock is taken over
        if holder is not None:
            fail(
                f"sync `{name}` is running (pid {holder.pid} on {holder.host}); try again later", 5
            )
        forgotten = store.forget_sync(name) if removed else store.reset(name)
    finally:
        store.dispose()
    if removed:
        stdout.print(
            f"{name}: not in the config any more; forgot its {forgotten} snapshot rows, its runs "
            "and its row issues",
            highlight=False,
        )
        return
    stdout.print(f"{name}: forgot {forgotten} snapshot rows; the next run is a full sync")


def main() -> None:
    """Console entry point: runs the app and maps winback errors to exit codes.

    Usage errors are printed as click prints them (exit 2); everything winback raises is
    printed as one paragraph (traceback with -v) with its documented exit code.
    """
    tune_garbage_collector()
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    sys.unraisablehook = redeliver_dropped_stops  # a stop raised in a weakref callback
    try:
        app()
    except SystemExit as leaving:
        stop = _stop_behind(leaving) if leaving.code == 130 and not settings.leave_at_once else None
        if stop is not None:  # typer turns a Ctrl-C outside a run into a silent exit 130
            terminated = isinstance(stop, Terminated)
            message = "stopped by SIGTERM" if terminated else "interrupted"
            stderr.print(f"error: {message}", style="red", highlight=False, soft_wrap=True)
            sys.exit(143 if terminated else 130)
        if leaving.code == 2 and not settings.document_written:
            _usage_error_document(sys.argv[1:])
        if settings.leave_at_once:
            _leave_at_once(leaving.code)
        raise
    except CommandRefused as refused:
        stderr.print(f"error: {refused}", style="red", highlight=False, soft_wrap=True)
        sys.exit(refused.code)
    except WinbackError as error:
        _print_traceback_if_asked()
        stderr.print(
            f"error: {redact_text(str(error))}", style="red", highlight=False, soft_wrap=True
        )
        sys.exit(exit_code_for(error))
    except Exception as error:
        _print_traceback_if_asked()
        stderr.print(
            f"error: unexpected {type(error).__name__}: {redact_text(str(error))}. Rerun with -v for the "
            "traceback and report it.",
            style="red",
            highlight=False,
            soft_wrap=True,
        )
        sys.exit(1)


def _stop_behind(leaving: SystemExit) -> KeyboardInterrupt | None:
    """The Ctrl-C or SIGTERM (`Terminated`) that typer turned into `leaving`, if any."""
    error: BaseException | None = leaving
    while error is not None and not isinstance(error, KeyboardInterrupt):
        error = error.__cause__ or error.__context__
    return error


def _usage_error_document(args: list[str]) -> None:
    """Click refused the command line (exit 2, its message on stderr): `sync run|plan
    --output json` still prints the JSON document a caller parses, with `runs` empty."""
    if _asks_for_runs_document(args):
        message = "usage error: the command line is not valid; see the message on stderr and --help"
        _print_runs_document([], 2, message)


def _asks_for_runs_document(args: list[str]) -> bool:
    """Whether the command line is `sync run` or `sync plan` with JSON output (read from the
    words themselves: click stopped before it could parse them)."""
    words = [arg for arg in args if not arg.startswith("-")]
    command = any(
        words[i : i + 2] in (["sync", "run"], ["sync", "plan"]) for i in range(len(words))
    )
    json_output = any(
        arg in ("--output=json", "-ojson") or (arg in ("--output", "-o") and following == "json")
        for arg, following in zip(args, [*args[1:], ""], strict=True)
    )
    return command and json_output


def _print_traceback_if_asked() -> None:
    """With -v: the traceback of the error being handled, without secrets (an exception from
    requests quotes the URL, query string included)."""
    if settings.verbosity > 0:
        sys.stderr.write(redact_text(traceback.format_exc()))


def _leave_at_once(code: object) -> None:
    """Exit now, after Ctrl-C or SIGTERM stopped a run that is recorded and unlocked. A thread
    still waiting for a destination's answer would otherwise hold the exit until it comes (up
    to the destination's timeout): its batch is not recorded, and the next run sends it."""
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code if isinstance(code, int) else 1)
