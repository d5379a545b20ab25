"""runs that trained fp16 before it became OPT's format are stored as fp16-mixed

Until issue 14 `precision: fp16` meant fp16 compute over fp32 master weights with a loss scale from 65536;
the name now means OPT's format (fp16 weights, scale from 4), and that format is `fp16-mixed`. A stored run
that trained under the old meaning would, at its next relaunch, have its checkpoints refused by the trainer
(exit 2: written in another precision) and fail for good, since a run's config cannot be edited. The runs
whose own metrics prove the old meaning are renamed to what they trained in: precision fp16 (stated or the
default), no `initial_loss_scale` of their own, and a first reported loss scale of 32768 or more (the old
format's 65536, or its first halving; OPT's starts at 4 and can at most double in one step). A run that has
not reported a step yet keeps fp16 and starts in OPT's format; nothing it resumes can be of the old one
unless its metrics were lost, and then the trainer's refusal names the way out. Each rename is a logbook
entry with its evidence. docs/trainer.md, "Checkpoints".

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from service.models import UTCDateTime, utcnow

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD_FP16_FIRST_SCALE = 32768.0  # the old fp16's initial 65536, halved at most once by the first step

runs = sa.table("runs", sa.column("id", sa.Integer()), sa.column("config", sa.JSON()))
metrics = sa.table(
    "metrics",
    sa.column("run_id", sa.Integer()),
    sa.column("attempt", sa.Integer()),
    sa.column("step", sa.BigInteger()),
    sa.column("loss_scale", sa.Float()),
)
logbook = sa.table(
    "logbook",
    sa.column("run_id", sa.Integer()),
    sa.column("time", UTCDateTime()),
    sa.column("kind", sa.String()),
    sa.column("severity", sa.String()),
    sa.column("author", sa.String()),
    sa.column("message", sa.Text()),
    sa.column("evidence", sa.JSON()),
)


def upgrade() -> None:
    bind = op.get_bind()
    for run_id, config in bind.execute(sa.select(runs.c.id, runs.c.config)).all():
        config = dict(config or {})
        if config.get("precision", "fp16") != "fp16":
            continue
        if "initial_loss_scale" in (config.get("hyperparameters") or {}):
            continue  # its first scale says nothing about the format
        first = bind.execute(
            sa.select(metrics.c.attempt, metrics.c.step, metrics.c.loss_scale)
            .where(metrics.c.run_id == run_id, metrics.c.loss_scale.is_not(None))
            .order_by(metrics.c.attempt, metrics.c.step)
            .limit(1)
        ).first()
        if first is None or first.loss_scale < OLD_FP16_FIRST_SCALE:
            continue
        bind.execute(
            sa.update(runs).where(runs.c.id == run_id).values(config={**config, "precision": "fp16-mixed"})
        )
        bind.execute(
            sa.insert(logbook).values(
                run_id=run_id,
                time=utcnow(),
                kind="action",
                severity="info",
                author="migration 0011",
                message=(
                    "precision fp16 -> fp16-mixed: this run trained when fp16 meant fp16 compute over fp32 "
                    "master weights (now fp16-mixed); it keeps training in that format"
                ),
                evidence={
                    "first_loss_scale": first.loss_scale,
                    "attempt": first.attempt,
                    "step": first.step,
                    "configured_precision": config.get("precision"),
                },
            )
        )


def downgrade() -> None:
    """Give the runs this migration renamed (its logbook entries name them) their stored `fp16` back: the
    code of revision 0010 and before reads `fp16` as the format they trained in."""
    bind = op.get_bind()
    renamed = sa.select(logbook.c.run_id).where(logbook.c.author == "migration 0011").scalar_subquery()
    for run_id, config in bind.execute(
        sa.select(runs.c.id, runs.c.config).where(runs.c.id.in_(renamed))
    ).all():
        config = dict(config or {})
        if config.get("precision") != "fp16-mixed":
            continue  # changed since (a run's config is not editable today, but say nothing we did not do)
        bind.execute(
            sa.update(runs).where(runs.c.id == run_id).values(config={**config, "precision": "fp16"})
        )
        bind.execute(
            sa.insert(logbook).values(
                run_id=run_id,
                time=utcnow(),
                kind="action",
                severity="info",
                author="migration 0011 (downgrade)",
                message="precision fp16-mixed -> fp16: the schema went back before migration 0011, "
                "whose code reads fp16 as this run's format",
                evidence={"configured_precision": "fp16-mixed"},
            )
        )
