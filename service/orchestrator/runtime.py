"""Assembling an orchestrator from settings, and running the embedded stack in one process."""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from health.results import Level
from service.config import Settings
from service.fleet.gateway import SweepHealthGateway
from service.fleet.sweep import run_sweep
from service.orchestrator.config import OrchestratorConfig
from service.orchestrator.launcher import Launcher, LocalLauncher
from service.orchestrator.loop import Orchestrator

log = logging.getLogger("trainops.orchestrator")


def _build(cls: type, data: dict[str, Any]) -> Any:
    kwargs = {}
    known = {f.name: f for f in fields(cls)}
    for key, value in data.items():
        if key not in known:
            raise ValueError(f"unknown orchestrator setting {key!r} for {cls.__name__}")
        default = known[key].default_factory() if callable(known[key].default_factory) else known[key].default
        kwargs[key] = (
            _build(type(default), value) if is_dataclass(default) and isinstance(value, dict) else value
        )
    return cls(**kwargs)


def load_orchestrator_config(settings: Settings, **overrides: Any) -> OrchestratorConfig:
    """Defaults, then the JSON file named by TRAINOPS_ORCHESTRATOR_CONFIG, then `overrides`."""
    data: dict[str, Any] = {"runs_dir": str(settings.home / "runs"), "api_url": settings.resolved_api_url}
    if settings.orchestrator_config is not None:
        data.update(json.loads(Path(settings.orchestrator_config).read_text()))
    data.update(overrides)
    return _build(OrchestratorConfig, data)


def available_launchers(settings: Settings) -> dict[str, Launcher]:
    """Launchers by the name a run's config uses (`launcher: local | slurm`)."""
    launchers: dict[str, Launcher] = {"local": LocalLauncher()}
    if settings.slurm_enabled:
        from service.orchestrator.slurm import SlurmDefaults, SlurmLauncher

        launchers["slurm"] = SlurmLauncher(
            defaults=SlurmDefaults(partition=settings.slurm_partition, account=settings.slurm_account)
        )
    return launchers


def build_health_gateway(settings: Settings, session_factory: sessionmaker[Session]) -> SweepHealthGateway:
    """With Slurm, cordons also drain the node in Slurm, and Slurm's own drains and outages are synced."""
    if settings.slurm_enabled:
        from service.orchestrator.slurm import SlurmHealthGateway

        return SlurmHealthGateway(session_factory)
    return SweepHealthGateway(session_factory)


def build_orchestrator(
    settings: Settings, session_factory: sessionmaker[Session], cfg: OrchestratorConfig | None = None
) -> Orchestrator:
    from service.paging import make_pager

    cfg = cfg or load_orchestrator_config(settings)
    env = {"TRAINOPS_API_URL": cfg.api_url} if cfg.api_url else {}
    return Orchestrator(
        session_factory,
        cfg,
        launchers=available_launchers(settings),
        health=build_health_gateway(settings, session_factory),
        pager=make_pager(settings),
        trainer_env=env,
    )


def start_in_thread(orchestrator: Orchestrator) -> threading.Thread:
    thread = threading.Thread(target=orchestrator.run_forever, name="trainops-orchestrator", daemon=True)
    thread.start()
    return thread


def start_embedded_beat(
    session_factory: sessionmaker[Session], *, interval_s: float, stop: threading.Event
) -> threading.Thread:
    """Celery beat's job when there is no Redis: quick checks on every registered host, on a timer, through
    the same Celery app and tasks (its in-process worker)."""

    def loop() -> None:
        while not stop.wait(interval_s):
            try:
                run_sweep(session_factory, hosts=None, level=Level.quick, author="health/beat")
            except Exception:  # a failed sweep is logged; the next one runs on time
                log.exception("embedded quick sweep failed")

    thread = threading.Thread(target=loop, name="trainops-embedded-beat", daemon=True)
    thread.start()
    return thread
