"""Control side: fan checks out to host queues, gather with a deadline, store, judge, cordon.

:func:`run_sweep` is what the orchestrator (before a restart), the API and Celery beat call. It writes
every result to ``diagnostics``, reports hosts that missed the deadline as a finding, applies the cordon
policy through ``transition_node`` (the logbook says why and who decided) and mirrors cordons to the
configured scheduler adapters.
"""

from __future__ import annotations

import datetime as dt
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from celery.exceptions import TimeoutError as CeleryTimeout
from sqlalchemy.orm import Session, sessionmaker

from health.celery_app import HealthCelery
from health.celery_app import app as default_app
from health.checks import ALL_CHECKS, CROSS_HOST_CHECK
from health.config import host_queue
from health.results import CheckResult, CheckStatus, Fault, HostReport, Level
from service.crud.diagnostics import list_diagnostics, record_diagnostic
from service.crud.nodes import get_node, list_nodes, recent_offences, record_offence, transition_node
from service.db import transaction
from service.fleet.fabric import FABRIC_CHECKS, run_fabric_check
from service.fleet.policy import CordonRules, Decision, Offence, Verdict, classify, decide, decide_offence
from service.fleet.scheduler import SchedulerAdapter, record_scheduler_failure
from service.models import Node, utcnow
from service.statemachine import DiagnosticStatus, LogKind, NodeState

WORKER_CHECK = "health.worker"
FABRIC_SHARE_OF_DEADLINE = 0.5
"""Of a deep sweep's deadline, the most the cross-host check may take when per-host checks follow."""


@dataclass(kw_only=True)
class HostOutcome:
    host: str
    verdict: Verdict
    previous_state: NodeState
    state: NodeState
    reason: str
    results: int
    retirement_withheld: bool = False  # a lemon kept cordoned: its retirement waits for a human


@dataclass(kw_only=True)
class SweepReport:
    """What a sweep found and did."""

    sweep_id: str
    level: Level
    started_at: dt.datetime
    finished_at: dt.datetime
    deadline_s: float
    hosts: list[HostOutcome] = field(default_factory=list)
    results_ingested: int = 0
    unknown_hosts: list[str] = field(default_factory=list)
    adapter_errors: list[str] = field(default_factory=list)

    def _with(self, verdicts: set[Verdict]) -> list[str]:
        return [h.host for h in self.hosts if h.verdict in verdicts]

    @property
    def missed(self) -> list[str]:
        return self._with({Verdict.missed})

    def in_state(self, state: NodeState) -> list[str]:
        return [h.host for h in self.hosts if h.state is state]

    @property
    def changed(self) -> list[HostOutcome]:
        return [h for h in self.hosts if h.state is not h.previous_state]

    def summary(self) -> dict[str, Any]:
        return {
            "sweep_id": self.sweep_id,
            "level": self.level.value,
            "hosts": len(self.hosts),
            "results_ingested": self.results_ingested,
            "missed_deadline": self.missed,
            "changed": {h.host: f"{h.previous_state.value}->{h.state.value}" for h in self.changed},
            "unknown_hosts": self.unknown_hosts,
            "seconds": (self.finished_at - self.started_at).total_seconds(),
        }

    def to_json(self) -> dict[str, Any]:
        return {
            **self.summary(),
            "started_at": self.started_at.isoformat(),
            "finished_at": self.finished_at.isoformat(),
            "deadline_s": self.deadline_s,
            "adapter_errors": self.adapter_errors,
            "outcomes": [
                {
                    "host": h.host,
                    "verdict": h.verdict.value,
                    "previous_state": h.previous_state.value,
                    "state": h.state.value,
                    "reason": h.reason,
                    "results": h.results,
                }
                for h in self.hosts
            ],
        }


