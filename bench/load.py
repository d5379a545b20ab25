"""Busy machines on demand: one busy-loop process pinned on each CPU this process may use.

    with busy_cores() as pids: ...    # every core at 100 % from another process while the block runs

Used by tests/e2e/test_demo.py and bench/demo_under_load.py: the main job must reach its target on a machine
whose cores are all taken by something else, as a shared training host's are.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

BUSY_LOOP = "while True:\n    pass\n"


@contextmanager
def busy_cores(cores: set[int] | None = None) -> Iterator[list[int]]:
    """Start a Python busy loop pinned on each of `cores` (default: every core this process may use)."""
    cores = cores if cores is not None else os.sched_getaffinity(0)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for core in sorted(cores):
            proc = subprocess.Popen([sys.executable, "-c", BUSY_LOOP])
            os.sched_setaffinity(proc.pid, {core})
            procs.append(proc)
        yield [p.pid for p in procs]
    finally:
        for proc in procs:
            proc.kill()
        for proc in procs:
            proc.wait()
