"""Running attempts on a Slurm cluster, and keeping the control plane's node states and Slurm's agreeing.

`SlurmLauncher` submits each attempt as one batch job: ``sbatch --nodelist=<the hosts the orchestrator
picked>`` (run config ``slurm.placement: nodelist``, the default), or ``sbatch --nodes=N --exclude=<the
hosts the control plane holds out of service>`` (``placement: exclude``: Slurm places the job, and the
attempt's hosts are updated from the allocation). The generated script runs ``srun`` with one task per
node, each task a ``trainer.launch`` (torchrun) whose node rank is the task's ``SLURM_NODEID`` and whose
rendezvous master is the first node of the allocation. TRAINOPS_HOSTS is exported from the allocation in
the same order, so every rank reports the Slurm node name it runs on (the heartbeat files and metrics name
Slurm nodes, never `hostname`).

State comes from ``scontrol show job -o`` (22.05 has no ``--json`` there; its ExitCode is ``code:signal``)
and, for a job whose id was never recorded, ``squeue --json`` filtered in Python by the comment tag
(``squeue -j`` ignores its filter in JSON mode; there ``exit_code`` is a raw wait status). The batch script
also writes the exit status into the attempt directory, as the local runner does, so an attempt that Slurm
has already purged from its memory still has an outcome.

`SlurmHealthGateway` is the orchestrator's health gateway with the Slurm cordon adapter, plus a
level-triggered sync run before every reconcile pass: drains and outages made outside trainops (an admin's
``scontrol update State=DRAIN``, a node that went DOWN) cordon the node in the control plane, and trainops'
own drains (reason prefixed ``trainops:``) follow the control plane's node state.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from service.crud.logbook import write_log
from service.crud.nodes import find_node, transition_node
from service.db import transaction
from service.fleet.gateway import SweepHealthGateway
from service.fleet.scheduler import SlurmAdapter, record_scheduler_failure
from service.orchestrator.detect import EXIT_CONFIG, EXIT_DIVERGED
from service.orchestrator.launcher import ATTEMPT_TAG_ENV, LaunchRefused, LaunchSpec, ProcessStatus
from service.orchestrator.runner import EXIT_FILE
from service.statemachine import LogKind, NodeState, Severity

BATCH_SCRIPT = "slurm-job.sh"
TASK_EXIT_PREFIX = "exit-node"  # + SLURM_NODEID + ".json": one task's own exit status
ENV_FILE = "slurm-job.env"
SIGTERM, SIGKILL = 15, 9

# Job states (squeue / scontrol names) in which the job still holds, or waits for, its nodes.
ACTIVE_JOB_STATES = frozenset(
    {
        "PENDING",
        "CONFIGURING",
        "RUNNING",
        "COMPLETING",
        "SUSPENDED",
        "REQUEUED",
        "REQUEUE_FED",
        "REQUEUE_HOLD",
        "RESIZING",
        "SIGNALING",
        "STAGE_OUT",
        "STOPPED",
    }
)


# Job states in which Slurm ended the job because a node failed under it (or did not boot for it).
NODE_FAILURE_STATES = frozenset({"NODE_FAIL", "BOOT_FAIL"})

# sbatch refusals that the same request cannot get past on a retry (Slurm's messages, matched in lower
# case); anything else (controller unreachable, socket timeouts, busy controller) is retried.
PERMANENT_SBATCH_ERRORS = (
    "invalid partition",
    "invalid account",
    "invalid node name",
    "invalid qos",
    "invalid generic resource",
    "invalid feature specification",
    "requested node configuration is not available",
    "node count specification invalid",
    "requested time limit is invalid",
    "job violates accounting/qos policy",
    "not permitted to use this partition",
    "unrecognized option",
    "invalid option",
)


class SlurmError(RuntimeError):
    """A Slurm command refused or failed; the message is Slurm's own (invalid node name, bad partition)."""


SlurmRunner = Callable[[Sequence[str]], "subprocess.CompletedProcess[str]"]


def run_slurm(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=60)


