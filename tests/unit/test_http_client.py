from __future__ import annotations

import datetime
import decimal
import logging
import sys
import threading
import time
import tracemalloc
from collections.abc import Mapping
from typing import ClassVar

import pytest
from pydantic import SecretStr, ValidationError

from connector.errors import (
    BatchFailedError,
    FatalDestinationError,
    PayloadTooLargeError,
    TransientError,
)
from destinations.base import (
    MAX_ANSWER_BYTES,
    Batch,
    BatchResult,
    HttpClient,
    HttpDestination,
    HttpDestinationOptions,
    Member,
    NoSyncOptions,
    RedactingLogFilter,
    Redactor,
    Rejection,
    RetrySettings,
    SyncContext,
    answer_too_long,
    json_body,
    json_bytes,
    parse_retry_after,
    redact_text,
    rejections_by_identifier,
    rejections_by_index,
    seconds_until,
)
from destinations.testing.http_server import (
    OK_ANSWER,
    FakeHttpServer,
    RawAnswer,
    RawSocketServer,
    RecordedRequest,
    ScriptedResponse,
)
from tests.helpers import wait_until

FAST = RetrySettings(max_attempts=3, initial_backoff_s=0.01, max_backoff_s=5, timeout_s=2)


def make_client(url: str, sleeps: list[float], **kwargs: object) -> HttpClient:
    retry = RetrySettings(max_attempts=3, initial_backoff_s=0.01, max_backoff_s=5, timeout_s=2)
    return HttpClient(
        destination="test",
        base_url=url,
        retry=retry,
        sleep=sleeps.append,
        **kwargs,  # type: ignore[arg-type]
    )


def test_retries_429_honouring_retry_after_then_succeeds() -> None:
    sleeps: list[float] = []
    with FakeHttpServer() as server:
        server.enqueue(
            ScriptedResponse(429, {"error": "slow down"}, {"Retry-After": "2"}),
            ScriptedResponse(503, "unavailable"),
            ScriptedResponse(200, {"ok": True}),
        )
        client = make_client(server.url, sleeps)
        response = client.request("POST", "/hook", json={"a": 1})
    assert response.json() == {"ok": True}
    assert len(server.requests) == 3
    assert client.retries == 2
    assert sleeps[0] == 2.0


def test_a_retry_after_up_to_max_backoff_is_waited_for() -> None:
    sleeps: list[float] = []
    with FakeHttpServer() as server:
        server.enqueue(ScriptedResponse(429, "", {"Retry-After": "5"}), ScriptedResponse(200))
        make_client(server.url, sleeps).request("GET", "/")
    assert sleeps == [5.0]


def test_a_retry_after_beyond_max_backoff_stops_at_once_without_retrying_early() -> None:
    sleeps: list[float] = []
    with FakeHttpServer() as server:
        server.enqueue(ScriptedResponse(429, "", {"Retry-After": "3600"}), ScriptedResponse(200))
        client = make_client(server.url, sleeps)
        with pytest.raises(TransientError) as raised:
            client.request("POST", "/hook", json={"a": 1})
        assert len(server.requests) == 1
    assert sleeps == []
    assert client.retries == 0
    error = raised.value
    assert (error.status, error.retry_after_s, error.maybe_applied) == (429, 3600.0, False)
    assert error.destination == "test"
    assert str(error).startswith("destination `test`: POST /hook answered 429")
    assert "asked to wait 1 h before the next request, more than `max_backoff_s` = 5s" in str(error)
    assert "sent by the next run" in str(error)


def test_a_long_wait_after_a_server_error_keeps_the_batch_in_doubt() -> None:
    with FakeHttpServer() as server:
        server.enqueue(
            ScriptedResponse(500, "boom"), ScriptedResponse(503, "", {"Retry-After": "600"})
        )
        with pytest.raises(TransientError, match="asked to wait 10 min") as raised:
            make_client(server.url, []).request("POST", "/x")
    assert raised.value.maybe_applied  # the 500 may have been applied


def test_gives_up_after_max_attempts() -> None:
    with FakeHttpServer(lambda r: ScriptedResponse(500, "boom")) as server:
        client = make_client(server.url, [])
        with pytest.raises(TransientError, match="POST /x answered 500"):
            client.request("POST", "/x")
    assert len(server.requests) == 3


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (401, FatalDestinationError),
        (403, FatalDestinationError),
        (400, BatchFailedError),
        (413, PayloadTooLargeError),
    ],
)
def test_non_retryable_statuses_fail_at_once(status: int, error: type[Exception]) -> None:
    with FakeHttpServer(lambda r: ScriptedResponse(status, "no")) as server, pytest.raises(error):
        make_client(server.url, []).request("POST", "/x")
    assert len(server.requests) == 1


