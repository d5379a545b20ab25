"""Faults that behave like the real thing under any supervisor: a bad host keeps failing its ranks, a
divergence recurs unless the LR was cut, a transient crash or hang happens once per run."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest

from trainer.config import ConfigError, parse_args
from trainer.faults import FaultInjector, parse_fault


def _quiet(_: str) -> None:
    pass


def _exit_code_at(injector: FaultInjector, step: int) -> int | None:
    """Run `at_step_start(step)` in a child process (a firing fault ends the process); its exit code, or
    None if nothing fired."""
    ctx = multiprocessing.get_context("fork")
    proc = ctx.Process(target=injector.at_step_start, args=(step,))
    proc.start()
    proc.join(timeout=30)
    assert proc.exitcode is not None
    return proc.exitcode or None


def test_parse_the_new_options() -> None:
    bad_host = parse_fault("host_crash:host=h2,step=40,code=17")
    assert (bad_host.host, bad_host.step, bad_host.code, bad_host.rank) == ("h2", 40, 17, None)
    assert parse_fault("crash:step=3,rank=1,once").once
    assert parse_fault("hang:step=3,once=1").once
    assert not parse_fault("crash:step=3").once
    assert parse_fault("diverge:step=9,factor=100,unless_lr_scale_below=1.0").unless_lr_scale_below == 1.0
    for spec in ("host_crash:step=4", "host_crash:host=h1", "inf_grad:step=2,once", "diverge:step=2,once"):
        with pytest.raises(ValueError):
            parse_fault(spec)
    with pytest.raises(ConfigError):
        parse_args(["--fault", "host_crash:host=h1,step=x"])


def test_host_crash_hits_only_ranks_on_that_host_at_every_step_from_n(tmp_path: Path) -> None:
    spec = ["host_crash:host=h2,step=5,code=17"]
    on_bad = FaultInjector(spec, rank=1, host="h2", state_dir=tmp_path, log=_quiet)
    on_good = FaultInjector(spec, rank=0, host="h1", state_dir=tmp_path, log=_quiet)
    assert _exit_code_at(on_bad, 4) is None
    # every attempt that reaches step 5 or later on h2 dies again: nothing is recorded as "fired"
    assert [_exit_code_at(on_bad, s) for s in (5, 5, 9)] == [17, 17, 17]
    assert _exit_code_at(on_good, 9) is None
    assert not list(tmp_path.iterdir())


def test_once_crash_fires_in_the_first_attempt_only(tmp_path: Path) -> None:
    spec = ["crash:step=3,rank=1,once"]
    first = FaultInjector(spec, rank=1, state_dir=tmp_path / "faults", log=_quiet)
    assert _exit_code_at(first, 3) == 13
    # the restarted attempt (a fresh process over the same run directory) passes step 3
    restarted = FaultInjector(spec, rank=1, state_dir=tmp_path / "faults", log=_quiet)
    assert _exit_code_at(restarted, 3) is None
    # without the option it recurs, as before
    plain = FaultInjector(["crash:step=3,rank=1"], rank=1, state_dir=tmp_path / "faults", log=_quiet)
    assert _exit_code_at(plain, 3) == 13


def test_once_without_a_state_dir_fires_once_per_process() -> None:
    injector = FaultInjector(["crash:step=3,once"], rank=0, log=_quiet)
    assert injector._active("crash", 3) and not injector._active("crash", 3)


def test_divergence_recurs_unless_the_lr_scale_was_cut() -> None:
    injector = FaultInjector(["diverge:step=5,factor=100,unless_lr_scale_below=1.0"], rank=0, log=_quiet)
    assert injector.lr_factor(4, lr_scale=1.0) == 1.0
    assert injector.lr_factor(5, lr_scale=1.0) == 100.0  # every restart that reaches step 5 at full LR
    assert injector.lr_factor(7, lr_scale=0.5) == 1.0  # the remedy: a lower LR scale
    plain = FaultInjector(["diverge:step=5,factor=10"], rank=0, log=_quiet)
    assert plain.lr_factor(5, lr_scale=0.5) == 10.0  # unchanged semantics without the option
