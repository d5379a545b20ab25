"""Production defaults: prod mode refuses a bootstrap token that is short, a placeholder or not random, with
an error that names the variable and how to generate one, and never quotes the token; dev mode keeps its
built-in token. The control image's entrypoint refuses prod without secrets and keeps dev on loopback."""

from __future__ import annotations

import os
import secrets
import subprocess
from pathlib import Path

import pytest
from pydantic import ValidationError

from service.config import DEFAULT_BOOTSTRAP_TOKEN, MIN_BOOTSTRAP_TOKEN_CHARS, Settings

GENERATE_HINT = "python -c 'import secrets; print(secrets.token_urlsafe(32))'"
ENTRYPOINT = Path(__file__).resolve().parents[2] / "docker" / "entrypoint.sh"


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        ("x", "is only 1 characters long"),
        ("a-real-secret-from-vault", "is only 24 characters long"),
        ("q7Vd2LxN9rTfKp4mWz8bYc3HsJ6eUa1", "is only 31 characters long"),
        (DEFAULT_BOOTSTRAP_TOKEN, "is the built-in default"),
        ("CHANGE-ME-change-me-change-me-change-me", "placeholder"),
        ("your-token-here-generated-with-secrets", "placeholder"),
        ("ab" * MIN_BOOTSTRAP_TOKEN_CHARS, "distinct characters"),
    ],
)
def test_prod_mode_refuses_a_weak_bootstrap_token(
    token: str, reason: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRAINOPS_MODE", "prod")
    monkeypatch.setenv("TRAINOPS_BOOTSTRAP_ADMIN_TOKEN", token)
    with pytest.raises(ValidationError) as refused:
        Settings()
    message = str(refused.value)
    assert "TRAINOPS_BOOTSTRAP_ADMIN_TOKEN" in message and reason in message
    assert GENERATE_HINT in message and f"at least {MIN_BOOTSTRAP_TOKEN_CHARS} characters" in message
    # The startup log must not carry the secret, not even the refused one.
    assert token not in message and token[-12:] not in message


def test_prod_mode_accepts_a_generated_token_and_dev_mode_keeps_its_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("TRAINOPS_BOOTSTRAP_ADMIN_TOKEN", raising=False)
    monkeypatch.setenv("TRAINOPS_MODE", "dev")
    assert Settings().bootstrap_admin_token.get_secret_value() == DEFAULT_BOOTSTRAP_TOKEN
    assert Settings(bootstrap_admin_token="x").mode == "dev"  # type: ignore[arg-type]

    monkeypatch.setenv("TRAINOPS_MODE", "prod")
    # A url-safe token as the error message says, and a hex one (secrets.token_hex(16): 32 characters).
    for generated in (secrets.token_urlsafe(32), "3f9a1c7e5b2d8046af13c9e7b5d20864"):
        monkeypatch.setenv("TRAINOPS_BOOTSTRAP_ADMIN_TOKEN", generated)
        settings = Settings()
        assert settings.mode == "prod" and settings.bootstrap_admin_token.get_secret_value() == generated


def _entrypoint(**env: str) -> subprocess.CompletedProcess[str]:
    """The image's entrypoint running `env` as its command, with only `env` (plus PATH) set."""
    return subprocess.run(
        ["sh", str(ENTRYPOINT), "env"],
        capture_output=True,
        text=True,
        env={"PATH": os.environ["PATH"], **env},
    )


def _exported(ran: subprocess.CompletedProcess[str]) -> dict[str, str]:
    assert ran.returncode == 0, ran.stderr
    return dict(line.split("=", 1) for line in ran.stdout.splitlines() if line.startswith("TRAINOPS_"))


def test_image_entrypoint_refuses_prod_without_secrets() -> None:
    syntax = subprocess.run(["sh", "-n", str(ENTRYPOINT)], capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr
    assert os.access(ENTRYPOINT, os.X_OK), "the image runs it directly"

    for unset in ({}, {"TRAINOPS_MODE": "prod"}):  # no mode at all is prod: the image's default
        refused = _entrypoint(**unset)
        assert refused.returncode == 78 and refused.stdout == ""
        assert (
            "TRAINOPS_BOOTSTRAP_ADMIN_TOKEN" in refused.stderr and "TRAINOPS_DATABASE_URL" in refused.stderr
        )
        assert GENERATE_HINT in refused.stderr
    only_token = _entrypoint(TRAINOPS_BOOTSTRAP_ADMIN_TOKEN=secrets.token_urlsafe(32))
    assert only_token.returncode == 78 and "TRAINOPS_DATABASE_URL" in only_token.stderr
    assert "TRAINOPS_BOOTSTRAP_ADMIN_TOKEN" not in only_token.stderr

    started = _exported(
        _entrypoint(
            TRAINOPS_BOOTSTRAP_ADMIN_TOKEN=secrets.token_urlsafe(32),
            TRAINOPS_DATABASE_URL="postgresql+psycopg://trainops:pw@postgres:5432/trainops",
        )
    )
    # Prod binds the container's interface; which ports reach it is the deployment's choice.
    assert started["TRAINOPS_MODE"] == "prod" and started["TRAINOPS_API_HOST"] == "0.0.0.0"
    assert _entrypoint(TRAINOPS_MODE="staging").returncode == 78


def test_image_entrypoint_keeps_dev_mode_on_loopback() -> None:
    dev = _exported(_entrypoint(TRAINOPS_MODE="dev"))
    assert dev["TRAINOPS_MODE"] == "dev" and dev["TRAINOPS_API_HOST"] == "127.0.0.1"
    assert _exported(_entrypoint(TRAINOPS_MODE="dev", TRAINOPS_API_HOST="127.0.0.2"))[
        "TRAINOPS_API_HOST"
    ] == ("127.0.0.2")
    for address in ("0.0.0.0", "10.1.2.3", "::"):
        refused = _entrypoint(TRAINOPS_MODE="dev", TRAINOPS_API_HOST=address)
        assert refused.returncode == 78 and "TRAINOPS_DEV_ALLOW_NETWORK" in refused.stderr, address
    allowed = _entrypoint(TRAINOPS_MODE="dev", TRAINOPS_API_HOST="0.0.0.0", TRAINOPS_DEV_ALLOW_NETWORK="1")
    assert _exported(allowed)["TRAINOPS_API_HOST"] == "0.0.0.0"
