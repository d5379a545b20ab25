"""One sync pass over every scheduler adapter: the control plane's node states and each scheduler's agree.

Level-triggered, run by the orchestrator at the start of each pass (``SweepHealthGateway.sync_external``).
Per adapter it reads ``external_states()`` once and, for each registered host:

- **held outside trainops** (a Slurm drain by an admin, a node Slurm has DOWN / DOWN* / FAIL, a
  ``kubectl cordon``): a node in service is cordoned in the control plane with the scheduler's reason
  (``slurm: n7 is down: <reason>``, ``kubernetes: gpu-2 is drained outside trainops: <reason>``; logbook
  author ``<author>/<adapter>``, evidence ``{adapter, external_reason, ...}``), so nothing is placed there;
- **given back**: a cordon this sync made for that adapter (reason prefix ``<adapter>: ``) is lifted to
  healthy once the scheduler no longer holds the host; an operator's or a sweep's cordon never is;
- **out of service in trainops but not held by the scheduler** (a cordon whose mirroring failed, or made
  while the scheduler was unreachable): cordoned there now;
- **back in service in trainops but still held by our own cordon there** (an operator's ``uncordon``, a
  passing deep check): released there.

Drains trainops made itself are not outside holds (each adapter tells them apart: our reason prefix, our
taint), so mirroring and syncing do not feed each other. The one error rule of service/fleet/scheduler.py
holds: an adapter that cannot list its nodes is logged with its evidence and skipped (its cordons are
neither made nor lifted on a guess), a cordon or release that fails is logged and the pass goes on to the
next host; the other adapters go on either way.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from sqlalchemy.orm import Session, sessionmaker

from service.crud.logbook import write_log
from service.crud.nodes import get_node, list_nodes, transition_node
from service.db import transaction
from service.fleet.scheduler import SchedulerAdapter, SchedulerNodes, record_scheduler_failure
from service.models import Node
from service.statemachine import LogKind, NodeState, Severity

log = logging.getLogger("trainops.fleet")

OUT_OF_SERVICE = (NodeState.cordoned, NodeState.retired, NodeState.draining)


@dataclass
class SyncReport:
    """What one pass did; every entry is ``<adapter>:<host>``."""

    cordoned: list[str] = field(default_factory=list)  # held outside trainops -> cordoned here
    released: list[str] = field(default_factory=list)  # the scheduler gave it back -> healthy here
    mirrored: list[str] = field(default_factory=list)  # out of service here -> cordoned in the scheduler
    resumed: list[str] = field(default_factory=list)  # back in service here -> released in the scheduler
    errors: list[str] = field(default_factory=list)  # scheduler calls that failed (logged with evidence)


def sync_prefix(adapter: SchedulerAdapter) -> str:
    """The reason prefix of the control-plane cordons this sync makes for ``adapter`` (``slurm: ``)."""
    return f"{adapter.name}: "


def sync_schedulers(
    session_factory: sessionmaker[Session],
    adapters: Sequence[SchedulerAdapter],
    *,
    author: str = "system:fleet",
) -> SyncReport:
    """One pass over ``adapters`` in order (see the module's docstring); hosts not registered are ignored."""
    report = SyncReport()
    for adapter in adapters:
        try:
            view = adapter.external_states()
        except Exception as error:  # one scheduler's outage must stop neither the others nor the pass
            log.warning("%s could not list its nodes: %s", adapter.name, error)
            with transaction(session_factory) as session:
                write_log(
                    session,
                    kind=LogKind.failure,
                    severity=Severity.error,
                    message=f"{adapter.name} could not list its nodes: {error}",
                    author=f"{author}/{adapter.name}",
                    evidence={"adapter": adapter.name, "action": "external_states", "error": str(error)},
                )
            report.errors.append(f"{adapter.name}: {error}")
            continue
        with transaction(session_factory) as session:
            nodes, _ = list_nodes(session, limit=1_000_000)
            registered = {n.hostname for n in nodes}
            synced = {n.hostname for n in nodes if _cordoned_by_sync(n, adapter)}
        for host in sorted(((view.known | set(view.outside)) & registered) | synced):
            with transaction(session_factory) as session:
                node = get_node(session, hostname=host, for_update=True)
                _sync_host(session, node=node, adapter=adapter, view=view, author=author, report=report)
    return report


def _cordoned_by_sync(node: Node, adapter: SchedulerAdapter) -> bool:
    return node.state is NodeState.cordoned and (node.state_reason or "").startswith(sync_prefix(adapter))


def _sync_host(
    session: Session,
    *,
    node: Node,
    adapter: SchedulerAdapter,
    view: SchedulerNodes,
    author: str,
    report: SyncReport,
) -> None:
    host, by, prefix = node.hostname, f"{author}/{adapter.name}", sync_prefix(adapter)
    hold = view.outside.get(host)
    ours_by_sync = _cordoned_by_sync(node, adapter)
    if hold is not None and node.state not in OUT_OF_SERVICE:
        transition_node(
            session,
            node=node,
            target=NodeState.cordoned,
            reason=f"{prefix}{host} is {hold.condition}: {hold.reason or 'no reason given'}",
            author=by,
            evidence={"adapter": adapter.name, "external_reason": hold.reason, **hold.evidence},
            severity=Severity.warning,
        )
        report.cordoned.append(f"{adapter.name}:{host}")
    elif hold is None and ours_by_sync:
        transition_node(
            session,
            node=node,
            target=NodeState.healthy,
            reason=f"{prefix}{host} is back in service in {adapter.name}",
            author=by,
            evidence={"adapter": adapter.name},
        )
        report.released.append(f"{adapter.name}:{host}")
    elif node.state in OUT_OF_SERVICE and not ours_by_sync and host in view.known and host not in view.held:
        _mirror(session, node, adapter, "cordon", author=author, report=report)
    elif node.state not in OUT_OF_SERVICE and host in view.ours:
        _mirror(session, node, adapter, "uncordon", author=author, report=report)


def _mirror(
    session: Session, node: Node, adapter: SchedulerAdapter, action: str, *, author: str, report: SyncReport
) -> None:
    """Cordon or release ``node`` in ``adapter``'s scheduler with the node's reason, and log it; a failure
    is logged by the one rule and the pass goes on (the sync is level-triggered: the next pass retries)."""
    reason = node.state_reason or node.state.value
    try:
        if action == "cordon":
            adapter.cordon(node.hostname, reason)
        else:
            adapter.uncordon(node.hostname, reason)
    except Exception as error:  # logged with evidence; never stops the pass
        report.errors.append(
            record_scheduler_failure(
                session,
                adapter=adapter,
                action=action,
                node=node,
                state=node.state,
                error=error,
                author=author,
            )
        )
        return
    if action == "cordon":
        what, done = f"cordoned in {adapter.name} (out of service in trainops)", report.mirrored
    else:
        what, done = f"released in {adapter.name} (back in service in trainops)", report.resumed
    write_log(
        session,
        kind=LogKind.action,
        severity=Severity.info,
        message=f"node {node.hostname}: {what}",
        author=f"{author}/{adapter.name}",
        node_id=node.id,
        evidence={"adapter": adapter.name, "state": node.state.value, "state_reason": node.state_reason},
    )
    done.append(f"{adapter.name}:{node.hostname}")
