"""Assembling an orchestrator from settings, and running the embedded stack in one process."""

from __future__ import annotations

import importlib
import logging
import threading

from sqlalchemy.orm import Session, sessionmaker

from health.results import Level
from service.config import Settings
from service.fleet.gateway import SweepHealthGateway
from service.fleet.schedulers import build_scheduler_adapters
from service.fleet.sweep import run_sweep
from service.orchestrator.launchers.base import Launcher
from service.orchestrator.launchers.local import LocalLauncher
from service.orchestrator.leadership import SqliteLeadership, leadership_for
from service.orchestrator.loop import Orchestrator
from service.recovery.config import OrchestratorConfig, load_orchestrator_config

log = logging.getLogger("trainops.orchestrator")


def available_launchers(settings: Settings) -> dict[str, Launcher]:
    """Launchers by the name a run's config uses (`launcher: local | slurm`, or the `kind` of an extra
    launcher from TRAINOPS_EXTRA_LAUNCHERS)."""
    launchers: dict[str, Launcher] = {"local": LocalLauncher()}
    if settings.slurm_enabled:
        from service.fleet.slurm import SlurmDefaults
        from service.orchestrator.launchers.slurm import SlurmLauncher

        launchers["slurm"] = SlurmLauncher(
            defaults=SlurmDefaults(partition=settings.slurm_partition, account=settings.slurm_account)
        )
    for path in settings.extra_launchers:
        launcher = load_launcher(path)
        launchers[launcher.kind] = launcher
    return launchers


def load_launcher(path: str) -> Launcher:
    """A launcher named by its `module:Class` import path (TRAINOPS_EXTRA_LAUNCHERS), built without
    arguments. An import path that does not name a launcher fails the orchestrator's start, loudly."""
    module_name, _, class_name = path.partition(":")
    launcher = getattr(importlib.import_module(module_name), class_name)()
    if not all(callable(getattr(launcher, m, None)) for m in ("prepare", "start", "status", "kill")):
        raise TypeError(f"{path} is not a launcher (prepare, start, status and kill)")
    if not isinstance(getattr(launcher, "kind", None), str):
        raise TypeError(f"{path} has no `kind` (the name a run's config uses)")
    return launcher


def build_health_gateway(settings: Settings, session_factory: sessionmaker[Session]) -> SweepHealthGateway:
    """Cordons are mirrored to the schedulers of `settings.scheduler` (TRAINOPS_SCHEDULER: Slurm, Kubernetes),
    and at the start of each pass node states and every scheduler's are synced both ways (outside drains
    and outages become cordons; `service/fleet/sync.py`)."""
    return SweepHealthGateway(session_factory, adapters=build_scheduler_adapters(settings))


def build_orchestrator(
    settings: Settings, session_factory: sessionmaker[Session], cfg: OrchestratorConfig | None = None
) -> Orchestrator:
    """The orchestrator of `trainops orchestrator` / `up` / the demo. It acts only while it leads: on
    PostgreSQL it may stand by for another; on SQLite it takes the database at once or raises
    `LeadershipRefused` (a second orchestrator on one SQLite file refuses to start)."""
    from service.paging import make_pager

    cfg = cfg or load_orchestrator_config(settings)
    env = {"TRAINOPS_API_URL": cfg.api_url} if cfg.api_url else {}
    leadership = leadership_for(session_factory.kw["bind"], lease_s=cfg.leader_lease_s)
    if isinstance(leadership, SqliteLeadership):
        leadership.acquire()
    return Orchestrator(
        session_factory,
        cfg,
        launchers=available_launchers(settings),
        health=build_health_gateway(settings, session_factory),
        pager=make_pager(settings),
        trainer_env=env,
        leadership=leadership,
    )


def start_in_thread(orchestrator: Orchestrator) -> threading.Thread:
    thread = threading.Thread(target=orchestrator.run_forever, name="trainops-orchestrator", daemon=True)
    thread.start()
    return thread


def start_embedded_beat(
    settings: Settings, session_factory: sessionmaker[Session], *, interval_s: float, stop: threading.Event
) -> threading.Thread:
    """Celery beat's job when there is no Redis: quick checks on every registered host, on a timer, through
    the same Celery app and tasks (its in-process worker). Its cordons are mirrored to the schedulers of
    TRAINOPS_SCHEDULER, as the control worker's beat does (`service/fleet/tasks.py`)."""
    adapters = build_scheduler_adapters(settings)

    def loop() -> None:
        while not stop.wait(interval_s):
            try:
                run_sweep(
                    session_factory, hosts=None, level=Level.quick, author="health/beat", adapters=adapters
                )
            except Exception:  # a failed sweep is logged; the next one runs on time
                log.exception("embedded quick sweep failed")

    thread = threading.Thread(target=loop, name="trainops-embedded-beat", daemon=True)
    thread.start()
    return thread
