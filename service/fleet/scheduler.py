"""Applying cordons to the schedulers that place work on hosts.

Our own host pool is the control plane's node state (the orchestrator only places ranks on
``SCHEDULABLE_NODE_STATES``) and is always on; Slurm and Kubernetes adapters mirror each cordon.

One error-handling rule for every scheduler call: a failure (``scontrol`` exiting non-zero, the
Kubernetes API down) is logged to the logbook with its evidence by :func:`record_scheduler_failure` and
never raised past the caller, so the node-state change, blame or record that follows still happens.
"""

from __future__ import annotations

import logging
import re
import subprocess
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from sqlalchemy.orm import Session, sessionmaker

from service.crud.logbook import write_log
from service.crud.nodes import cordon_node, get_node, list_nodes, uncordon_node
from service.db import transaction
from service.models import Node
from service.statemachine import SCHEDULABLE_NODE_STATES, LogKind, NodeState, Severity

log = logging.getLogger("trainops.fleet")


class SchedulerAdapter(Protocol):
    name: str

    def cordon(self, host: str, reason: str) -> None:
        """Stop new work landing on ``host`` (running work is the orchestrator's call)."""

    def uncordon(self, host: str, reason: str) -> None:
        """Let work land on ``host`` again."""

    def external_drains(self) -> dict[str, str]:
        """Hosts drained by someone else (an admin, another tool): host -> reason."""


class OwnPoolAdapter:
    """The control plane's own pool: the node state itself. Idempotent with the sweep's transition."""

    name = "pool"

    def __init__(self, session_factory: sessionmaker[Session], *, author: str = "health/pool") -> None:
        self._factory = session_factory
        self._author = author

    def cordon(self, host: str, reason: str) -> None:
        with transaction(self._factory) as session:
            node = get_node(session, hostname=host, for_update=True)
            if node.state in SCHEDULABLE_NODE_STATES or node.state is NodeState.suspect:
                cordon_node(session, hostname=host, reason=reason, author=self._author)

    def uncordon(self, host: str, reason: str) -> None:
        with transaction(self._factory) as session:
            node = get_node(session, hostname=host, for_update=True)
            if node.state not in SCHEDULABLE_NODE_STATES:
                uncordon_node(session, hostname=host, reason=reason, author=self._author)

    def external_drains(self) -> dict[str, str]:
        with transaction(self._factory) as session:
            nodes, _ = list_nodes(session, states=[NodeState.cordoned, NodeState.draining], limit=100_000)
            return {n.hostname: n.state_reason or n.state.value for n in nodes}


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


def run_command(argv: Sequence[str]) -> str:
    return subprocess.run(list(argv), check=True, capture_output=True, text=True, timeout=30).stdout


class SlurmAdapter:
    """Drains and resumes Slurm nodes with ``scontrol`` (no shell: the reason is one argv element)."""

    name = "slurm"
    REASON_PREFIX = "trainops: "

    def __init__(self, run: CommandRunner = run_command) -> None:
        self._run = run

    def cordon(self, host: str, reason: str) -> None:
        # Slurm keeps the reason on one line; it shows in `sinfo -R`.
        text = self.REASON_PREFIX + " ".join(reason.split())[:200]
        self._run(["scontrol", "update", f"NodeName={host}", "State=DRAIN", f"Reason={text}"])

    def uncordon(self, host: str, reason: str) -> None:
        self._run(["scontrol", "update", f"NodeName={host}", "State=RESUME"])

    def external_drains(self) -> dict[str, str]:
        out = self._run(
            ["sinfo", "--noheader", "--Node", "--states=drain,drained,draining", "--format=%N|%E"]
        )
        drains: dict[str, str] = {}
        for line in out.splitlines():
            host, _, reason = line.strip().partition("|")
            if host and not reason.startswith(self.REASON_PREFIX):
                drains[host] = reason
        return drains


TAINT_KEY = "trainops.io/unhealthy"
REASON_ANNOTATION = "trainops.io/cordon-reason"


def _label_value(text: str) -> str:
    """A valid Kubernetes label/taint value: <= 63 chars of [A-Za-z0-9._-], alphanumeric at both ends."""
    value = re.sub(r"[^A-Za-z0-9._-]+", "-", text)[:63].strip("-._")
    return value or "unhealthy"


class KubernetesAdapter:
    """Cordons a node (``spec.unschedulable``) and taints it NoSchedule through ``CoreV1Api``."""

    name = "kubernetes"

    def __init__(self, core_v1: Any) -> None:
        self._api = core_v1

    @classmethod
    def from_kubeconfig(cls) -> KubernetesAdapter:
        from kubernetes import client, config

        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        return cls(client.CoreV1Api())

    def _other_taints(self, host: str) -> list[dict[str, Any]]:
        node = self._api.read_node(host)
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
        self._api.patch_node(host, body)

    def uncordon(self, host: str, reason: str) -> None:
        body = {
            "metadata": {"annotations": {REASON_ANNOTATION: None}},
            "spec": {"unschedulable": False, "taints": self._other_taints(host)},
        }
        self._api.patch_node(host, body)

    def external_drains(self) -> dict[str, str]:
        drains: dict[str, str] = {}
        for node in self._api.list_node().items:
            taints = node.spec.taints or []
            ours = any(t.key == TAINT_KEY for t in taints)
            if node.spec.unschedulable and not ours:
                drains[node.metadata.name] = "cordoned outside trainops"
        return drains
