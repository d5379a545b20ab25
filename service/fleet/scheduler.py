"""Applying cordons to the schedulers that place work on hosts, and reading what they hold back.

Our own host pool is the control plane's node state (the orchestrator only places ranks on
``SCHEDULABLE_NODE_STATES``) and is always on; it needs no adapter: sweeps and the gateway change it
directly. Slurm and Kubernetes adapters mirror each cordon, and report their nodes (``external_states``)
for the one sync of service/fleet/sync.py.

One error-handling rule for every scheduler call: a failure (``scontrol`` exiting non-zero, the
Kubernetes API down or not answering within its timeout) is logged to the logbook with its evidence by
:func:`record_scheduler_failure` and never raised past the caller, so the node-state change, blame or
record that follows still happens.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from sqlalchemy.orm import Session

from service.crud.logbook import write_log
from service.fleet.slurm import REASON_PREFIX, checked_runner, parse_sinfo_nodes
from service.models import Node
from service.statemachine import LogKind, NodeState, Severity

log = logging.getLogger("trainops.fleet")


@dataclass(frozen=True)
class OutsideHold:
    """A host a scheduler keeps from new work for a reason of its own: an admin's drain, an outage."""

    condition: str  # how the scheduler holds it, in words: "drained outside trainops", "down"
    reason: str  # the scheduler's own reason ("fan noise, ticket 4711"); "" when it gives none
    evidence: dict[str, Any] = field(default_factory=dict)  # e.g. Slurm's states, for the logbook


@dataclass(frozen=True)
class SchedulerNodes:
    """What one scheduler says about its hosts, read once per sync pass."""

    known: frozenset[str]  # every host it has
    held: frozenset[str]  # hosts it keeps from new work, whoever decided (a drain, a cordon, our taint)
    ours: frozenset[str]  # of those, the ones trainops' own cordon holds (our reason prefix, our taint)
    outside: dict[str, OutsideHold]  # host -> held or down for a reason not ours


class SchedulerAdapter(Protocol):
    name: str

    def cordon(self, host: str, reason: str) -> None:
        """Stop new work landing on ``host`` (running work is the orchestrator's call)."""

    def uncordon(self, host: str, reason: str) -> None:
        """Let work land on ``host`` again."""

    def external_states(self) -> SchedulerNodes:
        """The scheduler's hosts: which it holds, which of those trainops holds, which are out for a
        reason of the scheduler's own (drained by someone else, down)."""


def record_scheduler_failure(
    session: Session,
    *,
    adapter: SchedulerAdapter,
    action: str,
    node: Node,
    state: NodeState,
    error: BaseException,
    author: str,
) -> str:
    """Log a scheduler call that failed (``action`` = cordon / uncordon on ``node``) with its evidence; return
    the one-line error for the caller's report. The caller goes on: one scheduler's outage must stop
    neither the others nor the state change or blame that follows."""
    log.warning("%s could not %s %s: %s", adapter.name, action, node.hostname, error)
    write_log(
        session,
        kind=LogKind.failure,
        severity=Severity.error,
        message=f"{adapter.name} could not {action} {node.hostname}: {error}",
        author=f"{author}/{adapter.name}",
        node_id=node.id,
        evidence={"adapter": adapter.name, "state": state.value, "error": str(error)},
    )
    return f"{adapter.name}: {node.hostname}: {error}"


CommandRunner = Callable[[Sequence[str]], str]


