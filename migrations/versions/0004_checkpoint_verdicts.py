"""checkpoint health verdicts and who pinned a checkpoint

The catalog keeps a health verdict per checkpoint, maintained by the orchestrator as the steps after it
arrive (``service/orchestrator/verdicts.py``): ``verdict`` (healthy | unhealthy | pending), the numbers it
was decided on, when, and whether it can still change. ``pinned_by`` tells the orchestrator's automatic pin
of the newest healthy checkpoint (moved forward as newer ones prove healthy) from an operator's pin, which
it never undoes. Existing rows take their verdict from the ``healthy`` flag they had.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import service.models

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("checkpoints", schema=None) as batch_op:
        batch_op.add_column(sa.Column("verdict", sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column("verdict_numbers", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("verdict_final", sa.Boolean(), nullable=True))
        batch_op.add_column(sa.Column("verdict_at", service.models.UTCDateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("pinned_by", sa.String(length=255), nullable=True))

    # a verdict set before (by an operator's mark) is final; the rest are judged from now on
    op.execute(
        "UPDATE checkpoints SET verdict = "
        "CASE WHEN healthy IS NULL THEN 'pending' WHEN healthy THEN 'healthy' ELSE 'unhealthy' END, "
        "verdict_final = CASE WHEN healthy IS NULL THEN false ELSE true END"
    )
    op.execute("UPDATE checkpoints SET pinned_by = 'operator' WHERE pinned")
    with op.batch_alter_table("checkpoints", schema=None) as batch_op:
        batch_op.alter_column("verdict", existing_type=sa.String(length=16), nullable=False)
        batch_op.alter_column("verdict_final", existing_type=sa.Boolean(), nullable=False)


def downgrade() -> None:
    with op.batch_alter_table("checkpoints", schema=None) as batch_op:
        batch_op.drop_column("pinned_by")
        batch_op.drop_column("verdict_at")
        batch_op.drop_column("verdict_final")
        batch_op.drop_column("verdict_numbers")
        batch_op.drop_column("verdict")
