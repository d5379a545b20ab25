"""Failure detection as pure functions of observations: exits, hangs, divergence.

Each returns a finding with the evidence that goes to the logbook, or None.
"""

from __future__ import annotations

import bisect
import enum
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from service.recovery.config import DivergenceConfig
from trainer.contract import (
    ACT_NORM_MEAN_L2,
    ACT_NORM_RMS,
    EXIT_CHECKPOINT_CORRUPT,
    EXIT_CONFIG,
    EXIT_DIVERGED,
    EXIT_LOSS_SCALE_FLOOR,
    EXIT_OK,
)

# re-exported: the exit codes are the contract's
__all__ = ["EXIT_CHECKPOINT_CORRUPT", "EXIT_CONFIG", "EXIT_DIVERGED", "EXIT_LOSS_SCALE_FLOOR", "EXIT_OK"]


class FailureClass(enum.StrEnum):
    crash = "crash"  # a rank or torchrun exited with an error
    signal = "signal"  # killed by a signal (OOM killer, SIGKILL, node reboot)
    config = "config"  # the trainer refused its configuration: permanent, restarting cannot help
    hang = "hang"  # no step progress
    hardware = "hardware"  # a host in use became suspect, cordoned or unreachable
    divergence = "divergence"  # non-finite loss, loss spike, loss scale collapse, activation norm runaway
    lost = "lost"  # the attempt's process vanished without an exit status


TRANSIENT = frozenset(
    {
        FailureClass.crash,
        FailureClass.signal,
        FailureClass.hang,
        FailureClass.hardware,
        FailureClass.divergence,
        FailureClass.lost,
    }
)


@dataclass(frozen=True)
class ExitFinding:
    outcome: str  # "completed" or a FailureClass value
    code: int
    detail: str


def classify_exit(code: int) -> ExitFinding:
    """Tell success, divergence, a bad configuration, a signal and an error apart by exit status.

    Codes follow trainer.launch: 0, 2 (config), 3 (the restore point failed the ranks' verification at
    load: a crash whose restart skips that checkpoint, `Applier.end_attempt` marks it corrupt), 42
    (diverged), 43 (fp16: the dynamic loss scale reached its floor, where metaseq stopped OPT's training: a
    divergence too), 128+N (signal N, as a shell reports it) or negative -N (Python's Popen for a direct child
    killed by N).
    """
    if code == EXIT_OK:
        return ExitFinding("completed", code, "exited 0")
    if code == EXIT_DIVERGED:
        return ExitFinding(
            FailureClass.divergence, code, "the trainer stopped on a non-finite loss (exit 42)"
        )
    if code == EXIT_LOSS_SCALE_FLOOR:
        return ExitFinding(
            FailureClass.divergence,
            code,
            "the trainer stopped: the fp16 loss scale reached its floor (exit 43; OPT's divergence signal)",
        )
    if code == EXIT_CONFIG:
        return ExitFinding(FailureClass.config, code, "the trainer refused its configuration (exit 2)")
    if code == EXIT_CHECKPOINT_CORRUPT:
        return ExitFinding(
            FailureClass.crash,
            code,
            "the ranks' re-hash of the restore point at load found bytes that do not match its manifest "
            "(exit 3)",
        )
    if code < 0 or code > 128:
        signum = -code if code < 0 else code - 128
        return ExitFinding(FailureClass.signal, code, f"killed by signal {signum}")
    return ExitFinding(FailureClass.crash, code, f"exited with error code {code}")


# ---- hangs -----------------------------------------------------------------------------------------


class Section(enum.StrEnum):
    """Where a rank is, as its heartbeat says (docs/reporting-contract.md); each has its own hang limit."""

    startup = "startup"  # process start, model build, checkpoint load, until its first step is done
    step = "step"  # training steps
    checkpoint_save = "checkpoint_save"  # inside a checkpoint save (synchronous saves block the loop)
    validation = "validation"  # inside a validation pass


HANG_EVIDENCE_BEATS = 64  # beats a hang's logbook evidence lists, the stalest first
HANG_DETAIL_RANKS = 16  # stale ranks a hang's one-line detail names


