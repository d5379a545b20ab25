"""Liveness, readiness and Prometheus exposition (unauthenticated, as probes and scrapers expect, unless
``TRAINOPS_METRICS_TOKEN`` is set: then `/metrics` wants that bearer token)."""

from __future__ import annotations

import hmac
from typing import Literal

import sqlalchemy as sa
from fastapi import APIRouter, Request, Response, status
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel

from service.api.errors import SafeJSONResponse
from service.api.responses import ErrorBody
from service.observability import registry_for_scrape
from service.recovery.config import load_orchestrator_config

router = APIRouter(tags=["system"])


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    status: Literal["ready", "unavailable"]
    detail: str | None = None


class PrometheusResponse(Response):
    """Prometheus's text exposition format (version 0.0.4), which is what the OpenAPI document says."""

    media_type = CONTENT_TYPE_LATEST


@router.get("/healthz", response_model=Health)
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "The database cannot be reached."}},
)
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


@router.get(
    "/metrics",
    response_class=PrometheusResponse,
    responses={
        200: {
            "description": "Prometheus text exposition (format 0.0.4): the process's instruments and the "
            "database's per-run, per-node and per-GPU gauges (read at most once per "
            "TRAINOPS_METRICS_CACHE_TTL_S)."
        },
        401: {
            # Spelled out: a `model` would be documented in the route's own media type (text/plain).
            "content": {
                "application/json": {"schema": {"$ref": f"#/components/schemas/{ErrorBody.__name__}"}}
            },
            "description": "TRAINOPS_METRICS_TOKEN is set and the scrape did not send "
            "`Authorization: Bearer <it>`.",
        },
    },
)
def metrics(request: Request) -> Response:
    """The Prometheus scrape. Public unless ``TRAINOPS_METRICS_TOKEN`` is set (docs/observability.md)."""
    settings = request.app.state.settings
    if settings.metrics_token is not None and not _bearer_matches(
        request.headers.get("authorization", ""), settings.metrics_token.get_secret_value()
    ):
        return SafeJSONResponse(
            {"detail": "this scrape needs the metrics token: Authorization: Bearer <TRAINOPS_METRICS_TOKEN>"},
            status_code=status.HTTP_401_UNAUTHORIZED,
            headers={"WWW-Authenticate": "Bearer"},
        )
    registry = registry_for_scrape(
        request.app.state.session_factory,
        settings.broker_url,
        request.app.state.scrape_cache,
        # the orchestrator's own rules (its config file and environment): the loss-scale threshold per run
        divergence=load_orchestrator_config(settings).divergence,
    )
    return PrometheusResponse(generate_latest(registry))


def _bearer_matches(authorization: str, token: str) -> bool:
    scheme, _, secret = authorization.partition(" ")
    # compare_digest: how long the comparison takes says nothing about how much of the token matched.
    return scheme.lower() == "bearer" and hmac.compare_digest(secret.strip().encode(), token.encode())