@pytest.mark.parametrize("method", ["POST", "GET", "HEAD", "DELETE"])
@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_redirects_are_never_followed_and_fail_the_batch(method: str, status: int) -> None:
    with FakeHttpServer() as elsewhere, FakeHttpServer() as server:
        moved = f"{elsewhere.url}/new/hook?token=sk_live_abcdef"
        server.enqueue(ScriptedResponse(status, "", {"Location": moved}))
        client = make_client(server.url, [], secrets=["sk_live_abcdef"])
        with pytest.raises(BatchFailedError) as caught:
            client.request(method, "/hook", json={"records": [1]})
    assert not elsewhere.requests  # neither re-sent there (307/308) nor fetched as a GET
    assert len(server.requests) == 1 and client.retries == 0
    assert caught.value.status == status
    assert str(caught.value) == (
        f"destination `test`: {method} /hook answered {status}, a redirect to "
        f"`{elsewhere.url}/new/hook`; winback does not follow redirects (a POST would arrive "
        "without its body or be sent to an address nobody configured): configure the final "
        "URL in the destination"
    )


def test_a_redirect_shows_where_it_points_without_credentials() -> None:
    cases = [
        ("/relative/path?sig=abc", "http://127.0.0.1:{port}/relative/path"),
        ("https://user:pa55@other.example.com:8443/in?x=1", "https://other.example.com:8443/in"),
        ("https://other.example.com/sk_live_abcdef/in", "https://other.example.com/***/in"),
        ("https://other.example.com/a\x1b[2Jb", "https://other.example.com/a?[2Jb"),
    ]
    with FakeHttpServer() as server:
        port = server.url.rsplit(":", 1)[1]
        client = make_client(server.url, [], secrets=["sk_live_abcdef"])
        for location, shown in cases:
            server.enqueue(ScriptedResponse(302, "", {"Location": location}))
            with pytest.raises(BatchFailedError) as caught:
                client.request("POST", "/hook")
            assert f"a redirect to `{shown.format(port=port)}`;" in str(caught.value)
        server.enqueue(ScriptedResponse(304, ""))
        with pytest.raises(BatchFailedError, match="answered 304, a redirect without a Location"):
            client.request("GET", "/hook")


def test_timeouts_are_retried() -> None:
    # The retry's answer must come within timeout_s: room for a loaded machine.
    retry = RetrySettings(max_attempts=2, initial_backoff_s=0, max_backoff_s=0, timeout_s=0.6)
    with FakeHttpServer() as server:
        server.enqueue(ScriptedResponse(200, delay_s=1.5), ScriptedResponse(200, {"ok": 1}))
        client = HttpClient(destination="t", base_url=server.url, retry=retry, sleep=lambda s: None)
        assert client.request("GET", "/").json() == {"ok": 1}


def test_connection_refused_is_transient() -> None:
    client = make_client("http://127.0.0.1:9", [])
    with pytest.raises(TransientError) as caught:
        client.request("GET", "/x?token=secret")
    assert str(caught.value) == (
        "destination `test`: GET /x: connection refused talking to 127.0.0.1:9; check "
        "the destination's URL and that it accepts connections from here"
    )


HEAD_OF_200 = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"


@pytest.mark.parametrize(
    ("reset", "problem"),
    [(True, "connection reset"), (False, "closed before the end of the answer")],
)
def test_an_answer_broken_while_its_body_is_read_is_retried(reset: bool, problem: str) -> None:
    with RawSocketServer() as server:
        server.enqueue(RawAnswer(HEAD_OF_200 + b'{"rejected": [', reset=reset))
        client = make_client(server.url, [])
        assert client.request("POST", "/hook", json={"a": 1}).json() == {}
        assert client.retries == 1 and len(server.requests) == 2
        server.enqueue(*[RawAnswer(HEAD_OF_200 + b"{", reset=reset)] * 3)
        with pytest.raises(TransientError) as caught:
            client.request("POST", "/hook?token=t0k3n", json={"a": 1})
    assert str(caught.value) == (
        "destination `test`: POST /hook: the connection broke while reading the answer "
        f"({problem}) from {server.url.removeprefix('http://')}"
    )


@pytest.mark.parametrize(
    ("answer", "problem"),
    [
        (RawAnswer(b"garbage\r\n\r\n"), "the answer was not HTTP (it began `garbage`)"),
        (
            RawAnswer(b"\x00\x01garbage\r\n\r\n", reset=True),
            "the answer was not HTTP (it began `??garbage`)",
        ),
        (
            RawAnswer(b"SSH-2.0-OpenSSH_9.6\r\n"),
            "the answer was not HTTP (it began `SSH-2.0-OpenSSH_9.6`)",
        ),
        (RawAnswer(b""), "it closed the connection without an answer"),
    ],
)
def test_an_answer_that_is_not_http_says_so_and_is_retried(answer: RawAnswer, problem: str) -> None:
    with RawSocketServer() as server:
        server.enqueue(answer)
        client = make_client(server.url, [])
        assert client.request("POST", "/hook", json={"a": 1}).json() == {}
        assert client.retries == 1
        server.enqueue(*[answer] * 3)
        with pytest.raises(TransientError) as caught:
            client.request("POST", "/hook")
    assert str(caught.value) == (
        f"destination `test`: POST /hook: connected to {server.url.removeprefix('http://')}, "
        f"but {problem}; check that the destination's URL points to its HTTP receiver (host, "
        "port, http or https)"
    )


