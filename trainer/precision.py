"""Mixed precision: FSDP2 policy per precision, and the dynamic loss scaler (fp16, as OPT trained).

fp16: parameters are all-gathered and computed in fp16, gradients reduced in fp32, master weights and Adam
state
stay fp32 (sharded). The loss is multiplied by the scale before backward; after backward the caller unscales
the
local gradient shards and all-reduces their squared norm together with the step's other statistics, so every
rank
sees the same overflow verdict from that single reduction. On overflow the step is skipped and the scale
halved
(never below the floor); after `window` clean steps in a row it doubles.
bf16/fp32: no scaling (scale fixed at 1.0), but a non-finite gradient still skips the step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.fsdp import MixedPrecisionPolicy

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def mixed_precision_policy(precision: str) -> MixedPrecisionPolicy:
    if precision == "fp32":
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=DTYPES[precision], reduce_dtype=torch.float32)


@dataclass(kw_only=True)
class DynamicLossScaler:
    scale: float
    window: int
    floor: float
    enabled: bool
    clean_steps: int = 0
    overflows: int = 0

    @classmethod
    def for_precision(cls, precision: str, *, initial: float, window: int, floor: float) -> DynamicLossScaler:
        enabled = precision == "fp16"
        return cls(scale=initial if enabled else 1.0, window=window, floor=floor, enabled=enabled)

    def update(self, *, overflow: bool) -> None:
        if overflow:
            self.overflows += 1
            self.clean_steps = 0
            if self.enabled:
                self.scale = max(self.scale / 2.0, self.floor)
            return
        self.clean_steps += 1
        if self.enabled and self.clean_steps >= self.window:
            self.scale *= 2.0
            self.clean_steps = 0

    def state_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "clean_steps": self.clean_steps, "overflows": self.overflows}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.enabled:  # a checkpoint's fp16 scale means nothing to a bf16/fp32 continuation
            self.scale = float(state["scale"])
            self.clean_steps = int(state["clean_steps"])
        self.overflows = int(state.get("overflows", 0))
