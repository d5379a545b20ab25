#!/bin/bash
# The health worker of one Slurm node, consuming the Celery queue health.<Slurm node name>.
#
# The queue is named after the node's *Slurm* name (what sinfo shows and what the control plane registers),
# not `hostname`: inside a job step that is $SLURMD_NODENAME; on a node outside any job (a systemd unit)
# it is the NodeName slurmd reports for this host (`slurmd -C`). Pass --node NAME to override both.
#
#   systemd, on every node:  ExecStart=/opt/trainops/health/slurm_worker.sh
#   one job step per node:   srun --nodes=N --ntasks-per-node=1 --overlap health/slurm_worker.sh
#
# Environment: TRAINOPS_BROKER_URL (redis://...), and the python of the trainops install in TRAINOPS_PYTHON
# (default: python3 on PATH).
set -euo pipefail

node="${SLURMD_NODENAME:-}"
if [[ "${1:-}" == "--node" ]]; then
    node="${2:?--node needs a name}"
    shift 2
fi
if [[ -z "$node" ]]; then
    node="$(slurmd -C 2>/dev/null | sed -n 's/^NodeName=\([^ ]*\).*/\1/p' | head -n 1)"
fi
if [[ -z "$node" ]]; then
    echo "slurm_worker.sh: cannot tell this node's Slurm name (no SLURMD_NODENAME, slurmd -C failed); use --node" >&2
    exit 2
fi
exec "${TRAINOPS_PYTHON:-python3}" -m health.worker_main --host "$node" "$@"
