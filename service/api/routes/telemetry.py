"""Metrics and heartbeats from trainer ranks (trainer tokens may write only to their own run)."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Annotated, Any

import pydantic
from fastapi import APIRouter, Query, Request, Response, status
from fastapi.routing import APIRoute

from service.api.deps import MAX_ID, MAX_STEP, Ingestor, Limit, Offset, RunId, SessionDep, Viewer
from service.crud import runs as runs_crud
from service.crud import telemetry
from service.metrics import METRIC_POINTS_DUPLICATE, METRIC_POINTS_INGESTED
from service.schemas import (
    HeartbeatBatch,
    HeartbeatPublic,
    IngestReply,
    MetricBatch,
    MetricPublic,
    MetricSeries,
    Page,
)

router = APIRouter(prefix="/runs/{run_id}", tags=["telemetry"])


class _MetricBatchRequest(Request):
    """Decodes and validates a metric batch in one pass of pydantic-core's JSON parser.

    FastAPI decodes a body with ``json.loads`` and then validates the Python objects: for a 1,000-point
    batch that is ~2.5x the time of ``model_validate_json`` (bench/ingest.py). A valid batch is
    returned here as a ``MetricBatch``, which FastAPI's own validation then passes through unchanged.
    Anything else (invalid JSON or an invalid point) falls back to FastAPI's usual path, so errors,
    their 422 shape and the order of checks (authentication first) are exactly as for any route.
    """

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            try:
                self._json = MetricBatch.model_validate_json(await self.body())
            except pydantic.ValidationError:
                return await super().json()
        return self._json


class _MetricBatchRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def fast_body_handler(request: Request) -> Response:
            return await handler(_MetricBatchRequest(request.scope, request.receive))

        return fast_body_handler


def ingest_metrics(run_id: RunId, body: MetricBatch, session: SessionDep, _: Ingestor) -> IngestReply:
    telemetry.lock_run_for_ingest(session, run_id=run_id)
    result = telemetry.ingest_metrics(session, run_id=run_id, attempt=body.attempt, points=body.points)
    METRIC_POINTS_INGESTED.inc(result.accepted)
    METRIC_POINTS_DUPLICATE.inc(result.duplicates)
    return IngestReply(accepted=result.accepted, duplicates=result.duplicates)


router.add_api_route(
    "/metrics",
    ingest_metrics,
    methods=["POST"],
    response_model=IngestReply,
    route_class_override=_MetricBatchRoute,
)


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
    found = telemetry.query_metrics(
        session,
        run_id=run_id,
        start_step=start_step,
        end_step=end_step,
        attempt=attempt,
        max_points=max_points,
    )
    return MetricSeries(
        run_id=run_id,
        total=found.total,
        skipped=found.skipped,
        bucket_steps=found.bucket_steps,
        points=[MetricPublic.model_validate(r) for r in found.rows],
    )


@router.post("/heartbeats", status_code=status.HTTP_204_NO_CONTENT, response_class=Response)
def heartbeat(run_id: RunId, body: HeartbeatBatch, session: SessionDep, _: Ingestor) -> Response:
    """One rank's beat or up to 1,024 ranks' beats of one attempt (docs/reporting-contract.md,
    "Heartbeats"); the latest per rank is kept."""
    telemetry.record_heartbeats(session, run_id=run_id, attempt=body.attempt, beats=body.beats)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/heartbeats", response_model=Page[HeartbeatPublic])
def list_heartbeats(
    run_id: RunId,
    session: SessionDep,
    _: Viewer,
    attempt: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None,
    limit: Limit = 100,
    offset: Offset = 0,
) -> Page[HeartbeatPublic]:
    """The latest heartbeat of each (attempt, rank), a page at a time (thousands on a big run)."""
    runs_crud.get_run(session, run_id=run_id)
    rows, total = telemetry.list_heartbeats(
        session, run_id=run_id, attempt=attempt, limit=limit, offset=offset
    )
    return Page(
        items=[HeartbeatPublic.model_validate(h) for h in rows], total=total, limit=limit, offset=offset
    )
