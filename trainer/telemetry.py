"""Per-step signals the OPT team used to decide restarts, the heartbeat, and the local files that record them.

- `ActivationNorm`: forward hook on the final block; accumulates the squared L2 norm of its output on the
device
  (no host sync). Reported value: sqrt(sum over all ranks and tokens of ||h_t||^2 / tokens), the
  root-mean-square
  per-token L2 norm, which does not change with batch size or world size.
- `StepStats`: the one all_reduce per step of [loss, act sum of squares, act tokens, grad sum of squares].
- `Heartbeat`: records the rank's beat from the training loop itself after every step and on entering a
  section (start-up, step, checkpoint save, validation: each has its own hang limit), stamped with the time
  the loop recorded it, and hands it to a transport (`trainer.reporting.HeartbeatSender`) that sends the
  newest one to the control plane; a hung loop leaves a stale beat for the orchestrator to see.
- `MetricsFile`: `metrics/rank{R}.jsonl`, one JSON line per step (rank 0's is the full record).
Disabled telemetry swaps in the `Null*` objects; the loop does not branch.
"""

from __future__ import annotations

import collections
import json
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

from trainer.contract import HeartbeatRecord, Section, heartbeat_record

# Dense fp16/bf16 peak TFLOP/s per device, for MFU. OPT reached 147 TFLOP/s per A100 (47% of 312).
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "A10G": 125.0, "L4": 121.0, "V100": 125.0}
OPT_A100_TFLOPS = 147.0


def device_peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


class ActivationNorm:
    def __init__(self, module: nn.Module, device: torch.device) -> None:
        self.sumsq = torch.zeros((), dtype=torch.float32, device=device)
        self.tokens = 0
        module.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        if not module.training:  # validation passes do not count
            return
        self.sumsq += torch.linalg.vector_norm(output.detach(), dtype=torch.float32).square()
        self.tokens += output.shape[0] * output.shape[1]

    def take(self) -> tuple[torch.Tensor, int]:
        out = (self.sumsq.clone(), self.tokens)
        self.sumsq.zero_()
        self.tokens = 0
        return out


class NullActivationNorm:
    def __init__(self, device: torch.device) -> None:
        self._zero = torch.zeros((), dtype=torch.float32, device=device)

    def take(self) -> tuple[torch.Tensor, int]:
        return self._zero, 0


def reduce_step_stats(
    loss: torch.Tensor, act_sumsq: torch.Tensor, act_tokens: int, grad_sumsq: torch.Tensor, world: int
) -> tuple[float, float | None, float]:
    """One all_reduce -> (mean loss over ranks, global act norm or None, global grad norm). Non-finite values
    propagate, so every rank sees the same overflow/divergence verdict."""
    stats = torch.stack(
        [
            loss.double(),
            act_sumsq.double(),
            torch.tensor(float(act_tokens), dtype=torch.float64, device=loss.device),
            grad_sumsq.double(),
        ]
    )
    dist.all_reduce(stats)
    loss_sum, act_sq, tokens, grad_sq = stats.tolist()
    act_norm = math.sqrt(act_sq / tokens) if tokens > 0 else None
    return loss_sum / world, act_norm, math.sqrt(grad_sq) if grad_sq >= 0 else float("nan")


class BeatTransport(Protocol):
    def offer(self, record: HeartbeatRecord) -> None:
        """Take the newest beat; must return at once (the training loop calls it)."""


class Heartbeat:
    """The rank's heartbeat, recorded by the training loop (docs/reporting-contract.md, "Heartbeats")."""

    def __init__(self, transport: BeatTransport, *, rank: int, host: str) -> None:
        self.transport = transport
        self.host, self.pid, self.rank = host, os.getpid(), rank

    def beat(
        self,
        step: int,
        *,
        section: str = Section.STEP,
        step_time_s: float | None = None,
        last_step_s: float | None = None,
        busy: Sequence[tuple[int, float]] = (),
    ) -> None:
        """`time` is now: the rank finished `step` (section `step`) or entered `section`. Recorded here, in
        the loop, so a hung loop leaves a stale beat; only sending it happens on another thread."""
        self.transport.offer(
            heartbeat_record(
                step=step,
                time=time.time(),
                section=section,
                step_time_s=step_time_s,
                last_step_s=last_step_s,
                busy=busy,
                host=self.host,
                pid=self.pid,
                rank=self.rank,
            ),
        )


class NullHeartbeat:
    def beat(
        self,
        step: int,
        *,
        section: str = Section.STEP,
        step_time_s: float | None = None,
        last_step_s: float | None = None,
        busy: Sequence[tuple[int, float]] = (),
    ) -> None:
        """Heartbeats disabled."""


class StragglerProbe:
    """Each rank's own busy time per step, for straggler detection.

    All ranks leave a collective together; each rank then works on its own (optimizer step, data loading,
    host-side stalls) until the next step's probe, a one-element all_gather. The time from the last alignment
    to this rank's arrival at the probe is its busy time; a straggler's is longer, while the others' wait at
    the probe is not counted. Slowness inside the step's own collectives (FSDP all-gathers, reduce-scatters)
    is shared by every rank and not attributed here. The heartbeat carries the trailing mean and the
    per-step history (step, busy time), so the orchestrator can confirm a straggler over consecutive steps.
    """

    def __init__(self, *, world: int, device: torch.device, window: int = 5, history: int = 16) -> None:
        self.world = world
        self.device = device
        self.samples: collections.deque[float] = collections.deque(maxlen=window)
        self.history: collections.deque[tuple[int, float]] = collections.deque(maxlen=history)
        self.aligned_at = time.time()

    def arrive(self, step: int) -> None:
        """At the start of `step`: this rank's busy time since the last alignment is recorded for `step`."""
        arrival = time.time()
        mine = torch.tensor([arrival], dtype=torch.float64, device=self.device)
        dist.all_gather([torch.zeros_like(mine) for _ in range(self.world)], mine)
        self.samples.append(arrival - self.aligned_at)
        self.history.append((step, arrival - self.aligned_at))
        self.aligned_at = time.time()

    def mean_busy_s(self) -> float | None:
        return sum(self.samples) / len(self.samples) if len(self.samples) == self.samples.maxlen else None

    def recent(self) -> list[tuple[int, float]]:
        return list(self.history)


class NullStragglerProbe:
    def arrive(self, step: int) -> None:
        """Straggler probe disabled (telemetry off or a single rank)."""

    def mean_busy_s(self) -> float | None:
        return None

    def recent(self) -> list[tuple[int, float]]:
        return []


class MetricsFile:
    def __init__(self, directory: Path, *, rank: int) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self._file = (directory / f"rank{rank}.jsonl").open("a", buffering=1)

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self._file.close()


class NullMetricsFile:
    def write(self, record: dict[str, Any]) -> None:
        """Local metrics disabled."""

    def close(self) -> None:
        """Nothing to close."""


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Records of a metrics file; for a step logged by several attempts, the last one wins."""
    by_step: dict[int, dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            by_step[record["step"]] = record
    return [by_step[s] for s in sorted(by_step)]
