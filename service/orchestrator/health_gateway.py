"""What the orchestrator asks of the health layer: cordon, blame, deep-check hosts."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from sqlalchemy.orm import Session, sessionmaker

from service.statemachine import NodeState


class HealthGateway(Protocol):
    def cordon(
        self,
        hosts: Sequence[str],
        *,
        reason: str,
        evidence: dict[str, Any],
        run_id: int | None,
        offence: str = "hardware",
    ) -> None:
        """Cordon `hosts` for a hardware failure of theirs (an `offence` of that kind: it counts to their
        lemon score; a lemon is retired instead)."""
        ...

    def blame(self, hosts: Sequence[str], *, reason: str, run_id: int | None) -> None:
        """`hosts` are the likely cause of a hang: suspect (to be checked), or retired as a lemon."""
        ...

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
        self,
        hosts: Sequence[str],
        *,
        reason: str,
        evidence: dict[str, Any],
        run_id: int | None,
        offence: str = "hardware",
    ) -> None:
        from health.sweep import charge_nodes

        charge_nodes(
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
        )

    def blame(self, hosts: Sequence[str], *, reason: str, run_id: int | None) -> None:
        from health.sweep import blame_nodes

        blame_nodes(
            self._factory,
            hosts=list(hosts),
            failure=reason,
            author=self._author,
            run_id=run_id,
            adapters=self._adapters,
            app=self._app,
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
