"""Remediation policy: what to change before a relaunch, and when to stop and page a human."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from service.recovery.config import RemediationConfig
from service.recovery.detect import FailureClass


@dataclass(frozen=True)
class FailureRecord:
    """One ended attempt, as the policy sees the run's history."""

    ended_at: float
    failure: FailureClass | None  # None = the attempt ended without failing (operator restart, stop)
    newest_checkpoint_step: int | None  # newest committed checkpoint when it ended


@dataclass(frozen=True)
class Remediation:
    overrides: dict[str, Any] = field(default_factory=dict)
    not_before: float = 0.0  # back-off: do not relaunch before this time
    escalate: str | None = None  # reason to stop retrying and page on-call
    notes: tuple[str, ...] = ()


def backoff_s(consecutive_failures: int, cfg: RemediationConfig) -> float:
    if consecutive_failures <= 0:
        return 0.0
    return min(cfg.backoff_max_s, cfg.backoff_base_s * 2 ** (consecutive_failures - 1))


def no_progress_streak(failures: Sequence[FailureRecord]) -> list[FailureRecord]:
    """The newest failures that all ended with the same newest checkpoint (nothing saved in between),
    oldest first.

    Only the repeats of one cause within it make a crash loop: a deterministic bug, a poisoned batch or a
    bad configuration fails the same way every time. Independent failures that happen to fall within one
    checkpoint interval (a crash, then a GPU fault on another host, then a network hang: the fleet
    simulator drew exactly that at 1,024 hosts) each had their own remedy, so `plan_remediation` counts
    only the failures of the newest one's class; the restart budget still bounds all of them together."""
    if not failures:
        return []
    newest = failures[-1].newest_checkpoint_step
    streak: list[FailureRecord] = []
    for record in reversed(failures):
        if record.newest_checkpoint_step != newest:
            break
        streak.append(record)
    return streak[::-1]


def plan_remediation(
    failure: FailureClass,
    history: Sequence[FailureRecord],
    *,
    lr_scale: float,
    clip: float | None,
    now: float,
    cfg: RemediationConfig,
    max_restarts: int | None = None,
    enforce_budgets: bool = True,
) -> Remediation:
    """Overrides for the next attempt after `failure`, the back-off, or the reason to escalate. Without
    `enforce_budgets` (a human approved a restart past them) the budgets do not escalate.

    `history` holds the run's ended attempts oldest first, including the one that just failed.
    """
    if failure == FailureClass.config:
        return Remediation(escalate="the trainer refused its configuration; restarting cannot fix that")

    failures = [r for r in history if r.failure is not None]
    budget = cfg.max_restarts if max_restarts is None else min(max_restarts, cfg.max_restarts)
    recent = [r for r in failures if now - r.ended_at <= cfg.restart_window_s]
    if enforce_budgets and len(recent) > budget:
        return Remediation(
            escalate=f"restart budget spent: {len(recent)} failures in the last "
            f"{cfg.restart_window_s:.0f} s (budget {budget})"
        )

    if enforce_budgets and (stuck := no_progress_streak(failures)):
        same = [r for r in stuck if r.failure == failure]
        if len(same) > cfg.no_progress_restarts:
            others = sorted({str(r.failure) for r in stuck if r.failure != failure})
            return Remediation(
                escalate=f"no progress: {len(same)} {failure} failures without a newer checkpoint than "
                f"step {stuck[-1].newest_checkpoint_step}"
                + (f" (other failures meanwhile: {', '.join(others)})" if others else "")
            )

    # Back-off grows only over failures that made no progress: an attempt that saved a newer checkpoint
    # than the failure before it was a productive one, so the next relaunch is not delayed further.
    consecutive = 0
    for i in range(len(history) - 1, -1, -1):
        r = history[i]
        if r.failure is None:
            break
        consecutive += 1
        before = history[i - 1] if i > 0 else None
        if before is None or before.failure is None:
            break
        progressed = (r.newest_checkpoint_step or -1) > (before.newest_checkpoint_step or -1)
        if progressed:
            break
    not_before = (history[-1].ended_at if history else now) + backoff_s(consecutive, cfg)

    overrides: dict[str, Any] = {}
    notes: list[str] = []
    if failure == FailureClass.divergence:
        divergences = sum(1 for r in failures if r.failure == FailureClass.divergence)
        new_scale = max(cfg.min_lr_scale, lr_scale * cfg.lr_factor)
        overrides["lr_scale"] = new_scale
        notes.append(
            f"LR scale {lr_scale:g} -> {new_scale:g} (x{cfg.lr_factor:g} per divergence, floor "
            f"{cfg.min_lr_scale:g})"
        )
        if divergences >= cfg.clip_after_divergences and (clip is None or clip > cfg.lowered_clip):
            overrides["clip"] = cfg.lowered_clip
            notes.append(
                f"gradient clipping {clip if clip is not None else 1.0:g} -> {cfg.lowered_clip:g} after "
                f"{divergences} divergences"
            )
        if cfg.reset_loss_scale:
            overrides["reset_loss_scale"] = True
            notes.append("dynamic loss scale reset")
    return Remediation(overrides=overrides, not_before=not_before, notes=tuple(notes))