# -- answers are read up to a cap ---------------------------------------------------------------


def test_a_huge_answer_is_read_only_up_to_the_cap(caplog: pytest.LogCaptureFixture) -> None:
    # 60 MB made before measuring: the server sends these bytes without copying them.
    huge = b'{"x": "' + b"A" * (60 * 1024 * 1024) + b'"}'
    with FakeHttpServer(lambda r: ScriptedResponse(200, huge)) as server:
        client = make_client(server.url, [])
        tracemalloc.start()
        try:
            response = client.request("POST", "/hook", json={"a": 1})
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 2.5 * MAX_ANSWER_BYTES, peak  # the whole body took > 60 MB
        assert response.status_code == 200 and answer_too_long(response)
        assert response.content == huge[:MAX_ANSWER_BYTES] and MAX_ANSWER_BYTES == 10 * 2**20
        with pytest.raises(BatchFailedError, match=r"POST /hook answered 200 with a body too "):
            json_body(response, destination="test")
        client.request("POST", "/hook")  # the connection cut short is not reused
    warnings = [r.getMessage() for r in caplog.records if "longer than" in r.getMessage()]
    assert warnings == [
        "destination `test`: POST /hook answered 200 with a body longer than 10 MB; only its "
        "first 10 MB were read (answers that long are not expected; reported once per run)"
    ]


def test_capped_answers_still_give_verdicts_errors_and_job_statuses() -> None:
    long_error = "overloaded " + "x" * 5000
    with FakeHttpServer() as server:
        client = make_client(server.url, [], max_answer_bytes=1024)
        server.enqueue(ScriptedResponse(503, long_error), ScriptedResponse(200, {"ok": True}))
        response = client.request("POST", "/x")
        assert response.json() == {"ok": True} and not answer_too_long(response)
        assert client.retries == 1
        server.enqueue(*[ScriptedResponse(400, long_error)])
        with pytest.raises(BatchFailedError, match="POST /x answered 400: overloaded xxx"):
            client.request("POST", "/x")
    with job_server(pending_checks=2) as server:
        client = make_client(server.url, [], max_answer_bytes=1024)
        assert client.poll("/jobs/1", done=finished, interval_s=0).json()["status"] == "complete"


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        pytest.param(b"<html>down</html>", "not JSON", id="html"),
        pytest.param(b"[" * 50_000 + b"]" * 50_000, "nested too deeply to read", id="arrays"),
        pytest.param(
            b'{"data": ' + b"[" * 2_000 + b"]" * 2_000 + b"}",
            "nested too deeply to read",
            id="nested-data",
        ),
    ],
)
def test_an_answer_that_cannot_be_decoded_fails_the_batch_naming_the_request(
    body: bytes, problem: str
) -> None:
    with FakeHttpServer(lambda r: ScriptedResponse(200, body)) as server:
        response = make_client(server.url, []).request("GET", "/v1/jobs/1?token=t0k3n")
    with pytest.raises(BatchFailedError) as caught:
        json_body(response, destination="test")
    assert str(caught.value) == (
        f"destination `test`: GET /v1/jobs/1 answered 200 with a body that is {problem}; the "
        "platform may be down or base_url may point to the wrong service"
    )


def test_an_answer_that_stalls_while_its_body_is_read_times_out_and_is_retried() -> None:
    retry = RetrySettings(max_attempts=2, initial_backoff_s=0, max_backoff_s=0, timeout_s=0.6)
    stalled = RawAnswer(HEAD_OF_200 + b"{", hold_s=2.0)
    with RawSocketServer() as server:
        client = HttpClient(destination="t", base_url=server.url, retry=retry, sleep=lambda s: None)
        server.enqueue(stalled)
        assert client.request("GET", "/").json() == {} and client.retries == 1
        server.enqueue(stalled, stalled)
        with pytest.raises(TransientError) as caught:
            client.request("GET", "/")
    assert str(caught.value) == (
        "destination `t`: GET / answered 200, then timed out after 0.6s while its body was read"
    )


# -- each attempt has an overall deadline ------------------------------------------------------

