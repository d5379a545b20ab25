"""Checks the API makes before it accepts a run's launcher config: can this control plane launch it?

The routes call these before they call crud (service/crud/runs.py stores and reads runs and knows nothing
of settings or launchers), so the crud layer never imports the orchestrator. The Slurm checks are fleet's
(`service/fleet/slurm.py`), so the API does not import it either.
"""

from __future__ import annotations

from typing import Any

from service.config import Settings
from service.errors import Unavailable, Unprocessable
from service.fleet.slurm import SlurmDefaults, SlurmError, check_slurm_run_config


def check_launcher(config: dict[str, Any], settings: Settings) -> None:
    """Refuse a run this control plane cannot launch: the `slurm` launcher where Slurm is not enabled, or
    Slurm options the cluster would refuse (asked of Slurm itself; see `slurm_config_problems`)."""
    if config.get("launcher") != "slurm":
        return
    if not settings.slurm_enabled:
        raise Unprocessable(
            "the run asks for the slurm launcher, but Slurm is not enabled on this control plane "
            "(TRAINOPS_SLURM_ENABLED)"
        )
    defaults = SlurmDefaults(partition=settings.slurm_partition, account=settings.slurm_account)
    try:
        problems = check_slurm_run_config(config.get("slurm") or {}, defaults)
    except SlurmError as exc:
        raise Unavailable(f"could not check the run's Slurm settings: {exc}") from exc
    if problems:
        raise Unprocessable("; ".join(p.message for p in problems))
