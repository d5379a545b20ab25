"""Issue 13, point 2: a pass reads a run's heartbeats with one query, however many ranks the run has, and
reads no file (bench/heartbeat_observe.py measures the time; this counts the statements); an attempt that
ended while no beat could arrive is judged by the checkpoints it committed."""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from bench.heartbeat_observe import RunningAttempts, fill
from service import migrate
from service.db import make_engine, make_session_factory, transaction
from service.models import Checkpoint
from service.orchestrator.decide import EndAttempt, ObservedRun, decide
from service.orchestrator.launchers.base import ProcessStatus
from service.orchestrator.observe import observe_run
from service.recovery.config import OrchestratorConfig
from service.statemachine import CheckpointState


def observe(
    factory: sessionmaker[Session],
    run_id: int,
    tmp_path: Path,
    cfg: OrchestratorConfig,
    launcher: RunningAttempts,
    now: float,
) -> ObservedRun:
    """One pass's observation of the run, its attempt's processes as `launcher` reports them."""
    with transaction(factory) as session:
        return observe_run(
            session,
            run_id=run_id,
            runs_dir=tmp_path / "runs",
            cfg=cfg,
            launchers={"bench": launcher},
            waiting_for_hosts_since=None,
            now=now,
        )


def test_one_heartbeat_query_per_run_per_pass_at_any_size(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'trainops.db'}"
    migrate.upgrade(url)
    engine = make_engine(url)
    factory = make_session_factory(engine)
    now = time.time()
    runs = fill(factory, [8, 160], now)
    cfg = OrchestratorConfig(runs_dir=str(tmp_path / "runs"))
    statements: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(statement)

    sa.event.listen(engine, "before_cursor_execute", record)
    try:
        counted = {}
        for ranks, run_id in runs.items():
            statements.clear()
            observed = observe(factory, run_id, tmp_path, cfg, RunningAttempts(), now)
            assert observed.attempt is not None and len(observed.attempt.beats) == ranks
            assert decide(observed, cfg) == []  # healthy ranks a second old: nothing to do
            counted[ranks] = (sum("FROM heartbeats" in s for s in statements), len(statements))
    finally:
        sa.event.remove(engine, "before_cursor_execute", record)
        engine.dispose()
    assert counted[8][0] == counted[160][0] == 1
    assert counted[8][1] == counted[160][1]  # the whole pass: as many statements for 160 ranks as for 8


class ExitedZero(RunningAttempts):
    def status(self, info: Mapping[str, Any]) -> ProcessStatus:
        return ProcessStatus("exited", exit_code=0)


def test_an_attempt_that_exits_while_no_beat_arrives_is_judged_by_its_checkpoint(tmp_path: Path) -> None:
    """The control plane was down at the end: the last stored beat says step 1,000 of 100,000, but the attempt
    committed its final checkpoint (catalogued from disk) before it exited 0: it completed."""
    url = f"sqlite:///{tmp_path / 'trainops.db'}"
    migrate.upgrade(url)
    engine = make_engine(url)
    factory = make_session_factory(engine)
    now = time.time()
    [run_id] = fill(factory, [8], now).values()
    cfg = OrchestratorConfig(runs_dir=str(tmp_path / "runs"))

    def end() -> EndAttempt:
        actions = decide(observe(factory, run_id, tmp_path, cfg, ExitedZero(), now), cfg)
        assert isinstance(actions[0], EndAttempt)
        return actions[0]

    try:
        assert end().outcome == "crash"  # exited 0 at step 1,000: short of the target
        with transaction(factory) as session:
            path = str(tmp_path / "runs" / "bench-8" / "checkpoints" / "step_00100000")
            session.add(
                Checkpoint(run_id=run_id, attempt=1, step=100_000, path=path, state=CheckpointState.committed)
            )
        assert end().outcome == "completed"
    finally:
        engine.dispose()
