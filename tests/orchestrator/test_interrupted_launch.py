"""Issue 13, point 3: a launch cut short by the orchestrator's death is finished exactly once by the next one.

An orchestrator records an attempt (its row, with what identifies its processes), then starts it, then
records the start. Dying between the first two leaves an attempt nobody started: the next orchestrator
starts it, once. Dying between the last two leaves a running attempt whose start is not recorded: the next
one adopts it. The death is a BaseException raised by the launcher, which no handler of the loop catches,
as nothing runs after a SIGKILL (the real SIGKILL, with torchrun: tests/e2e/test_orchestrator_failover.py).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from service import migrate
from service.crud.nodes import register_node
from service.crud.runs import create_run
from service.db import make_engine, make_session_factory, transaction
from service.fleet.gateway import SweepHealthGateway
from service.models import Attempt, LogEntry
from service.orchestrator.launchers.base import LaunchSpec, ProcessStatus
from service.orchestrator.launchers.local import LAUNCH_CLAIM_FILE, LocalLauncher, _claim_launch
from service.orchestrator.loop import Orchestrator
from service.recovery.config import OrchestratorConfig, RemediationConfig


class OrchestratorDied(BaseException):
    """The orchestrator process ends here (nothing of it runs on, no handler sees it)."""


@dataclass
class ClaimingLauncher:
    """Starts are kept by tag, as the local launcher's claim file keeps them: `start` is idempotent and
    `find_started` tells whether an attempt was started. `die` makes the orchestrator die in `start`."""

    kind: str = "fake"
    started: dict[str, dict[str, Any]] = field(default_factory=dict)
    spawned: list[tuple[int, tuple[str, ...]]] = field(default_factory=list)
    die: str | None = None  # "before-start" | "after-start"

    def prepare(self, spec: LaunchSpec) -> dict[str, Any]:
        return {"kind": self.kind, "tag": f"{spec.run_name}-{spec.attempt}", "world_size": len(spec.hosts)}

    def start(self, spec: LaunchSpec, info: Mapping[str, Any]) -> dict[str, Any]:
        if self.die == "before-start":
            raise OrchestratorDied
        if info["tag"] not in self.started:
            self.spawned.append((spec.attempt, spec.hosts))
            self.started[info["tag"]] = {"started": time.time(), "pid": 4242}
        if self.die == "after-start":
            raise OrchestratorDied
        return self.started[info["tag"]]

    def find_started(self, info: Mapping[str, Any]) -> dict[str, Any] | None:
        return self.started.get(info["tag"])

    def status(self, info: Mapping[str, Any]) -> ProcessStatus:
        if info["tag"] in self.started:
            return ProcessStatus("running")
        return ProcessStatus("lost", detail="never started")

    def kill(self, info: Mapping[str, Any], *, grace_s: float = 5.0) -> None:
        return None


@dataclass
class Stack:
    factory: sessionmaker[Session]
    cfg: OrchestratorConfig
    run_id: int

    def orchestrator(self, launcher: ClaimingLauncher) -> Orchestrator:
        return Orchestrator(
            self.factory, self.cfg, launchers={"fake": launcher}, health=SweepHealthGateway(self.factory)
        )

    def attempts(self) -> list[Attempt]:
        with transaction(self.factory) as session:
            return list(session.scalars(sa.select(Attempt).order_by(Attempt.number)))

    def messages(self) -> list[str]:
        with transaction(self.factory) as session:
            return list(session.scalars(sa.select(LogEntry.message).order_by(LogEntry.id)))


def two_hosts_and_a_run(factory: sessionmaker[Session], *, name: str) -> int:
    """Hosts h1 and h2, and a started two-host run on the `fake` launcher; returns the run's id."""
    with transaction(factory) as session:
        for host in ("h1", "h2"):
            register_node(session, hostname=host, author="test")
        return create_run(
            session,
            name=name,
            owner="test",
            config={"preset": "tiny", "target_steps": 10, "host_count": 2, "launcher": "fake"},
            start=True,
            author="test",
        ).id


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    url = f"sqlite:///{tmp_path / 'trainops.db'}"
    migrate.upgrade(url)
    engine = make_engine(url)
    factory = make_session_factory(engine)
    run_id = two_hosts_and_a_run(factory, name="interrupted")
    cfg = OrchestratorConfig(
        loop_interval_s=0.01,
        runs_dir=str(tmp_path / "runs"),
        remediation=RemediationConfig(backoff_base_s=0.0, deep_check_before_relaunch=False),
    )
    yield Stack(factory, cfg, run_id)
    engine.dispose()


def test_an_attempt_recorded_but_never_started_is_started_once_by_the_next_orchestrator(stack: Stack) -> None:
    launcher = ClaimingLauncher(die="before-start")
    with pytest.raises(OrchestratorDied):
        stack.orchestrator(launcher).reconcile_once()
    (recorded,) = stack.attempts()
    assert recorded.ended_at is None and "started" not in recorded.launcher and launcher.spawned == []

    launcher.die = None  # the next orchestrator (the same launcher: the processes' world is shared)
    successor = stack.orchestrator(launcher)
    successor.reconcile_once()
    successor.reconcile_once()
    (attempt,) = stack.attempts()
    assert launcher.spawned == [(1, tuple(recorded.hosts))]  # started once, as recorded
    assert attempt.number == 1 and attempt.ended_at is None and attempt.launcher["pid"] == 4242
    assert sum("attempt 1: starting it" in m for m in stack.messages()) == 1


def test_an_attempt_started_but_not_recorded_is_adopted_not_started_again(stack: Stack) -> None:
    launcher = ClaimingLauncher(die="after-start")
    with pytest.raises(OrchestratorDied):
        stack.orchestrator(launcher).reconcile_once()
    assert len(launcher.spawned) == 1 and "started" not in stack.attempts()[0].launcher

    launcher.die = None
    successor = stack.orchestrator(launcher)
    successor.reconcile_once()
    successor.reconcile_once()
    (attempt,) = stack.attempts()
    assert len(launcher.spawned) == 1  # never started again
    assert attempt.ended_at is None and "started" in attempt.launcher
    assert any("attempt 1: adopted" in m for m in stack.messages())
    assert not any("starting it" in m for m in stack.messages())


def test_the_local_launcher_claims_each_attempts_start_once(tmp_path: Path) -> None:
    info = {"attempt_dir": str(tmp_path / "0001"), "tag": "tag-1"}
    (tmp_path / "0001").mkdir()
    launcher = LocalLauncher()
    assert launcher.find_started(info) is None
    assert _claim_launch(tmp_path / "0001", "tag-1") is None  # this call claimed it
    again = _claim_launch(tmp_path / "0001", "tag-1")
    assert again is not None and "started" in again  # a second start finds the first
    assert launcher.find_started(info) == {"started": again["started"]}
    # a claim left by another attempt of the same number (another run of the same name) is stale
    assert _claim_launch(tmp_path / "0001", "tag-2") is None
    assert launcher.find_started(info) is None and (tmp_path / "0001" / LAUNCH_CLAIM_FILE).exists()
