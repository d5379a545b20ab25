"""Issue 12, defect 3: a row a trainer token can write must not stop the orchestrator watching a run.

A stored metric whose `values.nan` is a number (not the documented list of names) and a registered
checkpoint whose path has a component over 255 bytes (ENAMETOOLONG) once made every observe of their run
raise, so the run was never reconciled again. Now both are read as what they are (no NaN named; an unusable
checkpoint), and whatever does raise in a pass is contained to its run: logged with evidence, retried with
back-off, counted in `trainops_orchestrator_failed_passes_total`, escalated once the run's budget is spent,
while the other runs go on.
"""

from __future__ import annotations

import datetime as dt
import errno
import logging
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy.exc
from prometheus_client import REGISTRY
from sqlalchemy.orm import Session, sessionmaker

import trainer.checkpoint
from service import migrate
from service.crud.logbook import list_logbook
from service.crud.nodes import register_node
from service.crud.runs import active_attempt, create_run, get_run
from service.db import make_engine, make_session_factory, transaction
from service.fleet.gateway import SweepHealthGateway
from service.models import Checkpoint, Metric
from service.orchestrator.launchers.base import LaunchSpec, ProcessStatus
from service.orchestrator.loop import Orchestrator
from service.recovery import samples
from service.recovery.config import OrchestratorConfig
from service.statemachine import CheckpointState, RunPhase, Severity

HOSTS = ("h1", "h2", "h3")
LONG_COMPONENT = "x" * 300  # over NAME_MAX (255 bytes): any stat of the path fails with ENAMETOOLONG


@dataclass
class RunningLauncher:
    """A launcher whose attempts start and keep running (no processes): the loop's own code is under test."""

    kind: str = "fake"

    def prepare(self, spec: LaunchSpec) -> dict[str, Any]:
        return {"kind": self.kind, "tag": uuid.uuid4().hex, "world_size": len(spec.hosts)}

    def start(self, spec: LaunchSpec, info: Mapping[str, Any]) -> dict[str, Any]:
        return {}

    def status(self, info: Mapping[str, Any]) -> ProcessStatus:
        return ProcessStatus("running")

    def kill(self, info: Mapping[str, Any], *, grace_s: float = 5.0) -> None:
        return None


@dataclass
class Fleet:
    factory: sessionmaker[Session]
    orchestrator: Orchestrator
    pages: list[dict[str, Any]]
    runs: dict[str, int]  # "nan", "long_path", "healthy" -> run id


def failed_passes(stage: str, transient: bool) -> float:
    value = REGISTRY.get_sample_value(
        "trainops_orchestrator_failed_passes_total", {"stage": stage, "transient": str(transient).lower()}
    )
    return value or 0.0


@pytest.fixture
def fleet(tmp_path: Path) -> Fleet:
    """Three one-host runs, each with an attempt running: one with a metric row whose `values.nan` is a
    number, one with a catalogued checkpoint whose path the OS refuses, and one healthy."""
    url = f"sqlite:///{tmp_path / 'trainops.db'}"
    migrate.upgrade(url)
    factory = make_session_factory(make_engine(url))
    with transaction(factory) as session:
        for host in HOSTS:
            register_node(session, hostname=host, author="test")
        runs = {
            name: create_run(
                session,
                name=name.replace("_", "-"),
                owner="test",
                config={"preset": "tiny", "target_steps": 100, "host_count": 1, "launcher": "fake"},
                start=True,
                author="test",
            ).id
            for name in ("nan", "long_path", "healthy")
        }
    pages: list[dict[str, Any]] = []
    cfg = OrchestratorConfig(
        loop_interval_s=0.01, failing_pass_limit=3, failing_pass_backoff_max_s=0.05, runs_dir=str(tmp_path)
    )
    orch = Orchestrator(
        factory,
        cfg,
        launchers={"fake": RunningLauncher()},
        health=SweepHealthGateway(factory),
        pager=lambda run, reason, evidence: pages.append({"run_id": run, "reason": reason, **evidence}),
    )
    assert set(orch.reconcile_once()) == set(runs.values())  # every run gets its attempt
    checkpoints_dir = tmp_path / "long-path" / "checkpoints"
    checkpoints_dir.mkdir(parents=True)  # so the OS reaches the long component (not ENOENT before it)
    now = dt.datetime.now(dt.UTC)
    with transaction(factory) as session:
        for attempt_of in runs.values():
            assert active_attempt(session, run_id=attempt_of) is not None
        session.add_all(
            [
                Metric(run_id=runs["nan"], attempt=1, step=1, time=now, loss=2.5, values={"nan": 1}),
                Metric(run_id=runs["nan"], attempt=1, step=2, time=now, loss=2.4, values={"nan": "loss"}),
                Metric(run_id=runs["nan"], attempt=1, step=3, time=now, loss=2.3, values={"nan": [None, 3]}),
                Checkpoint(
                    run_id=runs["long_path"],
                    attempt=1,
                    step=10,
                    path=str(checkpoints_dir / LONG_COMPONENT / "step_10"),
                    state=CheckpointState.committed,
                ),
            ]
        )
    return Fleet(factory=factory, orchestrator=orch, pages=pages, runs=runs)


