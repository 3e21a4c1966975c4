"""Receivers that answer badly, driven through the CLI: broken or non-HTTP answers, secret URLs.

The receivers are real sockets on 127.0.0.1 (`RawSocketServer` for what no HTTP server sends).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from destinations.testing.http_server import (
    FakeHttpServer,
    RawAnswer,
    RawSocketServer,
    ScriptedResponse,
)
from tests.helpers import run_cli, webhook_project

BROKEN_200 = RawAnswer(
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{",
    reset=True,
)


def test_a_batch_whose_answer_keeps_breaking_counts_as_possibly_applied(tmp_path: Path) -> None:
    with RawSocketServer() as server:
        webhook_project(tmp_path, server.url + "/hook", customers=20)
        server.enqueue(*[BROKEN_200] * 3)  # every attempt of the first run (max_attempts 3)
        failed = run_cli("sync", "run", "--output", "json", cwd=tmp_path)
        run = failed.run()
        assert (failed.returncode, run["status"], run["retries"]) == (1, "failed", 2), failed
        assert "POST /hook: the connection broke while reading the answer" in run["error"]
        assert len({r.headers["webhook-id"] for r in server.requests}) == 1
        # The receiver may have applied the batch: its rows are in doubt, not pending as new.
        status = run_cli("sync", "status", cwd=tmp_path)
        assert "0 (+20 unconfirmed)" in status.stdout, status
        again = run_cli("sync", "run", "--output", "json", cwd=tmp_path)
        assert (again.returncode, again.run()["sent"]["add"]) == (0, 20), again


TOKEN = "SECRETPATHTOKEN123"


@pytest.mark.parametrize("status", [500, 401])
def test_a_token_in_the_webhook_path_never_reaches_output_or_history(
    tmp_path: Path, status: int
) -> None:
    # A Zapier-style URL whose path is the credential; the receiver echoes the path it got.
    answer = lambda request: ScriptedResponse(status, f"nothing at {request.path}")  # noqa: E731
    with FakeHttpServer(answer) as server:
        webhook_project(tmp_path, f"{server.url}/hooks/catch/123456/{TOKEN}/", customers=5)
        failed = run_cli("sync", "run", "--output", "json", cwd=tmp_path)
        history = run_cli("sync", "history", "s", cwd=tmp_path)
        check = run_cli("destinations", "check", "hook", cwd=tmp_path)
    assert server.requests and all(TOKEN in r.path for r in server.requests)
    assert failed.returncode == 1 and check.returncode == 1, (failed, check)
    error = failed.run()["error"]
    assert f"POST /hooks/catch/123456/***/ answered {status}: nothing at" in error, error
    for result in (failed, history, check):
        assert TOKEN not in result.stdout + result.stderr, result
    assert "/hooks/catch/123456/***/" in check.stdout + check.stderr, check


def test_a_2xx_answer_nested_too_deeply_acknowledges_the_batch_with_a_warning(
    tmp_path: Path,
) -> None:
    deep = b"[" * 4_000 + b"]" * 4_000  # more levels than the JSON decoder recurses
    with FakeHttpServer(lambda request: ScriptedResponse(200, deep)) as server:
        webhook_project(tmp_path, server.url + "/hook", customers=20)
        first = run_cli("sync", "run", "--output", "json", cwd=tmp_path)
        again = run_cli("sync", "run", "--output", "json", cwd=tmp_path)
    run = first.run()
    assert (first.returncode, run["status"], run["sent"]["add"]) == (0, "success", 20), first
    assert "its body is nested too deeply to read" in first.stderr, first
    assert "RecursionError" not in first.stdout + first.stderr
    assert (again.returncode, again.run()["sent"]["add"]) == (0, 0), again
    assert len(server.requests) == 1


def test_a_receiver_that_drips_its_answer_cannot_hold_the_run(tmp_path: Path) -> None:
    # Each byte comes within timeout_s; the attempt's overall deadline ends it all the same.
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n"
    dripping = RawAnswer(head + b"{" + b" " * 2000, drip_s=0.01)
    retry = {"max_attempts": 2, "initial_backoff_s": 0, "timeout_s": 0.5, "attempt_timeout_s": 1}
    with RawSocketServer() as server:
        webhook_project(tmp_path, server.url + "/hook", customers=5, destination={"retry": retry})
        server.enqueue(dripping, dripping)
        failed = run_cli("sync", "run", "--output", "json", cwd=tmp_path)
        run = failed.run()
        assert (failed.returncode, run["status"], run["retries"]) == (1, "failed", 1), failed
        assert "POST /hook timed out: no complete answer within 1s" in run["error"], run
        # The receiver may have applied the batch: its rows are in doubt.
        status = run_cli("sync", "status", cwd=tmp_path)
        assert "0 (+5 unconfirmed)" in status.stdout, status
