"""Runs whose reconcile pass keeps failing: retried with back-off, escalated after a bound, never silently.

A pass for one run can raise (a bug, a row the code does not expect, a transition the state machine refuses,
the database gone). The loop catches it so the other runs go on; this module decides, per run, when to try
again and when a human must look. Pure bookkeeping: the loop does the logging, the phase change and the page.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, replace

import sqlalchemy.exc

# Errors of the world around the orchestrator rather than of the run: a database that is restarting or
# unreachable, a pool exhausted for a moment, a network timeout. They usually go away by themselves.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    sqlalchemy.exc.OperationalError,
    sqlalchemy.exc.InterfaceError,
    sqlalchemy.exc.TimeoutError,
    ConnectionError,
    TimeoutError,
    socket.gaierror,
)


def is_transient(error: BaseException) -> bool:
    """True for errors expected to pass without anyone's help (see `TRANSIENT_ERRORS`)."""
    if isinstance(error, sqlalchemy.exc.DBAPIError) and error.connection_invalidated:
        return True
    return isinstance(error, TRANSIENT_ERRORS)


def describe(error: BaseException) -> str:
    """One line naming the error, for the logbook and the page."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


@dataclass(frozen=True, kw_only=True)
class RunPassFailures:
    """The consecutive failed passes of one run, since its last good pass."""

    count: int
    first_failed_at: float
    last_error: str
    last_stage: str  # "observe", "decide" or "apply"
    transient: bool  # the newest error was transient
    retry_at: float
    escalated: bool = False


@dataclass(frozen=True, kw_only=True)
class FailedPassVerdict:
    failures: RunPassFailures
    escalate: bool  # put the run in needs_attention and page now (once per streak, see mark_escalated)


def retry_delay_s(count: int, *, base_s: float, max_s: float) -> float:
    """Wait before the next try after `count` consecutive failed passes: base, 2 x base, 4 x base, ... max."""
    return min(max_s, base_s * 2 ** max(0, count - 1))


class FailingPasses:
    """Per run: how many passes in a row failed, when to try again, whether on-call was paged."""

    def __init__(
        self, *, limit: int, transient_patience_s: float, backoff_base_s: float, backoff_max_s: float
    ) -> None:
        self.limit = limit
        self.transient_patience_s = transient_patience_s
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self._by_run: dict[int, RunPassFailures] = {}

    def get(self, run_id: int) -> RunPassFailures | None:
        return self._by_run.get(run_id)

    def due(self, run_id: int, now: float) -> bool:
        """Whether the run's pass should run now (not while it waits out a back-off)."""
        failures = self._by_run.get(run_id)
        return failures is None or now >= failures.retry_at

    def failed(self, run_id: int, error: BaseException, *, stage: str, now: float) -> FailedPassVerdict:
        """Record a failed pass. It escalates once a streak reaches `limit` passes; a streak of transient
        errors escalates only when it has also lasted `transient_patience_s`."""
        previous = self._by_run.get(run_id)
        count = previous.count + 1 if previous else 1
        transient = is_transient(error)
        failures = RunPassFailures(
            count=count,
            first_failed_at=previous.first_failed_at if previous else now,
            last_error=describe(error),
            last_stage=stage,
            transient=transient,
            retry_at=now + retry_delay_s(count, base_s=self.backoff_base_s, max_s=self.backoff_max_s),
            escalated=previous.escalated if previous else False,
        )
        patient = not transient or now - failures.first_failed_at >= self.transient_patience_s
        self._by_run[run_id] = failures
        escalate = not failures.escalated and count >= self.limit and patient
        return FailedPassVerdict(failures=failures, escalate=escalate)

    def mark_escalated(self, run_id: int) -> None:
        """The run was put in needs_attention and paged for its current streak: not again for it (an
        escalation that itself failed, e.g. with the database down, is tried again on the next failure)."""
        failures = self._by_run.get(run_id)
        if failures is not None:
            self._by_run[run_id] = replace(failures, escalated=True)

    def succeeded(self, run_id: int) -> RunPassFailures | None:
        """Record a good pass; returns the streak it ends, if any."""
        return self._by_run.pop(run_id, None)

    def forget_except(self, run_ids: set[int]) -> None:
        """Drop runs the loop no longer reconciles (completed, stopped, deleted)."""
        for run_id in set(self._by_run) - run_ids:
            del self._by_run[run_id]
