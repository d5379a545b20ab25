"""Per-step metrics and heartbeats from trainer ranks.

Metric ingestion is the hot path of the control plane (a 992-GPU run reports every step for months), so it
is one set-based statement per batch: ``INSERT ... SELECT FROM json_to_recordset(batch) ON CONFLICT
DO NOTHING`` on PostgreSQL, ``INSERT OR IGNORE`` executemany on SQLite. The primary key (run, attempt,
step) makes a re-sent batch add nothing.

Heartbeats keep the latest beat per (run, attempt, rank), a batch upserted per statement
(`record_heartbeats`); the orchestrator reads an attempt's beats in one query (`attempt_heartbeats`).
"""

from __future__ import annotations

import datetime as dt
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pydantic_core
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from service.errors import NotFound
from service.models import Heartbeat, Metric, Run, utcnow
from trainer.contract import (
    METRIC_FLOAT_FIELDS,
    METRIC_WIDE_FIELDS,
    Section,
    decode_nan_names,
    encode_nonfinite,
)

# The wide columns of a metric point; a NaN among them is stored as NULL and named in values["nan"]
# (trainer.contract: encode_nonfinite on ingestion, decode_stored_field / decode_stored_values on reads).
WIDE_FIELDS = METRIC_WIDE_FIELDS
FLOAT_FIELDS = METRIC_FLOAT_FIELDS
UNIQUE_VIOLATION = "23505"  # PostgreSQL's SQLSTATE

log = logging.getLogger("trainops.telemetry")

# Stored times outside what Python's datetime can hold (PostgreSQL's 'infinity', a millisecond epoch read as
# seconds: year 57,000; a negative one: BC) cannot be read at all: the driver raises on the row, which took
# down the whole read. Reads select only rows inside these bounds and count the rest as unreadable.
READABLE_TIME_MIN = dt.datetime(1, 1, 2, tzinfo=dt.UTC)
READABLE_TIME_MAX = dt.datetime(9999, 12, 30, tzinfo=dt.UTC)


def readable_time() -> sa.ColumnElement[bool]:
    """The condition a stored metric row's time must meet for the row to be read (see READABLE_TIME_*)."""
    return Metric.time.between(READABLE_TIME_MIN, READABLE_TIME_MAX)


def readable_values(values: object) -> dict[str, Any] | None:
    """A stored ``values`` as the API shows it: a JSON object with string keys, or None for anything else
    (a row stored before validation, or written by hand)."""
    if values is None or (isinstance(values, dict) and all(isinstance(k, str) for k in values)):
        return values
    return None


def _normalise_point(point: dict[str, Any]) -> dict[str, Any]:
    """The point as stored: NaN fields NULL and named in ``values["nan"]`` (trainer.contract)."""
    stored, _ = encode_nonfinite(point)
    return stored


def decode_stored_field(row: Any, name: str) -> Any:
    """One wide field of a stored metric row (ORM object or selected row with ``values``), a NaN stored as
    NULL restored. Every reader of stored samples decodes through here (trainer.contract's decoder)."""
    if name in decode_nan_names(getattr(row, "values", None)):
        return math.nan
    return getattr(row, name)


def decode_stored_values(row: Any, names: Sequence[str] = WIDE_FIELDS) -> dict[str, Any]:
    """The named wide fields of a stored metric row, NaNs restored (see decode_stored_field)."""
    nan_names = decode_nan_names(getattr(row, "values", None))
    return {name: math.nan if name in nan_names else getattr(row, name) for name in names}


def lock_run_for_ingest(session: Session, *, run_id: int) -> None:
    """Refuse a batch for a run that does not exist, and keep the run from being deleted until the batch
    commits: on PostgreSQL the row is locked ``FOR KEY SHARE``, what a foreign-key check takes per row,
    taken here once per batch (``metrics`` has no foreign key; see migration 0003)."""
    query = sa.select(sa.literal(1)).select_from(Run).where(Run.id == run_id)
    if session.get_bind().dialect.name == "postgresql":
        query = query.with_for_update(key_share=True, read=True)
    if session.scalar(query) is None:
        raise NotFound(f"run {run_id} does not exist")


