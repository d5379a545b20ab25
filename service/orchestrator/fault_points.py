"""Deterministic crash points for failover tests: the orchestrator kills itself (SIGKILL, as the OOM killer
or a lost host would) at a named step, so a test can stop a leader exactly between two steps of a launch
instead of hoping a sleep lands there.

    TRAINOPS_FAULT_POINT=attempt-recorded:2   # die right after recording attempt 2, before starting it

Points: `attempt-recorded` (the attempt row is committed, nothing started), `attempt-started` (the launcher
started it, the start is not recorded). Unset in production; reading it costs one environment lookup.
"""

from __future__ import annotations

import logging
import os
import signal

FAULT_POINT_ENV = "TRAINOPS_FAULT_POINT"

log = logging.getLogger("trainops.orchestrator")


def fault_point(name: str, *, attempt: int) -> None:
    """SIGKILL this process when TRAINOPS_FAULT_POINT names this point and attempt number."""
    if os.environ.get(FAULT_POINT_ENV) == f"{name}:{attempt}":
        log.warning("fault point %s:%d reached: killing this orchestrator (SIGKILL)", name, attempt)
        os.kill(os.getpid(), signal.SIGKILL)
