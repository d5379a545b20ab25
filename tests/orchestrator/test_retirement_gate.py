"""Approval gate `node_retirement`: a host of the run charged past its lemon limit is cordoned, not retired;
the retirement is proposed, and carried out once an operator approves it (or left to them when rejected),
however the run fares meanwhile: it keeps training on other hosts, and may complete or be stopped before
anyone answers."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from service import migrate
from service.crud.decisions import answer_decision, get_decision, list_decisions, propose_decision
from service.crud.logbook import list_logbook
from service.crud.nodes import get_node, record_offence, register_node
from service.crud.runs import create_run, get_run, stop_run
from service.crud.telemetry import ingest_metrics
from service.db import make_engine, make_session_factory, transaction
from service.fleet.gateway import SweepHealthGateway
from service.models import Decision, utcnow
from service.orchestrator.decide import EndAttempt
from service.orchestrator.loop import Orchestrator
from service.recovery.config import OrchestratorConfig, RemediationConfig
from service.statemachine import DecisionStatus, NodeState, RunPhase
from tests.orchestrator.test_trainer_token_expiry import ScriptedLauncher

TARGET_STEPS = 10


@dataclass
class Gated:
    factory: sessionmaker[Session]
    orchestrator: Orchestrator
    launcher: ScriptedLauncher
    run_id: int

    def lemon(self, host: str, attempt: int) -> None:
        """The attempt's GPU on `host` fails once more: the orchestrator ends it and cordons the host."""
        observed = self.orchestrator.observe(self.run_id)
        assert observed.attempt is not None and observed.attempt.number == attempt
        assert observed.attempt.hosts == (host,)
        failure = EndAttempt("hardware", "GPU fell off the bus", kill=False, cordon_hosts=(host,))
        self.orchestrator.applier.end_attempt(observed, failure)

    def pending(self) -> Decision:
        with transaction(self.factory) as session:
            (decision,) = list_decisions(session, run_id=self.run_id, status=DecisionStatus.pending)[0]
            session.expunge(decision)
        return decision

    def answer(self, decision_id: int, verdict: DecisionStatus, reason: str) -> None:
        with transaction(self.factory) as session:
            answer_decision(
                session,
                decision_id=decision_id,
                verdict=verdict,
                author="user:oncall",
                reason=reason,
                overrides=None,
            )

    def settle(self, decision_id: int, verdict: DecisionStatus, reason: str) -> Decision:
        """On-call answers; the next pass carries the answer out. Returns the decision as it ends."""
        self.answer(decision_id, verdict, reason)
        self.orchestrator.reconcile_once()
        done = self.decision(decision_id)
        assert done.status is verdict and done.consumed_at is not None
        return done

    def node(self, host: str) -> NodeState:
        with transaction(self.factory) as session:
            return get_node(session, hostname=host).state

    def decision(self, decision_id: int) -> Decision:
        with transaction(self.factory) as session:
            decision = get_decision(session, decision_id=decision_id)
            session.expunge(decision)
        return decision

    def log(self) -> list[str]:
        with transaction(self.factory) as session:
            return [e.message for e in list_logbook(session, run_id=self.run_id, limit=200)[0]]

    def complete(self, attempt: int) -> None:
        """The attempt trains to the target step and exits 0; the orchestrator marks the run completed."""
        with transaction(self.factory) as session:
            ingest_metrics(
                session, run_id=self.run_id, attempt=attempt, points=[{"step": TARGET_STEPS, "loss": 2.0}]
            )
        self.launcher.exit_code = 0
        self.orchestrator.reconcile_once()
        with transaction(self.factory) as session:
            assert get_run(session, run_id=self.run_id).phase is RunPhase.completed