def _targets(
    session_factory: sessionmaker[Session], hosts: Sequence[str] | None, default_gpus: int
) -> tuple[dict[str, int], list[str]]:
    """host -> expected GPU count for the hosts to sweep (all non-retired ones when ``hosts`` is None)."""
    with transaction(session_factory) as session:
        if hosts is None:
            states = [s for s in NodeState if s is not NodeState.retired]
            nodes, _ = list_nodes(session, states=states, limit=1_000_000)
        else:
            nodes, _ = list_nodes(session, hostnames=list(hosts), limit=1_000_000)
        found = {n.hostname: (len(n.gpus) or default_gpus) for n in nodes}
    unknown = sorted(set(hosts or ()) - set(found))
    return found, unknown


def _stored(result: CheckResult, worker: str | None) -> dict[str, Any]:
    return {
        "faults": list(result.faults),
        "duration_s": result.duration_s,
        "worker": worker,
        "data": result.measurements,
    }


def _result_from_row(
    kind: str, status: DiagnosticStatus, reason: str | None, measurements: dict[str, Any]
) -> CheckResult:
    return CheckResult(
        check=kind,
        status=CheckStatus(status.value) if status.value in CheckStatus.__members__ else CheckStatus.error,
        reason=reason or status.value,
        faults=list(measurements.get("faults", [])),
    )


def history_of(session: Session, *, hostname: str, exclude_sweep: str, rules: CordonRules) -> list[Verdict]:
    """Verdicts of this host's previous sweeps, newest first, re-judged from ``diagnostics`` by ``rules``."""
    rows, _ = list_diagnostics(
        session, hostname=hostname, limit=rules.history_sweeps() * (len(ALL_CHECKS) + len(FABRIC_CHECKS) + 1)
    )
    by_sweep: dict[str, tuple[Level, list[CheckResult]]] = {}
    for diag, _host in rows:
        if diag.sweep_id is None or diag.sweep_id == exclude_sweep:
            continue
        level = Level(diag.level) if diag.level in Level.__members__ else Level.quick
        by_sweep.setdefault(diag.sweep_id, (level, []))[1].append(
            _result_from_row(diag.kind, diag.status, diag.reason, diag.measurements or {})
        )
    # Insertion order follows the rows: newest sweep first. The oldest may be cut by the limit; drop it.
    verdicts = [classify(results, level, rules)[0] for level, results in by_sweep.values()]
    return verdicts[: rules.history_sweeps()]


def _apply(session: Session, *, node: Node, decision: Decision, author: str, sweep_id: str | None) -> None:
    if decision.target is None or decision.target is node.state:
        return
    transition_node(
        session,
        node=node,
        target=decision.target,
        reason=decision.reason,
        author=author,
        evidence={**decision.evidence, "sweep_id": sweep_id},
        kind=LogKind.decision,
    )


def ingest_host(
    session_factory: sessionmaker[Session],
    *,
    host: str,
    level: Level,
    results: list[CheckResult],
    worker: str | None,
    sweep_id: str,
    rules: CordonRules,
    author: str,
) -> HostOutcome:
    """Store one host's results and apply the policy to it, in one transaction."""
    now = utcnow()
    with transaction(session_factory) as session:
        node = get_node(session, hostname=host, for_update=True)
        for result in results:
            record_diagnostic(
                session,
                node_id=node.id,
                kind=result.check,
                level=level.value,
                status=DiagnosticStatus(result.status.value),
                reason=result.reason,
                measurements=_stored(result, worker),
                started_at=now - dt.timedelta(seconds=result.duration_s),
                finished_at=now,
                sweep_id=sweep_id,
            )
        verdict, findings = classify(results, level, rules)
        previous = node.state
        if verdict is Verdict.clean and node.state is NodeState.healthy:
            # The common case needs no history: nothing to decide.
            return HostOutcome(
                host=host,
                verdict=verdict,
                previous_state=previous,
                state=previous,
                reason="",
                results=len(results),
            )
        history = history_of(session, hostname=host, exclude_sweep=sweep_id, rules=rules)
        decision = decide(
            state=node.state, verdict=verdict, findings=findings, history=history, rules=rules, level=level
        )
        if decision.target is NodeState.cordoned:
            # Cordoned by failed diagnostics: a hardware failure of this host; it counts to its lemon score.
            offences = charge(
                session, node=node, kind="diagnostics", reason=decision.reason, author=author, rules=rules
            )
            lemon = decide_offence(
                state=node.state, offences=offences, consequence=NodeState.cordoned, rules=rules
            )
            decision = Decision(
                target=lemon.target or decision.target,
                reason=lemon.reason if lemon.target is NodeState.retired else decision.reason,
                evidence={**decision.evidence, **lemon.evidence},
            )
        _apply(session, node=node, decision=decision, author=author, sweep_id=sweep_id)
        return HostOutcome(
            host=host,
            verdict=verdict,
            previous_state=previous,
            state=node.state,
            reason=decision.reason,
            results=len(results),
        )