def _checked(result: subprocess.CompletedProcess[str], what: str) -> str:
    if result.returncode != 0:
        message = " ".join((result.stderr or result.stdout).split()) or f"exit status {result.returncode}"
        raise SlurmError(f"{what} failed: {message}")
    return result.stdout


# ---- decoding Slurm's answers ---------------------------------------------------------------------


def decode_wait_status(raw: int) -> int:
    """A raw wait status (squeue/sacct JSON `exit_code`) as a shell reports it: code, or 128 + signal."""
    signal_number = raw & 0x7F
    if signal_number:
        return 128 + signal_number
    return (raw >> 8) & 0xFF


def decode_exit_field(text: str) -> int:
    """scontrol's `ExitCode=code:signal` as a shell reports it."""
    code, _, signal_number = text.partition(":")
    if signal_number and int(signal_number):
        return 128 + int(signal_number)
    return int(code or 0)


def parse_scontrol_record(line: str) -> dict[str, str]:
    """One `scontrol show ... -o` line as key -> value (values run to the next ` Key=`)."""
    fields: dict[str, str] = {}
    matches = list(re.finditer(r"(?:^|\s)([A-Za-z][\w/:()]*)=", line))
    for index, match in enumerate(matches):
        end = matches[index + 1].start() if index + 1 < len(matches) else len(line)
        fields[match.group(1)] = line[match.end() : end].strip()
    return fields


@dataclass(frozen=True)
class JobView:
    job_id: int
    state: str  # first word of the Slurm job state (`NODE_FAIL`, `RUNNING`, ...)
    exit_code: int | None  # as a shell reports it
    reason: str
    nodes: str


def status_of_job(
    job: JobView, exit_file_code: int | None, *, failed_hosts: Sequence[str] = ()
) -> ProcessStatus:
    """Slurm job state -> what the orchestrator understands.

    An exit code that the trainer chose (0, 2 config, 42 divergence, crash codes) is passed through; a job
    the scheduler ended is reported as a signal or as a node failure, with Slurm's reason as the detail:
    preemption, cancellation and the time limit as SIGTERM (a transient failure: resume from the
    checkpoint), running out of memory as SIGKILL, a node failure (and a failed node boot) as a hardware
    failure naming `failed_hosts` (the allocation's nodes Slurm has DOWN; the node sync cordons them).
    """
    where = f"Slurm job {job.job_id} on {job.nodes or '?'}"
    if job.state in ACTIVE_JOB_STATES:
        detail = f"{where}: {job.state}" + (f" ({job.reason})" if job.reason not in ("", "None") else "")
        return ProcessStatus("running", detail=detail)
    if job.state in ("COMPLETED", "FAILED"):
        code = exit_file_code if exit_file_code is not None else job.exit_code
        return ProcessStatus("exited", code if code is not None else 1, detail=f"{where}: {job.state}")
    if job.state in ("CANCELLED", "PREEMPTED", "TIMEOUT", "DEADLINE"):
        why = {
            "CANCELLED": "cancelled (scancel or an administrator)",
            "PREEMPTED": "preempted by a higher-priority job",
            "TIMEOUT": "hit its time limit",
            "DEADLINE": "hit its deadline",
        }[job.state]
        return ProcessStatus("exited", 128 + SIGTERM, detail=f"{where}: {why}")
    if job.state == "OUT_OF_MEMORY":
        return ProcessStatus("exited", 128 + SIGKILL, detail=f"{where}: out of memory")
    if job.state in NODE_FAILURE_STATES:
        which = f" of {', '.join(failed_hosts)}" if failed_hosts else " (Slurm does not say which node)"
        return ProcessStatus(
            "lost",
            detail=f"{where}: node failure ({job.state}){which}",
            node_failure=True,
            failed_hosts=tuple(failed_hosts),
        )
    return ProcessStatus("lost", detail=f"{where}: ended in state {job.state}")


# ---- the launcher ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class SlurmDefaults:
    """Cluster-wide sbatch defaults; a run's `slurm` config section overrides each."""

    partition: str | None = None
    account: str | None = None
    time_limit: str | None = None
    gpus_per_node: int = 0
    extra_sbatch_flags: tuple[str, ...] = ()
    placement: str = "nodelist"  # "nodelist": the orchestrator's hosts; "exclude": Slurm places
    nodelist: tuple[str, ...] = ()  # with placement "exclude": nodes the job must include (spares first)


