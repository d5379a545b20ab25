"""Goodput accounting: how much of the wall time produced steps that survive.

productive = the step times of the surviving lineage (for each step, the attempt that computed it last);
lost = wall - productive, split into recomputed steps (work a rollback threw away), detection delay (last
progress -> failure noticed), restart downtime (noticed -> first step of the next attempt) and other
(start-up, checkpoint stalls, time between steps not covered by step times).
"""

from __future__ import annotations

import datetime as dt
import statistics
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from service.crud.runs import get_run
from service.models import Attempt, Metric


@dataclass
class FailureTimes:
    count: int
    mean_time_to_detect_s: float | None
    mean_time_to_recover_s: float | None


@dataclass(frozen=True)
class FailureTiming:
    """One failed attempt's times: detection = its last progress -> the failure noticed (MTTD's term),
    recovery = noticed -> the next attempt's first step (MTTR's term); None where a time is not known."""

    failure_class: str
    detect_s: float | None
    recover_s: float | None


# Attempts that ended this way did not fail.
NOT_FAILURES = frozenset({"completed", "stopped"})


def failure_timing(
    *,
    findings: dict[str, Any] | None,
    exit_reason: str | None,
    detected_at: dt.datetime | None,
    last_progress_at: dt.datetime | None,
    next_first_step_at: dt.datetime | None,
) -> FailureTiming | None:
    """The timing of one ended attempt given its successor's first step, or None if it did not fail or
    its failure was never detected (ended before the detection times were recorded)."""
    failure = (findings or {}).get("failure") or exit_reason
    if detected_at is None or not isinstance(failure, str) or failure in NOT_FAILURES:
        return None
    detect = (
        max(0.0, (detected_at - last_progress_at).total_seconds()) if last_progress_at is not None else None
    )
    recover = (
        max(0.0, (next_first_step_at - detected_at).total_seconds())
        if next_first_step_at is not None
        else None
    )
    return FailureTiming(failure, detect, recover)


@dataclass
class Goodput:
    run_id: int
    wall_s: float
    productive_s: float
    goodput: float | None
    lost: dict[str, float]
    steps_surviving: int
    steps_recomputed: int
    attempts: int
    failures: dict[str, FailureTimes] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def compute_goodput(session: Session, *, run_id: int, now: float | None = None) -> Goodput:
    run = get_run(session, run_id=run_id)
    attempts = list(
        session.scalars(sa.select(Attempt).where(Attempt.run_id == run_id).order_by(Attempt.number))
    )
    # Set-based, so a scrape of a months-long run stays cheap: for each step, the newest attempt's row is
    # the one that survives.
    newest = (
        sa.select(Metric.step, sa.func.max(Metric.attempt).label("attempt"))
        .where(Metric.run_id == run_id)
        .group_by(Metric.step)
        .subquery()
    )
    surviving_steps, productive = session.execute(
        sa.select(sa.func.count(), sa.func.coalesce(sa.func.sum(Metric.step_time_s), 0.0))
        .select_from(Metric)
        .join(newest, sa.and_(Metric.step == newest.c.step, Metric.attempt == newest.c.attempt))
        .where(Metric.run_id == run_id)
    ).one()
    all_rows, all_time = session.execute(
        sa.select(sa.func.count(), sa.func.coalesce(sa.func.sum(Metric.step_time_s), 0.0)).where(
            Metric.run_id == run_id
        )
    ).one()
    productive, all_time = float(productive), float(all_time)
    recomputed_steps = int(all_rows) - int(surviving_steps)
    if attempts:
        start = attempts[0].started_at.timestamp()
        end = (run.finished_at.timestamp() if run.finished_at else None) or (now or time.time())
        wall = max(0.0, end - start)
    else:
        wall = 0.0

    detect: dict[str, list[float]] = defaultdict(list)
    recover: dict[str, list[float]] = defaultdict(list)
    detection_delay = restart_downtime = 0.0
    for a, nxt in zip(attempts, [*attempts[1:], None], strict=False):  # the last one has no next
        timing = failure_timing(
            findings=a.findings,
            exit_reason=a.exit_reason,
            detected_at=a.detected_at,
            last_progress_at=a.last_progress_at,
            next_first_step_at=nxt.first_step_at if nxt is not None else None,
        )
        if timing is None:
            continue
        if timing.detect_s is not None:
            detect[timing.failure_class].append(timing.detect_s)
            detection_delay += timing.detect_s
        if timing.recover_s is not None:
            recover[timing.failure_class].append(timing.recover_s)
            restart_downtime += timing.recover_s

    recomputed_s = all_time - productive
    lost = {
        "recomputed_steps_s": round(recomputed_s, 3),
        "detection_delay_s": round(detection_delay, 3),
        "restart_downtime_s": round(restart_downtime, 3),
    }
    lost["other_s"] = round(max(0.0, wall - productive - sum(lost.values())), 3)
    classes = set(detect) | set(recover)
    return Goodput(
        run_id=run_id,
        wall_s=round(wall, 3),
        productive_s=round(productive, 3),
        goodput=round(productive / wall, 4) if wall > 0 else None,
        lost=lost,
        steps_surviving=int(surviving_steps),
        steps_recomputed=recomputed_steps,
        attempts=len(attempts),
        failures={
            c: FailureTimes(
                count=max(len(detect.get(c, [])), len(recover.get(c, []))),
                mean_time_to_detect_s=round(statistics.mean(detect[c]), 3) if detect.get(c) else None,
                mean_time_to_recover_s=round(statistics.mean(recover[c]), 3) if recover.get(c) else None,
            )
            for c in sorted(classes)
        },
    )
