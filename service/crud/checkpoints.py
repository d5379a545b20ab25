"""Checkpoints as the control plane knows them: registered by the trainer, judged by the orchestrator."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from service.crud.logbook import write_log
from service.errors import BadRequest, NotFound
from service.models import Checkpoint, utcnow
from service.statemachine import CheckpointState, LogKind, Severity, check_checkpoint_transition


def register_checkpoint(session: Session, *, run_id: int, data: dict[str, Any]) -> tuple[Checkpoint, bool]:
    """Store a checkpoint the trainer wrote; re-registering the same path returns the stored row."""
    existing = session.scalar(
        sa.select(Checkpoint).where(Checkpoint.run_id == run_id, Checkpoint.path == data["path"])
    )
    if existing is not None:
        if existing.state == CheckpointState.writing and data.get("state") == CheckpointState.committed:
            _commit(existing)
        return existing, False
    state = CheckpointState(data.get("state", CheckpointState.writing))
    if state not in (CheckpointState.writing, CheckpointState.committed):
        raise BadRequest("a new checkpoint is registered as 'writing' or 'committed'")
    ckpt = Checkpoint(
        run_id=run_id,
        attempt=data.get("attempt"),
        step=data["step"],
        tokens=data.get("tokens"),
        path=data["path"],
        size_bytes=data.get("size_bytes"),
        checksum=data.get("checksum"),
        state=state,
        loss_scale=data.get("loss_scale"),
        lr=data.get("lr"),
        clip=data.get("clip"),
        loss=data.get("loss"),
        act_norm=data.get("act_norm"),
        meta=data.get("metadata") or {},
        committed_at=utcnow() if state == CheckpointState.committed else None,
    )
    session.add(ckpt)
    session.flush()
    return ckpt, True


def _commit(ckpt: Checkpoint) -> None:
    check_checkpoint_transition(ckpt.state, CheckpointState.committed)
    ckpt.state = CheckpointState.committed
    ckpt.committed_at = utcnow()


def get_checkpoint(session: Session, *, checkpoint_id: int, run_id: int | None = None) -> Checkpoint:
    ckpt = session.get(Checkpoint, checkpoint_id)
    if ckpt is None or (run_id is not None and ckpt.run_id != run_id):
        raise NotFound(f"checkpoint {checkpoint_id} does not exist" + (f" in run {run_id}" if run_id else ""))
    return ckpt


def commit_checkpoint(session: Session, *, checkpoint_id: int, run_id: int | None = None) -> Checkpoint:
    ckpt = get_checkpoint(session, checkpoint_id=checkpoint_id, run_id=run_id)
    if ckpt.state != CheckpointState.committed:
        _commit(ckpt)
    return ckpt


def list_checkpoints(
    session: Session,
    *,
    run_id: int,
    states: Sequence[CheckpointState] = (),
    limit: int = 100,
    offset: int = 0,
) -> tuple[list[Checkpoint], int]:
    query = sa.select(Checkpoint).where(Checkpoint.run_id == run_id)
    if states:
        query = query.where(Checkpoint.state.in_(list(states)))
    total = session.scalar(sa.select(sa.func.count()).select_from(query.subquery())) or 0
    rows = session.scalars(
        query.order_by(Checkpoint.step.desc(), Checkpoint.id.desc()).limit(limit).offset(offset)
    )
    return list(rows), total


def mark_checkpoint(
    session: Session,
    *,
    checkpoint_id: int,
    author: str,
    reason: str,
    state: CheckpointState | None = None,
    healthy: bool | None = None,
    pinned: bool | None = None,
    evidence: dict[str, Any] | None = None,
) -> Checkpoint:
    """Change a checkpoint's state, health verdict or pin, and log it."""
    ckpt = get_checkpoint(session, checkpoint_id=checkpoint_id)
    changes: dict[str, Any] = {}
    if state is not None and state != ckpt.state:
        check_checkpoint_transition(ckpt.state, state)
        changes["state"] = [ckpt.state.value, state.value]
        ckpt.state = state
    if healthy is not None and healthy != ckpt.healthy:
        changes["healthy"] = [ckpt.healthy, healthy]
        ckpt.healthy = healthy
        ckpt.healthy_reason = reason
    if pinned is not None and pinned != ckpt.pinned:
        changes["pinned"] = [ckpt.pinned, pinned]
        ckpt.pinned = pinned
    if changes:
        bad = ckpt.state == CheckpointState.corrupt or ckpt.healthy is False
        write_log(
            session,
            kind=LogKind.decision if author.startswith("system") else LogKind.action,
            severity=Severity.warning if bad else Severity.info,
            message=f"checkpoint step {ckpt.step} ({ckpt.path}): "
            + ", ".join(f"{k} {v[0]} -> {v[1]}" for k, v in changes.items())
            + f": {reason}",
            author=author,
            run_id=ckpt.run_id,
            evidence={"checkpoint_id": ckpt.id, "step": ckpt.step, "changes": changes, **(evidence or {})},
        )
    return ckpt
