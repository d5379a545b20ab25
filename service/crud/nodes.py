"""Nodes and their GPUs: registration, state changes (each one logged with evidence)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session, selectinload

from service.crud.logbook import write_log
from service.errors import Conflict, NotFound
from service.models import Gpu, Node, NodeOffence, utcnow
from service.statemachine import LogKind, NodeState, Severity, check_node_transition


def get_node(session: Session, *, hostname: str, for_update: bool = False) -> Node:
    query = sa.select(Node).where(Node.hostname == hostname).options(selectinload(Node.gpus))
    if for_update:
        query = query.with_for_update()
    node = session.scalar(query)
    if node is None:
        raise NotFound(f"node {hostname!r} is not registered")
    return node


def find_node(session: Session, *, hostname: str) -> Node | None:
    return session.scalar(sa.select(Node).where(Node.hostname == hostname))


def list_nodes(
    session: Session,
    *,
    states: Sequence[NodeState] = (),
    hostnames: Sequence[str] = (),
    limit: int = 100,
    offset: int = 0,
) -> tuple[list[Node], int]:
    query = sa.select(Node)
    if states:
        query = query.where(Node.state.in_(list(states)))
    if hostnames:
        query = query.where(Node.hostname.in_(list(hostnames)))
    total = session.scalar(sa.select(sa.func.count()).select_from(query.subquery())) or 0
    rows = session.scalars(
        query.options(selectinload(Node.gpus)).order_by(Node.hostname).limit(limit).offset(offset)
    ).all()
    return list(rows), total


def node_states(session: Session) -> list[tuple[str, NodeState, dt.datetime]]:
    """Every registered node's (hostname, state, state_changed_at), as plain rows: what the orchestrator
    reads of the pool once per pass (no ORM objects: a pool has thousands of nodes)."""
    query = sa.select(Node.hostname, Node.state, Node.state_changed_at).order_by(Node.hostname)
    return [(hostname, state, changed) for hostname, state, changed in session.execute(query)]


def register_node(
    session: Session,
    *,
    hostname: str,
    labels: dict[str, Any] | None = None,
    gpus: Sequence[dict[str, Any]] = (),
    author: str,
) -> tuple[Node, bool]:
    """Create the node or refresh its labels and GPU inventory. Returns (node, created)."""
    node = session.scalar(
        sa.select(Node).where(Node.hostname == hostname).options(selectinload(Node.gpus)).with_for_update()
    )
    created = node is None
    if node is None:
        node = Node(
            hostname=hostname, labels=labels or {}, state=NodeState.healthy, state_changed_at=utcnow()
        )
        session.add(node)
    elif labels is not None:
        node.labels = labels
    if gpus or created:
        _replace_gpus(session, node, gpus)
    node.last_heartbeat_at = utcnow()
    session.flush()
    if created:
        write_log(
            session,
            kind=LogKind.action,
            message=f"node {hostname} registered with {len(gpus)} GPU(s)",
            author=author,
            node_id=node.id,
            evidence={"labels": node.labels, "gpus": [dict(g) for g in gpus]},
        )
    return node, created


def _replace_gpus(session: Session, node: Node, gpus: Sequence[dict[str, Any]]) -> None:
    by_index = {g.index: g for g in node.gpus}
    wanted = {int(g["index"]) for g in gpus}
    for gpu in list(node.gpus):
        if gpu.index not in wanted:
            node.gpus.remove(gpu)
    session.flush()
    for spec in gpus:
        gpu = by_index.get(int(spec["index"]))
        if gpu is None:
            node.gpus.append(
                Gpu(
                    index=int(spec["index"]),
                    uuid=spec["uuid"],
                    model=spec["model"],
                    memory_mb=spec["memory_mb"],
                )
            )
        else:
            gpu.uuid, gpu.model, gpu.memory_mb = spec["uuid"], spec["model"], spec["memory_mb"]


def node_heartbeat(session: Session, *, hostname: str, at: dt.datetime | None = None) -> Node:
    node = get_node(session, hostname=hostname)
    node.last_heartbeat_at = at or utcnow()
    return node


def transition_node(
    session: Session,
    *,
    node: Node,
    target: NodeState,
    reason: str,
    author: str,
    evidence: dict[str, Any] | None = None,
    kind: LogKind = LogKind.action,
    severity: Severity | None = None,
) -> Node:
    """Move a node to ``target`` if the transitions table allows it, and log why.

    Moving to the state it is already in is a no-op (idempotent apply), not an error.
    """
    if node.state == target:
        return node
    check_node_transition(node.state, target)
    previous = node.state
    node.state = target
    node.state_reason = reason
    node.state_changed_at = utcnow()
    if severity is None:
        severity = Severity.warning if target in (NodeState.cordoned, NodeState.retired) else Severity.info
    write_log(
        session,
        kind=kind,
        severity=severity,
        message=f"node {node.hostname}: {previous.value} -> {target.value}: {reason}",
        author=author,
        node_id=node.id,
        evidence={"from": previous.value, "to": target.value, **(evidence or {})},
    )
    session.flush()
    return node


def cordon_node(
    session: Session, *, hostname: str, reason: str, author: str, evidence: dict[str, Any] | None = None
) -> Node:
    node = get_node(session, hostname=hostname, for_update=True)
    if node.state == NodeState.retired:
        raise Conflict(f"node {hostname} is retired; put it on probation before cordoning it")
    return transition_node(
        session, node=node, target=NodeState.cordoned, reason=reason, author=author, evidence=evidence
    )


def uncordon_node(session: Session, *, hostname: str, reason: str, author: str) -> Node:
    """Return a node to service. A cordoned, suspect or retired one goes on probation until a deep check
    passes (the health sweep graduates it); a drained one (maintenance, not a fault) straight to healthy."""
    node = get_node(session, hostname=hostname, for_update=True)
    if node.state in (NodeState.healthy, NodeState.probation):
        raise Conflict(f"node {hostname} is not cordoned (it is {node.state.value})")
    target = NodeState.healthy if node.state == NodeState.draining else NodeState.probation
    return transition_node(
        session,
        node=node,
        target=target,
        reason=reason,
        author=author,
        evidence={"until": "a deep check passes"} if target == NodeState.probation else None,
    )


def record_offence(
    session: Session,
    *,
    node: Node,
    kind: str,
    reason: str,
    author: str,
    run_id: int | None = None,
    at: dt.datetime | None = None,
) -> NodeOffence:
    """Charge the node with a hardware failure (a row in ``node_offences``; ``blame_count`` counts them all
    time), and log why."""
    offence = NodeOffence(node_id=node.id, kind=kind, reason=reason, run_id=run_id, at=at or utcnow())
    session.add(offence)
    node.blame_count += 1
    write_log(
        session,
        kind=LogKind.failure,
        severity=Severity.warning,
        message=f"node {node.hostname} charged with a hardware failure ({kind}; {node.blame_count} so far): "
        f"{reason}",
        author=author,
        run_id=run_id,
        node_id=node.id,
        evidence={"offence": kind, "blame_count": node.blame_count, "failure": reason},
    )
    session.flush()
    return offence


def recent_offences(session: Session, *, node: Node, since: dt.datetime) -> list[NodeOffence]:
    """The node's offences at or after ``since``, newest first."""
    return list(
        session.scalars(
            sa.select(NodeOffence)
            .where(NodeOffence.node_id == node.id, NodeOffence.at >= since)
            .order_by(NodeOffence.at.desc(), NodeOffence.id.desc())
        )
    )
