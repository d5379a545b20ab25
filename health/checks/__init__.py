"""The check registry: which checks each level runs, by name."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from health.checks import active, passive
from health.checks.context import CheckContext
from health.results import CheckResult, Level

Check = Callable[[CheckContext], CheckResult]

QUICK_CHECKS: Mapping[str, Check] = {
    "nvml.gpu_count": passive.check_gpu_count,
    "nvml.ecc": passive.check_ecc,
    "nvml.memory_retirement": passive.check_memory_retirement,
    "nvml.xid": passive.check_xid,
    "nvml.thermal": passive.check_thermal,
    "nvml.power": passive.check_power,
    "nvml.pcie": passive.check_pcie,
    "nvml.nvlink": passive.check_nvlink,
    "nvml.recovery_action": passive.check_recovery_action,
    "host.clock": passive.check_clock,
    "host.disk_free": passive.check_disk_free,
}

DEEP_ONLY_CHECKS: Mapping[str, Check] = {
    "torch.gemm": active.check_gemm,
    "torch.memory_pattern": active.check_memory_pattern,
    "torch.allreduce_local": active.check_allreduce_local,
    "host.disk_throughput": active.check_disk_throughput,
}

ALL_CHECKS: Mapping[str, Check] = {**QUICK_CHECKS, **DEEP_ONLY_CHECKS}

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
