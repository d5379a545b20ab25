"""The cordon policy: a pure function of (node state, recent history, new results, rules) -> decision.

The rules are data (:class:`CordonRules`); the function holds no I/O and is tested as a table. Applying
a decision (state change, logbook, scheduler adapters) happens in :mod:`health.sweep`.
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

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
    clean_sweeps_to_graduate: int = 3
    """Consecutive clean sweeps that return a node on probation to healthy."""
    flap_window: int = 12
    """Sweeps of history looked at for flapping."""
    flaps_to_cordon: int = 3
    """Recoveries (a bad sweep followed by a clean one) within the window after which a soft finding
    cordons at once instead of making the node suspect again (flap damping)."""
    lemon_blame_count: int = 3
    """Run failures a node may be blamed for before it is retired as a lemon."""

    def __post_init__(self) -> None:
        for name in ("strikes_to_cordon", "clean_sweeps_to_recover", "clean_sweeps_to_graduate"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.flap_window < self.flaps_to_cordon * 2:
            raise ValueError("flap_window must hold at least flaps_to_cordon bad/clean pairs")
        if self.lemon_blame_count < 1:
            raise ValueError("lemon_blame_count must be >= 1")

    def history_sweeps(self) -> int:
        return max(self.flap_window, self.strikes_to_cordon, self.clean_sweeps_to_graduate)


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
    """A sweep's verdict on one host from its check results; ``skipped`` is no evidence either way."""
    findings: list[Finding] = []
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
) -> Decision:
    """The policy. ``history`` holds earlier sweeps' verdicts, newest first (this sweep not included)."""
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
    if state is NodeState.probation and clean_run >= rules.clean_sweeps_to_graduate:
        return Decision(
            target=NodeState.healthy,
            reason=f"probation passed: {clean_run} clean sweeps in a row",
            evidence=evidence,
        )
    return stay


def decide_blame(*, state: NodeState, blame_count: int, reason: str, rules: CordonRules) -> Decision:
    """A node implicated in a run failure: suspect (to be checked), or retired once it is a lemon.

    ``blame_count`` includes this failure.
    """
    evidence = {"blame_count": blame_count, "lemon_blame_count": rules.lemon_blame_count, "failure": reason}
    if state is NodeState.retired:
        return Decision(target=None, reason="already retired", evidence=evidence)
    if blame_count >= rules.lemon_blame_count:
        return Decision(
            target=NodeState.retired,
            reason=f"lemon: implicated in {blame_count} run failures "
            f"(limit {rules.lemon_blame_count}); last: {reason}",
            evidence=evidence,
        )
    if state in (NodeState.healthy, NodeState.probation):
        return Decision(
            target=NodeState.suspect,
            reason=f"implicated in a run failure ({blame_count}/{rules.lemon_blame_count}): {reason}",
            evidence=evidence,
        )
    return Decision(
        target=None, reason=f"blamed ({blame_count}/{rules.lemon_blame_count}): {reason}", evidence=evidence
    )
