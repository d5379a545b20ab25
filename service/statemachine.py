"""Explicit state machines: an enum, an allowed-transitions table, a typed error on a bad transition."""

from __future__ import annotations

import enum
from collections.abc import Mapping


class InvalidTransition(Exception):
    """A state change the transitions table does not allow (HTTP 409)."""

    def __init__(self, kind: str, current: enum.Enum, target: enum.Enum) -> None:
        super().__init__(f"{kind} cannot go from {current.value!r} to {target.value!r}")
        self.kind = kind
        self.current = current
        self.target = target


class RunPhase(enum.StrEnum):
    pending = "pending"
    starting = "starting"
    running = "running"
    restarting = "restarting"
    needs_attention = "needs_attention"
    completed = "completed"
    failed = "failed"
    stopped = "stopped"


class DesiredState(enum.StrEnum):
    running = "running"
    stopped = "stopped"


# Every phase a run can be reconciled in may go to needs_attention: the orchestrator escalates a run it
# cannot bring up (no hosts, a launch that keeps failing), whatever it was doing. An operator's restart of
# a live attempt goes running -> restarting -> starting, like an automatic one; stop reaches `stopped` from
# every phase but completed; start leaves `stopped` (and `failed`, `needs_attention`) through `starting`.
RUN_TRANSITIONS: Mapping[RunPhase, frozenset[RunPhase]] = {
    RunPhase.pending: frozenset(
        {RunPhase.starting, RunPhase.needs_attention, RunPhase.stopped, RunPhase.failed}
    ),
    RunPhase.starting: frozenset(
        {
            RunPhase.running,
            RunPhase.restarting,
            RunPhase.needs_attention,
            RunPhase.failed,
            RunPhase.stopped,
            RunPhase.completed,
        }
    ),
    RunPhase.running: frozenset(
        {RunPhase.restarting, RunPhase.needs_attention, RunPhase.completed, RunPhase.failed, RunPhase.stopped}
    ),
    RunPhase.restarting: frozenset(
        {RunPhase.starting, RunPhase.needs_attention, RunPhase.failed, RunPhase.stopped}
    ),
    # An operator (or the orchestrator after a repair) may resume a run that asked for help; an attempt
    # still running when the run was escalated may reach its target.
    RunPhase.needs_attention: frozenset(
        {RunPhase.starting, RunPhase.restarting, RunPhase.stopped, RunPhase.failed, RunPhase.completed}
    ),
    # A stopped or failed run can be started again by hand (and escalated if it cannot be); a completed
    # run is final.
    RunPhase.stopped: frozenset({RunPhase.starting, RunPhase.needs_attention}),
    RunPhase.failed: frozenset({RunPhase.starting, RunPhase.needs_attention, RunPhase.stopped}),
    RunPhase.completed: frozenset(),
}

TERMINAL_PHASES = frozenset({RunPhase.completed, RunPhase.failed, RunPhase.stopped})
ACTIVE_PHASES = frozenset({RunPhase.starting, RunPhase.running, RunPhase.restarting})


def check_run_transition(current: RunPhase, target: RunPhase) -> None:
    if target not in RUN_TRANSITIONS[current]:
        raise InvalidTransition("run", current, target)


class NodeState(enum.StrEnum):
    healthy = "healthy"
    suspect = "suspect"
    cordoned = "cordoned"
    draining = "draining"
    probation = "probation"
    retired = "retired"


