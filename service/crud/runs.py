"""Runs and their attempts: creation, desired state, phase changes and operator overrides."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from service.crud.logbook import write_log
from service.errors import Conflict, NotFound
from service.models import Attempt, Checkpoint, Decision, Run, utcnow
from service.statemachine import (
    ACTIVE_PHASES,
    TERMINAL_PHASES,
    CheckpointState,
    DesiredState,
    LogKind,
    RunPhase,
    Severity,
    check_run_transition,
)


def get_run(session: Session, *, run_id: int, for_update: bool = False) -> Run:
    """The run; with `for_update`, locked until the transaction ends, so a read-modify-write of it (a
    restart request, its consumption) cannot interleave with another one.

    The lock is PostgreSQL's ``FOR NO KEY UPDATE`` (no run's id ever changes and runs are never deleted):
    it excludes every other read-modify-write of the run but not the ``FOR KEY SHARE`` that each metric or
    heartbeat batch holds while it is written (`telemetry.lock_run_for_ingest`). With ``FOR UPDATE`` the
    orchestrator's every change of a run queued behind the batches in flight, and at 1,024 hosts there are
    always some."""
    query = sa.select(Run).where(Run.id == run_id)
    if for_update:
        query = query.with_for_update(key_share=True).execution_options(populate_existing=True)
        if session.get_bind().dialect.name == "sqlite":
            # SQLite ignores FOR UPDATE, and pysqlite begins a transaction only at the first write: a
            # no-op write takes the database's write lock first, so what is read next is current and
            # stays so until commit (concurrent writers wait on the busy timeout).
            session.execute(sa.update(Run).where(Run.id == run_id).values(id=Run.id))
    run = session.scalar(query)
    if run is None:
        raise NotFound(f"run {run_id} does not exist")
    return run


def ensure_name_free(session: Session, *, name: str) -> None:
    if session.scalar(sa.select(Run.id).where(Run.name == name)) is not None:
        raise Conflict(f"a run named {name!r} already exists")


def create_run(
    session: Session,
    *,
    name: str,
    owner: str,
    config: dict[str, Any],
    start: bool,
    author: str,
) -> Run:
    """The API checks the run's launcher against this control plane (service/api/launcher_checks.py) after
    `ensure_name_free` and before this."""
    ensure_name_free(session, name=name)
    run = Run(
        name=name,
        owner=owner,
        config=config,
        phase=RunPhase.pending,
        desired_state=DesiredState.running if start else DesiredState.stopped,
    )
    session.add(run)
    session.flush()
    write_log(
        session,
        kind=LogKind.action,
        message=f"run {name} created" + (" and asked to start" if start else ""),
        author=author,
        run_id=run.id,
        evidence={"config": config},
    )
    return run


def list_runs(
    session: Session,
    *,
    phases: Sequence[RunPhase] = (),
    owner: str | None = None,
    name_contains: str | None = None,
    limit: int = 50,
    offset: int = 0,
) -> tuple[list[Run], int]:
    query = sa.select(Run)
    if phases:
        query = query.where(Run.phase.in_(list(phases)))
    if owner is not None:
        query = query.where(Run.owner == owner)
    if name_contains:
        query = query.where(Run.name.contains(name_contains, autoescape=True))
    total = session.scalar(sa.select(sa.func.count()).select_from(query.subquery())) or 0
    rows = session.scalars(query.order_by(Run.id.desc()).limit(limit).offset(offset)).all()
    return list(rows), total


def set_run_phase(
    session: Session,
    *,
    run: Run,
    target: RunPhase,
    reason: str,
    author: str,
    evidence: dict[str, Any] | None = None,
    severity: Severity = Severity.info,
    kind: LogKind = LogKind.decision,
) -> Run:
    """Move a run along its state machine and log why; same-phase is a no-op (idempotent apply)."""
    if run.phase == target:
        return run
    check_run_transition(run.phase, target)
    previous = run.phase
    run.phase = target
    run.phase_reason = reason
    now = utcnow()
    if target == RunPhase.starting and run.started_at is None:
        run.started_at = now
    if target in (RunPhase.completed, RunPhase.failed, RunPhase.stopped):
        run.finished_at = now
    elif run.finished_at is not None:
        run.finished_at = None
    write_log(
        session,
        kind=kind,
        severity=severity,
        message=f"run {run.name}: {previous.value} -> {target.value}: {reason}",
        author=author,
        run_id=run.id,
        evidence={"from": previous.value, "to": target.value, **(evidence or {})},
    )
    session.flush()
    return run


def start_run(session: Session, *, run_id: int, author: str) -> Run:
    """Ask a run to run. A stopped or pending run is resumed by the orchestrator from its newest intact
    checkpoint with its standing overrides. A run the orchestrator gave up on (needs_attention) or that
    failed is restarted as if by `request_restart` without overrides: the operator has looked, so no
    restart budget applies."""
    run = get_run(session, run_id=run_id, for_update=True)
    if run.phase == RunPhase.completed:
        raise Conflict(f"run {run.name} has completed; create a new run to train further")
    if (
        run.phase in (RunPhase.needs_attention, RunPhase.failed)
        and run.pending_restart is None
        and active_attempt(session, run_id=run.id) is None
    ):
        return request_restart(
            session, run_id=run_id, author=author, reason=f"started by {author} from {run.phase.value}"
        )
    if run.desired_state != DesiredState.running:
        run.desired_state = DesiredState.running
        write_log(
            session,
            kind=LogKind.action,
            message=f"run {run.name} asked to start",
            author=author,
            run_id=run.id,
            evidence={"phase": run.phase.value},
        )
    return run


def stop_run(session: Session, *, run_id: int, reason: str, author: str) -> Run:
    run = get_run(session, run_id=run_id, for_update=True)
    if run.phase == RunPhase.completed:
        raise Conflict(f"run {run.name} has completed; there is nothing to stop")
    if run.desired_state != DesiredState.stopped:
        run.desired_state = DesiredState.stopped
        run.pending_restart = None
        write_log(
            session,
            kind=LogKind.action,
            message=f"run {run.name} asked to stop: {reason}",
            author=author,
            run_id=run.id,
            evidence={"phase": run.phase.value},
        )
    # Nothing runs in these phases, so the stop is complete now; active runs are stopped by the orchestrator.
    if (
        run.phase in (RunPhase.pending, RunPhase.needs_attention, RunPhase.failed)
        and active_attempt(session, run_id=run.id) is None
    ):
        set_run_phase(
            session, run=run, target=RunPhase.stopped, reason=reason, author=author, kind=LogKind.action
        )
    return run


def restartable_run(session: Session, *, run_id: int) -> Run:
    """The run, locked, if it can be restarted (it has not completed)."""
    run = get_run(session, run_id=run_id, for_update=True)
    if run.phase == RunPhase.completed:
        raise Conflict(f"run {run.name} has completed and cannot be restarted")
    return run


def request_restart(
    session: Session,
    *,
    run_id: int,
    author: str,
    reason: str,
    from_checkpoint_id: int | None = None,
    lr: float | None = None,
    lr_scale: float | None = None,
    clip: float | None = None,
    reset_loss_scale: bool = False,
    skip_batches: int = 0,
) -> Run:
    """An operator's restart with overrides. LR and clip persist for later attempts; the rest is one-shot.
    The API checks the run's launcher again between `restartable_run` and this (a partition may have gone
    since)."""
    run = restartable_run(session, run_id=run_id)
    if run.pending_restart:
        # One request at a time, each consumed exactly once by the orchestrator (by its id): a second one
        # would either be dropped unseen or silently replace the first's overrides.
        pending = run.pending_restart
        raise Conflict(
            f"a restart of run {run.name} requested by {pending.get('author')} at "
            f"{pending.get('requested_at')} is still pending; the orchestrator applies it on its next "
            "pass. Retry once the run's pending_restart is empty"
        )
    if from_checkpoint_id is not None:
        ckpt = session.get(Checkpoint, from_checkpoint_id)
        if ckpt is None or ckpt.run_id != run.id:
            raise NotFound(f"checkpoint {from_checkpoint_id} does not belong to run {run.id}")
        if ckpt.state not in (CheckpointState.committed, CheckpointState.verified):
            raise Conflict(
                f"checkpoint {from_checkpoint_id} is {ckpt.state.value}; only committed or "
                "verified checkpoints can be restored"
            )
    before = {"lr_scale": run.lr_scale, "lr": run.lr_override, "clip": run.clip_override}
    if lr_scale is not None:
        run.lr_scale = lr_scale
    if lr is not None:
        run.lr_override = lr
    if clip is not None:
        run.clip_override = clip
    run.pending_restart = {
        "id": uuid.uuid4().hex,
        "requested_at": utcnow().isoformat(),
        "author": author,
        "reason": reason,
        "from_checkpoint_id": from_checkpoint_id,
        "reset_loss_scale": reset_loss_scale,
        "skip_batches": skip_batches,
    }
    run.desired_state = DesiredState.running
    write_log(
        session,
        kind=LogKind.action,
        message=f"restart of run {run.name} requested: {reason}",
        author=author,
        run_id=run.id,
        evidence={
            "before": before,
            "after": {"lr_scale": run.lr_scale, "lr": run.lr_override, "clip": run.clip_override},
            "pending_restart": run.pending_restart,
        },
    )
    return run


def consume_restart_request(
    session: Session, *, run: Run, request: Mapping[str, Any] | None, author: str
) -> bool:
    """The orchestrator has carried out `request` (the restart request it observed): clear it, but only if
    it is still the pending one (compare-and-set on its id, the run locked by the caller). A request that
    replaced it meanwhile (after a stop cleared the first) stays pending for the next pass, and the
    logbook says so. Returns whether `request` was the pending one."""
    pending = run.pending_restart
    if request is None or not pending:
        return False
    if pending.get("id") == request.get("id"):
        run.pending_restart = None
        return True
    write_log(
        session,
        kind=LogKind.decision,
        message=f"run {run.name}: a newer restart request arrived while the orchestrator acted on an "
        "earlier one; it stays pending and is carried out on the next pass",
        author=author,
        run_id=run.id,
        evidence={"acted_on": dict(request), "pending": dict(pending)},
    )
    return False


# ---- attempts -------------------------------------------------------------------------------------


def list_attempts(session: Session, *, run_id: int) -> list[Attempt]:
    get_run(session, run_id=run_id)
    return list(session.scalars(sa.select(Attempt).where(Attempt.run_id == run_id).order_by(Attempt.number)))


def page_attempts(session: Session, *, run_id: int, limit: int, offset: int) -> tuple[list[Attempt], int]:
    """One page of the run's attempts, oldest first, and how many it has in all (the API's list)."""
    get_run(session, run_id=run_id)
    total = session.scalar(sa.select(sa.func.count()).where(Attempt.run_id == run_id)) or 0
    rows = session.scalars(
        sa.select(Attempt)
        .where(Attempt.run_id == run_id)
        .order_by(Attempt.number)
        .limit(limit)
        .offset(offset)
    )
    return list(rows), total


def get_attempt(session: Session, *, run_id: int, number: int) -> Attempt:
    attempt = session.scalar(sa.select(Attempt).where(Attempt.run_id == run_id, Attempt.number == number))
    if attempt is None:
        raise NotFound(f"run {run_id} has no attempt {number}")
    return attempt


def active_attempt(session: Session, *, run_id: int) -> Attempt | None:
    return session.scalar(
        sa.select(Attempt)
        .where(Attempt.run_id == run_id, Attempt.ended_at.is_(None))
        .order_by(Attempt.number.desc())
    )


def find_attempt(session: Session, *, run_id: int, number: int) -> Attempt | None:
    return session.scalar(sa.select(Attempt).where(Attempt.run_id == run_id, Attempt.number == number))


def next_attempt_number(session: Session, *, run_id: int) -> int:
    return (session.scalar(sa.select(sa.func.max(Attempt.number)).where(Attempt.run_id == run_id)) or 0) + 1


def busy_hosts_by_run(session: Session) -> dict[int, frozenset[str]]:
    """The hosts of each run's attempt in progress."""
    rows = session.execute(sa.select(Attempt.run_id, Attempt.hosts).where(Attempt.ended_at.is_(None)))
    return {run_id: frozenset(hosts) for run_id, hosts in rows}


