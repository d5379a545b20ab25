"""Which extra sbatch flags a run's config may pass (`slurm.extra_sbatch_flags`), and why the rest may not.

trainops writes the job's name, comment (how the orchestrator finds its own jobs), nodes, placement,
output files, working directory, partition, account, time limit and requeue policy; a flag after those
would override them (sbatch takes the last), and `--export=ALL,LD_PRELOAD=...` would run a client's code in
every task. So only flags that refine the request and cannot reach those are accepted, in the one-token
form `--name` or `--name=value` (a separate value token could be read as anything, a short option is
ambiguous). Standard library only: the API's schemas and the Slurm launcher both check with it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

# sbatch long options that only refine what the job asks of the cluster (sbatch(1)).
ALLOWED_SBATCH_FLAGS: frozenset[str] = frozenset(
    {
        "qos",
        "constraint",
        "cluster-constraint",
        "reservation",
        "mem",
        "mem-per-cpu",
        "mem-per-gpu",
        "cpus-per-task",
        "cpus-per-gpu",
        "gres",
        "gres-flags",
        "gpu-bind",
        "gpu-freq",
        "gpus",
        "exclusive",
        "oversubscribe",
        "contiguous",
        "switches",
        "network",
        "hint",
        "threads-per-core",
        "cores-per-socket",
        "sockets-per-node",
        "tmp",
        "time-min",
        "licenses",
        "wckey",
        "nice",
        "priority",
        "mail-type",
        "mail-user",
        "mem-bind",
        "cpu-freq",
        "distribution",
        "spread-job",
        "use-min-nodes",
        "core-spec",
        "thread-spec",
        "acctg-freq",
        "power",
        "deadline",
        "begin",
    }
)

_FLAG = re.compile(r"^--(?P<name>[a-z][a-z0-9-]*)(?:=(?P<value>[^\n\r\0]*))?$")


def check_sbatch_flags(flags: Iterable[str]) -> None:
    """Raise ValueError naming the first flag a run may not pass to sbatch."""
    for flag in flags:
        match = _FLAG.match(flag)
        if match is None:
            raise ValueError(
                f"extra_sbatch_flags: {flag!r} is not of the form --name or --name=value (one token, long "
                "option)"
            )
        if match["name"] not in ALLOWED_SBATCH_FLAGS:
            raise ValueError(
                f"extra_sbatch_flags: --{match['name']} is not allowed (trainops sets the job's name, "
                "comment, nodes, output, environment, partition, account, time and requeue itself); "
                "allowed: " + ", ".join(f"--{f}" for f in sorted(ALLOWED_SBATCH_FLAGS))
            )
