"""Diagnostics results recorded by the health layer."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response, status

from service.api.deps import Limit, Offset, Operator, SessionDep, SettingsDep, Viewer
from service.api.responses import NAMED_IN_REQUEST_NOT_FOUND
from service.crud import diagnostics as diag_crud
from service.fleet.diagnostics import SweepRequest, SweepResult, diagnose, health_app_for
from service.schemas import DiagnosticPublic, Page
from service.statemachine import DiagnosticStatus

# A sweep not waited for (or not finished by its deadline) answers 202 with the same body: its task id.
SWEEP_STARTED: dict[int | str, dict[str, Any]] = {
    202: {"model": SweepResult, "description": "Started, not finished: poll with the task id."}
}
SWEEP_RESPONSES = {**SWEEP_STARTED, **NAMED_IN_REQUEST_NOT_FOUND}  # a host that is not registered

router = APIRouter(prefix="/diagnostics", tags=["diagnostics"])


@router.get("", response_model=Page[DiagnosticPublic])
def list_diagnostics(
    session: SessionDep,
    _: Viewer,
    host: str | None = None,
    kind: str | None = None,
    status: Annotated[list[DiagnosticStatus] | None, Query()] = None,
    sweep_id: str | None = None,
    limit: Limit = 100,
    offset: Offset = 0,
) -> Page[DiagnosticPublic]:
    rows, total = diag_crud.list_diagnostics(
        session,
        hostname=host,
        kind=kind,
        statuses=status or (),
        sweep_id=sweep_id,
        limit=limit,
        offset=offset,
    )
    items = [
        DiagnosticPublic.model_validate(
            {**{c: getattr(d, c) for c in DiagnosticPublic.model_fields if c != "hostname"}, "hostname": h}
        )
        for d, h in rows
    ]
    return Page(items=items, total=total, limit=limit, offset=offset)


@router.post("/sweep", response_model=SweepResult, responses=SWEEP_RESPONSES)
def sweep(
    body: SweepRequest, request: Request, settings: SettingsDep, who: Operator, response: Response
) -> SweepResult:
    """Sweep the given hosts (default: all registered) at a level; 202 with a task id unless ``wait``."""
    result = diagnose(
        request.app.state.session_factory,
        health_app_for(request.app.state, settings),
        hosts=body.hosts,
        level=body.level,
        checks=body.checks,
        wait=body.wait,
        deadline_s=body.deadline_s,
        author=who.author,
    )
    if not result.finished:
        response.status_code = status.HTTP_202_ACCEPTED
    return result
