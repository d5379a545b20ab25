"""OPT learning-rate schedule: linear warm-up from 0 to peak, then linear decay to `min_ratio` x peak at the
end
of the token budget, flat afterwards. Mid-flight changes (the OPT team's LR cuts) are the `scale` multiplier
and
the absolute `peak_lr`; both are checkpointed and inherited on resume unless overridden."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(kw_only=True)
class LRSchedule:
    peak_lr: float
    warmup_steps: int
    total_steps: int
    min_ratio: float = 0.1
    scale: float = 1.0

    def lr_at(self, step: int) -> float:
        """LR used by optimizer step `step` (1-based)."""
        if self.warmup_steps and step <= self.warmup_steps:
            factor = step / self.warmup_steps
        elif step >= self.total_steps:
            factor = self.min_ratio
        else:
            progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
            factor = 1.0 - (1.0 - self.min_ratio) * progress
        return self.peak_lr * self.scale * factor

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)
