"""Draining an ended attempt's spool: what its reporter could not deliver (the control plane down when it
exited), stored by the orchestrator in the trainer's place.

The spool's format is the reporter's (`trainer.contract`: `Spool`, `parse_spool_record`); each record is
validated as the API would validate it, and stored through the same idempotent crud functions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from service.crud.checkpoints import checkpoint_path_problem, register_checkpoint
from service.crud.logbook import write_log
from service.crud.telemetry import ingest_metrics
from service.db import transaction
from service.schemas import METRIC_POINT, CheckpointCreate
from service.statemachine import LogKind, Severity
from trainer.contract import (
    SPOOL_PENDING_FILE,
    Spool,
    SpooledCheckpoint,
    SpooledMetricPoint,
    checkpoints_dir,
    parse_spool_record,
    spool_dir,
)


def drain_spool(session_factory: sessionmaker[Session], *, run_id: int, run_dir: Path, author: str) -> None:
    """Store what the ended attempt's reporter spooled, then drop it from the spool.

    Its processes are gone, so nothing else touches the spool now; ingestion is idempotent, so records
    that did arrive before are harmless duplicates. A record that cannot be read is counted and skipped:
    one bad line must never block ending the attempt."""
    run_spool_dir = spool_dir(run_dir)
    if not (run_spool_dir / SPOOL_PENDING_FILE).exists():
        return
    spool = Spool(run_spool_dir)
    records = spool.read()
    if not records:
        return
    points_by_attempt: dict[int, list[dict[str, Any]]] = {}
    checkpoint_bodies: list[dict[str, Any]] = []
    unreadable = 0
    for record in records:
        try:
            spooled = parse_spool_record(record)
            if isinstance(spooled, SpooledMetricPoint):
                point = dict(METRIC_POINT.validate_python(spooled.point))
                points_by_attempt.setdefault(spooled.attempt, []).append(point)
            elif isinstance(spooled, SpooledCheckpoint):
                checkpoint_bodies.append(CheckpointCreate.model_validate(spooled.body).model_dump())
        except (KeyError, TypeError, ValueError):
            unreadable += 1
    with transaction(session_factory) as session:
        for attempt_number, points in points_by_attempt.items():
            ingest_metrics(session, run_id=run_id, attempt=attempt_number, points=points)
        refused: list[str] = []
        for body in checkpoint_bodies:
            problem = checkpoint_path_problem(body["path"], checkpoint_dir=checkpoints_dir(run_dir))
            if problem is not None:  # the spool is a file a client can write: the same rule as the API's
                refused.append(problem)
                continue
            register_checkpoint(session, run_id=run_id, data=body, runs_dir=run_dir.parent)
        write_log(
            session,
            kind=LogKind.action,
            author=author,
            run_id=run_id,
            severity=Severity.warning if unreadable or refused else Severity.info,
            message=f"stored {sum(map(len, points_by_attempt.values()))} metric point(s) and "
            f"{len(checkpoint_bodies) - len(refused)} checkpoint(s) the trainer had spooled while the "
            "control plane was unreachable"
            + (f"; {unreadable} unreadable record(s) skipped" if unreadable else "")
            + (f"; {len(refused)} checkpoint(s) outside the run's directory refused" if refused else ""),
            evidence={
                "records": len(records),
                "unreadable": unreadable,
                "refused": refused,
                "spool": str(spool.path),
            },
        )
    spool.drop_first(len(records))
