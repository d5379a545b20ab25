"""Choosing the restart point: the OPT team's rule, automated.

Hardware failures and hangs: the newest committed, verified checkpoint. Divergence: the newest checkpoint
that (a) was saved at loss scale >= 1.0, (b) holds no update from the divergence on, and (c) after which the
final layer's activation norm "would trend downward instead of growing unboundedly" (OPT, section 2.5).

(c) is not "the norm never rose": a young model's norm grows for thousands of steps, then flattens, and that
is healthy. What the OPT team restarted away from is runaway growth: multiplicative growth faster than the
run's own pace before the checkpoint, or a jump to a multiple of the level at the checkpoint that holds.
`judge_checkpoint` tells the two apart on the run's own curve and is the one rule behind the restart choice,
the catalog's stored health verdicts and `restart-preview`.

The norm is metaseq's (`actv_norm`, the mean per-token L2 norm OPT's logbook reports) wherever every step of
the course has it, else trainops' RMS (`act_norm`) throughout (`samples.act_norms_of`: rows stored before
migration 0009). The rule compares the curve with itself (levels as multiples, growth as rates), so its
thresholds hold in either definition (tests/orchestrator/test_recorded_curves.py).
"""

from __future__ import annotations

import enum
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from service.recovery.config import RestartPointConfig
from service.recovery.detect import FailureClass


class Verdict(enum.StrEnum):
    healthy = "healthy"  # loss scale healthy and the activation norm bounded after it
    unhealthy = "unhealthy"  # loss scale collapsed when saved, or runaway growth after it
    pending = "pending"  # too few stored steps after it to tell yet


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
class CheckpointVerdict:
    verdict: Verdict
    reason: str
    numbers: dict[str, Any] = field(default_factory=dict)  # the evidence: what the catalog stores

    @property
    def healthy(self) -> bool:
        return self.verdict == Verdict.healthy


@dataclass(frozen=True)
class RestartChoice:
    checkpoint: CheckpointCandidate | None
    reason: str
    rejected: tuple[tuple[int, str], ...] = field(default_factory=tuple)  # (step, why) newest first

    @property
    def fresh_start(self) -> bool:
        return self.checkpoint is None


def rule_for_run(cfg: RestartPointConfig, *, checkpoint_interval: int | None) -> RestartPointConfig:
    """The restart rule for one run: the course after a checkpoint spans at least the run's checkpoint
    interval (the stretch until the next checkpoint could take over), never less than the configured window.

    A run that saves every 1,000 steps is judged on 1,000 steps of course, and the pace that counts as
    multiplicative growth (x3 within the window) scales with it: +0.11 %/step rather than the +5.5 %/step a
    20-step window allows, so a slow runaway over hundreds of steps is not called bounded."""
    if not checkpoint_interval or checkpoint_interval <= cfg.act_norm_trend_window:
        return cfg
    return cfg.model_copy(update={"act_norm_trend_window": int(checkpoint_interval)})


def log_growth_rate(points: Sequence[tuple[int, float]]) -> float | None:
    """Least-squares slope of ln(norm) per step: the norm's multiplicative growth rate (0 = flat,
    0.05 = +5 %/step). None with fewer than two positive points or a single step."""
    pts = [(s, math.log(v)) for s, v in points if v > 0 and math.isfinite(v)]
    n = len(pts)
    if n < 2:
        return None
    mean_x = sum(s for s, _ in pts) / n
    mean_y = sum(y for _, y in pts) / n
    var_x = sum((s - mean_x) ** 2 for s, _ in pts)
    if var_x == 0:
        return None
    return sum((s - mean_x) * (y - mean_y) for s, y in pts) / var_x


def act_norm_trend(
    norms: Mapping[int, float], *, after_step: int, until_step: int | None, window: int
) -> tuple[float | None, int]:
    """The activation norm's growth rate per step (slope of its logarithm) over the `window` steps after
    `after_step`, up to and including `until_step`. Returns (rate, points used)."""
    points = _after(norms, after_step=after_step, until_step=until_step, window=window)
    return log_growth_rate(points), len(points)


def _after(
    norms: Mapping[int, float], *, after_step: int, until_step: int | None, window: int
) -> list[tuple[int, float]]:
    end = after_step + window
    if until_step is not None:
        end = min(end, until_step)
    return sorted((s, v) for s, v in norms.items() if after_step < s <= end and math.isfinite(v))


