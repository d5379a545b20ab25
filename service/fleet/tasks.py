"""The control side's Celery tasks, on the health layer's one app: a sweep on demand and beat's quick sweep.

They run on the shared queue ``health.shared`` in a process that has the control plane's database (the
control worker, ``python -m service.fleet.worker``, or an embedded worker); host workers never import
this module. Importing it registers the tasks on every health app already built.

Their cordons are mirrored to the schedulers of the control plane's settings (``TRAINOPS_SCHEDULER``,
``build_scheduler_adapters``), the same adapters the orchestrator's gateway uses: a node beat's sweep
cordons is drained in Slurm and cordoned in Kubernetes too.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from health.celery_app import HealthCelery, health_task
from health.celery_app import app as default_app
from health.config import SHARED_QUEUE
from health.results import Level
from service.config import get_settings
from service.db import engine_from_settings, make_session_factory
from service.fleet.scheduler import SchedulerAdapter
from service.fleet.schedulers import build_scheduler_adapters
from service.fleet.sweep import run_sweep

SWEEP_TASK = "health.sweep"
QUICK_SWEEP_TASK = "health.quick_sweep"


@lru_cache(maxsize=1)
def control_session_factory() -> sessionmaker[Session]:
    """The control plane's database, for control-side tasks run by a Celery worker."""
    return make_session_factory(engine_from_settings(get_settings()))


@lru_cache(maxsize=1)
def control_scheduler_adapters() -> tuple[SchedulerAdapter, ...]:
    """The schedulers control-side sweeps mirror their cordons to, from the service settings (built once
    per process, like the database's session factory)."""
    return tuple(build_scheduler_adapters(get_settings()))


@health_task(name=SWEEP_TASK, queue=SHARED_QUEUE)
def sweep_task(
    self: Any,
    hosts: list[str] | None,
    level: str,
    deadline_s: float | None = None,
    checks: list[str] | None = None,
    author: str = "health/sweep",
) -> dict[str, Any]:
    report = run_sweep(
        self.app.session_factory or control_session_factory(),
        hosts=hosts,
        level=Level(level),
        deadline_s=deadline_s,
        checks=checks,
        author=author,
        app=self.app,
        adapters=control_scheduler_adapters(),
    )
    return report.to_json()


@health_task(name=QUICK_SWEEP_TASK, queue=SHARED_QUEUE)
def quick_sweep_task(self: Any) -> dict[str, Any]:
    """Celery beat's entry: the quick checks on every registered host."""
    report = run_sweep(
        self.app.session_factory or control_session_factory(),
        hosts=None,
        level=Level.quick,
        author="health/beat",
        app=self.app,
        adapters=control_scheduler_adapters(),
    )
    return report.summary()


def trigger_sweep(
    *,
    hosts: Sequence[str] | None,
    level: Level | str,
    deadline_s: float | None = None,
    checks: list[str] | None = None,
    author: str = "health/api",
    app: HealthCelery | None = None,
) -> str:
    """Start a sweep on the shared queue without waiting; returns the Celery task id of the sweep."""
    app = app or default_app
    if app.embedded_worker is not None:
        app.embedded_worker.ensure(())
    result = app.send_task(
        SWEEP_TASK,
        kwargs={
            "hosts": list(hosts) if hosts is not None else None,
            "level": Level(level).value,
            "deadline_s": deadline_s,
            "checks": checks,
            "author": author,
        },
    )
    return str(result.id)