DRIPPING = RetrySettings(
    max_attempts=2, initial_backoff_s=0, max_backoff_s=0, timeout_s=0.5, attempt_timeout_s=0.6
)
HEADERS_OF_200 = b"HTTP/1.1 200 OK\r\n" + b"X-Padding: drip drip drip\r\n" * 40


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(b"HTTP/1.1 200 OK" + b" " * 200, id="status-line"),
        pytest.param(HEADERS_OF_200, id="headers"),
        pytest.param(HEAD_OF_200 + b'{"rejected": [' + b" " * 500, id="body-with-length"),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + b" " * 500, id="body-to-the-end"
        ),
    ],
)
def test_an_answer_that_drips_ends_at_the_attempts_deadline_and_is_retried(answer: bytes) -> None:
    # One byte every 10 ms: each read is well within timeout_s, the whole would take seconds.
    dripping = RawAnswer(answer, drip_s=0.01)
    with RawSocketServer() as server:
        client = HttpClient(
            destination="t", base_url=server.url, retry=DRIPPING, sleep=lambda s: None
        )
        server.enqueue(dripping)
        assert client.request("POST", "/hook", json={"a": 1}).json() == {}
        assert client.retries == 1 and len(server.requests) == 2
        server.enqueue(dripping, dripping)
        with pytest.raises(TransientError) as caught:
            client.request("POST", "/hook?token=t0k3n", json={"a": 1})
    assert str(caught.value) == (
        "destination `t`: POST /hook timed out: no complete answer within 0.6s (the time one "
        "attempt may take in all: `attempt_timeout_s`, by default 4 times `timeout_s`)"
    )
    assert caught.value.maybe_applied is True  # the receiver may have applied it
    # Each dripping answer was cut off at the deadline, not read to its end.
    wait_until(lambda: len(server.sent) == 4)  # three dripping answers and one OK_ANSWER
    dripped = [sent for sent in server.sent if sent != len(OK_ANSWER.data)]
    assert len(dripped) == 3 and max(dripped) < len(answer), server.sent


def test_an_attempts_deadline_is_four_timeouts_unless_set() -> None:
    assert RetrySettings(timeout_s=3).attempt_deadline_s == 12
    assert RetrySettings(timeout_s=3, attempt_timeout_s=5).attempt_deadline_s == 5
    assert RetrySettings().attempt_deadline_s == 120


def test_answers_in_time_are_not_cut_by_an_earlier_attempts_deadline() -> None:
    # Connections go back to the pool: a deadline that passes later must not shut them.
    # A second per attempt: room for a loaded machine; the first deadlines pass in the sleep.
    quick = RetrySettings(max_attempts=1, timeout_s=2, attempt_timeout_s=1.0)
    with FakeHttpServer() as server:
        client = HttpClient(destination="t", base_url=server.url, retry=quick)
        for _ in range(3):
            assert client.request("GET", "/").json() == {"ok": True}
        time.sleep(1.2)
        assert client.request("GET", "/").json() == {"ok": True}
    assert len(server.requests) == 4 and client.retries == 0


def test_secrets_never_appear_in_errors() -> None:
    with FakeHttpServer(lambda r: ScriptedResponse(400, "bad token sk_live_abcdef")) as server:
        client = make_client(server.url, [], secrets=["sk_live_abcdef"])
        with pytest.raises(BatchFailedError) as caught:
            client.request("POST", "/x?api_key=sk_live_abcdef")
    assert "sk_live_abcdef" not in str(caught.value)
    assert "api_key" not in str(caught.value)


def test_parse_retry_after_http_date_and_garbage() -> None:
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after("inf") is None
    assert parse_retry_after("1e400") is None
    assert parse_retry_after("nan") is None
    assert parse_retry_after("-5") == 0.0
    assert parse_retry_after(None) is None
    assert Redactor(["abcd1234"])("x abcd1234 y") == "x *** y"


def test_log_redaction_hides_credentials_in_urls_and_keeps_other_parameters() -> None:
    Redactor(["hook-query=s3cr3t-value"])  # a configured URL's query string, as the webhook's
    assert redact_text("POST /hook?token=abc123&page=2 HTTP/1.1") == (
        "POST /hook?token=***&page=2 HTTP/1.1"
    )
    assert redact_text("https://h/p?X-Amz-Signature=abc&api_key=k") == (
        "https://h/p?X-Amz-Signature=***&api_key=***"
    )
    assert redact_text("postgresql://user:pw@db/wh") == "postgresql://user:***@db/wh"
    kept = "duckdb:///w.duckdb?memory_limit=96MB&temp_directory=/tmp/spill"
    assert redact_text(kept) == kept
    assert redact_text("GET /x?hook-query=s3cr3t-value") == "GET /x?***"


def test_the_log_filter_redacts_messages_and_their_tracebacks() -> None:
    record = logging.LogRecord(
        "urllib3", logging.DEBUG, __file__, 1, '"POST %s"', ("/h?sig=x1",), None
    )
    try:
        raise ConnectionError("Max retries exceeded with url: /h?sig=x1")
    except ConnectionError:
        record.exc_info = sys.exc_info()
    assert RedactingLogFilter().filter(record)
    assert record.getMessage() == '"POST /h?sig=***"'
    assert record.exc_text is not None and "sig=***" in record.exc_text
    assert "x1" not in record.exc_text


# -- asynchronous jobs, platform rate-limit headers, per-row errors ---------------------------


