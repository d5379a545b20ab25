"""Diagnostics results as stored by the control plane."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from service.models import Diagnostic, Node
from service.statemachine import DiagnosticStatus


def record_diagnostic(
    session: Session,
    *,
    node_id: int,
    kind: str,
    level: str,
    status: DiagnosticStatus,
    reason: str | None = None,
    measurements: dict[str, Any] | None = None,
    started_at: dt.datetime | None = None,
    finished_at: dt.datetime | None = None,
    sweep_id: str | None = None,
) -> Diagnostic:
    diag = Diagnostic(
        node_id=node_id,
        kind=kind,
        level=level,
        status=status,
        reason=reason,
        measurements=measurements or {},
        sweep_id=sweep_id,
        finished_at=finished_at,
    )
    if started_at is not None:
        diag.started_at = started_at
    session.add(diag)
    session.flush()
    return diag


def list_diagnostics(
    session: Session,
    *,
    hostname: str | None = None,
    kind: str | None = None,
    statuses: Sequence[DiagnosticStatus] = (),
    sweep_id: str | None = None,
    limit: int = 100,
    offset: int = 0,
) -> tuple[list[tuple[Diagnostic, str]], int]:
    query = sa.select(Diagnostic, Node.hostname).join(Node, Node.id == Diagnostic.node_id)
    if hostname is not None:
        query = query.where(Node.hostname == hostname)
    if kind is not None:
        query = query.where(Diagnostic.kind == kind)
    if statuses:
        query = query.where(Diagnostic.status.in_(list(statuses)))
    if sweep_id is not None:
        query = query.where(Diagnostic.sweep_id == sweep_id)
    total = session.scalar(sa.select(sa.func.count()).select_from(query.subquery())) or 0
    rows = session.execute(query.order_by(Diagnostic.id.desc()).limit(limit).offset(offset)).all()
    return [(d, h) for d, h in rows], total
