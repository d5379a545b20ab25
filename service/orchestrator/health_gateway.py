"""What the orchestrator asks of the health layer: cordon, blame, deep-check hosts."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from sqlalchemy.orm import Session, sessionmaker

from service.crud.nodes import get_node, transition_node
from service.db import transaction
from service.statemachine import NodeState


class HealthGateway(Protocol):
    def cordon(
        self, hosts: Sequence[str], *, reason: str, evidence: dict[str, Any], run_id: int | None
    ) -> None: ...

    def blame(self, hosts: Sequence[str], *, reason: str, run_id: int | None) -> None: ...

    def deep_check(self, hosts: Sequence[str], *, deadline_s: float) -> dict[str, bool]:
        """Run deep diagnostics on `hosts`, applying the cordon policy; host -> still fit to use."""
        ...


class SweepHealthGateway:
    """The real health layer: Celery sweeps (Redis or in-process), the cordon policy, scheduler adapters."""

    def __init__(
        self,
        session_factory: sessionmaker[Session],
        *,
        author: str = "system:orchestrator",
        adapters: Sequence[Any] = (),
        app: Any = None,
    ) -> None:
        self._factory = session_factory
        self._author = author
        self._adapters = list(adapters)
        self._app = app

    def cordon(
        self, hosts: Sequence[str], *, reason: str, evidence: dict[str, Any], run_id: int | None
    ) -> None:
        for host in hosts:
            with transaction(self._factory) as session:
                node = get_node(session, hostname=host, for_update=True)
                if node.state in (
                    NodeState.healthy,
                    NodeState.probation,
                    NodeState.suspect,
                    NodeState.draining,
                ):
                    transition_node(
                        session,
                        node=node,
                        target=NodeState.cordoned,
                        reason=reason,
                        author=self._author,
                        evidence={"run_id": run_id, **evidence},
                    )
            for adapter in self._adapters:
                adapter.cordon(host, f"trainops: {reason}")

    def blame(self, hosts: Sequence[str], *, reason: str, run_id: int | None) -> None:
        from health.sweep import blame_nodes

        blame_nodes(
            self._factory,
            hosts=list(hosts),
            failure=reason,
            author=self._author,
            run_id=run_id,
            adapters=self._adapters,
        )

    def deep_check(self, hosts: Sequence[str], *, deadline_s: float) -> dict[str, bool]:
        from health.results import Level
        from health.sweep import run_sweep

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
