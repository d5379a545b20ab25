"""API tokens: only a SHA-256 hash is stored; the secret is shown once, at creation.

A token is refused once revoked or past its ``expires_at`` (optional on every token). The orchestrator
makes one trainer token per attempt and, when the attempt ends, sets its expiry to the end plus a grace
(`OrchestratorConfig.trainer_token_grace_s`) for the reporter's last deliveries (docs/security.md, "Tokens").
"""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.orm import Session

from service.errors import BadRequest, NotFound
from service.models import ApiToken, Attempt, Run, utcnow
from service.statemachine import Role, RunPhase

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
    """Who is calling: a role, a name for the logbook, and for trainer tokens the one run they may feed
    and that run's phase when the token was checked (ingest into a finished run is refused, deps.py)."""

    name: str
    role: Role
    run_id: int | None = None
    run_phase: RunPhase | None = None

    @property
    def author(self) -> str:
        return fit_name(f"user:{self.name}" if self.role != Role.trainer else f"trainer:{self.name}")


@dataclass(frozen=True)
class TokenRefusal:
    """Why a secret does not authenticate (the 401's detail)."""

    reason: str


UNKNOWN_TOKEN = TokenRefusal("invalid or revoked token")
EXPIRED_TOKEN = TokenRefusal("token expired")


def create_token(
    session: Session,
    *,
    name: str,
    role: Role,
    run_id: int | None = None,
    expires_at: dt.datetime | None = None,
) -> tuple[ApiToken, str]:
    if expires_at is not None and expires_at <= utcnow():
        raise BadRequest(f"expires_at {expires_at.isoformat()} is not in the future")
    if role == Role.trainer and run_id is None:
        raise BadRequest("a trainer token must be scoped to a run (run_id)")
    if role != Role.trainer and run_id is not None:
        raise BadRequest("only trainer tokens are scoped to a run")
    if run_id is not None and session.get(Run, run_id) is None:
        raise NotFound(f"run {run_id} does not exist")
    secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
    token = ApiToken(
        name=fit_name(name), role=role, run_id=run_id, token_hash=hash_token(secret), expires_at=expires_at
    )
    session.add(token)
    session.flush()
    return token, secret


def authenticate(session: Session, *, secret: str) -> Principal | TokenRefusal:
    # Columns, not the ORM entity, and the run's phase in the same query: this runs on every request,
    # metric batches included.
    row = session.execute(
        sa.select(ApiToken.name, ApiToken.role, ApiToken.run_id, ApiToken.expires_at, Run.phase)
        .outerjoin(Run, Run.id == ApiToken.run_id)
        .where(ApiToken.token_hash == hash_token(secret), ApiToken.revoked_at.is_(None))
    ).first()
    if row is None:
        return UNKNOWN_TOKEN
    if row.expires_at is not None and row.expires_at <= utcnow():
        return EXPIRED_TOKEN
    return Principal(name=row.name, role=row.role, run_id=row.run_id, run_phase=row.phase)


def list_tokens(session: Session) -> list[ApiToken]:
    return list(session.scalars(sa.select(ApiToken).order_by(ApiToken.id)).all())


def revoke_token(session: Session, *, token_id: int) -> ApiToken:
    token = session.get(ApiToken, token_id)
    if token is None:
        raise NotFound(f"token {token_id} does not exist")
    if token.revoked_at is None:
        token.revoked_at = utcnow()
    return token


def expire_attempt_tokens(session: Session, *, attempt: Attempt, grace_s: float) -> list[ApiToken]:
    """Expire the ended ``attempt``'s trainer token(s) at its end plus ``grace_s``; an earlier expiry or a
    revocation stands. Idempotent (the expiry follows from ``ended_at``)."""
    if attempt.ended_at is None:
        raise ValueError(f"attempt {attempt.id} has not ended")
    deadline = attempt.ended_at + dt.timedelta(seconds=grace_s)
    tokens = list(session.scalars(sa.select(ApiToken).where(ApiToken.attempt_id == attempt.id)).all())
    for token in tokens:
        if token.expires_at is None or token.expires_at > deadline:
            token.expires_at = deadline
    session.flush()
    return tokens
