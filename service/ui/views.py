"""What each console page shows, read through crud in one transaction (no queries in the routes)."""

from __future__ import annotations

import datetime as dt
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from markupsafe import Markup
from sqlalchemy.orm import Session

from service.crud.checkpoints import list_checkpoints
from service.crud.decisions import list_decisions
from service.crud.diagnostics import list_diagnostics
from service.crud.logbook import list_logbook
from service.crud.nodes import list_nodes
from service.crud.runs import get_run, list_attempts, list_runs
from service.crud.telemetry import metric_curves
from service.models import Attempt, Checkpoint, Decision, Diagnostic, LogEntry, Node, Run
from service.recovery.config import OrchestratorConfig
from service.recovery.detect import FailureClass
from service.recovery.preview import restart_preview
from service.statemachine import DecisionStatus, LogKind, NodeState, Severity
from service.ui.charts import series, svg

CURVE_POINTS = (
    500  # stored rows per chart; past this the database buckets steps (crud.telemetry.metric_curves)
)
CURVES = (
    ("loss", "loss"),
    ("loss scale", "loss_scale"),
    ("activation norm (final layer)", "act_norm"),
    ("gradient norm", "grad_norm"),
    ("learning rate", "lr"),
    ("gradient clipping", "clip"),
)


@dataclass(frozen=True)
class FleetPage:
    runs: list[Run]
    nodes: list[Node]
    by_state: dict[str, int]
    lemons: list[Node]
    diagnostics: list[tuple[Diagnostic, str]]
    pending_decisions: list[Decision]


def fleet_page(session: Session) -> FleetPage:
    runs, _ = list_runs(session, limit=200)
    nodes, _ = list_nodes(session, limit=500)
    by_state = Counter(n.state.value for n in nodes)
    lemons = sorted(
        (n for n in nodes if n.failure_count or n.blame_count),
        key=lambda n: (n.failure_count + n.blame_count, n.hostname),
        reverse=True,
    )[:10]
    diagnostics, _ = list_diagnostics(session, limit=20)
    pending, _ = list_decisions(session, status=DecisionStatus.pending, limit=50)
    return FleetPage(
        runs=sorted(runs, key=lambda r: r.id, reverse=True),
        nodes=nodes,
        by_state={state.value: by_state.get(state.value, 0) for state in NodeState},
        lemons=lemons,
        diagnostics=diagnostics,
        pending_decisions=pending,
    )


@dataclass(frozen=True)
class AttemptRow:
    attempt: Attempt
    detect_s: float | None  # last progress -> failure recorded
    recover_s: float | None  # failure recorded -> the next attempt's first step
    restored_step: int | None


@dataclass(frozen=True)
class CheckpointRow:
    checkpoint: Checkpoint
    rolled_back_by: int | None  # the later attempt that restarted from an earlier step (an abandoned branch)


@dataclass(frozen=True)
class RestoreChoice:
    situation: str  # what the choice is for: the failure the orchestrator is restarting after, or a what-if
    step: int | None
    reason: str


@dataclass(frozen=True)
class RunPage:
    run: Run
    attempts: list[AttemptRow]
    checkpoints: list[CheckpointRow]
    checkpoints_total: int
    restore: RestoreChoice
    charts: list[Markup]
    points: int
    bucket_steps: int
    logbook: list[LogEntry]
    log_kinds: list[str]
    log_severity: str | None
    decisions: list[Decision]
    open_decisions: list[Decision] = field(default_factory=list)


def _seconds(a: dt.datetime | None, b: dt.datetime | None) -> float | None:
    return (b - a).total_seconds() if a is not None and b is not None else None


def abandoned_after(attempts: Sequence[Attempt]) -> dict[int, int]:
    """attempt number -> the step after which a later attempt recomputed its steps (it restarted from an
    earlier checkpoint): what it computed past that step is an abandoned branch, not the run's history (the
    surviving history is, per step, the newest attempt that computed it, as `recovery.samples` reads it)."""
    out: dict[int, int] = {}
    later: int | None = None
    for attempt in sorted(attempts, key=lambda a: a.number, reverse=True):
        if later is not None:
            out[attempt.number] = later
        later = attempt.start_step if later is None else min(later, attempt.start_step)
    return out