@dataclass(frozen=True)
class IngestResult:
    accepted: int
    duplicates: int


def ingest_metrics(
    session: Session, *, run_id: int, attempt: int, points: Sequence[dict[str, Any]]
) -> IngestResult:
    if not points:
        return IngestResult(0, 0)
    now = utcnow()
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        inserted = _ingest_postgres(session, run_id=run_id, attempt=attempt, points=points, now=now)
    else:
        points = [_normalise_point(p) for p in points]
        inserted = _ingest_generic(session, run_id=run_id, attempt=attempt, points=points, now=now)
    return IngestResult(accepted=inserted, duplicates=max(0, len(points) - inserted))


def _point_time(point: dict[str, Any], now: dt.datetime) -> dt.datetime:
    t = point.get("time")
    if t is None:
        return now
    if isinstance(t, dt.datetime):
        return t if t.tzinfo else t.replace(tzinfo=dt.UTC)
    return dt.datetime.fromtimestamp(float(t), dt.UTC)


# One statement per batch on PostgreSQL: the batch travels as one JSON text parameter and the server
# unpacks it with json_to_recordset (C). Measured on the bench (bench/ingest.py): the previous
# ``unnest(CAST(:col AS type[]))`` form spent ~30 ms of a 1,000-point batch in psycopg's pure-Python
# text dumping of 13 arrays (a regex per element); serialising the points with pydantic-core's
# ``to_json`` takes ~1 ms and PostgreSQL parses the text faster than it parses array literals.
_PG_INSERT = """
    INSERT INTO metrics (run_id, attempt, step, time, tokens, loss, grad_norm, loss_scale, act_norm,
                         lr, clip, tokens_per_s, tflops_per_gpu, step_time_s, actv_norm, "values")
    SELECT :run_id, :attempt, x.step, COALESCE(to_timestamp(x.time), :now), x.tokens, x.loss,
           x.grad_norm, x.loss_scale, x.act_norm, x.lr, x.clip, x.tokens_per_s, x.tflops_per_gpu,
           x.step_time_s, x.actv_norm, NULLIF(x."values"::text, '{}')::json
    FROM json_to_recordset(CAST(:points AS json)) AS x(
        step bigint, time float8, tokens bigint, loss float8, grad_norm float8, loss_scale float8,
        act_norm float8, lr float8, clip float8, tokens_per_s float8, tflops_per_gpu float8,
        step_time_s float8, actv_norm float8, "values" json
    )
"""
# A new batch (the common case) goes in with a plain INSERT inside a savepoint; a batch that repeats
# stored steps (a reporter's retry after a lost reply) violates the primary key, and is then inserted
# again skipping those rows. ON CONFLICT's speculative insertion costs ~1 ms more per 1,000 rows than the
# savepoint (bench/ingest.py), so it is kept for the batches that need it.
_PG_INGEST_NEW = sa.text(_PG_INSERT)
_PG_INGEST_SKIPPING_DUPLICATES = sa.text(_PG_INSERT + "    ON CONFLICT DO NOTHING\n")
# NaN is the one value that needs normalising (trainer.contract.encode_nonfinite); in the "strings" mode
# it is the JSON string "NaN", so a substring test over the serialised batch finds the rare batch that has
# one.
_NAN_JSON = b'"NaN"'


def _ingest_postgres(
    session: Session, *, run_id: int, attempt: int, points: Sequence[dict[str, Any]], now: dt.datetime
) -> int:
    # "strings": +-Infinity travel as "Infinity"/"-Infinity", which float8 input reads back.
    payload = pydantic_core.to_json(points, inf_nan_mode="strings")
    if _NAN_JSON in payload:
        payload = pydantic_core.to_json([_normalise_point(p) for p in points], inf_nan_mode="strings")
    params = {"run_id": run_id, "attempt": attempt, "now": now, "points": payload.decode()}
    try:
        with session.begin_nested():
            result = session.execute(_PG_INGEST_NEW, params)
    except sa.exc.IntegrityError as exc:
        if getattr(exc.orig, "sqlstate", None) != UNIQUE_VIOLATION:
            raise
        result = session.execute(_PG_INGEST_SKIPPING_DUPLICATES, params)
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


