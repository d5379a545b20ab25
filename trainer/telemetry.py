"""Per-step signals the OPT team used to decide restarts, the heartbeat, and the local files that record them.

The signals follow metaseq, the code OPT-175B was trained with, so the numbers compare with OPT's logbook
(docs/reporting-contract.md, "Training signals"):
- `ActivationProbes`: forward hooks accumulating, on the device (no host sync), per-token L2 norms of the
  final block's output (metaseq's `actv_norm`: their mean over tokens; trainops' older `act_norm`: their
  root-mean-square), of the token embeddings (`tok_norm`), the position embeddings (`pos_norm`) and their
  sum entering the first block (`emb_norm`).
- `GradientStats`: per layer group (`LAYER_GROUPS`) the gradient's squared norm, element maximum and share of
  (near-)zero elements (metaseq's `gnorm_*`, `gmax_*`, `gzero_*`), and the parameter norm.
- `CudaMemory`: peak allocated / reserved and free GPU memory of the step (metaseq's `cuda_gb_*`).
- `reduce_step_stats`: one all_reduce (sum) of the step's statistics, plus one of maxima when gradient maxima
  or GPU memory are measured; `StepStats` holds the global values.
- `ClipCounter`: whether the step's gradient norm exceeded the clip, and the share of recent steps that did
  (metaseq's `clip`, as a fraction rather than a percentage).
- `Heartbeat`: records the rank's beat from the training loop itself after every step and on entering a
  section (start-up, step, checkpoint save, validation: each has its own hang limit), stamped with the time
  the loop recorded it, and hands it to a transport (`trainer.reporting.HeartbeatSender`) that sends the
  newest one to the control plane; a hung loop leaves a stale beat for the orchestrator to see.
- `MetricsFile`: `metrics/rank{R}.jsonl`, one JSON line per step (rank 0's is the full record).
Disabled telemetry swaps in the `Null*` objects; the loop does not branch.
"""

from __future__ import annotations

import collections
import enum
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

from trainer.contract import TRAINER_LAYER_GROUPS, HeartbeatRecord, Section, heartbeat_record
from trainer.model import OPTModel

# Dense fp16/bf16 peak TFLOP/s per device, for MFU. OPT reached 147 TFLOP/s per A100 (47% of 312).
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "A10G": 125.0, "L4": 121.0, "V100": 125.0}
OPT_A100_TFLOPS = 147.0


def device_peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


# Layer groups of the per-group gradient statistics. metaseq logs one set per FSDP unit (`gnorm_layer17`);
# a point of a 96-layer model would then carry 300 values, so trainops groups the blocks by depth: `embed`
# (token and position embeddings; the output projection is tied to the token embedding), `lower` (the first
# half of the blocks), `upper` (the second half, always holding the final block) and `head` (the final
# layer norm).
LAYER_GROUPS = TRAINER_LAYER_GROUPS
LN2 = math.log(2.0)
CLIP_WINDOW = 100  # steps `clip_frac` spans: metaseq's default --log-interval, over which its `clip` averages


def layer_group(name: str, n_layers: int) -> str:
    """The layer group (`LAYER_GROUPS`) of the parameter called `name` in `trainer.model.OPTModel`."""
    if name.startswith(("embed_tokens.", "embed_positions.")):
        return "embed"
    if name.startswith("layers."):
        return "lower" if int(name.split(".")[1]) < n_layers // 2 else "upper"
    if name.startswith("final_layer_norm."):
        return "head"
    raise ValueError(f"parameter {name!r} belongs to no layer group")


class _Sum(enum.IntEnum):
    """Slots of the activation accumulator (summed over micro-batches, then over ranks)."""

    ACTV = 0  # sum over tokens of ||h_t||, h = the final block's output
    ACTV_SQ = 1  # sum over tokens of ||h_t||^2
    TOK = 2  # sum over tokens of ||token embedding||
    POS = 3  # sum over positions of ||position embedding||
    EMB = 4  # sum over tokens of ||token + position embedding|| (the first block's input)
    TOKENS = 5  # tokens through the final block (and the token embedding)
    POSITIONS = 6  # positions looked up (one per token of each sequence)


def _token_norms(x: torch.Tensor) -> torch.Tensor:
    """Per-token L2 norms over the last (model) dimension, in fp32 (metaseq: `value.norm(p=2, dim=-1)`)."""
    return torch.linalg.vector_norm(x.detach(), dim=-1, dtype=torch.float32)


