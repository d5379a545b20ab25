"""Number formats: the FSDP2 policy per precision, the dynamic loss scaler, and OPT's fp16 optimizer step.

`--precision` chooses one of four formats:

- `fp16` (default; OPT as metaseq trained it, `--memory-efficient-fp16` on FairScale FSDP): parameters are
  stored, all-gathered and computed in fp16; gradients are fp16 and reduce-scattered in fp16 with OPT's
  pre-divide: each rank divides its gradient by FairScale's pre-divide factor (the power of two near sqrt(N):
  `opt_predivide_factors`) before the sum, the sum is divided by the rest of N after it. FSDP2 does exactly
  this for an fp16 reduction (`_get_gradient_divide_factors`: same formula as FairScale's
  `_get_gradient_predivide_factor`). Adam's moments are fp32 (sharded); `FP16ParamAdam` does its update in
  fp32 on an fp32 copy of the fp16 shard and writes the result back to fp16, as metaseq's Adam did on fp16
  parameters. As in metaseq, the loss is the *sum* over the rank's tokens (metaseq's criterions sum and the
  trainer divides the gradient by the sample size later): the scaled fp16 gradient is that of
  `scale x sum`, and the division by the scale and the global token count happens in fp32 inside the
  optimizer step together with clipping (`grad_multiplier`). Loss scaler: OPT's launcher values (initial
  scale 4, window 2^14 / (data-parallel size x update frequency)); an overflow that would take the scale to
  or below `min_loss_scale` (1e-4, metaseq's default when OPT-175B trained) stops training
  (`floor_reached`, exit `EXIT_LOSS_SCALE_FLOOR`), as metaseq's `FloatingPointError("Minimum loss scale
  reached")` did.
- `fp16-mixed` (trainops's earlier fp16): fp16 compute, fp32 master weights, fp32 reduction (the sqrt(N)
  pre-divide is folded into the loss and FSDP2's divide factor), AdamW state fp32. Loss scale starts at 65536,
  doubles after 1000 clean steps, is clamped at the floor and keeps skipping steps there.
- `bf16`: bf16 compute, fp32 master weights and reduction; `fp32`: everything fp32. No scaling (scale 1.0),
  but a non-finite gradient still skips the step.

For every scaled format the loss is multiplied by the scale before backward; after backward the caller
computes the unscaled norm of the local gradient shards and all-reduces its square together with the step's
other statistics, so every rank sees the same overflow verdict from that single reduction. On overflow the
step is skipped and the scale halved; after `window` clean steps in a row it doubles (metaseq's
`(iter - last_overflow_iter) % scale_window == 0` is the same rule).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import chain
from typing import Any

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy

from trainer.contract import OPT_MIN_LOSS_SCALE

PRECISIONS = ("fp16", "fp16-mixed", "bf16", "fp32")
SCALED_PRECISIONS = frozenset({"fp16", "fp16-mixed"})
COMPUTE_DTYPES = {
    "fp16": torch.float16,
    "fp16-mixed": torch.float16,
    "bf16": torch.bfloat16,
    "fp32": torch.float32,
}

# OPT / metaseq (launcher/opt_baselines.py `--fp16-init-scale 4`; optim/fp16_optimizer.py computes the window
# from data-parallel size and update frequency when `--fp16-scale-window` is not given; dataclass/configs.py
# `min_loss_scale` 1e-4, after which training is stopped). metaseq later (66B, May 2022) fixed the window at
# 256, lowered the minimum to 2^-5 and clamped there instead of stopping; trainops follows the 175B code.
OPT_INITIAL_LOSS_SCALE = 4.0
OPT_SCALE_WINDOW_NUMERATOR = 2**14
# fp16-mixed (trainops's earlier behaviour, kept under its own name)
MIXED_INITIAL_LOSS_SCALE = 65536.0
MIXED_SCALE_WINDOW = 1000
MIXED_MIN_LOSS_SCALE = 1e-4


def stores_fp16_params(precision: str) -> bool:
    """Whether the sharded parameters themselves are fp16 (OPT's fidelity format)."""
    return precision == "fp16"


def mixed_precision_policy(precision: str) -> MixedPrecisionPolicy:
    if precision == "fp32":
        return MixedPrecisionPolicy()
    if stores_fp16_params(precision):
        # parameters are fp16 already (no cast); gradients reduce-scattered in fp16, pre/post-divided by FSDP2
        return MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float16)
    return MixedPrecisionPolicy(param_dtype=COMPUTE_DTYPES[precision], reduce_dtype=torch.float32)


