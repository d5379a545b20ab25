"""Launchers start, observe and kill attempts. The local one runs torchrun on this machine with simulated
hosts; a Slurm launcher implements the same interface."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from service.orchestrator.runner import EXIT_FILE
from trainer import contract

ATTEMPT_TAG_ENV = "TRAINOPS_ATTEMPT_TAG"


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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie is dead for our purposes
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


def tagged_pids(tag: str) -> list[int]:
    """Every live process carrying this attempt's tag in its environment (torchrun and its workers run in
    sessions of their own, so a process group does not reach them all)."""
    needle = f"{ATTEMPT_TAG_ENV}={tag}".encode()
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    found.append(int(entry.name))
        except OSError:
            continue
    return [p for p in found if _pid_alive(p)]


class LocalLauncher:
    """torchrun on this machine; each simulated host is a slot of ranks (TRAINOPS_HOSTS names them)."""

    kind = "local"

    def __init__(self, *, python: str = sys.executable, rdzv_port_base: int = 29600) -> None:
        self.python = python
        self.rdzv_port_base = rdzv_port_base

    def _free_port(self) -> int:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])

    def prepare(self, spec: LaunchSpec) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "tag": uuid.uuid4().hex,
            "attempt_dir": str(contract.attempt_dir(spec.run_dir, spec.attempt)),
            "world_size": len(spec.hosts) * spec.procs_per_host,
            "rdzv_port": self._free_port(),
        }

    def start(self, spec: LaunchSpec, info: Mapping[str, Any]) -> dict[str, Any]:
        tag, world, port = info["tag"], int(info["world_size"]), int(info["rdzv_port"])
        attempt_dir = Path(info["attempt_dir"])
        attempt_dir.mkdir(parents=True, exist_ok=True)
        for stale in contract.heartbeats_dir(spec.run_dir).glob(contract.HEARTBEAT_GLOB):
            stale.unlink(missing_ok=True)  # the new attempt's ranks must not look alive from old files
        command = [
            self.python,
            "-m",
            "trainer.launch",
            "--nnodes",
            "1",
            "--nproc-per-node",
            str(world),
            "--rdzv-backend",
            "c10d",
            "--rdzv-endpoint",
            f"127.0.0.1:{port}",
            "--max-restarts",
            "0",
            "--",
            *spec.trainer_args,
        ]
        env = {
            **os.environ,
            **spec.env,
            ATTEMPT_TAG_ENV: tag,
            "TRAINOPS_RUN_ID": str(spec.run_id),
            "TRAINOPS_ATTEMPT": str(spec.attempt),
            "TRAINOPS_HOSTS": ",".join(spec.hosts),
            "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
        }
        (attempt_dir / "command.json").write_text(json.dumps({"command": command, "hosts": list(spec.hosts)}))
        proc = subprocess.Popen(
            [self.python, "-m", "service.orchestrator.runner", str(attempt_dir), "--", *command],
            env=env,
            start_new_session=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        return {
            "kind": self.kind,
            "tag": tag,
            "attempt_dir": str(attempt_dir),
            "runner_pid": proc.pid,
            "world_size": world,
            "rdzv_port": port,
            "started": time.time(),
        }

    def status(self, info: Mapping[str, Any]) -> ProcessStatus:
        attempt_dir = Path(info["attempt_dir"])
        exit_file = attempt_dir / EXIT_FILE
        if exit_file.exists():
            try:
                return ProcessStatus("exited", int(json.loads(exit_file.read_text())["exit_code"]))
            except (OSError, ValueError, KeyError):
                pass
        runner_pid = int(info.get("runner_pid") or 0)
        if runner_pid and _pid_alive(runner_pid):
            _reap(runner_pid)
            if _pid_alive(runner_pid):
                return ProcessStatus("running")
        if exit_file.exists():
            return self.status(info)
        if tagged_pids(info["tag"]):
            return ProcessStatus("running", detail="supervisor gone, ranks still alive")
        return ProcessStatus("lost", detail="the attempt's processes are gone and left no exit status")

    def kill(self, info: Mapping[str, Any], *, grace_s: float = 5.0) -> None:
        tag = info["tag"]
        pids = tagged_pids(tag)
        runner_pid = int(info.get("runner_pid") or 0)
        for pid in pids:
            if pid != runner_pid:
                _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and [p for p in tagged_pids(tag) if p != runner_pid]:
            time.sleep(0.1)
        for pid in tagged_pids(tag):
            if pid != runner_pid:
                _signal(pid, signal.SIGKILL)
        # the runner records the exit status once its child is gone
        deadline = time.monotonic() + grace_s
        while runner_pid and time.monotonic() < deadline and _pid_alive(runner_pid):
            _reap(runner_pid)
            time.sleep(0.05)
        if runner_pid and _pid_alive(runner_pid):
            _signal(runner_pid, signal.SIGKILL)
            _reap(runner_pid)


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _reap(pid: int) -> None:
    """Collect our own exited child so it does not linger as a zombie (no-op for other processes)."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def read_rank_beats(run_dir: Path, *, since: float) -> list[dict[str, Any]]:
    """The ranks' local heartbeat files written after `since` (older files belong to earlier attempts)."""
    return contract.read_heartbeat_files(run_dir, since=since)


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
