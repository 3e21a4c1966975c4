"""Documentation is part of the product: these tests fail when something is left undocumented.

As datasette does for its plugins and settings: every CLI command and option is in the README
with its current ``--help``, every key of every config model is in ``config.example.toml`` under
the table it belongs to, every installed adapter has a row in the README's destinations table,
and the example config validates (loaded, and checked against a warehouse with its tables).
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import pytest
import typer.core
import typer.main
from pydantic import BaseModel
from typer.testing import CliRunner, Result

from connector.cli import app
from connector.config import (
    ENV_PATTERN,
    QuerySegment,
    RawConfig,
    StateConfig,
    SyncConfig,
    WarehouseConfig,
    load_config,
)
from connector.errors import ConfigError
from connector.rules import Exclusion, RulesSegment, Signal
from destinations.base import Destination, RetrySettings
from destinations.registry import ENTRY_POINT_GROUP, load_registry

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
EXAMPLE = ROOT / "config.example.toml"
PYPROJECT = ROOT / "pyproject.toml"

# Which model documents the keys of which table of the example ("*" is any one name).
TABLE_MODELS: list[tuple[str, type[BaseModel]]] = [
    ("", RawConfig),
    ("warehouse", WarehouseConfig),
    ("state", StateConfig),
    ("retry", RetrySettings),
    ("segments.*", QuerySegment),
    ("segments.*", RulesSegment),
    ("segments.*.signals", Signal),
    ("segments.*.exclude", Exclusion),
    ("syncs.*", SyncConfig),
]

# The tables the example's segments read (listed in its header comment), for `config validate`.
EXAMPLE_WAREHOUSE = {
    "customers": "customer_id INTEGER, email VARCHAR, phone VARCHAR, first_name VARCHAR, "
    "last_name VARCHAR, country VARCHAR, postal_code VARCHAR, sector VARCHAR, "
    "marketing_opt_in BOOLEAN, account_id VARCHAR, role VARCHAR, signup_date DATE",
    "orders": "order_id INTEGER, customer_id INTEGER, ordered_at TIMESTAMP, status VARCHAR, "
    "amount DECIMAL(10, 2)",
    "email_events": "customer_id INTEGER, event_type VARCHAR, occurred_at TIMESTAMP",
    "web_sessions": "customer_id INTEGER, started_at TIMESTAMP",
    "loyalty_ledger": "customer_id INTEGER, earned_on DATE, points INTEGER",
    "usage_daily": "customer_id INTEGER, day DATE, credits_used DOUBLE",
    "sales_documents": "customer_id INTEGER, doc_type VARCHAR, order_date DATE, invoice_date DATE",
    "disputes": "customer_id INTEGER, status VARCHAR",
    "email_subscriptions": "customer_id INTEGER, status VARCHAR",
}

_HEADER = re.compile(r"^\s*#?\s*\[\[?\s*([A-Za-z0-9_.\-]+)\s*\]\]?\s*(?:#.*)?$")
_KEY = re.compile(r"^\s*#?\s*([A-Za-z_][A-Za-z0-9_]*)\s*=")
_TYPE = re.compile(r'^\s*#?\s*type\s*=\s*"([^"]+)"')
_MULTILINE_STRING = re.compile(r'"""[\s\S]*?"""')


# -- helpers --------------------------------------------------------------------------------------


def readme() -> str:
    return README.read_text(encoding="utf-8")


def example() -> str:
    return EXAMPLE.read_text(encoding="utf-8")


def command_paths() -> list[tuple[str, ...]]:
    """Every command and group of the CLI, as name paths: (), ("sync",), ("sync", "run"), ..."""
    paths: list[tuple[str, ...]] = []

    def walk(command: Any, path: tuple[str, ...]) -> None:
        paths.append(path)
        for name, sub in getattr(command, "commands", {}).items():
            if not getattr(sub, "hidden", False):
                walk(sub, (*path, name))

    walk(typer.main.get_command(app), ())
    return paths


def command_at(path: tuple[str, ...]) -> Any:
    command: Any = typer.main.get_command(app)
    for name in path:
        command = command.commands[name]
    return command


def is_group(path: tuple[str, ...]) -> bool:
    return bool(getattr(command_at(path), "commands", None))


def long_options(path: tuple[str, ...]) -> list[str]:
    command = command_at(path)
    return [
        option
        for param in command.params
        if param.param_type_name == "option"
        for option in param.opts
        if option.startswith("--")
    ]


@dataclass
class ExampleTables:
    """What config.example.toml documents, commented-out lines included."""

    keys: dict[str, set[str]] = field(default_factory=dict)
    """Table path ("" for the top level) -> keys written as `key =` or `# key =`, and sub-tables."""
    types: dict[str, str] = field(default_factory=dict)
    """Destination table path -> its `type`."""

    def matching(self, pattern: str) -> list[str]:
        """Table paths matching a pattern where `*` stands for one name."""
        regex = re.compile(
            "^"
            + r"\.".join("[^.]+" if p == "*" else re.escape(p) for p in pattern.split("."))
            + "$"
            if pattern
            else "^$"
        )
        return [table for table in self.keys if regex.match(table)]


def parse_example(text: str) -> ExampleTables:
    tables = ExampleTables(keys={"": set()})
    current = ""
    for line in _MULTILINE_STRING.sub('""', text).splitlines():
        header = _HEADER.match(line)
        if header:
            current = header.group(1)
            parts = current.split(".")
            for depth in range(len(parts)):
                parent = ".".join(parts[:depth])
                tables.keys.setdefault(parent, set()).add(parts[depth])
            tables.keys.setdefault(current, set())
            continue
        key = _KEY.match(line)
        if key:
            tables.keys[current].add(key.group(1))
        kind = _TYPE.match(line)
        if kind and current.startswith("destinations."):
            tables.types[current] = kind.group(1)
    return tables


def config_keys(model: type[BaseModel]) -> set[str]:
    return {info.alias or name for name, info in model.model_fields.items()}


def builtin_entry_points() -> dict[str, str]:
    """Adapters this repository registers in pyproject.toml: name -> "module:Class"."""
    project = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"]
    return dict(project.get("entry-points", {}).get(ENTRY_POINT_GROUP, {}))


def adapters() -> dict[str, type[Destination]]:
    """The built-in adapters (pyproject.toml's entry points), wherever they are installed from:
    a third-party adapter installed next to winback is not winback's to document."""
    installed = load_registry().adapters
    found = {}
    for name, target in builtin_entry_points().items():
        module, _, attribute = target.partition(":")
        found[name] = installed.get(name) or getattr(importlib.import_module(module), attribute)
    return found


def readme_destinations() -> dict[str, str]:
    """The README's destinations table: type -> status ("built in" or "planned")."""
    section = readme().split("\n## Destinations\n", 1)[1].split("\n#", 1)[0]
    rows = re.findall(r"^\|\s*`([A-Za-z0-9_\-]+)`\s*\|\s*([^|]+?)\s*\|", section, re.MULTILINE)
    return dict(rows)


def toml_strings(value: Any) -> Iterator[str]:
    """Every string value of a parsed TOML document (comments are not values)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from toml_strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from toml_strings(item)


def example_env_vars() -> tuple[set[str], set[str]]:
    """The example's `${VAR}` references: (required, with a default)."""
    required: set[str] = set()
    defaulted: set[str] = set()
    for text in toml_strings(tomllib.loads(example())):
        for match in ENV_PATTERN.finditer(text):
            (required if match.group(2) is None else defaulted).add(match.group(1))
    return required, defaulted


@pytest.fixture
def example_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """Set every `${VAR}` the example needs; unset the ones with defaults so defaults apply."""
    required, defaulted = example_env_vars()
    for name in defaulted:
        monkeypatch.delenv(name, raising=False)
    values = {name: f"docs-test-{name.lower()}" for name in required}
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("WINBACK_CONFIG", raising=False)
    yield values


def run_cli(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "connector", *args],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )


