"""What every launcher shares: the `Launcher` protocol, what an attempt is launched with (`LaunchSpec`) and
how it looks from outside (`ProcessStatus`), a scheduler's refusal (`LaunchRefused`), and the trainer's
command line for one attempt (`build_trainer_args`).

Launchers start, observe and kill attempts: `local.py` runs torchrun on this machine with simulated hosts,
`slurm.py` submits each attempt as a Slurm batch job.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from trainer import contract

ATTEMPT_TAG_ENV = "TRAINOPS_ATTEMPT_TAG"
HEARTBEAT_INTERVAL_KEY = "heartbeat_interval_s"  # in an attempt's launcher info: its hosts' beat interval


@dataclass(frozen=True)
class LaunchSpec:
    run_id: int
    run_name: str
    attempt: int
    hosts: tuple[str, ...]
    procs_per_host: int
    run_dir: Path
    trainer_args: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)
    launcher_options: Mapping[str, Any] = field(default_factory=dict)
    """The run config's section named after its launcher (`slurm`: partition, account, time limit, ...)."""
    unfit_hosts: tuple[str, ...] = ()
    """Hosts the control plane holds out of service (cordoned, suspect, draining, retired): a launcher that
    lets the scheduler place the attempt (Slurm `placement: exclude`) keeps the attempt off them."""


@dataclass(frozen=True)
class ProcessStatus:
    state: Literal["running", "exited", "lost"]
    exit_code: int | None = None
    detail: str = ""
    node_failure: bool = False
    """The scheduler ended the attempt because a node failed (Slurm NODE_FAIL, BOOT_FAIL): a hardware
    failure, not a lost process."""
    failed_hosts: tuple[str, ...] = ()
    """With `node_failure`, the hosts the scheduler reports failed (empty when it does not say which)."""
    allocated_hosts: tuple[str, ...] = ()
    """The hosts the scheduler placed the attempt on, in rank order, where it chose them itself."""


class LaunchRefused(RuntimeError):
    """The scheduler refused to start an attempt, with its own message. `permanent`: submitting the same
    request again cannot succeed (a partition that does not exist, an unknown account or node name), so the
    run needs an operator; otherwise (controller unreachable, a partition down for maintenance) the
    orchestrator retries like any transient failure."""

    def __init__(self, message: str, *, permanent: bool) -> None:
        super().__init__(message)
        self.permanent = permanent


class Launcher(Protocol):
    kind: str

    def prepare(self, spec: LaunchSpec) -> dict[str, Any]:
        """What identifies the attempt's processes (stored with the attempt before anything starts, so a
        restarted orchestrator can find them even if it died mid-launch). No side effects."""
        ...

    def start(self, spec: LaunchSpec, info: Mapping[str, Any]) -> dict[str, Any]:
        """Start the attempt; return what else `status` and `kill` need (merged into the stored info)."""
        ...

    def status(self, info: Mapping[str, Any]) -> ProcessStatus: ...

    def kill(self, info: Mapping[str, Any], *, grace_s: float = 5.0) -> None:
        """Stop the attempt and every process of it; idempotent."""
        ...

    # Launchers may also offer `find_started(info) -> dict | None`: for an attempt whose start was never
    # recorded (its orchestrator died in between), what `start` would have returned if it did start the
    # attempt, else None; the next leader then adopts it, or starts it (apply.finish_interrupted_launch).


START_RECORD_KEY = "started"
"""Key every launcher's `start` returns (the time it started the attempt): its presence in an attempt's
stored launcher info means the start was recorded."""


def start_recorded(info: Mapping[str, Any]) -> bool:
    return START_RECORD_KEY in info


def launcher_for(launchers: Mapping[str, Launcher], info: Mapping[str, Any]) -> Launcher:
    """The launcher that started an attempt (its kind is stored with the attempt's launcher info)."""
    return launchers[str(info.get("kind", "local"))]


def _flag(field_name: str) -> str:
    """The trainer flag for a field the orchestrator sets (trainer.contract.ORCHESTRATOR_TRAINER_FIELDS)."""
    if field_name not in contract.ORCHESTRATOR_TRAINER_FIELDS:
        raise KeyError(f"the orchestrator does not set the trainer's {field_name!r}")
    return contract.trainer_flag(field_name)


def build_trainer_args(
    *,
    config: Mapping[str, Any],
    run_dir: Path,
    resume_from: str | None,
    overrides: Mapping[str, Any],
    faults: Sequence[str],
) -> list[str]:
    """Trainer flags for one attempt from the run's config and this attempt's overrides; a run's
    `hyperparameters` pass TrainConfig fields by name."""
    args = [
        _flag("preset"),
        str(config.get("preset", "tiny")),
        _flag("max_steps"),
        str(config["target_steps"]),
        _flag("checkpoint_interval"),
        str(config.get("checkpoint_interval", 10)),
        _flag("precision"),
        str(config.get("precision", "fp16")),
        _flag("run_dir"),
        str(run_dir),
    ]
    for key, value in (config.get("hyperparameters") or {}).items():
        if isinstance(value, bool):
            args.append(contract.trainer_flag(key) if value else contract.negated_trainer_flag(key))
        else:
            args += [contract.trainer_flag(key), str(value)]
    if resume_from:
        args += [_flag("resume_from"), resume_from]
    if overrides.get("lr_scale") is not None:
        args += [_flag("lr_scale"), repr(float(overrides["lr_scale"]))]
    if overrides.get("lr") is not None:
        args += [_flag("lr"), repr(float(overrides["lr"]))]
    if overrides.get("clip") is not None:
        args += [_flag("clip"), repr(float(overrides["clip"]))]
    if overrides.get("reset_loss_scale"):
        args.append(_flag("reset_loss_scale"))
    if overrides.get("skip_batches"):
        args += [_flag("skip_batches"), str(int(overrides["skip_batches"]))]
    for spec in faults:
        args += [_flag("fault"), spec]
    return args