def fsdp_formats(model: nn.Module) -> str:
    """The dtypes FSDP2 stores the sharded parameters in and reduce-scatters their gradients in, as FSDP2
    resolved them (after the first forward), for the log: the evidence that `--precision fp16` reduces in
    fp16 (the policy alone does not say: FSDP2 drops a reduce dtype equal to the compute dtype and reduces
    in the gradient's own). Reads FSDP2's per-parameter state, which has no public accessor."""
    stored: set[str] = set()
    reduced: set[str] = set()
    for module in model.modules():
        if not isinstance(module, FSDPModule):
            continue
        for group in module._get_fsdp_state()._fsdp_param_groups:
            for fsdp_param in group.fsdp_params:
                stored.add(str(fsdp_param.orig_dtype).removeprefix("torch."))
                # gradients come in the compute dtype (param_dtype, None = the stored one) and are
                # reduce-scattered in reduce_dtype when set (foreach_reduce: `reduce_dtype or grad_dtype`)
                dtype = fsdp_param.reduce_dtype or fsdp_param.param_dtype or fsdp_param.orig_dtype
                reduced.add(str(dtype).removeprefix("torch."))
    return (
        f"fsdp: parameters stored in {', '.join(sorted(stored))}, "
        f"gradients reduce-scattered in {', '.join(sorted(reduced))}"
    )


def opt_predivide_factors(world: int) -> tuple[float, float]:
    """(pre, post) divide factors of an fp16 gradient reduction over `world` ranks: FairScale's
    `_get_gradient_predivide_factor` (which OPT trained with), also FSDP2's for an fp16 reduce dtype.
    pre x post = world; pre is the power of two where doubling stops dividing world or passes sqrt(world):
    2 ranks -> (2, 1), 8 -> (4, 2), 16 -> (4, 4), 124 -> (8, 15.5)."""
    pre = 1
    while world % pre == 0 and world / pre > pre:
        pre *= 2
    return float(pre), world / pre


def opt_scale_window(data_parallel: int, update_freq: int) -> int:
    """metaseq's default loss-scale window: int(2^14 / data-parallel size / update frequency), at least 1
    (132 on OPT-175B's 124 data-parallel ranks with update frequency 1)."""
    return max(1, int(OPT_SCALE_WINDOW_NUMERATOR / data_parallel / update_freq))


def default_initial_loss_scale(precision: str) -> float:
    return OPT_INITIAL_LOSS_SCALE if precision == "fp16" else MIXED_INITIAL_LOSS_SCALE


def default_min_loss_scale(precision: str) -> float:
    return OPT_MIN_LOSS_SCALE if precision == "fp16" else MIXED_MIN_LOSS_SCALE


@dataclass(kw_only=True)
class DynamicLossScaler:
    scale: float
    window: int
    floor: float
    enabled: bool
    stop_at_floor: bool = False
    """fp16 (OPT): an overflow that would take the scale to or below `floor` sets `floor_reached` and leaves
    the scale where it was (metaseq restored it before raising); fp16-mixed clamps at the floor instead."""
    clean_steps: int = 0
    overflows: int = 0
    floor_reached: bool = False

    @classmethod
    def for_precision(cls, precision: str, *, initial: float, window: int, floor: float) -> DynamicLossScaler:
        enabled = precision in SCALED_PRECISIONS
        return cls(
            scale=initial if enabled else 1.0,
            window=window,
            floor=floor,
            enabled=enabled,
            stop_at_floor=precision == "fp16",
        )

    @classmethod
    def resolve(
        cls,
        precision: str,
        *,
        initial: float | None,
        window: int | None,
        floor: float | None,
        data_parallel: int,
        update_freq: int,
    ) -> DynamicLossScaler:
        """The scaler of a run: unset values are the precision's defaults (fp16: OPT's 4, 2^14 / (data
        parallel x update frequency), 1e-4; fp16-mixed: 65536, 1000, 1e-4)."""
        if window is None:
            window = (
                opt_scale_window(data_parallel, update_freq) if precision == "fp16" else MIXED_SCALE_WINDOW
            )
        return cls.for_precision(
            precision,
            initial=default_initial_loss_scale(precision) if initial is None else initial,
            window=window,
            floor=default_min_loss_scale(precision) if floor is None else floor,
        )

    def describe(self) -> str:
        if not self.enabled:
            return "loss scaling off (scale 1.0)"
        at_floor = "stop" if self.stop_at_floor else "clamp and keep skipping"
        return (
            f"loss scale {self.scale:g}, window {self.window} clean steps, floor {self.floor:g} ({at_floor})"
        )

    def reset(self, initial: float) -> None:
        self.scale, self.clean_steps = (initial if self.enabled else 1.0), 0

    def update(self, *, overflow: bool) -> None:
        if overflow:
            self.overflows += 1
            self.clean_steps = 0
            if not self.enabled:
                return
            halved = self.scale / 2.0
            if self.stop_at_floor and halved <= self.floor:
                self.floor_reached = True
            else:
                self.scale = max(halved, self.floor)
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


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (a view: in-place ops write the shard), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


