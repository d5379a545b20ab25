"""The scrape-time Prometheus collector: per-run, per-node and per-GPU gauges read from the control plane's
database (:class:`ControlPlaneCollector`, registered per scrape by the API's `/metrics`, see
service/observability.py), at most once per ``TRAINOPS_METRICS_CACHE_TTL_S`` (:class:`ScrapeCache`).

The metric definitions (names, help, labels) live with every other metric in service/metrics.py; this module
only reads the database and fills them in. Reading the database gives the same answer from every API process,
and a run or node that goes away simply stops being exported (no stale series to remove by hand).
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import sqlalchemy as sa
from prometheus_client.core import Metric
from prometheus_client.registry import Collector
from sqlalchemy.orm import Session, aliased, sessionmaker

from service.crud.decisions import pending_decision_stats, pending_decisions_by_run
from service.crud.orchestrators import orchestrator_sessions
from service.crud.telemetry import decode_stored_field, readable_time
from service.metrics import (
    CELERY_QUEUE_LENGTH,
    COLLECT_DURATION,
    COLLECTED,
    DATABASE_UP,
    DECISION_OLDEST_PENDING_AGE,
    DECISIONS_PENDING,
    DIAGNOSTICS_LAST_RESULT_TIME,
    FAILURE_DETECTION,
    FAILURE_RECOVERY,
    FLEET_ETTR,
    GPU_ECC_CORRECTED,
    GPU_ECC_UNCORRECTED,
    GPU_TEMPERATURE,
    GPU_XID_ERRORS,
    NODE_BLAMES,
    NODE_DIAGNOSTIC_DURATION,
    NODE_DIAGNOSTIC_PASSED,
    NODE_FAILURES,
    NODE_GPUS,
    NODE_HEARTBEAT_TIME,
    NODE_STATE,
    ORCHESTRATORS,
    RUN_BUDGETED_RESTARTS,
    RUN_CHECKPOINT_STEP,
    RUN_CHECKPOINT_TIME,
    RUN_DECISIONS_PENDING,
    RUN_GOODPUT,
    RUN_HEARTBEAT_TIME,
    RUN_LAST_STEP_TIME,
    RUN_LOSS_SCALE_THRESHOLD,
    RUN_PHASE,
    RUN_RESTART_BUDGET,
    RUN_RESTARTS,
    RUN_STEP_FIELDS,
)
from service.models import Attempt, Checkpoint, Diagnostic, Gpu, Heartbeat, Node, Run
from service.models import Metric as MetricRow
from service.readmodels.goodput import compute_goodput, failure_timing
from service.recovery.config import DivergenceConfig, divergence_for_run
from service.statemachine import TERMINAL_PHASES, CheckpointState, DiagnosticStatus, NodeState, RunPhase

log = logging.getLogger("trainops.metrics")

# Runs stay exported this long after they finish, so dashboards show how they ended.
FINISHED_RUN_RETENTION = dt.timedelta(hours=24)
# How far back (in steps) a field missing from the newest row is looked for, e.g. validation loss, which
# the trainer measures every `val_interval` steps.
FIELD_LOOKBACK_STEPS = 2000
DIAGNOSTIC_WINDOW = dt.timedelta(hours=24)
HEALTH_QUEUE_PATTERN = "health.*"


def _ts(value: dt.datetime | None) -> float | None:
    return value.timestamp() if value is not None else None


class ScrapeCache:
    """The collector's last reading, shared by every scrape of one API process for ``ttl_s`` seconds.

    A reading (service/metrics_collector.py's queries, 0.1-0.17 s on a busy database) is made by one scrape
    while any others wait for it, then served to every scrape that starts within ``ttl_s`` of when that
    reading began. So a scrape never sees data older than ``ttl_s`` plus the time one reading takes, and
    Prometheus servers scraping the same process (an HA pair, a federation) cost one reading per ``ttl_s``.
    ``ttl_s`` 0 reads on every scrape. The families are only read after they are built, never changed, so
    concurrent scrapes can share them.
    """

    def __init__(self, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s = ttl_s
        self.clock = clock
        self.readings = 0  # how many times the database was read (tests, bench/metrics_scrape.py)
        self._lock = threading.Lock()
        self._families: list[Metric] | None = None
        self._read_started = 0.0

    def get(self, read: Callable[[], list[Metric]]) -> list[Metric]:
        # Held while reading: concurrent scrapes wait for the one reading in flight, not start their own.
        with self._lock:
            now = self.clock()
            if self._families is not None and now - self._read_started < self.ttl_s:
                return self._families
            families = read()
            self.readings += 1
            if self.ttl_s > 0:
                self._families, self._read_started = families, now
            return families


class ControlPlaneCollector(Collector):
    """Reads per-run, per-node and per-GPU gauges from the database on every scrape.

    One query per table; every per-run lookup goes through the (run_id, step) or primary-key indexes, so a
    scrape costs the same on day one and on day three hundred of a run.
    """

    def __init__(
        self,
        session_factory: sessionmaker[Session],
        broker_url: str | None = None,
        cache: ScrapeCache | None = None,
        divergence: DivergenceConfig | None = None,
    ) -> None:
        self.session_factory = session_factory
        self.broker_url = broker_url
        self.cache = cache
        self.divergence = divergence or DivergenceConfig()
        """The orchestrator's divergence rules: each run's loss-scale threshold is the one it acts on."""

    def describe(self) -> Iterable[Metric]:
        # Registering must not touch the database; the names are known statically.
        return [spec.family() for spec in COLLECTED]

    def collect(self) -> Iterator[Metric]:
        if self.cache is None:
            yield from self.read()
        else:
            yield from self.cache.get(self.read)

    def read(self) -> list[Metric]:
        """Every family, read from the database and the broker now (``collect`` may serve a cached one)."""
        started = time.perf_counter()
        families = {spec.name: spec.family() for spec in COLLECTED}
        database_up = 1.0
        try:
            with self.session_factory() as session:
                now = dt.datetime.now(dt.UTC)
                exported_runs = self._collect_runs(session, families, now)
                self._collect_failures(session, families)
                self._collect_nodes(session, families, now)
                self._collect_orchestrators(session, families)
                self._collect_decisions(session, families, now, exported_runs)
        except sa.exc.SQLAlchemyError as exc:
            # A scrape must still answer (with database_up 0) so the outage itself is visible and alertable.
            log.warning("metrics: database read failed: %s", exc)
            database_up = 0.0
            families = {spec.name: spec.family() for spec in COLLECTED}
        self._collect_queues(families)
        families[DATABASE_UP.name].add_metric([], database_up)
        families[COLLECT_DURATION.name].add_metric([], time.perf_counter() - started)
        return list(families.values())

    # -- runs -------------------------------------------------------------------------------------------

    def _collect_runs(self, session: Session, families: dict[str, Any], now: dt.datetime) -> set[str]:
        """The runs' families; returns the names of the runs exported."""
        cutoff = now - FINISHED_RUN_RETENTION
        latest_step = (
            sa.select(sa.func.max(MetricRow.step)).where(MetricRow.run_id == Run.id).scalar_subquery()
        )
        rows = session.execute(
            sa.select(Run, latest_step).where(
                sa.or_(Run.phase.not_in(list(TERMINAL_PHASES)), Run.finished_at >= cutoff)
            )
        ).all()
        if not rows:
            return set()
        runs = {run.id: run for run, _ in rows}
        names = {run.id: run.name for run in runs.values()}
        for run in runs.values():
            for phase in RunPhase:
                families[RUN_PHASE.name].add_metric([run.name, phase.value], float(run.phase == phase))
            families[RUN_BUDGETED_RESTARTS.name].add_metric([run.name], float(run.restart_count))
            budget = (run.config or {}).get("max_restarts")
            if isinstance(budget, int | float):
                families[RUN_RESTART_BUDGET.name].add_metric([run.name], float(budget))
            rules = divergence_for_run(self.divergence, run_config=run.config)
            families[RUN_LOSS_SCALE_THRESHOLD.name].add_metric([run.name], rules.min_loss_scale)

        latest_steps = {run.id: step for run, step in rows if step is not None}
        self._collect_step_metrics(session, families, names, latest_steps)
        self._collect_attempts(session, families, runs, now)
        self._collect_heartbeats(session, families, names)
        self._collect_checkpoints(session, families, names)
        return set(names.values())

    def _collect_step_metrics(
        self, session: Session, families: dict[str, Any], names: dict[int, str], latest: dict[int, int]
    ) -> None:
        if not latest:
            return
        window = sa.or_(
            *(
                sa.and_(MetricRow.run_id == run_id, MetricRow.step >= max(0, step - FIELD_LOOKBACK_STEPS))
                for run_id, step in latest.items()
            )
        )
        # Newest first: a later attempt's recomputed step wins over the rolled-back one. Rows whose time the
        # driver cannot read (PostgreSQL 'infinity', year 57,000) are left out in SQL: one of them made the
        # whole scrape report the database down and drop every run's series.
        # Plain rows of the columns, not ORM objects: up to FIELD_LOOKBACK_STEPS rows per run are read, and
        # building an identity-mapped object per row was over a third of a scrape's time (bench/
        # metrics_scrape.py, 50 runs x 4,000 steps). decode_stored_field reads either.
        recent = session.execute(
            sa.select(*MetricRow.__table__.columns)
            .where(window, readable_time())
            .order_by(MetricRow.run_id, MetricRow.step.desc(), MetricRow.attempt.desc())
        )
        found: dict[int, dict[str, tuple[float, dt.datetime]]] = defaultdict(dict)
        unreadable: dict[int, int] = defaultdict(int)
        for row in recent:
            try:
                have = found[row.run_id]
                if "time" not in have:
                    have["time"] = (row.time.timestamp(), row.time)
                for spec, field, _ in RUN_STEP_FIELDS:
                    if spec.name in have:
                        continue
                    value = _field(row, field)
                    if value is not None:
                        have[spec.name] = (value, row.time)
            except (TypeError, ValueError, OverflowError, AttributeError) as exc:
                # One bad stored row costs its run this row, never the scrape.
                unreadable[row.run_id] += 1
                log.debug("metrics: run %s step %s unreadable: %r", row.run_id, row.step, exc)
        for run_id, count in unreadable.items():
            log.warning("metrics: run %s: %d stored metric rows could not be read, left out", run_id, count)
        for run_id, have in found.items():
            label = [names[run_id]]
            for spec, _, scale in RUN_STEP_FIELDS:
                if spec.name in have:
                    families[spec.name].add_metric(label, have[spec.name][0] * scale)
            families[RUN_LAST_STEP_TIME.name].add_metric(label, have["time"][0])

    def _collect_attempts(
        self, session: Session, families: dict[str, Any], runs: dict[int, Run], now: dt.datetime
    ) -> None:
        attempts = session.scalars(
            sa.select(Attempt).where(Attempt.run_id.in_(list(runs))).order_by(Attempt.run_id, Attempt.number)
        ).all()
        by_run: dict[int, list[Attempt]] = defaultdict(list)
        for attempt in attempts:
            by_run[attempt.run_id].append(attempt)
        productive = wall = 0.0
        for run_id, run_attempts in by_run.items():
            run = runs[run_id]
            restarts: dict[str, int] = defaultdict(int)
            # An attempt followed by another one is a restart, labelled with why the earlier one ended.
            for earlier in run_attempts[:-1]:
                restarts[earlier.exit_reason or "unknown"] += 1
            for reason, count in sorted(restarts.items()):
                families[RUN_RESTARTS.name].add_metric([run.name, reason], float(count))
            # the orchestrator's own accounting, the same figure as the API and CLI report
            goodput = compute_goodput(session, run_id=run_id, now=now.timestamp())
            if goodput.goodput is not None:
                families[RUN_GOODPUT.name].add_metric([run.name], goodput.goodput)
            productive += goodput.productive_s
            wall += goodput.wall_s
        if wall > 0:
            families[FLEET_ETTR.name].add_metric([], min(1.0, productive / wall))

    @staticmethod
    def _collect_failures(session: Session, families: dict[str, Any]) -> None:
        """MTTD and MTTR terms of every detected failure, with the same accounting as a run's goodput.
        One query over the attempts whose failure was detected, each joined to the attempt after it."""
        following = aliased(Attempt)
        rows = session.execute(
            sa.select(
                Attempt.findings,
                Attempt.exit_reason,
                Attempt.detected_at,
                Attempt.last_progress_at,
                following.first_step_at,
            )
            .outerjoin(
                following,
                sa.and_(following.run_id == Attempt.run_id, following.number == Attempt.number + 1),
            )
            .where(Attempt.detected_at.is_not(None))
        )
        detect: dict[str, list[float]] = defaultdict(list)
        recover: dict[str, list[float]] = defaultdict(list)
        for findings, exit_reason, detected_at, last_progress_at, next_first_step_at in rows:
            timing = failure_timing(
                findings=findings if isinstance(findings, dict) else None,
                exit_reason=exit_reason,
                detected_at=detected_at,
                last_progress_at=last_progress_at,
                next_first_step_at=next_first_step_at,
            )
            if timing is None:
                continue
            if timing.detect_s is not None:
                detect[timing.failure_class].append(timing.detect_s)
            if timing.recover_s is not None:
                recover[timing.failure_class].append(timing.recover_s)
        for spec, values_by_class in ((FAILURE_DETECTION, detect), (FAILURE_RECOVERY, recover)):
            for failure_class, values in sorted(values_by_class.items()):
                families[spec.name].add_metric(
                    [failure_class], spec.histogram_buckets(values), sum_value=sum(values)
                )

    def _collect_heartbeats(self, session: Session, families: dict[str, Any], names: dict[int, str]) -> None:
        rows = session.execute(
            sa.select(Heartbeat.run_id, Heartbeat.attempt, sa.func.min(Heartbeat.time))
            .where(Heartbeat.run_id.in_(list(names)))
            .group_by(Heartbeat.run_id, Heartbeat.attempt)
        ).all()
        current: dict[int, tuple[int, dt.datetime]] = {}
        for run_id, attempt, stalest in rows:
            if run_id not in current or attempt > current[run_id][0]:
                current[run_id] = (attempt, stalest)
        for run_id, (_, stalest) in current.items():
            families[RUN_HEARTBEAT_TIME.name].add_metric([names[run_id]], _as_utc(stalest).timestamp())

    def _collect_checkpoints(self, session: Session, families: dict[str, Any], names: dict[int, str]) -> None:
        rows = session.execute(
            sa.select(Checkpoint.run_id, sa.func.max(Checkpoint.step), sa.func.max(Checkpoint.committed_at))
            .where(
                Checkpoint.run_id.in_(list(names)),
                Checkpoint.state.in_([CheckpointState.committed, CheckpointState.verified]),
            )
            .group_by(Checkpoint.run_id)
        ).all()
        for run_id, step, committed_at in rows:
            families[RUN_CHECKPOINT_STEP.name].add_metric([names[run_id]], float(step))
            if committed_at is not None:
                families[RUN_CHECKPOINT_TIME.name].add_metric(
                    [names[run_id]], _as_utc(committed_at).timestamp()
                )

    # -- nodes, GPUs, diagnostics -------------------------------------------------------------------------

    def _collect_nodes(self, session: Session, families: dict[str, Any], now: dt.datetime) -> None:
        gpu_count = sa.select(sa.func.count(Gpu.id)).where(Gpu.node_id == Node.id).scalar_subquery()
        nodes = session.execute(sa.select(Node, gpu_count)).all()
        hostnames = {node.id: node.hostname for node, _ in nodes}
        for node, gpus in nodes:
            label = [node.hostname]
            for state in NodeState:
                families[NODE_STATE.name].add_metric([node.hostname, state.value], float(node.state == state))
            families[NODE_GPUS.name].add_metric(label, float(gpus))
            families[NODE_FAILURES.name].add_metric(label, float(node.failure_count))
            families[NODE_BLAMES.name].add_metric(label, float(node.blame_count))
            if node.last_heartbeat_at is not None:
                families[NODE_HEARTBEAT_TIME.name].add_metric(label, node.last_heartbeat_at.timestamp())

        newest = session.execute(
            sa.select(Diagnostic.started_at, Diagnostic.finished_at).where(
                Diagnostic.id == sa.select(sa.func.max(Diagnostic.id)).scalar_subquery()
            )
        ).first()
        if newest is not None:
            families[DIAGNOSTICS_LAST_RESULT_TIME.name].add_metric(
                [], (newest.finished_at or newest.started_at).timestamp()
            )
        if not hostnames:
            return
        latest_ids = (
            sa.select(sa.func.max(Diagnostic.id))
            .where(Diagnostic.node_id.in_(list(hostnames)), Diagnostic.started_at >= now - DIAGNOSTIC_WINDOW)
            .group_by(Diagnostic.node_id, Diagnostic.kind)
        )
        for diag in session.scalars(sa.select(Diagnostic).where(Diagnostic.id.in_(latest_ids))):
            host = hostnames[diag.node_id]
            families[NODE_DIAGNOSTIC_PASSED.name].add_metric(
                [host, diag.kind], float(diag.status == DiagnosticStatus.passed)
            )
            if diag.finished_at is not None:
                families[NODE_DIAGNOSTIC_DURATION.name].add_metric(
                    [host, diag.kind], max(0.0, (diag.finished_at - diag.started_at).total_seconds())
                )
            self._gpu_measurements(families, host, diag)

        # XID events are drained once per check, so the running count is the sum over failed xid results.
        xids: dict[tuple[str, str, str], int] = defaultdict(int)
        failed_xid = session.execute(
            sa.select(Diagnostic.node_id, Diagnostic.measurements).where(
                Diagnostic.status == DiagnosticStatus.failed,
                Diagnostic.kind == "nvml.xid",
                Diagnostic.node_id.in_(list(hostnames)),
            )
        )
        for node_id, measurements in failed_xid:
            for event in (measurements or {}).get("events", []):
                if isinstance(event, dict) and isinstance(event.get("xid"), int):
                    xids[(hostnames[node_id], str(event.get("gpu")), f"xid_{event['xid']}")] += 1
        for labels, count in sorted(xids.items()):
            families[GPU_XID_ERRORS.name].add_metric(list(labels), float(count))

    @staticmethod
    def _gpu_measurements(families: dict[str, Any], host: str, diag: Diagnostic) -> None:
        per_gpu = (diag.measurements or {}).get("gpus")
        if not isinstance(per_gpu, dict):
            return
        for gpu, measured in sorted(per_gpu.items()):
            if not isinstance(measured, dict):
                continue
            if diag.kind == "nvml.thermal" and _number(measured.get("temperature_c")) is not None:
                families[GPU_TEMPERATURE.name].add_metric([host, gpu], float(measured["temperature_c"]))
            if diag.kind == "nvml.ecc":
                for spec, key in ((GPU_ECC_CORRECTED, "sbe_volatile"), (GPU_ECC_UNCORRECTED, "dbe_volatile")):
                    if _number(measured.get(key)) is not None:
                        families[spec.name].add_metric([host, gpu], float(measured[key]))

    # -- Celery ------------------------------------------------------------------------------------------

    @staticmethod
    def _collect_orchestrators(session: Session, families: dict[str, Any]) -> None:
        counts = orchestrator_sessions(session)
        if counts is not None:
            leaders, standbys = counts
            families[ORCHESTRATORS.name].add_metric(["leader"], leaders)
            families[ORCHESTRATORS.name].add_metric(["standby"], standbys)

    @staticmethod
    def _collect_decisions(
        session: Session, families: dict[str, Any], now: dt.datetime, exported_runs: set[str]
    ) -> None:
        pending, oldest_age_s = pending_decision_stats(session, now=now)
        families[DECISIONS_PENDING.name].add_metric([], float(pending))
        families[DECISION_OLDEST_PENDING_AGE.name].add_metric([], oldest_age_s)
        # per run, so the page names the run (Alertmanager groups by it); a run finished over a day ago
        # still shows while a decision of its waits (a lemon's retirement outlives the run)
        by_run = pending_decisions_by_run(session)
        for name in sorted(exported_runs | set(by_run)):
            families[RUN_DECISIONS_PENDING.name].add_metric([name], float(by_run.get(name, 0)))

    def _collect_queues(self, families: dict[str, Any]) -> None:
        if not self.broker_url or not self.broker_url.startswith(("redis://", "rediss://")):
            return
        import redis

        lengths: dict[str, int] = defaultdict(int)
        try:
            client = redis.Redis.from_url(self.broker_url, socket_timeout=1.0, socket_connect_timeout=1.0)
            for key in client.scan_iter(match=HEALTH_QUEUE_PATTERN, count=500):
                if client.type(key) != b"list":
                    continue
                # kombu's priority queues are extra lists named "<queue>\x06\x16<priority>".
                queue = key.decode(errors="replace").split("\x06\x16", 1)[0]
                lengths[queue] += int(client.llen(key))
        except redis.RedisError as exc:
            log.warning("metrics: broker read failed: %s", exc)
            return
        for queue, length in sorted(lengths.items()):
            families[CELERY_QUEUE_LENGTH.name].add_metric([queue], float(length))


def _field(row: MetricRow, field: str) -> float | None:
    if field.startswith("values."):
        values = row.values if isinstance(row.values, dict) else {}
        return _number(values.get(field.removeprefix("values.")))
    # A NaN is stored as NULL and named in values["nan"] (crud decodes it); a NaN loss is news, not a gap.
    return _number(decode_stored_field(row, field))


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _as_utc(value: dt.datetime) -> dt.datetime:
    # Aggregates (min/max) bypass the ORM's UTC type on SQLite and come back naive or as text.
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value)
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)
