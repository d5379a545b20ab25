"""Approval gate `node_retirement`: a host of the run charged past its lemon limit is cordoned, not retired;
the retirement is proposed, and carried out once an operator approves it (or left to them when rejected)."""

from __future__ import annotations

from pathlib import Path

from service import migrate
from service.crud.decisions import answer_decision, list_decisions
from service.crud.logbook import list_logbook
from service.crud.nodes import get_node, record_offence, register_node
from service.crud.runs import create_run
from service.db import make_engine, make_session_factory, transaction
from service.fleet.gateway import SweepHealthGateway
from service.orchestrator.decide import EndAttempt
from service.orchestrator.loop import Orchestrator
from service.recovery.config import OrchestratorConfig, RemediationConfig
from service.statemachine import DecisionStatus, NodeState
from tests.orchestrator.test_trainer_token_expiry import ScriptedLauncher


def test_a_lemon_of_a_gated_run_is_cordoned_and_retired_only_once_approved(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'trainops.db'}"
    migrate.upgrade(url)
    factory = make_session_factory(make_engine(url))
    with transaction(factory) as session:
        for host in ("h0", "h1", "h2"):
            register_node(session, hostname=host, author="test")
        for _ in range(2):  # two recent hardware failures: the next one reaches the lemon limit (2.5)
            record_offence(
                session, node=get_node(session, hostname="h0"), kind="hardware", reason="Xid 79", author="t"
            )
        run_id = create_run(
            session,
            name="gated",
            owner="test",
            config={
                "preset": "tiny",
                "target_steps": 10,
                "host_count": 1,
                "launcher": "fake",
                "approvals": {"require": ["node_retirement"], "timeout_s": 600, "on_timeout": "hold"},
            },
            start=True,
            author="test",
        ).id
    cfg = OrchestratorConfig(
        loop_interval_s=0.01,
        runs_dir=str(tmp_path / "runs"),
        remediation=RemediationConfig(backoff_base_s=0.0, deep_check_before_relaunch=False),
    )
    orchestrator = Orchestrator(
        factory, cfg, launchers={"fake": ScriptedLauncher()}, health=SweepHealthGateway(factory)
    )
    orchestrator.reconcile_once()  # attempt 1 on h0 (the first healthy host)
    observed = orchestrator.observe(run_id)
    assert observed.attempt is not None and observed.attempt.hosts == ("h0",)

    # its GPU fails for the third time: the orchestrator ends the attempt and cordons h0
    failure = EndAttempt("hardware", "GPU fell off the bus", kill=False, cordon_hosts=("h0",))
    orchestrator.applier.end_attempt(observed, failure)
    with transaction(factory) as session:
        assert get_node(session, hostname="h0").state is NodeState.cordoned  # not retired: it waits
        (proposal,) = list_decisions(session, run_id=run_id, status=DecisionStatus.pending)[0]
        assert proposal.gates == ["node_retirement"] and proposal.proposal["hosts"] == ["h0"]
        assert "retirement awaits an operator's approval" in (
            get_node(session, hostname="h0").state_reason or ""
        )

    orchestrator.reconcile_once()  # pending: h0 stays cordoned; the run relaunches elsewhere meanwhile
    with transaction(factory) as session:
        assert get_node(session, hostname="h0").state is NodeState.cordoned
        answer_decision(
            session,
            decision_id=proposal.id,
            verdict=DecisionStatus.approved,
            author="user:oncall",
            reason="third Xid 79 this week",
            overrides=None,
        )
    orchestrator.reconcile_once()
    with transaction(factory) as session:
        assert get_node(session, hostname="h0").state is NodeState.retired
        (done,) = list_decisions(session, run_id=run_id)[0]
        assert done.status is DecisionStatus.approved and done.consumed_at is not None
        log = [e.message for e in list_logbook(session, run_id=run_id, limit=200)[0]]
    assert any("approved by user:oncall: third Xid 79 this week; h0 retired" in m for m in log)


def test_without_the_gate_a_lemon_is_retired_at_once(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'trainops.db'}"
    migrate.upgrade(url)
    factory = make_session_factory(make_engine(url))
    with transaction(factory) as session:
        register_node(session, hostname="h0", author="test")
        for _ in range(2):
            record_offence(
                session, node=get_node(session, hostname="h0"), kind="hardware", reason="Xid 79", author="t"
            )
    gateway = SweepHealthGateway(factory)
    assert gateway.cordon(["h0"], reason="Xid 79 again", evidence={}, run_id=None) == []
    with transaction(factory) as session:
        assert get_node(session, hostname="h0").state is NodeState.retired
