"""The logbook: every automatic action and every human note, with its evidence."""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from service.models import LogEntry
from service.statemachine import LogKind, Severity


def jsonable(value: Any) -> Any:
    """Evidence as strict JSON: PostgreSQL's json type has no NaN or Infinity, so those become strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


def write_log(
    session: Session,
    *,
    kind: LogKind,
    message: str,
    author: str,
    severity: Severity = Severity.info,
    run_id: int | None = None,
    node_id: int | None = None,
    evidence: dict[str, Any] | None = None,
) -> LogEntry:
    entry = LogEntry(
        kind=kind,
        message=message,
        author=author,
        severity=severity,
        run_id=run_id,
        node_id=node_id,
        evidence=jsonable(evidence or {}),
    )
    session.add(entry)
    session.flush()
    return entry


def list_logbook(
    session: Session,
    *,
    run_id: int | None = None,
    node_id: int | None = None,
    kinds: Sequence[LogKind] = (),
    min_severity: Severity | None = None,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
    limit: int = 100,
    offset: int = 0,
    newest_first: bool = False,
) -> tuple[list[LogEntry], int]:
    query = sa.select(LogEntry)
    if run_id is not None:
        query = query.where(LogEntry.run_id == run_id)
    if node_id is not None:
        query = query.where(LogEntry.node_id == node_id)
    if kinds:
        query = query.where(LogEntry.kind.in_(list(kinds)))
    if min_severity is not None:
        order = list(Severity)
        query = query.where(LogEntry.severity.in_(order[order.index(min_severity) :]))
    if since is not None:
        query = query.where(LogEntry.time >= since)
    if until is not None:
        query = query.where(LogEntry.time < until)
    total = session.scalar(sa.select(sa.func.count()).select_from(query.subquery())) or 0
    ordering = (LogEntry.id.desc(),) if newest_first else (LogEntry.id.asc(),)
    rows = session.scalars(query.order_by(*ordering).limit(limit).offset(offset)).all()
    return list(rows), total
