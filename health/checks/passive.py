"""Quick, passive checks: NVML reads and host facts, seconds per host (DCGM level 1)."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from typing import Any

import pynvml

from health.checks.context import CheckContext
from health.nvml import NvmlUnavailable, nvml_error_name
from health.results import CheckResult, CheckStatus, Fault

GpuProbe = Callable[[Any, Any, int], tuple[dict[str, Any], list[tuple[str, str]]]]
"""(nvml, handle, index) -> (measurements, [(fault, problem text)])."""


def _gpus(nvml: Any) -> Iterator[tuple[int, Any, pynvml.NVMLError | None]]:
    for index in range(nvml.nvmlDeviceGetCount()):
        try:
            yield index, nvml.nvmlDeviceGetHandleByIndex(index), None
        except pynvml.NVMLError as error:
            yield index, None, error


def _optional(call: Callable[[], Any]) -> Any:
    """The value, or None where this GPU or driver does not support the query (not a fault)."""
    try:
        return call()
    except (pynvml.NVMLError_NotSupported, pynvml.NVMLError_FunctionNotFound, pynvml.NVMLError_NoPermission):
        return None


def nvml_unavailable(name: str, ctx: CheckContext, error: NvmlUnavailable) -> CheckResult:
    """``skipped`` with the reason; on a host that declares GPUs (registered inventory, or the expected
    count) it also names the ``nvml_missing`` fault, which the cordon policy judges: no silent pass."""
    if ctx.expected_gpus <= 0:
        return CheckResult(check=name, status=CheckStatus.skipped, reason=str(error))
    return CheckResult(
        check=name,
        status=CheckStatus.skipped,
        reason=f"{error}, on a host that declares {ctx.expected_gpus} GPU(s)",
        faults=[Fault.nvml_missing],
        measurements={"expected_gpus": ctx.expected_gpus},
    )


def per_gpu_check(name: str, ctx: CheckContext, probe: GpuProbe) -> CheckResult:
    """Run ``probe`` on every GPU; a GPU that cannot be opened is reported (lost), never skipped silently."""
    try:
        nvml = ctx.nvml()
    except NvmlUnavailable as error:
        return nvml_unavailable(name, ctx, error)
    per_gpu: dict[str, Any] = {}
    faults: list[str] = []
    problems: list[str] = []
    for index, handle, error in _gpus(nvml):
        if error is not None:
            per_gpu[str(index)] = {"error": nvml_error_name(error)}
            faults.append(Fault.gpu_lost)
            problems.append(f"GPU {index} cannot be opened ({nvml_error_name(error)})")
            continue
        measured, found = probe(nvml, handle, index)
        per_gpu[str(index)] = measured
        for fault, text in found:
            faults.append(fault)
            problems.append(f"GPU {index}: {text}")
    if not problems:
        return CheckResult(check=name, status=CheckStatus.passed, measurements={"gpus": per_gpu})
    return CheckResult(
        check=name,
        status=CheckStatus.failed,
        reason="; ".join(problems),
        faults=sorted(set(faults)),
        measurements={"gpus": per_gpu},
    )


def check_gpu_count(ctx: CheckContext) -> CheckResult:
    name = "nvml.gpu_count"
    try:
        count = ctx.nvml().nvmlDeviceGetCount()
    except NvmlUnavailable as error:
        return nvml_unavailable(name, ctx, error)
    measured = {"count": count, "expected": ctx.expected_gpus}
    if count < ctx.expected_gpus:
        return CheckResult(
            check=name,
            status=CheckStatus.failed,
            reason=f"{count} GPU(s) visible, {ctx.expected_gpus} expected",
            faults=[Fault.gpu_missing],
            measurements=measured,
        )
    return CheckResult(check=name, status=CheckStatus.passed, measurements=measured)


def check_ecc(ctx: CheckContext) -> CheckResult:
    def probe(nvml: Any, handle: Any, index: int) -> tuple[dict[str, Any], list[tuple[str, str]]]:
        counts: dict[str, int | None] = {}
        for err_name, err_type in (
            ("sbe", pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED),
            ("dbe", pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED),
        ):
            for ctr_name, ctr_type in (
                ("volatile", pynvml.NVML_VOLATILE_ECC),
                ("aggregate", pynvml.NVML_AGGREGATE_ECC),
            ):
                counts[f"{err_name}_{ctr_name}"] = _optional(
                    lambda e=err_type, c=ctr_type: nvml.nvmlDeviceGetTotalEccErrors(handle, e, c)
                )
        found: list[tuple[str, str]] = []
        if counts["dbe_volatile"]:
            found.append(
                (
                    Fault.ecc_dbe,
                    f"{counts['dbe_volatile']} uncorrectable (double-bit) ECC error(s) since boot",
                )
            )
        sbe = counts["sbe_volatile"] or 0
        if sbe > ctx.config.sbe_storm_threshold:
            found.append((Fault.ecc_sbe_storm, f"{sbe} corrected ECC errors since boot"))
        return counts, found

    return per_gpu_check("nvml.ecc", ctx, probe)


def check_memory_retirement(ctx: CheckContext) -> CheckResult:
    def probe(nvml: Any, handle: Any, index: int) -> tuple[dict[str, Any], list[tuple[str, str]]]:
        measured: dict[str, Any] = {}
        found: list[tuple[str, str]] = []
        sbe_pages = _optional(
            lambda: nvml.nvmlDeviceGetRetiredPages(
                handle, pynvml.NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS
            )
        )
        dbe_pages = _optional(
            lambda: nvml.nvmlDeviceGetRetiredPages(
                handle, pynvml.NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR
            )
        )
        pending = _optional(lambda: nvml.nvmlDeviceGetRetiredPagesPendingStatus(handle))
        measured["retired_pages_sbe"] = None if sbe_pages is None else len(sbe_pages)
        measured["retired_pages_dbe"] = None if dbe_pages is None else len(dbe_pages)
        measured["retired_pages_pending"] = pending
        if pending:
            found.append((Fault.retired_pages_pending, "page retirement pending: needs a GPU reset"))
        rows = _optional(lambda: nvml.nvmlDeviceGetRemappedRows(handle))
        if rows is not None:
            corrected, uncorrected, is_pending, failure = rows
            measured.update(
                remapped_rows_corrected=corrected,
                remapped_rows_uncorrected=uncorrected,
                remap_pending=bool(is_pending),
                remap_failure=bool(failure),
            )
            if failure:
                found.append(
                    (Fault.row_remap_failure, "row remapping failed: the GPU has run out of spare rows")
                )
            elif is_pending:
                found.append((Fault.row_remap_pending, "row remapping pending: needs a GPU reset"))
        return measured, found

    return per_gpu_check("nvml.memory_retirement", ctx, probe)


XID_FAULTS = {79: Fault.xid_79, 48: Fault.xid_48}
XID_MEANING = {
    13: "graphics engine exception",
    31: "GPU memory page fault",
    43: "GPU stopped processing",
    45: "preemptive cleanup",
    48: "double-bit ECC error",
    63: "ECC page retirement / row remapping event",
    64: "ECC page retirement / row remapper failure",
    74: "NVLink error",
    79: "GPU has fallen off the bus",
    92: "high single-bit ECC error rate",
    94: "contained ECC error",
    95: "uncontained ECC error",
}


def check_xid(ctx: CheckContext) -> CheckResult:
    name = "nvml.xid"
    if ctx.xids.error is not None:
        return CheckResult(check=name, status=CheckStatus.skipped, reason=ctx.xids.error)
    events = [
        {"gpu": gpu, "xid": xid, "meaning": XID_MEANING.get(xid, "unknown")} for gpu, xid in ctx.xids.events
    ]
    if not events:
        return CheckResult(check=name, status=CheckStatus.passed, measurements={"events": []})
    faults = sorted({XID_FAULTS.get(e["xid"], Fault.xid_other) for e in events})
    text = ", ".join(f"GPU {e['gpu']} XID {e['xid']} ({e['meaning']})" for e in events)
    return CheckResult(
        check=name,
        status=CheckStatus.failed,
        reason=f"XID events since last check: {text}",
        faults=faults,
        measurements={"events": events},
    )


THERMAL_REASONS = (
    pynvml.nvmlClocksEventReasonHwThermalSlowdown | pynvml.nvmlClocksEventReasonSwThermalSlowdown
)
POWER_BRAKE = pynvml.nvmlClocksEventReasonHwPowerBrakeSlowdown | pynvml.nvmlClocksEventReasonHwSlowdown


def check_thermal(ctx: CheckContext) -> CheckResult:
    def probe(nvml: Any, handle: Any, index: int) -> tuple[dict[str, Any], list[tuple[str, str]]]:
        temperature = nvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU)
        reasons = _optional(lambda: nvml.nvmlDeviceGetCurrentClocksEventReasons(handle)) or 0
        measured = {"temperature_c": temperature, "clock_event_reasons": int(reasons)}
        found: list[tuple[str, str]] = []
        if reasons & THERMAL_REASONS:
            found.append((Fault.thermal_throttle, f"thermal clock throttling at {temperature} C"))
        elif temperature > ctx.config.max_temperature_c:
            found.append((Fault.thermal_throttle, f"{temperature} C > {ctx.config.max_temperature_c} C"))
        if reasons & POWER_BRAKE:
            found.append((Fault.power_over_limit, "hardware slowdown / power brake engaged"))
        return measured, found

    return per_gpu_check("nvml.thermal", ctx, probe)


def check_power(ctx: CheckContext) -> CheckResult:
    def probe(nvml: Any, handle: Any, index: int) -> tuple[dict[str, Any], list[tuple[str, str]]]:
        usage = _optional(lambda: nvml.nvmlDeviceGetPowerUsage(handle))
        limit = _optional(lambda: nvml.nvmlDeviceGetEnforcedPowerLimit(handle))
        measured = {
            "power_w": None if usage is None else usage / 1000,
            "limit_w": None if limit is None else limit / 1000,
        }
        found: list[tuple[str, str]] = []
        if usage is not None and limit and usage > limit * 1.05:
            found.append(
                (Fault.power_over_limit, f"drawing {usage / 1000:.0f} W over the {limit / 1000:.0f} W limit")
            )
        return measured, found

    return per_gpu_check("nvml.power", ctx, probe)


def check_pcie(ctx: CheckContext) -> CheckResult:
    def probe(nvml: Any, handle: Any, index: int) -> tuple[dict[str, Any], list[tuple[str, str]]]:
        gen = nvml.nvmlDeviceGetCurrPcieLinkGeneration(handle)
        max_gen = nvml.nvmlDeviceGetMaxPcieLinkGeneration(handle)
        width = nvml.nvmlDeviceGetCurrPcieLinkWidth(handle)
        max_width = nvml.nvmlDeviceGetMaxPcieLinkWidth(handle)
        reasons = _optional(lambda: nvml.nvmlDeviceGetCurrentClocksEventReasons(handle)) or 0
        measured = {"gen": gen, "max_gen": max_gen, "width": width, "max_width": max_width}
        found: list[tuple[str, str]] = []
        # An idle GPU lowers its link generation to save power; only a lost lane is a fault then.
        idle = bool(reasons & pynvml.nvmlClocksEventReasonGpuIdle)
        if width < max_width or (gen < max_gen and not idle):
            found.append(
                (Fault.pcie_downgrade, f"PCIe link gen{gen} x{width}, capable of gen{max_gen} x{max_width}")
            )
        return measured, found

    return per_gpu_check("nvml.pcie", ctx, probe)


NVLINK_COUNTERS = {
    "crc_flit": pynvml.NVML_NVLINK_ERROR_DL_CRC_FLIT,
    "crc_data": pynvml.NVML_NVLINK_ERROR_DL_CRC_DATA,
    "replay": pynvml.NVML_NVLINK_ERROR_DL_REPLAY,
    "recovery": pynvml.NVML_NVLINK_ERROR_DL_RECOVERY,
}
NVLINK_ERROR_THRESHOLD = 100


def check_nvlink(ctx: CheckContext) -> CheckResult:
    def probe(nvml: Any, handle: Any, index: int) -> tuple[dict[str, Any], list[tuple[str, str]]]:
        links: dict[str, Any] = {}
        found: list[tuple[str, str]] = []
        for link in range(pynvml.NVML_NVLINK_MAX_LINKS):
            try:
                state = nvml.nvmlDeviceGetNvLinkState(handle, link)
            except (pynvml.NVMLError_NotSupported, pynvml.NVMLError_InvalidArgument):
                continue  # a link this GPU does not have (PCIe-only parts have none)
            counters = {
                counter: _optional(
                    lambda c=code, lk=link: nvml.nvmlDeviceGetNvLinkErrorCounter(handle, lk, c)
                )
                for counter, code in NVLINK_COUNTERS.items()
            }
            links[str(link)] = {"up": state == pynvml.NVML_FEATURE_ENABLED, **counters}
            if state != pynvml.NVML_FEATURE_ENABLED:
                found.append((Fault.nvlink_down, f"NVLink {link} is down"))
            errors = sum(v or 0 for v in counters.values())
            if errors > NVLINK_ERROR_THRESHOLD:
                found.append((Fault.nvlink_errors, f"NVLink {link} has {errors} link-level errors"))
        return {"links": links}, found

    return per_gpu_check("nvml.nvlink", ctx, probe)


RECOVERY_ACTIONS = {
    pynvml.NVML_GPU_RECOVERY_ACTION_GPU_RESET: "GPU reset",
    pynvml.NVML_GPU_RECOVERY_ACTION_NODE_REBOOT: "node reboot",
    pynvml.NVML_GPU_RECOVERY_ACTION_DRAIN_P2P: "drain peer-to-peer traffic",
    pynvml.NVML_GPU_RECOVERY_ACTION_DRAIN_AND_RESET: "drain and reset",
}


def check_recovery_action(ctx: CheckContext) -> CheckResult:
    def probe(nvml: Any, handle: Any, index: int) -> tuple[dict[str, Any], list[tuple[str, str]]]:
        values = _optional(
            lambda: nvml.nvmlDeviceGetFieldValues(handle, [pynvml.NVML_FI_DEV_GET_GPU_RECOVERY_ACTION])
        )
        if not values or values[0].nvmlReturn != pynvml.NVML_SUCCESS:
            return {"recovery_action": None}, []  # older drivers do not report one
        action = int(values[0].value.uiVal)
        if action == pynvml.NVML_GPU_RECOVERY_ACTION_NONE:
            return {"recovery_action": "none"}, []
        text = RECOVERY_ACTIONS.get(action, f"action {action}")
        return {"recovery_action": text}, [(Fault.recovery_action, f"driver asks for recovery: {text}")]

    return per_gpu_check("nvml.recovery_action", ctx, probe)


def check_clock(ctx: CheckContext) -> CheckResult:
    name = "host.clock"
    if ctx.reference_time is None:
        return CheckResult(
            check=name, status=CheckStatus.skipped, reason="no reference time from the control plane"
        )
    # The reference was taken when the task was sent, so now - reference = skew + time in the queue.
    # Queueing only ever adds, so a host found *behind* the reference by more than the allowance is
    # certainly skewed; one ahead may just have waited (the sweep judges that bound from receipt times).
    skew = ctx.now() - ctx.reference_time
    measured = {"skew_s": skew, "allowed_s": ctx.config.max_clock_skew_s}
    if skew < -ctx.config.max_clock_skew_s:
        return CheckResult(
            check=name,
            status=CheckStatus.degraded,
            reason=f"host clock is {-skew:.2f} s behind the control plane",
            faults=[Fault.clock_skew],
            measurements=measured,
        )
    return CheckResult(check=name, status=CheckStatus.passed, measurements=measured)


def check_disk_free(ctx: CheckContext) -> CheckResult:
    name = "host.disk_free"
    directory = ctx.config.checkpoint_dir
    directory.mkdir(parents=True, exist_ok=True)
    usage = shutil.disk_usage(directory)
    free_gb = usage.free / 1e9
    measured = {"path": str(directory), "free_gb": free_gb, "total_gb": usage.total / 1e9}
    if free_gb < ctx.config.min_free_disk_gb:
        return CheckResult(
            check=name,
            status=CheckStatus.degraded,
            reason=f"{free_gb:.1f} GB free in {directory}, {ctx.config.min_free_disk_gb} GB needed",
            faults=[Fault.disk_full],
            measurements=measured,
        )
    return CheckResult(check=name, status=CheckStatus.passed, measurements=measured)