def judge_checkpoint(
    *,
    step: int,
    loss_scale: float | None,
    norms: Mapping[int, float],
    cfg: RestartPointConfig,
    min_loss_scale: float = 1.0,
    runaway_multiple: float = 3.0,
    until_step: int | None = None,
    losses: Mapping[int, float] | None = None,
) -> CheckpointVerdict:
    """OPT's restart rule for one checkpoint, on the activation norms (step -> norm) of the steps that
    descend from it (and the `window` steps before it, the run's own pace).

    `until_step` ends the course early (a divergence onset less its margin). `runaway_multiple` is the
    divergence detector's own activation-norm multiple, so the restart rule and the detector agree on
    what runaway growth is:
    - level: the norm at the end of the course (median of its last 3 steps) above `runaway_multiple`
      times its level at the checkpoint is a jump that holds;
    - pace: a growth rate that would multiply the norm by more than `runaway_multiple` within the trend
      window is multiplicative growth;
    each unless the run grew at least as fast in the window before the checkpoint (a young model's growth,
    slowing down, is bounded: it is what the run has always done).
    """
    window = cfg.act_norm_trend_window
    numbers: dict[str, Any] = {"step": step, "loss_scale": loss_scale}
    if loss_scale is not None and loss_scale < min_loss_scale:
        return CheckpointVerdict(
            Verdict.unhealthy, f"loss scale {loss_scale:g} < {min_loss_scale:g} when saved", numbers
        )
    course = _after(norms, after_step=step, until_step=until_step, window=window)
    numbers["points_after"] = len(course)
    if losses:
        after_losses = [losses[s] for s, _ in course if s in losses and math.isfinite(losses[s])]
        if after_losses:
            numbers["loss_after"] = {"first": after_losses[0], "last": after_losses[-1]}
    if len(course) < cfg.min_trend_points:
        return CheckpointVerdict(
            Verdict.pending,
            f"activation-norm course after it unknown yet ({len(course)} / {cfg.min_trend_points} stored "
            "steps)",
            numbers,
        )
    # the run's pace just before the checkpoint: its recent half window, the current growth rate rather
    # than the fast growth of its first steps
    pace_window = max(cfg.min_trend_points, window // 2)
    before = sorted((s, v) for s, v in norms.items() if step - pace_window < s <= step and math.isfinite(v))
    reference = _level_at(before, course)
    rate = log_growth_rate(course)
    prior_rate = log_growth_rate(before) if len(before) >= cfg.min_trend_points else None
    end_level = statistics.median(v for _, v in course[-3:])
    span = course[-1][0] - step
    growth = end_level / reference if reference > 0 else math.inf
    numbers.update(
        {
            "act_norm_at_save": reference,
            "act_norm_end": end_level,
            "growth": round(growth, 4),
            "rate_per_step": None if rate is None else round(rate, 6),
            "prior_rate_per_step": None if prior_rate is None else round(prior_rate, 6),
            "steps": span,
        }
    )
    if rate is None:
        return CheckpointVerdict(Verdict.pending, "activation-norm course after it not measurable", numbers)
    own_pace = max(prior_rate or 0.0, 0.0)
    allowed_level = max(runaway_multiple, math.exp(own_pace * span))
    allowed_rate = max(math.log(runaway_multiple) / window, own_pace)
    if growth > allowed_level:
        return CheckpointVerdict(
            Verdict.unhealthy,
            f"activation norm ran away after it: x{growth:.3g} in {span} steps ({reference:.4g} -> "
            f"{end_level:.4g}), above the x{allowed_level:.3g} the run's own pace allows",
            numbers,
        )
    if rate > allowed_rate:
        return CheckpointVerdict(
            Verdict.unhealthy,
            f"activation norm grew multiplicatively after it: {rate:+.2%}/step "
            f"(x{math.exp(rate * window):.3g} per {window} steps; the run's pace before it: "
            f"{own_pace:+.2%}/step)",
            numbers,
        )
    if rate < -cfg.act_norm_flat_tolerance:
        course_words = "trended down"
    elif rate <= cfg.act_norm_flat_tolerance or growth <= 1.0:
        course_words = "stayed flat"
    else:
        course_words = f"grew boundedly (x{growth:.3g} in {span} steps, within the run's pace)"
    numbers["course"] = course_words
    scale = f"loss scale {loss_scale:g}" if loss_scale is not None else "no loss scaling"
    return CheckpointVerdict(
        Verdict.healthy,
        f"{scale} (>= {min_loss_scale:g}) and the final layer's activation norm {course_words} after it "
        f"({rate:+.2%}/step over {len(course)} steps)",
        numbers,
    )


def _level_at(before: Sequence[tuple[int, float]], course: Sequence[tuple[int, float]]) -> float:
    """The norm's level at the checkpoint: the median of the last 3 steps up to it, else the first after."""
    if before:
        return statistics.median(v for _, v in before[-3:])
    return course[0][1]


def divergence_cutoff(onset: int) -> int:
    """The newest step a checkpoint may hold when a divergence was first seen at `onset`: the update of step
    onset - 1 produced the first bad reading, so a checkpoint of that step already carries it."""
    return onset - 2


def pick_restart_checkpoint(
    candidates: Sequence[CheckpointCandidate],
    *,
    failure: FailureClass,
    cfg: RestartPointConfig,
    divergence_onset: int | None = None,
    act_norms: Mapping[int, float] | None = None,
    min_loss_scale: float = 1.0,
    runaway_multiple: float = 3.0,
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
    until = divergence_onset - cfg.onset_margin_steps if divergence_onset is not None else None
    for c in newest_first:
        if not c.usable:
            rejected.append((c.step, c.unusable_reason or "not usable"))
            continue
        if divergence_onset is not None and c.step > divergence_cutoff(divergence_onset):
            rejected.append(
                (
                    c.step,
                    f"saved after the divergence began (first bad reading at step {divergence_onset}, "
                    f"so step {divergence_onset - 1}'s update was already bad)",
                )
            )
            continue
        verdict = judge_checkpoint(
            step=c.step,
            loss_scale=c.loss_scale,
            norms=norms,
            cfg=cfg,
            min_loss_scale=min_loss_scale,
            runaway_multiple=runaway_multiple,
            until_step=until,
        )
        if not verdict.healthy:
            rejected.append((c.step, verdict.reason))
            continue
        onset = f"before the divergence onset at step {divergence_onset}" if divergence_onset else "healthy"
        return RestartChoice(c, f"step {c.step}: {onset}: {verdict.reason}", tuple(rejected))
    return RestartChoice(None, "no checkpoint qualifies under the OPT restart rule", tuple(rejected))
