"""The cordon policy: a pure function of (node state, recent history, new results, rules) -> decision.

The rules are data (:class:`CordonRules`); the function holds no I/O and is tested as a table. Applying
a decision (state change, logbook, scheduler adapters) happens in :mod:`service.fleet.sweep`.
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from health.config import HealthConfig
from health.results import CheckResult, CheckStatus, Fault, Level
from service.statemachine import NodeState


class Verdict(enum.StrEnum):
    """One sweep's judgement of one host, worst first."""

    hard = "hard"
    soft = "soft"
    missed = "missed"
    clean = "clean"


DEEP_ACTIVE_CHECKS = frozenset(
    {
        "torch.gemm",
        "torch.memory_pattern",
        "torch.allreduce_local",
        "host.disk_throughput",
        "fabric.allreduce",
        "fabric.pairs",
    }
)


@dataclass(frozen=True, kw_only=True)
class CordonRules:
    """Thresholds of the cordon policy."""

    hard_faults: frozenset[str] = frozenset(
        {
            Fault.ecc_dbe,
            Fault.xid_79,
            Fault.xid_48,
            Fault.gpu_missing,
            Fault.gpu_lost,
            Fault.row_remap_failure,
            Fault.nvlink_down,
            Fault.memory_pattern,
            Fault.recovery_action,
            Fault.link_down,
        }
    )
    """Faults that cordon at once: the GPU is broken or its data cannot be trusted."""
    strikes_to_cordon: int = 3
    """Consecutive sweeps with a soft finding or a missed deadline (this one included) that cordon."""
    clean_sweeps_to_recover: int = 2
    """Consecutive clean sweeps that return a suspect node to healthy."""
    flap_window: int = 12
    """Sweeps of history looked at for flapping."""
    flaps_to_cordon: int = 3
    """Recoveries (a bad sweep followed by a clean one) within the window after which a soft finding
    cordons at once instead of making the node suspect again (flap damping)."""
    lemon_score_limit: float = 2.5
    """Lemon score at which a node is retired: every hardware failure attributed to it (a hang it is blamed
    for, a confirmed straggler, a crash on it while unfit, a cordon by failed diagnostics) counts 1, decayed
    by its age (``lemon_half_life_s``). With the defaults: three within about a week retire a node, three
    spread over a month do not, and four within three weeks do."""
    lemon_half_life_s: float = 14 * 24 * 3600.0
    """Age at which an offence counts half: old offences fade, a host that keeps failing does not."""

    def __post_init__(self) -> None:
        for name in ("strikes_to_cordon", "clean_sweeps_to_recover"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.flap_window < self.flaps_to_cordon * 2:
            raise ValueError("flap_window must hold at least flaps_to_cordon bad/clean pairs")
        if self.lemon_score_limit < 1:
            raise ValueError("lemon_score_limit must be >= 1 (one fresh offence must not retire a node)")
        if self.lemon_half_life_s <= 0:
            raise ValueError("lemon_half_life_s must be > 0")

    @classmethod
    def from_config(cls, config: HealthConfig) -> CordonRules:
        """The rules with the lemon settings of the health config (``TRAINOPS_HEALTH_LEMON_*``)."""
        return cls(lemon_score_limit=config.lemon_score_limit, lemon_half_life_s=config.lemon_half_life_s)

    def history_sweeps(self) -> int:
        return max(self.flap_window, self.strikes_to_cordon)

    def lemon_horizon_s(self) -> float:
        """Offences older than this weigh under 0.1% each: they need not be read."""
        return 10 * self.lemon_half_life_s


@dataclass(frozen=True, kw_only=True)
class Finding:
    check: str
    status: CheckStatus
    faults: tuple[str, ...]
    reason: str
    hard: bool


def classify(
    results: Sequence[CheckResult], level: Level, rules: CordonRules
) -> tuple[Verdict, list[Finding]]:
    """A sweep's verdict on one host from its check results. ``skipped`` is no evidence either way, unless
    the skipped result names a fault (NVML missing on a host that declares GPUs): then the skipped checks
    are one finding, soft unless the rules call its fault hard."""
    findings: list[Finding] = []
    skipped_with_fault = [r for r in results if r.status is CheckStatus.skipped and r.faults]
    if skipped_with_fault:
        faults = tuple(sorted({f for r in skipped_with_fault for f in r.faults}))
        first = skipped_with_fault[0]
        findings.append(
            Finding(
                check=first.check if len(skipped_with_fault) == 1 else f"{first.check.split('.')[0]}.*",
                status=CheckStatus.skipped,
                faults=faults,
                reason=f"{len(skipped_with_fault)} check(s) skipped "
                f"({', '.join(r.check for r in skipped_with_fault)}): {first.reason}",
                hard=bool(set(faults) & rules.hard_faults),
            )
        )
    for result in results:
        if result.status in (CheckStatus.passed, CheckStatus.skipped):
            continue
        hard = bool(set(result.faults) & rules.hard_faults) or (
            # A failed active load test on a deep sweep means the node cannot train: cordon (like DCGM r2/r3).
            level is Level.deep and result.status is CheckStatus.failed and result.check in DEEP_ACTIVE_CHECKS
        )
        findings.append(
            Finding(
                check=result.check,
                status=result.status,
                faults=tuple(result.faults),
                reason=result.reason or result.status.value,
                hard=hard,
            )
        )
    if any(f.hard for f in findings):
        return Verdict.hard, findings
    if any(Fault.missed_deadline in f.faults for f in findings):
        return Verdict.missed, findings
    if findings:
        return Verdict.soft, findings
    return Verdict.clean, findings


@dataclass(frozen=True, kw_only=True)
class Decision:
    """What to do with a node. ``target`` None = leave its state as it is."""

    target: NodeState | None
    reason: str
    evidence: dict[str, Any] = field(default_factory=dict)


def _run_length(verdicts: Sequence[Verdict], matches: set[Verdict]) -> int:
    count = 0
    for verdict in verdicts:
        if verdict not in matches:
            break
        count += 1
    return count


def _flaps(verdicts: Sequence[Verdict]) -> int:
    """Recoveries in newest-first ``verdicts``: a clean sweep directly after a bad one."""
    return sum(
        1
        for newer, older in itertools.pairwise(verdicts)
        if newer is Verdict.clean and older is not Verdict.clean
    )


BAD = {Verdict.soft, Verdict.missed, Verdict.hard}


def decide(
    *,
    state: NodeState,
    verdict: Verdict,
    findings: Sequence[Finding],
    history: Sequence[Verdict],
    rules: CordonRules,
    level: Level = Level.quick,
) -> Decision:
    """The policy. ``history`` holds earlier sweeps' verdicts, newest first (this sweep not included);
    ``level`` is this sweep's (a node on probation graduates only on a clean deep sweep)."""
    verdicts = [verdict, *history][: rules.history_sweeps() + 1]
    strikes = _run_length(verdicts, BAD)
    flaps = _flaps(verdicts[: rules.flap_window])
    summary = "; ".join(f"{f.check}: {f.reason}" for f in findings) or "all checks passed"
    evidence: dict[str, Any] = {
        "verdict": verdict.value,
        "findings": [
            {
                "check": f.check,
                "status": f.status.value,
                "faults": list(f.faults),
                "reason": f.reason,
                "hard": f.hard,
            }
            for f in findings
        ],
        "consecutive_bad_sweeps": strikes,
        "flaps_in_window": flaps,
        "recent_verdicts": [v.value for v in verdicts],
        "level": level.value,
    }
    stay = Decision(target=None, reason=summary, evidence=evidence)

    # Cordoned nodes wait for repair and retired ones for an operator: automation never moves them back.
    if state in (NodeState.cordoned, NodeState.retired):
        return stay
    if verdict is Verdict.hard:
        return Decision(target=NodeState.cordoned, reason=f"hard fault: {summary}", evidence=evidence)
    if state is NodeState.draining:
        return stay  # a drain in progress is the operator's; only a hard fault overrides it
    if verdict in (Verdict.soft, Verdict.missed):
        if state is NodeState.probation and verdict is Verdict.soft:
            return Decision(
                target=NodeState.cordoned,
                reason=f"failed again while on probation: {summary}",
                evidence=evidence,
            )
        if strikes >= rules.strikes_to_cordon:
            return Decision(
                target=NodeState.cordoned,
                reason=f"{strikes} bad sweeps in a row (limit {rules.strikes_to_cordon}): {summary}",
                evidence=evidence,
            )
        if flaps >= rules.flaps_to_cordon:
            return Decision(
                target=NodeState.cordoned,
                reason=f"flapping: recovered {flaps} times in the last {rules.flap_window} sweeps "
                f"and failed again: "
                f"{summary}",
                evidence=evidence,
            )
        if state in (NodeState.healthy, NodeState.probation):
            return Decision(target=NodeState.suspect, reason=summary, evidence=evidence)
        return stay
    clean_run = _run_length(verdicts, {Verdict.clean})
    if (
        state is NodeState.suspect
        and clean_run >= rules.clean_sweeps_to_recover
        and flaps < rules.flaps_to_cordon
    ):
        return Decision(
            target=NodeState.healthy, reason=f"{clean_run} clean sweeps in a row", evidence=evidence
        )
    if state is NodeState.probation:
        if level is Level.deep:
            return Decision(
                target=NodeState.healthy,
                reason="probation passed: the deep diagnostics are clean",
                evidence=evidence,
            )
        return Decision(target=None, reason="on probation until a deep check passes", evidence=evidence)
    return stay


@dataclass(frozen=True, kw_only=True)
class Offence:
    """A hardware failure attributed to a host: what (hang, straggler, hardware, diagnostics), why, age."""

    kind: str
    reason: str
    age_s: float


def lemon_score(offences: Sequence[Offence], *, half_life_s: float) -> float:
    """Each offence counts 1, halved for every ``half_life_s`` of its age."""
    return sum(0.5 ** (max(o.age_s, 0.0) / half_life_s) for o in offences)


def decide_offence(
    *, state: NodeState, offences: Sequence[Offence], consequence: NodeState, rules: CordonRules
) -> Decision:
    """A host charged with a hardware failure: retired once its decayed lemon score reaches the limit,
    else ``consequence`` (suspect for a blamed hang, cordoned for a confirmed fault) where that is worse than
    where it is. ``offences`` include this one, newest first."""
    # to 3 decimals: three offences minutes apart are three offences, not 2.9999
    score = round(lemon_score(offences, half_life_s=rules.lemon_half_life_s), 3)
    last = offences[0].reason if offences else "no offence"
    evidence: dict[str, Any] = {
        "lemon_score": round(score, 3),
        "lemon_score_limit": rules.lemon_score_limit,
        "lemon_half_life_s": rules.lemon_half_life_s,
        "offences": [
            {
                "kind": o.kind,
                "reason": o.reason,
                "age_s": round(o.age_s, 1),
                "weight": round(0.5 ** (max(o.age_s, 0.0) / rules.lemon_half_life_s), 3),
            }
            for o in offences
        ],
        "failure": last,
    }
    if state is NodeState.retired:
        return Decision(target=None, reason="already retired", evidence=evidence)
    if score >= rules.lemon_score_limit:
        return Decision(
            target=NodeState.retired,
            reason=f"lemon: score {score:.2f} from {len(offences)} hardware failure(s) (limit "
            f"{rules.lemon_score_limit:g}, half-life {rules.lemon_half_life_s / 86400:g} d); last: {last}",
            evidence=evidence,
        )
    worse = {
        NodeState.suspect: {NodeState.healthy, NodeState.probation},
        NodeState.cordoned: {NodeState.healthy, NodeState.probation, NodeState.suspect, NodeState.draining},
    }
    if state in worse.get(consequence, set()):
        return Decision(
            target=consequence,
            reason=f"{last} (lemon score {score:.2f} of {rules.lemon_score_limit:g})",
            evidence=evidence,
        )
    return Decision(
        target=None,
        reason=f"charged: {last} (lemon score {score:.2f} of {rules.lemon_score_limit:g})",
        evidence=evidence,
    )
