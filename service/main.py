"""The control plane's FastAPI application."""

from __future__ import annotations

import gc
import logging
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import fastapi.routing
import sqlalchemy as sa
from fastapi import APIRouter, FastAPI, Request, status
from fastapi.exceptions import RequestValidationError
from sqlalchemy.orm import Session, sessionmaker
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.body_guard import BodyGuardMiddleware
from service.api.errors import SafeJSONResponse, request_validation_error
from service.api.responses import document_error_responses
from service.api.routes import (
    checkpoints,
    decisions,
    diagnostics,
    logbook,
    nodes,
    runs,
    system,
    telemetry,
    tokens,
)
from service.config import Settings, get_settings
from service.db import engine_from_settings, make_session_factory
from service.errors import ServiceError
from service.metrics import HTTP_REQUEST_DURATION
from service.metrics_collector import ScrapeCache
from service.schemas import (
    DEFAULT_BODY_LIMIT_BYTES,
    HEARTBEAT_BATCH_LIMIT_BYTES,
    METRIC_BATCH_LIMIT_BYTES,
    NOTE_BODY_LIMIT_BYTES,
)
from service.statemachine import InvalidTransition
from service.ui.routes import install as install_console

log = logging.getLogger("trainops.api")

API_PREFIX = "/api/v1"


# The /api/v1 routers, in the order the OpenAPI document lists them.
API_MODULES = (runs, telemetry, checkpoints, nodes, diagnostics, logbook, tokens, decisions)


