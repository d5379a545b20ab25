"""Runs, their attempts, and the operator's levers (start, stop, restart with overrides)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, status

from service.api.deps import EntityId, Limit, Offset, Operator, RunId, SessionDep, SettingsDep, Viewer
from service.api.launcher_checks import check_launcher
from service.crud import runs as runs_crud
from service.readmodels.goodput import compute_goodput
from service.schemas import (
    AttemptPublic,
    GoodputPublic,
    Page,
    RestartRequest,
    RunCreate,
    RunPublic,
    StopRequest,
)
from service.statemachine import RunPhase

router = APIRouter(prefix="/runs", tags=["runs"])


@router.post("", status_code=status.HTTP_201_CREATED, response_model=RunPublic)
def create_run(body: RunCreate, session: SessionDep, who: Operator, settings: SettingsDep) -> RunPublic:
    config = body.config.model_dump(mode="json")
    runs_crud.ensure_name_free(session, name=body.name)
    check_launcher(config, settings)
    run = runs_crud.create_run(
        session, name=body.name, owner=body.owner, config=config, start=body.start, author=who.author
    )
    return RunPublic.model_validate(run)


@router.get("", response_model=Page[RunPublic])
def list_runs(
    session: SessionDep,
    _: Viewer,
    phase: Annotated[list[RunPhase] | None, Query()] = None,
    owner: str | None = None,
    name: Annotated[str | None, Query(description="Substring of the run name.")] = None,
    limit: Limit = 50,
    offset: Offset = 0,
) -> Page[RunPublic]:
    rows, total = runs_crud.list_runs(
        session, phases=phase or (), owner=owner, name_contains=name, limit=limit, offset=offset
    )
    return Page(items=[RunPublic.model_validate(r) for r in rows], total=total, limit=limit, offset=offset)


@router.get("/{run_id}", response_model=RunPublic)
def get_run(run_id: RunId, session: SessionDep, _: Viewer) -> RunPublic:
    return RunPublic.model_validate(runs_crud.get_run(session, run_id=run_id))


@router.post("/{run_id}/start", response_model=RunPublic)
def start_run(run_id: RunId, session: SessionDep, who: Operator) -> RunPublic:
    return RunPublic.model_validate(runs_crud.start_run(session, run_id=run_id, author=who.author))


@router.post("/{run_id}/stop", response_model=RunPublic)
def stop_run(run_id: RunId, session: SessionDep, who: Operator, body: StopRequest | None = None) -> RunPublic:
    reason = body.reason if body else "stopped by operator"
    return RunPublic.model_validate(
        runs_crud.stop_run(session, run_id=run_id, reason=reason, author=who.author)
    )


@router.post("/{run_id}/restart", response_model=RunPublic)
def restart_run(
    run_id: RunId, body: RestartRequest, session: SessionDep, who: Operator, settings: SettingsDep
) -> RunPublic:
    run = runs_crud.restartable_run(session, run_id=run_id)
    check_launcher(dict(run.config or {}), settings)
    run = runs_crud.request_restart(session, run_id=run_id, author=who.author, **body.model_dump())
    return RunPublic.model_validate(run)


@router.get("/{run_id}/goodput", response_model=GoodputPublic)
def run_goodput(run_id: RunId, session: SessionDep, _: Viewer) -> GoodputPublic:
    return GoodputPublic.model_validate(compute_goodput(session, run_id=run_id).as_dict())


@router.get("/{run_id}/attempts", response_model=Page[AttemptPublic])
def list_attempts(
    run_id: RunId, session: SessionDep, _: Viewer, limit: Limit = 100, offset: Offset = 0
) -> Page[AttemptPublic]:
    """The run's attempts, oldest first, a page at a time (a run restarted for months has thousands)."""
    rows, total = runs_crud.page_attempts(session, run_id=run_id, limit=limit, offset=offset)
    return Page(
        items=[AttemptPublic.model_validate(a) for a in rows], total=total, limit=limit, offset=offset
    )


@router.get("/{run_id}/attempts/{number}", response_model=AttemptPublic)
def get_attempt(run_id: RunId, number: EntityId, session: SessionDep, _: Viewer) -> AttemptPublic:
    return AttemptPublic.model_validate(runs_crud.get_attempt(session, run_id=run_id, number=number))
