"""A destination asking for a longer pause than `[retry] max_backoff_s` allows: the sync stops at
once (no retries before the destination is ready), says why, and the next run sends the rest."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fakes.webhook_receiver import WebhookReceiver
from tests.helpers import SECRET, run_cli, segment_members, webhook_project


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    with WebhookReceiver(secret=SECRET) as server:
        yield server


def test_a_long_retry_after_stops_the_sync_and_the_next_run_sends_the_rest(
    tmp_path: Path, receiver: WebhookReceiver
) -> None:
    webhook_project(tmp_path, receiver.url, customers=30, destination={"batch_size": 10})
    receiver.fail_always(429, retry_after=3600)  # FAST_RETRY: max_backoff_s = 0.2

    paused = run_cli("sync", "run", "--output", "json", cwd=tmp_path)
    assert paused.returncode == 1, paused
    run = paused.run()
    assert (run["status"], run["retries"]) == ("failed", 0)
    assert run["sent"] == {"add": 0, "remove": 0, "update": 0}
    assert len(receiver.requests) == 1  # one batch asked, none retried early
    assert "answered 429" in run["error"]
    assert "it asked to wait 1 h before the next request" in run["error"]
    assert "raise `max_backoff_s` in `[retry]`" in run["error"]

    receiver.fail_always(None)
    resumed = run_cli("sync", "run", "--output", "json", cwd=tmp_path)
    assert resumed.returncode == 0, resumed
    assert resumed.run()["sent"]["add"] == 30
    assert set(receiver.members) == set(segment_members(tmp_path / "warehouse.duckdb"))
