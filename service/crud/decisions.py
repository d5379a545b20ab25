"""Approval gates: the decisions the orchestrator proposes, and what operators (or the timeout) make of them.

A decision is *open* from its proposal until the orchestrator carries out its outcome (a launch, or the run
held in needs_attention), which stamps it consumed; a run has at most one open relaunch decision and at
most one pending retirement (a later lemon joins it; once it is answered, a newer lemon gets its own). Its
status leaves `pending` once (service/statemachine.py, DECISION_TRANSITIONS): two operators answering at
once get one 200 and one 409 naming who answered first.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from service.crud.logbook import write_log
from service.crud.runs import get_run
from service.errors import Conflict, NotFound
from service.models import Decision, Run, utcnow
from service.statemachine import (
    DecisionStatus,
    InvalidTransition,
    LogKind,
    Severity,
    check_decision_transition,
)

OPEN = (DecisionStatus.pending, DecisionStatus.approved, DecisionStatus.rejected, DecisionStatus.timed_out)


RELAUNCH = "relaunch"  # a decision's `proposal["action"]`: the relaunch it gates
RETIRE_HOSTS = "retire_hosts"  # ... or lemons to retire


def decision_action(decision: Decision) -> str:
    return str((decision.proposal or {}).get("action") or RELAUNCH)


def open_decisions(session: Session, *, run_id: int) -> list[Decision]:
    """The run's decisions not yet carried out, oldest first."""
    return list(
        session.scalars(
            sa.select(Decision)
            .where(Decision.run_id == run_id, Decision.consumed_at.is_(None), Decision.status.in_(OPEN))
            .order_by(Decision.id)
        )
    )


def open_decision(session: Session, *, run_id: int, action: str = RELAUNCH) -> Decision | None:
    """The run's decision about `action` not yet carried out, if any."""
    found = [d for d in open_decisions(session, run_id=run_id) if decision_action(d) == action]
    return found[-1] if found else None


def get_decision(session: Session, *, decision_id: int, for_update: bool = False) -> Decision:
    query = sa.select(Decision).where(Decision.id == decision_id)
    if for_update:
        query = query.with_for_update().execution_options(populate_existing=True)
        if session.get_bind().dialect.name == "sqlite":
            # as crud.runs.get_run: a no-op write takes SQLite's write lock before the read
            session.execute(sa.update(Decision).where(Decision.id == decision_id).values(id=Decision.id))
    decision = session.scalar(query)
    if decision is None:
        raise NotFound(f"decision {decision_id} does not exist")
    return decision


def list_decisions(
    session: Session,
    *,
    run_id: int | None = None,
    status: DecisionStatus | None = None,
    limit: int = 100,
    offset: int = 0,
) -> tuple[list[Decision], int]:
    """A page of decisions, newest first, and how many match in all."""
    query = sa.select(Decision)
    if run_id is not None:
        query = query.where(Decision.run_id == run_id)
    if status is not None:
        query = query.where(Decision.status == status)
    total = session.scalar(sa.select(sa.func.count()).select_from(query.subquery())) or 0
    rows = session.scalars(query.order_by(Decision.id.desc()).limit(limit).offset(offset))
    return list(rows), total


def propose_decision(
    session: Session,
    *,
    run_id: int,
    gates: Sequence[str],
    reason: str,
    proposal: dict[str, Any],
    evidence: dict[str, Any],
    timeout_s: float,
    on_timeout: str,
    author: str,
) -> Decision:
    """Record the orchestrator's proposal (idempotent per run and action: the open one is returned if
    there is one). A retirement of hosts the run's pending retirement does not name yet is added to it
    (`_add_hosts`): every host cordoned for want of an answer is named by a decision."""
    get_run(session, run_id=run_id, for_update=True)  # one proposal at a time per run and action
    action = str(proposal.get("action") or RELAUNCH)
    existing = open_decision(session, run_id=run_id, action=action)
    now = utcnow()
    if existing is not None and action == RETIRE_HOSTS:
        if existing.status == DecisionStatus.pending:
            return _add_hosts(
                session, existing, proposal=proposal, evidence=evidence, timeout_s=timeout_s, author=author
            )
        # answered but not yet carried out: its hosts are settled; new ones get a question of their own
        if not set(proposal.get("hosts") or ()) - set((existing.proposal or {}).get("hosts") or ()):
            return existing
    elif existing is not None:
        return existing
    decision = Decision(
        run_id=run_id,
        status=DecisionStatus.pending,
        gates=list(gates),
        reason=reason,
        proposal=proposal,
        evidence=evidence,
        on_timeout=on_timeout,
        created_at=now,
        expires_at=now + dt.timedelta(seconds=timeout_s),
    )
    session.add(decision)
    session.flush()
    write_log(
        session,
        kind=LogKind.decision,
        author=author,
        run_id=run_id,
        severity=Severity.warning,
        message=f"decision {decision.id} awaits approval ({', '.join(gates)}): {reason}; "
        f"unanswered in {timeout_s:.0f} s it is {'approved' if on_timeout == 'approve' else 'held'}",
        evidence={"decision": decision.id, "gates": list(gates), "proposal": proposal, **evidence},
    )
    return decision


