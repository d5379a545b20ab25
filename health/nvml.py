"""Choosing the NVML backend (once, at the edge) and draining XID events since the last check."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING, Any

from health.config import HealthConfig

if TYPE_CHECKING:
    import pynvml


def load_pynvml() -> ModuleType:
    """The NVML bindings, imported on first use: the control plane imports this package (the Celery app,
    check names, results) and installs without them; only the host agent needs them."""
    try:
        import pynvml
    except ImportError as error:
        raise ImportError(
            "the NVML bindings (nvidia-ml-py) are not installed: install trainops[health] on GPU hosts"
        ) from error
    return pynvml


def nvml_absent_errors() -> tuple[type[Exception], ...]:
    """Errors meaning "there is no NVML here": the checks report these as skipped, with the reason."""
    bindings = load_pynvml()
    return (bindings.NVMLError_LibraryNotFound, bindings.NVMLError_DriverNotLoaded)


def open_nvml(config: HealthConfig, host: str) -> Any:
    """The pynvml-compatible backend for ``host``: the fake when a fault script is configured, else pynvml."""
    if config.fake_nvml_path is not None:
        # Imported here: the fake raises pynvml's own errors, so it needs the bindings too.
        from health.fake_nvml import FakeNvml

        return FakeNvml.for_host(config.fake_nvml_path, host)
    return load_pynvml()


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
        bindings = load_pynvml()
        try:
            nvml.nvmlInit()
            event_set = nvml.nvmlEventSetCreate()
            for index in range(nvml.nvmlDeviceGetCount()):
                try:
                    handle = nvml.nvmlDeviceGetHandleByIndex(index)
                    nvml.nvmlDeviceRegisterEvents(handle, nvml.nvmlEventTypeXidCriticalError, event_set)
                except bindings.NVMLError:
                    # A lost or unsupported GPU cannot be watched; the passive checks report it.
                    continue
            self._event_set = event_set
        except nvml_absent_errors() as error:
            self._error = f"no NVML on this host ({nvml_error_name(error)})"

    def drain(self) -> XidDrain:
        if self._event_set is None and self._error is None:
            self._open()
        if self._error is not None:
            return XidDrain(error=self._error)
        drained = XidDrain()
        bindings = load_pynvml()
        while True:
            try:
                event = self._nvml.nvmlEventSetWait_v2(self._event_set, 0)
            except bindings.NVMLError_Timeout:
                return drained
            except bindings.NVMLError as error:
                drained.error = f"reading XID events failed ({nvml_error_name(error)})"
                return drained
            drained.events.append((int(self._nvml.nvmlDeviceGetIndex(event.device)), int(event.eventData)))