def _mirror(
    session_factory: sessionmaker[Session],
    outcome: HostOutcome,
    adapters: Sequence[SchedulerAdapter],
    author: str,
) -> list[str]:
    """Mirror a state change to the external schedulers; a failure is logged, never silently dropped."""
    cordon = outcome.state in (NodeState.cordoned, NodeState.retired)
    release = outcome.state is NodeState.healthy and outcome.previous_state in (
        NodeState.cordoned,
        NodeState.retired,
    )
    if not (cordon or release):
        return []
    errors: list[str] = []
    for adapter in adapters:
        action = "cordon" if cordon else "uncordon"
        try:
            if cordon:
                adapter.cordon(outcome.host, outcome.reason)
            else:
                adapter.uncordon(outcome.host, outcome.reason)
        except Exception as error:  # one scheduler's outage must not stop the others or the sweep
            with transaction(session_factory) as session:
                node = get_node(session, hostname=outcome.host)
                errors.append(
                    record_scheduler_failure(
                        session,
                        adapter=adapter,
                        action=action,
                        node=node,
                        state=outcome.state,
                        error=error,
                        author=author,
                    )
                )
    return errors


def run_sweep(
    session_factory: sessionmaker[Session],
    *,
    hosts: Sequence[str] | None = None,
    level: Level | str = Level.quick,
    deadline_s: float | None = None,
    checks: list[str] | None = None,
    author: str = "health/sweep",
    app: HealthCelery | None = None,
    rules: CordonRules | None = None,
    adapters: Sequence[SchedulerAdapter] = (),
) -> SweepReport:
    """Run ``level`` checks on ``hosts`` (default: every registered, non-retired host) and act on them.

    Waits at most ``deadline_s`` (default: the config's deadline for the level) for all hosts; a host
    that has not answered by then is recorded as ``timeout`` and judged as a missed deadline. Each host
    is stored and judged as soon as its results arrive, so a broken host is cordoned without waiting
    for the slowest one. ``adapters`` are external schedulers (Slurm, Kubernetes) mirroring each cordon;
    the node state itself is the own pool and always changes.

    A deep sweep of more than one host first runs the cross-host all-reduce over all of them together
    (:func:`service.fleet.fabric.run_fabric_check`, bisected pairwise when slow or broken); its per-host
    ``fabric.*`` results are judged with that host's own results. Quick sweeps never run it.
    """
    app = app or default_app
    level = Level(level)
    config = app.health_config
    rules = rules or CordonRules.from_config(config)
    deadline_s = deadline_s or (config.quick_deadline_s if level is Level.quick else config.deep_deadline_s)
    started = utcnow()
    sweep_id = f"{level.value}-{started:%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"
    targets, unknown = _targets(session_factory, hosts, config.expected_gpus)
    if app.embedded_worker is not None:
        app.embedded_worker.ensure(targets)

    # The hosts run their all-reduce together first, while otherwise idle; the per-host checks follow.
    # The sweep as a whole keeps its deadline (the orchestrator waits on it before a relaunch): the
    # cross-host phase gets at most half of it when per-host checks follow, the checks what is left.
    start = time.monotonic()
    fabric_wanted = checks is None or CROSS_HOST_CHECK in checks
    host_checks = [c for c in checks if c != CROSS_HOST_CHECK] if checks is not None else None
    fabric: dict[str, list[CheckResult]] = {}
    if level is Level.deep and len(targets) > 1 and fabric_wanted:
        share = 1.0 if host_checks == [] else FABRIC_SHARE_OF_DEADLINE
        fabric = run_fabric_check(app, list(targets), deadline_s=deadline_s * share).results

    pending: dict[str, str] = {}
    # An empty list means only the cross-host check was asked for (None means the level's set).
    for host, gpus in targets.items() if host_checks != [] else ():
        async_result = app.send_task(
            "health.run_checks",
            kwargs={
                "host": host,
                "level": level.value,
                "checks": host_checks,
                "expected_gpus": gpus,
                "reference_time": time.time(),
            },
            queue=host_queue(host),
            # A worker that comes back after the sweep gave up must not run stale checks.
            expires=max(1.0, deadline_s - (time.monotonic() - start)),
        )
        pending[async_result.id] = host

    report = SweepReport(
        sweep_id=sweep_id, level=level, started_at=started, finished_at=started, deadline_s=deadline_s
    )
    report.unknown_hosts = unknown
    remaining = dict(pending)

    def record(outcome: HostOutcome) -> None:
        report.hosts.append(outcome)
        report.results_ingested += outcome.results
        report.adapter_errors += _mirror(session_factory, outcome, adapters, author)

    try:
        for task_id, meta in app.backend.get_many(
            set(pending), timeout=max(0.01, deadline_s - (time.monotonic() - start)), interval=0.02
        ):
            host = remaining.pop(task_id)
            outcome = _ingest_meta(
                session_factory,
                host=host,
                meta=meta,
                extra=fabric.pop(host, []),
                level=level,
                sweep_id=sweep_id,
                rules=rules,
                author=author,
            )
            record(outcome)
    except CeleryTimeout:
        pass
    for task_id, host in remaining.items():
        missed = CheckResult(
            check=WORKER_CHECK,
            status=CheckStatus.timeout,
            reason=f"no answer on queue {host_queue(host)} within {deadline_s:g} s "
            "(worker down, stuck, or host unreachable)",
            faults=[Fault.missed_deadline],
            measurements={"task_id": task_id},
        )
        outcome = ingest_host(
            session_factory,
            host=host,
            level=level,
            results=[missed, *fabric.pop(host, [])],
            worker=None,
            sweep_id=sweep_id,
            rules=rules,
            author=author,
        )
        record(outcome)
    for host, results in fabric.items():  # only the cross-host check ran on these hosts
        outcome = ingest_host(
            session_factory,
            host=host,
            level=level,
            results=results,
            worker=None,
            sweep_id=sweep_id,
            rules=rules,
            author=author,
        )
        record(outcome)
    report.finished_at = utcnow()
    return report


