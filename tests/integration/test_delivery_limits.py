"""The engine against a real HTTP adapter (the webhook) with a request-size limit of its own,
sending to a local HTTP server: bodies over the limit are never sent, batches are halved."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import pytest

from connector.config import build_config
from connector.sync import RunOptions, SyncRunner
from destinations.registry import Registry
from destinations.testing.http_server import FakeHttpServer
from destinations.webhook import WebhookDestination
from tests.helpers import write_people

LIMIT = 600


class LimitedWebhook(WebhookDestination):
    """A webhook whose platform documents a 600-byte limit per request."""

    name = "limited_webhook"
    max_request_bytes: ClassVar[int | None] = LIMIT


def runner(folder: Path, url: str, rows: list[tuple[Any, ...]], **destination: Any) -> SyncRunner:
    document: dict[str, Any] = {
        "warehouse": {"url": write_people(folder, "sqlite", rows)},
        "state": {"url": f"sqlite:///{folder / 'state.db'}"},
        "segments": {"people": {"key": "id", "sql": "SELECT * FROM people"}},
        "destinations": {
            "hook": {
                "type": "limited_webhook",
                "url": f"{url}/hook",
                "secret": "${WINBACK_TEST_HOOK_SECRET}",
                "retry": {"max_attempts": 2, "initial_backoff_s": 0.01, "timeout_s": 5},
                **destination,
            }
        },
        "syncs": {
            "s": {
                "segment": "people",
                "destination": "hook",
                "identifiers": {"email": "email"},
                "fields": {"note": "phone"},
            }
        },
    }
    registry = Registry(adapters={"limited_webhook": LimitedWebhook})
    return SyncRunner(build_config(document, path=folder / "winback.toml", registry=registry))


@pytest.fixture(autouse=True)
def _secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WINBACK_TEST_HOOK_SECRET", "test-secret-for-limits")


def test_batches_over_the_limit_are_halved_and_a_row_over_it_alone_is_rejected(
    tmp_path: Path,
) -> None:
    rows = [(str(i), f"user{i}@example.com", None, None) for i in range(1, 11)]
    rows.append(("99", "big@example.com", "x" * LIMIT, None))  # its body alone is too large
    with FakeHttpServer() as server:
        sync = runner(tmp_path, server.url, rows, batch_size=10)
        try:
            result = sync.run("s", RunOptions())
            issues = sync.store.issues(result.run_id)
        finally:
            sync.close()
    assert result.status == "partial", result.error
    assert (result.sent["add"], result.rejected) == (10, 1)
    assert server.requests and all(len(r.body) <= LIMIT for r in server.requests)
    delivered = {record["key"] for body in server.bodies() for record in body["records"]}
    assert delivered == {str(i) for i in range(1, 11)}
    assert [(i.key, i.kind) for i in issues] == [("99", "rejected")]
    assert "over the platform's limit of 600 bytes" in issues[0].reason
