"""The reconcile loop: on a timer (or woken early), for each run: observe -> decide (pure) -> apply -> record.

Level-triggered: every pass looks at the whole state afresh, in the control plane's database (heartbeats
among it) and in the attempts' files (exit status), so a restarted orchestrator picks up where the last one
stopped: it adopts running attempts, learns how finished ones ended, and never launches a second attempt while
one is recorded as active.

Each run has its own error budget (as kopf's handlers do): a pass that raises is contained to its run (the
other runs go on), logged with its evidence and counted (`trainops_orchestrator_failed_passes_total`), and
the run's next pass waits out an exponential back-off. Transient errors (the database or the network,
`failing_passes.is_transient`) are waited out; any other error, or a transient one that lasts, spends the
budget (`failing_pass_limit` passes in a row), after which the run goes to needs_attention with the evidence
in its logbook and on-call is paged (`_escalate_failing_run`).

Several orchestrators may share one PostgreSQL database: given a `Leadership`, only the leader reconciles,
the others poll for the lead once per loop interval, and every write and side effect of a pass is fenced
(`leadership.py`); a pass whose leader was deposed stops at its next step (`LeadershipLost`).
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
import traceback
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from service.crud.logbook import write_log
from service.crud.runs import get_run, runs_to_reconcile, set_run_phase
from service.db import transaction
from service.metrics import (
    ORCHESTRATOR_FAILED_PASSES,
    ORCHESTRATOR_LEADER,
    ORCHESTRATOR_LEADERSHIP_CHANGES,
    ORCHESTRATOR_LOOP_DURATION,
    ORCHESTRATOR_RUNS_ESCALATED,
)
from service.orchestrator.apply import Applier, Pager
from service.orchestrator.checkpoint_verify import CheckpointVerifier
from service.orchestrator.decide import Action, ObservedRun, decide
from service.orchestrator.failing_passes import FailingPasses, RunPassFailures, describe
from service.orchestrator.health_gateway import HealthGateway
from service.orchestrator.launchers.base import Launcher
from service.orchestrator.leadership import (
    Leadership,
    LeadershipChange,
    LeadershipLost,
    fenced,
    fenced_sessions,
)
from service.orchestrator.observe import (
    AUTHOR,
    FleetView,
    observe_run,
    read_fleet,
    refresh_verdicts,
    sync_checkpoints,
)
from service.recovery.config import OrchestratorConfig
from service.statemachine import RUN_TRANSITIONS, LogKind, RunPhase, Severity

log = logging.getLogger("trainops.orchestrator")
# How long a stopping orchestrator waits for its queued pages to be posted (each retries for longer).
PAGE_FLUSH_AT_EXIT_S = 15.0


def traceback_tail(error: BaseException, *, frames: int = 6, limit: int = 4000) -> str:
    """The traceback's header and its innermost frames (where the error was raised), for the logbook."""
    lines = traceback.format_exception(error)
    if len(lines) > frames + 1:
        lines = [lines[0], "  ...\n", *lines[-frames:]]
    text = "".join(lines)
    return text if len(text) <= limit else lines[0] + text[-(limit - len(lines[0])) :]


