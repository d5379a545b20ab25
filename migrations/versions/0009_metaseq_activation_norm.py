"""metrics.actv_norm: the final layer's activation norm as metaseq defines it (the mean per-token L2 norm)

OPT's logbook reports metaseq's `actv_norm`, the mean over tokens of the final block's per-token L2 norm;
trainops stored only `act_norm`, the root-mean-square of the same norms. The trainer now reports both, and
the divergence detector and restart rule read `actv_norm` (docs/reporting-contract.md, "Training signals").

Existing rows keep `act_norm` as it was (the RMS: its meaning does not change) and get `actv_norm` NULL, "not
measured", never a value in the other definition. The recovery rules read a stretch of steps in metaseq's
definition only when every step of it has one; a stretch that reaches back into rows stored before this
revision is read in the RMS definition throughout, so no curve mixes the two. The column is nullable without a
default: on PostgreSQL adding it rewrites no rows, however large the table.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("metrics", schema=None) as batch_op:
        batch_op.add_column(sa.Column("actv_norm", sa.Double(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("metrics", schema=None) as batch_op:
        batch_op.drop_column("actv_norm")
