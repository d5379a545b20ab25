"""The one gateway that changes node state on the orchestrator's behalf: cordon, blame, deep-check hosts.

It implements the orchestrator's ``HealthGateway`` protocol (service/orchestrator/health_gateway.py)
with Celery sweeps (Redis or in-process), the cordon policy and the scheduler adapters (Slurm and
Kubernetes alike: the orchestrator's runtime builds them from settings, ``build_scheduler_adapters``).
Scheduler calls follow the one rule of service/fleet/scheduler.py: a failure is logged with its evidence
and never skips the blame or record that follows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from health.results import Level
from service.crud.nodes import get_node, transition_node
from service.db import transaction
from service.fleet.scheduler import SchedulerAdapter
from service.fleet.sweep import blame_nodes, charge_nodes, run_sweep
from service.fleet.sync import SyncReport, sync_schedulers
from service.statemachine import LogKind, NodeState


class SweepHealthGateway:
    """The real health layer: Celery sweeps (Redis or in-process), the cordon policy, scheduler adapters."""

    def __init__(
        self,
        session_factory: sessionmaker[Session],
        *,
        author: str = "system:orchestrator",
        adapters: Sequence[SchedulerAdapter] = (),
        app: Any = None,
    ) -> None:
        self._factory = session_factory
        self._author = author
        self._adapters = list(adapters)
        self._app = app

    def cordon(
        self,
        hosts: Sequence[str],
        *,
        reason: str,
        evidence: dict[str, Any],
        run_id: int | None,
        offence: str = "hardware",
        retire: bool = True,
    ) -> list[str]:
        outcomes = charge_nodes(
            self._factory,
            hosts=list(hosts),
            kind=offence,
            failure=reason,
            consequence=NodeState.cordoned,
            author=self._author,
            run_id=run_id,
            evidence=evidence,
            adapters=self._adapters,
            app=self._app,
            retire=retire,
        )
        return [o.host for o in outcomes if o.retirement_withheld]

    def blame(
        self, hosts: Sequence[str], *, reason: str, run_id: int | None, retire: bool = True
    ) -> list[str]:
        outcomes = blame_nodes(
            self._factory,
            hosts=list(hosts),
            failure=reason,
            author=self._author,
            run_id=run_id,
            adapters=self._adapters,
            app=self._app,
            retire=retire,
        )
        return [o.host for o in outcomes if o.retirement_withheld]

    def retire(self, hosts: Sequence[str], *, reason: str, run_id: int | None) -> list[str]:
        """Retire cordoned lemons whose retirement an operator approved; returns those retired (a host an
        operator meanwhile repaired or retired is left as it is)."""
        retired = []
        for host in hosts:
            with transaction(self._factory) as session:
                node = get_node(session, hostname=host, for_update=True)
                if node.state is not NodeState.cordoned:
                    continue
                transition_node(
                    session,
                    node=node,
                    target=NodeState.retired,
                    reason=reason,
                    author=self._author,
                    evidence={"run_id": run_id},
                    kind=LogKind.decision,
                )
                retired.append(host)
        return retired

    def deep_check(self, hosts: Sequence[str], *, deadline_s: float) -> dict[str, bool]:
        kwargs: dict[str, Any] = {
            "hosts": list(hosts),
            "level": Level.deep,
            "deadline_s": deadline_s,
            "author": self._author,
            "adapters": self._adapters,
        }
        if self._app is not None:
            kwargs["app"] = self._app
        report = run_sweep(self._factory, **kwargs)
        fit = {NodeState.healthy, NodeState.probation}
        return {o.host: o.state in fit for o in report.hosts}

    @property
    def adapters(self) -> list[SchedulerAdapter]:
        return list(self._adapters)

    def sync_external(self) -> SyncReport:
        """Called by the orchestrator at the start of each pass: node states and every scheduler's agree,
        both ways (service/fleet/sync.py); with no adapters, nothing to do."""
        return sync_schedulers(self._factory, self._adapters, author=self._author)