def runs_to_reconcile(session: Session) -> list[int]:
    """The runs the orchestrator acts on: those with an attempt in progress, those meant to run and not
    completed, those meant to stop that have not settled yet, and those with a decision not yet carried
    out (a lemon's retirement waits for its answer or timeout however the run ended meanwhile). Those with
    an attempt in progress come first, then those restarting after a failure, then the rest (each by id): a
    pass observes the running attempts, and relaunches the failed ones, before it starts new runs."""
    active = sa.select(Attempt.run_id).where(Attempt.ended_at.is_(None))
    # every decision leaves `pending` and is stamped consumed in one step (crud.decisions.close_decision)
    undecided = sa.select(Decision.run_id).where(Decision.consumed_at.is_(None))
    query = sa.select(Run.id).where(
        sa.or_(
            Run.id.in_(active),
            Run.id.in_(undecided),
            sa.and_(Run.desired_state == DesiredState.running, Run.phase != RunPhase.completed),
            sa.and_(Run.desired_state == DesiredState.stopped, Run.phase.not_in(list(TERMINAL_PHASES))),
        )
    )
    running_first = sa.case((Run.id.in_(active), 0), (Run.phase == RunPhase.restarting, 1), else_=2)
    return list(session.scalars(query.order_by(running_first, Run.id)))


