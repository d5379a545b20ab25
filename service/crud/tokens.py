"""API tokens: only a SHA-256 hash is stored; the secret is shown once, at creation."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.orm import Session

from service.errors import BadRequest, NotFound
from service.models import ApiToken, Run, utcnow
from service.statemachine import Role

TOKEN_PREFIX = "tops_"
# api_tokens.name and logbook.author are VARCHAR(200); PostgreSQL refuses longer values.
NAME_COLUMN_CHARS = 200
_HASH_SUFFIX_CHARS = 8


def fit_name(name: str, limit: int = NAME_COLUMN_CHARS) -> str:
    """``name`` if it fits in ``limit`` characters, else its head plus ``~`` and a stable hash of the whole.

    Names are derived from user input (``<run name>-attempt-N`` from a 200-character run name, the author
    ``user:<token name>``): the same input always gives the same name, and names that differ only past
    the cut stay distinct."""
    if len(name) <= limit:
        return name
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:_HASH_SUFFIX_CHARS]
    return f"{name[: limit - _HASH_SUFFIX_CHARS - 1]}~{digest}"


def hash_token(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True)
class Principal:
    """Who is calling: a role, a name for the logbook, and for trainer tokens the one run they may feed."""

    name: str
    role: Role
    run_id: int | None = None

    @property
    def author(self) -> str:
        return fit_name(f"user:{self.name}" if self.role != Role.trainer else f"trainer:{self.name}")


def create_token(
    session: Session, *, name: str, role: Role, run_id: int | None = None
) -> tuple[ApiToken, str]:
    if role == Role.trainer and run_id is None:
        raise BadRequest("a trainer token must be scoped to a run (run_id)")
    if role != Role.trainer and run_id is not None:
        raise BadRequest("only trainer tokens are scoped to a run")
    if run_id is not None and session.get(Run, run_id) is None:
        raise NotFound(f"run {run_id} does not exist")
    secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
    token = ApiToken(name=fit_name(name), role=role, run_id=run_id, token_hash=hash_token(secret))
    session.add(token)
    session.flush()
    return token, secret


def authenticate(session: Session, *, secret: str) -> Principal | None:
    # Columns, not the ORM entity: this runs on every request, metric batches included.
    row = session.execute(
        sa.select(ApiToken.name, ApiToken.role, ApiToken.run_id).where(
            ApiToken.token_hash == hash_token(secret), ApiToken.revoked_at.is_(None)
        )
    ).first()
    if row is None:
        return None
    return Principal(name=row.name, role=row.role, run_id=row.run_id)


def list_tokens(session: Session) -> list[ApiToken]:
    return list(session.scalars(sa.select(ApiToken).order_by(ApiToken.id)).all())


def revoke_token(session: Session, *, token_id: int) -> ApiToken:
    token = session.get(ApiToken, token_id)
    if token is None:
        raise NotFound(f"token {token_id} does not exist")
    if token.revoked_at is None:
        token.revoked_at = utcnow()
    return token