def job_server(pending_checks: int) -> FakeHttpServer:
    """A job that reports `queued` for `pending_checks` checks, then `complete`."""
    checks = iter(range(10_000))

    def answer(request: object) -> ScriptedResponse:
        done = next(checks) >= pending_checks
        return ScriptedResponse(200, {"status": "complete" if done else "queued"})

    return FakeHttpServer(answer)


def finished(response: object) -> bool:
    return bool(response.json()["status"] == "complete")  # type: ignore[attr-defined]


def test_poll_checks_a_job_until_it_is_done_waiting_longer_each_time() -> None:
    sleeps: list[float] = []
    with job_server(pending_checks=3) as server:
        client = make_client(server.url, sleeps)
        response = client.poll("/jobs/7", done=finished, interval_s=0.2, max_interval_s=0.4)
        assert response.json() == {"status": "complete"}
        assert [r.path for r in server.requests] == ["/jobs/7"] * 4
    assert sleeps == pytest.approx([0.2, 0.3, 0.4])


def test_poll_gives_up_after_its_timeout_and_the_batch_stays_pending() -> None:
    with job_server(pending_checks=1_000) as server:
        client = make_client(server.url, [])
        with pytest.raises(BatchFailedError, match="the import was not finished after 0s"):
            client.poll("/jobs/7", done=finished, what="the import", timeout_s=0)


def test_poll_stops_waiting_when_the_run_is_stopped() -> None:
    with job_server(pending_checks=1_000) as server:
        retry = RetrySettings(max_attempts=1, timeout_s=2)
        client = HttpClient(destination="test", base_url=server.url, retry=retry)
        threading.Timer(0.3, client.stop).start()
        started = time.monotonic()
        with pytest.raises(FatalDestinationError, match="the run is stopping"):
            client.poll("/jobs/7", done=finished, interval_s=30)
        assert time.monotonic() - started < 10  # not the 30 s wait


def test_the_rate_limit_spaces_requests_with_the_clients_sleep() -> None:
    sleeps: list[float] = []
    with FakeHttpServer() as server:
        client = make_client(server.url, sleeps, requests_per_second=4)
        for _ in range(3):
            client.request("GET", "/x")
    assert len(sleeps) == 2 and all(0.2 < s <= 0.5 for s in sleeps), sleeps


def test_a_rate_limit_wait_ends_when_the_run_is_stopped() -> None:
    with FakeHttpServer() as server:
        retry = RetrySettings(max_attempts=3, timeout_s=2)
        client = HttpClient(
            destination="test", base_url=server.url, retry=retry, requests_per_second=0.01
        )
        client.request("GET", "/first")  # the next turn is 100 s away
        threading.Timer(0.3, client.stop).start()
        started = time.monotonic()
        with pytest.raises(FatalDestinationError, match="the run is stopping"):
            client.request("GET", "/second")
        assert time.monotonic() - started < 10  # not the 100 s wait
        assert [r.path for r in server.requests] == ["/first"] and client.retries == 0


def test_a_platform_header_can_say_how_long_to_wait() -> None:
    sleeps: list[float] = []
    with FakeHttpServer() as server:
        reset = str(int(time.time()) + 3)
        server.enqueue(
            ScriptedResponse(429, {"error": "rate"}, {"X-RateLimit-Reset": reset}),
            ScriptedResponse(200, {"ok": True}),
        )

        def reset_header(response: object) -> float | None:
            return seconds_until(response.headers.get("X-RateLimit-Reset"), epoch=True)  # type: ignore[attr-defined]

        client = make_client(server.url, sleeps, retry_after=reset_header)
        assert client.request("POST", "/contacts").json() == {"ok": True}
    assert len(sleeps) == 1 and 1.0 <= sleeps[0] <= 3.0


def test_seconds_until_reads_unix_times_and_durations() -> None:
    assert seconds_until("3", epoch=False) == 3.0
    assert seconds_until(str(time.time() - 10), epoch=True) == 0.0
    assert seconds_until("soon", epoch=False) is None
    assert seconds_until(None, epoch=True) is None


def test_per_row_errors_by_position_or_by_email_become_rejections() -> None:
    batch = Batch(
        1,
        [
            Member("k1", {"email": "a@example.com"}),
            Member("k2", {"email": "b@example.com"}),
            Member("k3", {"email": "a@example.com"}),
        ],
    )
    assert rejections_by_index(batch, [(1, "invalid"), (9, "out of range")]) == [
        Rejection("k2", "invalid")
    ]
    assert rejections_by_identifier(batch, "email", {"a@example.com": "bounced"}) == [
        Rejection("k1", "bounced"),
        Rejection("k3", "bounced"),
    ]


