"""token expiry: every API token may expire, and a trainer token knows the attempt it was made for

``api_tokens.expires_at`` (NULL = never) is checked on every authentication; ``api_tokens.attempt_id`` links
a trainer token to its attempt so that the orchestrator can expire it when the attempt ends (ended_at + the
spool-replay grace, docs/security.md "Tokens").

Existing trainer tokens were never linked: the newest trainer token of a run whose attempt is still live is
taken to be that attempt's (the orchestrator makes one token per attempt, in the attempt's transaction);
every other trainer token belongs to an attempt that has ended and expires now.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01
"""

import datetime as dt
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import service.models

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("api_tokens", schema=None) as batch_op:
        batch_op.add_column(sa.Column("attempt_id", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("expires_at", service.models.UTCDateTime(timezone=True), nullable=True))
        batch_op.create_index(batch_op.f("ix_api_tokens_attempt_id"), ["attempt_id"], unique=False)
        batch_op.create_foreign_key(
            batch_op.f("fk_api_tokens_attempt_id_attempts"),
            "attempts",
            ["attempt_id"],
            ["id"],
            ondelete="CASCADE",
        )
    bind = op.get_bind()
    bind.execute(
        sa.text(
            """
            UPDATE api_tokens SET attempt_id = (
                SELECT attempts.id FROM attempts
                WHERE attempts.run_id = api_tokens.run_id AND attempts.ended_at IS NULL
            )
            WHERE role = 'trainer' AND id = (
                SELECT max(newest.id) FROM api_tokens AS newest
                WHERE newest.run_id = api_tokens.run_id AND newest.role = 'trainer'
            )
            """
        )
    )
    bind.execute(
        sa.text(
            "UPDATE api_tokens SET expires_at = :now "
            "WHERE role = 'trainer' AND attempt_id IS NULL AND expires_at IS NULL"
        ).bindparams(
            sa.bindparam("now", dt.datetime.now(dt.UTC), type_=service.models.UTCDateTime(timezone=True))
        )
    )


def downgrade() -> None:
    with op.batch_alter_table("api_tokens", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("fk_api_tokens_attempt_id_attempts"), type_="foreignkey")
        batch_op.drop_index(batch_op.f("ix_api_tokens_attempt_id"))
        batch_op.drop_column("expires_at")
        batch_op.drop_column("attempt_id")
