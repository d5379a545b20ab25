"""A reconcile pass that keeps failing for a run: retried with back-off, then needs_attention and a page."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy.exc

from service import migrate
from service.crud.logbook import list_logbook
from service.crud.nodes import register_node
from service.crud.runs import create_run, get_run
from service.db import make_engine, make_session_factory, transaction
from service.fleet.gateway import SweepHealthGateway
from service.orchestrator.failing_passes import FailingPasses, is_transient, retry_delay_s
from service.orchestrator.launchers.local import LocalLauncher
from service.orchestrator.loop import Orchestrator
from service.recovery.config import OrchestratorConfig
from service.statemachine import RunPhase, Severity

DB_DOWN = sqlalchemy.exc.OperationalError("SELECT 1", {}, ConnectionRefusedError("connection refused"))


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (DB_DOWN, True),
        (sqlalchemy.exc.TimeoutError("QueuePool limit reached"), True),
        (ConnectionResetError("reset by peer"), True),
        (TimeoutError("timed out"), True),
        (sqlalchemy.exc.IntegrityError("INSERT", {}, ValueError("duplicate key")), False),
        (ValueError("run asks for launcher 'slurm'"), False),
        (KeyError("target_steps"), False),
    ],
)
def test_transient_errors_are_those_of_the_database_and_the_network(
    error: Exception, transient: bool
) -> None:
    assert is_transient(error) is transient


def test_retries_back_off_exponentially_up_to_the_cap() -> None:
    assert [retry_delay_s(n, base_s=1.0, max_s=10.0) for n in range(1, 7)] == [1, 2, 4, 8, 10, 10]


@pytest.mark.parametrize(
    ("errors", "limit", "patience_s", "escalates_at"),
    [
        # (seconds since the first failure, error) for each failed pass; the index that escalates, if any
        ([(0, ValueError("bug"))] * 1 + [(t, ValueError("bug")) for t in (1, 3, 7)], 3, 300.0, 2),
        ([(t, ValueError("bug")) for t in (0, 1)], 3, 300.0, None),
        ([(t, DB_DOWN) for t in (0, 1, 3, 7, 15)], 3, 300.0, None),  # a database restart is waited out
        ([(t, DB_DOWN) for t in (0, 30, 60, 330, 360)], 3, 300.0, 3),  # an outage that lasts is paged
        ([(0, DB_DOWN), (1, DB_DOWN), (3, ValueError("bug"))], 3, 300.0, 2),  # a real error ends the patience
        ([(t, ValueError("bug")) for t in (0, 1, 3, 7, 15, 31)], 1, 0.0, 0),  # escalated once per streak
    ],
)
def test_a_streak_escalates_once_at_its_bound(
    errors: list[tuple[float, Exception]], limit: int, patience_s: float, escalates_at: int | None
) -> None:
    passes = FailingPasses(
        limit=limit, transient_patience_s=patience_s, backoff_base_s=1.0, backoff_max_s=60.0
    )
    escalated = []
    for i, (t, error) in enumerate(errors):
        verdict = passes.failed(7, error, stage="apply", now=1000.0 + t)
        assert verdict.failures.count == i + 1 and verdict.failures.first_failed_at == 1000.0
        if verdict.escalate:
            escalated.append(i)
            passes.mark_escalated(7)
    assert escalated == ([escalates_at] if escalates_at is not None else [])


def test_a_good_pass_ends_the_streak_and_a_failing_run_waits_out_its_back_off() -> None:
    passes = FailingPasses(limit=2, transient_patience_s=0.0, backoff_base_s=1.0, backoff_max_s=60.0)
    passes.failed(7, ValueError("bug"), stage="observe", now=100.0)
    failures = passes.failed(7, ValueError("bug"), stage="observe", now=101.0).failures
    assert failures.retry_at == 103.0 and failures.last_error == "ValueError: bug"
    assert not passes.due(7, 102.9) and passes.due(7, 103.0) and passes.due(8, 0.0)
    passes.mark_escalated(7)
    assert passes.succeeded(7) == failures.__class__(**{**failures.__dict__, "escalated": True})
    assert passes.get(7) is None and passes.succeeded(7) is None
    # a new streak after a good pass escalates again
    passes.failed(7, ValueError("bug"), stage="apply", now=200.0)
    assert passes.failed(7, ValueError("bug"), stage="apply", now=201.0).escalate
    passes.forget_except({8})
    assert passes.get(7) is None


# ---- in the loop ------------------------------------------------------------------------------------


def test_a_run_whose_pass_keeps_failing_needs_attention_with_the_error_and_pages_once(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'trainops.db'}"
    migrate.upgrade(url)
    factory = make_session_factory(make_engine(url))
    with transaction(factory) as session:
        register_node(session, hostname="h1", author="test")
        # A run created while this control plane had Slurm; the orchestrator now runs without it, so every
        # launch raises. Before: a silent loop of log lines, the run forever `pending`.
        run_id = create_run(
            session,
            name="needs-slurm",
            owner="test",
            config={"preset": "tiny", "target_steps": 5, "host_count": 1, "launcher": "slurm"},
            start=True,
            author="test",
        ).id
    pages: list[dict[str, Any]] = []
    cfg = OrchestratorConfig(
        loop_interval_s=0.01, failing_pass_limit=3, failing_pass_backoff_max_s=0.05, runs_dir=str(tmp_path)
    )
    orch = Orchestrator(
        factory,
        cfg,
        launchers={"local": LocalLauncher()},
        health=SweepHealthGateway(factory),
        pager=lambda run, reason, evidence: pages.append({"run_id": run, "reason": reason, **evidence}),
    )
    deadline = time.monotonic() + 30
    while not pages and time.monotonic() < deadline:
        orch.reconcile_once()
        time.sleep(0.01)
    assert len(pages) == 1 and pages[0]["run_id"] == run_id and pages[0]["failed_passes"] == 3
    assert "launcher 'slurm'" in pages[0]["error"] and pages[0]["stage"] == "apply"
    with transaction(factory) as session:
        run = get_run(session, run_id=run_id)
        assert run.phase == RunPhase.needs_attention
        assert run.phase_reason.startswith("the orchestrator failed 3 consecutive reconcile passes")
        entries = list_logbook(session, run_id=run_id, min_severity=Severity.critical)[0]
    assert len(entries) == 1 and "launcher 'slurm'" in entries[0].evidence["error"]
    assert "Traceback" in entries[0].evidence["traceback"]
    # The run now waits for a human: once its back-off is over, the passes succeed (nothing to do), and
    # nobody is paged again.
    time.sleep(cfg.failing_pass_backoff_max_s)
    for _ in range(5):
        assert orch.reconcile_once() == {run_id: []}
    assert len(pages) == 1 and orch.failing_passes.get(run_id) is None
