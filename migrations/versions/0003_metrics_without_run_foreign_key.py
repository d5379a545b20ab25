"""metrics without the foreign key to runs

The foreign-key trigger checked ``runs`` once per metric row: 1,000 lookups per 1,000-point batch, a
quarter of PostgreSQL's time on the ingest path (bench/ingest.py, docs/benchmarks.md "Ingest"). The
ingest route takes the same guarantee once per batch instead: it locks the run row ``FOR KEY SHARE``
(what the trigger does per row) in the batch's transaction. Runs are never deleted by trainops.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("metrics", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("fk_metrics_run_id_runs"), type_="foreignkey")


def downgrade() -> None:
    # Rows of runs that no longer exist would make the constraint fail to build; they are orphans.
    op.execute("DELETE FROM metrics WHERE run_id NOT IN (SELECT id FROM runs)")
    with op.batch_alter_table("metrics", schema=None) as batch_op:
        batch_op.create_foreign_key(
            batch_op.f("fk_metrics_run_id_runs"), "runs", ["run_id"], ["id"], ondelete="CASCADE"
        )
