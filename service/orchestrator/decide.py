"""`decide()`: a pure function from a run's desired and observed state to the actions that reconcile them.

No I/O here; everything it needs is in `ObservedRun`.
Table-tested in tests/orchestrator/test_orchestrator_decide.py.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from service.orchestrator.launchers.base import ProcessStatus
from service.orchestrator.policy import FailureRecord, plan_remediation
from service.recovery.config import DivergenceConfig, OrchestratorConfig
from service.recovery.detect import (
    EXIT_LOSS_SCALE_FLOOR,
    DivergenceFinding,
    FailureClass,
    HangLimits,
    MetricSample,
    RankBeat,
    classify_exit,
    detect_divergence,
    detect_hang,
    detect_straggler,
    hang_limits,
)
from service.recovery.restart_point import CheckpointCandidate, pick_restart_checkpoint, rule_for_run
from service.statemachine import DesiredState, NodeState, RunPhase

BAD_NODE_STATES = frozenset({NodeState.suspect, NodeState.cordoned, NodeState.draining, NodeState.retired})
HANG_BLAME_SAMPLE = 8  # hosts named in a withheld blame's evidence (a logbook entry stays small)


# ---- what decide() sees ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ObservedAttempt:
    number: int
    hosts: tuple[str, ...]
    started_at: float
    world_size: int
    process: ProcessStatus
    beats: tuple[RankBeat, ...] = ()
    samples: tuple[MetricSample, ...] = ()  # this attempt's metrics, oldest first
    # the steps its restored checkpoint descends from (newest attempt per step up to the restore point),
    # oldest first: the divergence baselines start there, not at the attempt's own first step
    lineage: tuple[MetricSample, ...] = ()
    last_step: int | None = None  # newest step reported by any source
    first_step_seen: bool = False
    heartbeat_interval_s: float | None = None  # its hosts' send interval (None: the orchestrator's minimum)


@dataclass(frozen=True)
class EndedAttempt:
    number: int
    hosts: tuple[str, ...]
    ended_at: float
    outcome: str  # "completed", "stopped", "superseded" or a FailureClass value
    findings: Mapping[str, Any] = field(default_factory=dict)
    newest_checkpoint_step: int | None = None
    last_step: int | None = None  # the newest step it trained


@dataclass(frozen=True)
class ApprovalGates:
    """The run's approval policy (`RunConfig.approvals`), as decide() reads it."""

    require: frozenset[str] = frozenset()
    rollback_steps: int = 1000
    timeout_s: float = 1800.0
    on_timeout: str = "hold"  # approve | hold


@dataclass(frozen=True)
class ObservedDecision:
    """The run's open decision (proposed, not yet carried out)."""

    id: int
    status: str  # pending | approved | rejected | timed_out
    gates: tuple[str, ...]
    proposal: Mapping[str, Any]  # checkpoint_id, checkpoint_step, overrides, failure
    expires_at: float
    on_timeout: str
    decided_by: str | None = None
    decision_reason: str | None = None
    operator_overrides: Mapping[str, Any] | None = None
    action: str = "relaunch"  # relaunch | retire_hosts


@dataclass(frozen=True)
class ObservedRun:
    run_id: int
    name: str
    desired: DesiredState
    phase: RunPhase
    target_steps: int
    host_count: int
    max_restarts: int
    lr_scale: float
    lr_override: float | None
    clip_override: float | None
    pending_restart: Mapping[str, Any] | None
    now: float
    attempt: ObservedAttempt | None
    history: tuple[EndedAttempt, ...]  # ended attempts, oldest first
    node_states: Mapping[str, NodeState]  # every registered host
    busy_hosts: frozenset[str]  # hosts used by other runs' active attempts
    checkpoints: tuple[CheckpointCandidate, ...]
    act_norms: Mapping[int, float] = field(default_factory=dict)  # step -> norm along the surviving lineage
    node_changed_at: Mapping[str, float] = field(default_factory=dict)  # host -> when its state last changed
    waiting_for_hosts_since: float | None = None
    step_times: tuple[float, ...] = ()  # the run's newest step times (any attempt), oldest first
    hang_overrides: Mapping[str, float] = field(default_factory=dict)  # the run's `RunConfig.hang`
    checkpoint_interval: int = 0  # the run's steps between checkpoints (its restart rule's course spans it)
    divergence: DivergenceConfig | None = (
        None  # the run's own divergence rules (divergence_for_run); None: cfg's
    )
    approvals: ApprovalGates = field(default_factory=ApprovalGates)
    open_decision: ObservedDecision | None = None  # about the next relaunch
    open_retirements: tuple[ObservedDecision, ...] = ()  # lemons of this run waiting to be retired


# ---- what decide() asks for ------------------------------------------------------------------------


@dataclass(frozen=True)
class EndAttempt:
    outcome: str
    reason: str
    kill: bool
    exit_code: int | None = None
    evidence: Mapping[str, Any] = field(default_factory=dict)
    cordon_hosts: tuple[str, ...] = ()
    blame_hosts: tuple[str, ...] = ()
    last_progress_at: float | None = None
    offence: str = "hardware"  # what the cordoned hosts are charged with (their lemon score counts it)


