"""Production defaults: prod mode refuses a bootstrap token that is short, a placeholder or not random, with
an error that names the variable and how to generate one, and never quotes the token; dev mode keeps its
built-in token."""

from __future__ import annotations

import secrets

import pytest
from pydantic import ValidationError

from service.config import DEFAULT_BOOTSTRAP_TOKEN, MIN_BOOTSTRAP_TOKEN_CHARS, Settings

GENERATE_HINT = "python -c 'import secrets; print(secrets.token_urlsafe(32))'"


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
