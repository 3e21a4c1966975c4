"""A fake webhook receiver that behaves like a careful real one, with failure injection.

It verifies every request with the reference ``standardwebhooks`` library (an implementation
independent from ours), keeps the audience membership (``add``/``update`` set a member by key,
``remove`` drops it; a ``webhook-id`` already applied is acknowledged again without being
re-applied) and can fail on purpose::

    with WebhookReceiver(secret="whsec_...") as receiver:
        receiver.fail_next(429, 503, retry_after=1)   # the next two requests fail first
        receiver.reject_keys({"k2"})                 # answered in {"rejected": [...]}, not applied
        receiver.max_records = 100                   # bigger batches get 413
        receiver.delay_s = 0.5                       # applied, then answered slowly
        ...  # point a WebhookDestination at receiver.url
        assert receiver.members == {"k1": {"identifiers": {...}, "fields": {...}}}

Injected failures are answered before the signature is checked, like an overloaded proxy would.
A bad signature or a stale timestamp gets 401, a malformed body 400.

It also runs as its own process, persisting its state after every request (the crash tests kill
winback, not the receiver, then read the membership from the state file)::

    python -m tests.fakes.webhook_receiver --port 0 --secret S --state-file state.json

The first line printed on stdout is its URL. ``read_state(path)`` loads the file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
import threading
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from destinations.testing.http_server import FakeHttpServer, RecordedRequest, ScriptedResponse

ACTIONS = ("add", "remove", "update")


@dataclass(frozen=True)
class Delivery:
    """A verified request the receiver processed (``duplicate`` when its id was seen before)."""

    webhook_id: str
    action: str
    audience: str | None
    keys: tuple[str, ...]
    rejected: tuple[str, ...]
    duplicate: bool


class WebhookReceiver:
    """Fake receiver; use as a context manager and point the adapter at ``url``."""

    def __init__(
        self,
        *,
        secret: str,
        path: str = "/hook",
        max_records: int | None = None,
        max_body_bytes: int | None = None,
        delay_s: float = 0.0,
        state_file: str | Path | None = None,
        port: int = 0,
    ):
        # Plain secrets are keyed with their bytes; the library decodes `whsec_` ones itself.
        self._verifier = Webhook(secret if secret.startswith("whsec_") else secret.encode())
        self.path = path
        self.max_records = max_records
        self.max_body_bytes = max_body_bytes
        self.delay_s = delay_s
        self.state_file = Path(state_file) if state_file else None
        self.deliveries: list[Delivery] = []
        self.signature_failures = 0
        self._members: dict[str, dict[str, Any]] = {}
        self._answers: dict[str, dict[str, Any]] = {}
        self._failures: deque[ScriptedResponse] = deque()
        self._always: ScriptedResponse | None = None
        self._rejected_keys: set[str] = set()
        self._lock = threading.Lock()
        self._answering = threading.Event()
        self._answering.set()
        if self.state_file and self.state_file.exists():
            state = read_state(self.state_file)
            self._members = state["members"]
            self._answers = state["answers"]
        self.server = FakeHttpServer(self._handle, port=port)

    @property
    def url(self) -> str:
        return self.server.url + self.path

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every request received, failed ones included, in order."""
        return self.server.requests

    @property
    def members(self) -> dict[str, dict[str, Any]]:
        """The audience now: key -> {"identifiers": ..., "fields": ...} (a copy)."""
        with self._lock:
            return {key: dict(record) for key, record in self._members.items()}

    def fail_next(
        self, *statuses: int, retry_after: float | None = None, body: str | None = None
    ) -> None:
        """Answer the next requests with these statuses, in order, before anything else."""
        with self._lock:
            self._failures.extend(_failure(s, retry_after, body) for s in statuses)

    def fail_always(self, status: int | None, *, retry_after: float | None = None) -> None:
        """Answer every request with this status (None: back to normal)."""
        with self._lock:
            self._always = None if status is None else _failure(status, retry_after, None)

    def hold(self) -> None:
        """Keep every answer until `release()` (at most a minute): a run then waits on its
        batch in flight for as long as the test needs, however slow the machine."""
        self._answering.clear()

    def release(self) -> None:
        """Answer the held requests, and the later ones at once."""
        self._answering.set()

    def reject_keys(self, keys: Iterable[str]) -> None:
        """Reject these keys in every later request (replaces the previous set)."""
        with self._lock:
            self._rejected_keys = set(keys)

    def __enter__(self) -> WebhookReceiver:
        self.server.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.__exit__(*exc)

    def _handle(self, request: RecordedRequest) -> ScriptedResponse:
        self._answering.wait(60)
        with self._lock:
            response = self._process(request)
            self._save()
        if response.status == 200 and self.delay_s:
            response = dataclasses.replace(response, delay_s=self.delay_s)
        return response

    def _process(self, request: RecordedRequest) -> ScriptedResponse:
        if self._failures:
            return self._failures.popleft()
        if self._always is not None:
            return self._always
        if request.method != "POST" or request.path.split("?")[0] != self.path:
            return ScriptedResponse(405 if request.method != "POST" else 404, {"error": "no"})
        try:
            document = self._verifier.verify(request.body, request.headers)
        except (WebhookVerificationError, ValueError) as error:
            self.signature_failures += 1
            return ScriptedResponse(401, {"error": f"signature: {error}"})
        if not _well_formed(document):
            return ScriptedResponse(400, {"error": "expected action and records with keys"})
        action, records = document["action"], document["records"]
        if self.max_records is not None and len(records) > self.max_records:
            return ScriptedResponse(413, {"error": f"at most {self.max_records} records"})
        if self.max_body_bytes is not None and len(request.body) > self.max_body_bytes:
            return ScriptedResponse(413, {"error": f"at most {self.max_body_bytes} bytes"})
        webhook_id = request.headers["webhook-id"]
        duplicate = webhook_id in self._answers
        if not duplicate:
            self._answers[webhook_id] = self._apply(action, records)
        answer = self._answers[webhook_id]
        keys = tuple(record["key"] for record in records)
        rejected = tuple(entry["key"] for entry in answer.get("rejected", []))
        delivery = Delivery(webhook_id, action, document.get("audience"), keys, rejected, duplicate)
        self.deliveries.append(delivery)
        return ScriptedResponse(200, answer)

    def _apply(self, action: str, records: list[dict[str, Any]]) -> dict[str, Any]:
        rejected = []
        for record in records:
            key = record["key"]
            if key in self._rejected_keys:
                rejected.append({"key": key, "reason": "rejected by the fake receiver"})
            elif action == "remove":
                self._members.pop(key, None)
            else:
                fields = record.get("fields") or {}
                self._members[key] = {"identifiers": record.get("identifiers"), "fields": fields}
        return {"rejected": rejected} if rejected else {"ok": True}

    def _save(self) -> None:
        if self.state_file is None:
            return
        state = {"members": self._members, "answers": self._answers, "requests": len(self.requests)}
        temporary = self.state_file.with_name(self.state_file.name + ".tmp")
        temporary.write_text(json.dumps(state, ensure_ascii=False, indent=1))
        os.replace(temporary, self.state_file)


