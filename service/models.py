"""The control plane's data model (SQLAlchemy 2.x typed ORM). Migrations in migrations/ must match it."""

from __future__ import annotations

import datetime as dt
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from service.statemachine import (
    CheckpointState,
    DecisionStatus,
    DesiredState,
    DiagnosticStatus,
    LogKind,
    NodeState,
    Role,
    RunPhase,
    Severity,
)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class UTCDateTime(sa.types.TypeDecorator[dt.datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores them naive)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: sa.Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC)

    def process_result_value(self, value: dt.datetime | None, dialect: sa.Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC)


def str_enum(enum_cls: type) -> sa.Enum:
    # Stored as VARCHAR (no native enum type) so one migration history works on SQLite and PostgreSQL
    # and adding a state never needs an ALTER TYPE.
    return sa.Enum(enum_cls, native_enum=False, length=32, values_callable=lambda e: [m.value for m in e])


BigID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = sa.MetaData(naming_convention=NAMING)
    type_annotation_map = {dt.datetime: UTCDateTime(), dict[str, Any]: sa.JSON(), list[Any]: sa.JSON()}


class Run(Base):
    __tablename__ = "runs"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(200), unique=True)
    owner: Mapped[str] = mapped_column(sa.String(200))
    config: Mapped[dict[str, Any]] = mapped_column(default=dict)
    desired_state: Mapped[DesiredState] = mapped_column(str_enum(DesiredState), default=DesiredState.stopped)
    phase: Mapped[RunPhase] = mapped_column(str_enum(RunPhase), default=RunPhase.pending, index=True)
    phase_reason: Mapped[str | None] = mapped_column(sa.Text)
    # Standing overrides (kept for every later attempt, as OPT's mid-flight LR and clip changes were).
    lr_scale: Mapped[float] = mapped_column(default=1.0)
    lr_override: Mapped[float | None]
    clip_override: Mapped[float | None]
    # One-shot overrides consumed by the next launch: from checkpoint, reset loss scale, skip batches.
    pending_restart: Mapped[dict[str, Any] | None] = mapped_column(sa.JSON)
    restart_count: Mapped[int] = mapped_column(default=0)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    started_at: Mapped[dt.datetime | None]
    finished_at: Mapped[dt.datetime | None]

    attempts: Mapped[list[Attempt]] = relationship(back_populates="run", order_by="Attempt.number")