# -- CLI ------------------------------------------------------------------------------------------


def test_every_command_is_in_the_readme() -> None:
    text = readme()
    missing = [
        " ".join(("winback", *path))
        for path in command_paths()
        if path and f"`{' '.join(('winback', *path))}" not in text
    ]
    assert not missing, f"README.md does not document: {', '.join(missing)}"


def test_every_option_is_in_the_readme() -> None:
    text = readme()
    missing = [
        f"{' '.join(('winback', *path))} {option}"
        for path in command_paths()
        for option in long_options(path)
        if option != "--help" and option not in text
    ]
    assert not missing, f"README.md does not mention these options: {', '.join(missing)}"


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """The CLI's root callback reconfigures logging; give the test process its own back."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    for handler in root.handlers[:]:
        if handler not in handlers:
            root.removeHandler(handler)
    for handler in handlers:
        if handler not in root.handlers:
            root.addHandler(handler)
    root.setLevel(level)


def render_help(path: tuple[str, ...], *, rich: bool) -> Result:
    """`winback <path> --help` in-process, as an 80-column terminal shows it."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(typer.core, "HAS_RICH", rich)
        # Click subtracts 2 from the terminal's columns: 78 is what an 80-column terminal gets.
        return CliRunner().invoke(
            app, [*path, "--help"], prog_name="winback", terminal_width=78, max_content_width=78
        )