def test_a_401_renews_the_credentials_once_and_sends_again() -> None:
    def answer(request: RecordedRequest) -> ScriptedResponse:
        if request.headers.get("authorization") != "Bearer fresh-token":
            return ScriptedResponse(401, {"error": "token expired"})
        return ScriptedResponse(200, {"ok": True})

    token = ["stale-token"]

    def renew() -> bool:
        token[0] = "fresh-token"
        return True

    with FakeHttpServer(answer) as server:
        client = make_client(
            server.url, [], auth=lambda: {"Authorization": f"Bearer {token[0]}"}, refresh=renew
        )
        assert client.request("POST", "/members").json() == {"ok": True}
        assert [r.headers["authorization"] for r in server.requests] == [
            "Bearer stale-token",
            "Bearer fresh-token",
        ]
        refused = make_client(server.url, [], auth=lambda: {"Authorization": "Bearer nope"})
        with pytest.raises(FatalDestinationError, match="401"):
            refused.request("POST", "/members")


def test_a_token_obtained_at_run_time_is_redacted() -> None:
    redact = Redactor(["static-secret"])
    redact.add("ya29.runtime-token")
    assert redact("static-secret and ya29.runtime-token") == "*** and ***"


def test_an_absolute_url_on_another_origin_is_refused_and_never_sent() -> None:
    token = "secret-token-abcdef"
    with FakeHttpServer() as api, FakeHttpServer() as elsewhere:
        client = make_client(api.url, [], auth=lambda: {"Authorization": f"Bearer {token}"})
        # A pagination link to another host (a different port is another origin too).
        next_link = f"{elsewhere.url}/v1/members?page=2&access_token={token}"
        with pytest.raises(BatchFailedError, match="refused to send a request to") as refused:
            client.request("GET", next_link)
        client.request("GET", f"{api.url}/v1/members?page=2")  # its own origin: sent
    assert elsewhere.requests == []
    assert [r.path for r in api.requests] == ["/v1/members?page=2"]
    assert api.requests[0].headers["authorization"] == f"Bearer {token}"
    message = str(refused.value)
    assert token not in message and "page=2" not in message
    assert f"`{elsewhere.url}/v1/members`" in message


@pytest.mark.parametrize(
    "link",
    [
        "http://api.example.com/v1/x",  # https downgraded to http
        "https://api.example.com:8443/v1/x",  # another port
        "https://api.example.com.evil.test/v1/x",
        "https://evil.test/v1/x",
        "HTTPS://EVIL.TEST/v1/x",
        " https://evil.test/v1/x",
        "ftp://api.example.com/v1/x",
    ],
)
def test_only_the_base_urls_origin_counts_as_its_own(link: str) -> None:
    client = make_client("https://api.example.com/v2", [])
    with pytest.raises(BatchFailedError, match="nothing was sent"):
        client.url(link)
    assert client.url("https://API.example.com:443/v1/x") == "https://API.example.com:443/v1/x"
    assert client.url("v1/x") == "https://api.example.com/v2/v1/x"
    assert client.url("//evil.test/x") == "https://api.example.com/v2/evil.test/x"


def test_a_url_that_parsers_read_as_different_hosts_is_refused_and_never_sent() -> None:
    # urlsplit reads `http://A\@B/x` as host B; requests (urllib3) connects to A.
    token = "TOPSECRET-bearer-abcdef"
    with FakeHttpServer() as api, FakeHttpServer() as elsewhere:
        api_host = api.url.removeprefix("http://")
        other_host = elsewhere.url.removeprefix("http://")
        client = HttpClient(
            destination="d",
            base_url=f"{api.url}/api",
            retry=RetrySettings(max_attempts=1),
            auth=lambda: {"Authorization": f"Bearer {token}"},
        )
        links = [
            f"http://{other_host}\\@{api_host}/x",
            f"http://{other_host}\\\\@{api_host}/x",
            f"http://{other_host}\t@{api_host}/x",
            f"http://{other_host}\n@{api_host}/x",
            f"http://{other_host}/\\@{api_host}/x",
            f"http://{api_host}\\@{other_host}/x",
        ]
        for link in links:
            assert not client.sends_credentials(link)
            with pytest.raises(BatchFailedError, match="nothing was sent") as refused:
                client.request("GET", link)
            assert refused.value.maybe_applied is False
            assert token not in str(refused.value)
        client.request("GET", f"{api.url}/api/next?page=2")  # an unambiguous link: sent
    assert elsewhere.requests == []
    assert [r.path for r in api.requests] == ["/api/next?page=2"]
    assert str(refused.value) == (
        f"destination `d`: refused to send a request to `http://{other_host}/x`: it holds a "
        "backslash, which HTTP libraries read differently (requests would connect to "
        f"`{api_host}`, not `{other_host}`), so it may reach another host than the one it "
        "names; winback only sends to the destination's own address, so its credentials "
        "never go to another host; nothing was sent"
    )


