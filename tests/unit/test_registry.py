"""The registry against real installed distributions: dist-info folders put on sys.path."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest

from destinations.registry import load_registry
from destinations.webhook import WebhookDestination

ADAPTER_MODULE = """
from destinations.base import Destination, BatchResult


class {cls}(Destination):
    name = "{name}"

    def check(self):
        return "ok"

    def add(self, batch):
        return BatchResult.all_acknowledged(batch)

    def remove(self, batch):
        return BatchResult.all_acknowledged(batch)
"""


def install(root: Path, dist: str, module: str, adapters: dict[str, str]) -> None:
    """A distribution `dist` 1.0 whose module `module` defines `adapters` (entry-point name ->
    class name), registered under `winback.destinations`, as pip would install it."""
    root.mkdir(exist_ok=True)
    info = root / f"{dist.replace('-', '_')}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    points = "".join(f"{name} = {module}:{cls}\n" for name, cls in adapters.items())
    (info / "entry_points.txt").write_text(f"[winback.destinations]\n{points}")
    source = "".join(ADAPTER_MODULE.format(cls=cls, name=name) for name, cls in adapters.items())
    (root / f"{module}.py").write_text(source)


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "site"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))
    return root


def test_a_third_party_adapter_is_loaded(site: Path) -> None:
    install(site, "winback-acme", "winback_acme_ok", {"acme": "AcmeDestination"})
    registry = load_registry()
    assert registry.adapters["acme"].__name__ == "AcmeDestination"
    assert registry.conflicts == {} and "acme" not in registry.broken


def test_a_third_party_adapter_never_shadows_a_built_in_one(
    site: Path, caplog: pytest.LogCaptureFixture
) -> None:
    install(site, "winback-shadow", "winback_shadow_mod", {"webhook": "ShadowWebhook"})
    with caplog.at_level(logging.WARNING, logger="winback.registry"):
        registry = load_registry()
    assert registry.adapters["webhook"] is WebhookDestination
    assert "winback_shadow_mod" not in sys.modules  # the shadowed plugin is not even imported
    conflict = registry.conflicts["webhook"]
    assert "winback-shadow 1.0" in conflict and "from winback " in conflict
    assert "uses its built-in destinations.webhook:WebhookDestination" in conflict
    assert "ignores winback_shadow_mod:ShadowWebhook" in conflict
    assert conflict in caplog.text
    assert "webhook" not in registry.broken


def test_two_third_party_adapters_with_one_name_are_both_refused(site: Path) -> None:
    install(site, "winback-acme-one", "winback_acme_one", {"acme": "AcmeOne", "one": "One"})
    install(site, "winback-acme-two", "winback_acme_two", {"acme": "AcmeTwo"})
    registry = load_registry()
    assert "acme" not in registry.adapters
    problem = registry.broken["acme"]
    assert "winback-acme-one 1.0" in problem and "winback-acme-two 1.0" in problem
    assert "uses none of them" in problem
    assert registry.conflicts["acme"] == problem
    assert registry.adapters["one"].__name__ == "One"  # the package's other adapters still work