class Orchestrator:
    def __init__(
        self,
        session_factory: sessionmaker[Session],
        cfg: OrchestratorConfig,
        *,
        launchers: Mapping[str, Launcher],
        health: HealthGateway,
        pager: Pager | None = None,
        trainer_env: dict[str, str] | None = None,
        leadership: Leadership | None = None,
    ) -> None:
        self.leadership = leadership
        """None: this orchestrator acts alone, unfenced (embedded tests); else it acts only while it leads."""
        self.factory = session_factory if leadership is None else fenced_sessions(session_factory, leadership)
        if leadership is not None and leadership.is_leader:  # SQLite: taken when the orchestrator was built
            ORCHESTRATOR_LEADER.set(1)
        self.cfg = cfg
        self.launchers = dict(launchers)
        self.health = health
        self.runs_dir = Path(cfg.runs_dir).resolve()
        # The applier's transactions are fenced like the loop's (a deposed leader records no attempt, no
        # phase); its side effects are fenced on the raw engine: nothing inside a `fenced` block may open a
        # fenced transaction (leadership.fenced), and the gateway's own writes there go through its factory.
        self.applier = Applier(
            self.factory,
            cfg,
            runs_dir=self.runs_dir,
            launchers=self.launchers,
            health=health,
            pager=pager,
            trainer_env=trainer_env or {},
            fence=lambda what: fenced(leadership, session_factory.kw["bind"], what),
        )
        self.failing_passes = FailingPasses(
            limit=cfg.failing_pass_limit,
            transient_patience_s=cfg.transient_failure_patience_s,
            backoff_base_s=cfg.loop_interval_s,
            backoff_max_s=cfg.failing_pass_backoff_max_s,
        )
        self.checkpoint_verifier = CheckpointVerifier(
            self.factory, cfg.checkpoint_verify, runs_dir=self.runs_dir, author=AUTHOR
        )
        """The full re-hash of committed checkpoints, on worker threads of its own (never in a pass)."""
        self._fleet: FleetView | None = None
        """The pool's nodes and busy hosts, read once per pass and again after a run's actions changed them
        (one read per run made a 100-run pass read 100 x 400 node rows)."""
        self._failing_side_steps: set[str] = set()
        """Side steps (the scheduler sync, a run's verdicts) failing now: their traceback is logged once."""
        self._wake = threading.Event()
        self._stop = threading.Event()

    @property
    def pager(self) -> Pager | None:
        return self.applier.pager

    @pager.setter
    def pager(self, pager: Pager | None) -> None:
        self.applier.pager = pager

    # ---- the timer ----------------------------------------------------------------------------------

    def run_forever(self) -> None:
        try:
            while not self._stop.is_set():
                started = time.monotonic()
                if self.leads():
                    try:
                        self.reconcile_once()
                    except LeadershipLost as lost:  # deposed mid-pass: the step was not taken
                        log.warning("reconcile pass stopped: %s", lost)
                        self.leads()
                    except Exception:  # e.g. the runs could not be listed: the next pass observes afresh
                        log.exception("reconcile pass failed")
                    ORCHESTRATOR_LOOP_DURATION.observe(time.monotonic() - started)
                self._wake.wait(self.cfg.loop_interval_s)
                self._wake.clear()
        finally:
            self.step_down()
            # Pages are posted off the loop (service/paging.py); give the queued ones a moment to go out.
            flush = getattr(self.applier.pager, "flush", None)
            if flush is not None and not flush(PAGE_FLUSH_AT_EXIT_S):
                log.error("orchestrator stopped with pages not yet delivered")

    def leads(self) -> bool:
        """Whether this orchestrator may reconcile now: it leads (taking the lead if it is free)."""
        if self.leadership is None:
            return True
        change = self.leadership.poll()
        if change is not None:
            self._leadership_changed(change)
        return self.leadership.is_leader

    def step_down(self) -> None:
        """Give up the lead (at shutdown): a standby takes over at its next poll, not after a lease."""
        if self.leadership is not None and self.leadership.is_leader:
            self.leadership.release()
            ORCHESTRATOR_LEADER.set(0)
            log.info("orchestrator stepped down; a standby takes over at its next poll")

    def leader_description(self) -> str:
        """Who leads, as the leader lock's session names it (PostgreSQL), for a standby's messages."""
        current_holder = getattr(self.leadership, "current_holder", None)
        try:
            holder = current_holder() if current_holder is not None else None
        except Exception:  # the database is unreachable: say so rather than fail the message
            return "unknown: the database did not answer"
        return str(holder) if holder is not None else "none now"

    def _leadership_changed(self, change: LeadershipChange) -> None:
        """Log a change of leader (the new leader's logbook entry names itself and its predecessor), set the
        gauge, and forget what this process remembered of runs while another orchestrator led."""
        ORCHESTRATOR_LEADERSHIP_CHANGES.labels(change="acquired" if change.acquired else "lost").inc()
        ORCHESTRATOR_LEADER.set(1 if change.acquired else 0)
        self.failing_passes.forget_except(set())
        self.applier.waiting_since.clear()
        self.applier.deep_checks.forget()
        self.applier.restore_checks.forget()
        self.checkpoint_verifier.forget()
        if not change.acquired:
            log.warning("orchestrator %s lost the lead (%s); standing by", change.holder, change.reason)
            return
        previous = str(change.previous) if change.previous else "unknown"
        log.info("orchestrator %s leads now (previous leader: %s)", change.holder, previous)
        try:
            with transaction(self.factory) as session:
                write_log(
                    session,
                    kind=LogKind.action,
                    author=AUTHOR,
                    message=f"orchestrator {change.holder} took the lead (previous leader: {previous}): "
                    f"{change.reason}",
                    evidence={
                        "holder": asdict(change.holder),
                        "previous": asdict(change.previous) if change.previous else None,
                        **change.evidence,
                    },
                )
        except LeadershipLost as lost:  # deposed again at once: the next poll says so
            log.warning("could not record taking the lead: %s", lost)
        except Exception:  # the database is down: leading goes on, the entry is lost (the log has it)
            log.exception("could not record taking the lead in the logbook")

    def wake(self) -> None:
        """Events may wake the loop early; they never decide anything."""
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self.checkpoint_verifier.shutdown()
        self.applier.deep_checks.shutdown()
        self.applier.restore_checks.shutdown()
        self._wake.set()

    # ---- one pass over every run --------------------------------------------------------------------

    def reconcile_once(self) -> dict[int, list[Action]]:
        """One pass: each run due (not waiting out a back-off) is reconciled; returns the actions applied
        per run reconciled without error."""
        self._sync_external_nodes()
        with transaction(self.factory) as session:
            run_ids = runs_to_reconcile(session)
        self.failing_passes.forget_except(set(run_ids))
        self._verify_checkpoints(run_ids)
        self.applier.new_pass()
        self._fleet = None
        done: dict[int, list[Action]] = {}
        for run_id in run_ids:
            if not self.failing_passes.due(run_id, time.time()):
                continue
            actions = self._reconcile_within_budget(run_id)
            if actions is not None:
                done[run_id] = actions
            if actions is None or actions:
                self._fleet = None  # hosts may have been taken, freed or cordoned: the next run reads afresh
        if self.applier.deferred:
            log.info(
                "launch budget (%.1f s) spent after %d launch(es): %d left to the next pass",
                self.cfg.launch_budget_s,
                self.applier.launched,
                self.applier.deferred,
            )
        return done

    def observe(self, run_id: int) -> ObservedRun:
        """Catalogue the run's checkpoints found on disk, refresh their verdicts, then read its state."""
        with transaction(self.factory) as session:
            sync_checkpoints(session, run_id=run_id, runs_dir=self.runs_dir)
        self._refresh_verdicts(run_id)
        with transaction(self.factory) as session:
            if self._fleet is None:
                self._fleet = read_fleet(session)
            return observe_run(
                session,
                run_id=run_id,
                runs_dir=self.runs_dir,
                cfg=self.cfg,
                launchers=self.launchers,
                waiting_for_hosts_since=self.applier.waiting_since.get(run_id),
                now=time.time(),
                fleet=self._fleet,
            )

    def _reconcile_within_budget(self, run_id: int) -> list[Action] | None:
        """Reconcile one run, containing any error to it: None when the pass failed (counted, backed off,
        escalated once the run's budget is spent)."""
        stage = "observe"
        try:
            observed = self.observe(run_id)
            if self.applier.finish_interrupted_launch(observed):
                observed = self.observe(run_id)  # the attempt's processes as they are now
            stage = "decide"
            actions = decide(observed, self.cfg)
            stage = "apply"
            self.applier.apply(observed, actions)
        except LeadershipLost:
            raise  # not the run's failure: this orchestrator must stop acting
        except Exception as error:
            self._pass_failed(run_id, error, stage=stage)
            return None
        ended = self.failing_passes.succeeded(run_id)
        if ended is not None:
            log.info("run %s reconciled again after %d failed pass(es)", run_id, ended.count)
        return actions

    def _pass_failed(self, run_id: int, error: Exception, *, stage: str) -> None:
        """Count a failed pass and log it (the traceback once per streak, then one line per retry); past
        the budget the run needs attention and on-call is paged."""
        verdict = self.failing_passes.failed(run_id, error, stage=stage, now=time.time())
        failures = verdict.failures
        ORCHESTRATOR_FAILED_PASSES.labels(stage=stage, transient=str(failures.transient).lower()).inc()
        retry_in_s = max(0.0, failures.retry_at - time.time())
        if failures.count == 1:
            log.exception("reconciling run %s failed (%s); retrying in %.1f s", run_id, stage, retry_in_s)
        else:
            log.warning(
                "reconciling run %s failed again (%s, %d in a row): %s; retrying in %.1f s",
                run_id,
                stage,
                failures.count,
                failures.last_error,
                retry_in_s,
            )
        if verdict.escalate:
            self._escalate_failing_run(run_id, error, failures)

    def _escalate_failing_run(self, run_id: int, error: Exception, failures: RunPassFailures) -> None:
        """The run's error budget is spent: needs_attention with the evidence in its logbook (an operator
        restart it could not carry out is dropped), and a page, once per streak."""
        reason = (
            f"the orchestrator failed {failures.count} consecutive reconcile passes of this run "
            f"(last in {failures.last_stage}): {failures.last_error}"
        )
        evidence: dict[str, Any] = {
            "error": failures.last_error,
            "stage": failures.last_stage,
            "failed_passes": failures.count,
            "transient": failures.transient,
            "failing_since": dt.datetime.fromtimestamp(failures.first_failed_at, dt.UTC).isoformat(),
            "traceback": traceback_tail(error),
        }
        try:
            with transaction(self.factory) as session:
                run = get_run(session, run_id=run_id, for_update=True)
                if run.pending_restart:
                    evidence["dropped_pending_restart"] = dict(run.pending_restart)
                    run.pending_restart = None  # a restart that cannot be carried out is not retried forever
                if RunPhase.needs_attention in RUN_TRANSITIONS[run.phase]:  # not already, not completed
                    set_run_phase(
                        session,
                        run=run,
                        target=RunPhase.needs_attention,
                        reason=reason,
                        author=AUTHOR,
                        severity=Severity.critical,
                        kind=LogKind.failure,
                        evidence=evidence,
                    )
                else:
                    write_log(
                        session,
                        kind=LogKind.failure,
                        severity=Severity.critical,
                        author=AUTHOR,
                        run_id=run_id,
                        message=reason,
                        evidence=evidence,
                    )
        except Exception:  # e.g. the database is down: the next failed pass tries to escalate again
            log.exception("could not record the failing passes of run %s", run_id)
            return
        self.failing_passes.mark_escalated(run_id)
        ORCHESTRATOR_RUNS_ESCALATED.inc()
        self.applier.page(run_id, reason, evidence)

    # ---- side steps that never hold up a run --------------------------------------------------------

    def _sync_external_nodes(self) -> None:
        """Scheduler-side drains and outages (an admin's Slurm drain, a node gone DOWN) become node states
        before anything is decided; gateways without an external scheduler have no `sync_external`."""
        sync = getattr(self.health, "sync_external", None)
        if sync is None:
            return
        try:
            with self.applier.fence("sync node states with the scheduler"):
                sync()
        except LeadershipLost:
            raise
        except Exception as error:  # an unreachable scheduler must not stop the loop; the next pass retries
            self._side_step_failed("scheduler-sync", "syncing node states with the scheduler failed", error)
        else:
            self._failing_side_steps.discard("scheduler-sync")

    def _verify_checkpoints(self, run_ids: list[int]) -> None:
        """Record the background checkpoint verifications that finished and start the next ones: catalog
        reads and writes only, never a byte of a checkpoint (`checkpoint_verify.py`)."""
        try:
            self.checkpoint_verifier.step(run_ids)
        except LeadershipLost:
            raise  # deposed: not a failing side step; the pass stops here
        except Exception as error:  # the catalog is unreachable: results are kept and recorded next pass
            self._side_step_failed("checkpoint-verify", "background checkpoint verification failed", error)
        else:
            self._failing_side_steps.discard("checkpoint-verify")

    def _refresh_verdicts(self, run_id: int) -> None:
        """Judge the run's undecided checkpoints and move the automatic pin. A failure here is logged and
        retried next pass; it never holds up the run's reconcile."""
        try:
            with transaction(self.factory) as session:
                refresh_verdicts(session, run_id=run_id, runs_dir=self.runs_dir, cfg=self.cfg)
        except LeadershipLost:
            raise
        except Exception as error:
            self._side_step_failed(f"verdicts:{run_id}", f"checkpoint verdicts of run {run_id} failed", error)
        else:
            self._failing_side_steps.discard(f"verdicts:{run_id}")

    def _side_step_failed(self, key: str, what: str, error: Exception) -> None:
        """Log a failing side step: with its traceback the first time, then one line per pass until it
        succeeds again (it is retried every pass; a traceback a second is noise, not evidence)."""
        if key in self._failing_side_steps:
            log.warning("%s again: %s", what, describe(error))
            return
        self._failing_side_steps.add(key)
        log.exception(what)
