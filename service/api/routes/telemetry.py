"""Metrics and heartbeats from trainer ranks (trainer tokens may write only to their own run)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response, status

from service.api.deps import MAX_ID, MAX_STEP, Ingestor, RunId, SessionDep, Viewer
from service.crud import runs as runs_crud
from service.crud import telemetry
from service.metrics import METRIC_POINTS_DUPLICATE, METRIC_POINTS_INGESTED
from service.schemas import (
    HeartbeatCreate,
    HeartbeatPublic,
    IngestReply,
    MetricBatch,
    MetricPublic,
    MetricSeries,
)

router = APIRouter(prefix="/runs/{run_id}", tags=["telemetry"])


@router.post("/metrics", response_model=IngestReply)
def ingest_metrics(run_id: RunId, body: MetricBatch, session: SessionDep, _: Ingestor) -> IngestReply:
    runs_crud.get_run(session, run_id=run_id)
    result = telemetry.ingest_metrics(
        session, run_id=run_id, attempt=body.attempt, points=[p.model_dump() for p in body.points]
    )
    METRIC_POINTS_INGESTED.inc(result.accepted)
    METRIC_POINTS_DUPLICATE.inc(result.duplicates)
    return IngestReply(accepted=result.accepted, duplicates=result.duplicates)


@router.get("/metrics", response_model=MetricSeries)
def query_metrics(
    run_id: RunId,
    session: SessionDep,
    _: Viewer,
    start_step: Annotated[int | None, Query(ge=0, le=MAX_STEP)] = None,
    end_step: Annotated[int | None, Query(ge=0, le=MAX_STEP)] = None,
    attempt: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None,
    max_points: Annotated[int, Query(ge=1, le=10_000, description="Downsample past this many rows.")] = 1000,
) -> MetricSeries:
    runs_crud.get_run(session, run_id=run_id)
    rows, total, width = telemetry.query_metrics(
        session,
        run_id=run_id,
        start_step=start_step,
        end_step=end_step,
        attempt=attempt,
        max_points=max_points,
    )
    return MetricSeries(
        run_id=run_id, total=total, bucket_steps=width, points=[MetricPublic.model_validate(r) for r in rows]
    )


@router.post("/heartbeats", status_code=status.HTTP_204_NO_CONTENT, response_class=Response)
def heartbeat(run_id: RunId, body: HeartbeatCreate, session: SessionDep, _: Ingestor) -> Response:
    runs_crud.get_run(session, run_id=run_id)
    telemetry.record_heartbeat(
        session, run_id=run_id, attempt=body.attempt, rank=body.rank, host=body.host, step=body.step
    )
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/heartbeats", response_model=list[HeartbeatPublic])
def list_heartbeats(
    run_id: RunId,
    session: SessionDep,
    _: Viewer,
    attempt: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None,
) -> list[HeartbeatPublic]:
    runs_crud.get_run(session, run_id=run_id)
    return [
        HeartbeatPublic.model_validate(h)
        for h in telemetry.list_heartbeats(session, run_id=run_id, attempt=attempt)
    ]
