"""Checkpoint health, maintained continuously, and the pin of the newest healthy checkpoint.

Every reconcile pass (`Orchestrator._refresh_verdicts`) judges the run's checkpoints that are on disk and
whose verdict can still change, with OPT's rule (`restart_point.judge_checkpoint`), on the steps that
descend from each one:

- after it: the attempt that saved it (its steps after the checkpoint), every attempt restored from it
  (`Attempt.restored_from_checkpoint_id`, numbered after the attempt that saved this file), and,
  recursively, the attempts restored from the checkpoints those attempts saved later. Another attempt's
  re-computation of the same steps after a rollback to an older checkpoint is not its course.
- before it (the run's own pace): the attempt that saved it back to its restore point, then the attempt that
  saved the checkpoint it was restored from, and so on, `act_norm_trend_window` steps back.

A descendant attempt that ended in a divergence ends the course `onset_margin_steps` before the onset, and a
checkpoint saved after the divergence began (`restart_point.divergence_cutoff`) is unhealthy: the same
rule the restart choice applies. A verdict is final once decided without a course (loss scale, onset), on a
full trend window, or by an operator's mark; until then each pass may change it as steps arrive.

The newest healthy checkpoint intact on disk is pinned: the PINNED marker (the trainer's retention keeps
it; the trainer cannot ask the database, the marker is the contract) and `pinned` in the catalog, with
`pinned_by = AUTO_PIN_AUTHOR`. When a newer one proves healthy the pin moves: the new one is pinned first,
then the previous automatic pin is removed. An operator's pin is never undone, and a checkpoint an operator
unpinned is not pinned again. Each verdict change and each pin move writes one logbook entry.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from service.config import Settings
from service.crud.checkpoints import AUTO_PIN_AUTHOR, mark_vanished_checkpoints
from service.crud.logbook import jsonable, write_log
from service.models import Attempt, Checkpoint, Metric, Run, utcnow
from service.recovery.config import OrchestratorConfig, divergence_for_run, load_orchestrator_config
from service.recovery.detect import FailureClass
from service.recovery.restart_point import (
    CheckpointVerdict,
    Verdict,
    divergence_cutoff,
    judge_checkpoint,
    rule_for_run,
)
from service.recovery.samples import act_norms_of
from service.statemachine import CheckpointState, LogKind, Severity
from trainer.checkpoint import is_pinned, pin_checkpoint, unpin_checkpoint, verify_checkpoint

MAX_JUDGED_PER_PASS = 16  # checkpoints judged per run and pass: one run's verdicts never hold the loop long
JUDGED_STATES = (CheckpointState.committed, CheckpointState.verified)


@dataclass(frozen=True)
class AttemptLink:
    number: int
    start_step: int
    restored_from_checkpoint_id: int | None
    divergence_onset: int | None  # the onset step, when the attempt ended in a divergence


@dataclass(frozen=True)
class CheckpointLink:
    id: int
    attempt: int | None  # the attempt that saved the file now at its path
    step: int


@dataclass(frozen=True)
class Segment:
    """Steps `after_step < step <= until_step` (None: no end) of one attempt."""

    attempt: int
    after_step: int
    until_step: int | None = None

    def holds(self, step: int) -> bool:
        return step > self.after_step and (self.until_step is None or step <= self.until_step)


@dataclass(frozen=True)
class RunLineage:
    """Which attempt computed which steps from which checkpoint: enough to tell a checkpoint's course."""

    attempts: Mapping[int, AttemptLink]
    checkpoints: Mapping[int, CheckpointLink]

    def descendants(self, ckpt: CheckpointLink) -> list[Segment]:
        """The segments of steps that descend from `ckpt` (after it)."""
        if ckpt.attempt is None:
            return []
        found: dict[int, int] = {ckpt.attempt: ckpt.step}
        frontier = [ckpt.attempt]
        while frontier:
            number = frontier.pop()
            after = found[number]
            for saved in self.checkpoints.values():
                if saved.attempt != number or saved.step < after:
                    continue
                for a in self.attempts.values():
                    # restored from this file: started after the attempt that wrote it
                    if (
                        a.restored_from_checkpoint_id == saved.id
                        and a.number > number
                        and a.number not in found
                    ):
                        found[a.number] = saved.step
                        frontier.append(a.number)
        return [Segment(n, s) for n, s in sorted(found.items())]

    def ancestors(self, ckpt: CheckpointLink, *, steps: int) -> list[Segment]:
        """The segments of the `steps` steps up to and including `ckpt`, back along its lineage."""
        out: list[Segment] = []
        number, until = ckpt.attempt, ckpt.step
        floor = ckpt.step - steps
        while number is not None and until > floor:
            link = self.attempts.get(number)
            start = link.start_step if link is not None else floor
            out.append(Segment(number, max(start, floor), until))
            if link is None or link.restored_from_checkpoint_id is None or start <= floor:
                break
            parent = self.checkpoints.get(link.restored_from_checkpoint_id)
            if parent is None or parent.attempt is None or parent.attempt >= number:
                break  # the file it restored was replaced since: that lineage is gone
            number, until = parent.attempt, parent.step
        return out

    def divergence_onsets(self, segments: Sequence[Segment]) -> list[int]:
        """Divergence onsets of the attempts in `segments` that fall in their segment."""
        onsets = []
        for seg in segments:
            link = self.attempts.get(seg.attempt)
            if (
                link is not None
                and link.divergence_onset is not None
                and link.divergence_onset > seg.after_step
            ):
                onsets.append(link.divergence_onset)
        return sorted(onsets)