def gated_stack(tmp_path: Path, *, hosts: tuple[str, ...], lemons: tuple[str, ...], on_timeout: str) -> Gated:
    url = f"sqlite:///{tmp_path / 'trainops.db'}"
    migrate.upgrade(url)
    factory = make_session_factory(make_engine(url))
    with transaction(factory) as session:
        for host in hosts:
            register_node(session, hostname=host, author="test")
        for host in lemons:
            for _ in range(2):  # two recent hardware failures: the next one reaches the lemon limit (2.5)
                record_offence(
                    session,
                    node=get_node(session, hostname=host),
                    kind="hardware",
                    reason="Xid 79",
                    author="t",
                )
        run_id = create_run(
            session,
            name="gated",
            owner="test",
            config={
                "preset": "tiny",
                "target_steps": TARGET_STEPS,
                "host_count": 1,
                "launcher": "fake",
                "approvals": {"require": ["node_retirement"], "timeout_s": 600, "on_timeout": on_timeout},
            },
            start=True,
            author="test",
        ).id
    cfg = OrchestratorConfig(
        loop_interval_s=0.01,
        runs_dir=str(tmp_path / "runs"),
        remediation=RemediationConfig(backoff_base_s=0.0, deep_check_before_relaunch=False),
    )
    launcher = ScriptedLauncher()
    orchestrator = Orchestrator(
        factory, cfg, launchers={"fake": launcher}, health=SweepHealthGateway(factory)
    )
    orchestrator.reconcile_once()  # attempt 1 on the first healthy host
    return Gated(factory, orchestrator, launcher, run_id)


@pytest.fixture
def gated(tmp_path: Path) -> Iterator[Gated]:
    """A gated run on h0 (a host with two hardware offences already), h1 and h2 to spare; h0 fails again:
    it is cordoned, its retirement proposed, and the run relaunched on h1 meanwhile."""
    stack = gated_stack(tmp_path, hosts=("h0", "h1", "h2"), lemons=("h0",), on_timeout="hold")
    stack.lemon("h0", attempt=1)
    stack.orchestrator.reconcile_once()  # attempt 2 on h1
    assert stack.orchestrator.observe(stack.run_id).attempt.hosts == ("h1",)  # type: ignore[union-attr]
    yield stack


def test_a_lemon_of_a_gated_run_is_cordoned_and_retired_only_once_approved(gated: Gated) -> None:
    proposal = gated.pending()
    assert proposal.gates == ["node_retirement"] and proposal.proposal["hosts"] == ["h0"]
    assert gated.node("h0") is NodeState.cordoned  # not retired: it waits
    with transaction(gated.factory) as session:
        reason = get_node(session, hostname="h0").state_reason or ""
    assert "retirement awaits an operator's approval" in reason

    gated.orchestrator.reconcile_once()  # pending: h0 stays cordoned while the run trains on h1
    assert gated.node("h0") is NodeState.cordoned
    gated.settle(proposal.id, DecisionStatus.approved, "third Xid 79 this week")
    assert gated.node("h0") is NodeState.retired
    assert any("approved by user:oncall: third Xid 79 this week; h0 retired" in m for m in gated.log())


def test_a_second_lemon_joins_the_pending_retirement(tmp_path: Path) -> None:
    # h0 fails past its lemon limit; the run relaunches on h1, which does the same before anyone answered
    stack = gated_stack(tmp_path, hosts=("h0", "h1", "h2"), lemons=("h0", "h1"), on_timeout="hold")
    paged: list[str] = []
    stack.orchestrator.applier.pager = lambda _run, reason, _evidence: paged.append(reason)
    stack.lemon("h0", attempt=1)
    stack.orchestrator.reconcile_once()  # attempt 2 on h1
    first = stack.pending()
    stack.lemon("h1", attempt=2)
    both = stack.pending()  # still one question, now naming both hosts
    assert both.id == first.id and both.proposal["hosts"] == ["h0", "h1"]
    assert both.expires_at >= first.expires_at
    assert stack.node("h1") is NodeState.cordoned
    assert f"decision {both.id} (still pending) now also retires h1" in "\n".join(stack.log())
    assert "h1" in paged[-1] and f"decision {both.id} awaits approval" in paged[-1]

    stack.settle(both.id, DecisionStatus.approved, "both keep throwing Xid 79")
    assert (stack.node("h0"), stack.node("h1")) == (NodeState.retired, NodeState.retired)
    assert any("h0, h1 retired" in m for m in stack.log())