class SlurmAdapter:
    """Drains and resumes Slurm nodes with ``scontrol`` (no shell: the reason is one argv element) and reads
    their states with ``sinfo --json``."""

    name = "slurm"
    REASON_PREFIX = REASON_PREFIX

    def __init__(self, run: CommandRunner | None = None, *, env: Mapping[str, str] | None = None) -> None:
        """``run`` takes an argv and returns stdout, raising on failure; by default the Slurm commands on
        PATH with ``env`` (e.g. ``SLURM_CONF``) over the process environment."""
        self._run = run or checked_runner(env)

    def cordon(self, host: str, reason: str) -> None:
        # Slurm keeps the reason on one line; it shows in `sinfo -R`.
        text = self.REASON_PREFIX + " ".join(reason.split())[:200]
        self._run(["scontrol", "update", f"NodeName={host}", "State=DRAIN", f"Reason={text}"])

    def uncordon(self, host: str, reason: str) -> None:
        self._run(["scontrol", "update", f"NodeName={host}", "State=RESUME"])

    def external_states(self) -> SchedulerNodes:
        """Drains with our ``trainops: `` reason are ours; any other drain, and any node Slurm has DOWN,
        DOWN* (not responding) or FAIL, is held outside trainops, with Slurm's reason."""
        nodes = parse_sinfo_nodes(self._run(["sinfo", "--json"]))
        outside: dict[str, OutsideHold] = {}
        for name, node in nodes.items():
            if node.down or (node.drained and not node.ours):
                outside[name] = OutsideHold(
                    condition="down" if node.down else "drained outside trainops",
                    reason=node.reason,
                    evidence={"slurm_states": sorted(node.states), "slurm_reason": node.reason},
                )
        return SchedulerNodes(
            known=frozenset(nodes),
            held=frozenset(n for n, node in nodes.items() if node.drained),
            ours=frozenset(n for n, node in nodes.items() if node.drained and node.ours),
            outside=outside,
        )


TAINT_KEY = "trainops.io/unhealthy"
REASON_ANNOTATION = "trainops.io/cordon-reason"


def _label_value(text: str) -> str:
    """A valid Kubernetes label/taint value: <= 63 chars of [A-Za-z0-9._-], alphanumeric at both ends."""
    value = re.sub(r"[^A-Za-z0-9._-]+", "-", text)[:63].strip("-._")
    return value or "unhealthy"


class KubernetesAdapter:
    """Cordons a node (``spec.unschedulable``) and taints it NoSchedule through ``CoreV1Api``.

    Every call is bounded by ``timeout_s`` (the client's ``_request_timeout``): an API server that does not
    answer raises like one that is down, and the caller logs it by the one rule."""

    name = "kubernetes"

    def __init__(self, core_v1: Any, *, timeout_s: float | None = None) -> None:
        self._api = core_v1
        self._timeout: dict[str, float] = {"_request_timeout": timeout_s} if timeout_s else {}

    def _other_taints(self, host: str) -> list[dict[str, Any]]:
        node = self._api.read_node(host, **self._timeout)
        taints = node.spec.taints or []
        return [{"key": t.key, "value": t.value, "effect": t.effect} for t in taints if t.key != TAINT_KEY]

    def cordon(self, host: str, reason: str) -> None:
        # The taints list is replaced whole by a patch, so keep everyone else's taints.
        taints = [
            *self._other_taints(host),
            {"key": TAINT_KEY, "value": _label_value(reason), "effect": "NoSchedule"},
        ]
        body = {
            "metadata": {"annotations": {REASON_ANNOTATION: reason}},
            "spec": {"unschedulable": True, "taints": taints},
        }
        self._api.patch_node(host, body, **self._timeout)

    def uncordon(self, host: str, reason: str) -> None:
        body = {
            "metadata": {"annotations": {REASON_ANNOTATION: None}},
            "spec": {"unschedulable": False, "taints": self._other_taints(host)},
        }
        self._api.patch_node(host, body, **self._timeout)

    def external_states(self) -> SchedulerNodes:
        """Our taint marks our cordons; an unschedulable node without it was cordoned by someone else
        (``kubectl cordon``)."""
        known: set[str] = set()
        held: set[str] = set()
        ours: set[str] = set()
        outside: dict[str, OutsideHold] = {}
        for node in self._api.list_node(**self._timeout).items:
            name = node.metadata.name
            known.add(name)
            tainted = any(t.key == TAINT_KEY for t in node.spec.taints or [])
            if tainted:
                ours.add(name)
            if node.spec.unschedulable or tainted:
                held.add(name)
            if node.spec.unschedulable and not tainted:
                outside[name] = OutsideHold(
                    condition="drained outside trainops", reason="cordoned outside trainops"
                )
        return SchedulerNodes(
            known=frozenset(known), held=frozenset(held), ours=frozenset(ours), outside=outside
        )
