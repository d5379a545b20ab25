"""The check catalogue: which checks each level runs, by name.

Names only, so the control plane (sweeps, the diagnostics API) can validate and count checks without
loading their implementations and the NVML bindings they need; :mod:`health.checks.registry` maps each
name to its function, loaded in the check process.
"""

from __future__ import annotations

from health.results import Level

QUICK_CHECKS: tuple[str, ...] = (
    "nvml.gpu_count",
    "nvml.ecc",
    "nvml.memory_retirement",
    "nvml.xid",
    "nvml.thermal",
    "nvml.power",
    "nvml.pcie",
    "nvml.nvlink",
    "nvml.recovery_action",
    "host.clock",
    "host.disk_free",
)

DEEP_ONLY_CHECKS: tuple[str, ...] = (
    "torch.gemm",
    "torch.memory_pattern",
    "torch.allreduce_local",
    "host.disk_throughput",
)

ALL_CHECKS: tuple[str, ...] = (*QUICK_CHECKS, *DEEP_ONLY_CHECKS)

CROSS_HOST_CHECK = "fabric.allreduce"
"""The cross-host all-reduce (and its pairwise bisection, results ``fabric.pairs``): not a per-host check,
run by the control side over the hosts of a deep sweep together (:mod:`service.fleet.fabric`)."""
SELECTABLE_CHECKS: tuple[str, ...] = (*ALL_CHECKS, CROSS_HOST_CHECK)
"""Names a sweep's ``checks`` may list."""


def checks_for(level: Level, names: list[str] | None = None) -> list[str]:
    """Check names to run: the level's set (deep includes quick), or the given subset, validated."""
    if names:
        unknown = sorted(set(names) - set(ALL_CHECKS))
        if unknown:
            raise ValueError(f"unknown checks: {', '.join(unknown)}; known: {', '.join(ALL_CHECKS)}")
        return list(names)
    if level is Level.quick:
        return list(QUICK_CHECKS)
    return list(ALL_CHECKS)
