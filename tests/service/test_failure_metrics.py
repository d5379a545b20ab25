"""MTTD and MTTR per failure class and the fleet's ETTR, read from the database at scrape time
(service/metrics_collector.py) with the same accounting as a run's goodput (service/readmodels/goodput.py)."""

from __future__ import annotations

import datetime as dt

from prometheus_client.core import Metric
from sqlalchemy.orm import Session

from service.crud import runs as runs_crud
from service.crud import telemetry
from service.db import make_engine, make_session_factory, transaction
from service.metrics_collector import ControlPlaneCollector
from service.models import Run
from service.readmodels.goodput import compute_goodput
from service.statemachine import RunPhase

T0 = dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(hours=2)


def _seconds(s: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=s)


def _samples(families: list[Metric], name: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    family = next(f for f in families if f.name == name)
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for s in family.samples}


def _finished_run(
    session: Session, name: str, failures: list[tuple[str, float, float]], wall_s: float
) -> Run:
    """A completed run whose attempts each step for 10 s of productive time (ten 1 s steps) and fail as
    listed: (class, detection s, recovery s); the last attempt completes."""
    run = runs_crud.create_run(session, name=name, owner="alice", config={}, start=False, author="t")
    clock = 0.0
    for number, failure in enumerate([*failures, None], start=1):
        attempt = runs_crud.create_attempt(
            session,
            run=run,
            hosts=["node-1"],
            restored_from_checkpoint_id=None,
            overrides={},
            launcher={},
            start_step=(number - 1) * 10,
            author="t",
        )
        attempt.started_at = attempt.first_step_at = _seconds(clock)
        points = [
            {"step": (number - 1) * 10 + i, "time": _seconds(clock + i).timestamp(), "step_time_s": 1.0}
            for i in range(1, 11)
        ]
        telemetry.ingest_metrics(session, run_id=run.id, attempt=number, points=points)
        clock += 10
        if failure is None:
            runs_crud.end_attempt(
                session, attempt=attempt, exit_reason="completed", exit_code=0, last_step=None,
                steps_lost=0, author="t",
            )  # fmt: skip
            break
        failure_class, detect_s, recover_s = failure
        runs_crud.end_attempt(
            session, attempt=attempt, exit_reason="crash", exit_code=1, last_step=None, steps_lost=0,
            author="t",
        )  # fmt: skip
        attempt.findings = {"failure": failure_class}
        attempt.last_progress_at = _seconds(clock)
        attempt.detected_at = _seconds(clock + detect_s)
        clock += detect_s + recover_s
    run.phase = RunPhase.completed
    run.finished_at = _seconds(wall_s)
    return run


def test_failure_timings_and_fleet_ettr_are_exported_per_class(migrated_url: str) -> None:
    engine = make_engine(migrated_url)
    factory = make_session_factory(engine)
    try:
        with transaction(factory) as session:
            # 2 x 10 s productive in 100 s of wall; then 3 x 10 s in 200 s: ETTR = 50 / 300.
            first = _finished_run(session, "opt-a", [("hang", 30.0, 20.0)], wall_s=100)
            second = _finished_run(
                session, "opt-b", [("hang", 90.0, 40.0), ("hardware", 4.0, 6.0)], wall_s=200
            )
        families = ControlPlaneCollector(factory).read()
        with factory() as session:
            per_run = [compute_goodput(session, run_id=r.id) for r in (first, second)]
    finally:
        engine.dispose()

    detection = _samples(families, "trainops_failure_detection_seconds")
    hang, hardware = (("failure_class", "hang"),), (("failure_class", "hardware"),)
    assert detection[("trainops_failure_detection_seconds_count", hang)] == 2
    assert detection[("trainops_failure_detection_seconds_sum", hang)] == 120.0
    assert detection[("trainops_failure_detection_seconds_sum", hardware)] == 4.0
    # cumulative buckets: 30 s <= 30, 90 s only from 120 up
    bucket = "trainops_failure_detection_seconds_bucket"
    assert detection[(bucket, (("failure_class", "hang"), ("le", "30.0")))] == 1
    assert detection[(bucket, (("failure_class", "hang"), ("le", "120.0")))] == 2
    assert detection[(bucket, (("failure_class", "hang"), ("le", "+Inf")))] == 2
    recovery = _samples(families, "trainops_failure_recovery_seconds")
    assert recovery[("trainops_failure_recovery_seconds_sum", hang)] == 60.0
    assert recovery[("trainops_failure_recovery_seconds_count", hardware)] == 1
    # the same means as the runs' goodput reports
    mttd = {
        c: f.mean_time_to_detect_s for g in per_run for c, f in g.failures.items() if g.run_id == second.id
    }
    assert mttd == {"hang": 90.0, "hardware": 4.0}

    (ettr,) = _samples(families, "trainops_fleet_effective_training_time_ratio").values()
    assert ettr == sum(g.productive_s for g in per_run) / sum(g.wall_s for g in per_run) == 50 / 300
