"""Apply: carry out the actions `decide()` chose for one run, one handler per action type.

Every handler is idempotent against the database: it re-reads what it changes under the run's lock and does
nothing when an earlier pass (or another orchestrator) already did it, so a pass interrupted half-way is
simply observed and decided again. Every change is recorded (a logbook entry with evidence) in the same
transaction as the change itself.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FuturesTimeout
from contextlib import AbstractContextManager, nullcontext
from functools import partial
from pathlib import Path
from typing import Any, Generic, TypeVar

from sqlalchemy.orm import Session, sessionmaker

from service.crud.checkpoints import checkpoint_path_problem, mark_checkpoint
from service.crud.decisions import RETIRE_HOSTS, close_decision, propose_decision
from service.crud.logbook import write_log
from service.crud.runs import (
    active_attempt,
    consume_restart_request,
    create_attempt,
    end_attempt,
    find_attempt,
    get_run,
    next_attempt_number,
    set_run_phase,
)
from service.crud.tokens import create_token, expire_attempt_tokens
from service.db import transaction
from service.metrics import ORCHESTRATOR_LAUNCHES_DEFERRED
from service.models import Attempt, Checkpoint, Run
from service.orchestrator.decide import (
    BAD_NODE_STATES,
    Action,
    CloseDecision,
    EndAttempt,
    Escalate,
    Launch,
    MarkFirstStep,
    ObservedRun,
    ProposeDecision,
    RetireHosts,
    SetPhase,
    WaitForHosts,
    failure_of,
)
from service.orchestrator.fault_points import fault_point
from service.orchestrator.health_gateway import HealthGateway
from service.orchestrator.launchers.base import (
    HEARTBEAT_INTERVAL_KEY,
    Launcher,
    LaunchRefused,
    LaunchSpec,
    build_trainer_args,
    launcher_for,
    start_recorded,
)
from service.orchestrator.leadership import LeadershipLost
from service.orchestrator.observe import AUTHOR, recorded_heartbeat_interval
from service.orchestrator.spool import drain_spool
from service.recovery.config import OrchestratorConfig
from service.recovery.detect import FailureClass
from service.statemachine import (
    CheckpointState,
    DecisionStatus,
    DesiredState,
    LogKind,
    Role,
    RunPhase,
    Severity,
)
from trainer import contract
from trainer.checkpoint import verify_checkpoint
from trainer.contract import EXIT_CHECKPOINT_CORRUPT, checkpoints_dir

log = logging.getLogger("trainops.orchestrator")

Pager = Callable[[int, str, dict[str, Any]], None]
Fence = Callable[[str], AbstractContextManager[None]]
"""A side effect outside the database runs inside `fence(what)` (leadership.fenced): only while this
orchestrator leads."""


def _datetime(value: float | None) -> dt.datetime | None:
    return dt.datetime.fromtimestamp(value, dt.UTC) if value is not None else None


def parse_faults(specs: Sequence[str], attempt: int, *, start_step: int = 0) -> list[str]:
    """Run-config fault specs are `ATTEMPT:SPEC` (inject SPEC into that attempt only) or a bare SPEC
    (attempt 1 only), so a fault does not fire again on the restarted attempt. `step=+N` is N steps after
    the attempt's restore point (`start_step`): where an attempt starts depends on how far the one before
    it trained before its failure was detected, so a fixed step may lie behind it and never fire."""
    chosen = []
    for spec in specs:
        head, sep, rest = spec.partition(":")
        if sep and head.isdigit():
            if int(head) == attempt:
                chosen.append(rest)
        elif attempt == 1:
            chosen.append(spec)
    return [re.sub(r"\bstep=\+(\d+)", lambda m: f"step={start_step + int(m[1])}", spec) for spec in chosen]


def launch_overrides(action: Launch) -> dict[str, Any]:
    """The overrides an attempt records and passes to the trainer: those set (the LR scale always)."""
    return {
        k: v
        for k, v in action.overrides.items()
        if (v is not None and v is not False and v != 0) or k == "lr_scale"
    }


def newest_attempt_that_trained(session: Session, *, before: Attempt | None) -> Attempt | None:
    """`before`, or the newest attempt ahead of it that stepped past its restore point, skipping those that
    did not (an attempt whose ranks found its restore point corrupt at load, exit 3, trained nothing)."""
    attempt = before
    while attempt is not None and (attempt.last_step or 0) <= (attempt.start_step or 0):
        attempt = find_attempt(session, run_id=attempt.run_id, number=attempt.number - 1)
    return attempt


_Key = TypeVar("_Key")
_Verdict = TypeVar("_Verdict")


class _OffPassChecks(Generic[_Key, _Verdict]):
    """Checks a launch needs, on worker threads of their own, one per run, keyed by what is checked (hosts,
    a checkpoint): when decide() picks another key meanwhile, the old check's verdict no longer matters."""

    def __init__(self, *, workers: int, name: str) -> None:
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)
        self._jobs: dict[int, tuple[_Key, Future[_Verdict]]] = {}

    def _job(self, run_id: int, key: _Key, check: Callable[[], _Verdict]) -> tuple[bool, Future[_Verdict]]:
        """(started now, the run's check of `key`), starting it unless it runs already."""
        job = self._jobs.get(run_id)
        if job is not None and job[0] == key:
            return False, job[1]
        if job is not None:
            job[1].cancel()  # another key was chosen: a check still queued is not run
        future = self._pool.submit(check)
        self._jobs[run_id] = (key, future)
        return True, future

    def _done(self, run_id: int) -> None:
        del self._jobs[run_id]

    def pending(self) -> dict[int, _Key]:
        """The checks still running, by run: what each is checking."""
        return {run_id: key for run_id, (key, future) in self._jobs.items() if not future.done()}

    def forget(self) -> None:
        """Another orchestrator leads: the checks it needs it starts itself."""
        for _, future in self._jobs.values():
            future.cancel()
        self._jobs.clear()

    def shutdown(self) -> None:
        self.forget()
        self._pool.shutdown(wait=False, cancel_futures=True)