@dataclass
class SlurmLauncher:
    """Attempts as Slurm batch jobs (see the module docstring). Implements the `Launcher` protocol."""

    defaults: SlurmDefaults = field(default_factory=SlurmDefaults)
    python: str = sys.executable
    workdir: Path = field(default_factory=Path.cwd)
    env: Mapping[str, str] = field(default_factory=dict)  # extra environment of sbatch (SLURM_CONF, ...)
    run: SlurmRunner | None = None
    kind: str = "slurm"
    _hostnames: dict[str, tuple[str, ...]] = field(default_factory=dict, repr=False)

    def _run(self, argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
        if self.run is not None:
            return self.run(argv)
        return subprocess.run(
            list(argv), capture_output=True, text=True, timeout=60, env={**os.environ, **self.env}
        )

    # -- protocol --

    def prepare(self, spec: LaunchSpec) -> dict[str, Any]:
        attempt_dir = spec.run_dir / "attempts" / f"{spec.attempt:04d}"
        tag = uuid.uuid4().hex
        return {
            "kind": self.kind,
            "tag": tag,
            "attempt_dir": str(attempt_dir),
            "world_size": len(spec.hosts) * spec.procs_per_host,
            "rdzv_port": _free_port(),
            "job_name": f"trainops-{spec.run_name}-a{spec.attempt}",
            "comment": f"trainops run={spec.run_id} attempt={spec.attempt} tag={tag}",
            "placement": str(self.options(spec).get("placement") or "nodelist"),
        }

    def start(self, spec: LaunchSpec, info: Mapping[str, Any]) -> dict[str, Any]:
        attempt_dir = Path(info["attempt_dir"])
        attempt_dir.mkdir(parents=True, exist_ok=True)
        for stale in (spec.run_dir / "heartbeats").glob("rank*.json"):
            stale.unlink(missing_ok=True)  # the new attempt's ranks must not look alive from old files
        (attempt_dir / EXIT_FILE).unlink(missing_ok=True)
        for stale in attempt_dir.glob(f"{TASK_EXIT_PREFIX}*.json"):
            stale.unlink(missing_ok=True)
        env_file = attempt_dir / ENV_FILE
        # The attempt's token travels in a file only root and the job can read, not in sbatch's argv.
        env_file.touch(mode=0o600)
        env_file.write_text(
            "".join(
                f"export {key}={shlex.quote(value)}\n"
                for key, value in {
                    **spec.env,
                    ATTEMPT_TAG_ENV: str(info["tag"]),
                    "TRAINOPS_RUN_ID": str(spec.run_id),
                    "TRAINOPS_ATTEMPT": str(spec.attempt),
                    "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
                }.items()
            )
        )
        script = attempt_dir / BATCH_SCRIPT
        script.write_text(self.batch_script(spec, info))
        script.chmod(0o700)
        argv = self.sbatch_argv(spec, info, script)
        (attempt_dir / "command.json").write_text(json.dumps({"sbatch": argv, "hosts": list(spec.hosts)}))
        # Slurm accepts a job for a partition that is down (it pends) and words some refusals tersely:
        # the same check as at run creation names the problem, and says whether a retry can help.
        try:
            problems = slurm_config_problems(self.options(spec), self._run)
        except SlurmError as exc:
            raise LaunchRefused(str(exc), permanent=False) from exc
        if problems:
            raise LaunchRefused(
                "; ".join(p.message for p in problems), permanent=any(p.permanent for p in problems)
            )
        result = self._run(argv)
        if result.returncode != 0:
            message = " ".join((result.stderr or result.stdout).split()) or f"exit {result.returncode}"
            permanent = any(pattern in message.lower() for pattern in PERMANENT_SBATCH_ERRORS)
            raise LaunchRefused(f"sbatch refused attempt {spec.attempt}: {message}", permanent=permanent)
        job_id = int(result.stdout.strip().split(";")[0])
        return {"job_id": job_id, "started": time.time()}

    def status(self, info: Mapping[str, Any]) -> ProcessStatus:
        exit_code = read_job_exit_status(Path(info["attempt_dir"]))
        job = self._job(info)
        if job is None:
            if exit_code is not None:
                return ProcessStatus("exited", exit_code, detail="Slurm no longer knows the job; exit file")
            return ProcessStatus(
                "lost", detail="Slurm does not know the attempt's job and it left no exit status"
            )
        failed_hosts: tuple[str, ...] = ()
        if job.state in NODE_FAILURE_STATES:
            slurm_nodes = read_slurm_nodes(self._run)
            failed_hosts = tuple(
                h for h in self.hostnames(job.nodes) if h in slurm_nodes and slurm_nodes[h].down
            )
        status = status_of_job(job, exit_code, failed_hosts=failed_hosts)
        if info.get("placement") == "exclude" and job.state in ACTIVE_JOB_STATES and job.nodes:
            # Slurm chose the nodes: the attempt's hosts become the allocation, in rank order.
            status = replace(status, allocated_hosts=self.hostnames(job.nodes))
        return status

    def hostnames(self, nodelist: str) -> tuple[str, ...]:
        """`n[1-3]` -> ("n1", "n2", "n3"): the order in which Slurm numbers an allocation's nodes."""
        if nodelist in ("", "(null)"):
            return ()
        if nodelist not in self._hostnames:
            out = _checked(self._run(["scontrol", "show", "hostnames", nodelist]), "scontrol show hostnames")
            self._hostnames[nodelist] = tuple(out.split())
        return self._hostnames[nodelist]

    def kill(self, info: Mapping[str, Any], *, grace_s: float = 5.0) -> None:
        job = self._job(info)
        if job is None or job.state not in ACTIVE_JOB_STATES:
            return
        # scancel sends SIGTERM to every step (torchrun shuts its workers down), SIGKILL after KillWait.
        _checked(self._run(["scancel", str(job.job_id)]), f"scancel {job.job_id}")
        deadline = time.monotonic() + grace_s + 30
        while time.monotonic() < deadline:
            job = self._job(info)
            if job is None or job.state not in ACTIVE_JOB_STATES:
                return
            time.sleep(0.2)
        raise SlurmError(f"Slurm job {job.job_id} did not end after scancel (state {job.state})")

    # -- the job --

    def options(self, spec: LaunchSpec) -> dict[str, Any]:
        """The cluster-wide defaults, overridden by the run's `slurm` config section."""
        return {**_non_empty(self.defaults.__dict__), **_non_empty(dict(spec.launcher_options))}

    def sbatch_argv(self, spec: LaunchSpec, info: Mapping[str, Any], script: Path) -> list[str]:
        options = self.options(spec)
        argv = [
            "sbatch",
            "--parsable",
            f"--job-name={info['job_name']}",
            f"--comment={info['comment']}",
            f"--nodes={len(spec.hosts)}",
        ]
        if info.get("placement") == "exclude":
            # Slurm places the job on any nodes but those trainops holds out of service; required nodes
            # (spares to use first) go into --nodelist unless they are out of service themselves.
            unfit = sorted(set(spec.unfit_hosts))
            required = [h for h in options.get("nodelist") or () if h not in unfit]
            if unfit:
                argv.append(f"--exclude={','.join(unfit)}")
            if required:
                argv.append(f"--nodelist={','.join(required)}")
        else:
            argv.append(f"--nodelist={','.join(spec.hosts)}")
        argv += [
            "--ntasks-per-node=1",
            # trainops decides about restarts (checkpoint, LR, hosts); Slurm's own requeue would race it.
            "--no-requeue",
            f"--chdir={self.workdir}",
            f"--output={Path(info['attempt_dir']) / 'slurm-%j.out'}",
        ]
        if options.get("partition"):
            argv.append(f"--partition={options['partition']}")
        if options.get("account"):
            argv.append(f"--account={options['account']}")
        if options.get("time_limit"):
            argv.append(f"--time={options['time_limit']}")
        if int(options.get("gpus_per_node") or 0) > 0:
            argv.append(f"--gpus-per-node={int(options['gpus_per_node'])}")
        argv += [str(flag) for flag in options.get("extra_sbatch_flags") or ()]
        argv.append(str(script))
        return argv

    def task_command(self, spec: LaunchSpec, info: Mapping[str, Any]) -> str:
        """The shell command each srun task (one per node) runs: the trainer's launcher, then a record of
        its own exit status and when it ended (`exit-node<SLURM_NODEID>.json`). srun reports 128 + signal as
        soon as --kill-on-bad-exit has killed a survivor, which would hide the code of the task that failed
        first; `root_cause_exit_code` reads these records instead."""
        launch = " ".join(
            [
                shlex.quote(self.python),
                "-m trainer.launch",
                '--nnodes "$SLURM_JOB_NUM_NODES" --node-rank "$SLURM_NODEID"',
                f"--nproc-per-node {spec.procs_per_host}",
                f'--master-addr "$TRAINOPS_RDZV_ADDR" --master-port {int(info["rdzv_port"])}',
                "--max-restarts 0 --",
                *(shlex.quote(a) for a in spec.trainer_args),
            ]
        )
        record = shlex.quote(str(Path(info["attempt_dir"]) / TASK_EXIT_PREFIX)) + '"$SLURM_NODEID"'
        return (
            f"{launch}; code=$?; "
            f"""printf '{{"exit_code": %d, "ended": %s}}\\n' "$code" "$(date +%s.%N)" > {record}.tmp; """
            f"mv {record}.tmp {record}.json; exit $code"
        )

    def batch_script(self, spec: LaunchSpec, info: Mapping[str, Any]) -> str:
        attempt_dir = Path(info["attempt_dir"])
        exit_file = shlex.quote(str(attempt_dir / EXIT_FILE))
        task = shlex.quote(self.task_command(spec, info))
        return f"""#!/bin/bash
# Generated by trainops for run {spec.run_name} (id {spec.run_id}), attempt {spec.attempt}.
set -u
set -a
. {shlex.quote(str(attempt_dir / ENV_FILE))}
set +a
# Rank r runs on node r // procs_per_host: torchrun's node rank is the task's SLURM_NODEID, which counts
# the allocation's nodes in this order, so ranks report the Slurm node they run on.
TRAINOPS_HOSTS="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | paste -sd, -)"
first="${{TRAINOPS_HOSTS%%,*}}"
addr="$(scontrol show node "$first" -o | tr ' ' '\\n' | sed -n 's/^NodeAddr=//p')"
export TRAINOPS_HOSTS TRAINOPS_RDZV_ADDR="${{addr:-$first}}"
srun --ntasks-per-node=1 --kill-on-bad-exit=1 --export=ALL bash -c {task}
code=$?
printf '{{"exit_code": %d, "ended": %s}}\\n' "$code" "$(date +%s)" > {exit_file}.tmp
mv {exit_file}.tmp {exit_file}
exit "$code"
"""

    def _job(self, info: Mapping[str, Any]) -> JobView | None:
        job_id = info.get("job_id")
        if job_id is None:
            return self._job_by_tag(str(info["tag"]))
        result = self._run(["scontrol", "show", "job", "-o", str(int(job_id))])
        if result.returncode != 0:
            if "Invalid job id" in (result.stderr or ""):
                return None  # purged after MinJobAge
            _checked(result, f"scontrol show job {job_id}")
        record = parse_scontrol_record(result.stdout.strip())
        return JobView(
            job_id=int(job_id),
            state=record.get("JobState", "UNKNOWN").split()[0],
            exit_code=decode_exit_field(record["ExitCode"]) if record.get("ExitCode") else None,
            reason=record.get("Reason", ""),
            nodes=record.get("NodeList", ""),
        )

    def _job_by_tag(self, tag: str) -> JobView | None:
        """The attempt's job when the orchestrator died between sbatch and recording the job id."""
        data = json.loads(_checked(self._run(["squeue", "--json"]), "squeue --json"))
        for job in data.get("jobs", []):
            if f"tag={tag}" in str(job.get("comment", "")):
                raw = job.get("exit_code")
                return JobView(
                    job_id=int(job["job_id"]),
                    state=str(job.get("job_state", "UNKNOWN")),
                    exit_code=decode_wait_status(int(raw)) if isinstance(raw, int) else None,
                    reason=str(job.get("state_reason", "")),
                    nodes=str(job.get("nodes", "")),
                )
        return None


def _non_empty(options: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in options.items() if v not in (None, "", (), [], 0)}


def read_job_exit_status(attempt_dir: Path) -> int | None:
    """The job's exit status: the root cause among the tasks' own records, else what srun returned."""
    tasks: list[tuple[float, int]] = []
    for path in sorted(attempt_dir.glob(f"{TASK_EXIT_PREFIX}*.json")):
        try:
            record = json.loads(path.read_text())
            tasks.append((float(record["ended"]), int(record["exit_code"])))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    try:
        job_code: int | None = int(json.loads((attempt_dir / EXIT_FILE).read_text())["exit_code"])
    except (OSError, ValueError, KeyError, TypeError):
        job_code = None
    return root_cause_exit_code(tasks, job_code)


def root_cause_exit_code(tasks: Sequence[tuple[float, int]], job_code: int | None) -> int | None:
    """Exit status of a multi-node attempt from its tasks' `(ended, exit_code)` records, as torchrun (and
    trainer.launch) report a failed worker group: 42 when any task diverged, 2 when every failed task
    rejected the configuration, else the code of the task that failed first. Tasks that srun killed
    (--kill-on-bad-exit) die with their wrapper and leave no record. Without records, or before the job has
    ended (`job_code` None), srun's own status is all there is.
    """
    if job_code is None:
        return None
    failed = sorted((ended, code) for ended, code in tasks if code != 0)
    if not failed:
        return job_code
    codes = [code for _, code in failed]
    if EXIT_DIVERGED in codes:
        return EXIT_DIVERGED
    if all(code == EXIT_CONFIG for code in codes):
        return EXIT_CONFIG
    return failed[0][1]


def _free_port() -> int:
    """A port free on this host; the batch script's first node uses it for the rendezvous (on a cluster it
    is a guess, as any port is: torchrun reports a clash, which is a crash the orchestrator retries)."""
    import socket

    with socket.socket() as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


# ---- checking a run's Slurm options against the cluster --------------------------------------------


@dataclass(frozen=True)
class SlurmPartition:
    name: str
    state: str  # UP, DOWN, DRAIN, INACTIVE
    default: bool
    allow_accounts: frozenset[str] | None  # None: every account
    deny_accounts: frozenset[str]

    def allows(self, account: str) -> bool:
        if account in self.deny_accounts:
            return False
        return self.allow_accounts is None or account in self.allow_accounts


@dataclass(frozen=True)
class SlurmProblem:
    message: str
    permanent: bool  # False: may pass later without a change to the run (a partition down for maintenance)


def read_partitions(run: SlurmRunner) -> dict[str, SlurmPartition]:
    out = _checked(run(["scontrol", "show", "partition", "-o"]), "scontrol show partition")
    partitions: dict[str, SlurmPartition] = {}
    for line in out.splitlines():
        record = parse_scontrol_record(line.strip())
        if "PartitionName" not in record:
            continue
        allow = record.get("AllowAccounts", "ALL")
        partitions[record["PartitionName"]] = SlurmPartition(
            name=record["PartitionName"],
            state=record.get("State", "UNKNOWN"),
            default=record.get("Default") == "YES",
            allow_accounts=None if allow == "ALL" else frozenset(filter(None, allow.split(","))),
            deny_accounts=frozenset(filter(None, record.get("DenyAccounts", "").split(","))),
        )
    return partitions


def slurm_config_problems(options: Mapping[str, Any], run: SlurmRunner) -> list[SlurmProblem]:
    """What Slurm would refuse (or hold forever) about a run's Slurm options: a partition that does not
    exist or is not up, an account the partition does not allow, node names Slurm does not know.

    Asked of Slurm itself (``scontrol show partition -o``, ``sinfo --json``); raises SlurmError when Slurm
    cannot be asked. Accounts are checked against the partition's AllowAccounts/DenyAccounts; an account
    that slurmdbd does not know is refused by sbatch at launch, which ends the run as needing attention.
    """
    problems: list[SlurmProblem] = []
    partitions = read_partitions(run)
    name = options.get("partition")
    partition = partitions.get(name) if name else next((p for p in partitions.values() if p.default), None)
    if name and partition is None:
        available = ", ".join(sorted(partitions)) or "none"
        problems.append(
            SlurmProblem(f"Slurm partition {name!r} does not exist (available: {available})", permanent=True)
        )
    elif partition is not None and partition.state != "UP":
        problems.append(
            SlurmProblem(f"Slurm partition {partition.name!r} is {partition.state}, not UP", permanent=False)
        )
    account = options.get("account")
    if account and partition is not None and not partition.allows(str(account)):
        allowed = ", ".join(sorted(partition.allow_accounts or ())) or "none"
        problems.append(
            SlurmProblem(
                f"Slurm account {account!r} may not run jobs in partition {partition.name!r} "
                f"(allowed accounts: {allowed})",
                permanent=True,
            )
        )
    wanted_nodes = [str(n) for n in options.get("nodelist") or ()]
    if wanted_nodes:
        known = read_slurm_nodes(run)
        unknown = [n for n in wanted_nodes if n not in known]
        if unknown:
            problems.append(
                SlurmProblem(
                    f"Slurm does not know node name(s) {', '.join(unknown)} "
                    f"(known: {', '.join(sorted(known)) or 'none'})",
                    permanent=True,
                )
            )
    return problems


def check_slurm_run_config(options: Mapping[str, Any], defaults: SlurmDefaults) -> list[SlurmProblem]:
    """`slurm_config_problems` for a run's `slurm` section on this control plane's cluster (SLURM_CONF of
    the environment), with the cluster-wide defaults applied."""
    merged = {**_non_empty(defaults.__dict__), **_non_empty(dict(options))}
    return slurm_config_problems(merged, run_slurm)


# ---- nodes: Slurm <-> control plane ----------------------------------------------------------------


@dataclass(frozen=True)
class SlurmNode:
    name: str
    states: frozenset[str]  # e.g. {"IDLE", "DRAIN"}, {"DOWN", "NOT_RESPONDING"}
    reason: str

    @property
    def drained(self) -> bool:
        return bool(self.states & {"DRAIN", "DRAINED", "DRAINING"})

    @property
    def down(self) -> bool:
        return bool(self.states & {"DOWN", "FAIL", "NOT_RESPONDING", "POWERED_DOWN"})

    @property
    def ours(self) -> bool:
        return self.reason.startswith(SlurmAdapter.REASON_PREFIX)


def read_slurm_nodes(run: SlurmRunner) -> dict[str, SlurmNode]:
    data = json.loads(_checked(run(["sinfo", "--json"]), "sinfo --json"))
    nodes: dict[str, SlurmNode] = {}
    for entry in data.get("nodes", []):
        state = entry.get("state")
        states = {str(s).upper() for s in ([state] if isinstance(state, str) else state or [])}
        states |= {str(s).upper() for s in entry.get("state_flags") or []}
        name = str(entry["name"])
        nodes[name] = SlurmNode(name, frozenset(states), str(entry.get("reason", "")))
    return nodes


SYNC_AUTHOR = "system:orchestrator/slurm"
SYNC_PREFIX = "slurm: "  # control-plane cordons made by the sync, so it can lift them again


@dataclass
class SyncReport:
    cordoned: list[str] = field(default_factory=list)  # drained or down outside trainops -> cordoned
    released: list[str] = field(default_factory=list)  # Slurm gave the node back -> healthy
    drained: list[str] = field(default_factory=list)  # cordoned in trainops -> drained in Slurm
    resumed: list[str] = field(default_factory=list)  # back in service in trainops -> resumed in Slurm
    errors: list[str] = field(default_factory=list)  # scheduler calls that failed (logged with evidence)


def sync_slurm_nodes(
    session_factory: sessionmaker[Session], run: SlurmRunner, *, adapter: SlurmAdapter
) -> SyncReport:
    """One level-triggered pass over the nodes registered in both places.

    Outside drains and outages are findings: the node is cordoned with Slurm's reason (the logbook says
    so) and released when Slurm has it back. trainops' own drains follow the node state: a node cordoned,
    retired or draining in the control plane is drained in Slurm, and a node back in service is resumed.
    """
    report = SyncReport()
    slurm_nodes = read_slurm_nodes(run)
    out_of_service = (NodeState.cordoned, NodeState.retired, NodeState.draining)
    for name, slurm_node in sorted(slurm_nodes.items()):
        with transaction(session_factory) as session:
            node = find_node(session, hostname=name)
            if node is None:
                continue
            external = (slurm_node.drained and not slurm_node.ours) or slurm_node.down
            ours_by_sync = node.state is NodeState.cordoned and (node.state_reason or "").startswith(
                SYNC_PREFIX
            )
            if external and node.state not in out_of_service:
                what = "down" if slurm_node.down else "drained outside trainops"
                transition_node(
                    session,
                    node=node,
                    target=NodeState.cordoned,
                    reason=f"{SYNC_PREFIX}{name} is {what}: {slurm_node.reason or 'no reason given'}",
                    author=SYNC_AUTHOR,
                    evidence={"slurm_states": sorted(slurm_node.states), "slurm_reason": slurm_node.reason},
                    severity=Severity.warning,
                )
                report.cordoned.append(name)
            elif not external and ours_by_sync and not slurm_node.drained:
                transition_node(
                    session,
                    node=node,
                    target=NodeState.healthy,
                    reason=f"{SYNC_PREFIX}{name} is back in service in Slurm",
                    author=SYNC_AUTHOR,
                    evidence={"slurm_states": sorted(slurm_node.states)},
                )
                report.released.append(name)
            elif node.state in out_of_service and not ours_by_sync and not slurm_node.drained:
                try:
                    adapter.cordon(name, node.state_reason or node.state.value)
                except Exception as error:  # logged with evidence; the pass goes on to the next node
                    report.errors.append(
                        record_scheduler_failure(
                            session,
                            adapter=adapter,
                            action="cordon",
                            node=node,
                            state=node.state,
                            error=error,
                            author=SYNC_AUTHOR,
                        )
                    )
                    continue
                report.drained.append(name)
            elif node.state not in out_of_service and slurm_node.drained and slurm_node.ours:
                try:
                    adapter.uncordon(name, node.state_reason or "back in service")
                except Exception as error:  # logged with evidence; the pass goes on to the next node
                    report.errors.append(
                        record_scheduler_failure(
                            session,
                            adapter=adapter,
                            action="uncordon",
                            node=node,
                            state=node.state,
                            error=error,
                            author=SYNC_AUTHOR,
                        )
                    )
                    continue
                write_log(
                    session,
                    kind=LogKind.action,
                    severity=Severity.info,
                    message=f"node {name}: resumed in Slurm (back in service in trainops)",
                    author=SYNC_AUTHOR,
                    node_id=node.id,
                    evidence={"slurm_reason": slurm_node.reason},
                )
                report.resumed.append(name)
    return report


class SlurmHealthGateway(SweepHealthGateway):
    """The health gateway of an orchestrator on Slurm: cordons also drain in Slurm (via `SlurmAdapter`),
    and `sync_external` (called at the start of each reconcile pass) reconciles node states both ways."""

    def __init__(
        self,
        session_factory: sessionmaker[Session],
        *,
        env: Mapping[str, str] | None = None,
        author: str = "system:orchestrator",
        app: Any = None,
    ) -> None:
        command_env = {**os.environ, **(env or {})}

        def run(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
            return subprocess.run(list(argv), capture_output=True, text=True, timeout=60, env=command_env)

        def run_checked(argv: Sequence[str]) -> str:
            return _checked(run(argv), " ".join(argv[:2]))

        self._slurm_run = run
        self.slurm_adapter = SlurmAdapter(run_checked)
        super().__init__(session_factory, author=author, adapters=[self.slurm_adapter], app=app)

    def sync_external(self) -> SyncReport:
        return sync_slurm_nodes(self._factory, self._slurm_run, adapter=self.slurm_adapter)