@dataclass(frozen=True)
class Course:
    """A checkpoint's steps: activation norms and losses, one value per step (the newest attempt's)."""

    norms: dict[int, float] = field(default_factory=dict)
    losses: dict[int, float] = field(default_factory=dict)


def load_lineage(session: Session, *, run_id: int) -> RunLineage:
    attempts = {
        a.number: AttemptLink(
            number=a.number,
            start_step=a.start_step,
            restored_from_checkpoint_id=a.restored_from_checkpoint_id,
            divergence_onset=_int_or_none((a.findings or {}).get("onset_step"))
            if a.exit_reason == FailureClass.divergence.value
            else None,
        )
        for a in session.scalars(sa.select(Attempt).where(Attempt.run_id == run_id))
    }
    checkpoints = {
        r.id: CheckpointLink(id=r.id, attempt=r.attempt, step=r.step)
        for r in session.execute(
            sa.select(Checkpoint.id, Checkpoint.attempt, Checkpoint.step).where(Checkpoint.run_id == run_id)
        )
    }
    return RunLineage(attempts=attempts, checkpoints=checkpoints)


def checkpoint_course(
    session: Session, *, run_id: int, lineage: RunLineage, ckpt: CheckpointLink, window: int
) -> tuple[Course, list[Segment]]:
    """The activation norms and losses of the `window` steps before and after `ckpt` along its lineage
    (one query), and the segments after it."""
    after = lineage.descendants(ckpt)
    before = lineage.ancestors(ckpt, steps=window)
    segments = [
        *before,
        *(Segment(s.attempt, max(s.after_step, ckpt.step), ckpt.step + window) for s in after),
    ]
    if not segments:
        return Course(), after
    rows = session.execute(
        sa.select(Metric.attempt, Metric.step, Metric.act_norm, Metric.actv_norm, Metric.loss)
        .where(
            Metric.run_id == run_id,
            Metric.step > ckpt.step - window,
            Metric.step <= ckpt.step + window,
            Metric.attempt.in_(sorted({s.attempt for s in segments})),
        )
        .order_by(Metric.step, Metric.attempt)
    ).all()
    measured: dict[int, Any] = {}
    losses: dict[int, float] = {}
    for r in rows:  # ascending attempt per step: the newest attempt's value is kept
        if not any(s.attempt == r.attempt and s.holds(r.step) for s in segments):
            continue
        if r.act_norm is not None or r.actv_norm is not None:
            measured[r.step] = r
        if r.loss is not None and math.isfinite(r.loss):
            losses[r.step] = r.loss
    # one definition over the whole course: metaseq's mean where every step has it, else the RMS
    return Course(norms=act_norms_of(measured), losses=losses), after


