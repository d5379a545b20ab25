"""Checkpoints as the control plane knows them: registered by the trainer, judged by the orchestrator."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from service.crud.logbook import write_log
from service.errors import BadRequest, Conflict, NotFound, Unprocessable
from service.models import Checkpoint, Run, utcnow
from service.statemachine import CheckpointState, LogKind, Severity, check_checkpoint_transition
from trainer.checkpoint import pin_checkpoint, unpin_checkpoint

AUTO_PIN_AUTHOR = "system:orchestrator"  # `pinned_by` of the orchestrator's pin of the newest healthy one
PENDING = "pending"  # restart_point.Verdict.pending: not judged yet (the crud layer does not import the rule)

# What describes the file itself: a re-save of the step replaces all of it.
FILE_FIELDS = (
    "attempt",
    "step",
    "tokens",
    "size_bytes",
    "checksum",
    "loss_scale",
    "lr",
    "clip",
    "loss",
    "act_norm",
)


class CatalogSource(enum.StrEnum):
    trainer = "trainer"  # the trainer's registration (POST .../checkpoints, or its spool drained)
    disk = "disk"  # the orchestrator found it on disk (marker, manifest and meta.json read from the file)


class UpsertOutcome(enum.StrEnum):
    created = "created"
    unchanged = "unchanged"  # the same file, nothing new
    completed = "completed"  # the same file: missing fields filled in, or writing -> committed
    replaced = "replaced"  # a re-save of the step by a later attempt: the row now describes the new file
    stale = "stale"  # a late registration of a file a later attempt has already replaced: ignored


def checkpoint_path_problem(path: str | Path, *, checkpoint_dir: Path) -> str | None:
    """Why `path` cannot be one of this run's checkpoints, or None: it must be a `step_<N>` directory
    directly inside the run's own checkpoint directory once resolved (a symlink, `..` or another run's
    directory would make a restart load files this run never wrote)."""
    root = Path(checkpoint_dir).resolve()
    try:
        resolved = Path(path).resolve()
    except (OSError, RuntimeError, ValueError) as exc:  # a symlink loop, a NUL byte
        return f"checkpoint path {str(path)!r} cannot be resolved: {exc}"
    name = resolved.name
    if resolved.parent != root or not (name.startswith("step_") and name[5:].isdigit()):
        return f"checkpoint path {str(path)!r} is not a step_<N> directory in this run's {root}"
    return None


def register_checkpoint(
    session: Session, *, run_id: int, data: dict[str, Any], runs_dir: Path
) -> tuple[Checkpoint, bool]:
    """Store a checkpoint the trainer wrote (see `upsert_checkpoint`); returns (row, created). The path must
    lie in the run's own checkpoint directory (`checkpoint_path_problem`): a trainer token is a credential
    a client holds, and a path it names is what a restart of this run loads."""
    problem = checkpoint_path_problem(
        data["path"], checkpoint_dir=run_checkpoint_dir(session, run_id=run_id, runs_dir=runs_dir)
    )
    if problem is not None:
        raise Unprocessable(problem)
    ckpt, outcome = upsert_checkpoint(
        session, run_id=run_id, data=data, source=CatalogSource.trainer, author="trainer"
    )
    return ckpt, outcome == UpsertOutcome.created


def upsert_checkpoint(
    session: Session, *, run_id: int, data: dict[str, Any], source: CatalogSource, author: str
) -> tuple[Checkpoint, UpsertOutcome]:
    """One idempotent upsert for the trainer's registration and the orchestrator's discovery on disk, in
    either order, concurrently (INSERT .. ON CONFLICT DO NOTHING, then the row locked and updated).

    A row describes the file at its path now. The same file (same checksum; without one, same attempt)
    only fills in what the row lacks. A different file at the same path is a re-save of the step after a
    rollback: the row takes the new attempt, checksum, size, loss scale, metadata and state, its verdict
    starts over (pending) and its pin is dropped (the pinned file was replaced), and the logbook records the
    replacement. A registration from an older attempt than the row's is a late arrival (a replayed spool)
    and changes nothing; what is found on disk always wins, it is the file.
    """
    state = CheckpointState(data.get("state", CheckpointState.writing))
    if state not in (CheckpointState.writing, CheckpointState.committed):
        raise BadRequest("a new checkpoint is registered as 'writing' or 'committed'")
    values = {f: data.get(f) for f in FILE_FIELDS}
    new_id = _insert_unless_present(
        session,
        {
            **values,
            "run_id": run_id,
            "path": data["path"],
            "state": state,
            "meta": data.get("metadata") or {},
            "verdict": PENDING,
            "verdict_final": False,
            "pinned": False,
            "created_at": utcnow(),
            "committed_at": utcnow() if state == CheckpointState.committed else None,
        },
    )
    if new_id is not None:
        return get_checkpoint(session, checkpoint_id=new_id), UpsertOutcome.created
    ckpt = session.scalar(
        sa.select(Checkpoint)
        .where(Checkpoint.run_id == run_id, Checkpoint.path == data["path"])
        .with_for_update()
        .execution_options(populate_existing=True)
    )
    assert ckpt is not None  # the insert conflicted with it, and checkpoints are never deleted
    if _same_file(ckpt, values):
        return ckpt, _complete(ckpt, values, data.get("metadata") or {}, state)
    if (
        source == CatalogSource.trainer
        and values["attempt"] is not None
        and ckpt.attempt is not None
        and values["attempt"] < ckpt.attempt
    ):
        return ckpt, UpsertOutcome.stale
    _replace(session, ckpt, values, data.get("metadata") or {}, state, source=source, author=author)
    return ckpt, UpsertOutcome.replaced


def _insert_unless_present(session: Session, row: dict[str, Any]) -> int | None:
    """INSERT .. ON CONFLICT (run_id, path) DO NOTHING RETURNING id: the new row's id, or None if the
    path is catalogued already (a concurrent insert waits for the other's commit, then does nothing)."""
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    elif dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    else:  # trainops's migrations and tests cover the two; refuse anything else plainly
        raise RuntimeError(
            f"the checkpoint catalog supports PostgreSQL and SQLite, not {dialect!r} (TRAINOPS_DATABASE_URL)"
        )
    stmt = (
        insert(Checkpoint)
        .values(**row)
        .on_conflict_do_nothing(index_elements=["run_id", "path"])
        .returning(Checkpoint.id)
    )
    return session.execute(stmt).scalar_one_or_none()


def _same_file(ckpt: Checkpoint, values: dict[str, Any]) -> bool:
    if ckpt.checksum is not None and values["checksum"] is not None:
        return bool(ckpt.checksum == values["checksum"])
    return ckpt.attempt is None or values["attempt"] is None or ckpt.attempt == values["attempt"]


def _complete(
    ckpt: Checkpoint, values: dict[str, Any], meta: dict[str, Any], state: CheckpointState
) -> UpsertOutcome:
    changed = False
    for name, value in values.items():
        if value is not None and getattr(ckpt, name) is None:
            setattr(ckpt, name, value)
            changed = True
    if meta and any(ckpt.meta.get(k) != v for k, v in meta.items()):
        ckpt.meta = {**ckpt.meta, **meta}
        changed = True
    if ckpt.state == CheckpointState.writing and state == CheckpointState.committed:
        _commit(ckpt)
        changed = True
    return UpsertOutcome.completed if changed else UpsertOutcome.unchanged


def _replace(
    session: Session,
    ckpt: Checkpoint,
    values: dict[str, Any],
    meta: dict[str, Any],
    state: CheckpointState,
    *,
    source: CatalogSource,
    author: str,
) -> None:
    before = {
        "attempt": ckpt.attempt,
        "checksum": ckpt.checksum,
        "size_bytes": ckpt.size_bytes,
        "loss_scale": ckpt.loss_scale,
        "state": ckpt.state.value,
        "verdict": ckpt.verdict,
        "pinned": ckpt.pinned,
        "pinned_by": ckpt.pinned_by,
    }
    for name, value in values.items():
        setattr(ckpt, name, value)
    ckpt.meta = dict(meta)
    ckpt.state = state  # a new file: whatever the old one was (corrupt, deleted) no longer applies
    ckpt.committed_at = utcnow() if state == CheckpointState.committed else None
    ckpt.verdict, ckpt.verdict_final, ckpt.verdict_numbers, ckpt.verdict_at = PENDING, False, None, None
    ckpt.healthy, ckpt.healthy_reason = None, None
    ckpt.pinned, ckpt.pinned_by = False, None
    after = {
        "attempt": ckpt.attempt,
        "checksum": ckpt.checksum,
        "size_bytes": ckpt.size_bytes,
        "loss_scale": ckpt.loss_scale,
        "state": ckpt.state.value,
    }
    dropped_pin = f"; the pin ({before['pinned_by']}) went with the old file" if before["pinned"] else ""
    write_log(
        session,
        kind=LogKind.action,
        author=author,
        run_id=ckpt.run_id,
        severity=Severity.warning if before["pinned"] else Severity.info,
        message=f"checkpoint step {ckpt.step} re-saved by attempt {ckpt.attempt} replaces attempt "
        f"{before['attempt']}'s file ({ckpt.path}): checksum {before['checksum']} -> {ckpt.checksum}, "
        f"loss scale {before['loss_scale']} -> {ckpt.loss_scale}, state {before['state']} -> "
        f"{ckpt.state.value}, verdict {before['verdict']} -> pending{dropped_pin}",
        evidence={
            "checkpoint_id": ckpt.id,
            "step": ckpt.step,
            "source": source.value,
            "before": before,
            "after": after,
        },
    )


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


def checkpoint_checksums(session: Session, *, run_id: int) -> dict[str, str | None]:
    """The run's catalogued checkpoints: path -> checksum (how the orchestrator's disk sync tells a file it
    already knows from a re-save)."""
    rows = session.execute(
        sa.select(Checkpoint.path, Checkpoint.checksum).where(Checkpoint.run_id == run_id)
    ).all()
    return {path: checksum for path, checksum in rows}


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
    runs_dir: Path | None = None,
) -> Checkpoint:
    """Change a checkpoint's state, health verdict or pin, and log it.

    A health mark is a final verdict (the orchestrator no longer re-judges it). A pin change reaches disk
    (the PINNED marker the trainer's retention honours), so `runs_dir` is required with `pinned`; the
    checkpoint must lie in its run's checkpoint directory. `pinned_by` records who set the pin state last:
    the orchestrator moves only its own pins, and never re-pins one an operator unpinned."""
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
        ckpt.verdict = "healthy" if healthy else "unhealthy"
        ckpt.verdict_final = True
        ckpt.verdict_numbers = {"marked_by": author}
        ckpt.verdict_at = utcnow()
    if pinned is not None and pinned != ckpt.pinned:
        if runs_dir is None:
            raise ValueError("a pin change needs runs_dir: it reaches the checkpoint's PINNED marker")
        set_pin_marker(session, checkpoint=ckpt, pinned=pinned, runs_dir=runs_dir)
        changes["pinned"] = [ckpt.pinned, pinned]
        ckpt.pinned = pinned
        ckpt.pinned_by = author
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


