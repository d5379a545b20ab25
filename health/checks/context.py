"""What a check gets to look at: the host, the config, and (lazily) the NVML backend."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from health.config import HealthConfig
from health.nvml import NvmlUnavailable, XidDrain, nvml_absent_errors, nvml_error_name, open_nvml
from health.shaping import LoadShaper


@dataclass(kw_only=True)
class CheckContext:
    """Everything a check needs; picklable, so it crosses into the isolated check process."""

    host: str
    config: HealthConfig
    expected_gpus: int
    xids: XidDrain = field(default_factory=XidDrain)
    """XID events the worker drained from its persistent event set just before this check set."""
    reference_time: float | None = None
    """The control plane's Unix time when it dispatched the task (for the clock-skew check)."""
    _nvml: Any = field(default=None, repr=False)

    def nvml(self) -> Any:
        """The initialised NVML backend; raises :class:`NvmlUnavailable` where there is none."""
        if self._nvml is None:
            backend = open_nvml(self.config, self.host)
            try:
                backend.nvmlInit()
            except nvml_absent_errors() as error:
                raise NvmlUnavailable(f"no NVML on this host ({nvml_error_name(error)})") from error
            self._nvml = backend
        return self._nvml

    def __getstate__(self) -> dict[str, Any]:
        # The opened backend stays in the process that opened it; the check process opens its own.
        return {**self.__dict__, "_nvml": None}

    def shaper(self) -> LoadShaper:
        return LoadShaper.for_host(self.config, self.host)

    def now(self) -> float:
        return time.time()
