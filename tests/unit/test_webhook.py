"""The signed webhook adapter: exact request shape, signatures, verdicts, rejections, redaction."""

from __future__ import annotations

import datetime as dt
import decimal
import itertools
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
import requests
import responses
from pydantic import ValidationError
from standardwebhooks import Webhook

from connector.errors import (
    BatchFailedError,
    FatalDestinationError,
    PayloadTooLargeError,
    TransientError,
)
from destinations.base import (
    Batch,
    Member,
    NoSyncOptions,
    RetrySettings,
    SyncContext,
    looks_like_token,
    url_secrets,
)
from destinations.testing.contract import ContractHarness, DestinationContract
from destinations.testing.http_server import (
    FakeHttpServer,
    RawAnswer,
    RawSocketServer,
    ScriptedResponse,
)
from destinations.webhook import WebhookDestination, WebhookOptions, signature, signing_key
from tests.fakes.webhook_receiver import WebhookReceiver, read_state

WHSEC = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
PLAIN = "plain-secret-value"
REPO = Path(__file__).resolve().parents[2]
URL = "https://hooks.example.com/winback?token=t0k3n-in-query"


def make(
    url: str = URL,
    *,
    secret: str = WHSEC,
    audience: str | None = "q4",
    attempts: int = 3,
    timeout_s: float = 5,
    max_backoff_s: float = 0,
    **options: Any,
) -> WebhookDestination:
    retry = RetrySettings(
        max_attempts=attempts, initial_backoff_s=0, max_backoff_s=max_backoff_s, timeout_s=timeout_s
    )
    context = SyncContext("lapsed", "run-42", audience, NoSyncOptions(), retry)
    return WebhookDestination(
        WebhookOptions(type="webhook", url=url, secret=secret, **options), context
    )


def member(key: str, email: str = "test@example.com", **fields: Any) -> Member:
    return Member(key, {"email": email}, fields)


class TestWebhookContract(DestinationContract):
    @pytest.fixture
    def harness(self) -> Iterator[ContractHarness]:
        with WebhookReceiver(secret=WHSEC) as receiver:
            yield ContractHarness(
                build=lambda context: WebhookDestination(
                    WebhookOptions(type="webhook", url=receiver.url, secret=WHSEC), context
                ),
                members=lambda: receiver.members,
                calls=lambda: len(receiver.requests),
                secrets=[WHSEC],
                # throttled as a platform would: the kit asks for the hour, and skips it
                fail_next=lambda n: receiver.fail_next(*[429] * n, retry_after=3600),
                reject_keys=receiver.reject_keys,
                fail_with=lambda status, body: receiver.fail_next(status, body=body),
                delivery_ids=lambda: [r.headers.get("webhook-id") for r in receiver.requests],
            )


# --- signing --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("secret", "expected"),
    [  # computed independently with `openssl dgst -sha256 -hmac ... -binary | base64`
        (WHSEC, "v1,GScqQbOwGLyL+Ov+aPd9I2uG0GOmDNeCygDKoEQadoI="),
        (PLAIN, "v1,kxuVSmfpAT/FHNnVenUVxiNqm0VLGj3jablnx1Be16U="),
    ],
)
def test_signature_known_vectors(secret: str, expected: str) -> None:
    assert signature(signing_key(secret), "run-1-1", 1700000000, b'{"a":1}') == expected


def test_signing_key_decodes_whsec_and_keeps_plain_bytes() -> None:
    assert signing_key(PLAIN) == PLAIN.encode()
    assert signing_key("whsec_AAEC") == b"\x00\x01\x02"
    assert signing_key("whsec_AAE") == b"\x00\x01"  # unpadded base64 is accepted
    with pytest.raises(ValueError, match="not valid base64"):
        signing_key("whsec_not base64!")


