"""Dependencies shared by the routes: one transaction per request, and who is calling."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Iterator
from typing import Annotated

from fastapi import Depends, HTTPException, Path, Query, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from service.api.body_guard import principal_from_scope
from service.config import Settings
from service.crud.tokens import Principal, TokenRefusal, authenticate
from service.db import transaction
from service.statemachine import TERMINAL_PHASES, Role

# Database ids are 32-bit integers; larger numbers are refused as input, not passed to the database.
MAX_ID = 2**31 - 1
RunId = Annotated[int, Path(ge=1, le=MAX_ID, description="Run id")]
EntityId = Annotated[int, Path(ge=1, le=MAX_ID)]
MAX_STEP = 2**62
Limit = Annotated[int, Query(ge=1, le=500, description="Page size.")]
Offset = Annotated[int, Query(ge=0, le=MAX_ID, description="Rows to skip.")]

ROLE_RANK = {Role.viewer: 1, Role.operator: 2, Role.admin: 3}

bearer = HTTPBearer(auto_error=False, description="`Authorization: Bearer <token>`")


# Dependencies that do no I/O are `async def`: FastAPI runs a plain `def` dependency in a worker thread,
# a thread hop per dependency per request (measurable on the ingest path, bench/ingest.py).


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_session(request: Request) -> Iterator[Session]:
    # scope="function" below: the transaction commits before the response is sent, so a client never
    # sees success for work that did not commit.
    with transaction(request.app.state.session_factory) as session:
        yield session


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionDep = Annotated[Session, Depends(get_session, scope="function")]


def _unauthorized(message: str) -> HTTPException:
    return HTTPException(status.HTTP_401_UNAUTHORIZED, message, headers={"WWW-Authenticate": "Bearer"})


def get_principal(
    request: Request,
    settings: SettingsDep,
    session: SessionDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> Principal:
    # A request with a body was authenticated before its body was read (api/body_guard.py).
    authenticated = principal_from_scope(request.scope)
    if authenticated is not None:
        return authenticated
    if credentials is None or credentials.scheme.lower() != "bearer" or not credentials.credentials:
        raise _unauthorized("missing bearer token")
    secret = credentials.credentials
    if hmac.compare_digest(secret.encode(), settings.bootstrap_admin_token.get_secret_value().encode()):
        return Principal(name="bootstrap-admin", role=Role.admin)
    principal = authenticate(session, secret=secret)
    if isinstance(principal, TokenRefusal):
        raise _unauthorized(principal.reason)
    return principal


PrincipalDep = Annotated[Principal, Depends(get_principal)]


def _check_role(principal: Principal, role: Role) -> Principal:
    if ROLE_RANK.get(principal.role, 0) < ROLE_RANK[role]:
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            f"this needs the {role.value} role; the token has {principal.role.value}",
        )
    return principal


def require(role: Role) -> Callable[[Principal], Awaitable[Principal]]:
    async def check(principal: PrincipalDep) -> Principal:
        return _check_role(principal, role)

    return check


async def require_ingest(principal: PrincipalDep, run_id: RunId) -> Principal:
    """Trainer tokens may feed only their own run, and only while it is not finished; operators and admins
    may feed any run, finished ones included (a backfill, e.g. a spool recovered by hand, is theirs to do).

    Finished is ``TERMINAL_PHASES`` (completed, failed, stopped): the orchestrator sets those only once no
    attempt is live (it ended the attempt and drained its spool first; stop_run sets ``stopped`` directly
    only when no attempt exists), so a trainer token speaking for such a run speaks for no process that
    should exist: 409 naming the phase. ``needs_attention`` is not finished: an attempt may still be running
    when its run is escalated. A stopped or failed run started again is fed by its new attempt's token, and
    the ended attempt's token expires on its own (crud/tokens.py). The phase is the one read when the token
    was checked: a request authenticated just before the run finished was sent by a live attempt."""
    if principal.role == Role.trainer:
        if principal.run_id != run_id:
            raise HTTPException(
                status.HTTP_403_FORBIDDEN, f"this trainer token is for run {principal.run_id}"
            )
        if principal.run_phase is not None and principal.run_phase in TERMINAL_PHASES:
            raise HTTPException(
                status.HTTP_409_CONFLICT,
                f"run {run_id} is {principal.run_phase.value}: it takes no more trainer reports",
            )
        return principal
    return _check_role(principal, Role.operator)


Viewer = Annotated[Principal, Depends(require(Role.viewer))]
Operator = Annotated[Principal, Depends(require(Role.operator))]
Admin = Annotated[Principal, Depends(require(Role.admin))]
Ingestor = Annotated[Principal, Depends(require_ingest)]