class DeepChecks(_OffPassChecks[tuple[str, ...], dict[str, bool]]):
    """Deep diagnostics of a relaunch's hosts, on worker threads of their own.

    A deep sweep takes up to `deep_check_deadline_s` (120 s by default: GEMM, memory and all-reduce tests on
    every GPU). Run inside the pass, as before, it held up the detection of every other run for that long,
    which at fleet scale (a hardware failure a day per 1,000 hosts) is every run, every day. Now a launch
    that needs one starts it and waits pass after pass; the other runs are reconciled meanwhile."""

    def __init__(self, health: HealthGateway, *, workers: int = 4) -> None:
        super().__init__(workers=workers, name="trainops-deep-check")
        self.health = health

    def poll(
        self, run_id: int, hosts: tuple[str, ...], *, deadline_s: float
    ) -> tuple[bool, dict[str, bool] | None]:
        """(started now, the verdict per host once the check finished, else None). A check that raised
        raises here, once (the pass fails and is retried; the next poll starts a new check)."""
        check = partial(self.health.deep_check, hosts, deadline_s=deadline_s)
        started, future = self._job(run_id, hosts, check)
        if started or not future.done():
            return started, None
        self._done(run_id)
        return False, future.result()


class RestorePointChecks(_OffPassChecks[str, tuple[bool, str]]):
    """The metadata check of a relaunch's restore point, on worker threads of their own.

    It reads no file content, but it stats every file: about 16,000 at 8,192 ranks, each a round trip on a
    shared filesystem (0.2-6 s a check here, docs/benchmarks.md). A launch waits for its check once, at most
    for what is left of the pass's launch budget: a small checkpoint's check (milliseconds) finishes within
    it and the launch goes on in the same pass; a large one's goes on off the pass, and the launch waits for
    it pass after pass while every other run is reconciled and launched."""

    def __init__(self, *, workers: int = 2) -> None:
        super().__init__(workers=workers, name="trainops-restore-check")

    def poll(self, run_id: int, path: str, *, wait_s: float) -> tuple[bool, str] | None:
        """(ok, why) once the check of `path` finished, else None. The poll that starts a check waits up to
        `wait_s` for it; later polls do not wait (a check that outlived one pass's budget would otherwise
        take every pass's budget, and the launches after it in the pass would never get a turn). A check
        that raised raises here, once (the pass fails and is retried; the next poll starts a new check)."""
        started, future = self._job(run_id, path, lambda: verify_checkpoint(path, deep=False))
        try:
            verdict = future.result(timeout=max(0.0, wait_s) if started else 0.0)
        except FuturesTimeout:
            return None
        finally:
            if future.done():
                self._done(run_id)
        return verdict