class ActivationProbes:
    """Forward hooks on the model's embeddings, first block and final block (training passes only).

    Definitions are metaseq's (`metaseq/criterions/cross_entropy.py`, `CrossEntropyCriterion.forward` and
    `reduce_metrics`, on the inner states of `ModelParallelTransformerDecoder.extract_features` in
    `metaseq/models/transformer_decoder.py`): for each of `actv` (the final block's output, before the final
    layer norm), `tok`, `pos` and `emb`, the sum over tokens of the per-token L2 norm, divided by the number
    of tokens. trainops' older `act_norm`, the root-mean-square of the same per-token norms, is kept as a
    second value (mean <= RMS; equal when every token's norm is the same).

    One difference, on purpose: metaseq's `forward_embedding` adds the positions in place to the tensor it
    also returns as the token embedding (`x = embed = scale * tok; x += positions`), so its logged `tok_norm`
    is the norm of token + position embedding, the same as its `emb_norm` when embeddings have no dropout
    (as in OPT). trainops' `tok_norm` is the token embedding alone; compare OPT's logged `tok_norm` with
    `emb_norm`.
    """

    def __init__(self, model: OPTModel, device: torch.device) -> None:
        self.sums = torch.zeros(len(_Sum), dtype=torch.float64, device=device)
        model.final_block.register_forward_hook(self._final_block)
        model.embed_tokens.register_forward_hook(self._token_embedding)
        model.embed_positions.register_forward_hook(self._position_embedding)
        model.layers[0].register_forward_pre_hook(self._first_block_input)

    def _final_block(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        if not module.training:  # validation passes do not count
            return
        norms = _token_norms(output)
        self.sums[_Sum.ACTV] += norms.sum()
        self.sums[_Sum.ACTV_SQ] += norms.square().sum()
        self.sums[_Sum.TOKENS] += norms.numel()

    def _token_embedding(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        if module.training:
            self.sums[_Sum.TOK] += _token_norms(output).sum()

    def _position_embedding(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        # (seq, d_model): every sequence of the batch reads the same positions, so their mean over the
        # positions is their mean over all the batch's tokens
        if module.training:
            norms = _token_norms(output)
            self.sums[_Sum.POS] += norms.sum()
            self.sums[_Sum.POSITIONS] += norms.numel()

    def _first_block_input(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if module.training:
            self.sums[_Sum.EMB] += _token_norms(args[0]).sum()

    def take(self) -> torch.Tensor:
        """The accumulated sums (`_Sum` slots) since the last take, reset to zero."""
        out = self.sums.clone()
        self.sums.zero_()
        return out


class NullActivationProbes:
    def __init__(self, device: torch.device) -> None:
        self._zero = torch.zeros(len(_Sum), dtype=torch.float64, device=device)

    def take(self) -> torch.Tensor:
        return self._zero


def _local(t: torch.Tensor) -> torch.Tensor:
    """A rank's shard of an FSDP2 parameter or gradient (DTensor), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def _near_zero(grad: torch.Tensor, unscale: float) -> torch.Tensor:
    """Mask of the elements of the unscaled gradient `grad` x `unscale` within 2 x the smallest normal of
    `grad`'s dtype of zero (metaseq's `gzero`, on the gradient the optimizer applies). The fp16 format's
    gradients are still scaled by the loss scale: they are unscaled in fp32 first, so the share does not
    move with the loss scale (fp16 itself would underflow)."""
    threshold = 2 * torch.finfo(grad.dtype).tiny
    if unscale == 1.0:
        return grad.abs().lt_(threshold)
    return grad.abs().float().mul_(unscale).lt_(threshold)


class GradientStats:
    """A rank's share of the gradient and parameter statistics of a step, per layer group.

    Definitions are metaseq's (`metaseq/trainer.py`, `Trainer._reduce_and_log_stats`): `gnorm` the L2 norm,
    `gmax` the largest element (signed: `g.max()`), `gzero` the share of elements within
    2 x `torch.finfo(dtype).tiny` of zero (dtype: the gradient's, fp16 in the fp16 format; compared after
    unscaling, so the share does not move with the loss scale). metaseq reads them per FSDP unit on rank 0's
    own shard after the optimizer step (the gradient scaled by the clip coefficient); trainops measures the
    unscaled gradient before clipping, over every rank's shard, so the groups' norms combine to the step's
    `gnorm` (square root of the sum of their squares) and are the same at any world size. `param_norm` is the
    L2 norm of all parameters the step's loss was computed with (metaseq logs `pnorm` per unit).

    `detailed=False` (telemetry off) measures only the gradient's squared norm per group: the clip and the
    overflow verdict need it, nothing else does.
    """

    def __init__(self, model: nn.Module, *, n_layers: int, detailed: bool) -> None:
        self.detailed = detailed
        named = list(model.named_parameters())
        self.params = [p for _, p in named]
        groups = [LAYER_GROUPS.index(layer_group(name, n_layers)) for name, _ in named]
        device = _local(self.params[0]).device
        self.group_index = torch.tensor(groups, dtype=torch.long, device=device)
        # elements per group over all ranks (an FSDP2 DTensor's numel is the whole parameter's)
        self.group_numel = [0] * len(LAYER_GROUPS)
        for g, p in zip(groups, self.params, strict=True):
            self.group_numel[g] += p.numel()

    def _grads(self) -> list[torch.Tensor | None]:
        """Each parameter's local gradient shard (None without one), in parameter order."""
        return [_local(p.grad) if p.grad is not None else None for p in self.params]

    def local_sums(self, *, unscale: float = 1.0) -> torch.Tensor:
        """[squared grad norm per group] + ([zero count per group] + [squared parameter norm] if detailed),
        over this rank's shards of the gradients as they are now times `unscale` (the fp16 format keeps its
        gradients scaled: their norms are taken in fp32, then unscaled; before clipping)."""
        n = len(LAYER_GROUPS)
        size = 2 * n + 1 if self.detailed else n
        out = torch.zeros(size, dtype=torch.float64, device=self.group_index.device)
        grads = self._grads()
        present = [i for i, g in enumerate(grads) if g is not None]
        if present:
            idx = self.group_index[present]
            local = [g for g in grads if g is not None]
            norms = torch.stack(torch._foreach_norm(local, dtype=torch.float32)).double() * unscale
            out[:n].index_add_(0, idx, norms.square())
            if self.detailed:
                # exact integer counts: a float sum of ones stops counting at 2**24 elements
                zeros = [torch.count_nonzero(_near_zero(g, unscale)) for g in local]
                out[n : 2 * n].index_add_(0, idx, torch.stack(zeros).double())
        if self.detailed:
            # fp32 accumulation and result: an fp16 parameter's norm in fp16 keeps 3 digits (and passes
            # 65504, fp16's largest value, on a large enough tensor)
            params = [_local(p.detach()) for p in self.params]
            out[2 * n] = torch.stack(torch._foreach_norm(params, dtype=torch.float32)).double().square().sum()
        return out

    def local_maxima(self, *, unscale: float = 1.0) -> torch.Tensor:
        """The largest gradient element per group on this rank (-inf for a group without elements here),
        times `unscale` (see `local_sums`)."""
        out = torch.full((len(LAYER_GROUPS),), -math.inf, dtype=torch.float64, device=self.group_index.device)
        grads = self._grads()
        present = [i for i, g in enumerate(grads) if g is not None and g.numel() > 0]
        if present:
            maxima = torch.stack(torch._foreach_max([grads[i] for i in present])).double() * unscale
            out.scatter_reduce_(0, self.group_index[present], maxima, reduce="amax")
        return out


class CudaMemory:
    """Peak GPU memory of each step (metaseq's `Trainer._log_gpu_mem_stats`): `cuda_gb_allocated` and
    `cuda_gb_reserved` are the peaks since the previous step (GiB), `cuda_gb_free` the device's total memory
    less the allocated peak. Reduced as the maximum over ranks (free: the minimum), the rank nearest to an
    out-of-memory error."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.total_gb = torch.cuda.get_device_properties(device).total_memory / 2**30
        torch.cuda.reset_peak_memory_stats(device)

    def take(self) -> list[float]:
        """[allocated, reserved, -free] in GiB (free negated, so one max reduction gives its minimum)."""
        allocated = torch.cuda.max_memory_allocated(self.device) / 2**30
        reserved = torch.cuda.max_memory_reserved(self.device) / 2**30
        torch.cuda.reset_peak_memory_stats(self.device)
        return [allocated, reserved, -(self.total_gb - allocated)]


class NullCudaMemory:
    def take(self) -> list[float]:
        """Not a CUDA device: nothing measured."""
        return []


@dataclass(frozen=True)
class StepStats:
    """The step's global statistics (every rank sees the same). None: not measured."""

    loss: float  # mean over ranks, nats per token
    grad_norm: float  # L2 norm of the whole unscaled gradient before clipping (metaseq's `gnorm`)
    act_norm: float | None = None  # RMS over tokens of the final block's per-token L2 norm (trainops' own)
    actv_norm: float | None = None  # mean over tokens of the same norms (metaseq's `actv_norm`)
    tok_norm: float | None = None
    pos_norm: float | None = None
    emb_norm: float | None = None
    param_norm: float | None = None
    gnorm: Mapping[str, float] = field(default_factory=dict)  # per layer group
    gmax: Mapping[str, float] = field(default_factory=dict)
    gzero: Mapping[str, float] = field(default_factory=dict)
    cuda_gb_allocated: float | None = None
    cuda_gb_reserved: float | None = None
    cuda_gb_free: float | None = None

    @property
    def loss_bits(self) -> float:
        """The loss in bits per token, as metaseq logs `loss` (`loss / math.log(2)`, `reduce_metrics`)."""
        return self.loss / LN2

    def values(self) -> dict[str, float | None]:
        """The signals that travel in a metric point's `values` (docs/reporting-contract.md)."""
        out: dict[str, float | None] = {"loss_bits": self.loss_bits}
        for name in ("tok_norm", "pos_norm", "emb_norm", "param_norm"):
            if (value := getattr(self, name)) is not None:
                out[name] = value
        for kind in ("gnorm", "gmax", "gzero"):
            out.update({f"{kind}_{group}": v for group, v in getattr(self, kind).items()})
        for name in ("cuda_gb_allocated", "cuda_gb_reserved", "cuda_gb_free"):
            if (value := getattr(self, name)) is not None:
                out[name] = value
        return out


def _mean(total: float, count: float) -> float | None:
    return total / count if count > 0 else None


def reduce_step_stats(
    loss: torch.Tensor,
    act_sums: torch.Tensor,
    grad_sums: torch.Tensor,
    world: int,
    *,
    maxima: torch.Tensor | None = None,
    memory: Sequence[float] = (),
    group_numel: Sequence[int] = (),
) -> StepStats:
    """The step's statistics over all ranks: one all_reduce (sum) of [loss, `act_sums`, `grad_sums`] and,
    when gradient maxima or GPU memory are measured, one all_reduce (max) of [`maxima`, `memory`]. Non-finite
    values propagate, so every rank sees the same overflow/divergence verdict.

    `grad_sums` is `GradientStats.local_sums`: the squared norm per group, then (detailed) the zero count per
    group and the squared parameter norm."""
    n = len(LAYER_GROUPS)
    summed = torch.cat([loss.detach().double().reshape(1), act_sums.double(), grad_sums.double()])
    dist.all_reduce(summed)
    stats = summed.tolist()
    loss_sum, act, grad = stats[0], stats[1 : 1 + len(_Sum)], stats[1 + len(_Sum) :]
    grad_sq = sum(grad[:n])
    tokens = act[_Sum.TOKENS]
    out: dict[str, Any] = {
        "loss": loss_sum / world,
        "grad_norm": math.sqrt(grad_sq) if grad_sq >= 0 else float("nan"),
        "act_norm": math.sqrt(act[_Sum.ACTV_SQ] / tokens) if tokens > 0 else None,
        "actv_norm": _mean(act[_Sum.ACTV], tokens),
        "tok_norm": _mean(act[_Sum.TOK], tokens),
        "pos_norm": _mean(act[_Sum.POS], act[_Sum.POSITIONS]),
        "emb_norm": _mean(act[_Sum.EMB], tokens),
    }
    if len(grad) > n:  # detailed
        numel = dict(zip(LAYER_GROUPS, group_numel, strict=True))
        present = [g for g in LAYER_GROUPS if numel[g] > 0]
        out["gnorm"] = {
            g: math.sqrt(grad[i]) if grad[i] >= 0 else math.nan
            for i, g in enumerate(LAYER_GROUPS)
            if g in present
        }
        out["gzero"] = {g: grad[n + i] / numel[g] for i, g in enumerate(LAYER_GROUPS) if g in present}
        out["param_norm"] = math.sqrt(grad[2 * n])
        if maxima is not None or memory:
            local_max = torch.cat(
                [
                    maxima.double()
                    if maxima is not None
                    else torch.zeros(0, dtype=torch.float64, device=loss.device),
                    torch.tensor(list(memory), dtype=torch.float64, device=loss.device),
                ]
            )
            dist.all_reduce(local_max, op=dist.ReduceOp.MAX)
            highest = local_max.tolist()
            if maxima is not None:
                out["gmax"] = {g: highest[i] for i, g in enumerate(LAYER_GROUPS) if g in present}
                highest = highest[n:]
            if highest:
                out["cuda_gb_allocated"], out["cuda_gb_reserved"], out["cuda_gb_free"] = (
                    highest[0],
                    highest[1],
                    -highest[2],
                )
    return StepStats(**out)


class ClipCounter:
    """Whether a step's gradient norm exceeded the clip, and the share of the last `window` measured steps
    that did. metaseq logs `clip` = 100 when `grad_norm > clip_norm`, else 0
    (`Trainer._reduce_and_log_stats`), averaged over its log interval: a percentage of steps; `clip_frac` is
    that share as a fraction. Steps with a non-finite gradient norm (skipped on overflow) are not counted, as
    metaseq does not log them."""

    def __init__(self, window: int = CLIP_WINDOW) -> None:
        self.recent: collections.deque[float] = collections.deque(maxlen=window)

    def observe(self, grad_norm: float, clip: float) -> dict[str, float]:
        if not math.isfinite(grad_norm):
            return {}
        clipped = 1.0 if grad_norm > clip > 0 else 0.0
        self.recent.append(clipped)
        return {"clipped": clipped, "clip_frac": sum(self.recent) / len(self.recent)}


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
