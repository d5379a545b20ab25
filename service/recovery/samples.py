"""The stored observations the recovery rules read, for the reconcile loop and restart-preview alike: an
attempt's newest metric rows and the lineage it resumed from (as the divergence detector reads them), the
run's catalogued checkpoints as restart candidates, and the surviving activation-norm history."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from service.crud.telemetry import decode_stored_field
from service.models import Checkpoint, Metric
from service.recovery.config import DivergenceConfig
from service.recovery.detect import MetricSample, act_norm_definition
from service.recovery.restart_point import CheckpointCandidate
from service.statemachine import CheckpointState
from trainer.checkpoint import verify_checkpoint

SAMPLE_WINDOW = 400  # newest metric rows of an attempt that divergence detection looks at


def stored_metric_sample(row: Any) -> MetricSample:
    """A stored metric row as the divergence detector reads it: a loss stored as null because it was
    non-finite (its name in `values.nan`) is NaN again (crud's decoder; a malformed `values.nan` names
    nothing)."""
    return MetricSample(
        step=row.step,
        loss=decode_stored_field(row, "loss"),
        loss_scale=row.loss_scale,
        act_norm=row.act_norm,
        actv_norm=row.actv_norm,
    )


def attempt_samples(session: Session, *, run_id: int, attempt: int) -> tuple[MetricSample, ...]:
    """The attempt's newest `SAMPLE_WINDOW` metric rows, oldest first."""
    rows = session.execute(
        sa.select(
            Metric.step, Metric.loss, Metric.loss_scale, Metric.act_norm, Metric.actv_norm, Metric.values
        )
        .where(Metric.run_id == run_id, Metric.attempt == attempt)
        .order_by(Metric.step.desc())
        .limit(SAMPLE_WINDOW)
    ).all()
    return tuple(stored_metric_sample(r) for r in reversed(rows))


def recent_step_times(session: Session, *, run_id: int, window: int) -> tuple[float, ...]:
    """The run's newest `window` step times (any attempt), oldest first: what its hang limits are
    calibrated on. A stored value that is not a finite number is skipped."""
    rows = session.scalars(
        sa.select(Metric.step_time_s)
        .where(Metric.run_id == run_id, Metric.step_time_s.is_not(None))
        .order_by(Metric.step.desc(), Metric.attempt.desc())
        .limit(window)
    ).all()
    return tuple(float(t) for t in reversed(rows) if isinstance(t, int | float) and math.isfinite(t))


def lineage_samples(
    session: Session, *, run_id: int, attempt: int, upto: int, divergence: DivergenceConfig
) -> tuple[MetricSample, ...]:
    """The metrics of the steps an attempt resumed from: per step up to its restore point `upto`, the newest
    earlier attempt that computed it (after a rollback, the recomputed history), as many steps back as the
    divergence baselines look, oldest first."""
    if upto <= 0:
        return ()
    depth = max(divergence.loss_spike_window, divergence.act_norm_window) + divergence.act_norm_patience + 1
    rows = session.execute(
        sa.select(
            Metric.step,
            Metric.attempt,
            Metric.loss,
            Metric.loss_scale,
            Metric.act_norm,
            Metric.actv_norm,
            Metric.values,
        )
        .where(
            Metric.run_id == run_id,
            Metric.attempt < attempt,
            Metric.step <= upto,
            Metric.step > upto - depth,
        )
        .order_by(Metric.step, Metric.attempt)
    ).all()
    newest = {r.step: r for r in rows}  # ordered by attempt: the last one per step wins
    return tuple(stored_metric_sample(r) for _, r in sorted(newest.items()))


def attempt_saved_step(session: Session, *, run_id: int, attempt: int) -> int | None:
    """The step of the newest checkpoint `attempt` committed (catalogued from its meta.json or registered by
    the trainer), or None."""
    return session.scalar(
        sa.select(sa.func.max(Checkpoint.step)).where(
            Checkpoint.run_id == run_id,
            Checkpoint.attempt == attempt,
            Checkpoint.state.in_([CheckpointState.committed, CheckpointState.verified]),
        )
    )


def checkpoint_candidates(session: Session, *, run_id: int) -> list[CheckpointCandidate]:
    """The run's catalogued checkpoints as restart candidates: usable when committed or verified in the
    catalog and intact on disk (marker, manifest, sizes). What the orchestrator and restart-preview see."""
    rows = session.scalars(
        sa.select(Checkpoint).where(
            Checkpoint.run_id == run_id,
            Checkpoint.state.in_(
                [CheckpointState.committed, CheckpointState.verified, CheckpointState.corrupt]
            ),
        )
    )
    out = []
    for c in rows:
        usable, why = c.state != CheckpointState.corrupt, "marked corrupt"
        if usable:
            ok, reason = verify_checkpoint(c.path, deep=False)  # marker, manifest, sizes: cheap
            usable, why = ok, reason
        out.append(
            CheckpointCandidate(
                id=c.id,
                step=c.step,
                path=c.path,
                usable=usable,
                loss_scale=c.loss_scale,
                act_norm=c.act_norm,
                unusable_reason="" if usable else why,
            )
        )
    return out


def act_norm_lineage(session: Session, *, run_id: int, from_step: int) -> dict[int, float]:
    """Per step, the activation norm of the newest attempt that computed it (the surviving history): metaseq's
    mean per-token L2 norm where every surviving step has it, else the RMS throughout
    (`detect.act_norm_definition`)."""
    rows = session.execute(
        sa.select(Metric.step, Metric.attempt, Metric.act_norm, Metric.actv_norm)
        .where(
            Metric.run_id == run_id,
            Metric.step >= from_step,
            sa.or_(Metric.act_norm.is_not(None), Metric.actv_norm.is_not(None)),
        )
        .order_by(Metric.step, Metric.attempt)
    ).all()
    newest = {r.step: r for r in rows}  # ordered by attempt: the last one per step wins
    return act_norms_of(newest)


def act_norms_of(rows: Mapping[int, Any]) -> dict[int, float]:
    """step -> finite activation norm of the rows (one per step), in the definition they all have."""
    definition = act_norm_definition(rows.values())
    return {
        step: norm
        for step, r in rows.items()
        if (norm := getattr(r, definition)) is not None and math.isfinite(norm)
    }
