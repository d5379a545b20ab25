"""The local launcher: torchrun on this machine, each simulated host a slot of ranks.

Each attempt runs under a supervisor process (`service/orchestrator/runner.py`) in a session of its own, so
it outlives an orchestrator restart; its processes carry the attempt's tag in their environment, which is
how `status` and `kill` find them all.

A start is claimed first (`launch.json` in the attempt directory, created exclusively and tagged with the
attempt), so an attempt is started at most once however often `start` is called, and an orchestrator that
takes over from one that died mid-launch can tell whether it had started the attempt (`find_started`).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from service.orchestrator.launchers.base import (
    ATTEMPT_TAG_ENV,
    START_RECORD_KEY,
    LaunchSpec,
    ProcessStatus,
)
from service.orchestrator.runner import EXIT_FILE
from trainer import contract


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


LAUNCH_CLAIM_FILE = "launch.json"


def _read_claim(attempt_dir: Path, tag: str) -> dict[str, Any] | None:
    """The attempt's launch claim, if this attempt (its tag) made one; a claim of another tag is stale."""
    try:
        claim = json.loads((attempt_dir / LAUNCH_CLAIM_FILE).read_text())
    except (OSError, ValueError):
        return None
    return claim if isinstance(claim, dict) and claim.get("tag") == tag else None


def _claim_launch(attempt_dir: Path, tag: str) -> dict[str, Any] | None:
    """Claim the attempt's start: None when this call claimed it, else the existing claim (started)."""
    path = attempt_dir / LAUNCH_CLAIM_FILE
    for _ in range(2):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            claim = _read_claim(attempt_dir, tag)
            if claim is not None:
                return claim
            path.unlink(missing_ok=True)  # a stale claim (another run's attempt of the same name and number)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump({"tag": tag, START_RECORD_KEY: time.time()}, f)
        return None
    raise RuntimeError(f"could not claim the launch of {attempt_dir}")


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
        already = _claim_launch(attempt_dir, tag)
        if already is not None:  # started before (by an orchestrator that died before recording it)
            return {k: v for k, v in already.items() if k != "tag"}
        (attempt_dir / "command.json").write_text(json.dumps({"command": command, "hosts": list(spec.hosts)}))
        proc = subprocess.Popen(
            [self.python, "-m", "service.orchestrator.runner", str(attempt_dir), "--", *command],
            env=env,
            start_new_session=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        started = {
            "kind": self.kind,
            "tag": tag,
            "attempt_dir": str(attempt_dir),
            "runner_pid": proc.pid,
            "world_size": world,
            "rdzv_port": port,
            START_RECORD_KEY: time.time(),
        }
        claim = attempt_dir / LAUNCH_CLAIM_FILE
        tmp = claim.with_name(f".{claim.name}.tmp")
        tmp.write_text(json.dumps(started))
        os.replace(tmp, claim)
        return started

    def find_started(self, info: Mapping[str, Any]) -> dict[str, Any] | None:
        """What `start` returned, if it started (claimed) this attempt; a claim without the supervisor's pid
        (the orchestrator died in between) is found by the exit file or the attempt's tagged processes."""
        claim = _read_claim(Path(info["attempt_dir"]), str(info["tag"]))
        return None if claim is None else {k: v for k, v in claim.items() if k != "tag"}

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