@pytest.mark.parametrize(
    ("url", "credentials"),
    [
        ("https://graph.facebook.com/v19.0/act_1/customaudiences?after=x", True),
        ("v19.0/123/users", True),
        ("/v19.0/123/users", True),
        ("//evil.example/x", True),  # a path under base_url, not another host
        # backslashes: urlsplit and urllib3 disagree on where the host ends
        ("https://evil.example\\@graph.facebook.com/next", False),
        ("https://graph.facebook.com\\@evil.example/next", False),
        ("https://evil.example/\\@graph.facebook.com/next", False),
        ("https://graph.facebook.com/next\\x", False),
        ("https://graph.facebook.com/next?q=\\", False),
        # `@` in the path, query or fragment is not user info
        ("https://graph.facebook.com/x@evil.example", True),
        ("https://graph.facebook.com/x?next=@evil.example", True),
        ("https://graph.facebook.com#@evil.example", True),
        ("https://evil.example/x@graph.facebook.com", False),
        ("https://evil.example?@graph.facebook.com", False),
        ("https://evil.example#@graph.facebook.com", False),
        # an encoded backslash is user info or host text for every parser
        ("https://evil.example%5C@graph.facebook.com/next", True),
        ("https://graph.facebook.com%5C@evil.example/next", False),
        ("https://graph.facebook.com%5C.evil.example/next", False),
        # control characters and whitespace
        ("https://evil.example\t@graph.facebook.com/", False),
        ("https://evil.example\n@graph.facebook.com/", False),
        ("https://graph.facebook.com\t/x", False),
        ("https://graph.facebook.com/x\r\nHost: evil.example", False),
        ("https://graph.facebook.com\x00.evil.example/", False),
        ("https://graph.face book.com/x", False),
        ("https://evil.example @graph.facebook.com/x", False),
        (" https://graph.facebook.com/x ", True),  # around the URL: stripped
        # user info
        ("https://user:pass@graph.facebook.com/x", True),
        ("https://graph.facebook.com@evil.example/x", False),
        ("https://graph.facebook.com:443@evil.example/x", False),
        ("https://graph.facebook.com:443:@evil.example/x", False),
        # ports, case, trailing dots, look-alikes
        ("https://GRAPH.FACEBOOK.COM/x", True),
        ("HTTPS://graph.facebook.com:443/x", True),
        ("https://graph.facebook.com:/x", True),
        ("https://graph.facebook.com:80/x", False),
        ("https://graph.facebook.com:99999/x", False),
        ("https://graph.facebook.com:443x/x", False),
        ("http://graph.facebook.com/x", False),
        ("https://graph.facebook.com./x", False),
        ("https://graph.facebook.com.evil.example/x", False),
        ("https://\uff47raph.facebook.com/x", False),  # fullwidth g
        ("https://graph.facebook\u3002com/x", False),  # ideographic full stop
        ("https://[::1]/x", False),
    ],
)
def test_credentials_go_only_where_requests_connects_to_the_base_urls_origin(
    url: str, credentials: bool
) -> None:
    client = make_client("https://graph.facebook.com/v19.0", [])
    assert client.sends_credentials(url) is credentials
    if credentials:
        client.url(url)
    else:
        with pytest.raises(BatchFailedError, match="nothing was sent"):
            client.url(url)


@pytest.mark.parametrize(
    ("url", "credentials"),
    [
        ("https://[::1]:8443/x", True),
        ("https://[::1]:8443\\@evil.example/x", False),
        ("https://[::1]/x", False),
        ("https://[::2]:8443/x", False),
        ("https://[::1]:8443@[::2]:8443/x", False),
        ("https://127.0.0.1:8443/x", False),
    ],
)
def test_an_ipv6_base_url_is_its_own_origin(url: str, credentials: bool) -> None:
    client = make_client("https://[::1]:8443/v1", [])
    assert client.sends_credentials(url) is credentials


def test_a_base_url_that_parsers_read_as_different_hosts_sends_nothing() -> None:
    with FakeHttpServer() as api, FakeHttpServer() as elsewhere:
        ambiguous = f"{elsewhere.url}\\@{api.url.removeprefix('http://')}"
        client = make_client(ambiguous, [], auth=lambda: {"Authorization": "Bearer abcdef"})
        assert not client.sends_credentials("/x")
        with pytest.raises(BatchFailedError, match="it holds a backslash"):
            client.request("GET", "/x")
        with pytest.raises(ValidationError, match="it holds a backslash") as invalid:
            HttpDestinationOptions(type="t", base_url=ambiguous)
    assert elsewhere.requests == [] and api.requests == []
    assert "127.0.0.1" not in str(invalid.value).split("input_value")[0]


def test_an_allowed_host_gets_the_request_without_credentials() -> None:
    token = "secret-token-abcdef"
    with FakeHttpServer() as api, FakeHttpServer() as cdn:
        cdn_url = cdn.url.replace("127.0.0.1", "localhost")  # another host, same machine
        client = make_client(
            api.url,
            [],
            auth=lambda: {"Authorization": f"Bearer {token}"},
            allowed_hosts=["LOCALHOST"],
        )
        client.request("PUT", f"{cdn_url}/upload/abc", data=b"rows")
        client.request("GET", "jobs/1")
    assert [r.path for r in cdn.requests] == ["/upload/abc"]
    assert "authorization" not in cdn.requests[0].headers
    assert cdn.requests[0].body == b"rows"
    assert api.requests[0].headers["authorization"] == f"Bearer {token}"


