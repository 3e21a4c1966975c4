"""Signed JSON webhook: every change batch is POSTed to a URL you own.

Each call sends one request ``POST url`` with a compact UTF-8 JSON body::

    {"sync": "lapsed_to_hook", "run_id": "...", "action": "add" | "remove" | "update",
     "audience": "free text or null",
     "records": [{"key": "42", "identifiers": {"email": "..."}, "fields": {"FNAME": "..."}}]}

Identifiers are the normalised plain values, or the SHA-256 hex digest of each value when
``hash = true``. Requests are signed per the Standard Webhooks convention, so receivers can verify
them with an existing library (PyPI ``standardwebhooks`` and its ports):

- ``webhook-id: <run_id>-<batch number>``: the same for every retry of a batch, the receiver's
  idempotency key;
- ``webhook-timestamp``: unix seconds, fresh for every attempt;
- ``webhook-signature: v1,<base64 HMAC-SHA256 of "<id>.<timestamp>.<raw body>">``, keyed with the
  bytes of ``secret`` (``whsec_<base64>`` secrets are base64-decoded first, as the convention says).

Answers: 2xx acknowledges the batch; 408, 425, 429 and 5xx are retried honouring ``Retry-After``;
413 makes the engine halve the batch; 401/403 stop the sync; any other 4xx fails the batch.
Redirects are not followed: a 3xx answer (to the POST or to the check's HEAD) fails the batch,
which stays pending; configure the final URL.

Per-row rejections (winback's extension): a 2xx answer whose JSON body is
``{"rejected": [{"key": "42", "reason": "unknown customer"}]}`` rejects those rows (they are
recorded, not retried); the other rows are acknowledged. Any other 2xx body acknowledges the
whole batch; when it is not JSON (or JSON nested too deeply to read) or its ``rejected`` is
malformed (not a list, entries without ``key``, keys not in the batch), a warning names the
sync and the problem, once per run.

Config example::

    [destinations.crm_hook]
    type = "webhook"
    url = "https://hooks.example.com/winback"
    secret = "${WINBACK_WEBHOOK_SECRET}"    # plain text, or whsec_<base64>
    batch_size = 1000                       # 1..10000 records per request
    hash = false                            # true: SHA-256 hex of each identifier value

    [syncs.lapsed_to_hook]
    segment = "lapsed_buyers"
    destination = "crm_hook"
    audience = "winback-q4"                 # free text, passed through (optional)
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, ClassVar, Literal, NamedTuple
from urllib.parse import urlsplit

import requests
from pydantic import ConfigDict, Field, SecretStr, field_validator

from connector.identity import sha256_hex
from destinations.base import (
    Batch,
    BatchResult,
    DestinationOptions,
    HttpDestination,
    HttpDestinationOptions,
    Rejection,
    SyncContext,
    Verdict,
    answer_too_long,
    check_unambiguous_url,
    default_verdict,
    hide_path_tokens,
    json_bytes,
    url_secrets,
)

Action = Literal["add", "remove", "update"]

SECRET_PREFIX = "whsec_"

log = logging.getLogger("winback.webhook")


class WebhookOptions(HttpDestinationOptions):
    """Options of the ``webhook`` destination."""

    # Validation errors must never echo the secret (or a URL that may carry a token).
    model_config = ConfigDict(hide_input_in_errors=True)

    url: str = Field(description="Receiver URL (http or https); every batch is POSTed here.")
    secret: SecretStr = Field(description="Signing secret: plain text or `whsec_<base64>`.")
    batch_size: int = Field(1000, ge=1, le=10000, description="Records per request.")
    hash: bool = Field(False, description="Send SHA-256 hex digests instead of plain identifiers.")

    def __repr_args__(self) -> Iterable[tuple[str | None, Any]]:
        for name, value in super().__repr_args__():
            yield name, display_url(value) if name == "url" else value

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        parts = urlsplit(value.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an absolute http:// or https:// URL")
        check_unambiguous_url(value)
        return value.strip()

    @field_validator("secret")
    @classmethod
    def _check_secret(cls, value: SecretStr) -> SecretStr:
        signing_key(value.get_secret_value())
        return value


def display_url(url: str) -> str:
    """Scheme, host, port and path: never user info or the query string, which may hold tokens,
    nor path segments that look like tokens (`***`, as in messages: `looks_like_token`)."""
    parts = urlsplit(url)
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{parts.hostname}{port}{hide_path_tokens(parts.path or '/')}"


def signing_key(secret: str) -> bytes:
    """The HMAC key: the decoded bytes of a ``whsec_`` secret, else the secret's UTF-8 bytes."""
    if secret.startswith(SECRET_PREFIX):
        encoded = secret[len(SECRET_PREFIX) :]
        try:
            key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("starts with `whsec_` but the rest is not valid base64") from None
    else:
        key = secret.encode()
    if not key:
        raise ValueError("must not be empty")
    return key


