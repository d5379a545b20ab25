"""Choosing the restart point: the OPT team's rule, automated.

Hardware failures and hangs: the newest committed, verified checkpoint. Divergence: the newest checkpoint
that (a) was saved at loss scale >= 1.0, (b) precedes the divergence onset, and (c) after which the final
layer's activation norm trended down or stayed flat; if none qualifies, none is chosen and the run escalates.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from service.orchestrator.config import RestartPointConfig
from service.orchestrator.detect import FailureClass


@dataclass(frozen=True)
class CheckpointCandidate:
    id: int
    step: int
    path: str
    usable: bool  # committed or verified in the control plane and intact on disk (marker + manifest)
    loss_scale: float | None
    act_norm: float | None = None
    unusable_reason: str = ""


@dataclass(frozen=True)
class RestartChoice:
    checkpoint: CheckpointCandidate | None
    reason: str
    rejected: tuple[tuple[int, str], ...] = field(default_factory=tuple)  # (step, why) newest first

    @property
    def fresh_start(self) -> bool:
        return self.checkpoint is None


def act_norm_trend(
    norms: Mapping[int, float], *, after_step: int, until_step: int | None, window: int
) -> tuple[float | None, int]:
    """Least-squares slope of the activation norm per step, relative to its mean, over the `window` steps
    after `after_step` (and before `until_step`). Returns (relative slope, points used)."""
    end = after_step + window
    if until_step is not None:
        end = min(end, until_step - 1)
    points = sorted((s, v) for s, v in norms.items() if after_step < s <= end)
    n = len(points)
    if n < 2:
        return None, n
    mean_x = sum(s for s, _ in points) / n
    mean_y = sum(v for _, v in points) / n
    var_x = sum((s - mean_x) ** 2 for s, _ in points)
    if var_x == 0 or mean_y == 0:
        return None, n
    slope = sum((s - mean_x) * (v - mean_y) for s, v in points) / var_x
    return slope / abs(mean_y), n


def pick_restart_checkpoint(
    candidates: Sequence[CheckpointCandidate],
    *,
    failure: FailureClass,
    cfg: RestartPointConfig,
    divergence_onset: int | None = None,
    act_norms: Mapping[int, float] | None = None,
    min_loss_scale: float = 1.0,
) -> RestartChoice:
    """The checkpoint to restart from and the reason in words (it goes to the logbook).

    `checkpoint=None` with a reason starting "no checkpoint" means: start from scratch (nothing saved yet,
    hardware or hang) or escalate (divergence with no qualifying checkpoint; see `escalate`).
    """
    newest_first = sorted(candidates, key=lambda c: c.step, reverse=True)
    rejected: list[tuple[int, str]] = []
    if failure != FailureClass.divergence:
        for c in newest_first:
            if c.usable:
                return RestartChoice(
                    c,
                    f"newest intact checkpoint, step {c.step} ({failure.value} failure: "
                    "nothing to roll back past)",
                    tuple(rejected),
                )
            rejected.append((c.step, c.unusable_reason or "not usable"))
        return RestartChoice(None, "no intact checkpoint yet: starting from scratch", tuple(rejected))

    norms = act_norms or {}
    for c in newest_first:
        if not c.usable:
            rejected.append((c.step, c.unusable_reason or "not usable"))
            continue
        if divergence_onset is not None and c.step >= divergence_onset:
            rejected.append((c.step, f"saved at or after the divergence onset (step {divergence_onset})"))
            continue
        if c.loss_scale is not None and c.loss_scale < min_loss_scale:
            rejected.append((c.step, f"loss scale {c.loss_scale:g} < {min_loss_scale:g} when saved"))
            continue
        until = divergence_onset - cfg.onset_margin_steps if divergence_onset is not None else None
        slope, n = act_norm_trend(
            norms, after_step=c.step, until_step=until, window=cfg.act_norm_trend_window
        )
        if slope is None or n < cfg.min_trend_points:
            rejected.append((c.step, f"activation-norm trend after it unknown ({n} stored points)"))
            continue
        if slope > cfg.act_norm_flat_tolerance:
            rejected.append((c.step, f"activation norm rose after it ({slope:+.4f}/step relative)"))
            continue
        trend = "trended down" if slope < -cfg.act_norm_flat_tolerance else "stayed flat"
        scale = f"loss scale {c.loss_scale:g}" if c.loss_scale is not None else "no loss scaling"
        return RestartChoice(
            c,
            f"step {c.step}: {scale} (>= {min_loss_scale:g}), before the divergence onset at step "
            f"{divergence_onset}, and the final layer's activation norm {trend} after it ({slope:+.4f}/step "
            f"relative over {n} steps)",
            tuple(rejected),
        )
    return RestartChoice(None, "no checkpoint qualifies under the OPT restart rule", tuple(rejected))