def test_a_lemon_found_after_the_answer_gets_a_question_of_its_own(gated: Gated) -> None:
    # h0's retirement was just approved, not yet carried out, when h1 passes its limit: h1 is not
    # slipped into an answer nobody gave for it
    first = gated.pending()
    gated.answer(first.id, DecisionStatus.approved, "h0 is done")
    with transaction(gated.factory) as session:
        second = propose_decision(
            session,
            run_id=gated.run_id,
            gates=["node_retirement"],
            reason="retire h1: past the lemon limit",
            proposal={"action": "retire_hosts", "hosts": ["h1"]},
            evidence={},
            timeout_s=600,
            on_timeout="hold",
            author="orchestrator",
        ).id
    assert second != first.id and gated.pending().proposal["hosts"] == ["h1"]
    assert gated.decision(first.id).proposal["hosts"] == ["h0"]


def test_an_approval_after_the_run_completed_still_retires_the_lemon(gated: Gated) -> None:
    # on-call is slow: the run finishes its training on h1 before anyone looks at the page
    proposal = gated.pending()
    gated.complete(attempt=2)
    gated.orchestrator.reconcile_once()  # the completed run is still looked at: its decision is open
    assert gated.decision(proposal.id).status is DecisionStatus.pending

    gated.settle(proposal.id, DecisionStatus.approved, "that host again")
    assert gated.node("h0") is NodeState.retired
    assert any("approved by user:oncall: that host again; h0 retired" in m for m in gated.log())


def test_a_rejection_after_the_run_was_stopped_is_carried_out(gated: Gated) -> None:
    # the run's owner stops it while the retirement waits; on-call then rejects the retirement
    proposal = gated.pending()
    with transaction(gated.factory) as session:
        stop_run(session, run_id=gated.run_id, reason="done for today", author="user:owner")
    gated.orchestrator.reconcile_once()
    gated.orchestrator.reconcile_once()
    with transaction(gated.factory) as session:
        assert get_run(session, run_id=gated.run_id).phase is RunPhase.stopped
    assert gated.decision(proposal.id).consumed_at is None  # the run's stop does not answer for the host

    gated.settle(proposal.id, DecisionStatus.rejected, "the Xids were a driver bug")
    assert gated.node("h0") is NodeState.cordoned  # left to an operator, not retired
    assert any("h0 left cordoned for an operator" in m for m in gated.log())


def test_a_retirement_nobody_answers_times_out_after_the_run_completed(tmp_path: Path) -> None:
    stack = gated_stack(tmp_path, hosts=("h0", "h1"), lemons=("h0",), on_timeout="approve")
    stack.lemon("h0", attempt=1)
    stack.orchestrator.reconcile_once()  # attempt 2 on h1
    proposal = stack.pending()
    stack.complete(attempt=2)
    with transaction(stack.factory) as session:  # the policy's 600 s pass with nobody answering
        get_decision(session, decision_id=proposal.id).expires_at = utcnow() - dt.timedelta(seconds=1)
    stack.orchestrator.reconcile_once()
    assert stack.node("h0") is NodeState.retired  # on_timeout: approve
    done = stack.decision(proposal.id)
    assert done.status is DecisionStatus.timed_out and done.consumed_at is not None
    with transaction(stack.factory) as session:  # nothing left waiting: the pending count drops
        assert list_decisions(session, status=DecisionStatus.pending)[1] == 0
    assert any("unanswered in time; the policy retires them; h0 retired" in m for m in stack.log())


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