def _ingest_generic(
    session: Session, *, run_id: int, attempt: int, points: Sequence[dict[str, Any]], now: dt.datetime
) -> int:
    rows = [
        {
            "run_id": run_id,
            "attempt": attempt,
            "step": p["step"],
            "time": _point_time(p, now),
            "values": p.get("values") or None,
            **{name: p.get(name) for name in WIDE_FIELDS},
        }
        for p in points
    ]
    # The statement's own row count (sqlite3 sums it over executemany; ignored rows add nothing), not a
    # count of the attempt's rows before and after: a concurrent batch into the same attempt committed in
    # between made that difference larger than the batch, and the duplicate count negative.
    # On the Core connection: the ORM's bulk-insert result carries no row count.
    result = session.connection().execute(sqlite.insert(Metric.__table__).on_conflict_do_nothing(), rows)
    return int(result.rowcount or 0)


@dataclass(frozen=True)
class MetricRows:
    rows: list[dict[str, Any]]
    total: int  # rows stored in the range
    bucket_steps: int  # steps averaged per returned row; 1 = not downsampled
    skipped: int  # stored rows in the range that could not be read (READABLE_TIME_*), left out


def _stored_range(
    session: Session, *, run_id: int, where: Sequence[sa.ColumnElement[bool]]
) -> tuple[int, int, int, int]:
    """The stored rows matching `where`: how many, their lowest and highest step, and how many of them
    cannot be read (READABLE_TIME_*; logged)."""
    stats = session.execute(
        sa.select(sa.func.count(), sa.func.min(Metric.step), sa.func.max(Metric.step)).where(*where)
    ).one()
    total, lo, hi = int(stats[0]), stats[1], stats[2]
    if total == 0:
        return 0, 0, 0, 0
    readable = int(session.scalar(sa.select(sa.func.count()).where(*where, readable_time())) or 0)
    skipped = total - readable
    if skipped:
        log.warning("run %s: %d stored metric rows have an unreadable time and are left out", run_id, skipped)
    return total, lo, hi, skipped


def query_metrics(
    session: Session,
    *,
    run_id: int,
    start_step: int | None = None,
    end_step: int | None = None,
    attempt: int | None = None,
    max_points: int = 1000,
) -> MetricRows:
    """Rows in a step range; past ``max_points`` rows, averages over equal step buckets. A stored row that
    cannot be read is left out and counted (``skipped``), never an error for the whole range; a ``values``
    that is not a JSON object reads as null."""
    where = [Metric.run_id == run_id]
    if start_step is not None:
        where.append(Metric.step >= start_step)
    if end_step is not None:
        where.append(Metric.step <= end_step)
    if attempt is not None:
        where.append(Metric.attempt == attempt)
    total, lo, hi, skipped = _stored_range(session, run_id=run_id, where=where)
    if total == 0:
        return MetricRows([], 0, 1, 0)
    where.append(readable_time())
    if total <= max_points:
        rows = session.scalars(sa.select(Metric).where(*where).order_by(Metric.step, Metric.attempt)).all()
        return MetricRows([_row(m) for m in rows], total, 1, skipped)
    width = max(1, math.ceil((hi - lo + 1) / max_points))
    bucket = (Metric.step - lo) // width
    query = (
        sa.select(
            sa.func.min(Metric.step).label("step"),
            sa.func.max(Metric.attempt).label("attempt"),
            sa.func.max(Metric.time).label("time"),
            sa.func.max(Metric.tokens).label("tokens"),
            *[sa.func.avg(getattr(Metric, f)).label(f) for f in FLOAT_FIELDS],
        )
        .where(*where)
        .group_by(bucket)
        .order_by(sa.func.min(Metric.step))
    )
    out = []
    for r in session.execute(query).mappings():
        row = dict(r)
        if isinstance(row["time"], str):  # SQLite returns aggregates of datetimes as text
            row["time"] = dt.datetime.fromisoformat(row["time"])
        out.append({**row, "values": None})
    return MetricRows(out, total, width, skipped)