# States that claim a usable file on disk; the catalog must not keep claiming it once the file is gone.
ON_DISK_STATES = (CheckpointState.committed, CheckpointState.verified, CheckpointState.corrupt)


def mark_vanished_checkpoints(
    session: Session, *, run_id: int, checkpoint_dir: Path, author: str
) -> list[Checkpoint]:
    """Mark `deleted` the run's catalogued checkpoints whose directory is gone from `checkpoint_dir` (the
    trainer's retention deleted them, or an operator did), each with a logbook entry; returns them.

    Only paths inside the run's checkpoint directory are judged, and nothing at all when that directory
    does not exist here (a control plane that does not mount the runs' filesystem cannot tell a deleted
    checkpoint from one it cannot see). A re-save that brings a step back is catalogued again by its
    registration or the disk sync (`upsert_checkpoint` replaces a deleted row)."""
    root = Path(checkpoint_dir).resolve()
    if not root.is_dir():
        return []
    rows = session.scalars(
        sa.select(Checkpoint).where(Checkpoint.run_id == run_id, Checkpoint.state.in_(ON_DISK_STATES))
    )
    gone: list[Checkpoint] = []
    for ckpt in rows:
        path = Path(ckpt.path).resolve()
        if path.parent != root or not path.name.startswith("step_") or path.exists():
            continue
        was = ckpt.state
        check_checkpoint_transition(was, CheckpointState.deleted)
        ckpt.state = CheckpointState.deleted
        was_pinned, ckpt.pinned = ckpt.pinned, False
        gone.append(ckpt)
        write_log(
            session,
            kind=LogKind.diagnosis,
            severity=Severity.warning if was_pinned else Severity.info,
            message=f"checkpoint step {ckpt.step} ({ckpt.path}): {was.value} -> deleted: its directory is "
            "gone from disk" + (" although it was pinned" if was_pinned else " (retention)"),
            author=author,
            run_id=run_id,
            evidence={
                "checkpoint_id": ckpt.id,
                "step": ckpt.step,
                "path": ckpt.path,
                "was": was.value,
                "was_pinned": was_pinned,
                "checkpoint_dir": str(root),
            },
        )
    return gone