def signature(key: bytes, message_id: str, timestamp: int, body: bytes) -> str:
    """The Standard Webhooks ``webhook-signature`` value for one attempt."""
    signed = f"{message_id}.{timestamp}.".encode() + body
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


class WebhookDestination(HttpDestination):
    """POSTs signed JSON change batches to a receiver you own."""

    name = "webhook"
    options_model = WebhookOptions
    requires_audience = False
    supports_update = True
    matches_on_identifiers = False
    default_batch_size = 1000
    # The receiver URL is per destination: `base_url()` points the client at it.
    default_base_url: ClassVar[str] = ""

    options: WebhookOptions

    def __init__(self, options: DestinationOptions, context: SyncContext):
        if not isinstance(options, WebhookOptions):
            raise TypeError(
                f"WebhookDestination needs WebhookOptions, got {type(options).__name__}"
            )
        super().__init__(options, context)
        parts = urlsplit(options.url)
        self._path = parts.path + (f"?{parts.query}" if parts.query else "")
        self._key = signing_key(options.secret.get_secret_value())
        self.clock: Callable[[], float] = time.time
        self._warned: set[str] = set()
        self._warned_lock = threading.Lock()

    def __repr__(self) -> str:
        return (
            f"WebhookDestination(url='{display_url(self.options.url)}', sync='{self.context.sync}')"
        )

    def base_url(self) -> str:
        # base_url (proxies, tests) replaces the scheme and host; the path and query stay.
        parts = urlsplit(self.options.url)
        return self.options.base_url or f"{parts.scheme}://{parts.netloc}"

    @property
    def batch_size(self) -> int:
        return self.options.batch_size

    def secrets(self) -> Iterable[str | SecretStr | None]:
        # The URL's query string, user info and token-like path segments (a Zapier or Slack
        # hook URL's) may carry credentials too.
        return [self.options.secret, *url_secrets(self.options.url)]

    def verdict(self, response: requests.Response) -> Verdict:
        if response.request.method == "HEAD":
            return _probe_verdict(response.status_code)
        return default_verdict(response)

    def check(self) -> str:
        """HEAD the URL: any answer below 500 except 401/403 and redirects (3xx, which fail the
        check: batches would not be delivered) proves the receiver is reachable."""
        response = self.http.request("HEAD", self._path)
        shown = self.http.redact(display_url(self.http.url(self._path)))
        return (
            f"webhook receiver {shown} is reachable "
            f"(HEAD answered {response.status_code}); batches of {self.batch_size}, "
            f"identifiers {'SHA-256 hashed' if self.options.hash else 'plain'}"
        )

    def add(self, batch: Batch) -> BatchResult:
        return self._deliver("add", batch)

    def remove(self, batch: Batch) -> BatchResult:
        return self._deliver("remove", batch)

    def update(self, batch: Batch) -> BatchResult:
        return self._deliver("update", batch)

    def body(self, action: Action, batch: Batch) -> bytes:
        """The exact bytes sent (and signed) for a batch."""
        hashed = self.options.hash
        records = [
            {
                "key": m.key,
                "identifiers": {n: sha256_hex(v) for n, v in m.identifiers.items()}
                if hashed
                else m.identifiers,
                "fields": m.fields,
            }
            for m in batch.members
        ]
        document = {
            "sync": self.context.sync,
            "run_id": self.context.run_id,
            "action": action,
            "audience": self.context.audience,
            "records": records,
        }
        return json_bytes(document)

    def _deliver(self, action: Action, batch: Batch) -> BatchResult:
        # An empty batch is a no-op: nothing to deliver, so no request.
        if not batch.members:
            return BatchResult()
        body = self.body(action, batch)
        message_id = f"{self.context.run_id}-{batch.number}"

        def signed_headers() -> dict[str, str]:
            timestamp = int(self.clock())
            return {
                "webhook-id": message_id,
                "webhook-timestamp": str(timestamp),
                "webhook-signature": signature(self._key, message_id, timestamp, body),
            }

        response = self.http.request(
            "POST",
            self._path,
            data=body,
            content_type="application/json",
            headers_factory=signed_headers,
        )
        rejections, problems = _rejections(response, batch)
        for problem in problems:
            self._warn_once(problem, response.status_code, batch)
        return BatchResult.from_rejections(batch, rejections)

    def _warn_once(self, problem: AnswerProblem, status: int, batch: Batch) -> None:
        """A 2xx answer the receiver meant as an acknowledgement, but not as documented: say so
        (a proxy's login page answers 200 too), once per run for each kind of problem."""
        with self._warned_lock:
            if problem.kind in self._warned:
                return
            self._warned.add(problem.kind)
        log.warning(
            "sync `%s`: webhook `%s` answered %d to batch %d (%s) but %s: %s. Check that the "
            "URL reaches your receiver (a proxy or a login page may be answering) and that it "
            'answers {"rejected": [{"key": "...", "reason": "..."}]} (reported once per run)',
            self.context.sync,
            self.display_name,
            status,
            batch.number,
            self.http.describe("POST", self._path),
            self.http.redact(problem.text),
            problem.consequence,
        )


