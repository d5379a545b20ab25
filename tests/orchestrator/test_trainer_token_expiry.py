"""Issue 12, defect 8: an attempt's trainer token dies with the attempt, after a grace for late deliveries.

The orchestrator makes one trainer token per attempt. It used to live forever: after the run completed, the
token still ingested metrics and registered checkpoints. Now the attempt's end sets the token's expiry to
ended_at + `trainer_token_grace_s`, and a finished run refuses trainer reports (409) while the grace lasts.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

import service.crud.tokens
from service import migrate
from service.config import Settings
from service.crud.nodes import register_node
from service.crud.runs import create_run
from service.db import make_engine, make_session_factory, transaction
from service.fleet.gateway import SweepHealthGateway
from service.main import create_app
from service.models import ApiToken, Attempt, Run
from service.orchestrator.launchers.base import LaunchSpec, ProcessStatus
from service.orchestrator.loop import Orchestrator
from service.recovery.config import OrchestratorConfig, RemediationConfig
from service.statemachine import RunPhase
from tests.conftest import ADMIN_HEADERS

GRACE_S = 300.0
TARGET_STEPS = 20


@dataclass
class ScriptedLauncher:
    """Attempts that run until the test says they exited; keeps each attempt's trainer token (what the
    launcher hands the trainer in TRAINOPS_TOKEN)."""

    kind: str = "fake"
    tokens: list[str] = field(default_factory=list)
    exit_code: int | None = None

    def prepare(self, spec: LaunchSpec) -> dict[str, Any]:
        self.tokens.append(spec.env["TRAINOPS_TOKEN"])
        return {"kind": self.kind, "tag": uuid.uuid4().hex, "world_size": len(spec.hosts)}

    def start(self, spec: LaunchSpec, info: Mapping[str, Any]) -> dict[str, Any]:
        self.exit_code = None
        return {}

    def status(self, info: Mapping[str, Any]) -> ProcessStatus:
        if self.exit_code is None:
            return ProcessStatus("running")
        return ProcessStatus("exited", exit_code=self.exit_code)

    def kill(self, info: Mapping[str, Any], *, grace_s: float = 5.0) -> None:
        return None


@dataclass
class Stack:
    factory: sessionmaker[Session]
    orchestrator: Orchestrator
    launcher: ScriptedLauncher
    api: TestClient
    run_id: int

    def report(self, token: str, attempt: int, step: int) -> int:
        """A trainer's metric batch (what its reporter sends, or replays from its spool)."""
        r = self.api.post(
            f"/api/v1/runs/{self.run_id}/metrics",
            json={"attempt": attempt, "points": [{"step": step, "loss": 2.0}]},
            headers={"Authorization": f"Bearer {token}"},
        )
        return r.status_code

    def attempt(self, number: int) -> Attempt:
        with transaction(self.factory) as session:
            found = session.scalars(
                sa.select(Attempt).where(Attempt.run_id == self.run_id, Attempt.number == number)
            ).one()
            session.expunge(found)
        return found


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    url = f"sqlite:///{tmp_path / 'trainops.db'}"
    migrate.upgrade(url)
    factory = make_session_factory(make_engine(url))
    with transaction(factory) as session:
        register_node(session, hostname="h1", author="test")
        run_id = create_run(
            session,
            name="tokens",
            owner="test",
            config={"preset": "tiny", "target_steps": TARGET_STEPS, "host_count": 1, "launcher": "fake"},
            start=True,
            author="test",
        ).id
    launcher = ScriptedLauncher()
    cfg = OrchestratorConfig(
        loop_interval_s=0.01,
        runs_dir=str(tmp_path / "runs"),
        trainer_token_grace_s=GRACE_S,
        remediation=RemediationConfig(backoff_base_s=0.0, deep_check_before_relaunch=False),
    )
    orchestrator = Orchestrator(
        factory, cfg, launchers={"fake": launcher}, health=SweepHealthGateway(factory), pager=None
    )
    with TestClient(
        create_app(Settings(database_url=url, home=tmp_path / "home")), raise_server_exceptions=False
    ) as api:
        yield Stack(factory, orchestrator, launcher, api, run_id)


def test_an_ended_attempts_token_works_through_the_grace_then_expires(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    stack.orchestrator.reconcile_once()
    (first,) = stack.launcher.tokens
    assert stack.report(first, attempt=1, step=1) == 200
    with transaction(stack.factory) as session:
        (row,) = session.scalars(sa.select(ApiToken)).all()
        assert row.attempt_id == stack.attempt(1).id and row.expires_at is None  # live: no expiry yet

    stack.launcher.exit_code = 1  # attempt 1 crashes; the orchestrator ends it and launches attempt 2
    stack.orchestrator.reconcile_once()
    ended_at = stack.attempt(1).ended_at
    assert ended_at is not None
    with transaction(stack.factory) as session:
        expiry = session.scalars(
            sa.select(ApiToken.expires_at).where(ApiToken.name.like("%-attempt-1"))
        ).one()
    assert expiry == ended_at + dt.timedelta(seconds=GRACE_S)

    # Within the grace a late delivery of the ended attempt is still taken.
    assert stack.report(first, attempt=1, step=2) == 200

    stack.orchestrator.reconcile_once()
    second = stack.launcher.tokens[-1]
    assert len(stack.launcher.tokens) == 2 and second != first
    assert stack.report(second, attempt=2, step=3) == 200

    # Past the grace the ended attempt's token is refused; the live attempt's is not.
    real_utcnow = service.crud.tokens.utcnow
    monkeypatch.setattr(
        service.crud.tokens, "utcnow", lambda: real_utcnow() + dt.timedelta(seconds=GRACE_S + 1)
    )
    late = stack.api.post(
        f"/api/v1/runs/{stack.run_id}/metrics",
        json={"attempt": 1, "points": [{"step": 4}]},
        headers={"Authorization": f"Bearer {first}"},
    )
    assert late.status_code == 401 and late.json()["detail"] == "token expired"
    assert stack.report(second, attempt=2, step=4) == 200


def test_a_completed_runs_trainer_token_is_refused_while_an_admin_may_backfill(stack: Stack) -> None:
    stack.orchestrator.reconcile_once()
    (token,) = stack.launcher.tokens
    assert stack.report(token, attempt=1, step=TARGET_STEPS) == 200
    stack.launcher.exit_code = 0
    stack.orchestrator.reconcile_once()
    with transaction(stack.factory) as session:
        assert session.get(Run, stack.run_id).phase == RunPhase.completed  # type: ignore[union-attr]

    # Still within the grace, but the run is finished: no trainer report is taken, whatever its kind.
    refused = stack.api.post(
        f"/api/v1/runs/{stack.run_id}/metrics",
        json={"attempt": 1, "points": [{"step": TARGET_STEPS + 1}]},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert refused.status_code == 409 and "completed" in refused.json()["detail"]
    beat = stack.api.post(
        f"/api/v1/runs/{stack.run_id}/heartbeats",
        json={"attempt": 1, "rank": 0, "host": "h1", "step": TARGET_STEPS},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert beat.status_code == 409
    backfill = stack.api.post(
        f"/api/v1/runs/{stack.run_id}/metrics",
        json={"attempt": 1, "points": [{"step": TARGET_STEPS + 1}]},
        headers=ADMIN_HEADERS,
    )
    assert backfill.status_code == 200, backfill.text