def _ingest_meta(
    session_factory: sessionmaker[Session],
    *,
    host: str,
    meta: dict[str, Any],
    extra: list[CheckResult],
    level: Level,
    sweep_id: str,
    rules: CordonRules,
    author: str,
) -> HostOutcome:
    """Ingest one host's answer together with ``extra`` results of this sweep (the cross-host check)."""
    if meta.get("status") == "SUCCESS":
        host_report = HostReport.from_json(meta["result"])
        results, worker = host_report.results, host_report.worker
    else:
        # The task itself failed (not a check): a finding about the worker, with the error it raised.
        results = [
            CheckResult(
                check=WORKER_CHECK,
                status=CheckStatus.error,
                reason=f"health task {meta.get('status')}: {meta.get('result')!r}",
                faults=[Fault.check_error],
            )
        ]
        worker = None
    return ingest_host(
        session_factory,
        host=host,
        level=level,
        results=[*results, *extra],
        worker=worker,
        sweep_id=sweep_id,
        rules=rules,
        author=author,
    )


def charge(
    session: Session,
    *,
    node: Node,
    kind: str,
    reason: str,
    author: str,
    rules: CordonRules,
    run_id: int | None = None,
) -> list[Offence]:
    """Record a hardware failure against ``node``; return its offences within the lemon horizon, newest
    first (this one included), aged for the lemon score."""
    record_offence(session, node=node, kind=kind, reason=reason, author=author, run_id=run_id)
    now = utcnow()
    rows = recent_offences(session, node=node, since=now - dt.timedelta(seconds=rules.lemon_horizon_s()))
    return [Offence(kind=r.kind, reason=r.reason, age_s=(now - r.at).total_seconds()) for r in rows]


