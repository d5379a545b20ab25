"""Liveness, readiness and Prometheus exposition (unauthenticated, as probes and scrapers expect)."""

from __future__ import annotations

import sqlalchemy as sa
from fastapi import APIRouter, Request, Response, status
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.observability import registry_for_scrape

router = APIRouter(tags=["system"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
def readyz(request: Request) -> JSONResponse:
    try:
        with request.app.state.session_factory() as session:
            session.execute(sa.text("SELECT 1"))
    except sa.exc.SQLAlchemyError as exc:
        return JSONResponse(
            {"status": "unavailable", "detail": f"database unreachable: {type(exc).__name__}"},
            status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
        )
    return JSONResponse({"status": "ready"})


@router.get("/metrics")
def metrics(request: Request) -> Response:
    registry = registry_for_scrape(request.app.state.session_factory, request.app.state.settings.broker_url)
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
