"""Diagnostics results recorded by the health layer."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from service.api.deps import Limit, Offset, SessionDep, Viewer
from service.crud import diagnostics as diag_crud
from service.schemas import DiagnosticPublic, Page
from service.statemachine import DiagnosticStatus

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