def charge_nodes(
    session_factory: sessionmaker[Session],
    *,
    hosts: Sequence[str],
    kind: str,
    failure: str,
    consequence: NodeState,
    author: str,
    run_id: int | None = None,
    evidence: dict[str, Any] | None = None,
    rules: CordonRules | None = None,
    adapters: Sequence[SchedulerAdapter] = (),
    app: HealthCelery | None = None,
    retire: bool = True,
) -> list[HostOutcome]:
    """Charge ``hosts`` with a hardware failure of this ``kind`` (the lemon score counts it, decayed by
    age) and move each to ``consequence`` (suspect: to be checked; cordoned: a confirmed fault), or retire
    it when its score reaches the limit. Every move is logged with the offences behind it. Without
    ``retire`` (a run's approval gate) a lemon is cordoned instead and its outcome says the retirement was
    withheld, for a human to decide."""
    rules = rules or CordonRules.from_config((app or default_app).health_config)
    outcomes: list[HostOutcome] = []
    for host in hosts:
        with transaction(session_factory) as session:
            node = get_node(session, hostname=host, for_update=True)
            previous = node.state
            offences = charge(
                session, node=node, kind=kind, reason=failure, author=author, rules=rules, run_id=run_id
            )
            decision = decide_offence(
                state=node.state, offences=offences, consequence=consequence, rules=rules
            )
            withheld = not retire and decision.target is NodeState.retired
            if withheld:
                target = None if node.state is NodeState.cordoned else NodeState.cordoned
                reason = f"{decision.reason}; retirement awaits an operator's approval (the run's policy)"
                decision = replace(decision, target=target, reason=reason)
            if decision.target is not None:
                transition_node(
                    session,
                    node=node,
                    target=decision.target,
                    reason=decision.reason,
                    author=author,
                    evidence={"run_id": run_id, **(evidence or {}), **decision.evidence},
                    kind=LogKind.decision,
                )
            outcome = HostOutcome(
                host=host,
                verdict=Verdict.hard if consequence is NodeState.cordoned else Verdict.soft,
                previous_state=previous,
                state=node.state,
                reason=decision.reason,
                results=0,
                retirement_withheld=withheld,
            )
        outcomes.append(outcome)
        _mirror(session_factory, outcome, adapters, author)
    return outcomes


def blame_nodes(
    session_factory: sessionmaker[Session],
    *,
    hosts: Sequence[str],
    failure: str,
    author: str,
    run_id: int | None = None,
    rules: CordonRules | None = None,
    adapters: Sequence[SchedulerAdapter] = (),
    app: HealthCelery | None = None,
    retire: bool = True,
) -> list[HostOutcome]:
    """Blame ``hosts`` for a run failure they are the likely cause of (the ranks furthest behind in a hang):
    suspect, to be checked, or retired when the lemon score reaches its limit (see `charge_nodes`)."""
    return charge_nodes(
        session_factory,
        hosts=hosts,
        kind="hang",
        failure=failure,
        consequence=NodeState.suspect,
        author=author,
        run_id=run_id,
        rules=rules,
        adapters=adapters,
        app=app,
        retire=retire,
    )