@dataclass(frozen=True)
class CloseDecision:
    """Stamp the run's open decision carried out (with the launch or escalation that carries it out, in the
    same transaction), a pending one first becoming `status_if_pending`."""

    decision_id: int
    status_if_pending: str  # timed_out | superseded
    note: str


@dataclass(frozen=True)
class Launch:
    hosts: tuple[str, ...]
    checkpoint: CheckpointCandidate | None
    overrides: Mapping[str, Any]  # lr_scale, lr, clip (standing); reset_loss_scale, skip_batches (one-shot)
    reason: str
    evidence: Mapping[str, Any] = field(default_factory=dict)
    deep_check: bool = False  # run deep diagnostics on `hosts` first (after a hardware failure)
    consume_pending_restart: bool = False
    close_decision: CloseDecision | None = None


@dataclass(frozen=True)
class RetireHosts:
    """Carry out an answered retirement decision: retire its cordoned lemons (`retire`), or leave them
    cordoned for an operator; the decision is closed in the same step."""

    decision_id: int
    hosts: tuple[str, ...]
    retire: bool
    close: CloseDecision


@dataclass(frozen=True)
class ProposeDecision:
    """Record a proposal that waits for a human (the run's approval gates), and page."""

    gates: tuple[str, ...]
    reason: str
    proposal: Mapping[str, Any]
    evidence: Mapping[str, Any] = field(default_factory=dict)
    timeout_s: float = 1800.0
    on_timeout: str = "hold"


@dataclass(frozen=True)
class SetPhase:
    target: RunPhase
    reason: str
    evidence: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Escalate:
    reason: str
    evidence: Mapping[str, Any] = field(default_factory=dict)
    close_decision: CloseDecision | None = None


@dataclass(frozen=True)
class MarkFirstStep:
    attempt: int


@dataclass(frozen=True)
class WaitForHosts:
    needed: int
    available: int


Action = (
    EndAttempt
    | Launch
    | SetPhase
    | Escalate
    | MarkFirstStep
    | WaitForHosts
    | ProposeDecision
    | CloseDecision
    | RetireHosts
)


def decide(run: ObservedRun, cfg: OrchestratorConfig) -> list[Action]:
    return _retirements(run) + _decide_run(run, _for_run(run, cfg))


def _for_run(run: ObservedRun, cfg: OrchestratorConfig) -> OrchestratorConfig:
    """The config with the run's own divergence rules (its loss-scale threshold follows its number format)."""
    return cfg if run.divergence is None else cfg.model_copy(update={"divergence": run.divergence})


def _retirements(run: ObservedRun) -> list[Action]:
    """Lemons of this run kept cordoned under its `node_retirement` gate, once answered (or timed out):
    whatever the run does meanwhile (it completes, or is stopped), the hosts' fate is the fleet's."""
    actions: list[Action] = []
    for d in run.open_retirements:
        timed_out = d.status == "pending" and run.now >= d.expires_at
        if d.status == "pending" and not timed_out:
            continue
        hosts = tuple(str(h) for h in d.proposal.get("hosts") or ())
        retire = d.status == "approved" or (timed_out and d.on_timeout == "approve")
        who = d.decided_by or "nobody"
        if timed_out:
            note = "unanswered in time; the policy " + ("retires them" if retire else "leaves them cordoned")
        else:
            note = f"{d.status} by {who}" + (f": {d.decision_reason}" if d.decision_reason else "")
        note += f"; {', '.join(hosts)} " + ("retired" if retire else "left cordoned for an operator")
        actions.append(RetireHosts(d.id, hosts, retire, CloseDecision(d.id, "timed_out", note)))
    return actions


def _decide_run(run: ObservedRun, cfg: OrchestratorConfig) -> list[Action]:
    if run.desired == DesiredState.stopped:
        return _decide_stopped(run)
    if run.phase == RunPhase.completed:
        if run.open_decision is not None:  # nothing left to relaunch (its retirements still run above)
            return [CloseDecision(run.open_decision.id, "superseded", "superseded: the run completed")]
        return []
    if run.attempt is not None:
        return _decide_active(run, cfg)
    return _decide_idle(run, cfg)


def _decide_stopped(run: ObservedRun) -> list[Action]:
    actions: list[Action] = []
    if run.open_decision is not None:
        actions.append(
            CloseDecision(run.open_decision.id, "superseded", "superseded: the run was asked to stop")
        )
    if run.attempt is not None:
        return [*actions, EndAttempt("stopped", "the run was asked to stop", kill=True)]
    if run.phase not in (RunPhase.stopped, RunPhase.completed):
        return [*actions, SetPhase(RunPhase.stopped, "stopped as asked; no attempt is running")]
    return actions