@responses.activate
def test_request_shape_is_exact() -> None:
    responses.add(responses.POST, URL, json={"ok": True})
    adapter = make()
    adapter.clock = lambda: 1700000000.9
    fields = {"since": dt.date(2024, 5, 1), "spent": decimal.Decimal("12.50"), "tier": None}
    result = adapter.add(Batch(3, [member("k1", "zoë@example.com", **fields)]))
    assert [a.key for a in result.acknowledged] == ["k1"] and not result.rejected
    (call,) = responses.calls
    sent = call.request
    assert (sent.method, sent.url) == ("POST", URL)
    assert (
        sent.body
        == (
            '{"sync":"lapsed","run_id":"run-42","action":"add","audience":"q4","records":[{"key":"k1",'
            '"identifiers":{"email":"zoë@example.com"},"fields":{"since":"2024-05-01","spent":12.5,'
            '"tier":null}}]}'
        ).encode()
    )
    assert sent.headers["Content-Type"] == "application/json"
    assert sent.headers["webhook-id"] == "run-42-3"
    assert sent.headers["webhook-timestamp"] == "1700000000"
    assert isinstance(sent.body, bytes)
    at = dt.datetime.fromtimestamp(1700000000, tz=dt.UTC)
    expected = Webhook(WHSEC).sign("run-42-3", at, sent.body.decode())
    assert sent.headers["webhook-signature"] == expected


@pytest.mark.parametrize("secret", [WHSEC, PLAIN])
@responses.activate
def test_reference_library_verifies_what_we_send(secret: str) -> None:
    responses.add(responses.POST, URL)
    make(secret=secret).remove(Batch(1, [member("k1")]))
    sent = responses.calls[0].request
    verifier = Webhook(secret if secret.startswith("whsec_") else secret.encode())
    assert isinstance(sent.body, bytes)
    assert verifier.verify(sent.body, dict(sent.headers))["action"] == "remove"


@responses.activate
def test_update_action_and_null_audience() -> None:
    responses.add(responses.POST, URL)
    make(audience=None).update(Batch(1, [member("k1", FNAME="Ann")]))
    document = json.loads(responses.calls[0].request.body or b"")
    assert (document["action"], document["audience"]) == ("update", None)
    assert document["records"][0]["fields"] == {"FNAME": "Ann"}


SHA256_VECTORS = {  # computed independently with `printf '%s' VALUE | sha256sum`
    (
        "email",
        "test@example.com",
    ): "973dfe463ec85785f5f95af5ba3906eedb2d931c24e69824a89ea65dba4e813b",
    ("phone", "+33612345678"): "42d573cfc315801d4cd8eddd5416b416a0bf298b9b9e12d6b07442c91db42bd8",
    ("first_name", "zoë"): "2752b88686847fa5c86f47b94ce652b7b3f22a91c37617d451a4db9afa431450",
    ("country", "fr"): "67ad8f41a7bb0a18c45f3efd8f6a32bdcd832bcf8f3f2eb44006c03d53076e18",
}


@pytest.mark.parametrize(("name", "value"), list(SHA256_VECTORS))
@responses.activate
def test_hash_true_sends_sha256_hex_per_identifier(name: str, value: str) -> None:
    digest = SHA256_VECTORS[name, value]
    responses.add(responses.POST, URL)
    make(hash=True).add(Batch(1, [Member("k1", {name: value}, {"FNAME": "kept plain"})]))
    record = json.loads(responses.calls[0].request.body or b"")["records"][0]
    assert record == {"key": "k1", "identifiers": {name: digest}, "fields": {"FNAME": "kept plain"}}


# --- verdicts --------------------------------------------------------------------------------


@responses.activate
def test_429_then_200_resends_the_same_id_with_a_fresh_signature() -> None:
    responses.add(responses.POST, URL, status=429, headers={"Retry-After": "0.2"})
    responses.add(responses.POST, URL, json={})
    adapter = make(max_backoff_s=5)
    ticks = itertools.count(1700000000)
    adapter.clock = lambda: next(ticks)
    started = time.monotonic()
    result = adapter.add(Batch(5, [member("k1")]))
    assert time.monotonic() - started >= 0.2
    assert [a.key for a in result.acknowledged] == ["k1"] and adapter.retries == 1
    first, second = (call.request.headers for call in responses.calls)
    assert first["webhook-id"] == second["webhook-id"] == "run-42-5"
    assert first["webhook-timestamp"] != second["webhook-timestamp"]
    assert first["webhook-signature"] != second["webhook-signature"]
    assert responses.calls[0].request.body == responses.calls[1].request.body


