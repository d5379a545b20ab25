"""Typed check results: what a host worker returns and what the control side stores and judges."""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field
from typing import Any


class CheckStatus(enum.StrEnum):
    """Outcome of one check. ``timeout`` means the check was killed after its time limit."""

    passed = "passed"
    failed = "failed"
    degraded = "degraded"
    skipped = "skipped"
    timeout = "timeout"
    error = "error"


class Level(enum.StrEnum):
    """Diagnostic depth, after DCGM's levels: quick = passive NVML reads, deep = active load tests."""

    quick = "quick"
    deep = "deep"


# Well-known fault names a check can report; the cordon rules classify them (hard/soft) as data.
class Fault(enum.StrEnum):
    ecc_dbe = "ecc_dbe"
    ecc_sbe_storm = "ecc_sbe_storm"
    retired_pages_pending = "retired_pages_pending"
    row_remap_failure = "row_remap_failure"
    row_remap_pending = "row_remap_pending"
    xid_79 = "xid_79"
    xid_48 = "xid_48"
    xid_other = "xid_other"
    thermal_throttle = "thermal_throttle"
    power_over_limit = "power_over_limit"
    pcie_downgrade = "pcie_downgrade"
    nvlink_down = "nvlink_down"
    nvlink_errors = "nvlink_errors"
    gpu_missing = "gpu_missing"
    gpu_lost = "gpu_lost"
    recovery_action = "recovery_action"
    gemm_slow = "gemm_slow"
    memory_pattern = "memory_pattern"
    busbw_low = "busbw_low"
    link_down = "link_down"
    """A host that cannot form a cross-host group with known-good peers (its link is broken)."""
    disk_slow = "disk_slow"
    disk_full = "disk_full"
    clock_skew = "clock_skew"
    check_timeout = "check_timeout"
    check_error = "check_error"
    missed_deadline = "missed_deadline"
    nvml_missing = "nvml_missing"
    """NVML could not be used (no driver, no library) on a host that declares GPUs: its checks are skipped,
    and that is a finding, not a pass."""


@dataclass(kw_only=True)
class CheckResult:
    """One check's verdict on one host. JSON-serialisable through :meth:`to_json`."""

    check: str
    """Check name, e.g. ``nvml.ecc`` (stored as ``diagnostics.kind``)."""
    status: CheckStatus
    reason: str | None = None
    """Human-readable why: required for every status but ``passed``."""
    faults: list[str] = field(default_factory=list)
    """Fault names (see :class:`Fault`) the cordon policy classifies; empty when nothing is wrong."""
    measurements: dict[str, Any] = field(default_factory=dict)
    duration_s: float = 0.0

    def __post_init__(self) -> None:
        self.status = CheckStatus(self.status)
        if self.status is not CheckStatus.passed and not self.reason:
            raise ValueError(f"check {self.check}: a {self.status.value} result needs a reason")

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["status"] = self.status.value
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CheckResult:
        return cls(**data)


@dataclass(kw_only=True)
class HostReport:
    """All results of one host for one task, as returned through the Celery result backend."""

    host: str
    level: Level
    results: list[CheckResult]
    worker: str
    """The Celery worker node name that ran the checks."""

    def to_json(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "level": self.level.value,
            "worker": self.worker,
            "results": [r.to_json() for r in self.results],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> HostReport:
        return cls(
            host=data["host"],
            level=Level(data["level"]),
            worker=data["worker"],
            results=[CheckResult.from_json(r) for r in data["results"]],
        )
