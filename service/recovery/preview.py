"""`restart-preview`: what the orchestrator would restore now for a given failure, and why.

The same observation the reconcile loop decides on (`samples.checkpoint_candidates`,
`samples.act_norm_lineage`) and the same rule (`restart_point.pick_restart_checkpoint`). For a divergence the
onset is the current one: the active attempt's metrics as the detector reads them, else the onset recorded
when the newest attempt ended diverged; with no onset, the answer is the newest healthy checkpoint under
OPT's rule (what an operator's restart without a checkpoint restores).
"""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.orm import Session

from service.crud.runs import get_run
from service.models import Attempt, Checkpoint, Run
from service.recovery.config import OrchestratorConfig, divergence_for_run
from service.recovery.detect import FailureClass, detect_divergence
from service.recovery.restart_point import (
    CheckpointCandidate,
    RestartChoice,
    pick_restart_checkpoint,
    rule_for_run,
)
from service.recovery.samples import (
    act_norm_lineage,
    attempt_samples,
    checkpoint_candidates,
    lineage_samples,
)
from service.schemas import CheckpointPublic, RejectedCheckpoint, RestartPreviewPublic

PREVIEW_FAILURES = (FailureClass.divergence, FailureClass.hardware, FailureClass.hang)


@dataclass(frozen=True)
class DivergenceOnset:
    step: int
    source: str  # where it was seen, in words


@dataclass(frozen=True)
class RestartPreview:
    run_id: int
    failure: FailureClass
    onset: DivergenceOnset | None
    choice: RestartChoice
    chosen: Checkpoint | None  # the catalog's row of the chosen checkpoint (its stored verdict and pin)
    candidates: tuple[CheckpointCandidate, ...]

    def public(self) -> RestartPreviewPublic:
        return RestartPreviewPublic(
            run_id=self.run_id,
            failure=self.failure.value,
            divergence_onset=self.onset.step if self.onset else None,
            onset_source=self.onset.source if self.onset else None,
            checkpoint=CheckpointPublic.model_validate(self.chosen) if self.chosen else None,
            fresh_start=self.choice.checkpoint is None and self.failure != FailureClass.divergence,
            needs_attention=self.choice.checkpoint is None and self.failure == FailureClass.divergence,
            reason=self.choice.reason,
            rejected=[RejectedCheckpoint(step=step, reason=why) for step, why in self.choice.rejected],
        )


def current_divergence_onset(
    session: Session, *, run_id: int, cfg: OrchestratorConfig
) -> DivergenceOnset | None:
    """The divergence onset the orchestrator would act on now, if any."""
    attempts = list(
        session.scalars(
            sa.select(Attempt).where(Attempt.run_id == run_id).order_by(Attempt.number.desc()).limit(1)
        )
    )
    if not attempts:
        return None
    newest = attempts[0]
    if newest.ended_at is None:
        samples = attempt_samples(session, run_id=run_id, attempt=newest.number)
        history = lineage_samples(
            session,
            run_id=run_id,
            attempt=newest.number,
            upto=newest.start_step or 0,
            divergence=cfg.divergence,
        )
        run = session.get(Run, run_id)
        rules = divergence_for_run(cfg.divergence, run_config=run.config if run else None)
        found = detect_divergence(samples, rules, history=history)
        if found is None:
            return None
        return DivergenceOnset(found.onset_step, f"attempt {newest.number}'s metrics (running)")
    onset = (newest.findings or {}).get("onset_step")
    if newest.exit_reason == FailureClass.divergence.value and isinstance(onset, int):
        return DivergenceOnset(onset, f"attempt {newest.number} ended diverged")
    return None


def restart_preview(
    session: Session, *, run_id: int, failure: FailureClass, cfg: OrchestratorConfig
) -> RestartPreview:
    """What a restart after `failure` would restore now, the reason, and the newer checkpoints rejected."""
    run = get_run(session, run_id=run_id)
    candidates = checkpoint_candidates(session, run_id=run_id)
    norms = act_norm_lineage(session, run_id=run_id, from_step=min((c.step for c in candidates), default=0))
    onset = (
        current_divergence_onset(session, run_id=run_id, cfg=cfg)
        if failure == FailureClass.divergence
        else None
    )
    choice = pick_restart_checkpoint(
        candidates,
        failure=failure,
        cfg=rule_for_run(
            cfg.restart_point, checkpoint_interval=int((run.config or {}).get("checkpoint_interval") or 0)
        ),
        divergence_onset=onset.step if onset else None,
        act_norms=norms,
        min_loss_scale=divergence_for_run(cfg.divergence, run_config=run.config).min_loss_scale,
        runaway_multiple=cfg.divergence.act_norm_multiple,
    )
    chosen = session.get(Checkpoint, choice.checkpoint.id) if choice.checkpoint else None
    return RestartPreview(
        run_id=run_id,
        failure=failure,
        onset=onset,
        choice=choice,
        chosen=chosen,
        candidates=tuple(candidates),
    )
