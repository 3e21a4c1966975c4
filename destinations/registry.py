"""Finds destination adapters through the `winback.destinations` entry-point group.

Built-in adapters are registered the same way as third-party ones (see pyproject.toml), so a
plugin package adds a destination without touching this repository. An adapter that fails to load
is reported with its name and distribution version; the others keep working.

Two installed packages registering the same adapter name never shadow each other silently:
- a third-party package reusing a built-in name (`webhook`, `meta`, ...): the built-in adapter is
  used, the other one is not even imported, and the conflict is reported (`Registry.conflicts`,
  and a warning in the log at every load) naming both distributions;
- two third-party packages with the same name: neither is used, as winback cannot know which one
  the config means; the name is reported as broken (`Registry.broken`: `destinations list` and a
  config using it show it), naming both, until one is uninstalled.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points

from destinations.base import Destination

ENTRY_POINT_GROUP = "winback.destinations"
BUILT_IN_DISTRIBUTION = "winback"

log = logging.getLogger("winback.registry")


@dataclass
class Registry:
    """Loaded adapters by name, the ones that failed to load with the reason, and names that
    several installed packages register (what was used and what was left out)."""

    adapters: dict[str, type[Destination]] = field(default_factory=dict)
    broken: dict[str, str] = field(default_factory=dict)
    conflicts: dict[str, str] = field(default_factory=dict)

    def get(self, name: str) -> type[Destination] | None:
        return self.adapters.get(name)


def _distribution(entry_point: EntryPoint) -> str:
    dist = entry_point.dist
    return f"{dist.name} {dist.version}" if dist is not None else "unknown package"


def _describe(entry_point: EntryPoint) -> str:
    return f"{entry_point.name} ({entry_point.value}, from {_distribution(entry_point)})"


def _is_built_in(entry_point: EntryPoint) -> bool:
    dist = entry_point.dist
    return dist is not None and re.sub(r"[-_.]+", "-", dist.name).lower() == BUILT_IN_DISTRIBUTION


def _listed(entry_points_: list[EntryPoint]) -> str:
    return " and ".join(f"{ep.value} (from {_distribution(ep)})" for ep in entry_points_)


def load_registry() -> Registry:
    """Import every registered adapter; never raises for a broken plugin."""
    registry = Registry()
    by_name: dict[str, list[EntryPoint]] = {}
    for entry_point in entry_points(group=ENTRY_POINT_GROUP):
        by_name.setdefault(entry_point.name, []).append(entry_point)
    for name, candidates in by_name.items():
        if len(candidates) == 1:
            _load(registry, candidates[0])
            continue
        built_in = [ep for ep in candidates if _is_built_in(ep)]
        others = [ep for ep in candidates if not _is_built_in(ep)]
        if len(built_in) == 1:
            registry.conflicts[name] = (
                f"adapter `{name}` is registered by {_listed(candidates)}; winback uses its "
                f"built-in {built_in[0].value} and ignores {_listed(others)}: uninstall that "
                "package, or have it register its adapter under another name"
            )
            log.warning("%s", registry.conflicts[name])
            _load(registry, built_in[0])
            continue
        registry.broken[name] = (
            f"adapter `{name}` is registered by several packages: {_listed(candidates)}; "
            "winback uses none of them, as it cannot know which one the config means: "
            "uninstall all but one"
        )
        registry.conflicts[name] = registry.broken[name]  # shown wherever the name is used
    return registry


def _load(registry: Registry, entry_point: EntryPoint) -> None:
    try:
        adapter = entry_point.load()
    except Exception as error:  # a broken plugin must not take the others down
        registry.broken[entry_point.name] = (
            f"{_describe(entry_point)} failed to load: {type(error).__name__}: {error}"
        )
        return
    if not (isinstance(adapter, type) and issubclass(adapter, Destination)):
        registry.broken[entry_point.name] = (
            f"{_describe(entry_point)} is not a winback Destination subclass"
        )
        return
    registry.adapters[entry_point.name] = adapter