def _decide_active(run: ObservedRun, cfg: OrchestratorConfig) -> list[Action]:
    attempt = run.attempt
    assert attempt is not None
    if run.pending_restart:
        reason = f"operator restart: {run.pending_restart.get('reason', '')}"
        return [
            EndAttempt(
                "superseded", reason, kill=True, evidence={"pending_restart": dict(run.pending_restart)}
            ),
            *_into_restarting(run, reason),
        ]

    if attempt.process.state == "exited":
        code = attempt.process.exit_code if attempt.process.exit_code is not None else 1
        finding = classify_exit(code)
        last = attempt.last_step or 0
        if finding.outcome == "completed":
            if last >= run.target_steps and (diverged := _divergence(attempt, cfg)) is not None:
                # The last steps before the target diverged, faster than a pass could see (a short run, or
                # metrics flushed at exit): the final weights are the diverged ones, and "completed" would
                # hand them over. Rolled back past the onset and remediated like any divergence.
                return [_end_for_divergence(diverged, attempt, also="exited 0 at the target", exit_code=code)]
            if last >= run.target_steps:
                return [
                    EndAttempt(
                        "completed", f"reached the target step {run.target_steps}", kill=False, exit_code=code
                    ),
                    SetPhase(RunPhase.completed, f"reached the target step {run.target_steps}"),
                ]
            return [
                EndAttempt(
                    FailureClass.crash,
                    f"exited 0 at step {last}, before the target {run.target_steps}",
                    kill=False,
                    exit_code=code,
                )
            ]
        evidence: dict[str, Any] = {"exit": finding.detail, "last_step": attempt.last_step}
        outcome = finding.outcome
        bad = _unfit_hosts(run, attempt.hosts)
        diverged = _divergence(attempt, cfg)
        if diverged is not None and outcome != FailureClass.divergence:
            # The process died (a crash, a signal, a host's fault) while its metrics already showed a
            # divergence: the restart must roll back past the onset and remediate it, whatever ended it.
            # Unfit hosts are still cordoned.
            return [
                _end_for_divergence(
                    diverged,
                    attempt,
                    also=finding.detail,
                    exit_code=code,
                    cordon_hosts=_suspects(bad),
                    extra={"exit": finding.detail, "hosts": {h: st.value for h, st in bad.items()}},
                )
            ]
        if outcome in (FailureClass.crash, FailureClass.signal) and bad:
            # Ranks died on a host the health layer has since found unfit (a GPU that fell off the bus
            # kills its ranks before a sweep can tell): the crash is that host's, and is remediated as a
            # hardware failure (cordon, deep checks, relaunch elsewhere), not retried on the same hosts.
            return [
                EndAttempt(
                    FailureClass.hardware,
                    f"{finding.detail} while "
                    + ", ".join(f"{h} is {s.value}" for h, s in sorted(bad.items()))
                    + " (hosts of this attempt)",
                    kill=True,
                    exit_code=code,
                    cordon_hosts=tuple(sorted(h for h, s in bad.items() if s == NodeState.suspect)),
                    evidence={**evidence, "hosts": {h: s.value for h, s in bad.items()}},
                    last_progress_at=_last_progress(attempt),
                )
            ]
        if outcome == FailureClass.divergence:
            if diverged:
                evidence["onset_step"] = diverged.onset_step
            elif code == EXIT_LOSS_SCALE_FLOOR:
                evidence["onset_step"] = _scale_collapse_onset(attempt.samples, last)
            else:
                evidence["onset_step"] = _first_nonfinite(attempt.samples, last)
            if diverged:
                evidence["signals"] = list(diverged.signals)
        return [
            EndAttempt(
                outcome,
                finding.detail,
                kill=True,
                exit_code=code,
                evidence=evidence,
                last_progress_at=_last_progress(attempt),
            )
        ]

    if attempt.process.node_failure:
        # The scheduler says a node failed under the attempt: remediate as hardware (deep checks of the
        # next hosts, relaunch elsewhere). Failed nodes the control plane still counts as fit are cordoned;
        # those it already holds out (the Slurm sync cordons a DOWN node) are left as they are.
        failed = attempt.process.failed_hosts
        cordon = tuple(h for h in failed if run.node_states.get(h) not in BAD_NODE_STATES)
        if (diverged := _divergence(attempt, cfg)) is not None:
            return [
                _end_for_divergence(
                    diverged,
                    attempt,
                    also=attempt.process.detail,
                    cordon_hosts=cordon,
                    extra={"failed_hosts": list(failed)},
                )
            ]
        return [
            EndAttempt(
                FailureClass.hardware,
                attempt.process.detail,
                kill=True,
                cordon_hosts=tuple(h for h in failed if run.node_states.get(h) not in BAD_NODE_STATES),
                evidence={"failed_hosts": list(failed)},
                last_progress_at=_last_progress(attempt),
            )
        ]

    if attempt.process.state == "lost":
        if (diverged := _divergence(attempt, cfg)) is not None:
            return [_end_for_divergence(diverged, attempt, also=attempt.process.detail)]
        return [
            EndAttempt(
                FailureClass.lost, attempt.process.detail, kill=True, last_progress_at=_last_progress(attempt)
            )
        ]

    actions: list[Action] = []
    if attempt.beats and not attempt.first_step_seen:
        actions.append(MarkFirstStep(attempt.number))
        if run.phase == RunPhase.starting:
            actions.append(SetPhase(RunPhase.running, f"attempt {attempt.number} made its first step"))

    diverged = _divergence(attempt, cfg)
    bad = _unfit_hosts(run, attempt.hosts)
    if bad and diverged is not None:
        unfit = ", ".join(f"{h} is {s.value}" for h, s in sorted(bad.items()))
        return [
            *actions,
            _end_for_divergence(
                diverged,
                attempt,
                also=f"host(s) in use became unfit: {unfit}",
                cordon_hosts=_suspects(bad),
                extra={"hosts": {h: s.value for h, s in bad.items()}},
            ),
        ]
    if bad:
        suspects = _suspects(bad)
        return [
            *actions,
            EndAttempt(
                FailureClass.hardware,
                "host(s) in use became unfit: "
                + ", ".join(f"{h} is {s.value}" for h, s in sorted(bad.items())),
                kill=True,
                cordon_hosts=suspects,
                evidence={"hosts": {h: s.value for h, s in bad.items()}},
                # a host fault starts when the control plane learnt of it (training goes on until then)
                last_progress_at=min(
                    (run.node_changed_at[h] for h in bad if h in run.node_changed_at),
                    default=_last_progress(attempt),
                ),
            ),
        ]

    if (attempt.last_step or 0) >= run.target_steps:
        # Past the target the trainer saves, flushes and tears its process group down: no progress is
        # expected, only an exit. Give it the start-up grace before calling it stuck.
        waited = run.now - max((b.time for b in attempt.beats), default=attempt.started_at)
        if waited > cfg.startup_grace_s:
            return [
                *actions,
                EndAttempt(
                    FailureClass.hang,
                    f"reached the target step but did not exit in {waited:.0f} s",
                    kill=True,
                    last_progress_at=_last_progress(attempt),
                ),
            ]
        return actions

    hang = detect_hang(
        attempt.beats,
        world_size=attempt.world_size,
        now=run.now,
        attempt_started_at=attempt.started_at,
        limits=run_hang_limits(run, attempt, cfg),
        # hosts re-send every interval: three missed rounds from all of them is an outage
        quiet_after_s=3 * heartbeat_interval(attempt, cfg),
    )
    if hang is not None and diverged is not None:
        # ranks stuck after their loss went non-finite: the divergence is the cause, no host is to blame
        return [*actions, _end_for_divergence(diverged, attempt, also=hang.detail)]
    if hang is not None:
        blame, withheld = hang_blame(hang.behind_hosts, run)
        return [
            *actions,
            EndAttempt(
                FailureClass.hang,
                hang.detail,
                kill=True,
                evidence={**hang.evidence, **withheld},
                blame_hosts=blame,
                last_progress_at=_last_progress(attempt),
            ),
        ]

    if diverged is not None:
        return [*actions, _end_for_divergence(diverged, attempt)]

    # Confirmed over consecutive steps from the per-step busy times the ranks' heartbeats carry.
    straggler = detect_straggler(
        attempt.beats, ratio=cfg.straggler_ratio, confirm_steps=cfg.straggler_confirm_steps
    )
    if straggler is not None:
        slowdown = straggler.step_time_s / straggler.others_median_s
        seen = straggler.observations
        return [
            *actions,
            EndAttempt(
                FailureClass.hardware,
                f"straggler: rank {straggler.rank} on {straggler.host}: {straggler.step_time_s:.2f} s/step, "
                f"{slowdown:.1f}x the others in each of {len(seen)} consecutive steps "
                f"({seen[0].step}-{seen[-1].step})",
                kill=True,
                cordon_hosts=(straggler.host,),
                offence="straggler",
                evidence={
                    "rank": straggler.rank,
                    "host": straggler.host,
                    "step_time_s": straggler.step_time_s,
                    "others_median_s": straggler.others_median_s,
                    "ratio_limit": cfg.straggler_ratio,
                    "observations": [
                        {
                            "step": o.step,
                            "step_time_s": round(o.step_time_s, 4),
                            "others_median_s": round(o.others_median_s, 4),
                            "ratio": round(o.ratio, 2),
                        }
                        for o in seen
                    ],
                },
                last_progress_at=_last_progress(attempt),
            ),
        ]
    return actions


