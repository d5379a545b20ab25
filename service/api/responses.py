"""The error responses of every route, in the OpenAPI document, derived from what the route depends on.

Every error the API sends is ``{"detail": ...}`` (service/main.py handlers, api/errors.py, api/body_guard.py,
FastAPI's HTTPException): ``detail`` is a message, except for a request that fails validation, where it is
the list of problems (api/errors.py ``request_validation_error``; a 422 raised by the service itself, such as
a Slurm partition that does not exist, carries a message). :func:`document_error_responses` adds to each route
the statuses that what it depends on can produce:

* an authenticated route (``deps.get_principal``): 401; one that also needs a role or a run
  (``deps.require``, ``deps.require_ingest``): 403;
* a path parameter (a run id, a hostname, ...): 404, when nothing has it;
* parameters or a body to validate, or a database session (a value out of range for a column): 422;
* a database session: 503 when the database cannot be reached (a 409 when a write conflicts with stored
  data);
* a request that may carry a body under the API prefix (api/body_guard.py): 400 (a bad Content-Length, or a
  request the service refuses), 401 and 503 from the token check before the body, 409, 413 (over the
  route's cap).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from fastapi import APIRouter
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from fastapi.utils import create_model_field
from pydantic import BaseModel, ConfigDict, Field

from service.api import deps
from service.api.body_guard import BODYLESS_METHODS


class ErrorBody(BaseModel):
    """Every error but a failed validation: what went wrong, in a sentence."""

    detail: str = Field(description="What went wrong.")


class ValidationProblem(BaseModel):
    """One problem with the request, as pydantic reports it (echoed input is cut short past 512 chars)."""

    model_config = ConfigDict(extra="allow")

    type: str
    loc: list[str | int]
    msg: str
    input: Any = None
    ctx: dict[str, Any] | None = None


class ValidationErrorBody(BaseModel):
    """A 422: the list of problems with the request, or, when the service itself refuses a well-formed
    request (a Slurm partition that does not exist, a value out of the database's range), a message."""

    detail: list[ValidationProblem] | str


# A route that looks up a run or host named in its query or body (not its path): 404 when it is not there.
NAMED_IN_REQUEST_NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorBody, "description": "A run or host the request names does not exist."}
}

DESCRIPTIONS = {
    400: "Bad request: an invalid Content-Length, or a request the service refuses.",
    401: "Missing, unknown, revoked or expired bearer token.",
    403: "The token's role (or run) may not do this.",
    404: "Something the path names does not exist.",
    409: "Conflicts with the current state or with stored data.",
    413: "The request body is over this route's cap (docs/security.md, Limits).",
    422: "The request failed validation, or cannot be carried out as asked.",
    503: "The database (or Slurm controller) cannot be reached; retry later.",
}


def _calls(dependant: Dependant) -> Iterator[Callable[..., Any]]:
    for sub in dependant.dependencies:
        if sub.call is not None:
            yield sub.call
        yield from _calls(sub)


def _is_role_check(call: Callable[..., Any]) -> bool:
    # deps.require(role) returns a closure defined inside it; deps.require_ingest checks the run.
    return call is deps.require_ingest or getattr(call, "__qualname__", "").startswith(
        f"{deps.require.__qualname__}.<locals>"
    )


def error_statuses(route: APIRoute, *, body_guarded: bool) -> set[int]:
    """The error statuses ``route`` can answer, from its dependencies, parameters and method.
    ``body_guarded``: the route is under the API prefix, where api/body_guard.py checks requests that may
    carry a body."""
    calls = set(_calls(route.dependant))
    statuses: set[int] = set()
    if deps.get_principal in calls:
        statuses.add(401)
    if any(_is_role_check(call) for call in calls):
        statuses.add(403)
    if route.dependant.path_params:
        statuses.add(404)
    has_session = deps.get_session in calls
    if has_session or route.dependant.query_params or route.dependant.path_params or route.body_field:
        statuses.add(422)
    if has_session:
        statuses.add(503)
    if body_guarded and not set(route.methods) <= BODYLESS_METHODS:
        statuses |= {400, 401, 409, 413, 503}
    return statuses


def document_error_responses(router: APIRouter, *, body_guarded: bool) -> None:
    """Adds each of the router's routes' error statuses (``error_statuses``) to its OpenAPI responses,
    keeping any response a route declares itself. Call before the router is included in the app.
    Idempotent: the routers are module-level, shared by every app ``create_app`` makes."""
    for route in router.routes:
        if not isinstance(route, APIRoute):
            continue
        declared = {int(code) for code in route.responses if str(code).isdigit()}
        for code in sorted(error_statuses(route, body_guarded=body_guarded) - declared):
            model = ValidationErrorBody if code == 422 else ErrorBody
            route.responses[code] = {"model": model, "description": DESCRIPTIONS[code]}
            # What FastAPI builds from `responses=` when a route is declared; the document reads it.
            route.response_fields[code] = create_model_field(
                name=f"Response_{code}_{route.unique_id}", type_=model, mode="serialization"
            )
