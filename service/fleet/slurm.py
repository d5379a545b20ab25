"""Slurm as the control plane asks it: running its commands, decoding `scontrol` records, the cluster-wide
sbatch defaults, checking a run's Slurm options against the cluster (what the API asks before it accepts a
run, `check_slurm_run_config`), and reading its nodes.

Used by the API's launcher checks, by the Slurm scheduler adapter (`service/fleet/scheduler.py`: drains,
and the node states the sync reads) and by the orchestrator's Slurm launcher; it changes nothing, in Slurm
or in the control plane.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from service.sbatch_flags import check_sbatch_flags

REASON_PREFIX = "trainops: "
"""Every drain trainops makes has a reason starting with this; any other drain is someone else's."""


class SlurmError(RuntimeError):
    """A Slurm command refused or failed; the message is Slurm's own (invalid node name, bad partition)."""


SlurmRunner = Callable[[Sequence[str]], "subprocess.CompletedProcess[str]"]


def run_slurm(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=60)


def checked_stdout(result: subprocess.CompletedProcess[str], what: str) -> str:
    if result.returncode != 0:
        message = " ".join((result.stderr or result.stdout).split()) or f"exit status {result.returncode}"
        raise SlurmError(f"{what} failed: {message}")
    return result.stdout


def checked_runner(env: Mapping[str, str] | None = None) -> Callable[[Sequence[str]], str]:
    """Run a Slurm command (``env`` over the process environment, e.g. ``SLURM_CONF``) and return its
    stdout; a refusal raises SlurmError with Slurm's own message, which is the evidence a failure logs."""
    command_env = {**os.environ, **env} if env else None

    def run(argv: Sequence[str]) -> str:
        result = subprocess.run(list(argv), capture_output=True, text=True, timeout=60, env=command_env)
        return checked_stdout(result, " ".join(argv[:2]))

    return run


def parse_scontrol_record(line: str) -> dict[str, str]:
    """One `scontrol show ... -o` line as key -> value (values run to the next ` Key=`)."""
    fields: dict[str, str] = {}
    matches = list(re.finditer(r"(?:^|\s)([A-Za-z][\w/:()]*)=", line))
    for index, match in enumerate(matches):
        end = matches[index + 1].start() if index + 1 < len(matches) else len(line)
        fields[match.group(1)] = line[match.end() : end].strip()
    return fields


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


def non_empty_options(options: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in options.items() if v not in (None, "", (), [], 0)}


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
    out = checked_stdout(run(["scontrol", "show", "partition", "-o"]), "scontrol show partition")
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
    try:  # also for runs stored before the API checked them: a flag that overrides trainops's own never runs
        check_sbatch_flags([str(f) for f in options.get("extra_sbatch_flags") or ()])
    except ValueError as exc:
        problems.append(SlurmProblem(str(exc), permanent=True))
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
    merged = {**non_empty_options(defaults.__dict__), **non_empty_options(dict(options))}
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
        # An outage Slurm sees (DOWN, DOWN* = DOWN + NOT_RESPONDING, FAIL). Not POWERED_DOWN: a node that
        # power saving switched off is idle and powers up when a job asks for it.
        return bool(self.states & {"DOWN", "FAIL", "NOT_RESPONDING"})

    @property
    def ours(self) -> bool:
        return self.reason.startswith(REASON_PREFIX)


def read_slurm_nodes(run: SlurmRunner) -> dict[str, SlurmNode]:
    return parse_sinfo_nodes(checked_stdout(run(["sinfo", "--json"]), "sinfo --json"))


def parse_sinfo_nodes(sinfo_json: str) -> dict[str, SlurmNode]:
    """The nodes of ``sinfo --json`` by name: base state and flags (``DOWN``, ``DRAIN``, ...), reason."""
    data = json.loads(sinfo_json)
    nodes: dict[str, SlurmNode] = {}
    for entry in data.get("nodes", []):
        state = entry.get("state")
        states = {str(s).upper() for s in ([state] if isinstance(state, str) else state or [])}
        states |= {str(s).upper() for s in entry.get("state_flags") or []}
        name = str(entry["name"])
        nodes[name] = SlurmNode(name, frozenset(states), str(entry.get("reason", "")))
    return nodes