class Decision(Base):
    """A risky action the orchestrator proposed under the run's approval policy, and what a human (or the
    policy's timeout) made of it."""

    __tablename__ = "decisions"

    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(sa.ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    status: Mapped[DecisionStatus] = mapped_column(
        str_enum(DecisionStatus), default=DecisionStatus.pending, index=True
    )
    gates: Mapped[list[Any]] = mapped_column(default=list)  # the policy's gates the proposal crossed
    reason: Mapped[str] = mapped_column(sa.Text)
    proposal: Mapped[dict[str, Any]] = mapped_column(default=dict)  # checkpoint, overrides, failure
    evidence: Mapped[dict[str, Any]] = mapped_column(default=dict)
    on_timeout: Mapped[str] = mapped_column(sa.String(16))  # approve | hold
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[dt.datetime]
    decided_by: Mapped[str | None] = mapped_column(sa.String(200))
    decided_at: Mapped[dt.datetime | None]
    decision_reason: Mapped[str | None] = mapped_column(sa.Text)
    operator_overrides: Mapped[dict[str, Any] | None] = mapped_column(sa.JSON)
    consumed_at: Mapped[dt.datetime | None]  # carried out (a launch or an escalation), once
    consumed_by_attempt: Mapped[int | None]  # the attempt number that carried it out


class Attempt(Base):
    __tablename__ = "attempts"
    __table_args__ = (sa.UniqueConstraint("run_id", "number"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(sa.ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    number: Mapped[int]
    hosts: Mapped[list[Any]] = mapped_column(default=list)
    restored_from_checkpoint_id: Mapped[int | None] = mapped_column(
        sa.ForeignKey("checkpoints.id", ondelete="SET NULL")
    )
    overrides: Mapped[dict[str, Any]] = mapped_column(default=dict)
    launcher: Mapped[dict[str, Any]] = mapped_column(default=dict)
    start_step: Mapped[int] = mapped_column(default=0)
    last_step: Mapped[int | None]
    started_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    ended_at: Mapped[dt.datetime | None]
    exit_reason: Mapped[str | None] = mapped_column(sa.String(64))
    exit_code: Mapped[int | None]
    steps_lost: Mapped[int | None]
    # What the orchestrator found (failure class, onset, signals), and the times that give MTTD and MTTR:
    # last step progress before the failure, when the failure was detected, the attempt's first new step.
    findings: Mapped[dict[str, Any]] = mapped_column(default=dict)
    last_progress_at: Mapped[dt.datetime | None]
    detected_at: Mapped[dt.datetime | None]
    first_step_at: Mapped[dt.datetime | None]

    run: Mapped[Run] = relationship(back_populates="attempts")


class Node(Base):
    __tablename__ = "nodes"

    id: Mapped[int] = mapped_column(primary_key=True)
    hostname: Mapped[str] = mapped_column(sa.String(255), unique=True)
    state: Mapped[NodeState] = mapped_column(str_enum(NodeState), default=NodeState.healthy, index=True)
    state_reason: Mapped[str | None] = mapped_column(sa.Text)
    state_changed_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    labels: Mapped[dict[str, Any]] = mapped_column(default=dict)
    last_heartbeat_at: Mapped[dt.datetime | None]
    failure_count: Mapped[int] = mapped_column(default=0)
    blame_count: Mapped[int] = mapped_column(default=0)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)

    gpus: Mapped[list[Gpu]] = relationship(
        back_populates="node", order_by="Gpu.index", cascade="all, delete-orphan"
    )


class Gpu(Base):
    __tablename__ = "gpus"
    __table_args__ = (sa.UniqueConstraint("node_id", "index"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    node_id: Mapped[int] = mapped_column(sa.ForeignKey("nodes.id", ondelete="CASCADE"), index=True)
    index: Mapped[int]
    uuid: Mapped[str] = mapped_column(sa.String(128), unique=True)
    model: Mapped[str] = mapped_column(sa.String(128))
    memory_mb: Mapped[int]

    node: Mapped[Node] = relationship(back_populates="gpus")


class NodeOffence(Base):
    """A hardware failure attributed to a host (a hang it was blamed for, a confirmed straggler, a crash on
    it while unfit, a cordon by failed diagnostics): the lemon score decays these by age."""

    __tablename__ = "node_offences"
    __table_args__ = (sa.Index(None, "node_id", "at"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    node_id: Mapped[int] = mapped_column(sa.ForeignKey("nodes.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(sa.String(64))
    reason: Mapped[str] = mapped_column(sa.Text)
    run_id: Mapped[int | None]
    at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class Diagnostic(Base):
    __tablename__ = "diagnostics"
    __table_args__ = (sa.Index(None, "node_id", "started_at"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    node_id: Mapped[int] = mapped_column(sa.ForeignKey("nodes.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(sa.String(64))
    level: Mapped[str] = mapped_column(sa.String(16), default="quick")
    status: Mapped[DiagnosticStatus] = mapped_column(str_enum(DiagnosticStatus), index=True)
    reason: Mapped[str | None] = mapped_column(sa.Text)
    measurements: Mapped[dict[str, Any]] = mapped_column(default=dict)
    sweep_id: Mapped[str | None] = mapped_column(sa.String(64), index=True)
    started_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[dt.datetime | None]


class Checkpoint(Base):
    __tablename__ = "checkpoints"
    __table_args__ = (sa.UniqueConstraint("run_id", "path"), sa.Index(None, "run_id", "step"))

    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(sa.ForeignKey("runs.id", ondelete="CASCADE"))
    attempt: Mapped[int | None]
    step: Mapped[int]
    tokens: Mapped[int | None] = mapped_column(sa.BigInteger)
    path: Mapped[str] = mapped_column(sa.String(1024))
    size_bytes: Mapped[int | None] = mapped_column(sa.BigInteger)
    checksum: Mapped[str | None] = mapped_column(sa.String(128))
    state: Mapped[CheckpointState] = mapped_column(str_enum(CheckpointState), default=CheckpointState.writing)
    loss_scale: Mapped[float | None]
    lr: Mapped[float | None]
    clip: Mapped[float | None]
    loss: Mapped[float | None]
    act_norm: Mapped[float | None]
    healthy: Mapped[bool | None]  # follows `verdict`: True healthy, False unhealthy, None pending
    healthy_reason: Mapped[str | None] = mapped_column(sa.Text)  # the verdict's reason, in words
    # OPT's restart rule on the steps that descend from this checkpoint (service/recovery/verdicts.py):
    # a restart_point.Verdict value, the numbers it was decided on, and whether more steps can still change
    # it (an operator's mark, or a full trend window, settles it).
    verdict: Mapped[str] = mapped_column(sa.String(16), default="pending")
    verdict_numbers: Mapped[dict[str, Any] | None] = mapped_column(sa.JSON)
    verdict_final: Mapped[bool] = mapped_column(default=False)
    verdict_at: Mapped[dt.datetime | None]
    pinned: Mapped[bool] = mapped_column(default=False)
    pinned_by: Mapped[str | None] = mapped_column(sa.String(255))  # AUTO_PIN_AUTHOR or the operator
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", sa.JSON, default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    committed_at: Mapped[dt.datetime | None]


class Metric(Base):
    """One step's telemetry: a wide row, plus ``values`` for other named values.

    Keyed by (run, attempt, step) so a re-sent batch adds nothing; steps recomputed after a rollback
    belong to a new attempt and are kept apart. ``(run_id, step)`` serves "this run, step range".
    No foreign key to ``runs``: its trigger cost one lookup per row on the ingest path; ingestion locks
    the run once per batch instead (``crud.telemetry.lock_run_for_ingest``, migration 0003).
    """

    __tablename__ = "metrics"
    __table_args__ = (sa.Index(None, "run_id", "step"),)

    run_id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    attempt: Mapped[int] = mapped_column(primary_key=True)
    step: Mapped[int] = mapped_column(sa.BigInteger, primary_key=True, autoincrement=False)
    time: Mapped[dt.datetime]
    tokens: Mapped[int | None] = mapped_column(sa.BigInteger)
    loss: Mapped[float | None]
    grad_norm: Mapped[float | None]
    loss_scale: Mapped[float | None]
    act_norm: Mapped[float | None]
    lr: Mapped[float | None]
    clip: Mapped[float | None]
    tokens_per_s: Mapped[float | None]
    tflops_per_gpu: Mapped[float | None]
    step_time_s: Mapped[float | None]
    # The final layer's activation norm: `act_norm` the RMS of its per-token L2 norms (trainops' original),
    # `actv_norm` their mean (metaseq's, since migration 0009; NULL in rows stored before it).
    actv_norm: Mapped[float | None]
    values: Mapped[dict[str, Any] | None] = mapped_column(sa.JSON)


class Heartbeat(Base):
    """Latest heartbeat per (run, attempt, rank): one row updated in place, not a history.

    The one source of the orchestrator's hang and straggler detectors (docs/reporting-contract.md,
    "Heartbeats"): ``time`` is the rank's own clock when its training loop recorded the beat, ``received_at``
    the control plane's when the beat arrived.
    """

    __tablename__ = "heartbeats"

    run_id: Mapped[int] = mapped_column(sa.ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    attempt: Mapped[int] = mapped_column(primary_key=True)
    rank: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    host: Mapped[str | None] = mapped_column(sa.String(255))
    step: Mapped[int] = mapped_column(sa.BigInteger)
    time: Mapped[dt.datetime]
    section: Mapped[str] = mapped_column(sa.String(32), server_default="step")
    pid: Mapped[int | None]
    step_time_s: Mapped[float | None]
    last_step_s: Mapped[float | None]
    # [[step, busy seconds], ...], oldest first, at most HEARTBEAT_BUSY_HISTORY entries.
    busy_s: Mapped[list[Any] | None]
    received_at: Mapped[dt.datetime | None]


class LogEntry(Base):
    __tablename__ = "logbook"
    __table_args__ = (sa.Index(None, "run_id", "time"),)

    id: Mapped[int] = mapped_column(BigID, primary_key=True)
    run_id: Mapped[int | None] = mapped_column(sa.ForeignKey("runs.id", ondelete="CASCADE"))
    node_id: Mapped[int | None] = mapped_column(sa.ForeignKey("nodes.id", ondelete="SET NULL"), index=True)
    time: Mapped[dt.datetime] = mapped_column(default=utcnow, index=True)
    kind: Mapped[LogKind] = mapped_column(str_enum(LogKind))
    severity: Mapped[Severity] = mapped_column(str_enum(Severity), default=Severity.info)
    author: Mapped[str] = mapped_column(sa.String(200))
    message: Mapped[str] = mapped_column(sa.Text)
    evidence: Mapped[dict[str, Any]] = mapped_column(default=dict)


class ApiToken(Base):
    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(200))
    token_hash: Mapped[str] = mapped_column(sa.String(64), unique=True)
    role: Mapped[Role] = mapped_column(str_enum(Role))
    run_id: Mapped[int | None] = mapped_column(sa.ForeignKey("runs.id", ondelete="CASCADE"))
    # A trainer token is made for one attempt; when the attempt ends the orchestrator sets its expiry
    # (ended_at + the spool-replay grace, docs/security.md "Tokens").
    attempt_id: Mapped[int | None] = mapped_column(
        sa.ForeignKey("attempts.id", ondelete="CASCADE"), index=True
    )
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[dt.datetime | None]
    expires_at: Mapped[dt.datetime | None]
