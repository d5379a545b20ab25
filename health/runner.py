"""Running a set of checks in an isolated process, each under its own time limit.

A check that hangs (a wedged driver call, a stuck collective) cannot be interrupted inside a Python
thread, so checks run in a child process that is killed when a check overruns; the overrun check is
reported as ``timeout`` and the remaining checks continue in a fresh child.
"""

from __future__ import annotations

import contextlib
import faulthandler
import io
import multiprocessing
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing import context, forkserver, popen_forkserver, reduction, spawn, util
from multiprocessing.connection import Connection
from typing import Any

from health.checks.context import CheckContext
from health.results import CheckResult, CheckStatus, Fault


class _CheckPopen(popen_forkserver.Popen):
    """forkserver launch without the caller's ``__main__``: stock forkserver re-imports the main module in
    every child (1-2 s per check set under an API server or a bench script, measured); checks need only
    ``health.checks.registry``, which the server preloads. A forkserver child is cheap (~25 ms) and,
    unlike a plain fork, never inherits the worker's threads, held locks or torch/CUDA state."""

    def _launch(self, process_obj: Any) -> None:
        prep_data = spawn.get_preparation_data(process_obj._name)
        prep_data.pop("init_main_from_path", None)
        prep_data.pop("init_main_from_name", None)
        buf = io.BytesIO()
        context.set_spawning_popen(self)
        try:
            reduction.dump(prep_data, buf)
            reduction.dump(process_obj, buf)
        finally:
            context.set_spawning_popen(None)
        self.sentinel, w = forkserver.connect_to_new_process(self._fds)
        parent_w = os.dup(w)
        self.finalizer = util.Finalize(self, util.close_fds, (parent_w, self.sentinel))
        with open(w, "wb", closefd=True) as f:
            f.write(buf.getbuffer())
        self.pid = forkserver.read_signed(self.sentinel)


class _CheckProcess(context.ForkServerProcess):
    @staticmethod
    def _Popen(process_obj: Any) -> Any:
        return _CheckPopen(process_obj)


CHILD_GRACE_S = 30.0  # how long past its timeout a check whose worker is gone may still run
_MP = multiprocessing.get_context("forkserver")
_MP.set_forkserver_preload(["health.checks.registry", "health.checks.fabric", "health.runner"])


def _run_one(name: str, ctx: CheckContext) -> CheckResult:
    # Imported in the check process (its forkserver preloaded it): the implementations load the NVML
    # bindings, which the worker and the control plane, both importing this module, do without.
    from health.checks.registry import CHECK_FUNCTIONS

    start = time.perf_counter()
    try:
        result = CHECK_FUNCTIONS[name](ctx)
    except Exception as error:  # a crashing check is a finding about the host, reported as such
        result = CheckResult(
            check=name,
            status=CheckStatus.error,
            reason=f"check raised {type(error).__name__}: {error}",
            faults=[Fault.check_error],
        )
    result.duration_s = time.perf_counter() - start
    return result


def _die_with_parent() -> None:
    """Ask Linux to kill this check process when its parent (the forkserver, which exits with the
    worker) dies, so a hung check cannot outlive a worker that was itself killed."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the worker's own kill on timeout still applies


def _let_the_forkserver_go() -> None:
    """Close this process's copy of the forkserver's alive pipe. The forkserver hands it to every child it
    forks, and it exits only once every copy is closed: a check hung in a worker that was killed kept its
    forkserver alive, the forkserver kept it alive (PR_SET_PDEATHSIG fires when the forkserver dies), and
    both outlived the worker for good (seen after the suite's killed-worker test)."""
    server = forkserver._forkserver
    fd = getattr(server, "_forkserver_alive_fd", None)
    if fd is not None:
        with contextlib.suppress(OSError):  # already closed
            os.close(fd)
        server._forkserver_alive_fd = None


def _child_main(names: list[str], ctx: CheckContext, conn: Connection, timeout_s: float) -> None:
    _die_with_parent()
    _let_the_forkserver_go()
    for name in names:
        # The worker kills a check past its timeout; should the worker be gone, the check ends itself a
        # little later (with its traceback on stderr, in the worker's log).
        faulthandler.dump_traceback_later(timeout_s + CHILD_GRACE_S, exit=True)
        result = _run_one(name, ctx)
        faulthandler.cancel_dump_traceback_later()
        conn.send(result.to_json())
    conn.close()


def run_isolated(names: list[str], ctx: CheckContext, *, timeout_s: float) -> list[CheckResult]:
    """Run ``names`` in order in child processes; a check running past ``timeout_s`` is killed."""
    results: list[CheckResult] = []
    remaining = list(names)
    while remaining:
        receiver, sender = _MP.Pipe(duplex=False)
        child = _CheckProcess(target=_child_main, args=(remaining, ctx, sender, timeout_s), daemon=True)
        child.start()
        sender.close()
        try:
            while remaining:
                name = remaining[0]
                if not receiver.poll(timeout_s):
                    child.kill()
                    results.append(
                        CheckResult(
                            check=name,
                            status=CheckStatus.timeout,
                            reason=f"check did not finish within {timeout_s:g} s; its process was killed",
                            faults=[Fault.check_timeout],
                            duration_s=timeout_s,
                        )
                    )
                    remaining.pop(0)
                    break
                try:
                    results.append(CheckResult.from_json(receiver.recv()))
                except EOFError:
                    child.join(5)
                    results.append(
                        CheckResult(
                            check=name,
                            status=CheckStatus.error,
                            reason=f"check process died (exit code {child.exitcode})",
                            faults=[Fault.check_error],
                        )
                    )
                    remaining.pop(0)
                    break
                remaining.pop(0)
        finally:
            receiver.close()
            child.join(5)
            if child.is_alive():
                child.kill()
                child.join()
    return results


@dataclass(frozen=True, kw_only=True)
class IsolatedCall:
    """What a function run by :func:`run_call_isolated` gave back: its JSON value, or why there is none."""

    value: Any = None
    error: str | None = None
    timed_out: bool = False


def _call_child_main(target: Callable[..., Any], args: tuple[Any, ...], conn: Connection) -> None:
    _die_with_parent()
    try:
        conn.send(("ok", target(*args)))
    except Exception as error:
        conn.send(("error", f"{type(error).__name__}: {error}"))
    conn.close()


def run_call_isolated(target: Callable[..., Any], args: tuple[Any, ...], *, timeout_s: float) -> IsolatedCall:
    """Run ``target(*args)`` (a module-level function returning picklable data) in a killable child.

    Used for the cross-host collectives: a rank stuck in a collective whose peer vanished is killed at
    ``timeout_s`` rather than wedging the host worker.
    """
    receiver, sender = _MP.Pipe(duplex=False)
    child = _CheckProcess(target=_call_child_main, args=(target, args, sender), daemon=True)
    child.start()
    sender.close()
    try:
        if not receiver.poll(timeout_s):
            child.kill()
            return IsolatedCall(error=f"did not finish within {timeout_s:g} s; killed", timed_out=True)
        try:
            kind, payload = receiver.recv()
        except EOFError:
            child.join(5)
            return IsolatedCall(error=f"process died (exit code {child.exitcode})")
        return IsolatedCall(value=payload) if kind == "ok" else IsolatedCall(error=payload)
    finally:
        receiver.close()
        child.join(5)
        if child.is_alive():
            child.kill()
            child.join()
