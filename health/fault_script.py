"""Reading the fault script (``TRAINOPS_FAKE_NVML``) that simulated fleets are described by.

Shared by the fake NVML (:mod:`health.fake_nvml`, which needs pynvml for its error classes) and the load
shaper (:mod:`health.shaping`, which does not), so shaping the active checks never loads the NVML bindings.
The file format is documented in :mod:`health.fake_nvml`.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any


@lru_cache(maxsize=8)
def _load_script(path: str, mtime_ns: int) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def load_script(path: Path) -> dict[str, Any]:
    """The parsed fault file, cached until the file changes (a test may re-script faults between sweeps)."""
    return _load_script(str(path), path.stat().st_mtime_ns)


def host_spec(script: dict[str, Any], host: str) -> dict[str, Any]:
    spec = dict(script.get("hosts", {}).get(host, {}))
    spec.setdefault("gpus", script.get("default_gpus", 8))
    spec.setdefault("faults", [])
    return spec