def run_hang_limits(run: ObservedRun, attempt: ObservedAttempt, cfg: OrchestratorConfig) -> HangLimits:
    """This run's hang limits: the orchestrator's settings, overridden by the run's own, calibrated on the
    run's newest step times (stored metrics, and each rank's last step as its heartbeat reports it)."""
    own = run.hang_overrides
    step_times = [*run.step_times, *(b.last_step_s for b in attempt.beats if b.last_step_s is not None)]
    return hang_limits(
        step_times[-cfg.hang.step_time_window :],
        floor_s=float(own.get("step_floor_s", cfg.hang_timeout_s)),
        multiple=float(own.get("step_time_multiple", cfg.hang.step_time_multiple)),
        q=cfg.hang.step_time_quantile,
        startup_s=float(own.get("startup_s", cfg.startup_grace_s)),
        checkpoint_save_s=float(own.get("checkpoint_save_s", cfg.hang.checkpoint_save_s)),
        validation_s=float(own.get("validation_s", cfg.hang.validation_s)),
        delivery_lag_s=heartbeat_interval(attempt, cfg),
    )


def heartbeat_interval(attempt: ObservedAttempt, cfg: OrchestratorConfig) -> float:
    """The interval the attempt's hosts were told to send beats at (recorded at its launch)."""
    recorded = attempt.heartbeat_interval_s
    return recorded if recorded is not None else cfg.heartbeat_interval_s