@dataclass(frozen=True)
class RankBeat:
    rank: int
    host: str
    step: int
    time: float  # when the rank last beat: finished a step or entered a section (Unix seconds)
    step_time_s: float | None = None  # trailing mean of its own busy time per step (straggler probe)
    section: Section = Section.step
    last_step_s: float | None = None  # wall time of its last step
    busy: tuple[tuple[int, float], ...] = ()  # (step, own busy time) of its recent steps, oldest first
    # When the control plane last received this beat (its clock): ranks re-send their newest beat every
    # HEARTBEAT_SEND_INTERVAL_S, so this stays fresh while the rank's process and its path are alive.
    received_at: float | None = None


@dataclass(frozen=True)
class HangLimits:
    """How long a rank may go without a beat in each section, and how each limit was computed."""

    step_s: float
    startup_s: float
    checkpoint_save_s: float
    validation_s: float
    basis: Mapping[str, str] = field(default_factory=dict)  # section -> the computation, in words
    delivery_lag_s: float = 0.0  # included in every limit above: how late a beat may reach the control plane

    def for_section(self, section: Section) -> float:
        return {
            Section.step: self.step_s,
            Section.startup: self.startup_s,
            Section.checkpoint_save: self.checkpoint_save_s,
            Section.validation: self.validation_s,
        }[section]

    def evidence(self) -> dict[str, Any]:
        return {
            s.value: {"limit_s": round(self.for_section(s), 3), "computed": self.basis.get(s.value, "")}
            for s in Section
        }


