"""Runs survive failures with no one awake: real torchrun attempts under a real orchestrator."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from prometheus_client import REGISTRY

from service import migrate
from service.config import Settings
from service.crud.logbook import list_logbook
from service.crud.nodes import register_node
from service.crud.runs import create_run
from service.db import engine_from_settings, make_session_factory, transaction
from service.fleet.gateway import SweepHealthGateway
from service.models import Attempt, Checkpoint, Metric, Run
from service.orchestrator.launchers.local import LocalLauncher
from service.orchestrator.loop import Orchestrator
from service.recovery.config import OrchestratorConfig, RemediationConfig
from service.schemas import RunConfig
from tests.livesrv import LiveServer
from trainer.checkpoint import checkpoint_name, list_checkpoints

pytestmark = pytest.mark.slow


class Stack:
    """A control plane process for the trainers to report to, its database, and orchestrators to start."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.settings = Settings(home=home)
        migrate.upgrade(self.settings.resolved_database_url)
        self.engine = engine_from_settings(self.settings)
        self.factory = make_session_factory(self.engine)
        self.server = LiveServer(home).start()
        self.pages: list[dict[str, Any]] = []
        with transaction(self.factory) as session:
            for host in ("h1", "h2", "h3"):
                register_node(session, hostname=host, author="user:test")

    def orchestrator(self, **remediation: Any) -> Orchestrator:
        cfg = OrchestratorConfig(
            loop_interval_s=0.5,
            runs_dir=str(self.home / "runs"),
            api_url=self.server.url,
            remediation=RemediationConfig(backoff_base_s=0.5, **remediation),
        )
        return Orchestrator(
            self.factory,
            cfg,
            launchers={"local": LocalLauncher()},
            health=SweepHealthGateway(self.factory),
            pager=lambda run_id, reason, evidence: self.pages.append({"run_id": run_id, "reason": reason}),
            trainer_env={"TRAINOPS_API_URL": self.server.url},
        )

    def create_run(self, **config: Any) -> int:
        cfg = RunConfig(preset="tiny", checkpoint_interval=4, host_count=2, **config)
        with transaction(self.factory) as session:
            return create_run(
                session,
                name="r",
                owner="test",
                config=cfg.model_dump(mode="json"),
                start=True,
                author="user:test",
            ).id

    def wait_for(self, predicate: Callable[[Any], bool], timeout: float = 240.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with transaction(self.factory) as session:
                if predicate(session):
                    return
            time.sleep(0.3)
        raise AssertionError(f"timed out; logbook: {self.logbook()}")

    def logbook(self) -> list[str]:
        with transaction(self.factory) as session:
            return [e.message for e in list_logbook(session, limit=500)[0]]

    def attempts(self, session: Any, run_id: int) -> list[Attempt]:
        return list(
            session.scalars(sa.select(Attempt).where(Attempt.run_id == run_id).order_by(Attempt.number))
        )

    def close(self) -> None:
        self.server.stop()
        self.engine.dispose()


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    s = Stack(tmp_path)
    try:
        yield s
    finally:
        s.close()


def in_thread(orch: Orchestrator) -> threading.Thread:
    thread = threading.Thread(target=orch.run_forever, daemon=True)
    thread.start()
    return thread


def phase(run_id: int, *phases: str) -> Callable[[Any], bool]:
    return lambda session: session.get(Run, run_id).phase.value in phases


def corrupt(checkpoint_dir: Path) -> None:
    """Flip bytes in the middle of the largest payload file: sizes stay, checksums do not."""
    payload = max(
        (p for p in checkpoint_dir.rglob("*") if p.is_file() and p.suffix == ".distcp"),
        key=lambda p: p.stat().st_size,
    )
    data = bytearray(payload.read_bytes())
    data[len(data) // 2] ^= 0xFF
    payload.write_bytes(bytes(data))


def test_orchestrator_killed_mid_recovery_finishes_it_once_and_skips_a_corrupt_checkpoint(
    stack: Stack,
) -> None:
    # The crash comes at step 14: the saves of steps 4 and 8 are committed by then (a save waits for the
    # previous one), the one of step 12 may be cut short by the crash.
    run_id = stack.create_run(target_steps=20, faults=["1:crash:step=14,rank=0,code=13"])
    first = stack.orchestrator()
    # The first orchestrator launches, sees the crash, ends the attempt ... and dies before relaunching.
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        first.reconcile_once()
        with transaction(stack.factory) as session:
            attempts = stack.attempts(session, run_id)
            if attempts and attempts[0].ended_at is not None:
                break
        time.sleep(0.3)
    with transaction(stack.factory) as session:
        attempts = stack.attempts(session, run_id)
        assert len(attempts) == 1 and attempts[0].exit_reason == "crash" and attempts[0].exit_code == 13
        assert session.get(Run, run_id).phase.value == "restarting"
    # Meanwhile the newest committed checkpoint rotted on disk (the test waits for the state it needs:
    # the committed checkpoints on disk, not a step it assumes was saved in time).
    committed = [
        i.step for i in list_checkpoints(stack.home / "runs" / "r" / "checkpoints", deep=False) if i.ok
    ]
    assert len(committed) >= 2 and committed[:2] == [4, 8], committed
    rotten, fallback = committed[-1], committed[-2]
    corrupt(stack.home / "runs" / "r" / "checkpoints" / checkpoint_name(rotten))

    second = stack.orchestrator()
    thread = in_thread(second)
    stack.wait_for(lambda s: any(a.first_step_at for a in stack.attempts(s, run_id)[1:]))
    second.stop()
    thread.join(10)
    # A third orchestrator adopts the running attempt instead of launching another.
    third = stack.orchestrator()
    thread = in_thread(third)
    stack.wait_for(phase(run_id, "completed", "needs_attention", "failed"))
    third.stop()
    thread.join(10)

    with transaction(stack.factory) as session:
        assert session.get(Run, run_id).phase.value == "completed"
        attempts = stack.attempts(session, run_id)
        # The rot is found off the loop (the background re-hash, before the relaunch) or, when that had
        # verified these bytes before they rotted, by the ranks' re-hash at load: that attempt exits 3, the
        # checkpoint is marked corrupt, and the next attempt restores the fallback.
        assert len(attempts) in (2, 3), ([a.exit_reason for a in attempts], stack.logbook())
        if len(attempts) == 3:
            assert (attempts[1].exit_code, attempts[1].exit_reason) == (3, "crash")
            assert session.get(Checkpoint, attempts[1].restored_from_checkpoint_id).step == rotten
        restored = session.get(Checkpoint, attempts[-1].restored_from_checkpoint_id)
        assert restored.step == fallback
        corrupt_row = session.scalar(
            sa.select(Checkpoint).where(Checkpoint.run_id == run_id, Checkpoint.step == rotten)
        )
        # the rotten file was marked corrupt; if the last attempt saved that step again, the row now
        # describes the new file (the catalog tells the truth about what is on disk)
        if corrupt_row.attempt == 1:
            assert corrupt_row.state.value == "corrupt" and corrupt_row.healthy is False
        else:
            assert corrupt_row.attempt == attempts[-1].number and corrupt_row.state.value != "corrupt"
        # the steps attempt 1 trained past the final restore point are lost, whether the run went back there
        # at once or by way of the rotten checkpoint (attempt 2 then trained nothing, and lost nothing)
        assert attempts[0].steps_lost == attempts[0].last_step - restored.step
        if len(attempts) == 3:
            assert not attempts[1].steps_lost
    log = stack.logbook()
    assert any("its bytes do not match its manifest" in m for m in log)
    assert sum("launched on" in m for m in log) == len(attempts)


def test_the_control_plane_goes_down_mid_run_and_no_metric_is_lost(stack: Stack) -> None:
    run_id = stack.create_run(target_steps=30)
    orch = stack.orchestrator()
    thread = in_thread(orch)
    stack.wait_for(
        lambda s: (s.scalar(sa.select(sa.func.max(Metric.step)).where(Metric.run_id == run_id)) or 0) >= 6
    )
    # The API goes down and stays down until the attempt is over: the trainer keeps training and spools its
    # reports; no rank's heartbeat arrives, so the orchestrator (which reads the database) holds its hang
    # verdict instead of killing a healthy attempt, and stores the spool when the attempt ends (the
    # trainer's own replay into a live server: tests/trainer/test_trainer_reporting.py).
    stack.server.stop()
    stack.wait_for(phase(run_id, "completed", "needs_attention", "failed"))
    stack.server.start()
    orch.stop()
    thread.join(10)
    with transaction(stack.factory) as session:
        assert session.get(Run, run_id).phase.value == "completed"
        steps = list(
            session.scalars(
                sa.select(Metric.step)
                .where(Metric.run_id == run_id, Metric.attempt == 1)
                .order_by(Metric.step)
            )
        )
        assert steps == list(range(1, 31))
        assert len(stack.attempts(session, run_id)) == 1
        assert (
            session.scalar(
                sa.select(Checkpoint.step).where(Checkpoint.run_id == run_id).order_by(Checkpoint.step.desc())
            )
            == 30
        )
    assert any(
        "the trainer had spooled while the control plane was unreachable" in m for m in stack.logbook()
    )


class _Hook(BaseHTTPRequestHandler):
    received: list[dict[str, Any]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        _Hook.received.append(json.loads(body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        """Quiet."""


def test_a_run_that_keeps_failing_stops_within_its_budget_and_pages(stack: Stack) -> None:
    from service.paging import make_pager

    hook = HTTPServer(("127.0.0.1", 0), _Hook)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    run_id = stack.create_run(
        target_steps=20, max_restarts=2, faults=[f"{n}:crash:step=2,rank=1,code=7" for n in range(1, 6)]
    )
    orch = stack.orchestrator()
    orch.pager = make_pager(Settings(page_webhook_url=f"http://127.0.0.1:{hook.server_port}/page"))
    thread = in_thread(orch)
    stack.wait_for(phase(run_id, "completed", "needs_attention", "failed"))
    orch.stop()
    thread.join(10)
    hook.shutdown()
    with transaction(stack.factory) as session:
        run = session.get(Run, run_id)
        assert run.phase.value == "needs_attention" and "restart budget spent" in (run.phase_reason or "")
        assert [a.exit_reason for a in stack.attempts(session, run_id)] == ["crash"] * 3
    assert _Hook.received and _Hook.received[-1]["run_id"] == run_id
    # every pass of the loop was timed for Prometheus
    assert (REGISTRY.get_sample_value("trainops_orchestrator_loop_duration_seconds_count") or 0) > 10
    assert "restart budget" in _Hook.received[-1]["reason"]


def test_a_straggling_host_is_taken_out_and_the_run_moves_on(stack: Stack) -> None:
    # rank 1 (on h2) loses 2 s per step to its host from step 6; its busy time dwarfs the others'
    run_id = stack.create_run(target_steps=16, faults=["1:slow:rank=1,step=6,delay=2"])
    orch = stack.orchestrator(deep_check_before_relaunch=False)
    thread = in_thread(orch)
    stack.wait_for(phase(run_id, "completed", "needs_attention", "failed"))
    orch.stop()
    thread.join(10)
    with transaction(stack.factory) as session:
        assert session.get(Run, run_id).phase.value == "completed"
        first, second = stack.attempts(session, run_id)
        assert first.exit_reason == "hardware" and "straggler: rank 1 on h2" in first.findings["detail"]
        assert (
            first.findings["host"] == "h2"
            and first.findings["step_time_s"] > 3 * first.findings["others_median_s"]
        )
        assert "h2" not in second.hosts
    assert any("node h2: healthy -> cordoned: hardware: straggler" in m for m in stack.logbook())
