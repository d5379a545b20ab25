"""Each check name of :mod:`health.checks` mapped to its function.

Importing this loads the implementations (and with them the NVML bindings), so only the check process
does: :mod:`health.runner` imports it there, and its forkserver preloads it. Its keys are the catalogue's
``ALL_CHECKS`` in order (tests/test_packaging.py checks it).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from health.checks import active, passive
from health.checks.context import CheckContext
from health.results import CheckResult

Check = Callable[[CheckContext], CheckResult]

CHECK_FUNCTIONS: Mapping[str, Check] = {
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
    "torch.gemm": active.check_gemm,
    "torch.memory_pattern": active.check_memory_pattern,
    "torch.allreduce_local": active.check_allreduce_local,
    "host.disk_throughput": active.check_disk_throughput,
}
