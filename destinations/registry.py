"""Finds destination adapters through the `winback.destinations` entry-point group.

Built-in adapters are registered the same way as third-party ones (see pyproject.toml), so a
plugin package adds a destination without touching this repository. An adapter that fails to load
is reported with its name and distribution version; the others keep working.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points

from destinations.base import Destination

ENTRY_POINT_GROUP = "winback.destinations"


@dataclass
class Registry:
    """Loaded adapters by name, and the ones that failed to load with the reason."""

    adapters: dict[str, type[Destination]] = field(default_factory=dict)
    broken: dict[str, str] = field(default_factory=dict)

    def get(self, name: str) -> type[Destination] | None:
        return self.adapters.get(name)


def _describe(entry_point: EntryPoint) -> str:
    dist = entry_point.dist
    version = f"{dist.name} {dist.version}" if dist is not None else "unknown package"
    return f"{entry_point.name} ({entry_point.value}, from {version})"


def load_registry() -> Registry:
    """Import every registered adapter; never raises for a broken plugin."""
    registry = Registry()
    for entry_point in entry_points(group=ENTRY_POINT_GROUP):
        try:
            adapter = entry_point.load()
        except Exception as error:  # a broken plugin must not take the others down
            registry.broken[entry_point.name] = (
                f"{_describe(entry_point)} failed to load: {type(error).__name__}: {error}"
            )
            continue
        if not (isinstance(adapter, type) and issubclass(adapter, Destination)):
            registry.broken[entry_point.name] = (
                f"{_describe(entry_point)} is not a winback Destination subclass"
            )
            continue
        registry.adapters[entry_point.name] = adapter
    return registry