def _add_hosts(
    session: Session,
    decision: Decision,
    *,
    proposal: dict[str, Any],
    evidence: dict[str, Any],
    timeout_s: float,
    author: str,
) -> Decision:
    """Another lemon of the run while its retirement waits: the pending decision names it too (one page,
    one answer for all); its expiry moves out so the new host gets the policy's whole timeout."""
    hosts = list((decision.proposal or {}).get("hosts") or ())
    added = [h for h in proposal.get("hosts") or () if h not in hosts]
    if not added:
        return decision  # the same proposal again (a pass interrupted after its commit)
    now = utcnow()
    decision.proposal = {**(decision.proposal or {}), "hosts": hosts + added}  # a new dict: JSON change
    decision.evidence = {
        **(decision.evidence or {}),
        "added": [*(decision.evidence or {}).get("added", []), {"hosts": added, **evidence}],
    }
    decision.reason = f"{decision.reason}; also {', '.join(added)}: {evidence.get('reason') or 'a lemon'}"
    expires_at = (
        decision.expires_at if decision.expires_at.tzinfo else decision.expires_at.replace(tzinfo=dt.UTC)
    )
    decision.expires_at = max(expires_at, now + dt.timedelta(seconds=timeout_s))
    write_log(
        session,
        kind=LogKind.decision,
        author=author,
        run_id=decision.run_id,
        severity=Severity.warning,
        message=f"decision {decision.id} (still pending) now also retires {', '.join(added)}: past the lemon "
        f"limit while the decision waited; it names {', '.join(hosts + added)}, answered by "
        f"{decision.expires_at.isoformat(timespec='seconds')}",
        evidence={"decision": decision.id, "added": added, "hosts": hosts + added, **evidence},
    )
    return decision


def answer_decision(
    session: Session,
    *,
    decision_id: int,
    verdict: DecisionStatus,
    author: str,
    reason: str | None,
    overrides: dict[str, Any] | None,
) -> Decision:
    """An operator approves or rejects a pending decision (their overrides replace the proposal's levers).
    Conflict when it was already answered, timed out or superseded."""
    assert verdict in (DecisionStatus.approved, DecisionStatus.rejected)
    decision = get_decision(session, decision_id=decision_id, for_update=True)
    try:
        check_decision_transition(decision.status, verdict)
    except InvalidTransition:
        by = f" by {decision.decided_by} at {decision.decided_at.isoformat()}" if decision.decided_at else ""
        raise Conflict(f"decision {decision.id} is already {decision.status.value}{by}") from None
    decision.status = verdict
    decision.decided_by = author
    decision.decided_at = utcnow()
    decision.decision_reason = reason
    decision.operator_overrides = overrides or None
    run = session.get(Run, decision.run_id)
    what = "approved" if verdict == DecisionStatus.approved else "rejected"
    then = (
        "the orchestrator carries it out on its next pass"
        if verdict == DecisionStatus.approved
        else "the orchestrator restarts with the operator's levers"
        if overrides
        else "the run holds (needs attention)"
    )
    write_log(
        session,
        kind=LogKind.decision,
        author=author,
        run_id=decision.run_id,
        message=f"decision {decision.id} of run {run.name if run else decision.run_id} {what} by {author}"
        + (f": {reason}" if reason else "")
        + (f" (overrides: {overrides})" if overrides else "")
        + f"; {then}",
        evidence={"decision": decision.id, "verdict": what, "overrides": overrides, "reason": reason},
    )
    return decision


def close_decision(
    session: Session,
    *,
    decision_id: int,
    status_if_pending: DecisionStatus,
    attempt_number: int | None,
    author: str,
    note: str,
) -> Decision | None:
    """The orchestrator carried out the decision's outcome (or an operator's restart or stop came first):
    stamp it consumed; a decision still pending becomes `status_if_pending` (timed_out, superseded). None
    when it was consumed already (a pass that did this was interrupted after its commit)."""
    decision = get_decision(session, decision_id=decision_id, for_update=True)
    if decision.consumed_at is not None:
        return None
    if decision.status == DecisionStatus.pending:
        check_decision_transition(decision.status, status_if_pending)
        decision.status = status_if_pending
        decision.decided_by = author
        decision.decided_at = utcnow()
    decision.consumed_at = utcnow()
    decision.consumed_by_attempt = attempt_number
    write_log(
        session,
        kind=LogKind.action,
        author=author,
        run_id=decision.run_id,
        message=f"decision {decision.id} ({decision.status.value}): {note}",
        evidence={"decision": decision.id, "status": decision.status.value, "attempt": attempt_number},
    )
    return decision


def pending_decision_stats(session: Session, *, now: dt.datetime | None = None) -> tuple[int, float]:
    """How many decisions wait for a human, and the age in seconds of the oldest (0 when none)."""
    count, oldest = session.execute(
        sa.select(sa.func.count(), sa.func.min(Decision.created_at)).where(
            Decision.status == DecisionStatus.pending
        )
    ).one()
    if not count or oldest is None:
        return 0, 0.0
    if oldest.tzinfo is None:
        oldest = oldest.replace(tzinfo=dt.UTC)
    return int(count), max(0.0, ((now or utcnow()) - oldest).total_seconds())


def pending_decisions_by_run(session: Session) -> dict[str, int]:
    """Per run name, how many of its decisions wait for a human (runs with none are left out)."""
    rows = session.execute(
        sa.select(Run.name, sa.func.count(Decision.id))
        .join(Decision, Decision.run_id == Run.id)
        .where(Decision.status == DecisionStatus.pending)
        .group_by(Run.name)
    )
    return {name: int(count) for name, count in rows}