def run_checkpoint_dir(session: Session, *, run_id: int, runs_dir: Path) -> Path:
    """Where a run's checkpoints live: <runs_dir>/<run name>/checkpoints (the orchestrator's layout)."""
    name = session.scalar(sa.select(Run.name).where(Run.id == run_id))
    if name is None:
        raise NotFound(f"run {run_id} does not exist")
    return Path(runs_dir).resolve() / name / "checkpoints"


def set_pin_marker(session: Session, *, checkpoint: Checkpoint, pinned: bool, runs_dir: Path) -> None:
    """Write or remove the checkpoint's PINNED marker. Only inside its run's checkpoint directory: the
    catalog's path came from a trainer and is not trusted to name any other place on disk."""
    root = run_checkpoint_dir(session, run_id=checkpoint.run_id, runs_dir=runs_dir)
    path = Path(checkpoint.path).resolve()
    if path.parent != root or not path.name.startswith("step_"):
        raise Conflict(
            f"checkpoint {checkpoint.id} ({checkpoint.path}) is not in its run's checkpoint directory {root}"
        )
    if not pinned:
        unpin_checkpoint(path)
        return
    if not path.is_dir():
        raise Conflict(f"checkpoint {checkpoint.id} is not on disk ({checkpoint.path}): nothing to pin")
    if not pin_checkpoint(path):  # deleted by retention (or replaced by a re-save) in the meantime
        raise Conflict(f"checkpoint {checkpoint.id} was deleted while being pinned ({checkpoint.path})")
