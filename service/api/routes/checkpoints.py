"""Checkpoints: registered and committed by the trainer, judged and pinned by operators and orchestrator."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Response, status

from service.api.deps import (
    EntityId,
    Ingestor,
    Limit,
    Offset,
    Operator,
    RunId,
    SessionDep,
    SettingsDep,
    Viewer,
)
from service.crud import checkpoints as ckpt_crud
from service.crud import runs as runs_crud
from service.recovery.config import OrchestratorConfig, load_orchestrator_config
from service.recovery.detect import FailureClass
from service.recovery.preview import restart_preview
from service.recovery.verdicts import runs_dir_of
from service.schemas import CheckpointCreate, CheckpointMark, CheckpointPublic, Page, RestartPreviewPublic
from service.statemachine import CheckpointState

router = APIRouter(tags=["checkpoints"])
CheckpointId = EntityId


def get_runs_dir(settings: SettingsDep) -> Path:
    return runs_dir_of(settings)


RunsDir = Annotated[Path, Depends(get_runs_dir)]


def get_orchestrator_config(settings: SettingsDep) -> OrchestratorConfig:
    return load_orchestrator_config(settings)


OrchestratorConfigDep = Annotated[OrchestratorConfig, Depends(get_orchestrator_config)]


@router.post(
    "/runs/{run_id}/checkpoints", status_code=status.HTTP_201_CREATED, response_model=CheckpointPublic
)
def register_checkpoint(
    run_id: RunId,
    body: CheckpointCreate,
    session: SessionDep,
    _: Ingestor,
    response: Response,
    runs_dir: RunsDir,
) -> CheckpointPublic:
    runs_crud.get_run(session, run_id=run_id)
    ckpt, created = ckpt_crud.register_checkpoint(
        session, run_id=run_id, data=body.model_dump(), runs_dir=runs_dir
    )
    if not created:
        response.status_code = status.HTTP_200_OK
    return CheckpointPublic.model_validate(ckpt)


@router.post("/runs/{run_id}/checkpoints/{checkpoint_id}/commit", response_model=CheckpointPublic)
def commit_checkpoint(
    run_id: RunId, checkpoint_id: CheckpointId, session: SessionDep, _: Ingestor
) -> CheckpointPublic:
    return CheckpointPublic.model_validate(
        ckpt_crud.commit_checkpoint(session, checkpoint_id=checkpoint_id, run_id=run_id)
    )


@router.get("/runs/{run_id}/checkpoints", response_model=Page[CheckpointPublic])
def list_checkpoints(
    run_id: RunId,
    session: SessionDep,
    _: Viewer,
    state: Annotated[list[CheckpointState] | None, Query()] = None,
    limit: Limit = 100,
    offset: Offset = 0,
) -> Page[CheckpointPublic]:
    runs_crud.get_run(session, run_id=run_id)
    rows, total = ckpt_crud.list_checkpoints(
        session, run_id=run_id, states=state or (), limit=limit, offset=offset
    )
    return Page(
        items=[CheckpointPublic.model_validate(c) for c in rows], total=total, limit=limit, offset=offset
    )


@router.get("/checkpoints/{checkpoint_id}", response_model=CheckpointPublic)
def get_checkpoint(checkpoint_id: CheckpointId, session: SessionDep, _: Viewer) -> CheckpointPublic:
    return CheckpointPublic.model_validate(ckpt_crud.get_checkpoint(session, checkpoint_id=checkpoint_id))


@router.post("/checkpoints/{checkpoint_id}/mark", response_model=CheckpointPublic)
def mark_checkpoint(
    checkpoint_id: CheckpointId, body: CheckpointMark, session: SessionDep, who: Operator, runs_dir: RunsDir
) -> CheckpointPublic:
    """Change a checkpoint's state, health verdict (final: the orchestrator no longer re-judges it) or pin.
    A pin reaches disk: the PINNED marker the trainer's retention honours is written or removed (409 when
    the checkpoint is not in its run's directory or not on disk)."""
    ckpt = ckpt_crud.mark_checkpoint(
        session,
        checkpoint_id=checkpoint_id,
        author=who.author,
        reason=body.reason,
        state=CheckpointState(body.state) if body.state else None,
        healthy=body.healthy,
        pinned=body.pinned,
        runs_dir=runs_dir,
    )
    return CheckpointPublic.model_validate(ckpt)


@router.get("/runs/{run_id}/restart-preview", response_model=RestartPreviewPublic)
def preview_restart(
    run_id: RunId,
    session: SessionDep,
    _: Viewer,
    cfg: OrchestratorConfigDep,
    failure: Annotated[
        Literal["divergence", "hardware", "hang"], Query(description="The failure to restart after.")
    ] = "divergence",
) -> RestartPreviewPublic:
    """What the orchestrator would restore now after this failure, and why, with the newer checkpoints it
    would pass over. Changes nothing."""
    return restart_preview(session, run_id=run_id, failure=FailureClass(failure), cfg=cfg).public()
