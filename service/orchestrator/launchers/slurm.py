"""Running attempts on a Slurm cluster.

`SlurmLauncher` submits each attempt as one batch job: ``sbatch --nodelist=<the hosts the orchestrator
picked>`` (run config ``slurm.placement: nodelist``, the default), or ``sbatch --nodes=N --exclude=<the
hosts the control plane holds out of service>`` (``placement: exclude``: Slurm places the job, and the
attempt's hosts are updated from the allocation). The generated script runs ``srun`` with one task per
node, each task a ``trainer.launch`` (torchrun) whose node rank is the task's ``SLURM_NODEID`` and whose
rendezvous master is the first node of the allocation. TRAINOPS_HOSTS is exported from the allocation in
the same order, so every rank reports the Slurm node name it runs on (its heartbeats and metrics name
Slurm nodes, never `hostname`).

State comes from ``scontrol show job -o`` (22.05 has no ``--json`` there; its ExitCode is ``code:signal``)
and, for a job whose id was never recorded, ``squeue --json`` filtered in Python by the comment tag
(``squeue -j`` ignores its filter in JSON mode; there ``exit_code`` is a raw wait status). The batch script
also writes the exit status into the attempt directory, as the local runner does, so an attempt that Slurm
has already purged from its memory still has an outcome.

Asking Slurm (commands, `scontrol` records, node lists), the sbatch defaults and the check of a run's Slurm
options are in `service/fleet/slurm.py`; draining nodes and syncing node states with Slurm are fleet's
(the Slurm adapter in `service/fleet/scheduler.py`, the sync in `service/fleet/sync.py`).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from service.fleet.slurm import (
    SlurmDefaults,
    SlurmError,
    SlurmRunner,
    checked_stdout,
    non_empty_options,
    parse_scontrol_record,
    read_slurm_nodes,
    slurm_config_problems,
)
from service.orchestrator.launchers.base import ATTEMPT_TAG_ENV, LaunchRefused, LaunchSpec, ProcessStatus
from service.orchestrator.runner import EXIT_FILE
from trainer.contract import root_cause_exit_code as contract_root_cause

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

    def find_started(self, info: Mapping[str, Any]) -> dict[str, Any] | None:
        """The attempt's job, when an orchestrator submitted it and died before recording its id: found by
        the comment tag in squeue, or (purged already) by the exit status the batch script wrote."""
        job = self._job_by_tag(str(info["tag"]))
        if job is not None:
            return {"job_id": job.job_id, "started": time.time()}
        if read_job_exit_status(Path(info["attempt_dir"])) is not None:
            return {"started": time.time()}
        return None

    def hostnames(self, nodelist: str) -> tuple[str, ...]:
        """`n[1-3]` -> ("n1", "n2", "n3"): the order in which Slurm numbers an allocation's nodes."""
        if nodelist in ("", "(null)"):
            return ()
        if nodelist not in self._hostnames:
            out = checked_stdout(
                self._run(["scontrol", "show", "hostnames", nodelist]), "scontrol show hostnames"
            )
            self._hostnames[nodelist] = tuple(out.split())
        return self._hostnames[nodelist]

    def kill(self, info: Mapping[str, Any], *, grace_s: float = 5.0) -> None:
        job = self._job(info)
        if job is None or job.state not in ACTIVE_JOB_STATES:
            return
        # scancel sends SIGTERM to every step (torchrun shuts its workers down), SIGKILL after KillWait.
        checked_stdout(self._run(["scancel", str(job.job_id)]), f"scancel {job.job_id}")
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
        return {**non_empty_options(self.defaults.__dict__), **non_empty_options(dict(spec.launcher_options))}

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
            checked_stdout(result, f"scontrol show job {job_id}")
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
        data = json.loads(checked_stdout(self._run(["squeue", "--json"]), "squeue --json"))
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
    trainer.launch) report a failed worker group (`trainer.contract.root_cause_exit_code`: the trainer's
    deliberate verdicts first, else the code of the task that failed first). Tasks that srun killed
    (--kill-on-bad-exit) die with their wrapper and leave no record. Without records, or before the job has
    ended (`job_code` None), srun's own status is all there is.
    """
    if job_code is None:
        return None
    failed = sorted((ended, code) for ended, code in tasks if code != 0)
    if not failed:
        return job_code
    return contract_root_cause([code for _, code in failed])


def _free_port() -> int:
    """A port free on this host; the batch script's first node uses it for the rendezvous (on a cluster it
    is a guess, as any port is: torchrun reports a clash, which is a crash the orchestrator retries)."""
    import socket

    with socket.socket() as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])
