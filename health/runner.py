"""Running a set of checks in an isolated process, each under its own time limit.

A check that hangs (a wedged driver call, a stuck collective) cannot be interrupted inside a Python
thread, so checks run in a child process that is killed when a check overruns; the overrun check is
reported as ``timeout`` and the remaining checks continue in a fresh child.
"""

from __future__ import annotations

import multiprocessing
import signal
import time
from multiprocessing.connection import Connection

from health.checks import ALL_CHECKS
from health.checks.context import CheckContext
from health.results import CheckResult, CheckStatus, Fault

# fork, not forkserver/spawn: those re-import the caller's __main__ in every child (1-2 s per check
# set under an API server or a bench script, measured), fork costs ~25 ms. It is safe here because the
# worker process never imports torch or touches CUDA (the checks do, in the child), host workers run
# the solo pool (one thread), and a child that inherited a held lock would hang and be killed and
# reported by the time limit below, never hang the worker.
_MP = multiprocessing.get_context("fork")


def _run_one(name: str, ctx: CheckContext) -> CheckResult:
    start = time.perf_counter()
    try:
        result = ALL_CHECKS[name](ctx)
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
    """Ask Linux to kill this check process when its parent (the worker) dies, so a hung check cannot
    outlive a worker that was itself killed."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the worker's own kill on timeout still applies


def _child_main(names: list[str], ctx: CheckContext, conn: Connection) -> None:
    _die_with_parent()
    for name in names:
        conn.send(_run_one(name, ctx).to_json())
    conn.close()


def run_isolated(names: list[str], ctx: CheckContext, *, timeout_s: float) -> list[CheckResult]:
    """Run ``names`` in order in child processes; a check running past ``timeout_s`` is killed."""
    results: list[CheckResult] = []
    remaining = list(names)
    while remaining:
        receiver, sender = _MP.Pipe(duplex=False)
        child = _MP.Process(target=_child_main, args=(remaining, ctx, sender), daemon=True)
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
