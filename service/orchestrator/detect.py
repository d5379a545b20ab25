"""Failure detection as pure functions of observations: exits, hangs, divergence.

Each returns a finding with the evidence that goes to the logbook, or None.
"""

from __future__ import annotations

import enum
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from service.orchestrator.config import DivergenceConfig

EXIT_OK = 0
EXIT_CONFIG = 2
EXIT_DIVERGED = 42


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

    Codes follow trainer.launch: 0, 2 (config), 42 (diverged), 128+N (signal N, as a shell reports it) or
    negative -N (Python's Popen for a direct child killed by N).
    """
    if code == EXIT_OK:
        return ExitFinding("completed", code, "exited 0")
    if code == EXIT_DIVERGED:
        return ExitFinding(
            FailureClass.divergence, code, "the trainer stopped on a non-finite loss (exit 42)"
        )
    if code == EXIT_CONFIG:
        return ExitFinding(FailureClass.config, code, "the trainer refused its configuration (exit 2)")
    if code < 0 or code > 128:
        signum = -code if code < 0 else code - 128
        return ExitFinding(FailureClass.signal, code, f"killed by signal {signum}")
    return ExitFinding(FailureClass.crash, code, f"exited with error code {code}")


# ---- hangs -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RankBeat:
    rank: int
    host: str
    step: int
    time: float  # when the rank last made step progress (Unix seconds)
    step_time_s: float | None = None


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
    hang_timeout_s: float,
    startup_grace_s: float,
) -> HangFinding | None:
    """No step progress on some rank for `hang_timeout_s` (or no first step within `startup_grace_s`)."""
    if not beats:
        waited = now - attempt_started_at
        if waited > startup_grace_s:
            return HangFinding(
                (),
                (),
                None,
                waited,
                f"no rank reached its first step in {waited:.0f} s",
                {"world_size": world_size, "waited_s": round(waited, 1)},
            )
        return None
    missing = world_size - len(beats)
    stale = [b for b in beats if now - b.time > hang_timeout_s]
    if missing > 0 and now - attempt_started_at > startup_grace_s:
        stale_for = now - attempt_started_at
    elif stale:
        stale_for = max(now - b.time for b in stale)
    else:
        return None
    lowest = min(b.step for b in beats)
    behind = sorted({b.host for b in beats if b.step == lowest}) if len({b.step for b in beats}) > 1 else []
    return HangFinding(
        stale_ranks=tuple(sorted(b.rank for b in stale)),
        behind_hosts=tuple(behind),
        last_step=max(b.step for b in beats),
        stale_for_s=stale_for,
        detail=f"no step progress for {stale_for:.1f} s (ranks {[b.rank for b in stale] or 'missing'}, "
        f"last step {max(b.step for b in beats)})",
        evidence={
            "beats": [
                {"rank": b.rank, "host": b.host, "step": b.step, "age_s": round(now - b.time, 1)}
                for b in beats
            ],
            "hang_timeout_s": hang_timeout_s,
            "missing_ranks": max(missing, 0),
        },
    )


# ---- stragglers ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StragglerFinding:
    rank: int
    host: str
    step_time_s: float
    others_median_s: float


def detect_straggler(beats: Sequence[RankBeat], *, ratio: float) -> StragglerFinding | None:
    """One rank's own step time far above the median of the others'."""
    timed = [b for b in beats if b.step_time_s is not None and b.step_time_s > 0]
    if len(timed) < 2:
        return None
    worst = max(timed, key=lambda b: b.step_time_s or 0.0)
    others = statistics.median(b.step_time_s or 0.0 for b in timed if b is not worst)
    if others > 0 and (worst.step_time_s or 0.0) > ratio * others:
        return StragglerFinding(worst.rank, worst.host, worst.step_time_s or 0.0, others)
    return None


# ---- divergence ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MetricSample:
    step: int
    loss: float | None
    loss_scale: float | None = None
    act_norm: float | None = None


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
    trailing maximum. The onset is the earliest step any signal fired.

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

    norms = [(s.step, s.act_norm) for s in stream if _finite(s.act_norm)]
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
            f"final-layer activation norm above {cfg.act_norm_multiple}x its trailing maximum "
            f"({baseline_at[norm_onset]:.3g}) from step {norm_onset}"
        )

    if not onsets:
        return None
    onset = min(onsets.values())
    tail = [s for s in stream if s.step >= onset - 3][:12]
    evidence.update(
        {
            "onsets": onsets,
            "around_onset": [
                {"step": s.step, "loss": s.loss, "loss_scale": s.loss_scale, "act_norm": s.act_norm}
                for s in tail
            ],
        }
    )
    return DivergenceFinding(onset_step=onset, signals=tuple(signals), evidence=evidence)
