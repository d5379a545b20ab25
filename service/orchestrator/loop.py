"""The reconcile loop: observe -> decide (pure) -> apply (idempotent) -> record, on a timer.

All state lives in the control plane's database and in the attempt's files (exit status, heartbeats), so a
restarted orchestrator picks up where the last one stopped: it adopts running attempts, learns how finished
ones ended, and never launches a second attempt while one is recorded as active.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from service.crud.checkpoints import CatalogSource, mark_checkpoint, register_checkpoint, upsert_checkpoint
from service.crud.logbook import write_log
from service.crud.runs import active_attempt, create_attempt, end_attempt, get_run, set_run_phase
from service.crud.telemetry import ingest_metrics
from service.crud.tokens import create_token
from service.db import transaction
from service.metrics import ORCHESTRATOR_LOOP_DURATION
from service.models import Attempt, Checkpoint, Metric, Node, Run
from service.orchestrator.decide import (
    BAD_NODE_STATES,
    Action,
    EndAttempt,
    EndedAttempt,
    Escalate,
    Launch,
    MarkFirstStep,
    ObservedAttempt,
    ObservedRun,
    SetPhase,
    WaitForHosts,
    decide,
    failure_of,
)
from service.orchestrator.failing_passes import FailingPasses
from service.orchestrator.health_gateway import HealthGateway
from service.orchestrator.launcher import (
    Launcher,
    LaunchRefused,
    LaunchSpec,
    ProcessStatus,
    build_trainer_args,
    read_rank_beats,
)
from service.recovery.config import OrchestratorConfig
from service.recovery.detect import FailureClass, RankBeat, Section
from service.recovery.restart_point import CheckpointCandidate
from service.recovery.samples import act_norm_lineage, attempt_samples, checkpoint_candidates, lineage_samples
from service.recovery.verdicts import refresh_checkpoint_verdicts
from service.statemachine import (
    RUN_TRANSITIONS,
    TERMINAL_PHASES,
    CheckpointState,
    DesiredState,
    LogKind,
    Role,
    RunPhase,
    Severity,
)
from trainer.contract import (
    SPOOL_PENDING_FILE,
    Spool,
    SpooledCheckpoint,
    SpooledMetricPoint,
    checkpoints_dir,
    parse_heartbeat,
    parse_spool_record,
    spool_dir,
)

log = logging.getLogger("trainops.orchestrator")
AUTHOR = "system:orchestrator"

Pager = Callable[[int, str, dict[str, Any]], None]


def _ts(value: dt.datetime | None) -> float | None:
    return value.timestamp() if value is not None else None


def _from_ts(value: float | None) -> dt.datetime | None:
    return dt.datetime.fromtimestamp(value, dt.UTC) if value is not None else None


def parse_faults(specs: Sequence[str], attempt: int) -> list[str]:
    """Run-config fault specs are `ATTEMPT:SPEC` (inject SPEC into that attempt only) or a bare SPEC
    (attempt 1 only), so a fault does not fire again on the restarted attempt."""
    chosen = []
    for spec in specs:
        head, sep, rest = spec.partition(":")
        if sep and head.isdigit():
            if int(head) == attempt:
                chosen.append(rest)
        elif attempt == 1:
            chosen.append(spec)
    return chosen


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
    ) -> None:
        self.factory = session_factory
        self.cfg = cfg
        self.launchers = dict(launchers)
        self.health = health
        self.pager = pager
        self.trainer_env = trainer_env or {}
        self.runs_dir = Path(cfg.runs_dir).resolve()
        self._waiting_since: dict[int, float] = {}
        self.failing_passes = FailingPasses(
            limit=cfg.failing_pass_limit,
            transient_patience_s=cfg.transient_failure_patience_s,
            backoff_base_s=cfg.loop_interval_s,
            backoff_max_s=cfg.failing_pass_backoff_max_s,
        )
        self._wake = threading.Event()
        self._stop = threading.Event()

    # ---- the loop -----------------------------------------------------------------------------------

    def run_forever(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self.reconcile_once()
            except Exception:  # one bad pass must not end the loop; the next pass observes afresh
                log.exception("reconcile pass failed")
            ORCHESTRATOR_LOOP_DURATION.observe(time.monotonic() - started)
            self._wake.wait(self.cfg.loop_interval_s)
            self._wake.clear()

    def wake(self) -> None:
        """Events may wake the loop early; they never decide anything."""
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def reconcile_once(self) -> dict[int, list[Action]]:
        self._sync_external_nodes()
        done: dict[int, list[Action]] = {}
        run_ids = self._runs_to_reconcile()
        self.failing_passes.forget_except(set(run_ids))
        for run_id in run_ids:
            if not self.failing_passes.due(run_id, time.time()):
                continue  # backing off after failed passes
            stage = "observe"
            try:
                self._sync_checkpoints(run_id)
                self._refresh_verdicts(run_id)
                observed = self.observe(run_id)
                stage = "decide"
                actions = decide(observed, self.cfg)
                stage = "apply"
                self.apply(observed, actions)
                done[run_id] = actions
            except Exception as error:
                log.exception("reconciling run %s failed (%s)", run_id, stage)
                self._pass_failed(run_id, error, stage=stage)
                continue
            ended = self.failing_passes.succeeded(run_id)
            if ended is not None:
                log.info("run %s reconciled again after %d failed pass(es)", run_id, ended.count)
        return done

    def _pass_failed(self, run_id: int, error: Exception, *, stage: str) -> None:
        """Count a failed pass; past `failing_pass_limit` the run needs attention and on-call is paged."""
        verdict = self.failing_passes.failed(run_id, error, stage=stage, now=time.time())
        if not verdict.escalate:
            return
        failures = verdict.failures
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
            "traceback": "".join(traceback.format_exception(error)[-6:])[-4000:],
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
        self._page(run_id, reason, evidence)

    def _sync_external_nodes(self) -> None:
        """Scheduler-side drains and outages (an admin's Slurm drain, a node gone DOWN) become node states
        before anything is decided; gateways without an external scheduler have no `sync_external`."""
        sync = getattr(self.health, "sync_external", None)
        if sync is None:
            return
        try:
            sync()
        except Exception:  # the scheduler being unreachable must not stop the loop; the next pass retries
            log.exception("syncing node states with the scheduler failed")

    def _runs_to_reconcile(self) -> list[int]:
        with transaction(self.factory) as session:
            active = sa.select(Attempt.run_id).where(Attempt.ended_at.is_(None))
            query = sa.select(Run.id).where(
                sa.or_(
                    Run.id.in_(active),
                    sa.and_(Run.desired_state == DesiredState.running, Run.phase != RunPhase.completed),
                    sa.and_(
                        Run.desired_state == DesiredState.stopped, Run.phase.not_in(list(TERMINAL_PHASES))
                    ),
                )
            )
            return list(session.scalars(query.order_by(Run.id)))

    def launcher_for(self, info: Mapping[str, Any]) -> Launcher:
        """The launcher that started an attempt (its kind is stored with the attempt)."""
        return self.launchers[str(info.get("kind", "local"))]

    def run_dir(self, run: Run) -> Path:
        return self.runs_dir / run.name

    # ---- observe ------------------------------------------------------------------------------------

    def observe(self, run_id: int) -> ObservedRun:
        now = time.time()
        with transaction(self.factory) as session:
            run = get_run(session, run_id=run_id)
            run_dir = self.run_dir(run)
            attempts = list(
                session.scalars(sa.select(Attempt).where(Attempt.run_id == run_id).order_by(Attempt.number))
            )
            current = next((a for a in attempts if a.ended_at is None), None)
            history = tuple(
                EndedAttempt(
                    number=a.number,
                    hosts=tuple(a.hosts),
                    ended_at=_ts(a.ended_at) or now,
                    outcome=a.exit_reason or "lost",
                    findings=a.findings or {},
                    newest_checkpoint_step=(a.findings or {}).get("newest_checkpoint_step"),
                )
                for a in attempts
                if a.ended_at is not None
            )
            node_rows = list(session.scalars(sa.select(Node)))
            nodes = {n.hostname: n.state for n in node_rows}
            busy: set[str] = set()
            for a in session.scalars(
                sa.select(Attempt).where(Attempt.ended_at.is_(None), Attempt.run_id != run_id)
            ):
                busy.update(a.hosts)
            checkpoints = self._candidates(session, run_id)
            observed_attempt = self._observe_attempt(session, run, current, run_dir, now) if current else None
            act_norms = self._act_norm_lineage(session, run_id, min((c.step for c in checkpoints), default=0))
            cfg = run.config or {}
            return ObservedRun(
                run_id=run.id,
                name=run.name,
                desired=run.desired_state,
                phase=run.phase,
                target_steps=int(cfg.get("target_steps", 1)),
                checkpoint_interval=int(cfg.get("checkpoint_interval") or 0),
                host_count=int(cfg.get("host_count", 1)),
                max_restarts=int(cfg.get("max_restarts", self.cfg.remediation.max_restarts)),
                lr_scale=run.lr_scale,
                lr_override=run.lr_override,
                clip_override=run.clip_override,
                pending_restart=run.pending_restart,
                now=now,
                attempt=observed_attempt,
                history=history,
                node_states=nodes,
                busy_hosts=frozenset(busy),
                checkpoints=tuple(checkpoints),
                act_norms=act_norms,
                node_changed_at={n.hostname: n.state_changed_at.timestamp() for n in node_rows},
                waiting_for_hosts_since=self._waiting_since.get(run_id),
                step_times=self._step_times(session, run_id),
                hang_overrides={k: float(v) for k, v in (cfg.get("hang") or {}).items() if v is not None},
            )

    def _step_times(self, session: Session, run_id: int) -> tuple[float, ...]:
        """The run's newest step times (any attempt), oldest first: what its hang limits are calibrated on."""
        rows = session.scalars(
            sa.select(Metric.step_time_s)
            .where(Metric.run_id == run_id, Metric.step_time_s.is_not(None))
            .order_by(Metric.step.desc(), Metric.attempt.desc())
            .limit(self.cfg.hang.step_time_window)
        ).all()
        return tuple(float(t) for t in reversed(rows) if t is not None and math.isfinite(t))

    def _observe_attempt(
        self, session: Session, run: Run, attempt: Attempt, run_dir: Path, now: float
    ) -> ObservedAttempt:
        info = attempt.launcher or {}
        started = _ts(attempt.started_at) or now
        if "tag" not in info:
            status = ProcessStatus("lost", detail="the launch was not recorded")
        else:
            status = self.launcher_for(info).status(info)
            if status.allocated_hosts and set(status.allocated_hosts) != set(attempt.hosts):
                self._record_allocation(session, run, attempt, status.allocated_hosts)
        beats = tuple(_rank_beat(b) for b in read_rank_beats(run_dir, since=started))
        samples = attempt_samples(session, run_id=run.id, attempt=attempt.number)
        last_step = max([b.step for b in beats] + [s.step for s in samples], default=None)
        lineage = lineage_samples(
            session,
            run_id=run.id,
            attempt=attempt.number,
            upto=attempt.start_step or 0,
            divergence=self.cfg.divergence,
        )
        return ObservedAttempt(
            number=attempt.number,
            hosts=tuple(attempt.hosts),
            started_at=started,
            world_size=int(info.get("world_size", len(attempt.hosts))),
            process=status,
            beats=beats,
            samples=samples,
            lineage=lineage,
            last_step=last_step,
            first_step_seen=attempt.first_step_at is not None,
        )

    def _record_allocation(
        self, session: Session, run: Run, attempt: Attempt, allocated: Sequence[str]
    ) -> None:
        """The scheduler placed the attempt itself (Slurm `placement: exclude`): its hosts are the
        allocation, so busy hosts, hang blame and the next attempt's locality follow where it really runs."""
        write_log(
            session,
            kind=LogKind.action,
            author=AUTHOR,
            run_id=run.id,
            message=f"attempt {attempt.number}: the scheduler placed it on {', '.join(allocated)} "
            f"(the orchestrator had picked {', '.join(attempt.hosts)})",
            evidence={"allocated": list(allocated), "picked": list(attempt.hosts)},
        )
        attempt.hosts = list(allocated)

    def _candidates(self, session: Session, run_id: int) -> list[CheckpointCandidate]:
        return checkpoint_candidates(session, run_id=run_id)

    def _act_norm_lineage(self, session: Session, run_id: int, from_step: int) -> dict[int, float]:
        return act_norm_lineage(session, run_id=run_id, from_step=from_step)

    def _sync_checkpoints(self, run_id: int) -> None:
        """Catalogue the committed checkpoints found on disk: those the trainer could not report (control
        plane down while it saved), and re-saves the catalog has not heard of yet. The same idempotent upsert
        as the trainer's registration, with the record read from the checkpoint itself (meta.json,
        manifest), so the two converge in either order; a path whose checksum the catalog already has
        costs nothing more than reading its manifest."""
        from trainer.checkpoint import catalog_record, list_checkpoints, read_checksum

        with transaction(self.factory) as session:
            run = get_run(session, run_id=run_id)
            known = dict(
                session.execute(
                    sa.select(Checkpoint.path, Checkpoint.checksum).where(Checkpoint.run_id == run_id)
                ).all()
            )
            for info in list_checkpoints(checkpoints_dir(self.run_dir(run)), deep=False):
                if not info.ok:
                    continue
                checksum = read_checksum(info.path)
                if str(info.path) in known and known[str(info.path)] == checksum:
                    continue
                try:
                    record = catalog_record(info.path, info.step, info.meta, checksum)
                except OSError:  # deleted by retention while we looked
                    continue
                upsert_checkpoint(
                    session, run_id=run_id, data=record, source=CatalogSource.disk, author=AUTHOR
                )

    def _refresh_verdicts(self, run_id: int) -> None:
        """Judge the run's undecided checkpoints and move the automatic pin (`verdicts.py`). A failure here
        is logged and retried next pass; it never holds up the run's reconcile."""
        try:
            with transaction(self.factory) as session:
                run = get_run(session, run_id=run_id)
                refresh_checkpoint_verdicts(
                    session, run_id=run_id, checkpoint_dir=checkpoints_dir(self.run_dir(run)), cfg=self.cfg
                )
        except Exception:
            log.exception("checkpoint verdicts of run %s failed", run_id)

    # ---- apply and record ---------------------------------------------------------------------------

    def apply(self, observed: ObservedRun, actions: Sequence[Action]) -> None:
        for action in actions:
            if isinstance(action, WaitForHosts):
                self._wait_for_hosts(observed, action)
                continue
            self._waiting_since.pop(observed.run_id, None)
            if isinstance(action, EndAttempt):
                self._end_attempt(observed, action)
            elif isinstance(action, Launch):
                self._launch(observed, action)
            elif isinstance(action, SetPhase):
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
            elif isinstance(action, Escalate):
                self._escalate(observed, action)
            elif isinstance(action, MarkFirstStep):
                with transaction(self.factory) as session:
                    attempt = active_attempt(session, run_id=observed.run_id)
                    if attempt is not None and attempt.first_step_at is None:
                        first = (
                            min((b.time for b in observed.attempt.beats), default=time.time())
                            if observed.attempt
                            else time.time()
                        )
                        attempt.first_step_at = _from_ts(first)

    def _wait_for_hosts(self, observed: ObservedRun, action: WaitForHosts) -> None:
        if observed.run_id in self._waiting_since:
            return
        self._waiting_since[observed.run_id] = observed.now
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

    def _end_attempt(self, observed: ObservedRun, action: EndAttempt) -> None:
        assert observed.attempt is not None
        detected = time.time()
        with transaction(self.factory) as session:
            attempt = active_attempt(session, run_id=observed.run_id)
            info = dict(attempt.launcher or {}) if attempt else {}
        if action.kill and "tag" in info:
            self.launcher_for(info).kill(info)
        self._drain_spool(observed.run_id)
        newest = max((c.step for c in observed.checkpoints if c.usable), default=None)
        with transaction(self.factory) as session:
            attempt = active_attempt(session, run_id=observed.run_id)
            if attempt is None or attempt.number != observed.attempt.number:
                return  # already ended by an earlier pass
            final = self.launcher_for(info).status(info) if "tag" in info else None
            code = action.exit_code
            if code is None and final is not None and final.state == "exited":
                code = final.exit_code
            attempt.findings = {
                **dict(action.evidence),
                "failure": action.outcome,
                "detail": action.reason,
                "newest_checkpoint_step": newest,
            }
            attempt.detected_at = _from_ts(detected)
            attempt.last_progress_at = _from_ts(action.last_progress_at)
            end_attempt(
                session,
                attempt=attempt,
                exit_reason=str(action.outcome),
                exit_code=code,
                last_step=observed.attempt.last_step,
                steps_lost=None,
                author=AUTHOR,
                evidence={"reason": action.reason, **dict(action.evidence)},
            )
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
        if action.cordon_hosts:
            self.health.cordon(
                action.cordon_hosts,
                reason=f"{action.outcome}: {action.reason}",
                evidence=dict(action.evidence),
                run_id=observed.run_id,
                offence=action.offence,
            )
        if action.blame_hosts:
            self.health.blame(
                action.blame_hosts, reason=f"{action.outcome} of run {observed.name}", run_id=observed.run_id
            )

    def _drain_spool(self, run_id: int) -> None:
        """Store what the ended attempt's reporter could not deliver (control plane down when it exited).

        Its processes are gone, so nothing else touches the spool now; ingestion is idempotent, so records
        that did arrive before are harmless duplicates."""
        from service.schemas import METRIC_POINT, CheckpointCreate

        with transaction(self.factory) as session:
            run_spool_dir = spool_dir(self.run_dir(get_run(session, run_id=run_id)))
        if not (run_spool_dir / SPOOL_PENDING_FILE).exists():
            return
        spool = Spool(run_spool_dir)
        records = spool.read()
        if not records:
            return
        by_attempt: dict[int, list[dict[str, Any]]] = {}
        bodies: list[dict[str, Any]] = []
        unreadable = 0
        for record in records:  # the reporter's spool format (trainer.contract)
            try:
                spooled = parse_spool_record(record)
                if isinstance(spooled, SpooledMetricPoint):
                    point = dict(METRIC_POINT.validate_python(spooled.point))
                    by_attempt.setdefault(spooled.attempt, []).append(point)
                elif isinstance(spooled, SpooledCheckpoint):
                    bodies.append(CheckpointCreate.model_validate(spooled.body).model_dump())
            except (KeyError, TypeError, ValueError):  # never let one bad line block ending the attempt
                unreadable += 1
        with transaction(self.factory) as session:
            for attempt_number, points in by_attempt.items():
                ingest_metrics(session, run_id=run_id, attempt=attempt_number, points=points)
            for body in bodies:
                register_checkpoint(session, run_id=run_id, data=body)
            write_log(
                session,
                kind=LogKind.action,
                author=AUTHOR,
                run_id=run_id,
                severity=Severity.warning if unreadable else Severity.info,
                message=f"stored {sum(map(len, by_attempt.values()))} metric point(s) and {len(bodies)} "
                "checkpoint(s) the trainer had spooled while the control plane was unreachable"
                + (f"; {unreadable} unreadable record(s) skipped" if unreadable else ""),
                evidence={"records": len(records), "unreadable": unreadable, "spool": str(spool.path)},
            )
        spool.drop_first(len(records))

    def _escalate(self, observed: ObservedRun, action: Escalate) -> None:
        with transaction(self.factory) as session:
            run = get_run(session, run_id=observed.run_id, for_update=True)
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
        self._page(observed.run_id, action.reason, dict(action.evidence))

    def _page(self, run_id: int, reason: str, evidence: dict[str, Any]) -> None:
        if self.pager is not None:
            try:
                self.pager(run_id, reason, evidence)
            except Exception:  # paging is best effort; the logbook entry is the record
                log.exception("paging on-call failed")

    def _launch(self, observed: ObservedRun, action: Launch) -> None:
        from trainer.checkpoint import verify_checkpoint

        if action.deep_check:
            fit = self.health.deep_check(action.hosts, deadline_s=self.cfg.remediation.deep_check_deadline_s)
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
            if unfit:
                return  # the next pass sees their new states and picks other hosts
        if action.checkpoint is not None:
            ok, why = verify_checkpoint(action.checkpoint.path, deep=True)
            if not ok:
                with transaction(self.factory) as session:
                    mark_checkpoint(
                        session,
                        checkpoint_id=action.checkpoint.id,
                        author=AUTHOR,
                        state=CheckpointState.corrupt,
                        healthy=False,
                        reason=f"failed verification before restore: {why}",
                    )
                return  # the next pass chooses again without it
        overrides = {
            k: v
            for k, v in action.overrides.items()
            if (v is not None and v is not False and v != 0) or k == "lr_scale"
        }
        with transaction(self.factory) as session:
            run = get_run(session, run_id=observed.run_id, for_update=True)
            if active_attempt(session, run_id=run.id) is not None:
                return
            number = (
                session.scalar(sa.select(sa.func.max(Attempt.number)).where(Attempt.run_id == run.id)) or 0
            ) + 1
            run_dir = self.run_dir(run)
            cfg = run.config or {}
            _, secret = create_token(
                session, name=f"{run.name}-attempt-{number}", role=Role.trainer, run_id=run.id
            )
            spec = LaunchSpec(
                run_id=run.id,
                run_name=run.name,
                attempt=number,
                hosts=action.hosts,
                procs_per_host=int(cfg.get("procs_per_host", 1)),
                run_dir=run_dir,
                trainer_args=tuple(
                    build_trainer_args(
                        config=cfg,
                        run_dir=run_dir,
                        resume_from=action.checkpoint.path if action.checkpoint else None,
                        overrides=overrides,
                        faults=parse_faults(cfg.get("faults") or [], number),
                    )
                ),
                env={**self.trainer_env, "TRAINOPS_TOKEN": secret},
                launcher_options=dict(cfg.get(str(cfg.get("launcher", "local"))) or {}),
                unfit_hosts=tuple(
                    sorted(h for h, state in observed.node_states.items() if state in BAD_NODE_STATES)
                ),
            )
            launcher = self.launchers.get(str(cfg.get("launcher", "local")))
            if launcher is None:
                raise ValueError(
                    f"run {run.name} asks for launcher {cfg.get('launcher')!r}, which this "
                    f"orchestrator does not have ({', '.join(self.launchers)})"
                )
            info = launcher.prepare(spec)
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
            previous = session.scalar(
                sa.select(Attempt).where(Attempt.run_id == run.id, Attempt.number == number - 1)
            )
            if previous is not None and previous.last_step is not None:
                previous.steps_lost = max(0, previous.last_step - attempt.start_step)
            if previous is not None and failure_of(previous.exit_reason or "") is not None:
                run.restart_count += 1
            run.lr_scale = float(action.overrides.get("lr_scale") or run.lr_scale)
            if action.overrides.get("clip") is not None:
                run.clip_override = float(action.overrides["clip"])
            if action.consume_pending_restart:
                run.pending_restart = None
            if run.desired_state != DesiredState.running:
                run.desired_state = DesiredState.running
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
        try:
            started = launcher.start(spec, info)
        except LaunchRefused as exc:
            self._launch_refused(observed, number, launcher.kind, exc)
            return
        except Exception as exc:
            with transaction(self.factory) as session:
                attempt = active_attempt(session, run_id=observed.run_id)
                if attempt is not None:
                    end_attempt(
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
        with transaction(self.factory) as session:
            attempt = active_attempt(session, run_id=observed.run_id)
            if attempt is not None and attempt.number == number:
                attempt.launcher = {**info, **started}

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
            end_attempt(
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
            self._escalate(
                observed,
                Escalate(
                    f"{kind} refused attempt {number}: {exc}; fix the run's {kind} settings, then restart it",
                    {"launch_error": str(exc)},
                ),
            )


def _rank_beat(beat: Mapping[str, Any]) -> RankBeat:
    """A rank's heartbeat file (trainer.contract.parse_heartbeat) as decide() sees it; files written before
    sections existed read as `step`."""
    record = parse_heartbeat(beat)
    return RankBeat(
        rank=record["rank"],
        host=record["host"],
        step=record["step"],
        time=record["time"],
        step_time_s=record["step_time_s"],
        section=Section(record["section"]),
        last_step_s=record["last_step_s"],
        busy=tuple((int(step), float(busy_s)) for step, busy_s in record["busy_s"]),
    )
