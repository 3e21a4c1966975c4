"""Whether a request that failed may have been applied (`maybe_applied`), as `HttpClient` tells
delivery once its retries are exhausted: a request the destination did not process (408, 425,
429, a connection that failed before anything was sent) leaves its batch simply pending; a 5xx,
a timeout or a connection broken after sending leave it in doubt. Real sockets on 127.0.0.1."""

from __future__ import annotations

import socket

import pytest
import requests

from connector.errors import BatchFailedError, DestinationError, TransientError
from destinations.base import HttpClient, RetrySettings, Verdict, default_verdict
from destinations.testing.http_server import (
    FakeHttpServer,
    RawAnswer,
    RawSocketServer,
    ScriptedResponse,
)

RETRY = RetrySettings(max_attempts=3, initial_backoff_s=0, max_backoff_s=0, timeout_s=2)


def client_of(url: str, *, retry: RetrySettings = RETRY) -> HttpClient:
    return HttpClient(destination="t", base_url=url, retry=retry, sleep=lambda seconds: None)


def failure(*answers: ScriptedResponse) -> DestinationError:
    """What `request` raises when the server answers `answers`, in order."""
    with FakeHttpServer() as server:
        server.enqueue(*answers)
        with pytest.raises(DestinationError) as caught:
            client_of(server.url).request("POST", "/hook", json={"records": [1]})
    assert len(server.requests) == len(answers)
    return caught.value


@pytest.mark.parametrize(("status", "maybe_applied"), [(408, False), (425, False), (429, False)])
def test_a_request_refused_as_not_processed_was_not_applied(
    status: int, maybe_applied: bool
) -> None:
    error = failure(*[ScriptedResponse(status, "busy")] * 3)
    assert isinstance(error, TransientError) and error.status == status
    assert error.maybe_applied is maybe_applied


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_a_server_error_leaves_the_request_in_doubt(status: int) -> None:
    error = failure(*[ScriptedResponse(status, "down")] * 3)
    assert isinstance(error, TransientError) and error.maybe_applied


def test_an_earlier_attempt_in_doubt_keeps_the_request_in_doubt() -> None:
    # The first attempt may have been applied: the 429s that follow do not undo that.
    throttled = ScriptedResponse(429, "slow down")
    error = failure(ScriptedResponse(500, "down"), throttled, throttled)
    assert isinstance(error, TransientError) and error.status == 429 and error.maybe_applied
    # Nor does a refusal: the batch must stay in doubt, not simply pending.
    refused = failure(ScriptedResponse(503, "down"), ScriptedResponse(400, "bad"))
    assert isinstance(refused, BatchFailedError) and refused.maybe_applied


def test_a_refusal_after_throttling_applied_nothing() -> None:
    error = failure(ScriptedResponse(429, "slow down"), ScriptedResponse(400, "bad"))
    assert isinstance(error, BatchFailedError) and not error.maybe_applied


def test_a_refused_connection_sent_nothing() -> None:
    with socket.socket() as unused:  # a port nobody listens on
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    with pytest.raises(TransientError, match="connection refused") as caught:
        client_of(f"http://127.0.0.1:{port}").request("POST", "/hook", json={})
    assert not caught.value.maybe_applied


def test_a_timeout_leaves_the_request_in_doubt() -> None:
    retry = RetrySettings(max_attempts=1, initial_backoff_s=0, max_backoff_s=0, timeout_s=0.2)
    with FakeHttpServer() as server:
        server.enqueue(ScriptedResponse(200, delay_s=0.6))
        with pytest.raises(TransientError, match="timed out") as caught:
            client_of(server.url, retry=retry).request("POST", "/hook", json={})
    assert caught.value.maybe_applied


def test_a_connection_closed_without_an_answer_leaves_the_request_in_doubt() -> None:
    with RawSocketServer() as server:
        server.enqueue(*[RawAnswer(b"", reset=False)] * 3)
        with pytest.raises(TransientError) as caught:
            client_of(server.url).request("POST", "/hook", json={})
    assert caught.value.maybe_applied


def test_a_failed_check_of_a_submitted_job_leaves_the_batch_in_doubt() -> None:
    # The job was accepted before: a throttled or refused status check says nothing about it.
    for answers in (
        [ScriptedResponse(429, "slow down")] * 3,
        [ScriptedResponse(404, "gone")],
        [ScriptedResponse(401, "token expired")],  # the job may run all the same
    ):
        with FakeHttpServer() as server:
            server.enqueue(*answers)
            with pytest.raises(DestinationError) as caught:
                client_of(server.url).poll("/jobs/7", done=lambda response: True)
        assert caught.value.maybe_applied


@pytest.mark.parametrize(
    ("first", "maybe_applied"),
    [("POST", True), ("PUT", True), ("DELETE", True), ("GET", False), ("HEAD", False)],
)
def test_a_call_failing_after_an_acknowledged_write_may_have_applied_it(
    first: str, maybe_applied: bool
) -> None:
    """One adapter call (`batch_call`): an import acknowledged, then a refused list update. A
    read before the refusal changed nothing."""
    with FakeHttpServer() as server:
        server.enqueue(ScriptedResponse(200, {}), ScriptedResponse(400, "refused"))
        client = client_of(server.url)
        with pytest.raises(BatchFailedError) as caught, client.batch_call():
            client.request(first, "/import")
            client.request("POST", "/lists/7")
    assert caught.value.maybe_applied is maybe_applied


def test_each_call_starts_without_the_writes_of_the_one_before() -> None:
    with FakeHttpServer() as server:
        server.enqueue(ScriptedResponse(200), ScriptedResponse(400, "refused"))
        client = client_of(server.url)
        with client.batch_call():
            client.request("POST", "/import")
        with pytest.raises(BatchFailedError) as caught, client.batch_call():
            client.request("POST", "/import")
    assert not caught.value.maybe_applied


def throttled_in_body(response: requests.Response) -> Verdict:
    """Meta-like: a rate limit said inside a 200 or 400 body, a server error inside a 200."""
    code = response.json().get("error", {}).get("code") if response.content else None
    if code == 80003:
        return Verdict.THROTTLED
    if code == 2:
        return Verdict.RETRY
    return default_verdict(response)


@pytest.mark.parametrize(
    ("status", "code", "maybe_applied"),
    [(200, 80003, False), (400, 80003, False), (200, 2, True)],
)
def test_a_throttle_code_in_a_body_applied_nothing(
    status: int, code: int, maybe_applied: bool
) -> None:
    answer = ScriptedResponse(status, {"error": {"code": code}}, {"Retry-After": "1"})
    with FakeHttpServer() as server:
        server.enqueue(*[answer] * 3)
        client = HttpClient(
            destination="t",
            base_url=server.url,
            retry=RetrySettings(max_attempts=3, initial_backoff_s=0, max_backoff_s=5),
            sleep=lambda seconds: None,
            verdict=throttled_in_body,
        )
        with pytest.raises(TransientError) as caught:
            client.request("POST", "/audiences/7/users", json={"data": []})
    assert len(server.requests) == 3 and client.retries == 2
    assert caught.value.maybe_applied is maybe_applied
    assert caught.value.retry_after_s == 1.0