def _divergence(attempt: ObservedAttempt, cfg: OrchestratorConfig) -> DivergenceFinding | None:
    """The divergence in the attempt's metrics, judged against the lineage it resumed from."""
    return detect_divergence(attempt.samples, cfg.divergence, history=attempt.lineage)


def _end_for_divergence(
    found: DivergenceFinding,
    attempt: ObservedAttempt,
    *,
    also: str = "",
    exit_code: int | None = None,
    cordon_hosts: tuple[str, ...] = (),
    extra: Mapping[str, Any] | None = None,
) -> EndAttempt:
    """A divergence ends the attempt; `also` is what else ended it at the same time (a crash, a host's
    fault, a hang), kept in the reason and evidence so the logbook weighs every signal present."""
    evidence: dict[str, Any] = {"onset_step": found.onset_step, "signals": list(found.signals)}
    evidence.update(found.evidence)
    if also:
        evidence["also"] = also
    evidence.update(extra or {})
    return EndAttempt(
        FailureClass.divergence,
        found.detail + (f" (then: {also})" if also else ""),
        kill=True,
        exit_code=exit_code,
        evidence=evidence,
        cordon_hosts=cordon_hosts,
        last_progress_at=_last_progress(attempt),
    )


def _suspects(bad: Mapping[str, NodeState]) -> tuple[str, ...]:
    return tuple(sorted(h for h, s in bad.items() if s == NodeState.suspect))


def _first_nonfinite(samples: Sequence[MetricSample], fallback: int) -> int:
    for s in samples:
        if s.loss is not None and not math.isfinite(s.loss):
            return s.step
    return fallback + 1


def _scale_collapse_onset(samples: Sequence[MetricSample], fallback: int) -> int:
    """Where the overflows that took the loss scale to its floor began (exit 43): the first drop of the
    trailing run of steps that each halved it (the step that met the floor leaves the scale as it was, as
    metaseq did); the attempt's last step + 1 when the samples do not show one. Earlier drops with clean
    steps after them are the transient overflows a healthy run meets, and at OPT's window (2^14 /
    (data-parallel size x accumulation) steps) their halvings last for thousands of steps, so "since the
    scale last rose" would reach back to the first of them (tests/data/floored_fp16_tiny_seed7_at111.json)."""
    scales = [(s.step, s.loss_scale) for s in sorted(samples, key=lambda s: s.step) if _finite(s.loss_scale)]
    if len(scales) >= 2 and scales[-1][1] == scales[-2][1]:
        scales = scales[:-1]  # the floor step: the overflow that would have crossed the floor halved nothing
    onset = None
    for (before_step, before), (step, after) in zip(reversed(scales[:-1]), reversed(scales), strict=False):
        if step != before_step + 1 or before is None or after is None or not after < before:
            break
        onset = step
    return onset if onset is not None else fallback + 1


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def failure_of(outcome: str) -> FailureClass | None:
    """The failure class of an ended attempt's outcome; None for completed, stopped or superseded."""
    try:
        return FailureClass(outcome)
    except ValueError:
        return None


def _unfit_hosts(run: ObservedRun, hosts: Sequence[str]) -> dict[str, NodeState]:
    """The hosts among ``hosts`` that the control plane holds unfit (suspect, cordoned, draining, ...)."""
    return {h: s for h in hosts if (s := run.node_states.get(h)) is not None and s in BAD_NODE_STATES}


def _last_progress(attempt: ObservedAttempt) -> float | None:
    return max((b.time for b in attempt.beats), default=None)


def _into_restarting(run: ObservedRun, reason: str) -> list[Action]:
    """A relaunch leaves a live phase through `restarting` (the state machine has no running -> starting)."""
    if run.phase in (RunPhase.starting, RunPhase.running, RunPhase.needs_attention):
        return [SetPhase(RunPhase.restarting, reason)]
    return []


