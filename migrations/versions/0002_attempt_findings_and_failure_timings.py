"""attempt findings and failure timings

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import service.models

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("attempts", schema=None) as batch_op:
        batch_op.add_column(sa.Column("findings", sa.JSON(), nullable=True))
        batch_op.add_column(
            sa.Column("last_progress_at", service.models.UTCDateTime(timezone=True), nullable=True)
        )
        batch_op.add_column(
            sa.Column("detected_at", service.models.UTCDateTime(timezone=True), nullable=True)
        )
        batch_op.add_column(
            sa.Column("first_step_at", service.models.UTCDateTime(timezone=True), nullable=True)
        )

    # existing attempts found nothing; then the column is required like in the model
    op.execute("UPDATE attempts SET findings = '{}'")
    with op.batch_alter_table("attempts", schema=None) as batch_op:
        batch_op.alter_column("findings", existing_type=sa.JSON(), nullable=False)


def downgrade() -> None:
    with op.batch_alter_table("attempts", schema=None) as batch_op:
        batch_op.drop_column("first_step_at")
        batch_op.drop_column("detected_at")
        batch_op.drop_column("last_progress_at")
        batch_op.drop_column("findings")
