"""The OpenAPI document is true: every route declares the error statuses its dependencies can produce, with
the error schema the API really sends, and /metrics is documented as Prometheus text, not JSON."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from service.api.responses import ErrorBody, ValidationErrorBody
from service.api.routes import system
from service.config import Settings
from service.main import API_MODULES, API_PREFIX, create_app
from tests.conftest import make_run

ERROR_SCHEMA = {"$ref": "#/components/schemas/ErrorBody"}
VALIDATION_ERROR_SCHEMA = {"$ref": "#/components/schemas/ValidationErrorBody"}


def _dependency_names(dependant: Dependant) -> Iterator[str]:
    for sub in dependant.dependencies:
        if sub.call is not None:
            yield getattr(sub.call, "__qualname__", "")
        yield from _dependency_names(sub)


def _expected_statuses(route: APIRoute, *, under_api: bool) -> set[int]:
    """What the route's dependencies and parameters can answer, spelled out independently of
    service/api/responses.py."""
    names = set(_dependency_names(route.dependant))
    expected: set[int] = set()
    if "get_principal" in names:
        expected.add(401)  # no token, an unknown or a revoked one
    if "require_ingest" in names or any(name.startswith("require.<locals>") for name in names):
        expected.add(403)  # a token whose role (or run) may not do this
    if route.dependant.path_params:
        expected.add(404)  # the run, node, checkpoint, token or attempt named does not exist
    if route.dependant.query_params or route.dependant.path_params or route.body_field:
        expected.add(422)  # a parameter or the body fails validation
    if "get_session" in names:
        expected |= {422, 503}  # a value out of the database's range; the database is down
    if under_api and route.methods - {"GET", "HEAD", "OPTIONS"}:
        # api/body_guard.py: bad Content-Length, token checked before the body, body over its cap; a write
        # conflicting with stored data
        expected |= {400, 401, 409, 413, 503}
    return expected


def _routes() -> Iterator[tuple[APIRoute, str, bool]]:
    for module in API_MODULES:
        for route in module.router.routes:
            assert isinstance(route, APIRoute)
            yield route, API_PREFIX + route.path, True
    for route in system.router.routes:
        assert isinstance(route, APIRoute)
        yield route, route.path, False


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    return create_app(Settings(database_url="sqlite://")).openapi()


def test_every_route_declares_the_statuses_its_dependencies_can_produce(document: dict[str, Any]) -> None:
    missing: dict[str, list[int]] = {}
    checked = 0
    for route, path, under_api in _routes():
        for method in route.methods:
            operation = document["paths"][path][method.lower()]
            declared = {int(code) for code in operation["responses"]}
            lacking = sorted(_expected_statuses(route, under_api=under_api) - declared)
            if lacking:
                missing[f"{method} {path}"] = lacking
            checked += 1
    assert checked == sum(len(ops) for ops in document["paths"].values())  # every route was walked
    assert not missing, missing


def test_every_error_response_has_the_error_schema_the_api_sends(document: dict[str, Any]) -> None:
    wrong = {}
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            for code, response in operation["responses"].items():
                if int(code) < 400 or path == "/readyz":  # /readyz's 503 is its readiness body
                    continue
                schema = response["content"]["application/json"]["schema"]
                expected = VALIDATION_ERROR_SCHEMA if code == "422" else ERROR_SCHEMA
                if schema != expected:
                    wrong[f"{method} {path} {code}"] = schema
    assert not wrong, wrong
    assert "HTTPValidationError" not in document["components"]["schemas"]  # FastAPI's default, not ours


def test_metrics_is_documented_as_prometheus_text(document: dict[str, Any]) -> None:
    responses = document["paths"]["/metrics"]["get"]["responses"]
    assert [media.split(";")[0] for media in responses["200"]["content"]] == ["text/plain"]
    assert responses["200"]["content"][next(iter(responses["200"]["content"]))]["schema"] == {
        "type": "string"
    }
    assert responses["401"]["content"] == {"application/json": {"schema": ERROR_SCHEMA}}


def test_the_documented_error_schemas_accept_the_bodies_the_api_sends(admin: TestClient) -> None:
    run = make_run(admin)
    invalid = admin.post("/api/v1/runs", json={"name": "", "owner": "x", "config": {"lr": "high"}})
    assert invalid.status_code == 422 and isinstance(invalid.json()["detail"], list)
    ValidationErrorBody.model_validate(invalid.json())
    # a 422 the service raises itself carries a message (a Slurm launcher where Slurm is off)
    refused = admin.post(
        "/api/v1/runs",
        json={"name": "slurm-run", "owner": "x", "config": {"launcher": "slurm", "target_steps": 10}},
    )
    assert refused.status_code == 422 and isinstance(refused.json()["detail"], str), refused.text
    ValidationErrorBody.model_validate(refused.json())
    for response, status in (
        (admin.get(f"/api/v1/runs/{run['id'] + 1000}"), 404),
        (admin.get("/api/v1/runs", headers={"Authorization": "Bearer nope"}), 401),
        (
            admin.post("/api/v1/logbook", content=b"x" * (1 << 20), headers={"Content-Type": "text/plain"}),
            413,
        ),
        (
            admin.post(
                "/api/v1/runs", json={"name": run["name"], "owner": "x", "config": {"target_steps": 10}}
            ),
            409,
        ),
    ):
        assert response.status_code == status, response.text
        ErrorBody.model_validate(response.json())