@responses.activate
def test_5xx_until_attempts_run_out() -> None:
    responses.add(responses.POST, URL, status=503, body="down")
    adapter = make(attempts=3)
    with pytest.raises(TransientError, match="POST /winback answered 503"):
        adapter.add(Batch(1, [member("k1")]))
    assert len(responses.calls) == 3 and adapter.retries == 2


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (413, PayloadTooLargeError),
        (401, FatalDestinationError),
        (403, FatalDestinationError),
        (400, BatchFailedError),
        (404, BatchFailedError),
        (422, BatchFailedError),
    ],
)
@responses.activate
def test_statuses_that_are_not_retried(status: int, error: type[Exception]) -> None:
    responses.add(responses.POST, URL, status=status, body=f"refused {WHSEC}")
    with pytest.raises(error) as caught:
        make().add(Batch(1, [member("k1")]))
    assert len(responses.calls) == 1
    assert WHSEC not in str(caught.value) and "t0k3n" not in str(caught.value)


@pytest.mark.parametrize(
    "body",
    [
        "",
        "not json",
        "[1, 2]",
        '{"rejected": "all"}',
        '{"rejected": [{"key": 5}, "k1", null]}',
        '{"rejected": [{"key": "stranger", "reason": "?"}]}',
        '{"ok": true}',
    ],
)
@responses.activate
def test_other_2xx_bodies_acknowledge_everything(body: str) -> None:
    responses.add(responses.POST, URL, body=body, status=202)
    result = make().add(Batch(1, [member("k1"), member("k2")]))
    assert [a.key for a in result.acknowledged] == ["k1", "k2"] and not result.rejected


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (b"", None),
        (b'{"ok": true}', None),
        (b"[1, 2]", None),
        (b'{"rejected": []}', None),
        (
            b"<html><body>Please log in</body></html>",
            "its body is not JSON (Content-Type `text/html`, 39 bytes)",
        ),
        (b'{"rejected": [', "its body is not JSON (Content-Type `application/json`, 14 bytes)"),
        pytest.param(
            b"[" * 50_000 + b"]" * 50_000,
            "its body is nested too deeply to read (Content-Type `application/json`, 100,000 bytes)",
            id="nested-arrays",
        ),
        pytest.param(
            b'{"rejected": ' + b"[" * 2_000 + b"]" * 2_000 + b"}",
            "its body is nested too deeply to read (Content-Type `application/json`, 4,014 bytes)",
            id="nested-rejected",
        ),
        (b'{"rejected": "all"}', "its `rejected` is not a list"),
        (b'{"rejected": [{"id": "k1"}, "k2", null]}', "3 of its `rejected` entries have no `key`"),
        (
            b'{"rejected": [{"key": "stranger"}]}',
            "1 of its `rejected` keys are not in the batch (e.g. `stranger`)",
        ),
    ],
)
def test_a_2xx_body_that_is_not_as_documented_is_accepted_with_one_warning_per_run(
    body: bytes, problem: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    content_type = "text/html" if body.startswith(b"<") else "application/json"
    answer = ScriptedResponse(200, body, {"Content-Type": content_type})
    with FakeHttpServer(lambda r: answer) as server:
        adapter = make(server.url + "/hook/in?token=t0k3n-in-query")
        for number in (1, 2, 3):
            result = adapter.add(Batch(number, [member("k1"), member("k2")]))
            assert [a.key for a in result.acknowledged] == ["k1", "k2"] and not result.rejected
    warnings = [r.getMessage() for r in caplog.records if r.name == "winback.webhook"]
    if problem is None:
        assert warnings == []
        return
    (warning,) = warnings  # once per run, not per batch
    assert warning.startswith(
        f"sync `lapsed`: webhook `webhook` answered 200 to batch 1 (POST /hook/in) but {problem}"
    )
    assert "count as delivered" in warning and "t0k3n" not in warning


def test_a_warning_about_some_entries_does_not_say_none_was_rejected(
    caplog: pytest.LogCaptureFixture,
) -> None:
    body = b'{"rejected": [{"id": "k1"}, {"key": "zzz"}, {"key": "k2", "reason": "bad"}]}'
    with FakeHttpServer(lambda r: ScriptedResponse(200, body)) as server:
        result = make(server.url + "/hook").add(Batch(1, [member("k1"), member("k2")]))
    assert [a.key for a in result.acknowledged] == ["k1"]
    assert [(r.key, r.reason) for r in result.rejected] == [("k2", "bad")]
    warnings = [r.getMessage() for r in caplog.records if r.name == "winback.webhook"]
    assert len(warnings) == 2 and all("none rejected" not in w for w in warnings), warnings
    assert all("the rows it names with their key are recorded as rejected" in w for w in warnings)


def test_each_kind_of_problem_is_reported_once(caplog: pytest.LogCaptureFixture) -> None:
    answers = [b"<html>login</html>", b'{"rejected": "all"}', b"<html>again</html>"]
    with FakeHttpServer() as server:
        server.enqueue(*[ScriptedResponse(200, body) for body in answers])
        adapter = make(server.url + "/hook")
        for number in range(1, 4):
            adapter.add(Batch(number, [member("k1")]))
    warnings = [r.getMessage() for r in caplog.records if r.name == "winback.webhook"]
    assert [w.split(" but ")[1].split(":")[0] for w in warnings] == [
        "its body is not JSON (Content-Type `application/json`, 18 bytes)",
        "its `rejected` is not a list",
    ]


def test_a_2xx_answer_too_long_to_read_still_acknowledges_the_batch() -> None:
    entries = [{"key": f"x{i}", "reason": "r" * 100} for i in range(120_000)]  # ~14 MB
    huge = json.dumps({"rejected": [{"key": "k1"}, *entries]}).encode()
    with FakeHttpServer(lambda r: ScriptedResponse(200, huge)) as server:
        adapter = make(server.url + "/hook")
        result = adapter.add(Batch(1, [member("k1"), member("k2")]))
    assert [a.key for a in result.acknowledged] == ["k1", "k2"] and not result.rejected


@responses.activate
def test_row_rejections_are_attributed_to_their_keys() -> None:
    rejected = [{"key": "k2", "reason": "unknown customer"}, {"key": "k3"}, {"key": "k2"}]
    responses.add(responses.POST, URL, json={"rejected": rejected})
    result = make().add(Batch(1, [member("k1"), member("k2"), member("k3")]))
    assert [a.key for a in result.acknowledged] == ["k1"]
    assert [(r.key, r.reason) for r in result.rejected] == [
        ("k2", "unknown customer"),
        ("k3", "rejected by the receiver"),
    ]


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_fails_the_batch_and_is_not_followed(status: int) -> None:
    # Followed, a 302 became a bodiless GET that `moved` answers 200, and a 307 re-sent the
    # signed batch to a receiver nobody configured: either way the batch counted as delivered.
    with WebhookReceiver(secret=WHSEC) as receiver, WebhookReceiver(secret=WHSEC) as moved:
        moved.server.handler = None  # 200 to anything, GET included
        receiver.server.enqueue(ScriptedResponse(status, "", {"Location": moved.url}))
        adapter = make(receiver.url + "?token=t0k3n-in-query")
        with pytest.raises(BatchFailedError) as caught:
            adapter.add(Batch(1, [member("k1")]))
        assert not moved.requests and not receiver.members
        assert len(receiver.requests) == 1 and adapter.retries == 0
        message = str(caught.value)
        assert f"POST /hook answered {status}, a redirect to `{moved.url}`" in message
        assert "configure the final URL" in message and "t0k3n" not in message
        # Nothing is remembered: the next attempt (the next run) goes to the same URL.
        adapter.add(Batch(1, [member("k1")]))
        assert list(receiver.members) == ["k1"]


def test_check_fails_on_a_redirect() -> None:
    with WebhookReceiver(secret=WHSEC) as receiver, FakeHttpServer() as moved:
        receiver.server.enqueue(ScriptedResponse(301, "", {"Location": moved.url + "/v2"}))
        with pytest.raises(BatchFailedError, match=r"HEAD /hook answered 301, a redirect to `"):
            make(receiver.url).check()
    assert not moved.requests


def test_slow_answer_times_out_and_is_retried_with_the_same_id() -> None:
    with FakeHttpServer() as server:
        server.enqueue(ScriptedResponse(200, delay_s=1.5), ScriptedResponse(200, {}))
        adapter = make(server.url + "/hook", timeout_s=0.6)  # room for a loaded machine
        assert [a.key for a in adapter.add(Batch(2, [member("k1")])).acknowledged] == ["k1"]
    ids = [request.headers["webhook-id"] for request in server.requests]
    assert ids == ["run-42-2", "run-42-2"]


def test_receiver_that_stays_slow_ends_in_a_timeout_but_applies_once() -> None:
    with WebhookReceiver(secret=WHSEC, delay_s=0.5) as receiver:
        adapter = make(receiver.url, attempts=2, timeout_s=0.15)
        with pytest.raises(TransientError, match="timed out"):
            adapter.add(Batch(1, [member("k1")]))
    assert list(receiver.members) == ["k1"]
    assert [d.duplicate for d in receiver.deliveries] == [False, True]


BROKEN_200 = RawAnswer(
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
    b'{"rejected": [{"key"',
    reset=True,
)


def test_an_answer_broken_mid_body_is_retried_with_the_same_id() -> None:
    # The receiver may have applied the batch before its answer broke: it is sent again under
    # the same webhook-id, so the receiver can de-duplicate.
    with RawSocketServer() as server:
        server.enqueue(BROKEN_200)
        adapter = make(server.url + "/hook")
        result = adapter.add(Batch(3, [member("k1")]))
    assert [a.key for a in result.acknowledged] == ["k1"] and adapter.retries == 1
    first, second = server.requests
    assert first.headers["webhook-id"] == second.headers["webhook-id"] == "run-42-3"
    assert first.body == second.body


def test_an_answer_that_keeps_breaking_ends_as_a_transient_error() -> None:
    with RawSocketServer() as server:
        server.enqueue(*[BROKEN_200] * 3)
        adapter = make(server.url + "/hook", attempts=3)
        with pytest.raises(TransientError) as caught:
            adapter.add(Batch(1, [member("k1")]))
    host = server.url.removeprefix("http://")
    assert str(caught.value) == (
        "destination `webhook`: POST /hook: the connection broke while reading the answer "
        f"(connection reset) from {host}"
    )
    assert len(server.requests) == 3 and adapter.retries == 2


def test_a_receiver_answering_something_else_than_http_is_told_apart_from_unreachable() -> None:
    with RawSocketServer() as server:
        server.enqueue(*[RawAnswer(b"garbage\r\n\r\n")] * 2)
        adapter = make(server.url + "/hook", attempts=2)
        with pytest.raises(TransientError) as caught:
            adapter.add(Batch(1, [member("k1")]))
    message = str(caught.value)
    assert "connected to 127.0.0.1:" in message and "could not connect" not in message
    assert "the answer was not HTTP (it began `garbage`)" in message
    assert len(server.requests) == 2


def test_unreachable_receiver_is_transient() -> None:
    with pytest.raises(TransientError, match=r"connection refused talking to 127\.0\.0\.1:9;"):
        make("http://127.0.0.1:9/hook?token=t0k3n", attempts=1).add(Batch(1, [member("k1")]))


# --- options, check, redaction ---------------------------------------------------------------


@pytest.mark.parametrize(
    "changes",
    [
        {"url": "ftp://hooks.example.com/x?token=t0k3n"},
        {"url": "hooks.example.com/x"},
        {"url": ""},
        {"url": "https://evil.example\\@hooks.example.com/x?token=t0k3n"},
        {"url": "https://hooks.example.com\t@evil.example/x?token=t0k3n"},
        {"secret": ""},
        {"secret": "whsec_!!secret-ish!!"},
        {"batch_size": 0},
        {"batch_size": 10001},
        {"unknown": 1},
    ],
)
def test_invalid_options_are_refused_without_echoing_secrets(changes: dict[str, Any]) -> None:
    raw = {"type": "webhook", "url": URL, "secret": "plain-secret-ish", **changes}
    with pytest.raises(ValidationError) as caught:
        WebhookOptions.model_validate(raw)
    assert "secret-ish" not in str(caught.value) and "t0k3n" not in str(caught.value)


def test_a_url_that_parsers_read_as_different_hosts_is_a_config_error() -> None:
    # urlsplit reads host `hooks.example.com`; requests would connect to `evil.example`.
    raw = {"type": "webhook", "url": "https://evil.example\\@hooks.example.com/in", "secret": "s"}
    with pytest.raises(ValidationError) as caught:
        WebhookOptions.model_validate(raw)
    (error,) = caught.value.errors()
    assert error["loc"] == ("url",)
    assert error["msg"] == (
        "Value error, it holds a backslash, which HTTP libraries read differently: the host it "
        "names may not be the one requests connects to; write the URL without it"
    )


def test_reprs_hide_the_secret_and_url_credentials() -> None:
    adapter = make("https://user:pa55word@hooks.example.com/in?token=t0k3n-in-query")
    for text in (repr(adapter), repr(adapter.options), str(adapter.options)):
        assert WHSEC not in text and "t0k3n" not in text and "pa55word" not in text
    assert repr(adapter) == "WebhookDestination(url='https://hooks.example.com/in', sync='lapsed')"
    assert adapter.batch_size == 1000 and make(batch_size=50).batch_size == 50


@pytest.mark.parametrize("status", [400, 401, 500])
def test_credentials_of_the_url_are_redacted_when_the_receiver_echoes_them(status: int) -> None:
    # Only the whole query string was a secret: a receiver quoting the token alone (or the
    # decoded password) put it in the error, hence on stderr and in the state store.
    with FakeHttpServer() as server:
        echo = "bad token s3cr3t-t0k3n/x, user pa$$w0rd@x, page 2, format json"
        server.enqueue(*[ScriptedResponse(status, {"error": echo})] * 2)
        url = server.url.replace("//", "//user:pa%24%24w0rd%40x@") + "/hook"
        adapter = make(f"{url}?token=s3cr3t-t0k3n%2Fx&page=2&format=json", attempts=2)
        with pytest.raises((BatchFailedError, FatalDestinationError, TransientError)) as caught:
            adapter.add(Batch(1, [member("k1")]))
    message = str(caught.value)
    assert "s3cr3t-t0k3n" not in message and "pa$$w0rd" not in message, message
    assert "json" in message or status == 500  # other parameters' values stay readable


TOKEN = "SECRETPATHTOKEN123"
TOKEN_PATH = f"/hooks/catch/123456/{TOKEN}/"


@pytest.mark.parametrize(
    ("segment", "token"),
    [
        ("SECRETPATHTOKEN123", True),  # Zapier-style
        ("T00000000", False),  # Slack's workspace id: short
        ("xoxbWfA7cH2kLmNpQrStUvWx", True),  # Slack's hook token
        ("3f2c9a4e-1b7d-4c8e-9f00-2a6b5c4d3e21", True),  # webhook.site's UUID
        ("123456", False),
        ("customer-sync-events", False),  # words, however long
        ("CUSTOMERSYNCEVENTS", False),
        ("SECRETPATHTOKEN12%33", True),
        ("v1", False),
    ],
)
def test_path_segments_that_look_like_tokens(segment: str, token: bool) -> None:
    assert looks_like_token(unquote(segment)) is token
    assert (segment in url_secrets(f"https://h.example/in/{segment}/")) is token


@pytest.mark.parametrize("status", [500, 401, 404])
def test_a_token_in_the_url_path_never_shows(status: int) -> None:
    # The receiver echoes the path it was called on, as many error pages do.
    with FakeHttpServer(lambda r: ScriptedResponse(status, f"no route {r.path}")) as server:
        adapter = make(server.url + TOKEN_PATH, attempts=2)
        with pytest.raises((TransientError, FatalDestinationError, BatchFailedError)) as caught:
            adapter.add(Batch(1, [member("k1")]))
        if status == 404:  # reachable: the check says so
            checked = make(server.url + TOKEN_PATH, attempts=1).check()
        else:
            with pytest.raises((TransientError, FatalDestinationError)) as refused:
                make(server.url + TOKEN_PATH, attempts=1).check()
            checked = str(refused.value)
    for message in (str(caught.value), checked, repr(adapter)):
        assert TOKEN not in message, message
    assert f"POST /hooks/catch/123456/***/ answered {status}: no route /hooks/catch/" in str(
        caught.value
    )
    assert repr(adapter).startswith("WebhookDestination(url='http://127.0.0.1:")
    assert "/hooks/catch/123456/***/'" in repr(adapter)


def test_check_shows_a_url_with_a_token_without_it() -> None:
    with FakeHttpServer() as server:
        described = make(server.url + TOKEN_PATH).check()
    assert described.startswith(f"webhook receiver {server.url}/hooks/catch/123456/***/ is ")


@pytest.mark.parametrize(
    ("status", "reachable"),
    [(200, True), (404, True), (405, True), (401, False), (403, False), (500, False)],
)
@responses.activate
def test_check_probes_with_head(status: int, reachable: bool) -> None:
    responses.add(responses.HEAD, URL, status=status)
    adapter = make(attempts=2)
    if reachable:
        description = adapter.check()
        assert "https://hooks.example.com/winback" in description and "t0k3n" not in description
    else:
        with pytest.raises((FatalDestinationError, TransientError)):
            adapter.check()
    assert all(call.request.method == "HEAD" for call in responses.calls)


def test_base_url_replaces_scheme_and_host() -> None:
    with WebhookReceiver(secret=WHSEC, path="/in") as receiver:
        adapter = make("https://hooks.example.com/in?x=1", base_url=receiver.server.url)
        adapter.add(Batch(1, [member("k1")]))
    assert receiver.requests[0].path == "/in?x=1" and list(receiver.members) == ["k1"]


# --- the fake receiver itself ----------------------------------------------------------------


def test_receiver_refuses_bad_signatures_and_big_batches() -> None:
    with WebhookReceiver(secret=WHSEC, max_records=1) as receiver:
        with pytest.raises(FatalDestinationError):
            make(receiver.url, secret="another-secret").add(Batch(1, [member("k1")]))
        with pytest.raises(PayloadTooLargeError) as caught:
            make(receiver.url).add(Batch(2, [member("k1"), member("k2")]))
        assert caught.value.request_bytes == len(receiver.requests[-1].body)
        receiver.fail_next(429, retry_after=0)
        make(receiver.url).add(Batch(3, [member("k1")]))
    assert receiver.signature_failures == 1 and list(receiver.members) == ["k1"]
    assert [r.headers.get("webhook-id") for r in receiver.requests][-2:] == ["run-42-3"] * 2


def test_receiver_runs_as_a_process_and_persists_membership(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    command = [sys.executable, "-m", "tests.fakes.webhook_receiver", "--port", "0"]
    command += ["--secret", PLAIN, "--state-file", str(state), "--reject-key", "k3"]
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=REPO) as process:
        try:
            assert process.stdout is not None
            url = process.stdout.readline().strip()
            adapter = make(url, secret=PLAIN)
            result = adapter.add(Batch(1, [member("k1"), member("k2"), member("k3")]))
            adapter.remove(Batch(2, [member("k2")]))
            adapter.close()
            assert [r.key for r in result.rejected] == ["k3"]
            assert requests.head(url, timeout=5).status_code == 405  # POST only
        finally:
            process.terminate()
        assert process.wait(timeout=10) == 0
    assert list(read_state(state)["members"]) == ["k1"]


def test_receiver_listens_on_a_fixed_port_and_reloads_its_state(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    state = tmp_path / "state.json"
    with WebhookReceiver(secret=WHSEC, port=port, state_file=state) as receiver:
        assert receiver.url == f"http://127.0.0.1:{port}/hook"
        make(receiver.url).add(Batch(1, [member("k1")]))
    with WebhookReceiver(secret=WHSEC, state_file=state) as restarted:
        make(restarted.url).add(Batch(1, [member("k2")]))  # same webhook-id: already applied
        assert list(restarted.members) == ["k1"] and restarted.deliveries[0].duplicate
