"""A real Slurm cluster on loopback for the Slurm tests: munged, slurmctld and four slurmd daemons.

Everything runs as root on this one host (`NodeName=n[1-4] NodeHostname=localhost`, one slurmd per node
started with ``slurmd -N nX``; Debian's build supports several slurmd on one host). State and spool
directories live under a fresh temp dir per session, so no state survives between sessions, and the
daemons talk through a munged socket of their own (a system munged, if any, is left alone). Each cluster
takes free ports of its own (`free_port_block`: slurmctld's port and one per slurmd), so two clusters in
one pytest session (one per module, back to back) or in two sessions side by side never collide.

    with SlurmCluster(tmp_dir).start() as cluster:
        env = cluster.env          # SLURM_CONF for sbatch/squeue/scontrol/sinfo
        cluster.wait_idle()
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType

NODES = ("n1", "n2", "n3", "n4")
# Ports are chosen per cluster from this range, below Linux's default ephemeral range (32768-60999) so an
# outgoing connection's local port does not take one between the check and the daemons' bind.
PORT_RANGE = (20000, 32000)
PARTITION = "debug"
DOWN_PARTITION = "maint"  # State=DOWN: jobs are accepted and held (what a maintenance window looks like)
RESTRICTED_PARTITION = "restricted"  # AllowAccounts=RESTRICTED_ACCOUNT only
RESTRICTED_ACCOUNT = "opt"
DAEMONS = ("munged", "slurmctld", "slurmd")


def missing_binaries() -> list[str]:
    return [b for b in ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "scontrol") if not _which(b)]


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin")


class SlurmCluster:
    def __init__(self, base: Path, *, nodes: Sequence[str] = NODES) -> None:
        self.base = base
        self.nodes = tuple(nodes)
        self.conf = base / "slurm.conf"
        self.munge_socket = base / "munge" / "munge.socket"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self._pids: list[tuple[str, int]] = []
        self.ctld_port = 0  # chosen in start(): slurmctld's port, then one per slurmd
        self.first_slurmd_port = 0

    # ---- life cycle ---------------------------------------------------------------------------------

    def start(self, timeout_s: float = 30.0) -> SlurmCluster:
        missing = missing_binaries()
        if missing:
            raise RuntimeError(
                f"Slurm tests need Debian's slurm-wlm and munge; missing: {', '.join(missing)}"
            )
        if self.base.exists():
            shutil.rmtree(self.base)  # a previous session's state must not leak into this one
        for sub in ("munge", "state", "log", "spool"):
            (self.base / sub).mkdir(parents=True)
        self.ctld_port = free_port_block(1 + len(self.nodes))
        self.first_slurmd_port = self.ctld_port + 1
        self._write_conf()
        try:
            self._start_munged()
            self._spawn("slurmctld", [_which("slurmctld") or "slurmctld", "-D", "-i", "-f", str(self.conf)])
            self._wait_for(
                lambda: self._ok(["scontrol", "ping"]) and "UP" in self.run(["scontrol", "ping"]),
                timeout_s,
                "slurmctld did not answer",
            )
            for node in self.nodes:
                self._spawn(
                    f"slurmd-{node}", [_which("slurmd") or "slurmd", "-D", "-N", node, "-f", str(self.conf)]
                )
            self.wait_idle(timeout_s=timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Cancel every job first: stopping slurmd does not kill the jobs it started."""
        if any(name == "slurmctld" for name, _ in self._pids):
            with contextlib.suppress(Exception):
                self.run(["scancel", "--full", "--quiet", f"--partition={PARTITION}"], check=False)
                self._wait_for(lambda: not self.job_ids(), 15, "jobs did not end")
        for _name, pid in reversed(self._pids):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            if not _wait_gone(pid, 10):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                _wait_gone(pid, 5)
        self._pids.clear()

    def kill_node(self, node: str, reason: str) -> None:
        """A node dies: its slurmd stops and the controller marks it DOWN (instead of waiting out
        SlurmdTimeout). Jobs on it end as NODE_FAIL; the controller kills their steps on the other nodes."""
        for index, (name, pid) in enumerate(self._pids):
            if name == f"slurmd-{node}":
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                _wait_gone(pid, 10)
                del self._pids[index]
                break
        self.run(["scontrol", "update", f"NodeName={node}", "State=DOWN", f"Reason={reason}"])

    def revive_node(self, node: str) -> None:
        """Start the node's slurmd again; with ReturnToService=2 it returns to service on registering."""
        if any(name == f"slurmd-{node}" for name, _ in self._pids):
            return
        self._spawn(f"slurmd-{node}", [_which("slurmd") or "slurmd", "-D", "-N", node, "-f", str(self.conf)])

    def __enter__(self) -> SlurmCluster:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # ---- commands -----------------------------------------------------------------------------------

    def run(self, argv: Sequence[str], *, check: bool = True, timeout: float = 30) -> str:
        result = subprocess.run(list(argv), env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}")
        return result.stdout

    def node_states(self) -> dict[str, str]:
        """Node name -> sinfo's compact state (`idle`, `idle*`, `drain`, `down*`, `alloc`, ...)."""
        out = self.run(["sinfo", "--noheader", "--Node", "--format=%N %t"])
        return dict(line.split() for line in out.splitlines() if line.strip())

    def node_reason(self, node: str) -> str:
        out = self.run(["sinfo", "--noheader", "--Node", f"--nodes={node}", "--format=%E"])
        return out.strip().splitlines()[0] if out.strip() else ""  # one line per partition of the node

    def job_ids(self) -> list[int]:
        """Jobs not yet ended (`squeue --json` also lists finished jobs until MinJobAge passes)."""
        data = json.loads(self.run(["squeue", "--json"]))
        ended = {
            "COMPLETED",
            "FAILED",
            "CANCELLED",
            "TIMEOUT",
            "NODE_FAIL",
            "PREEMPTED",
            "OUT_OF_MEMORY",
            "BOOT_FAIL",
            "DEADLINE",
        }
        return [int(j["job_id"]) for j in data.get("jobs", []) if j.get("job_state") not in ended]

    def wait_idle(self, nodes: Sequence[str] | None = None, *, timeout_s: float = 30.0) -> None:
        """Wait until the nodes are plain `idle` (they show `idle*` for a moment after a start or resume)."""
        wanted = tuple(nodes or self.nodes)
        self._wait_for(
            lambda: all(self.node_states().get(n) == "idle" for n in wanted),
            timeout_s,
            f"nodes {', '.join(wanted)} did not become idle",
        )

    def wait_state(self, node: str, states: Sequence[str], *, timeout_s: float = 30.0) -> str:
        self._wait_for(lambda: self.node_states().get(node) in states, timeout_s, f"{node} not in {states}")
        return self.node_states()[node]

    def log_tail(self, chars: int = 3000) -> str:
        logs = sorted((self.base / "log").glob("*.log"))
        return "\n".join(f"== {p.name}\n{p.read_text(errors='replace')[-chars:]}" for p in logs)

    # ---- internals ----------------------------------------------------------------------------------

    def _ok(self, argv: Sequence[str]) -> bool:
        try:
            self.run(argv, timeout=5)
        except (RuntimeError, subprocess.TimeoutExpired):
            return False
        return True

    def _wait_for(self, ready: object, timeout_s: float, what: str) -> None:
        assert callable(ready)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired, ValueError):
                if ready():
                    return
            time.sleep(0.2)
        raise RuntimeError(f"{what} within {timeout_s:g} s\n{self.log_tail()}")

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.base / "log" / f"{name}.out", "ab")  # noqa: SIM115 - owned by the child process
        proc = subprocess.Popen(
            argv, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self._pids.append((name, proc.pid))

    def _start_munged(self) -> None:
        key = self.base / "munge" / "munge.key"
        subprocess.run([_which("mungekey") or "mungekey", "--create", f"--keyfile={key}"], check=True)
        key.chmod(0o400)
        self._spawn(
            "munged",
            [
                _which("munged") or "munged",
                "--foreground",
                "--force",
                f"--socket={self.munge_socket}",
                f"--key-file={key}",
                f"--pid-file={self.base / 'munge' / 'munged.pid'}",
                f"--log-file={self.base / 'log' / 'munged.log'}",
                f"--seed-file={self.base / 'munge' / 'munged.seed'}",
            ],
        )
        self._wait_for(self.munge_socket.exists, 10, "munged did not create its socket")

    def _write_conf(self) -> None:
        first, last = self.first_slurmd_port, self.first_slurmd_port + len(self.nodes) - 1
        names = ",".join(self.nodes)
        self.conf.write_text(
            f"""\
ClusterName=trainops-test
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={self.ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
StateSaveLocation={self.base / "state"}
SlurmdSpoolDir={self.base / "spool"}/%n
SlurmctldPidFile={self.base / "slurmctld.pid"}
SlurmdPidFile={self.base / "spool"}/slurmd-%n.pid
SlurmctldLogFile={self.base / "log" / "slurmctld.log"}
SlurmdLogFile={self.base / "log"}/slurmd-%n.log
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
SlurmdTimeout=30
MessageTimeout=10
InactiveLimit=0
KillWait=5
MinJobAge=600
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
NodeName={_range(self.nodes)} NodeHostname=localhost NodeAddr=127.0.0.1 Port=[{first}-{last}] CPUs=2 \
State=UNKNOWN
PartitionName={PARTITION} Nodes={names} Default=YES MaxTime=INFINITE State=UP
PartitionName={DOWN_PARTITION} Nodes={names} MaxTime=INFINITE State=DOWN
PartitionName={RESTRICTED_PARTITION} Nodes={names} State=UP AllowAccounts={RESTRICTED_ACCOUNT}
"""
        )


def free_port_block(count: int, *, attempts: int = 200) -> int:
    """The first of `count` consecutive TCP ports nothing listens on or lingers on (TIME_WAIT included:
    the probe binds without SO_REUSEADDR, as strictly as a daemon that does not set it). Slurm takes the
    slurmd ports as one range, hence a block rather than single ports."""
    low, high = PORT_RANGE
    for _ in range(attempts):
        first = random.randrange(low, high - count)
        if all(_port_free(port) for port in range(first, first + count)):
            return first
    raise RuntimeError(f"no {count} consecutive free ports in {low}-{high}")


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def _range(nodes: Sequence[str]) -> str:
    """`n[1-4]`: Slurm pairs the hostlist with the port range element by element."""
    if list(nodes) != [f"n{i}" for i in range(1, len(nodes) + 1)]:
        raise ValueError("the test cluster's nodes are n1..nN")
    return f"n[1-{len(nodes)}]"


def _wait_gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


@contextlib.contextmanager
def running_cluster(base: Path) -> Iterator[SlurmCluster]:
    cluster = SlurmCluster(base).start()
    try:
        yield cluster
    finally:
        cluster.stop()