def _decide_idle(run: ObservedRun, cfg: OrchestratorConfig) -> list[Action]:
    # desired == running here. A stopped run was stopped by an operator and started again by one (the
    # start lever); failed and needs_attention runs wait for a human's restart (or start, which asks for
    # one through `pending_restart`).
    resumable = run.phase in (
        RunPhase.pending,
        RunPhase.starting,
        RunPhase.running,
        RunPhase.restarting,
        RunPhase.stopped,
    )
    if not resumable and not run.pending_restart:
        return []  # failed or needing attention: a human decides (restart or start through the API)
    last = run.history[-1] if run.history else None
    failure = failure_of(last.outcome) if last else None

    standing = {"lr_scale": run.lr_scale, "lr": run.lr_override, "clip": run.clip_override}
    overrides: dict[str, Any] = dict(standing)
    notes: list[str] = []
    actions: list[Action] = []

    if run.pending_restart:
        # Manual control wins: the operator's restart is obeyed without a budget check.
        chosen_id = run.pending_restart.get("from_checkpoint_id")
        usable = [c for c in run.checkpoints if c.usable]
        restart_evidence: dict[str, Any] = {"pending_restart": dict(run.pending_restart)}
        if chosen_id:
            checkpoint = next((c for c in usable if c.id == chosen_id), None)
            if checkpoint is None:
                return [Escalate(f"the operator asked for checkpoint {chosen_id}, which is no longer intact")]
            choice_words = f"from checkpoint step {checkpoint.step}, as asked"
        else:
            checkpoint, choice_words, rejected = operator_default_checkpoint(run, cfg)
            restart_evidence["restart_point"] = choice_words
            restart_evidence["rejected_checkpoints"] = [list(r) for r in rejected]
        overrides["reset_loss_scale"] = bool(run.pending_restart.get("reset_loss_scale"))
        overrides["skip_batches"] = int(run.pending_restart.get("skip_batches") or 0)
        reason = (
            f"operator restart ({run.pending_restart.get('author')}): {run.pending_restart.get('reason')}"
        )
        launch = _launch_or_wait(
            run,
            cfg,
            checkpoint=checkpoint,
            overrides=overrides,
            reason=f"{reason}; {choice_words}",
            evidence=restart_evidence,
            deep_check=False,
            consume=True,
        )
        if run.open_decision is not None:  # the operator's restart answers the open question too
            note = f"superseded by the operator's restart ({run.pending_restart.get('author')})"
            launch = _closing(launch, CloseDecision(run.open_decision.id, "superseded", note))
        return _into_restarting(run, reason) + launch

    if failure is not None:
        records = [
            FailureRecord(
                ended_at=a.ended_at,
                failure=FailureClass(a.outcome) if a.outcome in FailureClass.__members__ else None,
                newest_checkpoint_step=a.newest_checkpoint_step,
            )
            for a in run.history
        ]
        plan = plan_remediation(
            failure,
            records,
            lr_scale=run.lr_scale,
            clip=run.clip_override,
            now=run.now,
            cfg=cfg.remediation,
            max_restarts=run.max_restarts,
        )
        crossed: list[str] = []
        if plan.escalate:
            if "over_budget" not in run.approvals.require:
                return [Escalate(plan.escalate, {"failure": failure.value, "attempts": len(run.history)})]
            # the policy lets a human decide instead of stopping: propose the restart the budget forbids
            crossed.append("over_budget")
            notes.append(plan.escalate)
            plan = plan_remediation(
                failure,
                records,
                lr_scale=run.lr_scale,
                clip=run.clip_override,
                now=run.now,
                cfg=cfg.remediation,
                max_restarts=run.max_restarts,
                enforce_budgets=False,
            )
        if run.now < plan.not_before:
            return []  # back-off; the next loop looks again
        overrides.update(plan.overrides)
        notes.extend(plan.notes)
        onset = last.findings.get("onset_step") if last else None
        choice = pick_restart_checkpoint(
            run.checkpoints,
            failure=failure,
            cfg=rule_for_run(cfg.restart_point, checkpoint_interval=run.checkpoint_interval),
            divergence_onset=onset,
            act_norms=run.act_norms,
            min_loss_scale=cfg.divergence.min_loss_scale,
            runaway_multiple=cfg.divergence.act_norm_multiple,
        )
        if failure == FailureClass.divergence and choice.checkpoint is None:
            return [
                Escalate(
                    f"divergence at step {onset} and {choice.reason}",
                    {"rejected": [list(r) for r in choice.rejected]},
                )
            ]
        if (
            failure == FailureClass.divergence
            and cfg.remediation.skip_spike_window
            and onset is not None
            and choice.checkpoint is not None
        ):
            overrides["skip_batches"] = max(0, int(onset) - choice.checkpoint.step)
            notes.append(f"skipping the {overrides['skip_batches']} batches up to the onset")
        if run.phase in (RunPhase.running, RunPhase.starting):
            actions.append(SetPhase(RunPhase.restarting, f"attempt {last.number} failed: {failure.value}"))
        reason = f"restart after {failure.value}: {choice.reason}"
        if notes:
            reason += "; " + "; ".join(notes)
        evidence = {
            "failure": failure.value,
            "restart_point": choice.reason,
            "rejected_checkpoints": [list(r) for r in choice.rejected],
            "remediation": list(notes),
        }
        launch = _launch_or_wait(
            run,
            cfg,
            checkpoint=choice.checkpoint,
            overrides=overrides,
            reason=reason,
            evidence=evidence,
            deep_check=failure == FailureClass.hardware and cfg.remediation.deep_check_before_relaunch,
            consume=False,
        )
        crossed += lever_gates(run, plan.overrides, overrides, choice.checkpoint, last)
        if crossed:
            proposal = {
                "action": "relaunch",
                "failure": failure.value,
                "checkpoint_id": choice.checkpoint.id if choice.checkpoint else None,
                "checkpoint_step": choice.checkpoint.step if choice.checkpoint else None,
                "overrides": dict(overrides),
            }
            gated = _gated(run, tuple(crossed), launch, reason=reason, proposal=proposal, evidence=evidence)
            return actions + gated
        return actions + launch

    # First launch, or resuming after a clean end (stopped and started again): newest intact checkpoint.
    usable = [c for c in run.checkpoints if c.usable]
    checkpoint = max(usable, key=lambda c: c.step) if usable else None
    reason = "first launch" if not run.history else "resuming"
    reason += f" from checkpoint step {checkpoint.step}" if checkpoint else " from scratch"
    return _into_restarting(run, reason) + _launch_or_wait(
        run,
        cfg,
        checkpoint=checkpoint,
        overrides=overrides,
        reason=reason,
        evidence={},
        deep_check=False,
        consume=False,
    )


