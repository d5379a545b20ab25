"""Fault injection for tests and the demo: the failures the OPT team met, on demand.

Specs are `kind:key=value,...` strings (flag `--fault`, repeatable, or env `TRAINOPS_FAULTS` separated by
`;`):

    crash:step=N[,rank=R][,code=C | ,signal=KILL]  exit with code C (default 13) or die by SIGKILL at step N
    hang:step=N[,rank=R]                           sleep forever at the start of step N (heartbeat goes stale)
    inf_grad:step=N[,rank=R]                       put an inf in one local gradient after backward at step N
    diverge:step=N[,factor=100]                    multiply the LR by `factor` from step N on
    slow:rank=R[,step=N][,delay=0.2]               straggler: sleep `delay` s per step from step N (default 1)
    crash_in_checkpoint:step=N[,rank=0]            SIGKILL while committing the step-N checkpoint (torn save)

`rank` defaults to 0 for crash/hang/inf_grad; `diverge` applies on every rank. With no specs every hook is a
no-op, so the training loop calls them unconditionally.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

KINDS = ("crash", "hang", "inf_grad", "diverge", "slow", "crash_in_checkpoint")
DEFAULT_CRASH_CODE = 13


@dataclass(frozen=True, kw_only=True)
class Fault:
    kind: str
    step: int
    rank: int | None
    code: int = DEFAULT_CRASH_CODE
    kill: bool = False
    factor: float = 100.0
    delay: float = 0.2


def parse_fault(spec: str) -> Fault:
    kind, _, rest = spec.strip().partition(":")
    if kind not in KINDS:
        raise ValueError(f"unknown fault kind {kind!r} (one of {', '.join(KINDS)})")
    params: dict[str, str] = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"expected key=value, got {item!r}")
        params[key.strip()] = value.strip()
    allowed = {
        "crash": {"step", "rank", "code", "signal"},
        "slow": {"step", "rank", "delay"},
        "diverge": {"step", "factor"},
    }.get(kind, {"step", "rank"})
    if unknown := set(params) - allowed:
        raise ValueError(f"{kind} does not take {', '.join(sorted(unknown))}")
    if kind != "slow" and "step" not in params:
        raise ValueError(f"{kind} needs step=N")
    if kind == "slow" and "rank" not in params:
        raise ValueError("slow needs rank=R")
    if params.get("signal", "KILL").upper() not in ("KILL", "SIGKILL"):
        raise ValueError("signal must be KILL")
    try:
        return Fault(
            kind=kind,
            step=int(params.get("step", 1)),
            rank=None if kind == "diverge" else int(params.get("rank", 0)),
            code=int(params.get("code", DEFAULT_CRASH_CODE)),
            kill="signal" in params,
            factor=float(params.get("factor", 100.0)),
            delay=float(params.get("delay", 0.2)),
        )
    except ValueError as e:
        raise ValueError(f"bad number in {spec!r}: {e}") from None


def faults_from_env() -> list[str]:
    return [s for s in os.environ.get("TRAINOPS_FAULTS", "").split(";") if s.strip()]


class FaultInjector:
    def __init__(self, specs: list[str], *, rank: int, log: Callable[[str], None] = print) -> None:
        self.rank = rank
        self.log = log
        self.faults = [f for f in map(parse_fault, specs) if f.rank is None or f.rank == rank]

    def _active(self, kind: str, step: int) -> list[Fault]:
        return [f for f in self.faults if f.kind == kind and f.step == step]

    def at_step_start(self, step: int) -> None:
        """Crash, hang or slow this rank down, as configured, before step `step` runs."""
        for f in self.faults:
            if f.kind == "slow" and step >= f.step:
                time.sleep(f.delay)
        for f in self._active("crash", step):
            self.log(f"fault: crash at step {step} ({'SIGKILL' if f.kill else f'exit {f.code}'})")
            if f.kill:
                os.kill(os.getpid(), signal.SIGKILL)
            os._exit(f.code)  # no cleanup, no flush: that is what a crash looks like
        for _ in self._active("hang", step):
            self.log(f"fault: hanging at step {step}")
            while True:
                time.sleep(3600)

    def after_backward(self, step: int, model: torch.nn.Module) -> None:
        """Inject an inf into the first local gradient shard (the loss scaler must catch it)."""
        if not self._active("inf_grad", step):
            return
        for p in model.parameters():
            if p.grad is not None:
                local = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
                if local.numel():
                    local.view(-1)[0] = float("inf")
                    self.log(f"fault: inf gradient injected at step {step}")
                    return

    def lr_factor(self, step: int) -> float:
        factor = 1.0
        for f in self.faults:
            if f.kind == "diverge" and step >= f.step:
                factor *= f.factor
        return factor

    def in_checkpoint_commit(self, step: int) -> None:
        """Called between the checkpoint directory's rename and its commit marker."""
        if self._active("crash_in_checkpoint", step):
            self.log(f"fault: killed while committing checkpoint of step {step}")
            os.kill(os.getpid(), signal.SIGKILL)
