"""Scripted slowdowns for the active checks on simulated fleets, chosen once at the edge like NVML.

On a real host the shaper is the identity. With a fault script (``TRAINOPS_FAKE_NVML``), a host's
``"active"`` entry slows its GEMM (``gemm_slowdown``: divide the measured rate), its interconnect
(``link_delay_ms``: added to each all-reduce round trip on that host, intra-node and cross-host),
corrupts its memory test (``memory_bitflip``: flip one bit after the write), or cuts it off the fabric
(``link_down``: it never joins a cross-host all-reduce), so a CPU test fleet can plant a slow GPU, a
slow or broken link or bad memory the way the fake NVML plants an ECC error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from health.config import HealthConfig
from health.fault_script import host_spec, load_script


@dataclass(frozen=True)
class LoadShaper:
    gemm_slowdown: float = 1.0
    link_delay_s: float = 0.0
    memory_bitflip: bool = False
    link_down: bool = False

    @classmethod
    def for_host(cls, config: HealthConfig, host: str) -> LoadShaper:
        if config.fake_nvml_path is None:
            return cls()
        active: dict[str, Any] = host_spec(load_script(config.fake_nvml_path), host).get("active", {})
        return cls(
            gemm_slowdown=float(active.get("gemm_slowdown", 1.0)),
            link_delay_s=float(active.get("link_delay_ms", 0.0)) / 1000.0,
            memory_bitflip=bool(active.get("memory_bitflip", False)),
            link_down=bool(active.get("link_down", False)),
        )