class FP16ParamAdam(torch.optim.Optimizer):
    """Adam with decoupled weight decay over fp16 parameters with fp32 moments: metaseq's `Adam` under its
    `MemoryEfficientFP16Optimizer`, which OPT trained with.

    Per parameter: the fp16 gradient is cast to fp32 and multiplied by `grad_multiplier` (1 / (loss scale x
    tokens) x world, times the clip coefficient), the fp16 shard is copied to fp32, then metaseq's math:
    m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2; p -= lr wd p; p -= lr sqrt(1-b2^t)/(1-b1^t) m / (sqrt(v)+eps);
    the result is rounded back into the fp16 shard. There is no fp32 master copy: the rounding to fp16 each
    step is the format's (and OPT's) behaviour.

    `load_state_dict` keeps the checkpoint's fp32 moments: torch's Optimizer casts floating state to the
    parameter's dtype (fp16) on load, which metaseq undid the same way ("Hack" in fp16_optimizer.py).
    """

    def __init__(
        self,
        params: Iterable[Any],
        *,
        lr: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Any = None, *, grad_multiplier: float = 1.0) -> None:  # type: ignore[override]
        if closure is not None:
            raise ValueError("FP16ParamAdam.step takes no closure")
        for group in self.param_groups:
            params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                params.append(_local(p))
                grads.append(_local(p.grad))
                exp_avgs.append(_local(state["exp_avg"]))
                exp_avg_sqs.append(_local(state["exp_avg_sq"]))
                steps.append(state["step"])
            if not params:
                continue
            beta1, beta2 = group["betas"]
            lr, eps, decay = float(group["lr"]), float(group["eps"]), float(group["weight_decay"])
            g32 = [g.to(torch.float32, copy=True) for g in grads]
            if grad_multiplier != 1.0:
                torch._foreach_mul_(g32, grad_multiplier)
            p32 = [p.to(torch.float32, copy=True) for p in params]
            torch._foreach_add_(steps, 1.0)
            torch._foreach_mul_(exp_avgs, beta1)
            torch._foreach_add_(exp_avgs, g32, alpha=1.0 - beta1)
            torch._foreach_mul_(exp_avg_sqs, beta2)
            torch._foreach_addcmul_(exp_avg_sqs, g32, g32, value=1.0 - beta2)
            denom = torch._foreach_sqrt(exp_avg_sqs)
            torch._foreach_add_(denom, eps)
            step_sizes = []
            for t in steps:
                n = float(t.item())
                step_sizes.append(-lr * math.sqrt(1.0 - beta2**n) / (1.0 - beta1**n))
            if decay != 0.0:
                torch._foreach_add_(p32, p32, alpha=-decay * lr)
            torch._foreach_addcdiv_(p32, exp_avgs, denom, step_sizes)
            torch._foreach_copy_(params, p32)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        for saved_id, param in zip(saved_ids, params, strict=True):
            for key, value in state_dict["state"].get(saved_id, {}).items():
                if key != "step" and torch.is_tensor(value) and value.is_floating_point():
                    self.state[param][key] = value.detach().to(
                        device=param.device, dtype=torch.float32, copy=True
                    )
