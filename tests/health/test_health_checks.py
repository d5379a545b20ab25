"""Checks on one host: planted NVML faults are found, missing NVML is skipped, a hung check is killed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from health.checks import QUICK_CHECKS, active
from health.checks.context import CheckContext
from health.checks.registry import CHECK_FUNCTIONS
from health.config import HealthConfig
from health.nvml import XidWatcher, open_nvml
from health.results import CheckStatus, Fault
from health.runner import run_isolated


def fleet(tmp_path: Path, hosts: dict[str, Any]) -> HealthConfig:
    path = tmp_path / "faults.json"
    path.write_text(json.dumps({"default_gpus": 8, "hosts": hosts}))
    return HealthConfig(fake_nvml_path=path, checkpoint_dir=tmp_path / "ckpt", min_free_disk_gb=0.001)


def quick(config: HealthConfig, host: str) -> dict[str, Any]:
    ctx = CheckContext(
        host=host, config=config, expected_gpus=8, xids=XidWatcher(open_nvml(config, host)).drain()
    )
    return {name: CHECK_FUNCTIONS[name](ctx) for name in QUICK_CHECKS if name != "host.clock"}


PLANTED = [
    ("double-bit ECC error", {"gpu": 3, "kind": "ecc_dbe"}, "nvml.ecc", Fault.ecc_dbe),
    ("XID 79, fallen off the bus", {"gpu": 5, "kind": "xid", "xid": 79}, "nvml.ecc", Fault.gpu_lost),
    ("XID 48 reported through the event set", {"gpu": 2, "kind": "xid", "xid": 48}, "nvml.xid", Fault.xid_48),
    ("thermal throttling", {"gpu": 1, "kind": "thermal"}, "nvml.thermal", Fault.thermal_throttle),
    ("PCIe link downgrade", {"gpu": 0, "kind": "pcie_downgrade"}, "nvml.pcie", Fault.pcie_downgrade),
    ("NVLink down", {"gpu": 6, "kind": "nvlink_down", "link": 4}, "nvml.nvlink", Fault.nvlink_down),
    ("a GPU missing from the bus", {"gpu": 7, "kind": "missing_gpu"}, "nvml.gpu_count", Fault.gpu_missing),
    (
        "row remapping failure",
        {"gpu": 4, "kind": "row_remap_failure"},
        "nvml.memory_retirement",
        Fault.row_remap_failure,
    ),
    (
        "driver asks for a reset",
        {"gpu": 0, "kind": "recovery_action"},
        "nvml.recovery_action",
        Fault.recovery_action,
    ),
]


@pytest.mark.parametrize(("story", "fault", "check", "expected"), PLANTED, ids=[p[0] for p in PLANTED])
def test_a_planted_fault_is_found_by_its_check_and_nothing_else_fails(
    tmp_path: Path, story: str, fault: dict[str, Any], check: str, expected: str
) -> None:
    config = fleet(tmp_path, {"bad": {"faults": [fault]}})
    results = quick(config, "bad")
    assert results[check].status is CheckStatus.failed
    assert expected in results[check].faults
    assert results[check].reason
    healthy = quick(config, "good")
    assert all(r.status is CheckStatus.passed for r in healthy.values()), healthy


def test_xids_are_reported_once_since_the_last_check(tmp_path: Path) -> None:
    config = fleet(tmp_path, {"h": {"faults": [{"gpu": 2, "kind": "xid", "xid": 48}]}})
    watcher = XidWatcher(open_nvml(config, "h"))
    assert watcher.drain().events == [(2, 48)]
    assert watcher.drain().events == []


def test_a_host_without_driver_is_skipped_with_the_reason_never_passed(tmp_path: Path) -> None:
    config = fleet(tmp_path, {"nodriver": {"driver": False}})
    results = quick(config, "nodriver")
    nvml_results = [r for name, r in results.items() if name.startswith("nvml.")]
    assert nvml_results and all(r.status is CheckStatus.skipped for r in nvml_results)
    assert all("LibraryNotFound" in (r.reason or "") for r in nvml_results)


def test_this_machine_without_a_gpu_skips_the_real_nvml_path(tmp_path: Path) -> None:
    # No fault script: the real pynvml is called and finds no library on this CPU-only machine.
    config = HealthConfig(checkpoint_dir=tmp_path / "ckpt", min_free_disk_gb=0.001)
    results = quick(config, "real")
    assert results["nvml.ecc"].status in (CheckStatus.skipped, CheckStatus.passed)
    if results["nvml.ecc"].status is CheckStatus.skipped:
        assert "no NVML" in (results["nvml.ecc"].reason or "")


def test_a_hanging_check_is_killed_and_reported_and_the_rest_still_run(tmp_path: Path) -> None:
    config = fleet(
        tmp_path, {"wedged": {"faults": [{"kind": "hang", "function": "nvmlDeviceGetTemperature"}]}}
    )
    ctx = CheckContext(host="wedged", config=config, expected_gpus=8)
    results = run_isolated(["nvml.ecc", "nvml.thermal", "nvml.pcie"], ctx, timeout_s=2.0)
    by_name = {r.check: r for r in results}
    assert [r.check for r in results] == ["nvml.ecc", "nvml.thermal", "nvml.pcie"]
    assert by_name["nvml.thermal"].status is CheckStatus.timeout
    assert Fault.check_timeout in by_name["nvml.thermal"].faults
    assert by_name["nvml.ecc"].status is CheckStatus.passed
    assert by_name["nvml.pcie"].status is CheckStatus.passed


def test_busbw_follows_the_nccl_tests_formula() -> None:
    # 1 GB in 1 s among 8 ranks: algbw 1 GB/s, busbw = algbw * 2 * 7 / 8.
    assert active.busbw_allreduce(1e9, 1.0, 8) == pytest.approx(1.75e9)
    assert active.busbw_allreduce(1e9, 0.5, 2) == pytest.approx(2e9)
    with pytest.raises(ValueError):
        active.busbw_allreduce(1e9, 1.0, 1)


def small_deep(config: HealthConfig, **changes: Any) -> HealthConfig:
    return config.with_changes(
        gemm_size=256, memory_test_mb=4, allreduce_mb=1.0, disk_test_mb=8, min_disk_write_mb_s=1.0, **changes
    )


@pytest.mark.serial  # compares two measurements of this machine: another test running beside it skews one
def test_a_slow_gemm_is_degraded_against_the_calibrated_cpu_baseline(tmp_path: Path) -> None:
    baseline = active.cpu_gemm_gflops(256)
    config = small_deep(
        fleet(tmp_path, {"slow": {"active": {"gemm_slowdown": 20.0}}}),
        cpu_gemm_baseline_gflops=baseline,
        min_gemm_ratio=0.2,
    )
    slow = active.check_gemm(CheckContext(host="slow", config=config, expected_gpus=8))
    assert slow.status is CheckStatus.degraded and Fault.gemm_slow in slow.faults
    uncalibrated = active.check_gemm(
        CheckContext(host="x", config=config.with_changes(cpu_gemm_baseline_gflops=None), expected_gpus=8)
    )
    assert uncalibrated.status is CheckStatus.skipped and "baseline" in (uncalibrated.reason or "")


def test_memory_pattern_catches_a_flipped_bit(tmp_path: Path) -> None:
    config = small_deep(fleet(tmp_path, {"flaky": {"active": {"memory_bitflip": True}}}))
    bad = active.check_memory_pattern(CheckContext(host="flaky", config=config, expected_gpus=8))
    good = active.check_memory_pattern(CheckContext(host="fine", config=config, expected_gpus=8))
    assert bad.status is CheckStatus.failed and Fault.memory_pattern in bad.faults
    assert good.status is CheckStatus.passed


def test_allreduce_and_disk_checks_measure_on_cpu(tmp_path: Path) -> None:
    config = small_deep(fleet(tmp_path, {}))
    ctx = CheckContext(host="h", config=config, expected_gpus=8)
    allreduce = active.check_allreduce_local(ctx)
    assert allreduce.status is CheckStatus.passed
    assert allreduce.measurements["backend"] == "gloo" and allreduce.measurements["busbw_gbps"] > 0
    disk = active.check_disk_throughput(ctx)
    assert disk.status is CheckStatus.passed and disk.measurements["write_mb_s"] > 0
    assert not list((tmp_path / "ckpt").iterdir())  # the test file is removed


@pytest.mark.serial  # compares two measurements of this machine: another test running beside it skews one
def test_a_slow_link_is_flagged_against_the_baseline(tmp_path: Path) -> None:
    config = small_deep(fleet(tmp_path, {"slowlink": {"active": {"link_delay_ms": 200}}}))
    seconds = active.gloo_allreduce_seconds(1024 * 1024, 2)
    baseline = active.busbw_allreduce(1024 * 1024, seconds, 2) / 1e9
    config = config.with_changes(cpu_busbw_baseline_gbps=baseline, min_busbw_ratio=0.5)
    slow = active.check_allreduce_local(CheckContext(host="slowlink", config=config, expected_gpus=8))
    assert slow.status is CheckStatus.degraded and Fault.busbw_low in slow.faults
