"""Who is using the console: the API token in an HTTP-only cookie, and a CSRF token bound to it.

The cookie holds the token the user typed into the login form (the same tokens as the API and the CLI, so
roles, expiry and revocation apply unchanged). It is HttpOnly (no script reads it), SameSite=Strict (no
other site's page sends it), Path=/ui, and Secure when the console is served over HTTPS.

CSRF: every form that changes something carries `csrf`, an HMAC of a fixed label keyed by the token itself
(OWASP's signed, session-bound token). A page of another site can make the browser post to /ui but cannot
read the cookie, so it cannot compute the value; nothing is stored server-side, so it works across API
worker processes. Posts also must come from the console's own origin when the browser says where from.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from urllib.parse import urlsplit

from fastapi import Request
from sqlalchemy.orm import Session

from service.config import Settings
from service.crud.tokens import Principal, TokenRefusal, authenticate
from service.statemachine import Role

COOKIE = "trainops_console"
COOKIE_PATH = "/ui"
ROLE_RANK = {Role.viewer: 1, Role.operator: 2, Role.admin: 3}


class NotSignedIn(Exception):
    """No valid token in the cookie: the console sends the browser to the login form."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Forbidden(Exception):
    """The user is signed in but may not do this (their role), or the form's CSRF token is wrong."""


@dataclass(frozen=True)
class ConsoleUser:
    principal: Principal
    token: str

    @property
    def csrf(self) -> str:
        return csrf_token(self.token)

    @property
    def can_operate(self) -> bool:
        return ROLE_RANK.get(self.principal.role, 0) >= ROLE_RANK[Role.operator]


def csrf_token(token: str) -> str:
    return hmac.new(hashlib.sha256(token.encode()).digest(), b"trainops-console-csrf", "sha256").hexdigest()


def principal_for(session: Session, settings: Settings, secret: str) -> Principal | TokenRefusal:
    """The same check as the API's bearer token (service/api/deps.py)."""
    if hmac.compare_digest(secret.encode(), settings.bootstrap_admin_token.get_secret_value().encode()):
        return Principal(name="bootstrap-admin", role=Role.admin)
    return authenticate(session, secret=secret)


def console_user(request: Request, session: Session, settings: Settings) -> ConsoleUser:
    secret = request.cookies.get(COOKIE)
    if not secret:
        raise NotSignedIn("sign in with an API token")
    found = principal_for(session, settings, secret)
    if isinstance(found, TokenRefusal):
        raise NotSignedIn(found.reason)
    if ROLE_RANK.get(found.role, 0) < ROLE_RANK[Role.viewer]:
        raise NotSignedIn("this token is not a user's (a trainer's tokens cannot sign in)")
    return ConsoleUser(principal=found, token=secret)


def check_origin(request: Request, *, opaque_ok: bool = True) -> None:
    """A post must come from the console's own origin when the browser says where from (Origin, else
    Referer; and never a `Sec-Fetch-Site: cross-site` request). The login form has no session to bind a
    CSRF token to, so this is its only check, and it also refuses an opaque origin (`null`: a sandboxed
    frame of another site): another site's page must not sign a browser in under the attacker's token."""
    if request.headers.get("sec-fetch-site") == "cross-site":
        raise Forbidden("a post from another site is refused")
    origin = request.headers.get("origin") or request.headers.get("referer")
    if origin == "null" and not opaque_ok:
        raise Forbidden("a post from an opaque origin (null) is refused")
    if origin and origin != "null":
        parts = urlsplit(origin)
        if f"{parts.scheme}://{parts.netloc}" != f"{request.url.scheme}://{request.url.netloc}":
            raise Forbidden(f"a post from another origin ({parts.scheme}://{parts.netloc}) is refused")


def check_post(request: Request, user: ConsoleUser, form: dict[str, str], *, operator: bool) -> None:
    """A change from a form: the CSRF token matches, the origin is ours, the role suffices."""
    if not hmac.compare_digest(form.get("csrf", ""), user.csrf):
        raise Forbidden("the form's CSRF token does not match this session; reload the page")
    check_origin(request)
    if operator and not user.can_operate:
        raise Forbidden(f"this needs the operator role; the token has {user.principal.role.value}")
