"""node offences: every hardware failure attributed to a host, for a lemon score that decays

``nodes.blame_count`` counted blamed hangs only and never forgot. ``node_offences`` records each hardware
failure attributed to a host (blamed hang, confirmed straggler, crash on an unfit host, cordon by failed
diagnostics) with its time; the health layer's lemon score weighs each by its age (half-life). Existing
blame counts are not converted: their times are unknown.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-27
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import service.models

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "node_offences",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("node_id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=64), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=True),
        sa.Column("at", service.models.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["node_id"], ["nodes.id"], name=op.f("fk_node_offences_node_id_nodes"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_node_offences")),
    )
    with op.batch_alter_table("node_offences", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_node_offences_node_id_at"), ["node_id", "at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("node_offences", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_node_offences_node_id_at"))
    op.drop_table("node_offences")
