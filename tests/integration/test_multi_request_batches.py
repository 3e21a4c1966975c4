"""An adapter that takes several requests for one batch (an import, then a list update; a job
submitted, then polled) and fails after one of its writes was acknowledged: the platform may
hold the batch's rows, so the engine keeps them in doubt for the next run, whatever the status
of the request that failed. Were they forgotten, a member who then left the segment would stay
in the audience for good.

A real HTTP server on 127.0.0.1 plays a platform whose import puts profiles on the list and
whose second step (a consent update) can be refused with a 400."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from connector.config import build_config
from connector.sync import RunOptions, SyncRunner
from destinations.base import Batch, BatchResult, HttpDestination, HttpDestinationOptions
from destinations.registry import Registry
from destinations.testing.http_server import FakeHttpServer, RecordedRequest, ScriptedResponse
from tests.helpers import PEOPLE_IDENTIFIERS, write_people


class TwoStepPlatform:
    """`POST /import` puts profiles on the list; `POST /consent` is the second step, refused
    with 400 while `refuse_consent` is set; `POST /remove` takes them off the list."""

    def __init__(self) -> None:
        self.listed: set[str] = set()
        self.refuse_consent = False
        self.server = FakeHttpServer(self.answer)

    def answer(self, request: RecordedRequest) -> ScriptedResponse:
        keys = set(request.json())
        if request.path == "/import":
            self.listed |= keys
        elif request.path == "/consent" and self.refuse_consent:
            return ScriptedResponse(400, {"error": "consent refused"})
        elif request.path == "/remove":
            self.listed -= keys
        return ScriptedResponse(200, {})


class TwoStepDestination(HttpDestination):
    name = "twostep"
    options_model = HttpDestinationOptions
    default_base_url = "http://127.0.0.1:9"  # the tests set base_url

    def check(self) -> str:
        return "reachable"

    def add(self, batch: Batch) -> BatchResult:
        keys = [m.key for m in batch.members]
        self.http.request("POST", "/import", json=keys)
        self.http.request("POST", "/consent", json=keys)
        return BatchResult.all_acknowledged(batch)

    def remove(self, batch: Batch) -> BatchResult:
        self.http.request("POST", "/remove", json=[m.key for m in batch.members])
        return BatchResult.all_acknowledged(batch)


@pytest.fixture
def platform() -> Iterator[TwoStepPlatform]:
    fake = TwoStepPlatform()
    with fake.server:
        yield fake


def run_once(
    folder: Path,
    platform: TwoStepPlatform,
    ids: list[int],
    adapter: type[HttpDestination] = TwoStepDestination,
) -> Any:
    rows = [(str(i), f"u{i}@example.com", None, None) for i in ids]
    document: dict[str, Any] = {
        "warehouse": {"url": write_people(folder, "sqlite", rows)},
        "state": {"url": f"sqlite:///{folder / 'state.db'}"},
        "segments": {"people": {"key": "id", "sql": "SELECT * FROM people"}},
        "destinations": {"two": {"type": "twostep", "base_url": platform.server.url}},
        "syncs": {
            "s": {
                "segment": "people",
                "destination": "two",
                "audience": "A",
                "identifiers": PEOPLE_IDENTIFIERS,
            }
        },
    }
    registry = Registry(adapters={"twostep": adapter})
    runner = SyncRunner(build_config(document, path=folder / "winback.toml", registry=registry))
    try:
        return runner.run("s", RunOptions())
    finally:
        runner.close()


def test_a_batch_failing_after_an_acknowledged_write_is_kept_in_doubt(
    tmp_path: Path, platform: TwoStepPlatform
) -> None:
    platform.refuse_consent = True
    failed = run_once(tmp_path, platform, [1, 2, 3])
    assert failed.status == "failed"
    assert "POST /consent answered 400" in (failed.error or "")
    assert platform.listed == {"1", "2", "3"}  # the import went through

    # 3 leaves the segment: the next run settles the batch in doubt and takes 3 off the list.
    platform.refuse_consent = False
    settled = run_once(tmp_path, platform, [1, 2])
    assert settled.status == "success", settled.error
    assert platform.listed == {"1", "2"}
    assert settled.sent["remove"] == 1


def test_a_batch_refused_at_its_first_write_stays_pending(
    tmp_path: Path, platform: TwoStepPlatform
) -> None:
    """Nothing of the batch was acknowledged: nothing is in doubt, and the rows are simply
    sent again by the next run."""
    platform.server.enqueue(ScriptedResponse(400, {"error": "bad import"}))
    failed = run_once(tmp_path, platform, [1, 2])
    assert failed.status == "failed"
    assert platform.listed == set()

    again = run_once(tmp_path, platform, [1, 2])
    assert again.status == "success", again.error
    assert (again.sent["add"], again.sent["remove"]) == (2, 0)
    assert platform.listed == {"1", "2"}


class CarelessDestination(TwoStepDestination):
    """Reads a job id the platform's answer does not have: a KeyError, as an adapter bug or an
    unexpected answer would raise. The same platform as its parent's (`name`)."""

    def add(self, batch: Batch) -> BatchResult:
        answer = self.http.request("POST", "/import", json=[m.key for m in batch.members])
        answer.json()["job"]["id"]
        return BatchResult.all_acknowledged(batch)


def test_an_unexpected_exception_fails_the_batch_naming_it_and_keeps_its_rows_in_doubt(
    tmp_path: Path, platform: TwoStepPlatform
) -> None:
    failed = run_once(tmp_path, platform, [1, 2, 3], CarelessDestination)
    assert failed.status == "failed"
    assert (
        "destination `two`: add of batch 1 (3 rows) failed with an unexpected KeyError: 'job'"
        in (failed.error or "")
    )
    assert platform.listed == {"1", "2", "3"}

    # The adapter fixed: the rows in doubt are settled, 3 taken off the list.
    settled = run_once(tmp_path, platform, [1, 2])
    assert settled.status == "success", settled.error
    assert platform.listed == {"1", "2"}
