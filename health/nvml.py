"""Choosing the NVML backend (once, at the edge) and draining XID events since the last check."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pynvml

from health.config import HealthConfig
from health.fake_nvml import FakeNvml

# Errors meaning "there is no NVML here": the checks report these as skipped, with the reason.
NVML_ABSENT = (pynvml.NVMLError_LibraryNotFound, pynvml.NVMLError_DriverNotLoaded)


def open_nvml(config: HealthConfig, host: str) -> Any:
    """The pynvml-compatible backend for ``host``: the fake when a fault script is configured, else pynvml."""
    if config.fake_nvml_path is not None:
        return FakeNvml.for_host(config.fake_nvml_path, host)
    return pynvml


class NvmlUnavailable(Exception):
    """NVML cannot be used on this host (no driver, no library); checks turn it into ``skipped``."""


def nvml_error_name(error: pynvml.NVMLError) -> str:
    return f"{type(error).__name__}: {error}"


@dataclass
class XidDrain:
    events: list[tuple[int, int]] = field(default_factory=list)
    """(gpu index, xid) pairs reported since the previous drain."""
    error: str | None = None
    """Why no events could be read (no NVML), else None."""


class XidWatcher:
    """Holds one NVML event set per host for the worker's lifetime, so each drain returns the XIDs the
    driver queued since the previous one ("since last check"), not just those during a short wait."""

    def __init__(self, nvml: Any) -> None:
        self._nvml = nvml
        self._event_set: Any = None
        self._error: str | None = None

    def _open(self) -> None:
        nvml = self._nvml
        try:
            nvml.nvmlInit()
            event_set = nvml.nvmlEventSetCreate()
            for index in range(nvml.nvmlDeviceGetCount()):
                try:
                    handle = nvml.nvmlDeviceGetHandleByIndex(index)
                    nvml.nvmlDeviceRegisterEvents(handle, nvml.nvmlEventTypeXidCriticalError, event_set)
                except pynvml.NVMLError:
                    # A lost or unsupported GPU cannot be watched; the passive checks report it.
                    continue
            self._event_set = event_set
        except NVML_ABSENT as error:
            self._error = f"no NVML on this host ({nvml_error_name(error)})"

    def drain(self) -> XidDrain:
        if self._event_set is None and self._error is None:
            self._open()
        if self._error is not None:
            return XidDrain(error=self._error)
        drained = XidDrain()
        while True:
            try:
                event = self._nvml.nvmlEventSetWait_v2(self._event_set, 0)
            except pynvml.NVMLError_Timeout:
                return drained
            except pynvml.NVMLError as error:
                drained.error = f"reading XID events failed ({nvml_error_name(error)})"
                return drained
            drained.events.append((int(self._nvml.nvmlDeviceGetIndex(event.device)), int(event.eventData)))
