"""What the REST API's diagnostics routes call: request/response schemas, the health app of an API process,
and :func:`diagnose` (run a sweep and wait, or start one on the shared queue)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.orm import Session, sessionmaker

from health.celery_app import HealthCelery, make_app
from health.checks import SELECTABLE_CHECKS
from health.config import HealthConfig
from service.config import Settings
from service.crud.nodes import get_node
from service.db import transaction
from service.errors import Unprocessable
from service.fleet.sweep import run_sweep
from service.fleet.tasks import trigger_sweep

MAX_DEADLINE_S = 3600.0


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class HostDiagnosticsRequest(_Strict):
    """``POST /api/v1/nodes/{host}/diagnostics``."""

    level: Literal["quick", "deep"] = "quick"
    checks: list[str] | None = Field(None, description="Subset of checks to run; default: the level's set.")
    wait: bool = Field(
        True, description="Wait for the results (up to the deadline) instead of returning 202."
    )
    deadline_s: float | None = Field(None, gt=0, le=MAX_DEADLINE_S)


class SweepRequest(_Strict):
    """``POST /api/v1/diagnostics/sweep``."""

    hosts: list[str] | None = Field(
        None, description="Hosts to sweep; default: every registered, non-retired host."
    )
    level: Literal["quick", "deep"] = "quick"
    checks: list[str] | None = None
    wait: bool = Field(False, description="Wait for the sweep; a fleet-wide deep sweep takes minutes.")
    deadline_s: float | None = Field(None, gt=0, le=MAX_DEADLINE_S)


class HostOutcomePublic(BaseModel):
    host: str
    verdict: str
    previous_state: str
    state: str
    reason: str
    results: int


class SweepResult(BaseModel):
    """A finished sweep (``wait``) or a started one (``task_id`` only)."""

    task_id: str | None = None
    sweep_id: str | None = None
    level: str
    finished: bool
    hosts: int = 0
    results_ingested: int = 0
    missed_deadline: list[str] = []
    changed: dict[str, str] = {}
    unknown_hosts: list[str] = []
    outcomes: list[HostOutcomePublic] = []


def health_app_for(state: Any, settings: Settings) -> HealthCelery:
    """The health Celery app of an API process, built once from its settings (embedded without a broker)."""
    app = getattr(state, "health_app", None)
    if app is None:
        app = make_app(HealthConfig.from_env().with_changes(broker_url=settings.broker_url))
        state.health_app = app
    if app.embedded_worker is not None and app.session_factory is None:
        # In-process sweeps started without waiting write to this API's database.
        app.session_factory = state.session_factory
    return app


def _validate_checks(checks: list[str] | None) -> None:
    unknown = sorted(set(checks or ()) - set(SELECTABLE_CHECKS))
    if unknown:
        # a request the schema would refuse, like an unknown level: 422 (the CLI's validation exit, 65)
        raise Unprocessable(f"unknown checks: {', '.join(unknown)}; known: {', '.join(SELECTABLE_CHECKS)}")


def diagnose(
    session_factory: sessionmaker[Session],
    app: HealthCelery,
    *,
    hosts: list[str] | None,
    level: str,
    checks: list[str] | None,
    wait: bool,
    deadline_s: float | None,
    author: str,
) -> SweepResult:
    """Run (``wait``) or start a sweep for the API; unknown hosts are a 404, unknown checks a 422."""
    _validate_checks(checks)
    if hosts is not None:
        with transaction(session_factory) as session:
            for host in hosts:
                get_node(session, hostname=host)
    if not wait:
        task_id = trigger_sweep(
            hosts=hosts, level=level, deadline_s=deadline_s, checks=checks, author=author, app=app
        )
        return SweepResult(task_id=task_id, level=level, finished=False)
    report = run_sweep(
        session_factory,
        hosts=hosts,
        level=level,
        deadline_s=deadline_s,
        checks=checks,
        author=author,
        app=app,
    )
    data = report.to_json()
    return SweepResult(
        sweep_id=report.sweep_id,
        level=report.level.value,
        finished=True,
        hosts=data["hosts"],
        results_ingested=report.results_ingested,
        missed_deadline=report.missed,
        changed=data["changed"],
        unknown_hosts=report.unknown_hosts,
        outcomes=[HostOutcomePublic(**o) for o in data["outcomes"]],
    )