def lever_gates(
    run: ObservedRun,
    plan_overrides: Mapping[str, Any],
    overrides: Mapping[str, Any],
    checkpoint: CheckpointCandidate | None,
    last: EndedAttempt | None,
) -> list[str]:
    """The run's approval gates this relaunch crosses (`RunConfig.approvals.require`)."""
    gates = run.approvals
    crossed = {
        "lr_cut": float(plan_overrides.get("lr_scale", run.lr_scale)) < run.lr_scale,
        "clip_change": "clip" in plan_overrides,
        "loss_scale_reset": bool(plan_overrides.get("reset_loss_scale")),
        "data_skip": int(overrides.get("skip_batches") or 0) > 0,
        "long_rollback": last is not None
        and last.last_step is not None
        and last.last_step - (checkpoint.step if checkpoint else 0) > gates.rollback_steps,
    }
    return [gate for gate, hit in crossed.items() if hit and gate in gates.require]


def _closing(actions: list[Action], close: CloseDecision) -> list[Action]:
    """`actions` with their launch or escalation also closing the run's open decision."""
    return [replace(a, close_decision=close) if isinstance(a, Launch | Escalate) else a for a in actions]


def _gated(
    run: ObservedRun,
    gates: tuple[str, ...],
    launch: list[Action],
    *,
    reason: str,
    proposal: Mapping[str, Any],
    evidence: Mapping[str, Any],
) -> list[Action]:
    """A relaunch that crosses the run's approval gates: proposed and waited for; once answered, carried out
    as approved (the proposal as recorded, with the operator's overrides), or with the operator's own levers
    instead, or held (needs attention): rejected without levers, or unanswered past its timeout with
    `on_timeout: hold`."""
    decision = run.open_decision
    policy = run.approvals
    if decision is None:
        return [
            ProposeDecision(
                gates,
                reason,
                proposal,
                evidence,
                timeout_s=policy.timeout_s,
                on_timeout=policy.on_timeout,
            )
        ]
    timed_out = decision.status == "pending" and run.now >= decision.expires_at
    if decision.status == "pending" and not timed_out:
        return []  # waiting for a human
    who = decision.decided_by or "nobody"
    said = f": {decision.decision_reason}" if decision.decision_reason else ""
    if timed_out and decision.on_timeout != "approve":
        note = f"unanswered by {datetime_words(decision.expires_at)}; the policy holds the run"
        return [
            Escalate(
                f"decision {decision.id} ({', '.join(decision.gates)}) was not answered in time; the run "
                f"holds: {reason}",
                {"decision": decision.id},
                close_decision=CloseDecision(decision.id, "timed_out", note),
            )
        ]
    if decision.status == "rejected" and not decision.operator_overrides:
        return [
            Escalate(
                f"decision {decision.id} rejected by {who}{said}; the run holds",
                {"decision": decision.id},
                close_decision=CloseDecision(decision.id, "timed_out", f"rejected by {who}; the run holds"),
            )
        ]
    chosen = next((a for a in launch if isinstance(a, Launch)), None)
    if chosen is None:
        return launch  # no hosts yet: wait (or escalate) as any launch does; the decision stays open
    recorded = dict(decision.proposal.get("overrides") or {})
    standing = {"lr_scale": run.lr_scale, "lr": run.lr_override, "clip": run.clip_override}
    operator = dict(decision.operator_overrides or {})
    if decision.status == "rejected":
        levers = {**standing, **operator}
        how = f"rejected by {who}{said}; restarting with their levers {operator}"
    elif decision.status == "approved":
        levers = {**recorded, **operator}
        how = f"approved by {who}{said}" + (f" with their levers {operator}" if operator else "")
    else:
        levers, how = recorded, "unanswered in time; the policy approves it"
    checkpoint_id = decision.proposal.get("checkpoint_id")
    checkpoint = next((c for c in run.checkpoints if c.id == checkpoint_id and c.usable), None)
    if checkpoint_id is not None and checkpoint is None:
        return [
            Escalate(
                f"decision {decision.id}: the checkpoint it restores (step "
                f"{decision.proposal.get('checkpoint_step')}) is no longer intact",
                {"decision": decision.id},
                close_decision=CloseDecision(decision.id, "timed_out", "its restore point is gone"),
            )
        ]
    return [
        replace(
            chosen,
            checkpoint=checkpoint,
            overrides=levers,
            reason=f"{chosen.reason}; decision {decision.id} {how}",
            evidence={**chosen.evidence, "decision": decision.id},
            close_decision=CloseDecision(decision.id, "timed_out", how),
        )
    ]