def test_verify_checkpoint_reports_a_path_the_os_refuses_as_a_failed_verification(tmp_path: Path) -> None:
    for deep in (False, True):
        ok, reason = trainer.checkpoint.verify_checkpoint(tmp_path / LONG_COMPONENT / "step_10", deep=deep)
        assert not ok and reason == "unusable path: File name too long"


def test_bad_rows_are_read_as_what_they_are_and_every_run_is_reconciled(fleet: Fleet) -> None:
    before = failed_passes("observe", False)
    for _ in range(3):
        done = fleet.orchestrator.reconcile_once()
        assert set(done) == set(fleet.runs.values()) and all(actions == [] for actions in done.values())
    assert failed_passes("observe", False) == before
    observed = fleet.orchestrator.observe(fleet.runs["nan"])
    assert observed.attempt is not None
    # a malformed `values.nan` names nothing: the stored values are read as they are
    assert [(s.step, s.loss) for s in observed.attempt.samples] == [(1, 2.5), (2, 2.4), (3, 2.3)]
    assert observed.attempt.last_step == 3
    [candidate] = fleet.orchestrator.observe(fleet.runs["long_path"]).checkpoints
    assert not candidate.usable and candidate.unusable_reason == "unusable path: File name too long"
    with transaction(fleet.factory) as session:
        assert {get_run(session, run_id=r).phase for r in fleet.runs.values()} == {RunPhase.starting}
    assert fleet.pages == []


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (TypeError("'int' object is not iterable"), False),  # the old decoder on `values.nan: 1`
        (OSError(errno.ENAMETOOLONG, "File name too long"), False),  # the old verify_checkpoint
        (sqlalchemy.exc.OperationalError("SELECT", {}, ConnectionRefusedError("refused")), True),
    ],
)
def test_a_run_whose_observe_raises_is_contained_retried_with_back_off_counted_and_escalated(
    fleet: Fleet,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    error: Exception,
    transient: bool,
) -> None:
    """Whatever a bad row still makes raise: the other runs go on; the failing run is retried with
    back-off, each failure logged with its run, stage and error and counted; a lasting one puts the run in
    needs_attention with the evidence, paged once."""
    broken_run = fleet.runs["nan"]
    read_samples = samples.attempt_samples

    def attempt_samples(session: Session, *, run_id: int, attempt: int) -> Any:
        if run_id == broken_run:
            raise error
        return read_samples(session, run_id=run_id, attempt=attempt)

    monkeypatch.setattr("service.orchestrator.observe.attempt_samples", attempt_samples)
    if transient:  # a transient error is waited out for `transient_failure_patience_s` before escalating
        monkeypatch.setattr(fleet.orchestrator.failing_passes, "transient_patience_s", 0.2)
    others = {fleet.runs["long_path"], fleet.runs["healthy"]}
    counted_before = failed_passes("observe", transient)
    caplog.set_level(logging.INFO, logger="trainops.orchestrator")

    done = fleet.orchestrator.reconcile_once()
    assert set(done) == others  # contained: the other runs were reconciled
    failures = fleet.orchestrator.failing_passes.get(broken_run)
    assert failures is not None and failures.count == 1 and failures.last_stage == "observe"
    assert failures.transient is transient and failures.retry_at > time.time() - 1
    assert failed_passes("observe", transient) == counted_before + 1
    [first] = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert f"run {broken_run}" in first.getMessage() and "(observe)" in first.getMessage()
    assert first.exc_info is not None and first.exc_info[1] is error  # the traceback, once per streak

    # back-off: a pass right away does not retry the run, and the others still go on
    fleet.orchestrator.failing_passes._by_run[broken_run] = failures.__class__(
        **{**failures.__dict__, "retry_at": time.time() + 60}
    )
    assert set(fleet.orchestrator.reconcile_once()) == others
    assert fleet.orchestrator.failing_passes.get(broken_run).count == 1
    fleet.orchestrator.failing_passes._by_run[broken_run] = failures

    deadline = time.monotonic() + 30
    while not fleet.pages and time.monotonic() < deadline:
        assert others <= set(fleet.orchestrator.reconcile_once())
        time.sleep(0.01)
    [page] = fleet.pages
    assert page["run_id"] == broken_run and page["stage"] == "observe" and page["transient"] is transient
    assert page["failed_passes"] >= 3 and type(error).__name__ in page["error"]
    with transaction(fleet.factory) as session:
        run = get_run(session, run_id=broken_run)
        assert run.phase == RunPhase.needs_attention
        [entry] = list_logbook(session, run_id=broken_run, min_severity=Severity.critical)[0]
        assert entry.evidence["stage"] == "observe" and "Traceback" in entry.evidence["traceback"]
        assert {get_run(session, run_id=r).phase for r in others} == {RunPhase.starting}
    assert failed_passes("observe", transient) >= counted_before + 3

    # the cause gone (the row repaired), the run's passes succeed again and nobody is paged twice
    monkeypatch.setattr("service.orchestrator.observe.attempt_samples", read_samples)
    time.sleep(fleet.orchestrator.cfg.failing_pass_backoff_max_s)
    assert broken_run in fleet.orchestrator.reconcile_once()
    assert fleet.orchestrator.failing_passes.get(broken_run) is None and len(fleet.pages) == 1