@dataclass(frozen=True)
class CurveRows:
    rows: list[
        dict[str, Any]
    ]  # attempt, abandoned, step, and per field its mean, `<field>_min`, `<field>_max`
    total: int  # rows stored
    bucket_steps: int  # steps per bucket; 1 = every stored step
    skipped: int  # stored rows that could not be read (READABLE_TIME_*), left out


def metric_curves(
    session: Session,
    *,
    run_id: int,
    fields: Sequence[str],
    abandoned_after: Mapping[int, int],
    max_points: int,
) -> CurveRows:
    """A run's curves per attempt, for charts: every stored step up to ``max_points`` rows, beyond that
    equal step buckets (aligned across attempts) computed in the database. Buckets never mix attempts, nor
    an attempt's surviving steps with those a later attempt rolled back past (``abandoned_after``: attempt
    -> the step after which its rows were recomputed), and each keeps its minimum and maximum besides the
    mean, so a one-step spike in a long run stays visible."""
    where = [Metric.run_id == run_id]
    total, lo, hi, skipped = _stored_range(session, run_id=run_id, where=where)
    if total == 0:
        return CurveRows([], 0, 1, 0)
    where.append(readable_time())
    width = 1 if total <= max_points else max(1, math.ceil((hi - lo + 1) / max_points))
    cutoffs = [(Metric.attempt == a, Metric.step > step) for a, step in sorted(abandoned_after.items())]
    abandoned = sa.case(*cutoffs, else_=sa.false()) if cutoffs else sa.false()
    names = [f for f in fields if f in FLOAT_FIELDS]
    # A subquery, so the outer GROUP BY names plain columns (PostgreSQL does not match two copies of an
    # expression with bound parameters in SELECT and GROUP BY).
    inner = (
        sa.select(
            Metric.attempt.label("attempt"),
            abandoned.label("abandoned"),
            ((Metric.step - lo) // width).label("bucket"),
            Metric.step.label("step"),
            *[getattr(Metric, f).label(f) for f in names],
        )
        .where(*where)
        .subquery()
    )
    query = (
        sa.select(
            inner.c.attempt,
            inner.c.abandoned,
            sa.func.min(inner.c.step).label("step"),
            *[sa.func.avg(inner.c[f]).label(f) for f in names],
            *[sa.func.min(inner.c[f]).label(f"{f}_min") for f in names],
            *[sa.func.max(inner.c[f]).label(f"{f}_max") for f in names],
        )
        .group_by(inner.c.attempt, inner.c.abandoned, inner.c.bucket)
        .order_by(inner.c.attempt, sa.func.min(inner.c.step))
    )
    rows = [{**r, "abandoned": bool(r["abandoned"])} for r in session.execute(query).mappings()]
    return CurveRows(rows, total, width, skipped)


def _row(m: Metric) -> dict[str, Any]:
    return {
        "step": m.step,
        "attempt": m.attempt,
        "time": m.time,
        "values": readable_values(m.values),
        **decode_stored_values(m),
    }


def latest_metric(session: Session, *, run_id: int) -> Metric | None:
    return session.scalar(
        sa.select(Metric).where(Metric.run_id == run_id).order_by(Metric.attempt.desc(), Metric.step.desc())
    )


# The columns a beat sets, besides the key (run, attempt, rank).
HEARTBEAT_FIELDS = (
    "host",
    "pid",
    "step",
    "time",
    "section",
    "step_time_s",
    "last_step_s",
    "busy_s",
    "received_at",
)


def record_heartbeats(
    session: Session,
    *,
    run_id: int,
    attempt: int,
    beats: Sequence[Mapping[str, Any]],
    received_at: dt.datetime | None = None,
) -> None:
    """Refuse a batch for a run that does not exist, then upsert the latest beat per (run, attempt, rank):
    one ``INSERT .. ON CONFLICT DO UPDATE`` for the whole batch, on PostgreSQL and SQLite alike. A beat
    older (by its own `time`) than the stored one is a late arrival and changes nothing. `beats` are
    validated `schemas.RankBeat`s, one per rank; a beat without `time` is stamped with the server's clock.

    The rows are built before the run is locked (`lock_run_for_ingest`): converting 1,024 beats is
    Python work on a busy API worker, and the lock is held only for the one statement and the commit."""
    if not beats:
        lock_run_for_ingest(session, run_id=run_id)
        return
    rows = heartbeat_rows(run_id=run_id, attempt=attempt, beats=beats, received_at=received_at or utcnow())
    insert = postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert
    stmt = insert(Heartbeat).values(rows)
    stmt = stmt.on_conflict_do_update(
        index_elements=["run_id", "attempt", "rank"],
        set_={name: stmt.excluded[name] for name in HEARTBEAT_FIELDS},
        where=Heartbeat.__table__.c.time <= stmt.excluded.time,
    )
    lock_run_for_ingest(session, run_id=run_id)
    session.execute(stmt)


def heartbeat_rows(
    *, run_id: int, attempt: int, beats: Sequence[Mapping[str, Any]], received_at: dt.datetime
) -> list[dict[str, Any]]:
    """The heartbeats table's rows of a batch, in rank order."""
    now = received_at
    return [
        {
            "run_id": run_id,
            "attempt": attempt,
            "rank": beat["rank"],
            "host": beat.get("host"),
            "pid": beat.get("pid"),
            "step": beat["step"],
            "time": dt.datetime.fromtimestamp(beat["time"], dt.UTC) if beat.get("time") is not None else now,
            "section": str(beat.get("section") or Section.STEP),
            "step_time_s": beat.get("step_time_s"),
            "last_step_s": beat.get("last_step_s"),
            "busy_s": [[int(s), float(b)] for s, b in beat["busy_s"]] if beat.get("busy_s") else None,
            "received_at": now,
        }
        # in rank order: two batches that share ranks lock their rows in the same order (no deadlock)
        for beat in sorted(beats, key=lambda beat: beat["rank"])
    ]


@dataclass(frozen=True)
class StoredBeat:
    """A rank's newest stored beat as the orchestrator's detectors read it."""

    rank: int
    host: str | None
    step: int
    time: float  # Unix seconds, the rank's clock
    section: str
    step_time_s: float | None
    last_step_s: float | None
    busy_s: tuple[tuple[int, float], ...]
    received_at: float | None  # Unix seconds, the control plane's clock


def attempt_heartbeats(session: Session, *, run_id: int, attempt: int) -> list[StoredBeat]:
    """Every rank's newest beat of one attempt, in one query on the primary key (plain rows, no ORM
    objects: a 1,024-host run has 8,192 of them every pass)."""
    table = Heartbeat.__table__
    query = (
        sa.select(
            table.c.rank,
            table.c.host,
            table.c.step,
            table.c.time,
            table.c.section,
            table.c.step_time_s,
            table.c.last_step_s,
            table.c.busy_s,
            table.c.received_at,
        )
        .where(table.c.run_id == run_id, table.c.attempt == attempt)
        .order_by(table.c.rank)
    )
    return [
        StoredBeat(
            rank=rank,
            host=host,
            step=step,
            time=time.timestamp(),
            section=section,
            step_time_s=step_time_s,
            last_step_s=last_step_s,
            busy_s=tuple((int(s), float(b)) for s, b in busy_s or ()),
            received_at=received_at.timestamp() if received_at is not None else None,
        )
        for (
            rank,
            host,
            step,
            time,
            section,
            step_time_s,
            last_step_s,
            busy_s,
            received_at,
        ) in session.execute(query)
    ]


def list_heartbeats(
    session: Session, *, run_id: int, attempt: int | None = None, limit: int | None = None, offset: int = 0
) -> tuple[list[Heartbeat], int]:
    """A page of the run's heartbeats (the latest per attempt and rank), and how many there are in all."""
    query = sa.select(Heartbeat).where(Heartbeat.run_id == run_id)
    if attempt is not None:
        query = query.where(Heartbeat.attempt == attempt)
    total = session.scalar(sa.select(sa.func.count()).select_from(query.subquery())) or 0
    rows = session.scalars(query.order_by(Heartbeat.attempt, Heartbeat.rank).limit(limit).offset(offset))
    return list(rows), total
