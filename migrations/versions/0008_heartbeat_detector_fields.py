"""heartbeats carry what the hang and straggler detectors read: the table is their one source

Until now each rank rewrote ``<run-dir>/heartbeats/rank{R}.json`` and the orchestrator read those files every
pass (8,000 shared-filesystem reads per pass at 1,000 hosts x 8 ranks), while the API's ``heartbeats`` table
held only ``host``/``step``/``time`` and nobody read it. The table now holds the whole beat (section, the
per-step timings, the pid) plus ``received_at`` (the control plane's clock when the beat arrived), and the
orchestrator reads it with one query per pass (docs/reporting-contract.md, "Heartbeats").

Existing rows keep their step and time; their section reads as ``step`` (what a file without one read as).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import service.models

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("heartbeats", schema=None) as batch_op:
        batch_op.add_column(sa.Column("section", sa.String(length=32), nullable=False, server_default="step"))
        batch_op.add_column(sa.Column("pid", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("step_time_s", sa.Double(), nullable=True))
        batch_op.add_column(sa.Column("last_step_s", sa.Double(), nullable=True))
        batch_op.add_column(sa.Column("busy_s", sa.JSON(), nullable=True))
        batch_op.add_column(
            sa.Column("received_at", service.models.UTCDateTime(timezone=True), nullable=True)
        )


def downgrade() -> None:
    with op.batch_alter_table("heartbeats", schema=None) as batch_op:
        batch_op.drop_column("received_at")
        batch_op.drop_column("busy_s")
        batch_op.drop_column("last_step_s")
        batch_op.drop_column("step_time_s")
        batch_op.drop_column("pid")
        batch_op.drop_column("section")
