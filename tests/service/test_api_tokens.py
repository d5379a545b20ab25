"""Issue 12, defect 8: tokens can expire, ended attempts' tokens do, and a finished run takes no trainer
reports.

Every token may carry an expiry (`expires_at`, API and CLI), checked on every authentication (401 `token
expired`), with or without a body. A trainer token of a run that is completed, failed or stopped gets 409
naming the phase for metrics, heartbeats and checkpoints; operators and admins may still backfill.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
import typer
from fastapi.testclient import TestClient

from service import migrate
from service.cli import parse_duration
from service.crud.runs import create_run
from service.crud.tokens import expire_attempt_tokens
from service.db import make_engine, make_session_factory, transaction
from service.models import ApiToken, Attempt, Run, utcnow
from service.statemachine import Role, RunPhase
from tests.conftest import checkpoint_path, make_run, make_token
from tests.livesrv import LiveServer


def _set_expiry(client: TestClient, token_id: int, expires_at: dt.datetime) -> None:
    app: Any = client.app
    with transaction(app.state.session_factory) as session:
        session.get(ApiToken, token_id).expires_at = expires_at  # type: ignore[union-attr]


def _set_phase(client: TestClient, run_id: int, phase: RunPhase) -> None:
    app: Any = client.app
    with transaction(app.state.session_factory) as session:
        session.get(Run, run_id).phase = phase  # type: ignore[union-attr]


def test_a_token_with_an_expiry_works_until_it_then_gets_401_token_expired(admin: TestClient) -> None:
    expires_at = utcnow() + dt.timedelta(hours=1)
    r = admin.post(
        "/api/v1/tokens", json={"name": "ci", "role": "operator", "expires_at": expires_at.isoformat()}
    )
    assert r.status_code == 201, r.text
    created = r.json()
    assert dt.datetime.fromisoformat(created["expires_at"]) == expires_at
    listed = {t["id"]: t for t in admin.get("/api/v1/tokens").json()}
    assert dt.datetime.fromisoformat(listed[created["id"]]["expires_at"]) == expires_at
    headers = {"Authorization": f"Bearer {created['token']}"}
    assert admin.get("/api/v1/runs", headers=headers).status_code == 200

    _set_expiry(admin, created["id"], utcnow() - dt.timedelta(seconds=1))
    # Without a body (dependency) and with one (checked before the body is read): the same answer.
    for method, path, body in (("GET", "/api/v1/runs", None), ("POST", "/api/v1/nodes", {"hostname": "h9"})):
        r = admin.request(method, path, json=body, headers=headers)
        assert r.status_code == 401, (method, r.text)
        assert r.json()["detail"] == "token expired"
        assert r.headers["www-authenticate"] == "Bearer"


def test_a_token_without_an_expiry_never_expires(admin: TestClient) -> None:
    r = admin.post("/api/v1/tokens", json={"name": "forever", "role": "viewer"})
    assert r.status_code == 201 and r.json()["expires_at"] is None


@pytest.mark.parametrize(
    ("expires_at", "status"),
    [
        ("2020-01-01T00:00:00+00:00", 400),  # in the past: the token could never be used
        ("2999-01-01T00:00:00", 422),  # no time zone: ambiguous
        ("soon", 422),
    ],
)
def test_an_unusable_expiry_is_refused(admin: TestClient, expires_at: str, status: int) -> None:
    r = admin.post("/api/v1/tokens", json={"name": "bad", "role": "viewer", "expires_at": expires_at})
    assert r.status_code == status, r.text


@pytest.mark.parametrize("phase", [RunPhase.completed, RunPhase.failed, RunPhase.stopped])
def test_a_finished_run_refuses_its_trainer_token_with_409_naming_the_phase(
    admin: TestClient, phase: RunPhase
) -> None:
    run = make_run(admin, "done")
    trainer = make_token(admin, "trainer", run_id=run["id"])
    base = f"/api/v1/runs/{run['id']}"
    requests = (
        ("/metrics", {"attempt": 1, "points": [{"step": 1, "loss": 2.0}]}),
        ("/heartbeats", {"attempt": 1, "rank": 0, "host": "h1", "step": 1}),
        ("/checkpoints", {"step": 1, "path": checkpoint_path(admin, run, 1)}),
    )
    # Not finished: an attempt may still be live (needs_attention keeps its attempt running).
    for live in (RunPhase.running, RunPhase.restarting, RunPhase.needs_attention):
        _set_phase(admin, run["id"], live)
        assert admin.post(base + "/metrics", json=requests[0][1], headers=trainer).status_code == 200

    _set_phase(admin, run["id"], phase)
    for path, body in requests:
        r = admin.post(base + path, json=body, headers=trainer)
        assert r.status_code == 409, (path, r.text)
        assert phase.value in r.json()["detail"]
    # An admin may still backfill a finished run (a spool recovered by hand, say).
    assert admin.post(base + "/metrics", json=requests[0][1]).status_code == 200
    assert admin.post(base + "/checkpoints", json=requests[2][1]).status_code == 201


def test_ending_an_attempt_expires_its_token_after_the_grace_and_keeps_an_earlier_expiry(
    admin: TestClient,
) -> None:
    run = make_run(admin, "ended")
    app: Any = admin.app
    ended_at = utcnow()
    with transaction(app.state.session_factory) as session:
        attempt = Attempt(run_id=run["id"], number=1, ended_at=ended_at)
        session.add(attempt)
        session.flush()
        early = utcnow() + dt.timedelta(seconds=5)
        session.add_all(
            [
                ApiToken(
                    name="a", token_hash="a" * 64, role=Role.trainer, run_id=run["id"], attempt_id=attempt.id
                ),
                ApiToken(
                    name="b",
                    token_hash="b" * 64,
                    role=Role.trainer,
                    run_id=run["id"],
                    attempt_id=attempt.id,
                    expires_at=early,
                ),
                ApiToken(name="other", token_hash="c" * 64, role=Role.trainer, run_id=run["id"]),
            ]
        )
        session.flush()
        expire_attempt_tokens(session, attempt=attempt, grace_s=60)
    with transaction(app.state.session_factory) as session:
        expiries = dict(session.execute(sa.select(ApiToken.name, ApiToken.expires_at)).all())
    assert expiries == {"a": ended_at + dt.timedelta(seconds=60), "b": early, "other": None}


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90", 90), ("90s", 90), ("15m", 900), ("12h", 43200), ("30d", 2592000), ("2w", 1209600)],
)
def test_cli_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == dt.timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "0", "-5m", "3y", "soon"])
def test_cli_refuses_what_is_not_a_positive_duration(text: str) -> None:
    with pytest.raises(typer.BadParameter):
        parse_duration(text)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[LiveServer]:
    srv = LiveServer(tmp_path).start()
    try:
        yield srv
    finally:
        srv.stop()


def test_cli_creates_an_expiring_token_lists_and_revokes_it(server: LiveServer) -> None:
    before = utcnow()
    out = server.cli("tokens", "create", "--name", "ci", "--role", "viewer", "--expires-in", "30d").stdout
    secret = out.strip().splitlines()[-1]
    headers = {"Authorization": f"Bearer {secret}"}
    assert httpx.get(f"{server.url}/api/v1/runs", headers=headers).status_code == 200

    (listed,) = [t for t in json.loads(server.cli("tokens", "list", "--json").stdout) if t["name"] == "ci"]
    expires_at = dt.datetime.fromisoformat(listed["expires_at"])
    assert before + dt.timedelta(days=30) <= expires_at <= utcnow() + dt.timedelta(days=30)
    assert "ci" in server.cli("tokens", "list").stdout

    assert "revoked" in server.cli("tokens", "revoke", str(listed["id"])).stdout
    r = httpx.get(f"{server.url}/api/v1/runs", headers=headers)
    assert r.status_code == 401


def test_upgrading_links_live_attempts_tokens_and_expires_the_other_trainer_tokens(migrated_url: str) -> None:
    """Tokens made before 0007 were never linked to an attempt: a run's newest trainer token belongs to its
    live attempt, if any; every other trainer token is an ended attempt's and expires at the upgrade."""
    engine = make_engine(migrated_url)
    factory = make_session_factory(engine)
    with transaction(factory) as session:
        live_run = create_run(session, name="live", owner="a", config={}, start=False, author="t")
        ended_run = create_run(session, name="ended", owner="a", config={}, start=False, author="t")
        live_attempt = Attempt(run_id=live_run.id, number=2)
        session.add_all(
            [
                Attempt(run_id=live_run.id, number=1, ended_at=utcnow()),
                live_attempt,
                Attempt(run_id=ended_run.id, number=1, ended_at=utcnow()),
            ]
        )
        for name, run_id, role in (
            ("live-1", live_run.id, Role.trainer),
            ("live-2", live_run.id, Role.trainer),
            ("ended-1", ended_run.id, Role.trainer),
            ("people", None, Role.operator),
        ):
            session.add(ApiToken(name=name, token_hash=name.ljust(64, "x"), role=role, run_id=run_id))
        session.flush()
        live_attempt_id = live_attempt.id
    engine.dispose()

    migrate.downgrade(migrated_url, "0006")
    before = utcnow()
    migrate.upgrade(migrated_url)

    engine = make_engine(migrated_url)
    try:
        with transaction(make_session_factory(engine)) as session:
            rows = {t.name: (t.attempt_id, t.expires_at) for t in session.scalars(sa.select(ApiToken))}
    finally:
        engine.dispose()
    assert rows["live-2"] == (live_attempt_id, None)
    assert rows["people"] == (None, None)
    for name in ("live-1", "ended-1"):
        attempt_id, expires_at = rows[name]
        assert attempt_id is None and expires_at is not None and before <= expires_at <= utcnow(), name
