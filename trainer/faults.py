"""Fault injection for tests and the demo: the failures the OPT team met, on demand.

Specs are `kind:key=value,...` strings (flag `--fault`, repeatable, or env `TRAINOPS_FAULTS` separated by
`;`):

    crash:step=N[,rank=R][,code=C | ,signal=KILL]  exit with code C (default 13) or die by SIGKILL at step N
    hang:step=N[,rank=R]                           sleep forever at the start of step N (heartbeat goes stale)
    inf_grad:step=N[,rank=R]                       put an inf in one local gradient after backward at step N
    diverge:step=N[,factor=100]                    multiply the LR by `factor` from step N on
    slow:rank=R[,step=N][,delay=0.2]               straggler: sleep `delay` s per step from step N (default 1)
    crash_in_checkpoint:step=N[,rank=0]            SIGKILL while committing the step-N checkpoint (torn save)
    host_crash:host=NAME,step=N[,code=C]           bad host: every rank placed on NAME (TRAINOPS_HOSTS) exits
                                                   with code C (default 13) at any step >= N, on every attempt

`rank` defaults to 0 for crash/hang/inf_grad; `diverge` applies on every rank. With no specs every hook is a
no-op, so the training loop calls them unconditionally.

A spec fires in every process that is given it, so a fault passed to every attempt (a supervisor that
relaunches with the same flags, e.g. plain `torchrun --max-restarts`) recurs whenever training reaches its
step again. Two options make the recurrence behave like the real failure:

    crash:...,once / hang:...,once          transient: fires the first time any attempt of this run reaches
                                            step N, never again (marker file in <run-dir>/faults/)
    diverge:...,unless_lr_scale_below=X     a divergence that recurs at step N on every restart unless the
                                            run's LR scale (`--lr-scale`, inherited from checkpoints) is < X
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

KINDS = ("crash", "hang", "inf_grad", "diverge", "slow", "crash_in_checkpoint", "host_crash")
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
    host: str | None = None  # host_crash: the bad host's name
    once: bool = False  # crash/hang: fire only the first time any attempt of the run reaches `step`
    unless_lr_scale_below: float | None = None  # diverge: inactive when the run's LR scale is below this

    @property
    def marker_name(self) -> str:
        """File name recording that a `once` fault has fired (one per kind, step and rank)."""
        return f"{self.kind}-step{self.step}-rank{self.rank}"


def parse_fault(spec: str) -> Fault:
    kind, _, rest = spec.strip().partition(":")
    if kind not in KINDS:
        raise ValueError(f"unknown fault kind {kind!r} (one of {', '.join(KINDS)})")
    params: dict[str, str] = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq and key.strip() == "once":
            key, value = "once", "1"  # a bare flag
        elif not eq:
            raise ValueError(f"expected key=value, got {item!r}")
        params[key.strip()] = value.strip()
    allowed = {
        "crash": {"step", "rank", "code", "signal", "once"},
        "hang": {"step", "rank", "once"},
        "slow": {"step", "rank", "delay"},
        "diverge": {"step", "factor", "unless_lr_scale_below"},
        "host_crash": {"host", "step", "code"},
    }.get(kind, {"step", "rank"})
    if unknown := set(params) - allowed:
        raise ValueError(f"{kind} does not take {', '.join(sorted(unknown))}")
    if kind != "slow" and "step" not in params:
        raise ValueError(f"{kind} needs step=N")
    if kind == "slow" and "rank" not in params:
        raise ValueError("slow needs rank=R")
    if kind == "host_crash" and not params.get("host"):
        raise ValueError("host_crash needs host=NAME")
    if params.get("signal", "KILL").upper() not in ("KILL", "SIGKILL"):
        raise ValueError("signal must be KILL")
    if params.get("once", "1") not in ("1", "true"):
        raise ValueError("once takes no value (or once=1)")
    try:
        threshold = params.get("unless_lr_scale_below")
        return Fault(
            kind=kind,
            step=int(params.get("step", 1)),
            rank=None if kind in ("diverge", "host_crash") else int(params.get("rank", 0)),
            code=int(params.get("code", DEFAULT_CRASH_CODE)),
            kill="signal" in params,
            factor=float(params.get("factor", 100.0)),
            delay=float(params.get("delay", 0.2)),
            host=params.get("host"),
            once="once" in params,
            unless_lr_scale_below=float(threshold) if threshold is not None else None,
        )
    except ValueError as e:
        raise ValueError(f"bad number in {spec!r}: {e}") from None


def faults_from_env() -> list[str]:
    return [s for s in os.environ.get("TRAINOPS_FAULTS", "").split(";") if s.strip()]


class FaultInjector:
    def __init__(
        self,
        specs: list[str],
        *,
        rank: int,
        host: str | None = None,
        state_dir: Path | None = None,
        log: Callable[[str], None] = print,
    ) -> None:
        """`host`: this rank's (simulated) host, for host_crash. `state_dir`: where `once` faults record
        that they fired (the run directory's `faults/`); without it they fire once per process."""
        self.rank = rank
        self.host = host
        self.state_dir = state_dir
        self.log = log
        self.faults = [
            f
            for f in map(parse_fault, specs)
            if (f.rank is None or f.rank == rank) and (f.kind != "host_crash" or f.host == host)
        ]
        self._fired_here: set[str] = set()

    def _active(self, kind: str, step: int) -> list[Fault]:
        return [f for f in self.faults if f.kind == kind and f.step == step and self._claim(f)]

    def _claim(self, fault: Fault) -> bool:
        """True if `fault` fires now: always, unless it is a `once` fault that already fired in this run."""
        if not fault.once:
            return True
        if self.state_dir is None:
            if fault.marker_name in self._fired_here:
                return False
            self._fired_here.add(fault.marker_name)
            return True
        self.state_dir.mkdir(parents=True, exist_ok=True)
        try:
            # O_EXCL: exactly one claimant, and the marker survives the crash or kill that follows
            os.close(os.open(self.state_dir / fault.marker_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        except FileExistsError:
            return False
        return True

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
        for f in self.faults:
            if f.kind == "host_crash" and step >= f.step:
                self.log(f"fault: host {f.host} failed under this rank at step {step} (exit {f.code})")
                os._exit(f.code)
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

    def lr_factor(self, step: int, *, lr_scale: float = 1.0) -> float:
        """LR multiplier of the diverge faults active at `step`; `lr_scale` is the run's current LR scale."""
        factor = 1.0
        for f in self.faults:
            if f.kind != "diverge" or step < f.step:
                continue
            if f.unless_lr_scale_below is not None and lr_scale < f.unless_lr_scale_below:
                continue  # the LR was cut (the OPT team's remedy): this stretch of data no longer diverges
            factor *= f.factor
        return factor

    def in_checkpoint_commit(self, step: int) -> None:
        """Called between the checkpoint directory's rename and its commit marker."""
        if self._active("crash_in_checkpoint", step):
            self.log(f"fault: killed while committing checkpoint of step {step}")
            os.kill(os.getpid(), signal.SIGKILL)
