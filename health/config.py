"""Health-layer configuration: one typed object read once at the edge (env prefix ``TRAINOPS_HEALTH_``)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

SHARED_QUEUE = "health.shared"


def host_queue(host: str) -> str:
    """The Celery queue a host's worker consumes."""
    return f"health.{host}"


@dataclass(kw_only=True, frozen=True)
class HealthConfig:
    """How checks run, how long they may take, and what counts as healthy."""

    host: str | None = None
    """This worker's host identity (``TRAINOPS_HEALTH_HOST``); None on the control side and in embedded mode,
    where one in-process worker serves every host's queue."""
    broker_url: str | None = None
    """Celery broker and result backend (redis://...); None = embedded, in-process (memory://)."""
    quick_interval_s: float = 30.0
    """How often Celery beat sweeps every registered host with the quick checks."""
    quick_check_timeout_s: float = 10.0
    """Time limit of one quick (passive) check; a check past it is killed and reported as ``timeout``."""
    deep_check_timeout_s: float = 300.0
    """Time limit of one deep (active) check."""
    quick_deadline_s: float = 25.0
    """How long a quick sweep waits for all hosts; a host that has not answered by then is a finding."""
    deep_deadline_s: float = 900.0
    """How long a deep sweep waits for all hosts."""
    expected_gpus: int = 8
    """GPUs a host should have when the control plane has no inventory for it."""
    fake_nvml_path: Path | None = None
    """JSON fault script for the fake NVML backend (``TRAINOPS_FAKE_NVML``); None = the real driver."""
    checkpoint_dir: Path = Path(".trainops/checkpoints")
    """Directory whose write/read throughput and free space the deep and quick checks measure."""
    max_temperature_c: int = 87
    """GPU core temperature above which a GPU is reported as running hot (soft fault)."""
    sbe_storm_threshold: int = 1000
    """Volatile single-bit ECC corrections since boot above which the GPU is flagged (soft fault)."""
    min_gemm_ratio: float = 0.7
    """Measured GEMM throughput / expected figure below which a GPU is slow (soft fault)."""
    min_busbw_ratio: float = 0.7
    """Measured all-reduce bus bandwidth / expected figure below which the fabric is slow (soft fault)."""
    cpu_gemm_baseline_gflops: float | None = None
    """Calibrated CPU GEMM figure (``python -m health.calibrate``); None = the CPU GEMM check is skipped."""
    cpu_busbw_baseline_gbps: float | None = None
    """Calibrated gloo all-reduce bus bandwidth on this class of machine; None = no ratio judged."""
    gemm_size: int = 2048
    """Square matrix size of the GEMM check (smaller on CPU test fleets)."""
    memory_test_mb: int = 256
    """Bytes per device the memory pattern test writes and reads back."""
    allreduce_mb: float = 64.0
    """Message size of the all-reduce bandwidth checks."""
    disk_test_mb: int = 256
    """Bytes the checkpoint-directory throughput test writes and reads back."""
    min_disk_write_mb_s: float = 100.0
    """Checkpoint-directory write throughput below which the disk is slow (soft fault)."""
    min_free_disk_gb: float = 50.0
    """Free space of the checkpoint directory below which the host cannot take checkpoints (soft fault)."""
    max_clock_skew_s: float = 1.0
    """Allowed difference between the host's clock and the control plane's."""
    expected_tflops: Mapping[str, float] = field(
        default_factory=lambda: {
            # Dense BF16 figures a healthy part reaches in a large GEMM (about 70-75% of the datasheet peak).
            "H100": 700.0,
            "H200": 700.0,
            "A100": 230.0,
            "B200": 1400.0,
        }
    )
    """Expected GEMM TFLOP/s by GPU model name fragment."""
    expected_busbw_gbps: Mapping[str, float] = field(
        default_factory=lambda: {"H100": 360.0, "H200": 360.0, "A100": 230.0, "B200": 700.0}
    )
    """Expected intra-node NCCL all-reduce bus bandwidth (GB/s) by GPU model name fragment."""
    expected_fabric_busbw_gbps: Mapping[str, float] = field(
        # One rank per host drives one GPU and its NIC (400 Gb/s NDR per H100/H200, 200 Gb/s HDR per A100,
        # 800 Gb/s XDR per B200), about 80% of line rate; the NVLink figures above would flag every host.
        default_factory=lambda: {"H100": 40.0, "H200": 40.0, "A100": 20.0, "B200": 80.0}
    )
    """Expected cross-host all-reduce bus bandwidth (GB/s, one rank per host) by GPU model name fragment."""
    fabric_join_timeout_s: float = 60.0
    """How long a host waits for the other hosts of a cross-host all-reduce to join; a host that has not
    joined by then is a finding, never a hang."""
    lemon_score_limit: float = 2.5
    """Lemon score at which a host is retired (``CordonRules.lemon_score_limit``): each hardware failure
    attributed to it counts 1, halved every ``lemon_half_life_s``."""
    lemon_half_life_s: float = 14 * 24 * 3600.0
    """Age at which an offence counts half (old offences decay; two weeks by default)."""
    fabric_master_addr: str | None = None
    """Address the ranks of a cross-host all-reduce reach the master host at; None = the master host's
    name (``127.0.0.1`` in embedded mode, where every host's ranks run on this machine). Set
    ``127.0.0.1`` for simulated fleets of worker processes on one machine."""

    def __post_init__(self) -> None:
        positive = (
            "quick_interval_s",
            "quick_check_timeout_s",
            "deep_check_timeout_s",
            "quick_deadline_s",
            "deep_deadline_s",
            "gemm_size",
            "memory_test_mb",
            "allreduce_mb",
            "disk_test_mb",
            "fabric_join_timeout_s",
            "lemon_half_life_s",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.lemon_score_limit < 1:
            raise ValueError("lemon_score_limit must be >= 1")
        if self.expected_gpus < 0:
            raise ValueError("expected_gpus must be >= 0")
        if self.quick_check_timeout_s >= self.quick_deadline_s:
            raise ValueError("quick_check_timeout_s must be shorter than quick_deadline_s")
        if self.deep_check_timeout_s >= self.deep_deadline_s:
            raise ValueError("deep_check_timeout_s must be shorter than deep_deadline_s")
        if self.quick_deadline_s > self.quick_interval_s * 2:
            # A quick sweep must finish before the next-but-one starts, or beat piles sweeps up.
            raise ValueError("quick_deadline_s must be at most twice quick_interval_s")
        for name in ("min_gemm_ratio", "min_busbw_ratio"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in (0, 1]")

    def with_changes(self, **changes: Any) -> HealthConfig:
        return replace(self, **changes)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> HealthConfig:
        """Read ``TRAINOPS_HEALTH_<FIELD>`` plus ``TRAINOPS_FAKE_NVML`` and ``TRAINOPS_BROKER_URL``."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(f"TRAINOPS_HEALTH_{f.name.upper()}")
            if raw is None or f.name in _TABLES:
                continue
            values[f.name] = _parse(f.name, raw)
        if "fake_nvml_path" not in values and env.get("TRAINOPS_FAKE_NVML"):
            values["fake_nvml_path"] = Path(env["TRAINOPS_FAKE_NVML"])
        if "broker_url" not in values and env.get("TRAINOPS_BROKER_URL"):
            values["broker_url"] = env["TRAINOPS_BROKER_URL"]
        return cls(**values)


_FLOAT_OR_NONE = {"cpu_gemm_baseline_gflops", "cpu_busbw_baseline_gbps"}
_INTS = {"expected_gpus", "max_temperature_c", "sbe_storm_threshold", "gemm_size", "memory_test_mb"}
_INTS |= {"disk_test_mb"}
_PATHS = {"fake_nvml_path", "checkpoint_dir"}
_STRS = {"host", "broker_url", "fabric_master_addr"}
_TABLES = {"expected_tflops", "expected_busbw_gbps", "expected_fabric_busbw_gbps"}


def _parse(name: str, raw: str) -> Any:
    if name in _STRS:
        return raw or None
    if name in _PATHS:
        return Path(raw) if raw else None
    if name in _INTS:
        return int(raw)
    if name in _FLOAT_OR_NONE and raw.lower() in ("", "none"):
        return None
    return float(raw)