def create_app(
    settings: Settings | None = None, *, session_factory: sessionmaker[Session] | None = None
) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = None
        if session_factory is None:
            engine = engine_from_settings(settings)
            app.state.session_factory = make_session_factory(engine)
        else:
            app.state.session_factory = session_factory
        # Everything built so far (the app, its routes and schemas, SQLAlchemy's mappers) lives as long as
        # the process: out of the collector's sight, a full collection no longer walks it, which took
        # tens of ms in the middle of requests (the p99 of bench/ingest.py).
        gc.freeze()
        yield
        if engine is not None:
            engine.dispose()

    app = FastAPI(
        title="trainops",
        version="0.1.0",
        summary="Operations service for long, large training runs.",
        description="Tracks runs, attempts, nodes, diagnostics, checkpoints, metrics and the logbook. "
        "Authenticate with `Authorization: Bearer <token>`; roles viewer < operator < admin, plus per-run "
        "trainer tokens that may only feed their run.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    if session_factory is not None:
        app.state.session_factory = session_factory

    api = APIRouter(prefix=API_PREFIX)
    for module in API_MODULES:
        document_error_responses(module.router, body_guarded=True)
        api.include_router(module.router)
    app.include_router(api)
    document_error_responses(system.router, body_guarded=False)
    app.include_router(system.router)
    app.state.scrape_cache = ScrapeCache(settings.metrics_cache_ttl_s)
    _install_error_handlers(app)
    install_console(app)
    # Added first, so it runs inside the timing middleware: refused requests are timed too.
    app.add_middleware(
        BodyGuardMiddleware,
        api_prefix=API_PREFIX,
        default_limit=DEFAULT_BODY_LIMIT_BYTES,
        route_limits=[
            ("POST", rf"^{API_PREFIX}/runs/[^/]+/metrics$", METRIC_BATCH_LIMIT_BYTES),
            ("POST", rf"^{API_PREFIX}/runs/[^/]+/heartbeats$", HEARTBEAT_BATCH_LIMIT_BYTES),
            ("POST", rf"^{API_PREFIX}/logbook$", NOTE_BODY_LIMIT_BYTES),
        ],
    )
    app.add_middleware(RequestTimingMiddleware)
    return app


def _install_error_handlers(app: FastAPI) -> None:
    # Every error body is encoded safely (api/errors.py): a 422 echoing NaN or a lone surrogate was a 500.
    app.add_exception_handler(RequestValidationError, request_validation_error)  # type: ignore[arg-type]

    @app.exception_handler(ServiceError)
    async def _service_error(_: Request, exc: ServiceError) -> SafeJSONResponse:
        return SafeJSONResponse({"detail": str(exc)}, status_code=exc.status_code)

    @app.exception_handler(InvalidTransition)
    async def _invalid_transition(_: Request, exc: InvalidTransition) -> SafeJSONResponse:
        return SafeJSONResponse({"detail": str(exc)}, status_code=status.HTTP_409_CONFLICT)

    @app.exception_handler(sa.exc.IntegrityError)
    async def _integrity(_: Request, exc: sa.exc.IntegrityError) -> SafeJSONResponse:
        log.info("integrity error: %s", exc.orig)
        return SafeJSONResponse({"detail": "the request conflicts with stored data"}, status_code=409)

    @app.exception_handler(sa.exc.DataError)
    async def _data_error(_: Request, exc: sa.exc.DataError) -> SafeJSONResponse:
        log.info("data error: %s", exc.orig)
        return SafeJSONResponse({"detail": "a value is out of range for the database"}, status_code=422)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> SafeJSONResponse:
        # Logged with its traceback here; the caller gets a message, never a traceback.
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return SafeJSONResponse(
            {"detail": f"internal error ({type(exc).__name__}); see the service log"}, status_code=500
        )

    @app.exception_handler(sa.exc.OperationalError)
    async def _db_down(_: Request, exc: sa.exc.OperationalError) -> SafeJSONResponse:
        log.warning("database error: %s", exc.orig)
        return SafeJSONResponse(
            {"detail": "database unavailable, retry later"}, status_code=503, headers={"Retry-After": "5"}
        )


class RequestTimingMiddleware:
    """Observes every request's latency by method, route template and status class.

    A plain ASGI middleware: Starlette's ``BaseHTTPMiddleware`` (``@app.middleware("http")``) runs the
    app in a task and relays the body through a memory stream, which cost more CPU than decoding a
    1,000-point metric batch (bench/ingest.py). Labels use route templates (``/api/v1/runs/{run_id}``),
    never concrete paths: ids would explode the label set.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status_code = 500  # an exception before the response started

        async def send_and_note_status(message: Message) -> None:
            nonlocal status_code
            if message["type"] == "http.response.start":
                status_code = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_and_note_status)
        finally:
            template = _route_template(scope["app"], scope["path"])
            HTTP_REQUEST_DURATION.labels(scope["method"], template, f"{status_code // 100}xx").observe(
                time.perf_counter() - start
            )


def _route_template(app: FastAPI, path: str) -> str:
    """The template of the route a path matches, e.g. ``/api/v1/runs/{run_id}``, or ``unmatched``.

    The templates are the routes' own ``path_format`` in routing order. Recent FastAPI releases hide an
    included router's routes behind one entry of ``app.routes`` (and ``scope["route"]`` holds the route
    without the prefix), so the flat list comes from ``fastapi.routing.iter_route_contexts`` where it exists;
    older releases flatten ``app.routes`` themselves. Building the OpenAPI document instead cost ~0.5 s on
    each app's first request.
    """
    patterns: list[tuple[re.Pattern[str], str]] | None = getattr(app.state, "route_patterns", None)
    if patterns is None:
        patterns = [
            (re.compile("^" + re.sub(r"\\{[^/]+?\\}", "[^/]+", re.escape(template)) + "$"), template)
            for template in _route_path_formats(app)
        ]
        app.state.route_patterns = patterns
    for pattern, template in patterns:
        if pattern.match(path):
            return template
    return "unmatched"


def _route_path_formats(app: FastAPI) -> list[str]:
    iter_route_contexts = getattr(fastapi.routing, "iter_route_contexts", None)
    routes = iter_route_contexts(app.routes) if iter_route_contexts is not None else app.routes
    formats = [route.path_format for route in routes if isinstance(getattr(route, "path_format", None), str)]
    return list(dict.fromkeys(formats))  # one entry per path, whatever its methods
