"""One sync pass over every scheduler adapter: drains made outside trainops become node states.

A node an admin cordoned in Kubernetes (``kubectl cordon``) or drained in Slurm (``scontrol update
State=DRAIN``) is reported by its adapter's ``external_drains()``; the pass cordons it in the control plane
with the scheduler's reason (``<adapter>: <host> is drained outside trainops: <reason>``, logbook entry with
the evidence) so the orchestrator places no work there, and releases it to healthy once the scheduler no
longer reports it, but only a cordon this pass made for that adapter (the reason's ``<adapter>: `` prefix):
an operator's or a sweep's cordon is never lifted here. Drains trainops made itself are not external (each
adapter leaves them out), so mirroring and syncing do not feed each other.

The one error rule of service/fleet/scheduler.py holds: an adapter that cannot list its drains is logged
with its evidence and skipped (its cordons are neither made nor lifted on a guess); the others go on.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from sqlalchemy.orm import Session, sessionmaker

from service.crud.logbook import write_log
from service.crud.nodes import get_node, list_nodes, transition_node
from service.db import transaction
from service.fleet.scheduler import SchedulerAdapter
from service.statemachine import LogKind, NodeState, Severity

log = logging.getLogger("trainops.fleet")

OUT_OF_SERVICE = (NodeState.cordoned, NodeState.retired, NodeState.draining)


@dataclass
class DrainSyncReport:
    cordoned: list[str] = field(default_factory=list)  # "adapter:host" drained outside trainops -> cordoned
    released: list[str] = field(default_factory=list)  # "adapter:host" the scheduler gave back -> healthy
    errors: list[str] = field(default_factory=list)  # adapters whose drains could not be read (logged)


def sync_prefix(adapter: SchedulerAdapter) -> str:
    """The reason prefix of the control-plane cordons this sync makes for ``adapter`` (``slurm: ``), the
    same one ``sync_slurm_nodes`` uses, so either can lift the other's cordons."""
    return f"{adapter.name}: "


def sync_external_drains(
    session_factory: sessionmaker[Session],
    adapters: Sequence[SchedulerAdapter],
    *,
    author: str = "system:fleet",
) -> DrainSyncReport:
    """One level-triggered pass: per adapter, outside drains -> cordoned, given back -> healthy (see the
    module's docstring). Entries are authored ``<author>/<adapter>``; hosts not registered are ignored."""
    report = DrainSyncReport()
    for adapter in adapters:
        by = f"{author}/{adapter.name}"
        prefix = sync_prefix(adapter)
        try:
            drains = adapter.external_drains()
        except Exception as error:  # one scheduler's outage must stop neither the others nor the pass
            log.warning("%s could not list external drains: %s", adapter.name, error)
            with transaction(session_factory) as session:
                write_log(
                    session,
                    kind=LogKind.failure,
                    severity=Severity.error,
                    message=f"{adapter.name} could not list external drains: {error}",
                    author=by,
                    evidence={"adapter": adapter.name, "action": "external_drains", "error": str(error)},
                )
            report.errors.append(f"{adapter.name}: {error}")
            continue
        with transaction(session_factory) as session:
            nodes, _ = list_nodes(session, limit=100_000)
            registered = {n.hostname for n in nodes}
            synced = {
                n.hostname
                for n in nodes
                if n.state is NodeState.cordoned and (n.state_reason or "").startswith(prefix)
            }
        for host in sorted((set(drains) & registered) | synced):
            with transaction(session_factory) as session:
                node = get_node(session, hostname=host, for_update=True)
                ours = node.state is NodeState.cordoned and (node.state_reason or "").startswith(prefix)
                if host in drains and node.state not in OUT_OF_SERVICE:
                    reason = drains[host] or "no reason given"
                    transition_node(
                        session,
                        node=node,
                        target=NodeState.cordoned,
                        reason=f"{prefix}{host} is drained outside trainops: {reason}",
                        author=by,
                        evidence={"adapter": adapter.name, "external_reason": drains[host]},
                        severity=Severity.warning,
                    )
                    report.cordoned.append(f"{adapter.name}:{host}")
                elif host not in drains and ours:
                    transition_node(
                        session,
                        node=node,
                        target=NodeState.healthy,
                        reason=f"{prefix}{host} is back in service in {adapter.name}",
                        author=by,
                        evidence={"adapter": adapter.name},
                    )
                    report.released.append(f"{adapter.name}:{host}")
    return report