NODE_TRANSITIONS: Mapping[NodeState, frozenset[NodeState]] = {
    NodeState.healthy: frozenset(
        {NodeState.suspect, NodeState.cordoned, NodeState.draining, NodeState.retired}
    ),
    # An operator who vouches for a suspect node puts it on probation (a deep check must still pass).
    NodeState.suspect: frozenset(
        {NodeState.healthy, NodeState.cordoned, NodeState.draining, NodeState.retired, NodeState.probation}
    ),
    NodeState.draining: frozenset({NodeState.cordoned, NodeState.healthy, NodeState.retired}),
    # Repair (an operator's uncordon) puts a node on probation until a deep check passes.
    NodeState.cordoned: frozenset({NodeState.probation, NodeState.healthy, NodeState.retired}),
    NodeState.probation: frozenset(
        {NodeState.healthy, NodeState.suspect, NodeState.cordoned, NodeState.retired}
    ),
    # A retired (lemon) node returns only by an explicit operator action, to probation.
    NodeState.retired: frozenset({NodeState.probation}),
}

SCHEDULABLE_NODE_STATES = frozenset({NodeState.healthy, NodeState.probation})


def check_node_transition(current: NodeState, target: NodeState) -> None:
    if target not in NODE_TRANSITIONS[current]:
        raise InvalidTransition("node", current, target)


class CheckpointState(enum.StrEnum):
    writing = "writing"
    committed = "committed"
    verified = "verified"
    corrupt = "corrupt"
    deleted = "deleted"


CHECKPOINT_TRANSITIONS: Mapping[CheckpointState, frozenset[CheckpointState]] = {
    CheckpointState.writing: frozenset(
        {CheckpointState.committed, CheckpointState.corrupt, CheckpointState.deleted}
    ),
    CheckpointState.committed: frozenset(
        {CheckpointState.verified, CheckpointState.corrupt, CheckpointState.deleted}
    ),
    CheckpointState.verified: frozenset({CheckpointState.corrupt, CheckpointState.deleted}),
    CheckpointState.corrupt: frozenset({CheckpointState.deleted, CheckpointState.verified}),
    CheckpointState.deleted: frozenset(),
}


def check_checkpoint_transition(current: CheckpointState, target: CheckpointState) -> None:
    if target not in CHECKPOINT_TRANSITIONS[current]:
        raise InvalidTransition("checkpoint", current, target)


class LogKind(enum.StrEnum):
    failure = "failure"
    diagnosis = "diagnosis"
    action = "action"
    decision = "decision"
    note = "note"


class Severity(enum.StrEnum):
    info = "info"
    warning = "warning"
    error = "error"
    critical = "critical"


class Role(enum.StrEnum):
    viewer = "viewer"
    operator = "operator"
    admin = "admin"
    trainer = "trainer"


class DiagnosticStatus(enum.StrEnum):
    pending = "pending"
    passed = "passed"
    failed = "failed"
    degraded = "degraded"
    skipped = "skipped"
    timeout = "timeout"
    error = "error"


class DecisionStatus(enum.StrEnum):
    """A risky action the orchestrator proposes and a human approves (docs/orchestrator.md, approvals)."""

    pending = "pending"  # proposed, paged, waiting for an operator or its timeout
    approved = "approved"  # by an operator (their overrides, if any, replace the proposal's)
    rejected = "rejected"  # by an operator: the proposal is not carried out (their overrides may be)
    timed_out = "timed_out"  # nobody answered in time: the policy's `on_timeout` applies
    superseded = "superseded"  # an operator's restart or stop came first


# Approved, rejected and timed-out decisions are carried out once by the orchestrator's next launch (or
# escalation), which stamps them consumed; a decision's status never changes after it left `pending`.
DECISION_TRANSITIONS: Mapping[DecisionStatus, frozenset[DecisionStatus]] = {
    DecisionStatus.pending: frozenset(
        {
            DecisionStatus.approved,
            DecisionStatus.rejected,
            DecisionStatus.timed_out,
            DecisionStatus.superseded,
        }
    ),
    DecisionStatus.approved: frozenset(),
    DecisionStatus.rejected: frozenset(),
    DecisionStatus.timed_out: frozenset(),
    DecisionStatus.superseded: frozenset(),
}


def check_decision_transition(current: DecisionStatus, target: DecisionStatus) -> None:
    if target not in DECISION_TRANSITIONS[current]:
        raise InvalidTransition("decision", current, target)