def test_json_bodies_carry_warehouse_values_and_the_chosen_content_type() -> None:
    document = {
        "ltv": decimal.Decimal("12.50"),
        "orders": decimal.Decimal("3"),
        "last_order": datetime.date(2026, 11, 2),
        "seen_at": datetime.datetime(2026, 11, 2, 8, 30),
        "name": "Zoë",
    }
    with FakeHttpServer() as server:
        client = make_client(server.url, [])
        client.request("POST", "/import", json=document)
        client.request("POST", "/import", json=document, content_type="application/vnd.api+json")
        client.request("POST", "/raw", data=b"a,b\n", content_type="text/csv")
    first, second, raw = server.requests
    assert first.body == json_bytes(document)
    assert first.json() == {
        "ltv": 12.5,
        "orders": 3,
        "last_order": "2026-11-02",
        "seen_at": "2026-11-02T08:30:00",
        "name": "Zoë",
    }
    assert first.headers["content-type"] == "application/json"
    assert second.headers["content-type"] == "application/vnd.api+json"
    assert second.body == first.body
    assert (raw.headers["content-type"], raw.body) == ("text/csv", b"a,b\n")


def test_json_and_data_together_are_a_programming_error() -> None:
    client = make_client("https://api.example.com", [])
    with pytest.raises(TypeError, match="not both"):
        client.request("POST", "/x", json={}, data=b"{}")


class RegionalOptions(HttpDestinationOptions):
    api_key: SecretStr
    region: str = "us"
    revision: str = "2026-07-15"


class RegionalDestination(HttpDestination):
    """A platform whose API root depends on options and which wants a fixed header."""

    name = "regional"
    options_model = RegionalOptions
    default_base_url: ClassVar[str] = "https://api.example.com"
    options: RegionalOptions

    def base_url(self) -> str:
        return f"{super().base_url()}/{self.options.region}/v2"

    def default_headers(self) -> Mapping[str, str]:
        return {"revision": self.options.revision, "Accept": "application/vnd.api+json"}

    def auth_headers(self) -> Mapping[str, str]:
        return {"Authorization": f"Key {self.options.api_key.get_secret_value()}"}

    def check(self) -> str:
        return self.http.request("GET", "lists/1").text

    def add(self, batch: Batch) -> BatchResult:
        return BatchResult.all_acknowledged(batch)

    def remove(self, batch: Batch) -> BatchResult:
        return BatchResult.all_acknowledged(batch)


def regional_context() -> SyncContext:
    return SyncContext(sync="s", run_id="r", audience="1", options=NoSyncOptions(), retry=FAST)


def test_an_http_destination_builds_its_base_url_and_fixed_headers_from_options() -> None:
    options = RegionalOptions(type="regional", api_key="key-123456", region="eu")
    assert RegionalDestination(options, regional_context()).http.url("lists/1") == (
        "https://api.example.com/eu/v2/lists/1"
    )
    with FakeHttpServer() as server:
        options = RegionalOptions(type="regional", api_key="key-123456", base_url=server.url)
        destination = RegionalDestination(options, regional_context())
        destination.check()
    (request,) = server.requests
    assert request.path == "/us/v2/lists/1"
    assert request.headers["revision"] == "2026-07-15"
    assert request.headers["accept"] == "application/vnd.api+json"
    assert request.headers["authorization"] == "Key key-123456"


def test_fixed_headers_and_credentials_stay_on_the_platforms_origin() -> None:
    with FakeHttpServer() as api, FakeHttpServer() as cdn:
        client = make_client(
            api.url,
            [],
            headers={"revision": "2026-07-15"},
            auth=lambda: {"Authorization": "Key key-123456"},
            allowed_hosts=["localhost"],
        )
        client.request("PUT", cdn.url.replace("127.0.0.1", "localhost") + "/u", data=b"x")
    assert "revision" not in cdn.requests[0].headers
    assert "authorization" not in cdn.requests[0].headers


def test_a_body_over_the_platforms_limit_is_refused_before_it_is_sent() -> None:
    with FakeHttpServer() as server:
        client = make_client(server.url, [], max_request_bytes=100)
        with pytest.raises(PayloadTooLargeError, match="not sent") as refused:
            client.request("POST", "/import", json={"x": "y" * 100})
        with pytest.raises(PayloadTooLargeError):
            client.request("POST", "/import", data="é" * 51)  # 102 bytes as UTF-8
        client.request("POST", "/import", data=b"y" * 100)
    assert (refused.value.request_bytes, refused.value.status) == (108, None)
    assert [len(r.body) for r in server.requests] == [100]