def judge_catalogued(
    session: Session, *, run_id: int, lineage: RunLineage, row: Checkpoint, cfg: OrchestratorConfig
) -> tuple[CheckpointVerdict, bool]:
    """OPT's rule on one catalogued checkpoint's own course: (verdict, final)."""
    link = lineage.checkpoints.get(row.id) or CheckpointLink(id=row.id, attempt=row.attempt, step=row.step)
    run = session.get(Run, run_id)
    rule = rule_for_run(
        cfg.restart_point,
        checkpoint_interval=int(((run.config if run else None) or {}).get("checkpoint_interval") or 0),
    )
    window = rule.act_norm_trend_window
    course, after = checkpoint_course(session, run_id=run_id, lineage=lineage, ckpt=link, window=window)
    onsets = lineage.divergence_onsets(after)
    onset = onsets[0] if onsets else None
    if onset is not None and row.step > divergence_cutoff(onset):
        return (
            CheckpointVerdict(
                Verdict.unhealthy,
                f"saved after the divergence began (first bad reading at step {onset}, so step {onset - 1}'s "
                "update was already bad)",
                {"step": row.step, "loss_scale": row.loss_scale, "divergence_onset": onset},
            ),
            True,
        )
    until = onset - rule.onset_margin_steps if onset is not None else None
    verdict = judge_checkpoint(
        step=row.step,
        loss_scale=row.loss_scale,
        norms=course.norms,
        cfg=rule,
        min_loss_scale=divergence_for_run(
            cfg.divergence, run_config=run.config if run else None
        ).min_loss_scale,
        runaway_multiple=cfg.divergence.act_norm_multiple,
        until_step=until,
        losses=course.losses,
    )
    if onset is not None:
        verdict = CheckpointVerdict(
            verdict.verdict, verdict.reason, {**verdict.numbers, "divergence_onset": onset}
        )
    points = verdict.numbers.get("points_after")
    final = verdict.verdict != Verdict.pending and (points is None or points >= window or onset is not None)
    return verdict, final


@dataclass
class VerdictPass:
    """What one pass over a run's checkpoints did (for tests and the loop's debug log)."""

    judged: int = 0
    changed: list[tuple[int, str, str]] = field(default_factory=list)  # (step, before, after)
    pinned: int | None = None  # step newly pinned
    unpinned: list[int] = field(default_factory=list)
    deleted: list[int] = field(default_factory=list)  # steps found gone from disk and marked deleted


def refresh_checkpoint_verdicts(
    session: Session,
    *,
    run_id: int,
    checkpoint_dir: Path,
    cfg: OrchestratorConfig,
    author: str = AUTO_PIN_AUTHOR,
) -> VerdictPass:
    """Judge the run's checkpoints on disk whose verdict can still change, store the verdicts, and move the
    automatic pin to the newest healthy one. Cheap when nothing changed: one query for the candidates and
    one per undecided checkpoint on disk (retention keeps few). Checkpoints gone from disk are marked
    deleted first, so the catalog never offers one that no longer exists."""
    done = VerdictPass()
    gone = mark_vanished_checkpoints(session, run_id=run_id, checkpoint_dir=checkpoint_dir, author=author)
    done.deleted = sorted(c.step for c in gone)
    rows = list(
        session.scalars(
            sa.select(Checkpoint)
            .where(Checkpoint.run_id == run_id, Checkpoint.state.in_(JUDGED_STATES))
            .order_by(Checkpoint.step.desc())
        )
    )
    open_rows = [r for r in rows if not r.verdict_final and _on_disk(r, checkpoint_dir)][:MAX_JUDGED_PER_PASS]
    lineage = load_lineage(session, run_id=run_id) if open_rows else None
    for row in open_rows:
        assert lineage is not None
        verdict, final = judge_catalogued(session, run_id=run_id, lineage=lineage, row=row, cfg=cfg)
        done.judged += 1
        before = row.verdict
        numbers = jsonable(verdict.numbers)
        if before == verdict.verdict.value and row.verdict_numbers == numbers and row.verdict_final == final:
            continue
        row.verdict = verdict.verdict.value
        row.verdict_numbers = numbers
        row.verdict_final = final
        row.verdict_at = utcnow()
        row.healthy = None if verdict.verdict == Verdict.pending else verdict.healthy
        row.healthy_reason = verdict.reason
        if before != row.verdict:
            done.changed.append((row.step, before, row.verdict))
            write_log(
                session,
                kind=LogKind.diagnosis,
                author=author,
                run_id=run_id,
                severity=Severity.warning if verdict.verdict == Verdict.unhealthy else Severity.info,
                message=f"checkpoint step {row.step}: {before} -> {row.verdict}: {verdict.reason}",
                evidence={"checkpoint_id": row.id, "path": row.path, "final": final, **numbers},
            )
    _move_automatic_pin(
        session, run_id=run_id, rows=rows, checkpoint_dir=checkpoint_dir, author=author, done=done
    )
    return done


