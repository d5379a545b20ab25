"""Authentication before the body, and a size cap on every body (docs/security.md, "Limits").

FastAPI reads and parses a request's whole body before it resolves a route's dependencies, the token check
among them: a 52 MB POST without a token was read and parsed (seconds, half a GB of memory) before its 401.
This plain ASGI middleware runs first for every request that may carry a body:

1. Under the API prefix it checks the bearer token from the headers alone (the body is not touched): no
   token or an unknown one is answered 401 at once. The principal it found is handed to the route's
   dependency (``deps.get_principal``), so a request is still authenticated once.
2. It refuses a declared ``Content-Length`` over the route's cap (413) before reading, and counts a
   streamed (chunked) body as it reads it, answering 413 as soon as the count passes the cap; nothing past
   the cap is read. The body it read is then replayed to the app.
"""

from __future__ import annotations

import hmac
import logging
import re
from collections.abc import Sequence
from typing import Any

import anyio.to_thread
import sqlalchemy as sa
from fastapi import status
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.errors import SafeJSONResponse
from service.crud.tokens import Principal, TokenRefusal, authenticate
from service.statemachine import Role

log = logging.getLogger("trainops.api")

# The key under which the principal found here travels in the ASGI scope to deps.get_principal.
PRINCIPAL_SCOPE_KEY = "trainops.principal"
BODYLESS_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def describe_bytes(count: int) -> str:
    for unit, size in (("MiB", 1024 * 1024), ("KiB", 1024)):
        if count % size == 0:
            return f"{count // size} {unit}"
    return f"{count:,} bytes"


class BodyGuardMiddleware:
    """See the module docstring. ``route_limits``: (method, path pattern, cap in bytes), first match wins;
    anything else gets ``default_limit``."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        api_prefix: str,
        default_limit: int,
        route_limits: Sequence[tuple[str, str, int]] = (),
    ) -> None:
        self.app = app
        self.api_prefix = api_prefix
        self.default_limit = default_limit
        self.route_limits = [(method, re.compile(pattern), limit) for method, pattern, limit in route_limits]

    def limit_for(self, method: str, path: str) -> int:
        for route_method, pattern, limit in self.route_limits:
            if route_method == method and pattern.match(path):
                return limit
        return self.default_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in BODYLESS_METHODS:
            await self.app(scope, receive, send)
            return
        if scope["path"].startswith(self.api_prefix):
            principal_or_refusal = await self._authenticate(scope)
            if isinstance(principal_or_refusal, SafeJSONResponse):
                await principal_or_refusal(scope, receive, send)
                return
            scope[PRINCIPAL_SCOPE_KEY] = principal_or_refusal

        limit = self.limit_for(scope["method"], scope["path"])
        declared = _header(scope, b"content-length")
        if declared is not None:
            if not declared.isdigit():
                await _reply(scope, receive, send, status.HTTP_400_BAD_REQUEST, "invalid Content-Length")
                return
            if int(declared) > limit:
                await _too_large(scope, receive, send, limit)
                return

        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client went away; there is no one to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await _too_large(scope, receive, send, limit)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break

        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # after the body: only the client's disconnect

        await self.app(scope, replay, send)

    async def _authenticate(self, scope: Scope) -> Principal | SafeJSONResponse:
        authorization = _header(scope, b"authorization") or ""
        scheme, _, secret = authorization.partition(" ")
        secret = secret.strip()
        if scheme.lower() != "bearer" or not secret:
            return _unauthorized("missing bearer token")
        app_state = scope["app"].state
        bootstrap = app_state.settings.bootstrap_admin_token.get_secret_value()
        if hmac.compare_digest(secret.encode(), bootstrap.encode()):
            return Principal(name="bootstrap-admin", role=Role.admin)

        def lookup() -> Principal | TokenRefusal:
            with app_state.session_factory() as session:
                return authenticate(session, secret=secret)

        try:
            principal = await anyio.to_thread.run_sync(lookup)
        except sa.exc.SQLAlchemyError as exc:
            log.warning("database error while authenticating: %s", exc)
            return SafeJSONResponse(
                {"detail": "database unavailable, retry later"},
                status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
                headers={"Retry-After": "5"},
            )
        if isinstance(principal, TokenRefusal):
            return _unauthorized(principal.reason)
        return principal


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def _unauthorized(message: str) -> SafeJSONResponse:
    return SafeJSONResponse(
        {"detail": message},
        status_code=status.HTTP_401_UNAUTHORIZED,
        # The body was not read: the connection cannot carry another request after it.
        headers={"WWW-Authenticate": "Bearer", "Connection": "close"},
    )


async def _too_large(scope: Scope, receive: Receive, send: Send, limit: int) -> None:
    await _reply(
        scope,
        receive,
        send,
        status.HTTP_413_CONTENT_TOO_LARGE,
        f"request body larger than {describe_bytes(limit)} ({limit:,} bytes), the limit for "
        f"{scope['method']} {scope['path']} (docs/security.md, Limits)",
    )


async def _reply(scope: Scope, receive: Receive, send: Send, status_code: int, detail: str) -> None:
    response = SafeJSONResponse({"detail": detail}, status_code=status_code, headers={"Connection": "close"})
    await response(scope, receive, send)


def principal_from_scope(scope: dict[str, Any]) -> Principal | None:
    principal = scope.get(PRINCIPAL_SCOPE_KEY)
    return principal if isinstance(principal, Principal) else None