def datetime_words(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).isoformat(timespec="seconds")


def operator_default_checkpoint(
    run: ObservedRun, cfg: OrchestratorConfig
) -> tuple[CheckpointCandidate | None, str, tuple[tuple[int, str], ...]]:
    """The checkpoint an operator's restart without `from_checkpoint_id` restores: the choice the
    orchestrator makes for a divergence with no onset in sight (OPT's rule: the newest healthy checkpoint),
    else the newest intact one, saying so. Returns (checkpoint, the choice in words, rejected newer ones)."""
    cfg = _for_run(run, cfg)
    choice = pick_restart_checkpoint(
        run.checkpoints,
        failure=FailureClass.divergence,
        cfg=rule_for_run(cfg.restart_point, checkpoint_interval=run.checkpoint_interval),
        divergence_onset=None,
        act_norms=run.act_norms,
        min_loss_scale=cfg.divergence.min_loss_scale,
        runaway_multiple=cfg.divergence.act_norm_multiple,
    )
    if choice.checkpoint is not None:
        return choice.checkpoint, f"the newest healthy checkpoint, {choice.reason}", choice.rejected
    usable = [c for c in run.checkpoints if c.usable]
    if not usable:
        return None, "no intact checkpoint: from scratch", choice.rejected
    newest = max(usable, key=lambda c: c.step)
    why = next((r for step, r in choice.rejected if step == newest.step), choice.reason)
    return (
        newest,
        f"no checkpoint is healthy yet under the OPT rule; the newest intact one, step {newest.step} ({why})",
        choice.rejected,
    )


def _launch_or_wait(
    run: ObservedRun,
    cfg: OrchestratorConfig,
    *,
    checkpoint: CheckpointCandidate | None,
    overrides: dict[str, Any],
    reason: str,
    evidence: dict[str, Any],
    deep_check: bool,
    consume: bool,
) -> list[Action]:
    hosts = pick_hosts(run)
    if hosts is None:
        available = len(schedulable_hosts(run))
        waited_since = run.waiting_for_hosts_since
        if waited_since is not None and run.now - waited_since > cfg.remediation.hosts_wait_s:
            return [
                Escalate(
                    f"only {available} healthy host(s) free, the run needs {run.host_count}; waited "
                    f"{run.now - waited_since:.0f} s",
                    {"available": available},
                )
            ]
        return [WaitForHosts(run.host_count, available)]
    on_probation = [h for h in hosts if run.node_states.get(h) == NodeState.probation]
    if on_probation:
        # An uncordoned host is on probation until a deep check passes: it gets one before it takes work
        # (the sweep graduates it to healthy when clean, or cordons it again and the next pass picks others).
        deep_check = True
        reason += f"; deep diagnostics first ({', '.join(on_probation)} on probation)"
    return [
        Launch(
            hosts,
            checkpoint,
            overrides,
            reason,
            evidence,
            deep_check=deep_check,
            consume_pending_restart=consume,
        )
    ]


def hang_blame(behind_hosts: tuple[str, ...], run: ObservedRun) -> tuple[tuple[str, ...], dict[str, Any]]:
    """The hosts a hang's lag points at, if the pool can do without them; otherwise none, and why.

    Blamed hosts are held out (suspect) until a deep check clears them. One host behind is always blamed
    (at worst the run waits for one deep check). A lag spread over more hosts than the pool has spares (fit
    hosts beyond the run's `host_count`) does not localize a fault: a fabric-wide stall leaves many ranks a
    step behind, and at a thousand hosts the last beats of hundreds arrive seconds apart (the fleet
    simulator's hang put 256 healthy hosts out of service, and the run could not start again). Then the
    attempt restarts on the hosts it had, and the evidence says what was withheld."""
    spares = max(len(schedulable_hosts(run)) - run.host_count, 0)
    if len(behind_hosts) <= max(spares, 1):
        return behind_hosts, {}
    return (), {
        "blame_withheld": {
            "behind_hosts": len(behind_hosts),
            "spare_hosts": spares,
            "first_behind": list(behind_hosts[:HANG_BLAME_SAMPLE]),
            "why": "more hosts behind than the pool can replace: the lag does not localize the fault",
        }
    }


def schedulable_hosts(run: ObservedRun) -> list[str]:
    return sorted(
        h
        for h, s in run.node_states.items()
        if s in (NodeState.healthy, NodeState.probation) and h not in run.busy_hosts
    )


def pick_hosts(run: ObservedRun) -> tuple[str, ...] | None:
    """`host_count` healthy free hosts, keeping the previous attempt's where they are still fit (locality),
    then filling up with spares in name order."""
    free = schedulable_hosts(run)
    if len(free) < run.host_count:
        return None
    previous = list(run.history[-1].hosts) if run.history else []
    chosen = [h for h in previous if h in free][: run.host_count]
    chosen += [h for h in free if h not in chosen][: run.host_count - len(chosen)]
    return tuple(chosen)