def read_state(path: str | Path) -> dict[str, Any]:
    """A state file: {"members": {key: record}, "answers": {webhook_id: answer}, "requests": N}."""
    state: dict[str, Any] = json.loads(Path(path).read_text())
    return state


def _well_formed(document: Any) -> bool:
    if not isinstance(document, dict) or document.get("action") not in ACTIONS:
        return False
    records = document.get("records")
    return isinstance(records, list) and all(
        isinstance(record, dict) and isinstance(record.get("key"), str) for record in records
    )


def _failure(status: int, retry_after: float | None, body: str | None) -> ScriptedResponse:
    headers = {"Retry-After": f"{retry_after:g}"} if retry_after is not None else {}
    return ScriptedResponse(status, body if body is not None else {"error": "injected"}, headers)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Fake Standard Webhooks receiver for tests.")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--secret", required=True)
    parser.add_argument("--state-file", required=True, type=Path)
    parser.add_argument("--path", default="/hook")
    parser.add_argument("--max-records", type=int)
    parser.add_argument("--delay-s", type=float, default=0.0)
    parser.add_argument("--reject-key", action="append", default=[])
    parser.add_argument("--fail-next", type=int, nargs="*", default=[], help="statuses")
    args = parser.parse_args(argv)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    receiver = WebhookReceiver(
        secret=args.secret,
        path=args.path,
        max_records=args.max_records,
        delay_s=args.delay_s,
        state_file=args.state_file,
        port=args.port,
    )
    receiver.reject_keys(args.reject_key)
    receiver.fail_next(*args.fail_next)
    with receiver:
        print(receiver.url, flush=True)
        stop.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
