"""Database URLs in messages: passwords (in the user info or in a query parameter) never shown,
values from the environment that land in a URL or a secret option redacted everywhere, and a
URL that an unencoded special character in its password broke is explained without quoting it.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from connector.config import build_config
from connector.errors import ConfigError
from connector.warehouse import URL_ENCODING_HINT, parse_database_url, redact_url
from destinations.base import redact_text

MESSAGES = [
    (
        "cannot connect to the warehouse `postgresql://u@h:5432/db?password=TopSecretPw`: failed",
        "cannot connect to the warehouse `postgresql://u@h:5432/db?password=***`: failed",
    ),
    ("GET /hook?token=tok123: 500", "GET /hook?token=***: 500"),
    ("see ?api_key=k-1.2. Then", "see ?api_key=***. Then"),
    ("?sslpassword=a:b&sslmode=require", "?sslpassword=***&sslmode=require"),
    ("(`duckdb:///w.duckdb?motherduck_token=abcd`)", "(`duckdb:///w.duckdb?motherduck_token=***`)"),
    (
        "x `postgresql://user:Xy7@LeakMe99@127.0.0.1:5432/db`",
        "x `postgresql://user:***@127.0.0.1:5432/db`",
    ),
]


@pytest.mark.parametrize(("text", "expected"), MESSAGES)
def test_credentials_in_urls_are_masked_and_the_text_after_them_kept(
    text: str, expected: str
) -> None:
    assert redact_text(text) == expected


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "postgresql+psycopg://winback@127.0.0.1:5432/nope?password=TopSecretPw",
            "postgresql+psycopg://winback@127.0.0.1:5432/nope?password=***",
        ),
        (
            "postgresql://u:pw@h/db?sslmode=require&sslpassword=s3",
            "postgresql://u:***@h/db?sslmode=require&sslpassword=***",
        ),
        ("duckdb:///w.duckdb?memory_limit=96MB", "duckdb:///w.duckdb?memory_limit=96MB"),
        (
            "postgresql://user:Xy7@LeakMe99@127.0.0.1:5432/db",
            "postgresql://user:***@127.0.0.1:5432/db",
        ),
    ],
)
def test_redact_url(url: str, expected: str) -> None:
    assert redact_url(url) == expected


@pytest.mark.parametrize(
    "password", ["Xy7@LeakMe99", "p@ss:w/rd#1%", "ab@cd/ef", "q@:1", "Xy7@kq/Zr9#mP2?w"]
)
def test_a_password_with_unencoded_special_characters_is_explained_not_quoted(
    password: str,
) -> None:
    with pytest.raises(ValueError) as caught:
        parse_database_url(f"postgresql://user:{password}@127.0.0.1:5432/db")
    message = str(caught.value)
    assert URL_ENCODING_HINT in message
    assert "special characters in a password must be URL-encoded (@ → %40" in message
    for fragment in password.replace("@", " ").replace(":", " ").replace("/", " ").split():
        if len(fragment) > 1:
            assert fragment not in message.replace(URL_ENCODING_HINT, ""), fragment


def config_document(url: str, secret_option: str) -> dict[str, object]:
    return {
        "warehouse": {"url": url},
        "segments": {"s": {"key": "id", "sql": "SELECT 1 AS id"}},
        "destinations": {
            "hook": {"type": "webhook", "url": "http://127.0.0.1:9/hook", "secret": secret_option}
        },
        "syncs": {"s": {"segment": "s", "destination": "hook", "identifiers": {"email": "e"}}},
    }


def test_environment_values_in_urls_and_secret_options_are_redacted_everywhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    password = f"pw-{uuid.uuid4().hex[:10]}"
    host = f"host-{uuid.uuid4().hex[:6]}"
    secret = f"whsec-{uuid.uuid4().hex}"
    monkeypatch.setenv("WB_TEST_PW", password)
    monkeypatch.setenv("WB_TEST_HOST", host)
    monkeypatch.setenv("WB_TEST_HOOK_SECRET", secret)
    build_config(
        config_document(
            "postgresql://user:${WB_TEST_PW}@${WB_TEST_HOST}:5432/db", "${WB_TEST_HOOK_SECRET}"
        ),
        path=tmp_path / "winback.toml",
    )
    said = redact_text(f"password authentication failed: {password}; secret {secret}; {host}")
    assert password not in said and secret not in said
    assert host in said  # not a secret: the host is not hidden


def test_environment_values_in_a_url_path_are_redacted_short_ones_are_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # lower-case letters only: no token pattern recognises it, only its coming from the
    # environment says it is a secret
    token = "".join(chr(ord("a") + int(c, 16)) for c in uuid.uuid4().hex[:24])
    monkeypatch.setenv("WB_TEST_PATH_TOKEN", token)
    monkeypatch.setenv("WB_TEST_REGION", "eu")
    document = config_document("duckdb:///w.duckdb", "s" * 20)
    document["destinations"]["hook"]["url"] = (  # type: ignore[index]
        "http://127.0.0.1:9/hooks/${WB_TEST_PATH_TOKEN}/in?region=${WB_TEST_REGION}"
    )
    build_config(document, path=tmp_path / "winback.toml")
    said = redact_text(f"POST /hooks/{token}/in answered 500 (region eu, Europe)")
    assert token not in said
    assert "region eu, Europe" in said


def test_a_password_from_the_environment_breaking_the_url_is_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WB_TEST_PW", "p@ss:w/rd#1%")
    with pytest.raises(ConfigError) as caught:
        build_config(
            config_document("postgresql://user:${WB_TEST_PW}@127.0.0.1:5432/db", "s" * 20),
            path=tmp_path / "winback.toml",
        )
    problems = {p.location: p.message for p in caught.value.problems}
    assert URL_ENCODING_HINT in problems["warehouse.url"]
    assert "int()" not in str(caught.value)
    assert "'w'" not in str(caught.value)