@pytest.mark.usefixtures("restore_logging")
@pytest.mark.parametrize("path", command_paths(), ids=lambda p: " ".join(("winback", *p)))
def test_help_exits_0_and_the_readme_shows_it(path: tuple[str, ...]) -> None:
    """`--help` works everywhere (rich and plain), and the README's help blocks are current."""
    command = " ".join(("winback", *path))
    for rich in (True, False):
        result = render_help(path, rich=rich)
        assert result.exit_code == 0, (
            f"`{command} --help` exited {result.exit_code}: {result.output}"
        )
        assert "Usage:" in result.output
    if path and is_group(path):
        return  # groups are listed in the top-level help; their commands have their own blocks
    block = f"$ {command} --help\n{result.stdout}```"
    assert block in readme(), (
        f"README.md's help block for `{command}` is out of date; paste the output of "
        f"`TYPER_USE_RICH=0 COLUMNS=80 {command} --help` into the CLI reference (or run "
        f"`python tests/update_readme_help.py`):\n{result.stdout}"
    )


def test_winback_console_script_help_exits_0(tmp_path: Path) -> None:
    script = shutil.which("winback", path=str(Path(sys.executable).parent)) or shutil.which(
        "winback"
    )
    if script is None:
        pytest.skip("the `winback` console script is not installed (pip install -e .)")
    result = subprocess.run(
        [script, "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "Usage:" in result.stdout


# -- config.example.toml --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "model"), TABLE_MODELS, ids=[f"{p or 'top'}:{m.__name__}" for p, m in TABLE_MODELS]
)
def test_every_config_key_is_in_the_example(pattern: str, model: type[BaseModel]) -> None:
    tables = parse_example(example())
    matching = tables.matching(pattern)
    assert matching, f"config.example.toml has no [{pattern}] table"
    documented = set().union(*(tables.keys[table] for table in matching))
    missing = sorted(config_keys(model) - documented)
    assert not missing, (
        f"config.example.toml does not document {model.__name__} keys {missing} in any "
        f"[{pattern}] table; add them (commented out is fine: `# key = ...`)"
    )


@pytest.mark.parametrize("name", sorted(adapters()))
def test_every_adapter_option_is_in_the_example(name: str) -> None:
    adapter = adapters()[name]
    tables = parse_example(example())
    examples = [table for table, kind in tables.types.items() if kind == name]
    assert examples, (
        f'config.example.toml has no [destinations.*] table with type = "{name}"; add one '
        "documenting its options"
    )
    documented = set().union(*(tables.keys[table] for table in examples))
    missing = sorted(config_keys(adapter.options_model) - documented)
    assert not missing, (
        f"config.example.toml does not document the `{name}` options {missing}; add them to "
        f"{', '.join(f'[{t}]' for t in examples)} (commented out is fine)"
    )
    text = example()
    sync_missing = sorted(
        key
        for key in config_keys(adapter.sync_options_model)
        if not re.search(rf"\b{re.escape(key)}\s*=", text)
    )
    assert not sync_missing, (
        f"config.example.toml does not show the `{name}` per-sync options {sync_missing} "
        "(in a sync's `options = {...}`)"
    )


def test_every_rules_criterion_has_a_worked_example(example_env: dict[str, str]) -> None:
    segments = [
        segment
        for segment in load_config(EXAMPLE).segments.values()
        if isinstance(segment, RulesSegment)
    ]
    signals = [signal for segment in segments for signal in segment.signals]
    criteria = {
        "recency": any(s.inactive_after and s.cadence is None for s in signals),
        "personal cadence": any(s.cadence for s in signals),
        "usage drop": any(s.value for s in signals),
        "never = exclude": any(s.never == "exclude" for s in signals),
        "never = active": any(s.never == "active" for s in signals),
        "match = any or all": any(seg.match != "score" for seg in segments),
        "score with weights": any(
            seg.match == "score" and len({s.weight for s in seg.signals}) > 1 for seg in segments
        ),
        "exclusions": any(seg.exclude for seg in segments),
        "lost_after": any(seg.lost_after for seg in segments),
        "account level (group_by + where)": any(seg.group_by and seg.where for seg in segments),
        "sub-segments (having)": any(seg.having for seg in segments),
        "as_of": any(seg.as_of for seg in segments),
        "columns": any(seg.columns for seg in segments),
    }
    missing = [name for name, shown in criteria.items() if not shown]
    assert not missing, f"config.example.toml lost its rules examples for: {', '.join(missing)}"


def test_example_config_loads(tmp_path: Path, example_env: dict[str, str]) -> None:
    copy = tmp_path / "winback.toml"
    shutil.copyfile(EXAMPLE, copy)
    config = load_config(copy)

    kinds = {type(segment) for segment in config.segments.values()}
    assert kinds == {QuerySegment, RulesSegment}
    assert any(s.sql for s in config.segments.values() if isinstance(s, QuerySegment))
    assert {d.adapter.name for d in config.destinations.values()} >= set(builtin_entry_points())
    assert {sync.mode for sync in config.syncs.values()} == {"mirror", "add_only", "upsert"}
    # Relative paths resolve against the config file's folder, not the working directory.
    assert str(tmp_path / "warehouse.duckdb") in config.warehouse.url
    assert str(tmp_path / ".winback" / "state.db") in config.state.url
    # Secrets come from the environment and stay secret.
    for value in example_env.values():
        assert value not in repr(config.destinations)


def test_example_config_validates_against_a_warehouse(
    tmp_path: Path, example_env: dict[str, str]
) -> None:
    """`winback config validate` compiles every segment of the example and checks the mappings."""
    connection = duckdb.connect(str(tmp_path / "warehouse.duckdb"))
    try:
        for table, columns in EXAMPLE_WAREHOUSE.items():
            connection.execute(f"CREATE TABLE {table} ({columns})")
    finally:
        connection.close()
    shutil.copyfile(EXAMPLE, tmp_path / "winback.toml")
    for table in EXAMPLE_WAREHOUSE:
        assert table in example(), f"config.example.toml no longer lists the `{table}` table"

    result = run_cli("--config", str(tmp_path / "winback.toml"), "config", "validate", cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    assert "valid" in result.stdout


def test_example_config_takes_secrets_from_the_environment(
    tmp_path: Path, example_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Secrets are `${VAR}` references: without them the example does not load."""
    assert "WEBHOOK_SECRET" in example_env
    for name in example_env:
        monkeypatch.delenv(name)
    with pytest.raises(ConfigError) as caught:
        load_config(EXAMPLE)
    for name in example_env:
        assert f"`{name}` is not set" in str(caught.value)


# -- destinations ---------------------------------------------------------------------------------


def test_every_adapter_is_in_the_readme_destinations_table() -> None:
    table = readme_destinations()
    installed = adapters()
    missing = sorted(set(installed) - set(table))
    assert not missing, f"README.md's destinations table has no row for: {', '.join(missing)}"
    not_marked = sorted(name for name in installed if table[name] != "built in")
    assert not not_marked, f"README.md still marks these adapters as not built in: {not_marked}"
    ghosts = sorted(
        name
        for name, status in table.items()
        if status == "built in" and name not in builtin_entry_points()
    )
    assert not ghosts, f"README.md lists adapters as built in that pyproject.toml lacks: {ghosts}"


def test_every_builtin_adapter_loads() -> None:
    registry = load_registry()
    broken = {
        name: registry.broken[name] for name in builtin_entry_points() if name in registry.broken
    }
    assert not broken, broken