def quantile(values: Sequence[float], q: float) -> float:
    """Nearest-rank quantile (q in (0, 1]) of a non-empty sample: a value that was observed."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def hang_limits(
    step_times: Sequence[float],
    *,
    floor_s: float,
    multiple: float,
    q: float,
    startup_s: float,
    checkpoint_save_s: float,
    validation_s: float,
    delivery_lag_s: float = 0.0,
) -> HangLimits:
    """The run's hang limits from its own step times: step = max(floor, multiple x q-quantile of the
    recent step times); start-up, checkpoint save and validation have their own limits, never below the
    step limit (a rank whose steps take 70 s is not hung 60 s into a save). Every limit then grows by
    `delivery_lag_s`, how late a beat may reach the control plane (its host's send interval): a beat is
    judged by the time its loop recorded it, and on a big fleet hosts send every 20 s."""
    times = [t for t in step_times if math.isfinite(t) and t > 0]
    if times:
        typical = quantile(times, q)
        step = max(floor_s, multiple * typical)
        step_basis = (
            f"max(floor {floor_s:g} s, {multiple:g} x p{q * 100:g} {typical:.3g} s of the {len(times)} "
            f"newest step times) = {step:.3g} s"
        )
    else:
        step = floor_s
        step_basis = f"floor {floor_s:g} s (no step times reported yet)"

    def section(name: str, own: float) -> tuple[float, str]:
        limit = max(own, step)
        return limit, f"max({name} limit {own:g} s, step limit {step:.3g} s) = {limit:.3g} s"

    startup, startup_basis = section("start-up", startup_s)
    save, save_basis = section("checkpoint-save", checkpoint_save_s)
    validation, validation_basis = section("validation", validation_s)
    if delivery_lag_s > 0:
        lag = f" + {delivery_lag_s:.3g} s heartbeat interval"
        step, step_basis = step + delivery_lag_s, step_basis + lag
        startup, startup_basis = startup + delivery_lag_s, startup_basis + lag
        save, save_basis = save + delivery_lag_s, save_basis + lag
        validation, validation_basis = validation + delivery_lag_s, validation_basis + lag
    return HangLimits(
        step_s=step,
        startup_s=startup,
        checkpoint_save_s=save,
        validation_s=validation,
        delivery_lag_s=max(delivery_lag_s, 0.0),
        basis={
            Section.step.value: step_basis,
            Section.startup.value: startup_basis,
            Section.checkpoint_save.value: save_basis,
            Section.validation.value: validation_basis,
        },
    )


@dataclass(frozen=True)
class HangFinding:
    stale_ranks: tuple[int, ...]
    behind_hosts: tuple[str, ...]  # hosts of the ranks furthest behind (the likely culprits)
    last_step: int | None
    stale_for_s: float
    detail: str
    evidence: dict[str, Any] = field(default_factory=dict)


def detect_hang(
    beats: Sequence[RankBeat],
    *,
    world_size: int,
    now: float,
    attempt_started_at: float,
    limits: HangLimits,
    quiet_after_s: float | None = None,
) -> HangFinding | None:
    """A rank without a beat for longer than its section's limit (or no first step within the start-up
    limit). The limits and how they were computed go into the evidence.

    With `quiet_after_s`, stale ranks are not judged while no beat of the attempt has been received for
    that long: the ranks re-send their newest beat every few seconds, so silence from all of them means the
    control plane or their way to it is down, not that their loops stopped (docs/reporting-contract.md,
    "Heartbeats"). The verdict comes once beats arrive again."""
    if not beats:
        waited = now - attempt_started_at
        if waited > limits.startup_s:
            return HangFinding(
                (),
                (),
                None,
                waited,
                f"no rank reached its first step in {waited:.0f} s (start-up limit {limits.startup_s:.0f} s)",
                {"world_size": world_size, "waited_s": round(waited, 1), "limits": limits.evidence()},
            )
        return None
    missing = world_size - len(beats)
    stale = [b for b in beats if now - b.time > limits.for_section(b.section)]
    if missing > 0 and now - attempt_started_at > limits.startup_s:
        stale_for = now - attempt_started_at
        where = f"{missing} rank(s) never beat; start-up limit {limits.startup_s:.3g} s"
    elif stale:
        worst = max(stale, key=lambda b: now - b.time)
        stale_for = now - worst.time
        sections = sorted({b.section.value for b in stale})
        named = [b.rank for b in sorted(stale, key=lambda b: b.rank)[:HANG_DETAIL_RANKS]]
        more = f" and {len(stale) - len(named)} more" if len(stale) > len(named) else ""
        where = (
            f"ranks {named}{more} in {', '.join(sections)}; "
            f"{worst.section.value} limit {limits.for_section(worst.section):.3g} s"
        )
    else:
        return None
    heard = [b.received_at for b in beats if b.received_at is not None]
    last_heard_s = now - max(heard) if heard else None
    if quiet_after_s is not None and last_heard_s is not None and last_heard_s > quiet_after_s:
        return None
    lowest = min(b.step for b in beats)
    behind = sorted({b.host for b in beats if b.step == lowest}) if len({b.step for b in beats}) > 1 else []
    return HangFinding(
        stale_ranks=tuple(sorted(b.rank for b in stale)),
        behind_hosts=tuple(behind),
        last_step=max(b.step for b in beats),
        stale_for_s=stale_for,
        detail=f"no progress for {stale_for:.1f} s ({where}; last step {max(b.step for b in beats)})",
        evidence={
            # the stalest first, bounded: a 1,024-host run's every beat would make one logbook entry ~1 MB
            "beats": [
                {
                    "rank": b.rank,
                    "host": b.host,
                    "step": b.step,
                    "section": b.section.value,
                    "age_s": round(now - b.time, 1),
                    "limit_s": round(limits.for_section(b.section), 3),
                }
                for b in sorted(beats, key=lambda b: (b.time, b.rank))[:HANG_EVIDENCE_BEATS]
            ],
            "ranks_beating": len(beats),
            "ranks_stale": len(stale),
            "hang_timeout_s": round(limits.step_s, 3),
            "heartbeat_interval_s": round(limits.delivery_lag_s, 3),
            "limits": limits.evidence(),
            "missing_ranks": max(missing, 0),
            "last_heard_s": round(last_heard_s, 1) if last_heard_s is not None else None,
        },
    )


# ---- stragglers ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StragglerObservation:
    step: int
    step_time_s: float  # the straggler's own busy time in that step
    others_median_s: float  # the median of the other ranks' in the same step

    @property
    def ratio(self) -> float:
        return self.step_time_s / self.others_median_s


@dataclass(frozen=True)
class StragglerFinding:
    rank: int
    host: str
    step_time_s: float  # median of its observations
    others_median_s: float  # median of the others' medians over the same steps
    observations: tuple[StragglerObservation, ...] = ()


def median_without(ordered: Sequence[float], value: float) -> float:
    """`statistics.median` of `ordered` (sorted, 2 values or more) without one occurrence of `value`."""
    skip = bisect.bisect_left(ordered, value)
    count = len(ordered) - 1

    def nth(k: int) -> float:
        return ordered[k] if k < skip else ordered[k + 1]

    if count % 2:
        return nth(count // 2)
    return (nth(count // 2 - 1) + nth(count // 2)) / 2


def detect_straggler(
    beats: Sequence[RankBeat], *, ratio: float, confirm_steps: int
) -> StragglerFinding | None:
    """A rank whose own busy time is above `ratio` x the other ranks' median in each of the newest
    `confirm_steps` consecutive steps that every timed rank reports (the per-step history its heartbeat
    carries). One slow step (a page-cache miss, a save on rank 0, a GC pause) confirms nothing."""
    timed = [b for b in beats if b.busy]
    if len(timed) < 2:
        return None
    per_rank = {b.rank: dict(b.busy) for b in timed}
    common = sorted(set.intersection(*(set(steps) for steps in per_rank.values())))
    recent = common[-confirm_steps:]
    if len(recent) < confirm_steps or recent[-1] - recent[0] != confirm_steps - 1:
        return None  # not enough consecutive steps seen by every rank yet
    # Each step's times sorted once: the others' median of each rank is then a lookup, so a pass over a
    # 1,024-host run costs ranks x log(ranks), not ranks^2 (every rank's median over the 8,191 others).
    ordered = {step: sorted(per_rank[r][step] for r in per_rank) for step in recent}
    for beat in timed:
        observations: list[StragglerObservation] = []
        for step in recent:
            mine = per_rank[beat.rank][step]
            others = median_without(ordered[step], mine)
            if others <= 0 or mine <= ratio * others:
                break
            observations.append(StragglerObservation(step, mine, others))
        if len(observations) == confirm_steps:
            return StragglerFinding(
                beat.rank,
                beat.host,
                statistics.median(o.step_time_s for o in observations),
                statistics.median(o.others_median_s for o in observations),
                tuple(observations),
            )
    return None


# ---- divergence ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MetricSample:
    step: int
    loss: float | None
    loss_scale: float | None = None
    act_norm: float | None = None  # the final layer's activation norm, RMS over tokens (trainops' original)
    actv_norm: float | None = (
        None  # the same, mean over tokens (metaseq's; None in rows before migration 0009)
    )


class ActivationNormed(Protocol):
    act_norm: float | None
    actv_norm: float | None


def act_norm_definition(rows: Iterable[ActivationNormed]) -> str:
    """Which activation-norm field to read over a stretch of steps: metaseq's mean (`actv_norm`) when every
    step that measured an activation norm has it, else trainops' RMS (`act_norm`) for all of them. A stretch
    reaching back into rows stored before migration 0009 (RMS only) is read in the RMS definition throughout:
    a curve never mixes the two (the trainer has reported both since). Thresholds are ratios and growth
    rates, so either definition meets the same ones (tests/orchestrator/test_recorded_curves.py)."""
    measured = [r for r in rows if r.act_norm is not None or r.actv_norm is not None]
    return ACT_NORM_MEAN_L2 if all(r.actv_norm is not None for r in measured) else ACT_NORM_RMS


@dataclass(frozen=True)
class DivergenceFinding:
    onset_step: int
    signals: tuple[str, ...]
    evidence: dict[str, Any]

    @property
    def detail(self) -> str:
        return "; ".join(self.signals)


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def _first_sustained(flags: Sequence[tuple[int, bool]], patience: int) -> int | None:
    run_start, run_len = None, 0
    for step, flagged in flags:
        if flagged:
            run_start = step if run_len == 0 else run_start
            run_len += 1
            if run_len >= patience:
                return run_start
        else:
            run_len = 0
    return None


def detect_divergence(
    samples: Sequence[MetricSample], cfg: DivergenceConfig, *, history: Sequence[MetricSample] = ()
) -> DivergenceFinding | None:
    """The OPT team's divergence signals over one attempt's metric stream, oldest first.

    Non-finite loss; a sustained loss spike (ratio and robust z-score over a trailing window); the dynamic
    loss scale below `min_loss_scale`; the final layer's activation norm held above a multiple of its
    trailing maximum. The onset is the earliest step any signal fired. The activation norm is metaseq's
    (`actv_norm`, the mean per-token L2 norm) unless some step of the stream predates it
    (`act_norm_definition`); the tests are ratios, so the same thresholds hold in either definition.

    `history` is the lineage the attempt resumed from (the steps its restored checkpoint descends from):
    it seeds the trailing baselines but is never judged itself. Without it, an attempt restored from a
    checkpoint that already holds a bad update diverges from its first step against a baseline made of its
    own diverging steps, and nothing is ever seen.
    """
    samples = sorted(samples, key=lambda s: s.step)
    first_judged = samples[0].step if samples else 0
    history = sorted((h for h in history if h.step < first_judged), key=lambda s: s.step)
    stream = [*history, *samples]
    onsets: dict[str, int] = {}
    signals: list[str] = []
    evidence: dict[str, Any] = {}

    for s in samples:
        if s.loss is not None and not math.isfinite(s.loss):
            onsets["nonfinite_loss"] = s.step
            signals.append(f"non-finite loss ({s.loss}) at step {s.step}")
            break

    for s in samples:
        if _finite(s.loss_scale) and (s.loss_scale or 0.0) < cfg.min_loss_scale:
            onsets["loss_scale"] = s.step
            signals.append(f"loss scale {s.loss_scale:g} < {cfg.min_loss_scale:g} at step {s.step}")
            break

    finite_losses = [(s.step, s.loss) for s in stream if _finite(s.loss)]
    spike_flags: list[tuple[int, bool]] = []
    for i, (step, loss) in enumerate(finite_losses):
        window = [v for _, v in finite_losses[max(0, i - cfg.loss_spike_window) : i]]
        if step < max(cfg.judge_after_step, first_judged) or len(window) < cfg.min_points:
            continue
        median = statistics.median(window)
        mad = statistics.median(abs(v - median) for v in window)
        z = (loss - median) / (1.4826 * mad + 1e-12)
        spike_flags.append((step, loss > cfg.loss_spike_ratio * median and z > cfg.loss_spike_z))
    spike_onset = _first_sustained(spike_flags, cfg.loss_spike_patience)
    if spike_onset is not None:
        onsets["loss_spike"] = spike_onset
        signals.append(
            f"loss spike from step {spike_onset} (> {cfg.loss_spike_ratio}x trailing median and "
            f"{cfg.loss_spike_z} robust sigmas for {cfg.loss_spike_patience} steps)"
        )

    definition = act_norm_definition(stream)
    norms = [(s.step, norm) for s in stream if _finite(norm := getattr(s, definition))]
    norm_flags: list[tuple[int, bool]] = []
    baseline_at: dict[int, float] = {}
    lag = cfg.act_norm_patience
    for i, (step, norm) in enumerate(norms):
        # the window ends `lag` points back: a runaway from the attempt's first step is measured against
        # the lineage's level before it
        window = [v for _, v in norms[max(0, i - lag - cfg.act_norm_window) : max(0, i - lag + 1)]]
        if step < max(cfg.judge_after_step, first_judged) or len(window) < cfg.min_points:
            continue
        baseline = max(window)
        baseline_at[step] = baseline
        norm_flags.append((step, norm > cfg.act_norm_multiple * baseline))
    norm_onset = _first_sustained(norm_flags, cfg.act_norm_patience)
    if norm_onset is not None:
        onsets["act_norm_runaway"] = norm_onset
        signals.append(
            f"final-layer activation norm ({definition}) above {cfg.act_norm_multiple}x its trailing maximum "
            f"({baseline_at[norm_onset]:.3g}) from step {norm_onset}"
        )

    if not onsets:
        return None
    onset = min(onsets.values())
    tail = [s for s in stream if s.step >= onset - 3][:12]
    evidence.update(
        {
            "onsets": onsets,
            "act_norm_definition": definition,
            "around_onset": [
                {
                    "step": s.step,
                    "loss": s.loss,
                    "loss_scale": s.loss_scale,
                    "act_norm": s.act_norm,
                    "actv_norm": s.actv_norm,
                }
                for s in tail
            ],
        }
    )
    return DivergenceFinding(onset_step=onset, signals=tuple(signals), evidence=evidence)
