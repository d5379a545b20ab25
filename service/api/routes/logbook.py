"""The logbook: read it with filters; humans post notes."""

from __future__ import annotations

import datetime as dt
from typing import Annotated

from fastapi import APIRouter, Query, status

from service.api.deps import MAX_ID, Limit, Offset, Operator, SessionDep, Viewer
from service.api.responses import NAMED_IN_REQUEST_NOT_FOUND
from service.crud import logbook as log_crud
from service.crud import nodes as nodes_crud
from service.crud import runs as runs_crud
from service.schemas import LogEntryPublic, NoteCreate, Page
from service.statemachine import LogKind, Severity

router = APIRouter(prefix="/logbook", tags=["logbook"])


@router.get("", response_model=Page[LogEntryPublic], responses=NAMED_IN_REQUEST_NOT_FOUND)
def list_logbook(
    session: SessionDep,
    _: Viewer,
    run_id: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None,
    host: str | None = None,
    kind: Annotated[list[LogKind] | None, Query()] = None,
    min_severity: Severity | None = None,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
    newest_first: bool = False,
    limit: Limit = 100,
    offset: Offset = 0,
) -> Page[LogEntryPublic]:
    node_id = nodes_crud.get_node(session, hostname=host).id if host else None
    rows, total = log_crud.list_logbook(
        session,
        run_id=run_id,
        node_id=node_id,
        kinds=kind or (),
        min_severity=min_severity,
        since=since,
        until=until,
        limit=limit,
        offset=offset,
        newest_first=newest_first,
    )
    return Page(
        items=[LogEntryPublic.model_validate(e) for e in rows], total=total, limit=limit, offset=offset
    )


@router.post(
    "",
    response_model=LogEntryPublic,
    status_code=status.HTTP_201_CREATED,
    responses=NAMED_IN_REQUEST_NOT_FOUND,
)
def post_note(body: NoteCreate, session: SessionDep, who: Operator) -> LogEntryPublic:
    if body.run_id is not None:
        runs_crud.get_run(session, run_id=body.run_id)
    node_id = nodes_crud.get_node(session, hostname=body.hostname).id if body.hostname else None
    entry = log_crud.write_log(
        session,
        kind=LogKind.note,
        message=body.message,
        author=who.author,
        severity=body.severity,
        run_id=body.run_id,
        node_id=node_id,
        evidence=body.evidence,
    )
    return LogEntryPublic.model_validate(entry)