def _move_automatic_pin(
    session: Session,
    *,
    run_id: int,
    rows: Sequence[Checkpoint],
    checkpoint_dir: Path,
    author: str,
    done: VerdictPass,
) -> None:
    newest = next(
        (
            r
            for r in rows  # newest first
            if r.verdict == Verdict.healthy.value
            and _on_disk(r, checkpoint_dir)
            and verify_checkpoint(r.path, deep=False)[0]
        ),
        None,
    )
    restored = []
    for r in rows:  # the catalog says pinned: the marker must be there (an API pin whose commit came late)
        if r.pinned and _on_disk(r, checkpoint_dir) and not is_pinned(r.path) and pin_checkpoint(r.path):
            restored.append(r.step)
    if restored:
        write_log(
            session,
            kind=LogKind.action,
            author=author,
            run_id=run_id,
            message=f"rewrote the PINNED marker of checkpoint step(s) {', '.join(map(str, restored))}: the "
            "catalog holds them pinned",
            evidence={"steps": restored},
        )
    if newest is None:
        return
    if not newest.pinned and newest.pinned_by in (None, AUTO_PIN_AUTHOR):
        if not pin_checkpoint(newest.path):
            return  # its directory went away (retention, a re-save) since it was checked: next pass
        newest.pinned, newest.pinned_by = True, AUTO_PIN_AUTHOR
        done.pinned = newest.step
    if not newest.pinned:
        return  # an operator unpinned it: the previous automatic pin stays where it is
    previous = session.scalars(
        sa.select(Checkpoint).where(
            Checkpoint.run_id == run_id,
            Checkpoint.id != newest.id,
            Checkpoint.pinned.is_(True),
            Checkpoint.pinned_by == AUTO_PIN_AUTHOR,
        )
    )
    for r in previous:
        if _in_dir(r, checkpoint_dir):
            unpin_checkpoint(r.path)
        r.pinned = False
        done.unpinned.append(r.step)
    if done.pinned is None and not done.unpinned:
        return
    message = (
        f"pinned checkpoint step {newest.step}, the newest healthy one ({newest.healthy_reason})"
        if done.pinned is not None
        else f"checkpoint step {newest.step} stays pinned"
    )
    if done.unpinned:
        message += f"; unpinned step(s) {', '.join(map(str, done.unpinned))} (the previous automatic pin)"
    write_log(
        session,
        kind=LogKind.action,
        author=author,
        run_id=run_id,
        message=message,
        evidence={
            "pinned": {"checkpoint_id": newest.id, "step": newest.step, "path": newest.path},
            "unpinned_steps": done.unpinned,
            "verdict": newest.verdict_numbers or {},
        },
    )


def _in_dir(row: Checkpoint, checkpoint_dir: Path) -> bool:
    """The catalog's path lies in the run's checkpoint directory (where the orchestrator may write)."""
    path = Path(row.path).resolve()
    return path.parent == checkpoint_dir.resolve() and path.name.startswith("step_")


def _on_disk(row: Checkpoint, checkpoint_dir: Path) -> bool:
    return _in_dir(row, checkpoint_dir) and Path(row.path).is_dir()


def _int_or_none(value: Any) -> int | None:
    return int(value) if isinstance(value, int | float) and math.isfinite(value) else None


def runs_dir_of(settings: Settings) -> Path:
    """The directory of the runs' files (`<runs_dir>/<run name>/checkpoints/...`), as the orchestrator sees
    it: the API writes pin markers there."""
    return Path(load_orchestrator_config(settings).runs_dir).resolve()
