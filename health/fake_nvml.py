"""A scripted stand-in for ``pynvml`` on machines without GPUs.

It implements the pynvml functions :mod:`health.checks.passive` calls, with the same signatures, return
shapes and errors (pynvml's own ``NVMLError`` subclasses), so the check code is the same on both. Faults are
scripted per host and GPU from a JSON file (``TRAINOPS_FAKE_NVML``)::

    {"default_gpus": 8,
     "hosts": {"h2": {"gpus": 8, "faults": [{"gpu": 3, "kind": "ecc_dbe"}]},
               "h5": {"faults": [{"gpu": 1, "kind": "xid", "xid": 79}]},
               "h7": {"driver": false}}}

Fault kinds: ``ecc_dbe`` (count), ``ecc_sbe`` (count), ``xid`` (xid; 79 also makes the GPU lost, 48 also
counts a double-bit error), ``thermal`` (temperature_c), ``pcie_downgrade`` (gen, width), ``nvlink_down``
(link), ``nvlink_errors`` (link, count), ``missing_gpu``, ``row_remap_failure``, ``row_remap_pending``,
``recovery_action`` (action), ``hang`` (function: that call never returns, like a wedged driver).
Host keys besides faults: ``gpus``, ``model``, ``driver`` (false = no driver installed), and ``active``
(slowdowns for the active checks, see :class:`health.shaping.LoadShaper`).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pynvml

from health.fault_script import host_spec, load_script

NVLINK_LINKS = 18
HEALTHY_TEMPERATURE_C = 45
POWER_LIMIT_MW = 700_000
POWER_USAGE_MW = 310_000
PCIE_MAX_GEN = 5
PCIE_MAX_WIDTH = 16


@dataclass
class FakeGpu:
    """One simulated device; the handle that nvmlDeviceGetHandleByIndex returns."""

    index: int
    model: str
    faults: list[dict[str, Any]] = field(default_factory=list)

    def fault(self, kind: str) -> dict[str, Any] | None:
        return next((f for f in self.faults if f["kind"] == kind), None)

    def xids(self) -> list[int]:
        return [int(f["xid"]) for f in self.faults if f["kind"] == "xid"]


@dataclass
class FakeEventSet:
    registered: list[tuple[FakeGpu, int]] = field(default_factory=list)
    pending: list[Any] = field(default_factory=list)


class FakeNvml:
    """pynvml-compatible object for one simulated host. Constants and error classes come from pynvml."""

    def __init__(self, host: str, spec: dict[str, Any]) -> None:
        self.host = host
        self.driver = bool(spec.get("driver", True))
        model = str(spec.get("model", "NVIDIA H100 80GB HBM3"))
        self._memory_mb = int(spec.get("memory_mb", 81559))  # an H100 80GB's total as NVML reports it
        faults: list[dict[str, Any]] = list(spec["faults"])
        missing = {int(f["gpu"]) for f in faults if f["kind"] == "missing_gpu"}
        self._gpus = [
            FakeGpu(index=i, model=model, faults=[f for f in faults if int(f.get("gpu", -1)) == i])
            for i in range(int(spec["gpus"]))
            if i not in missing
        ]
        self._hangs = {str(f["function"]) for f in faults if f["kind"] == "hang"}
        self._initialized = 0
        # XIDs are delivered once, through an event set, the way the driver queues them.
        self._undelivered_xids = {gpu.index: gpu.xids() for gpu in self._gpus}
        self._lock = threading.Lock()

    @classmethod
    def for_host(cls, script_path: Path, host: str) -> FakeNvml:
        return cls(host, host_spec(load_script(script_path), host))

    def __getattr__(self, name: str) -> Any:
        # NVML_* constants, nvmlClocksEventReason* masks and NVMLError classes are pynvml's own.
        if name.startswith(("NVML", "nvmlClocks", "nvmlEventType")):
            return getattr(pynvml, name)
        raise AttributeError(name)

    # --- library lifecycle -------------------------------------------------------------------------
    def _enter(self, function: str) -> None:
        if function in self._hangs:
            while True:  # a wedged driver call: only the check's time limit ends it
                time.sleep(3600)
        if not self.driver:
            raise pynvml.NVMLError_LibraryNotFound()
        if not self._initialized and function != "nvmlInit":
            raise pynvml.NVMLError_Uninitialized()

    def nvmlInit(self) -> None:
        self._enter("nvmlInit")
        self._initialized += 1

    def nvmlShutdown(self) -> None:
        self._enter("nvmlShutdown")
        self._initialized = max(0, self._initialized - 1)

    def nvmlSystemGetDriverVersion(self) -> str:
        self._enter("nvmlSystemGetDriverVersion")
        return "fake-560.35.03"

    # --- devices -------------------------------------------------------------------------------------
    def nvmlDeviceGetCount(self) -> int:
        self._enter("nvmlDeviceGetCount")
        return len(self._gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeGpu:
        self._enter("nvmlDeviceGetHandleByIndex")
        if not 0 <= index < len(self._gpus):
            raise pynvml.NVMLError_InvalidArgument()
        gpu = self._gpus[index]
        if 79 in gpu.xids():
            raise pynvml.NVMLError_GpuIsLost()
        return gpu

    def nvmlDeviceGetName(self, handle: FakeGpu) -> str:
        self._enter("nvmlDeviceGetName")
        return handle.model

    def nvmlDeviceGetUUID(self, handle: FakeGpu) -> str:
        self._enter("nvmlDeviceGetUUID")
        return f"GPU-fake-{self.host}-{handle.index}"

    def nvmlDeviceGetMemoryInfo(self, handle: FakeGpu) -> Any:
        self._enter("nvmlDeviceGetMemoryInfo")
        total = self._memory_mb * 2**20
        return SimpleNamespace(total=total, free=total, used=0)

    # --- memory errors -------------------------------------------------------------------------------
    def nvmlDeviceGetTotalEccErrors(self, handle: FakeGpu, error_type: int, counter_type: int) -> int:
        self._enter("nvmlDeviceGetTotalEccErrors")
        if error_type == pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED:
            dbe = handle.fault("ecc_dbe")
            count = int(dbe.get("count", 1)) if dbe else 0
            return count + (1 if 48 in handle.xids() else 0)
        sbe = handle.fault("ecc_sbe")
        return int(sbe.get("count", 1)) if sbe else 0

    def nvmlDeviceGetRetiredPages(self, handle: FakeGpu, cause: int) -> list[int]:
        self._enter("nvmlDeviceGetRetiredPages")
        raise pynvml.NVMLError_NotSupported()  # Hopper replaced page retirement by row remapping

    def nvmlDeviceGetRetiredPagesPendingStatus(self, handle: FakeGpu) -> int:
        self._enter("nvmlDeviceGetRetiredPagesPendingStatus")
        raise pynvml.NVMLError_NotSupported()

    def nvmlDeviceGetRemappedRows(self, handle: FakeGpu) -> tuple[int, int, int, int]:
        self._enter("nvmlDeviceGetRemappedRows")
        failed = 1 if handle.fault("row_remap_failure") else 0
        pending = 1 if handle.fault("row_remap_pending") else 0
        return (0, failed + pending, pending, failed)

    # --- thermals, power, clocks ---------------------------------------------------------------------
    def nvmlDeviceGetTemperature(self, handle: FakeGpu, sensor: int) -> int:
        self._enter("nvmlDeviceGetTemperature")
        hot = handle.fault("thermal")
        return int(hot.get("temperature_c", 94)) if hot else HEALTHY_TEMPERATURE_C

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle: FakeGpu) -> int:
        self._enter("nvmlDeviceGetCurrentClocksEventReasons")
        if handle.fault("thermal"):
            return int(
                pynvml.nvmlClocksEventReasonHwThermalSlowdown | pynvml.nvmlClocksEventReasonSwThermalSlowdown
            )
        return int(pynvml.nvmlClocksEventReasonNone)

    def nvmlDeviceGetPowerUsage(self, handle: FakeGpu) -> int:
        self._enter("nvmlDeviceGetPowerUsage")
        return POWER_USAGE_MW

    def nvmlDeviceGetEnforcedPowerLimit(self, handle: FakeGpu) -> int:
        self._enter("nvmlDeviceGetEnforcedPowerLimit")
        return POWER_LIMIT_MW

    # --- PCIe ------------------------------------------------------------------------------------------
    def nvmlDeviceGetCurrPcieLinkGeneration(self, handle: FakeGpu) -> int:
        self._enter("nvmlDeviceGetCurrPcieLinkGeneration")
        down = handle.fault("pcie_downgrade")
        return int(down.get("gen", 3)) if down else PCIE_MAX_GEN

    def nvmlDeviceGetMaxPcieLinkGeneration(self, handle: FakeGpu) -> int:
        self._enter("nvmlDeviceGetMaxPcieLinkGeneration")
        return PCIE_MAX_GEN

    def nvmlDeviceGetCurrPcieLinkWidth(self, handle: FakeGpu) -> int:
        self._enter("nvmlDeviceGetCurrPcieLinkWidth")
        down = handle.fault("pcie_downgrade")
        return int(down.get("width", 8)) if down else PCIE_MAX_WIDTH

    def nvmlDeviceGetMaxPcieLinkWidth(self, handle: FakeGpu) -> int:
        self._enter("nvmlDeviceGetMaxPcieLinkWidth")
        return PCIE_MAX_WIDTH

    # --- NVLink ----------------------------------------------------------------------------------------
    def nvmlDeviceGetNvLinkState(self, handle: FakeGpu, link: int) -> int:
        self._enter("nvmlDeviceGetNvLinkState")
        if not 0 <= link < NVLINK_LINKS:
            raise pynvml.NVMLError_InvalidArgument()
        down = [f for f in handle.faults if f["kind"] == "nvlink_down" and int(f.get("link", 0)) == link]
        return pynvml.NVML_FEATURE_DISABLED if down else pynvml.NVML_FEATURE_ENABLED

    def nvmlDeviceGetNvLinkErrorCounter(self, handle: FakeGpu, link: int, counter: int) -> int:
        self._enter("nvmlDeviceGetNvLinkErrorCounter")
        if not 0 <= link < NVLINK_LINKS:
            raise pynvml.NVMLError_InvalidArgument()
        errors = [f for f in handle.faults if f["kind"] == "nvlink_errors" and int(f.get("link", 0)) == link]
        if errors and counter == pynvml.NVML_NVLINK_ERROR_DL_CRC_FLIT:
            return int(errors[0].get("count", 1000))
        return 0

    # --- recovery action (driver R550+ field value) ---------------------------------------------------
    def nvmlDeviceGetFieldValues(self, handle: FakeGpu, field_ids: list[int]) -> list[Any]:
        self._enter("nvmlDeviceGetFieldValues")
        values = []
        for field_id in field_ids:
            value = 0
            if field_id == pynvml.NVML_FI_DEV_GET_GPU_RECOVERY_ACTION:
                action = handle.fault("recovery_action")
                value = int(action.get("action", pynvml.NVML_GPU_RECOVERY_ACTION_GPU_RESET)) if action else 0
            values.append(
                SimpleNamespace(
                    fieldId=field_id, nvmlReturn=pynvml.NVML_SUCCESS, value=SimpleNamespace(uiVal=value)
                )
            )
        return values

    # --- XID events ------------------------------------------------------------------------------------
    def nvmlEventSetCreate(self) -> FakeEventSet:
        self._enter("nvmlEventSetCreate")
        return FakeEventSet()

    def nvmlDeviceRegisterEvents(self, handle: FakeGpu, event_types: int, event_set: FakeEventSet) -> None:
        self._enter("nvmlDeviceRegisterEvents")
        event_set.registered.append((handle, event_types))

    def nvmlEventSetWait_v2(self, event_set: FakeEventSet, timeout_ms: int) -> Any:
        self._enter("nvmlEventSetWait_v2")
        with self._lock:
            for gpu, types in event_set.registered:
                if not types & pynvml.nvmlEventTypeXidCriticalError:
                    continue
                pending = self._undelivered_xids.get(gpu.index, [])
                if pending:
                    return SimpleNamespace(
                        device=gpu,
                        eventType=pynvml.nvmlEventTypeXidCriticalError,
                        eventData=pending.pop(0),
                        gpuInstanceId=0xFFFFFFFF,
                        computeInstanceId=0xFFFFFFFF,
                    )
        raise pynvml.NVMLError_Timeout()

    def nvmlEventSetFree(self, event_set: FakeEventSet) -> None:
        self._enter("nvmlEventSetFree")
        event_set.registered.clear()

    def nvmlDeviceGetIndex(self, handle: FakeGpu) -> int:
        self._enter("nvmlDeviceGetIndex")
        return handle.index
