"""The layers point one way: CLI → engine → destinations (checked on the import statements)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ALLOWED_FOR_DESTINATIONS = {"connector.errors", "connector.identity"}
SHARED_DESTINATION_MODULES = {"destinations", "destinations.base", "destinations.registry"}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("path", sorted((ROOT / "destinations").rglob("*.py")), ids=str)
def test_destinations_import_only_errors_and_identity_from_the_engine(path: Path) -> None:
    engine_imports = {m for m in imported_modules(path) if m.split(".")[0] == "connector"}
    assert engine_imports <= ALLOWED_FOR_DESTINATIONS, (
        f"{path.name} imports {sorted(engine_imports - ALLOWED_FOR_DESTINATIONS)}"
    )


@pytest.mark.parametrize("path", sorted((ROOT / "connector").rglob("*.py")), ids=str)
def test_engine_never_imports_a_concrete_adapter_and_only_the_cli_uses_typer(path: Path) -> None:
    modules = imported_modules(path)
    adapters = {m for m in modules if m.startswith("destinations")} - SHARED_DESTINATION_MODULES
    assert not adapters, f"{path.name} imports adapters {sorted(adapters)}: use the registry"
    if path.name != "cli.py":
        assert not {m for m in modules if m.split(".")[0] in ("typer", "click")}, path.name