def test_failing_checkpoint_verdicts_never_hold_up_the_run_and_log_their_traceback_once(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The verdict pass is a side step: it is retried every pass, but a traceback a second is noise."""
    import service.orchestrator.loop

    broken_run = fleet.runs["long_path"]
    refresh = service.orchestrator.loop.refresh_verdicts

    def refresh_verdicts(session: Session, *, run_id: int, runs_dir: Path, cfg: OrchestratorConfig) -> None:
        if run_id == broken_run:
            raise OSError(errno.ENAMETOOLONG, "File name too long")
        refresh(session, run_id=run_id, runs_dir=runs_dir, cfg=cfg)

    monkeypatch.setattr(service.orchestrator.loop, "refresh_verdicts", refresh_verdicts)
    caplog.set_level(logging.WARNING, logger="trainops.orchestrator")
    for _ in range(3):
        assert set(fleet.orchestrator.reconcile_once()) == set(fleet.runs.values())
    logged = [(r.levelno, r.exc_info is not None, r.getMessage()) for r in caplog.records]
    what = f"checkpoint verdicts of run {broken_run} failed"
    assert logged == [
        (logging.ERROR, True, what),
        (logging.WARNING, False, f"{what} again: OSError: [Errno 36] File name too long"),
        (logging.WARNING, False, f"{what} again: OSError: [Errno 36] File name too long"),
    ]
    # once it succeeds, the next failure is new evidence: its traceback is logged again
    monkeypatch.setattr(service.orchestrator.loop, "refresh_verdicts", refresh)
    fleet.orchestrator.reconcile_once()
    monkeypatch.setattr(service.orchestrator.loop, "refresh_verdicts", refresh_verdicts)
    caplog.clear()
    fleet.orchestrator.reconcile_once()
    assert [(r.levelno, r.exc_info is not None) for r in caplog.records] == [(logging.ERROR, True)]