def _probe_verdict(status: int) -> Verdict:
    """For the reachability probe: only auth failures and server errors count as failures."""
    if status in (401, 403):
        return Verdict.FAIL_SYNC
    # 501 is how servers that do not implement HEAD answer: still a live receiver.
    if status >= 500 and status != 501:
        return Verdict.RETRY
    return Verdict.OK


class AnswerProblem(NamedTuple):
    """What was wrong with a 2xx answer's body: `kind` (reported once per run), the text and
    what winback makes of the answer."""

    kind: str
    text: str
    consequence: str = "its rows count as delivered, none rejected"


ENTRIES_IGNORED = (
    "those entries are ignored; the rows it names with their key are recorded as rejected, "
    "the others count as delivered"
)


def _rejections(
    response: requests.Response, batch: Batch
) -> tuple[list[Rejection], list[AnswerProblem]]:
    """Rows the receiver refused in a 2xx ``{"rejected": [...]}`` body, and what was wrong with
    the body when it could not be read as such (no JSON, a malformed `rejected`): the rows it
    does not name are acknowledged all the same. An empty body, or JSON without `rejected`, is
    a plain acknowledgement."""
    if not response.content:
        return [], []
    if answer_too_long(response):  # the client has warned already
        return [], []
    try:
        document = response.json()
    except (ValueError, RecursionError) as error:
        # RecursionError: JSON nested deeper than the decoder goes, no more usable than text.
        content_type = response.headers.get("Content-Type") or "none"
        shown = "".join(c if c.isprintable() else "?" for c in content_type)[:60]
        what = "nested too deeply to read" if isinstance(error, RecursionError) else "not JSON"
        text = f"its body is {what} (Content-Type `{shown}`, {len(response.content):,} bytes)"
        return [], [AnswerProblem("not_json", text)]
    entries = document.get("rejected") if isinstance(document, dict) else None
    if entries is None:
        return [], []
    if not isinstance(entries, list):
        return [], [AnswerProblem("not_list", "its `rejected` is not a list")]
    keys = {member.key for member in batch.members}
    rejected: dict[str, Rejection] = {}
    keyless = 0
    strangers: list[str] = []
    for entry in entries:
        key = entry.get("key") if isinstance(entry, dict) else None
        key = str(key) if isinstance(key, str | int) and not isinstance(key, bool) else None
        if key is None:
            keyless += 1
            continue
        # Keys the batch does not contain cannot be attributed; the first reason wins.
        if key not in keys:
            strangers.append(key)
            continue
        if key in rejected:
            continue
        reason = entry.get("reason")
        text = str(reason)[:500] if reason not in (None, "") else "rejected by the receiver"
        rejected[key] = Rejection(key, text)
    problems = []
    if keyless:
        problems.append(
            AnswerProblem(
                "no_key",
                f"{keyless} of its `rejected` entries have no `key` (an object with a text key "
                "is expected)",
                ENTRIES_IGNORED,
            )
        )
    if strangers:
        example = "".join(c if c.isprintable() else "?" for c in strangers[0])[:40]
        problems.append(
            AnswerProblem(
                "unknown_key",
                f"{len(strangers)} of its `rejected` keys are not in the batch (e.g. `{example}`)",
                ENTRIES_IGNORED,
            )
        )
    return list(rejected.values()), problems