class Applier:
    """The apply step of the reconcile loop: `apply(observed, actions)` runs each action's handler."""

    def __init__(
        self,
        session_factory: sessionmaker[Session],
        cfg: OrchestratorConfig,
        *,
        runs_dir: Path,
        launchers: Mapping[str, Launcher],
        health: HealthGateway,
        pager: Pager | None,
        trainer_env: Mapping[str, str],
        fence: Fence | None = None,
    ) -> None:
        self.factory = session_factory
        self.fence: Fence = fence or (lambda _what: nullcontext())
        self.cfg = cfg
        self.runs_dir = runs_dir
        self.launchers = launchers
        self.health = health
        self.pager = pager
        self.trainer_env = dict(trainer_env)
        self.waiting_since: dict[int, float] = {}
        """Per run, since when it waits for healthy hosts (logged once per wait; decide() reads it)."""
        self.deep_checks = DeepChecks(health)
        self.restore_checks = RestorePointChecks()
        self._launch_deadline = 0.0
        """Monotonic time by which the launch under way must give the pass back (its share of the budget)."""
        self.launch_spent_s = 0.0
        """Time this pass spent launching (`launch_budget_s`); `new_pass` resets it."""
        self.launched = 0
        self.deferred = 0
        self._handlers: dict[type[Action], Callable[[ObservedRun, Any], None]] = {
            WaitForHosts: self.wait_for_hosts,
            EndAttempt: self.end_attempt,
            Launch: self.launch,
            ProposeDecision: self.propose_decision,
            CloseDecision: self.close_decision,
            RetireHosts: self.retire_hosts,
            SetPhase: self.set_phase,
            Escalate: self.escalate,
            MarkFirstStep: self.mark_first_step,
        }

    def new_pass(self) -> None:
        """A reconcile pass starts: its launch budget is whole again."""
        self.launch_spent_s, self.launched, self.deferred = 0.0, 0, 0

    def apply(self, observed: ObservedRun, actions: Sequence[Action]) -> None:
        for action in actions:
            if not isinstance(action, WaitForHosts):
                self.waiting_since.pop(observed.run_id, None)  # any other action ends a wait
            self._handlers[type(action)](observed, action)

    def page(self, run_id: int, reason: str, evidence: dict[str, Any]) -> None:
        if self.pager is not None:
            try:
                self.pager(run_id, reason, evidence)
            except Exception:  # paging is best effort; the logbook entry is the record
                log.exception("paging on-call failed")

    def _end(
        self,
        session: Session,
        *,
        attempt: Attempt,
        exit_reason: str,
        exit_code: int | None,
        last_step: int | None,
        steps_lost: int | None,
        author: str,
        evidence: dict[str, Any],
    ) -> None:
        """End ``attempt`` (crud ``end_attempt``) and expire its trainer token after the replay grace: a
        token that outlived its attempt could feed the run (or, once it finished, its catalog) forever."""
        end_attempt(
            session,
            attempt=attempt,
            exit_reason=exit_reason,
            exit_code=exit_code,
            last_step=last_step,
            steps_lost=steps_lost,
            author=author,
            evidence=evidence,
        )
        expire_attempt_tokens(session, attempt=attempt, grace_s=self.cfg.trainer_token_grace_s)

    # ---- one handler per action ---------------------------------------------------------------------

    def wait_for_hosts(self, observed: ObservedRun, action: WaitForHosts) -> None:
        if observed.run_id in self.waiting_since:
            return
        self.waiting_since[observed.run_id] = observed.now
        with transaction(self.factory) as session:
            write_log(
                session,
                kind=LogKind.decision,
                severity=Severity.warning,
                author=AUTHOR,
                run_id=observed.run_id,
                message=f"waiting for healthy hosts: {action.available} free, {action.needed} needed "
                f"(deadline {self.cfg.remediation.hosts_wait_s:.0f} s)",
                evidence={"available": action.available, "needed": action.needed},
            )

    def set_phase(self, observed: ObservedRun, action: SetPhase) -> None:
        with transaction(self.factory) as session:
            run = get_run(session, run_id=observed.run_id, for_update=True)
            set_run_phase(
                session,
                run=run,
                target=action.target,
                reason=action.reason,
                author=AUTHOR,
                evidence=dict(action.evidence),
            )

    def mark_first_step(self, observed: ObservedRun, action: MarkFirstStep) -> None:
        with transaction(self.factory) as session:
            attempt = active_attempt(session, run_id=observed.run_id)
            if attempt is not None and attempt.first_step_at is None:
                first = (
                    min((b.time for b in observed.attempt.beats), default=time.time())
                    if observed.attempt
                    else time.time()
                )
                attempt.first_step_at = _datetime(first)

    def end_attempt(self, observed: ObservedRun, action: EndAttempt) -> None:
        assert observed.attempt is not None
        detected = time.time()
        with transaction(self.factory) as session:
            attempt = active_attempt(session, run_id=observed.run_id)
            info = dict(attempt.launcher or {}) if attempt else {}
        if action.kill and "tag" in info:
            with self.fence(f"kill attempt {observed.attempt.number} of run {observed.name}"):
                launcher_for(self.launchers, info).kill(info)
        drain_spool(
            self.factory, run_id=observed.run_id, run_dir=self.runs_dir / observed.name, author=AUTHOR
        )
        newest = max((c.step for c in observed.checkpoints if c.usable), default=None)
        with transaction(self.factory) as session:
            attempt = active_attempt(session, run_id=observed.run_id)
            if attempt is None or attempt.number != observed.attempt.number:
                return  # already ended by an earlier pass
            final = launcher_for(self.launchers, info).status(info) if "tag" in info else None
            code = action.exit_code
            if code is None and final is not None and final.state == "exited":
                code = final.exit_code
            attempt.findings = {
                **dict(action.evidence),
                "failure": action.outcome,
                "detail": action.reason,
                "newest_checkpoint_step": newest,
            }
            attempt.detected_at = _datetime(detected)
            attempt.last_progress_at = _datetime(action.last_progress_at)
            self._end(
                session,
                attempt=attempt,
                exit_reason=str(action.outcome),
                exit_code=code,
                last_step=observed.attempt.last_step,
                steps_lost=None,
                author=AUTHOR,
                evidence={"reason": action.reason, **dict(action.evidence)},
            )
            if code == EXIT_CHECKPOINT_CORRUPT:
                self._restore_point_failed_at_load(session, attempt=attempt)
            run = get_run(session, run_id=observed.run_id, for_update=True)
            if action.outcome == "stopped":
                set_run_phase(
                    session,
                    run=run,
                    target=RunPhase.stopped,
                    reason=action.reason,
                    author=AUTHOR,
                    kind=LogKind.action,
                )
            elif failure_of(str(action.outcome)) is not None and run.phase in (
                RunPhase.running,
                RunPhase.starting,
            ):
                set_run_phase(
                    session,
                    run=run,
                    target=RunPhase.restarting,
                    severity=Severity.warning,
                    reason=f"attempt {attempt.number}: {action.outcome}: {action.reason}",
                    author=AUTHOR,
                    evidence={"attempt": attempt.number, **dict(action.evidence)},
                )
        # the run's `node_retirement` gate: a lemon is cordoned and its retirement proposed, not carried out
        retire = "node_retirement" not in observed.approvals.require
        withheld: list[str] = []
        if action.cordon_hosts:
            with self.fence(f"cordon {', '.join(action.cordon_hosts)}"):
                withheld += self.health.cordon(
                    action.cordon_hosts,
                    reason=f"{action.outcome}: {action.reason}",
                    evidence=dict(action.evidence),
                    run_id=observed.run_id,
                    offence=action.offence,
                    retire=retire,
                )
        if action.blame_hosts:
            with self.fence(f"blame {', '.join(action.blame_hosts)}"):
                withheld += self.health.blame(
                    action.blame_hosts,
                    reason=f"{action.outcome} of run {observed.name}",
                    run_id=observed.run_id,
                    retire=retire,
                )
        if withheld:
            policy = observed.approvals
            self.propose_decision(
                observed,
                ProposeDecision(
                    ("node_retirement",),
                    f"retire {', '.join(withheld)}: past the lemon limit after {action.outcome} of attempt "
                    f"{observed.attempt.number}; cordoned meanwhile",
                    {"action": RETIRE_HOSTS, "hosts": withheld},
                    {"failure": str(action.outcome), "reason": action.reason},
                    timeout_s=policy.timeout_s,
                    on_timeout=policy.on_timeout,
                ),
            )

    def _restore_point_failed_at_load(self, session: Session, *, attempt: Attempt) -> None:
        """The attempt's ranks re-hashed its restore point at load, each its share, and found bytes that do
        not match the manifest (trainer exit 3): the metadata check before the launch cannot see that, so
        the checkpoint is marked corrupt here and the restart picks another."""
        ckpt = (
            session.get(Checkpoint, attempt.restored_from_checkpoint_id)
            if attempt.restored_from_checkpoint_id is not None
            else None
        )
        if ckpt is None or ckpt.state not in (CheckpointState.committed, CheckpointState.verified):
            return  # already marked, or deleted meanwhile
        mark_checkpoint(
            session,
            checkpoint_id=ckpt.id,
            author=AUTHOR,
            state=CheckpointState.corrupt,
            healthy=False,
            reason=f"attempt {attempt.number}'s ranks re-hashed it at load and its bytes do not match its "
            "manifest (trainer exit 3; each rank's finding is in the attempt's log); never restored again",
            evidence={
                "check": "ranks' re-hash at load",
                "attempt": attempt.number,
                "exit_code": EXIT_CHECKPOINT_CORRUPT,
                "path": ckpt.path,
            },
        )

    def escalate(self, observed: ObservedRun, action: Escalate) -> None:
        with transaction(self.factory) as session:
            run = get_run(session, run_id=observed.run_id, for_update=True)
            if action.close_decision is not None:
                self._close_decision(session, action.close_decision, attempt_number=None)
            if run.phase == RunPhase.needs_attention:
                if not run.pending_restart:
                    return  # already escalated and paged
                # An operator's restart of a run that needs attention cannot be carried out: say so and drop
                # it (the run stays where it is), rather than trying it again on every pass.
                write_log(
                    session,
                    kind=LogKind.failure,
                    severity=Severity.critical,
                    author=AUTHOR,
                    run_id=run.id,
                    message=f"operator restart not carried out: {action.reason}",
                    evidence={**dict(action.evidence), "dropped_pending_restart": dict(run.pending_restart)},
                )
            else:
                set_run_phase(
                    session,
                    run=run,
                    target=RunPhase.needs_attention,
                    reason=action.reason,
                    author=AUTHOR,
                    severity=Severity.critical,
                    evidence=dict(action.evidence),
                )
            run.pending_restart = None
        self.page(observed.run_id, action.reason, dict(action.evidence))

    def propose_decision(self, observed: ObservedRun, action: ProposeDecision) -> None:
        """Record the proposal (logbook included) and page: a human approves or rejects it."""
        with transaction(self.factory) as session:
            decision = propose_decision(
                session,
                run_id=observed.run_id,
                gates=action.gates,
                reason=action.reason,
                proposal=dict(action.proposal),
                evidence=dict(action.evidence),
                timeout_s=action.timeout_s,
                on_timeout=action.on_timeout,
                author=AUTHOR,
            )
            # the decision as recorded: a retirement may have joined a pending one (it names every host)
            decision_id, reason, proposal = decision.id, decision.reason, dict(decision.proposal or {})
        self.page(
            observed.run_id,
            f"run {observed.name}: decision {decision_id} awaits approval ({', '.join(action.gates)}): "
            f"{reason}. Approve or reject: trainops decisions approve|reject {decision_id}",
            {"decision": decision_id, "gates": list(action.gates), "proposal": proposal},
        )

    def retire_hosts(self, observed: ObservedRun, action: RetireHosts) -> None:
        """An answered retirement decision: retire the lemons (approved) or leave them cordoned."""
        if action.retire:
            with self.fence(f"retire {', '.join(action.hosts)}"):
                reason = f"lemon, retirement decided: {action.close.note}"
                self.health.retire(action.hosts, reason=reason, run_id=observed.run_id)
        with transaction(self.factory) as session:
            self._close_decision(session, action.close, attempt_number=None)

    def close_decision(self, observed: ObservedRun, action: CloseDecision) -> None:
        with transaction(self.factory) as session:
            self._close_decision(session, action, attempt_number=None)

    def _close_decision(self, session: Session, action: CloseDecision, *, attempt_number: int | None) -> None:
        close_decision(
            session,
            decision_id=action.decision_id,
            status_if_pending=DecisionStatus(action.status_if_pending),
            attempt_number=attempt_number,
            author=AUTHOR,
            note=action.note + (f" (attempt {attempt_number})" if attempt_number is not None else ""),
        )

    def launch(self, observed: ObservedRun, action: Launch) -> None:
        """Deep-check probation hosts, check the restore point's metadata, record the attempt (with its
        launcher's identifying info, before anything starts), then start it. Once this pass has spent its
        launch budget the launch is left to the next pass, which decides it again (nothing is recorded)."""
        if self.launched and self.launch_spent_s >= self.cfg.launch_budget_s:
            self.deferred += 1
            ORCHESTRATOR_LAUNCHES_DEFERRED.inc()
            return
        started = time.monotonic()
        self._launch_deadline = started + max(0.0, self.cfg.launch_budget_s - self.launch_spent_s)
        try:
            self._launch(observed, action)
        finally:
            self.launched += 1
            self.launch_spent_s += time.monotonic() - started

    def _launch(self, observed: ObservedRun, action: Launch) -> None:
        if action.deep_check and not self._hosts_pass_deep_check(observed, action):
            return  # the next pass sees their new states and picks other hosts
        if action.checkpoint is not None and not self._restore_point_intact(observed, action):
            return  # still being checked (the next pass looks again), or failed: the next pass chooses again
        recorded = self._record_attempt(observed, action)
        if recorded is None:
            return  # an attempt is already in progress
        launcher, spec, info = recorded
        self._start_attempt(observed, launcher, spec, info)

    # ---- the steps of a launch ----------------------------------------------------------------------

    def _hosts_pass_deep_check(self, observed: ObservedRun, action: Launch) -> bool:
        """True once the deep diagnostics of the launch's hosts finished and found every one fit; until they
        finish (on `deep_checks`' threads) the launch waits and the pass goes on to the next run."""
        with self.fence(f"deep-check {', '.join(action.hosts)}"):
            pass  # checked only: the diagnostics may take minutes, a new leader must not wait for them
        deadline_s = self.cfg.remediation.deep_check_deadline_s
        started, fit = self.deep_checks.poll(observed.run_id, action.hosts, deadline_s=deadline_s)
        if started:
            with transaction(self.factory) as session:
                write_log(
                    session,
                    kind=LogKind.action,
                    author=AUTHOR,
                    run_id=observed.run_id,
                    message=f"deep diagnostics before relaunch started on {', '.join(action.hosts)} "
                    f"(deadline {deadline_s:g} s); the relaunch waits for them",
                    evidence={"hosts": list(action.hosts), "deadline_s": deadline_s, "reason": action.reason},
                )
        if fit is None:
            return False
        unfit = sorted(h for h in action.hosts if not fit.get(h, False))
        with transaction(self.factory) as session:
            write_log(
                session,
                kind=LogKind.diagnosis,
                author=AUTHOR,
                run_id=observed.run_id,
                severity=Severity.warning if unfit else Severity.info,
                message=f"deep diagnostics before relaunch on {', '.join(action.hosts)}: "
                + (f"unfit: {', '.join(unfit)}" if unfit else "all passed"),
                evidence={"hosts": fit},
            )
        return not unfit

    def _restore_point_intact(self, observed: ObservedRun, action: Launch) -> bool:
        """True once the chosen checkpoint passed its metadata check: marker, manifest, every file present
        with its recorded size, every rank's digests present. No file content is read: re-hashing a 2.5 TB
        checkpoint in the loop would stall every other run's detection for tens of minutes; the full
        re-hash runs off the loop (`checkpoint_verify.py`) and marks a checkpoint whose bytes do not match
        `corrupt`, which is never a candidate. The metadata check itself runs on `restore_checks`' threads
        (a pass waits for it only within its launch budget). A checkpoint failing it is marked corrupt."""
        assert action.checkpoint is not None
        # Catalogued before the API confined paths, or found by some other route: never restore files from
        # outside this run's own checkpoint directory.
        outside = checkpoint_path_problem(
            action.checkpoint.path, checkpoint_dir=checkpoints_dir(self.runs_dir / observed.name)
        )
        if outside:
            ok, why = False, outside
        else:
            wait_s = self._launch_deadline - time.monotonic()
            verdict = self.restore_checks.poll(observed.run_id, action.checkpoint.path, wait_s=wait_s)
            if verdict is None:
                log.info(
                    "run %s: the metadata check of %s goes on off the pass; the relaunch waits for it",
                    observed.name,
                    action.checkpoint.path,
                )
                return False
            ok, why = verdict
        if not ok:
            with transaction(self.factory) as session:
                mark_checkpoint(
                    session,
                    checkpoint_id=action.checkpoint.id,
                    author=AUTHOR,
                    state=CheckpointState.corrupt,
                    healthy=False,
                    reason=f"failed its metadata check before restore: {why}",
                    evidence={"check": "metadata", "path": action.checkpoint.path, "failed": why},
                )
        return ok

    def _launcher_of_run(self, run: Run) -> Launcher:
        kind = str((run.config or {}).get("launcher", "local"))
        launcher = self.launchers.get(kind)
        if launcher is None:
            raise ValueError(
                f"run {run.name} asks for launcher {(run.config or {}).get('launcher')!r}, which this "
                f"orchestrator does not have ({', '.join(self.launchers)})"
            )
        return launcher

    def _launch_spec(
        self,
        observed: ObservedRun,
        *,
        run: Run,
        number: int,
        hosts: tuple[str, ...],
        resume_from: str | None,
        start_step: int,
        overrides: dict[str, Any],
        token: str,
        heartbeat_interval_s: float,
    ) -> LaunchSpec:
        config = run.config or {}
        run_dir = self.runs_dir / run.name
        return LaunchSpec(
            run_id=run.id,
            run_name=run.name,
            attempt=number,
            hosts=hosts,
            procs_per_host=int(config.get("procs_per_host", 1)),
            run_dir=run_dir,
            trainer_args=tuple(
                build_trainer_args(
                    config=config,
                    run_dir=run_dir,
                    resume_from=resume_from,
                    overrides=overrides,
                    faults=parse_faults(config.get("faults") or [], number, start_step=start_step),
                )
            ),
            env={
                **self.trainer_env,
                "TRAINOPS_TOKEN": token,
                contract.HEARTBEAT_INTERVAL_ENV: f"{heartbeat_interval_s:g}",
            },
            launcher_options=dict(config.get(str(config.get("launcher", "local"))) or {}),
            unfit_hosts=tuple(
                sorted(h for h, state in observed.node_states.items() if state in BAD_NODE_STATES)
            ),
        )

    def _record_attempt(
        self, observed: ObservedRun, action: Launch
    ) -> tuple[Launcher, LaunchSpec, dict[str, Any]] | None:
        """In one transaction: the attempt's trainer token, its launcher info, the run's phase, the attempt
        row, what carries over from the previous attempt, and the logbook decision. None when an attempt is
        already in progress."""
        overrides = launch_overrides(action)
        with transaction(self.factory) as session:
            run = get_run(session, run_id=observed.run_id, for_update=True)
            if active_attempt(session, run_id=run.id) is not None:
                return None
            launcher = self._launcher_of_run(run)
            number = next_attempt_number(session, run_id=run.id)
            token_row, token = create_token(
                session, name=f"{run.name}-attempt-{number}", role=Role.trainer, run_id=run.id
            )
            # every host of the pool counts, so that attempts launched at different times together stay
            # within the control plane's heartbeat budget
            interval = self.cfg.heartbeat_interval_for(len(observed.node_states))
            spec = self._launch_spec(
                observed,
                run=run,
                number=number,
                hosts=action.hosts,
                resume_from=action.checkpoint.path if action.checkpoint else None,
                start_step=action.checkpoint.step if action.checkpoint else 0,
                overrides=overrides,
                token=token,
                heartbeat_interval_s=interval,
            )
            info = {**launcher.prepare(spec), HEARTBEAT_INTERVAL_KEY: interval}
            if run.phase != RunPhase.starting:
                set_run_phase(session, run=run, target=RunPhase.starting, reason=action.reason, author=AUTHOR)
            attempt = create_attempt(
                session,
                run=run,
                hosts=action.hosts,
                restored_from_checkpoint_id=action.checkpoint.id if action.checkpoint else None,
                overrides=overrides,
                launcher=info,
                start_step=action.checkpoint.step if action.checkpoint else 0,
                author=AUTHOR,
            )
            token_row.attempt_id = attempt.id  # expired when the attempt ends (_end)
            self._carry_over(session, run=run, attempt=attempt, action=action, observed=observed)
            if action.close_decision is not None:
                self._close_decision(session, action.close_decision, attempt_number=number)
            write_log(
                session,
                kind=LogKind.decision,
                author=AUTHOR,
                run_id=run.id,
                message=f"attempt {number}: {action.reason}",
                evidence={
                    **dict(action.evidence),
                    "hosts": list(action.hosts),
                    "overrides": overrides,
                    "checkpoint": action.checkpoint.path if action.checkpoint else None,
                },
            )
        fault_point("attempt-recorded", attempt=number)
        return launcher, spec, info

    def _carry_over(
        self, session: Session, *, run: Run, attempt: Attempt, action: Launch, observed: ObservedRun
    ) -> None:
        """What the new attempt changes on the previous one (its lost steps) and on the run (restart count,
        standing LR scale and clip, the operator's restart request consumed, desired state)."""
        previous = find_attempt(session, run_id=run.id, number=attempt.number - 1)
        trained = newest_attempt_that_trained(session, before=previous)
        if trained is not None and trained.last_step is not None:
            # the steps past the new restore point are thrown away: the attempt that trained them loses them,
            # also when attempts in between never got going (an exit 3 at load sends the run further back)
            trained.steps_lost = max(0, trained.last_step - attempt.start_step)
        if previous is not None and failure_of(previous.exit_reason or "") is not None:
            run.restart_count += 1
        run.lr_scale = float(action.overrides.get("lr_scale") or run.lr_scale)
        if action.overrides.get("clip") is not None:
            run.clip_override = float(action.overrides["clip"])
        if action.consume_pending_restart:
            consume_restart_request(session, run=run, request=observed.pending_restart, author=AUTHOR)
        if run.desired_state != DesiredState.running:
            run.desired_state = DesiredState.running

    def _start_attempt(
        self, observed: ObservedRun, launcher: Launcher, spec: LaunchSpec, info: dict[str, Any]
    ) -> None:
        """Start the recorded attempt. A scheduler's refusal ends it (`_launch_refused`); any other error
        ends it as a crash and fails the pass (the loop counts it)."""
        try:
            with self.fence(f"start attempt {spec.attempt} of run {spec.run_name}"):
                started = launcher.start(spec, info)
        except LeadershipLost:
            raise  # not started: the leader that took over starts it (finish_interrupted_launch)
        except LaunchRefused as exc:
            self._launch_refused(observed, spec.attempt, launcher.kind, exc)
            return
        except Exception as exc:
            with transaction(self.factory) as session:
                attempt = active_attempt(session, run_id=observed.run_id)
                if attempt is not None:
                    self._end(
                        session,
                        attempt=attempt,
                        exit_reason="crash",
                        exit_code=None,
                        last_step=None,
                        steps_lost=None,
                        author=AUTHOR,
                        evidence={"launch_error": repr(exc)},
                    )
            raise
        fault_point("attempt-started", attempt=spec.attempt)
        with transaction(self.factory) as session:
            attempt = active_attempt(session, run_id=observed.run_id)
            if attempt is not None and attempt.number == spec.attempt:
                attempt.launcher = {**info, **started}

    def finish_interrupted_launch(self, observed: ObservedRun) -> bool:
        """An attempt recorded but whose start was never recorded: the orchestrator that launched it died (or
        was deposed) between the two. If its launcher finds the attempt's processes, they are adopted (their
        start is recorded); if not, it starts the attempt now, under the recorded number, hosts, restore
        point and overrides. Either way the attempt runs once. True when something was done."""
        if observed.attempt is None:
            return False
        with transaction(self.factory) as session:
            attempt = active_attempt(session, run_id=observed.run_id)
            if attempt is None or attempt.number != observed.attempt.number:
                return False
            info = dict(attempt.launcher or {})
            if "tag" not in info or start_recorded(info):
                return False
            launcher = launcher_for(self.launchers, info)
        find_started = getattr(launcher, "find_started", None)
        if find_started is None:  # this launcher cannot tell: its status decides, as for any attempt
            return False
        found = find_started(info)
        if found is not None:
            with transaction(self.factory) as session:
                attempt = active_attempt(session, run_id=observed.run_id)
                if attempt is None or attempt.number != observed.attempt.number:
                    return False
                attempt.launcher = {**info, **found}
                write_log(
                    session,
                    kind=LogKind.action,
                    author=AUTHOR,
                    run_id=observed.run_id,
                    message=f"attempt {attempt.number}: adopted; it had been started by an orchestrator that "
                    "stopped before recording it",
                    evidence={"found": found},
                )
            return True
        with transaction(self.factory) as session:
            run = get_run(session, run_id=observed.run_id, for_update=True)
            attempt = active_attempt(session, run_id=run.id)
            if attempt is None or attempt.number != observed.attempt.number:
                return False
            restore = (
                session.get(Checkpoint, attempt.restored_from_checkpoint_id)
                if attempt.restored_from_checkpoint_id is not None
                else None
            )
            # The recording orchestrator's token died with it (only its hash is stored): a new one, ending
            # with the attempt like the first.
            token_row, token = create_token(
                session, name=f"{run.name}-attempt-{attempt.number}", role=Role.trainer, run_id=run.id
            )
            token_row.attempt_id = attempt.id
            spec = self._launch_spec(
                observed,
                run=run,
                number=attempt.number,
                hosts=tuple(attempt.hosts),
                resume_from=restore.path if restore is not None else None,
                start_step=restore.step if restore is not None else 0,
                overrides=dict(attempt.overrides or {}),
                token=token,
                heartbeat_interval_s=recorded_heartbeat_interval(info) or self.cfg.heartbeat_interval_s,
            )
            write_log(
                session,
                kind=LogKind.action,
                author=AUTHOR,
                run_id=run.id,
                message=f"attempt {attempt.number}: starting it; the orchestrator that recorded it stopped "
                "before starting it",
                evidence={"hosts": list(attempt.hosts), "checkpoint": restore.path if restore else None},
            )
        self._start_attempt(observed, launcher, spec, info)
        return True

    def _launch_refused(self, observed: ObservedRun, number: int, kind: str, exc: LaunchRefused) -> None:
        """The scheduler refused the attempt. A permanent refusal (the run asks for something the cluster
        does not have) ends it as a configuration failure and the run needs an operator; a transient one
        ends it as a crash, which the restart policy retries with back-off within the restart budget."""
        outcome = FailureClass.config if exc.permanent else FailureClass.crash
        what = "permanent: the run needs attention" if exc.permanent else "transient: retrying"
        with transaction(self.factory) as session:
            attempt = active_attempt(session, run_id=observed.run_id)
            if attempt is None or attempt.number != number:
                return
            attempt.findings = {"failure": outcome.value, "detail": f"launch refused: {exc}"}
            self._end(
                session,
                attempt=attempt,
                exit_reason=outcome.value,
                exit_code=None,
                last_step=None,
                steps_lost=None,
                author=AUTHOR,
                evidence={"launch_error": str(exc), "permanent": exc.permanent},
            )
            write_log(
                session,
                kind=LogKind.failure,
                severity=Severity.error if exc.permanent else Severity.warning,
                author=AUTHOR,
                run_id=observed.run_id,
                message=f"attempt {number}: {kind} refused the launch ({what}): {exc}",
                evidence={"launch_error": str(exc), "permanent": exc.permanent},
            )
        if exc.permanent:
            self.escalate(
                observed,
                Escalate(
                    f"{kind} refused attempt {number}: {exc}; fix the run's {kind} settings, then restart it",
                    {"launch_error": str(exc)},
                ),
            )