def record_attempt_allocation(
    session: Session, *, attempt: Attempt, allocated: Sequence[str], author: str
) -> None:
    """The scheduler placed the attempt itself (Slurm `placement: exclude`): its hosts become the
    allocation, so busy hosts, hang blame and the next attempt's locality follow where it really runs."""
    write_log(
        session,
        kind=LogKind.action,
        author=author,
        run_id=attempt.run_id,
        message=f"attempt {attempt.number}: the scheduler placed it on {', '.join(allocated)} "
        f"(the orchestrator had picked {', '.join(attempt.hosts)})",
        evidence={"allocated": list(allocated), "picked": list(attempt.hosts)},
    )
    attempt.hosts = list(allocated)


def create_attempt(
    session: Session,
    *,
    run: Run,
    hosts: Sequence[str],
    restored_from_checkpoint_id: int | None,
    overrides: dict[str, Any],
    launcher: dict[str, Any],
    start_step: int,
    author: str,
) -> Attempt:
    if active_attempt(session, run_id=run.id) is not None:
        raise Conflict(f"run {run.name} already has an attempt in progress")
    if run.phase not in ACTIVE_PHASES and run.phase not in (
        RunPhase.pending,
        RunPhase.stopped,
        RunPhase.failed,
        RunPhase.needs_attention,
    ):
        raise Conflict(f"run {run.name} is {run.phase.value}; no attempt can start")
    number = next_attempt_number(session, run_id=run.id)
    attempt = Attempt(
        run_id=run.id,
        number=number,
        hosts=list(hosts),
        restored_from_checkpoint_id=restored_from_checkpoint_id,
        overrides=overrides,
        launcher=launcher,
        start_step=start_step,
    )
    session.add(attempt)
    session.flush()
    write_log(
        session,
        kind=LogKind.action,
        message=f"run {run.name}: attempt {number} launched on {', '.join(hosts) or 'no hosts'}"
        + (f" from step {start_step}" if start_step else ""),
        author=author,
        run_id=run.id,
        evidence={
            "attempt": number,
            "hosts": list(hosts),
            "overrides": overrides,
            "restored_from_checkpoint_id": restored_from_checkpoint_id,
            "launcher": launcher,
        },
    )
    return attempt


def end_attempt(
    session: Session,
    *,
    attempt: Attempt,
    exit_reason: str,
    exit_code: int | None,
    last_step: int | None,
    steps_lost: int | None,
    author: str,
    evidence: dict[str, Any] | None = None,
) -> Attempt:
    if attempt.ended_at is not None:
        return attempt
    attempt.ended_at = utcnow()
    attempt.exit_reason = exit_reason
    attempt.exit_code = exit_code
    attempt.last_step = last_step
    attempt.steps_lost = steps_lost
    severity = Severity.info if exit_reason in ("completed", "stopped") else Severity.error
    write_log(
        session,
        kind=LogKind.failure if severity == Severity.error else LogKind.action,
        severity=severity,
        message=f"attempt {attempt.number} ended: {exit_reason}"
        + (f" (exit code {exit_code})" if exit_code is not None else ""),
        author=author,
        run_id=attempt.run_id,
        evidence={
            "attempt": attempt.number,
            "exit_reason": exit_reason,
            "exit_code": exit_code,
            "last_step": last_step,
            "steps_lost": steps_lost,
            **(evidence or {}),
        },
    )
    session.flush()
    return attempt
