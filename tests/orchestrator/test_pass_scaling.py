"""Issue 13: what the fleet simulator found in a reconcile pass over 100 runs.

- The first pass after 100 runs were submitted launched 99 attempts one after the other, for over a minute,
  and observed no running attempt meanwhile. A pass now reconciles the runs with an attempt in progress
  first and spends at most `launch_budget_s` launching; the rest start over the next passes.
- Every run's observe read every node of the pool (100 runs x 400 nodes a pass). The pool is now read once
  per pass, and again only after a run's actions may have changed it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from service import migrate
from service.crud.logbook import list_logbook
from service.crud.nodes import register_node
from service.crud.runs import (
    create_attempt,
    create_run,
    end_attempt,
    find_attempt,
    get_run,
    runs_to_reconcile,
)
from service.db import make_engine, make_session_factory, transaction
from service.fleet.gateway import SweepHealthGateway
from service.models import Attempt
from service.orchestrator.apply import newest_attempt_that_trained
from service.orchestrator.decide import Launch
from service.orchestrator.launchers.base import LaunchSpec
from service.orchestrator.loop import Orchestrator
from service.recovery.config import OrchestratorConfig, RemediationConfig
from tests.orchestrator.test_trainer_token_expiry import ScriptedLauncher

RUNS = 12


class SlowStartLauncher(ScriptedLauncher):
    """Every start takes `start_s` (a scheduler's sbatch, process spawn on a loaded host)."""

    def __init__(self, start_s: float) -> None:
        super().__init__()
        self.start_s = start_s
        self.started: list[str] = []

    def start(self, spec: LaunchSpec, info: Mapping[str, Any]) -> dict[str, Any]:
        time.sleep(self.start_s)
        self.started.append(spec.run_name)
        return super().start(spec, info)


@pytest.fixture
def factory(tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    url = f"sqlite:///{tmp_path / 'trainops.db'}"
    migrate.upgrade(url)
    engine = make_engine(url)
    with transaction(make_session_factory(engine)) as session:
        for i in range(RUNS):
            register_node(session, hostname=f"h{i:02d}", author="test")
    yield make_session_factory(engine)
    engine.dispose()


def submit(factory: sessionmaker[Session], name: str) -> int:
    with transaction(factory) as session:
        return create_run(
            session,
            name=name,
            owner="test",
            config={"preset": "tiny", "target_steps": 10, "host_count": 1, "launcher": "fake"},
            start=True,
            author="test",
        ).id


def orchestrator(
    factory: sessionmaker[Session], tmp_path: Path, launcher: ScriptedLauncher, **cfg: Any
) -> Orchestrator:
    config = OrchestratorConfig(
        loop_interval_s=0.01,
        runs_dir=str(tmp_path / "runs"),
        remediation=RemediationConfig(backoff_base_s=0.0, deep_check_before_relaunch=False),
        **cfg,
    )
    return Orchestrator(factory, config, launchers={"fake": launcher}, health=SweepHealthGateway(factory))


def test_a_burst_of_new_runs_starts_over_several_passes_and_running_attempts_are_observed_first(
    factory: sessionmaker[Session], tmp_path: Path
) -> None:
    first = submit(factory, "already-running")
    launcher = SlowStartLauncher(start_s=0.05)
    orch = orchestrator(factory, tmp_path, launcher, launch_budget_s=0.12)
    orch.reconcile_once()
    assert launcher.started == ["already-running"]

    burst = [submit(factory, f"new-{i:02d}") for i in range(RUNS - 1)]
    with transaction(factory) as session:
        assert runs_to_reconcile(session) == [first, *burst]  # the one with an attempt in progress first
    passes: list[dict[int, list[Any]]] = []
    while len(launcher.started) < RUNS:
        before = len(launcher.started)
        passes.append(orch.reconcile_once())
        launched = len(launcher.started) - before
        assert 1 <= launched <= 3  # 0.12 s of 0.05 s starts: the budget ends the pass's launching
        assert first in passes[-1]  # and the running attempt was reconciled in every one of them
        assert len(passes) < RUNS
    assert launcher.started[1:] == [f"new-{i:02d}" for i in range(RUNS - 1)]  # in order of submission
    with transaction(factory) as session:
        assert session.scalar(sa.select(sa.func.count()).select_from(Attempt)) == RUNS  # each exactly once


def test_a_pass_reads_the_pool_once_not_once_per_run(factory: sessionmaker[Session], tmp_path: Path) -> None:
    for i in range(RUNS):
        submit(factory, f"run-{i:02d}")
    orch = orchestrator(factory, tmp_path, ScriptedLauncher(), launch_budget_s=60.0)
    orch.reconcile_once()  # launches all of them: each launch changes the pool, which is then read again

    node_reads: list[str] = []
    engine = factory.kw["bind"]

    def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if "FROM nodes" in statement:
            node_reads.append(statement)

    sa.event.listen(engine, "before_cursor_execute", count)
    try:
        done = orch.reconcile_once()  # every run running, nothing to do
    finally:
        sa.event.remove(engine, "before_cursor_execute", count)
    assert len(done) == RUNS and not any(done.values())
    assert len(node_reads) == 1, node_reads


class GatedDeepCheck(SweepHealthGateway):
    """Deep diagnostics that last until the test opens the gate (a 120 s sweep, in test time)."""

    def __init__(self, factory: sessionmaker[Session]) -> None:
        super().__init__(factory)
        self.gate = threading.Event()
        self.checking: list[tuple[str, ...]] = []

    def deep_check(self, hosts: Any, *, deadline_s: float) -> dict[str, bool]:
        self.checking.append(tuple(hosts))
        assert self.gate.wait(30), "the test never opened the gate"
        return {h: h != "h01" for h in hosts}  # h01 fails its diagnostics


def test_deep_diagnostics_before_a_relaunch_run_off_the_pass(
    factory: sessionmaker[Session], tmp_path: Path
) -> None:
    run_id = submit(factory, "after-a-gpu-fault")
    health = GatedDeepCheck(factory)
    launcher = ScriptedLauncher()
    config = OrchestratorConfig(
        loop_interval_s=0.01,
        runs_dir=str(tmp_path / "runs"),
        remediation=RemediationConfig(backoff_base_s=0.0),
    )
    orch = Orchestrator(factory, config, launchers={"fake": launcher}, health=health)
    try:
        observed = orch.observe(run_id)
        relaunch = Launch(hosts=("h01",), checkpoint=None, overrides={}, reason="hardware", deep_check=True)
        orch.applier.launch(observed, relaunch)  # starts the check and returns: the pass goes on
        wait_until(lambda: health.checking == [("h01",)])
        orch.applier.launch(observed, relaunch)  # the next pass: still running, still nothing launched
        assert launcher.tokens == [] and not health.gate.is_set()
        # decide() picked another host meanwhile: that one is checked, the old verdict no longer matters
        other = replace(relaunch, hosts=("h02",))
        orch.applier.launch(observed, other)
        health.gate.set()
        wait_until(lambda: ("h02",) in health.checking)
        wait_until(lambda: orch.applier.launch(observed, other) or bool(launcher.tokens))
        assert len(launcher.tokens) == 1
        with transaction(factory) as session:
            log = [e.message for e in list_logbook(session, run_id=run_id)[0]]
        assert any("deep diagnostics before relaunch started on h01 (deadline 120 s)" in m for m in log)
        assert any("deep diagnostics before relaunch on h02: all passed" in m for m in log)
        assert not any("before relaunch on h01:" in m for m in log)
    finally:
        health.gate.set()
        orch.stop()


def wait_until(condition: Any, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_steps_thrown_away_by_a_rollback_are_charged_to_the_attempt_that_trained_them(
    factory: sessionmaker[Session],
) -> None:
    # attempt 1 trains to step 14 and crashes; attempt 2 restores step 12, whose bytes rotted: its ranks
    # exit 3 at load having trained nothing; attempt 3 restores step 8: the launch charges 14 - 8 steps to
    # attempt 1 (Applier._carry_over; end to end in tests/e2e/test_orchestrator_e2e.py)
    run_id = submit(factory, "rollback")
    with transaction(factory) as session:
        run = get_run(session, run_id=run_id)
        for number, (start, last, reason) in enumerate([(0, 14, "crash"), (12, 12, "crash")], start=1):
            attempt = create_attempt(
                session,
                run=run,
                hosts=("h00",),
                restored_from_checkpoint_id=None,
                launcher={},
                start_step=start,
                author="test",
                overrides={},
            )
            assert attempt.number == number
            end_attempt(
                session,
                attempt=attempt,
                exit_reason=reason,
                exit_code=3 if number == 2 else 1,
                last_step=last,
                steps_lost=None,
                author="test",
                evidence={},
            )
        second = find_attempt(session, run_id=run_id, number=2)
        trained = newest_attempt_that_trained(session, before=second)
        assert trained is not None and trained.number == 1
        assert (
            newest_attempt_that_trained(session, before=find_attempt(session, run_id=run_id, number=1))
            == trained
        )
