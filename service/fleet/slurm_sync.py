"""Keeping the control plane's node states and Slurm's agreeing.

`SlurmHealthGateway` is the orchestrator's health gateway with the Slurm cordon adapter, plus a
level-triggered sync (`sync_slurm_nodes`) run before every reconcile pass: drains and outages made outside
trainops (an admin's ``scontrol update State=DRAIN``, a node that went DOWN) cordon the node in the control
plane, and trainops' own drains (reason prefixed ``trainops:``) follow the control plane's node state. Both
change node state, so they live in fleet; the orchestrator's runtime builds the gateway when Slurm is enabled.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from service.crud.logbook import write_log
from service.crud.nodes import find_node, transition_node
from service.db import transaction
from service.fleet.gateway import SweepHealthGateway
from service.fleet.scheduler import SchedulerAdapter, SlurmAdapter, record_scheduler_failure
from service.fleet.slurm import SlurmRunner, checked_stdout, read_slurm_nodes
from service.statemachine import LogKind, NodeState, Severity

SYNC_AUTHOR = "system:orchestrator/slurm"
SYNC_PREFIX = "slurm: "  # control-plane cordons made by the sync, so it can lift them again


@dataclass
class SyncReport:
    cordoned: list[str] = field(default_factory=list)  # drained or down outside trainops -> cordoned
    released: list[str] = field(default_factory=list)  # Slurm gave the node back -> healthy
    drained: list[str] = field(default_factory=list)  # cordoned in trainops -> drained in Slurm
    resumed: list[str] = field(default_factory=list)  # back in service in trainops -> resumed in Slurm
    errors: list[str] = field(default_factory=list)  # scheduler calls that failed (logged with evidence)


def sync_slurm_nodes(
    session_factory: sessionmaker[Session], run: SlurmRunner, *, adapter: SlurmAdapter
) -> SyncReport:
    """One level-triggered pass over the nodes registered in both places.

    Outside drains and outages are findings: the node is cordoned with Slurm's reason (the logbook says
    so) and released when Slurm has it back. trainops' own drains follow the node state: a node cordoned,
    retired or draining in the control plane is drained in Slurm, and a node back in service is resumed.
    """
    report = SyncReport()
    slurm_nodes = read_slurm_nodes(run)
    out_of_service = (NodeState.cordoned, NodeState.retired, NodeState.draining)
    for name, slurm_node in sorted(slurm_nodes.items()):
        with transaction(session_factory) as session:
            node = find_node(session, hostname=name)
            if node is None:
                continue
            external = (slurm_node.drained and not slurm_node.ours) or slurm_node.down
            ours_by_sync = node.state is NodeState.cordoned and (node.state_reason or "").startswith(
                SYNC_PREFIX
            )
            if external and node.state not in out_of_service:
                what = "down" if slurm_node.down else "drained outside trainops"
                transition_node(
                    session,
                    node=node,
                    target=NodeState.cordoned,
                    reason=f"{SYNC_PREFIX}{name} is {what}: {slurm_node.reason or 'no reason given'}",
                    author=SYNC_AUTHOR,
                    evidence={"slurm_states": sorted(slurm_node.states), "slurm_reason": slurm_node.reason},
                    severity=Severity.warning,
                )
                report.cordoned.append(name)
            elif not external and ours_by_sync and not slurm_node.drained:
                transition_node(
                    session,
                    node=node,
                    target=NodeState.healthy,
                    reason=f"{SYNC_PREFIX}{name} is back in service in Slurm",
                    author=SYNC_AUTHOR,
                    evidence={"slurm_states": sorted(slurm_node.states)},
                )
                report.released.append(name)
            elif node.state in out_of_service and not ours_by_sync and not slurm_node.drained:
                try:
                    adapter.cordon(name, node.state_reason or node.state.value)
                except Exception as error:  # logged with evidence; the pass goes on to the next node
                    report.errors.append(
                        record_scheduler_failure(
                            session,
                            adapter=adapter,
                            action="cordon",
                            node=node,
                            state=node.state,
                            error=error,
                            author=SYNC_AUTHOR,
                        )
                    )
                    continue
                report.drained.append(name)
            elif node.state not in out_of_service and slurm_node.drained and slurm_node.ours:
                try:
                    adapter.uncordon(name, node.state_reason or "back in service")
                except Exception as error:  # logged with evidence; the pass goes on to the next node
                    report.errors.append(
                        record_scheduler_failure(
                            session,
                            adapter=adapter,
                            action="uncordon",
                            node=node,
                            state=node.state,
                            error=error,
                            author=SYNC_AUTHOR,
                        )
                    )
                    continue
                write_log(
                    session,
                    kind=LogKind.action,
                    severity=Severity.info,
                    message=f"node {name}: resumed in Slurm (back in service in trainops)",
                    author=SYNC_AUTHOR,
                    node_id=node.id,
                    evidence={"slurm_reason": slurm_node.reason},
                )
                report.resumed.append(name)
    return report


class SlurmHealthGateway(SweepHealthGateway):
    """The health gateway of an orchestrator on Slurm: cordons also drain in Slurm (via `SlurmAdapter`),
    and `sync_external` (called at the start of each reconcile pass) reconciles node states both ways."""

    def __init__(
        self,
        session_factory: sessionmaker[Session],
        *,
        env: Mapping[str, str] | None = None,
        author: str = "system:orchestrator",
        app: Any = None,
        other_adapters: Sequence[SchedulerAdapter] = (),
    ) -> None:
        command_env = {**os.environ, **(env or {})}

        def run(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
            return subprocess.run(list(argv), capture_output=True, text=True, timeout=60, env=command_env)

        def run_checked(argv: Sequence[str]) -> str:
            return checked_stdout(run(argv), " ".join(argv[:2]))

        self._slurm_run = run
        self.slurm_adapter = SlurmAdapter(run_checked)
        # other schedulers (Kubernetes) get the cordons too; the sync below is Slurm's own, both ways
        super().__init__(
            session_factory, author=author, adapters=[self.slurm_adapter, *other_adapters], app=app
        )

    def sync_external(self) -> SyncReport:
        return sync_slurm_nodes(self._factory, self._slurm_run, adapter=self.slurm_adapter)