def _rolled_back_by(checkpoint: Checkpoint, attempts: Sequence[Attempt]) -> int | None:
    """The first later attempt that restarted from before this checkpoint, or None (it is on the history)."""
    if checkpoint.attempt is None:
        return None
    return next(
        (a.number for a in attempts if a.number > checkpoint.attempt and a.start_step < checkpoint.step), None
    )


def restore_choice(
    session: Session, *, run_id: int, attempts: Sequence[Attempt], cfg: OrchestratorConfig
) -> RestoreChoice:
    """The checkpoint a restart would restore now, for the run's situation: after the last attempt's
    failure, the orchestrator's rule for that failure class (`restart_preview`, the rule `decide` applies);
    while an attempt runs, or after a clean end, what a divergence now would restore (labelled as such)."""
    last = attempts[-1] if attempts else None
    failure = None
    if last is None:
        situation = "if the run diverged now"
    elif last.ended_at is None:
        situation = f"if attempt {last.number} diverged now"
    elif last.exit_reason in FailureClass.__members__:
        failure = FailureClass(last.exit_reason)
        situation = f"restart after attempt {last.number}'s {failure.value}"
    else:  # a clean end (completed, stopped): a start resumes; a divergence is the what-if that matters
        situation = f"if the run diverged now (attempt {last.number} ended {last.exit_reason or 'cleanly'})"
    preview = restart_preview(session, run_id=run_id, failure=failure or FailureClass.divergence, cfg=cfg)
    step = preview.choice.checkpoint.step if preview.choice.checkpoint else None
    return RestoreChoice(situation=situation, step=step, reason=preview.choice.reason)


def run_page(
    session: Session,
    *,
    run_id: int,
    cfg: OrchestratorConfig,
    kinds: Sequence[LogKind] = (),
    min_severity: Severity | None = None,
) -> RunPage:
    run = get_run(session, run_id=run_id)
    attempts = list_attempts(session, run_id=run_id)
    checkpoints, total_checkpoints = list_checkpoints(session, run_id=run_id, limit=100)
    steps = {c.id: c.step for c in checkpoints}
    rows = []
    for i, attempt in enumerate(attempts):
        following = attempts[i + 1] if i + 1 < len(attempts) else None
        rows.append(
            AttemptRow(
                attempt=attempt,
                detect_s=_seconds(attempt.last_progress_at, attempt.detected_at),
                recover_s=_seconds(attempt.detected_at, following.first_step_at if following else None),
                restored_step=steps.get(attempt.restored_from_checkpoint_id or -1),
            )
        )
    found = metric_curves(
        session,
        run_id=run_id,
        fields=[name for _, name in CURVES],
        abandoned_after=abandoned_after(attempts),
        max_points=CURVE_POINTS,
    )
    charts = [svg(series(title, found.rows, name)) for title, name in CURVES]
    logbook, _ = list_logbook(
        session, run_id=run_id, kinds=kinds, min_severity=min_severity, limit=200, newest_first=True
    )
    decisions, _ = list_decisions(session, run_id=run_id, limit=20)
    return RunPage(
        run=run,
        attempts=rows,
        checkpoints=[CheckpointRow(c, _rolled_back_by(c, attempts)) for c in checkpoints],
        checkpoints_total=total_checkpoints,
        restore=restore_choice(session, run_id=run_id, attempts=attempts, cfg=cfg),
        charts=charts,
        points=found.total,
        bucket_steps=found.bucket_steps,
        logbook=logbook,
        log_kinds=[k.value for k in kinds],
        log_severity=min_severity.value if min_severity else None,
        decisions=decisions,
        open_decisions=[d for d in decisions if d.status == DecisionStatus.pending],
    )


def evidence_text(evidence: dict[str, Any] | None, limit: int = 600) -> str:
    """A logbook entry's evidence as one compact line (the full JSON is in the API)."""
    if not evidence:
        return ""
    text = ", ".join(f"{k}={v}" for k, v in evidence.items())
    return text if len(text) <= limit else text[:limit] + " ..."


def levers_text(levers: dict[str, Any] | None) -> str:
    """A proposal's or an operator's levers, those set (a standing LR of None is no lever)."""
    return ", ".join(f"{k}={v}" for k, v in (levers or {}).items() if v is not None and v is not False)
