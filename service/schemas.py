"""Request and response schemas of the REST API (XCreate / XPublic)."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Generic, Literal, Required, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, TypeAdapter, model_validator
from typing_extensions import TypedDict

from service.statemachine import (
    CheckpointState,
    DesiredState,
    DiagnosticStatus,
    LogKind,
    NodeState,
    Role,
    RunPhase,
    Severity,
)

Name = Annotated[
    str, StringConstraints(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
]
Hostname = Annotated[
    str, StringConstraints(min_length=1, max_length=255, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
]
Reason = Annotated[str, StringConstraints(min_length=1, max_length=2000, strip_whitespace=True)]

T = TypeVar("T")
MAX_ID = 2**31 - 1
MAX_STEP = 2**62


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ORM(BaseModel):
    # NaN/inf are legitimate telemetry (a diverged loss); JSON has no literal for them, so they travel
    # as the strings "NaN", "Infinity", "-Infinity".
    model_config = ConfigDict(from_attributes=True, ser_json_inf_nan="strings")


class Page(BaseModel, Generic[T]):
    items: list[T]
    total: int
    limit: int
    offset: int


# ---- runs -------------------------------------------------------------------------------------------


class SlurmConfig(Strict):
    partition: str | None = None
    account: str | None = None
    time_limit: str | None = Field(None, description="sbatch --time, e.g. 2-00:00:00")
    gpus_per_node: int = Field(0, ge=0, le=64)
    extra_sbatch_flags: list[str] = Field(default_factory=list)
    placement: Literal["nodelist", "exclude"] = Field(
        "nodelist",
        description="nodelist: sbatch --nodelist of the hosts the orchestrator picks; exclude: sbatch "
        "--nodes=N --exclude=<hosts out of service>, Slurm places the job and the attempt's hosts follow.",
    )
    nodelist: list[Annotated[str, StringConstraints(min_length=1, max_length=200)]] = Field(
        default_factory=list,
        description="With placement=exclude: Slurm nodes the job must include (sbatch --nodelist): spares.",
    )


class HangOverrides(Strict):
    """This run's hang limits, in place of the orchestrator's (docs/orchestrator.md, "Detection"). The
    step limit is max(step_floor_s, step_time_multiple x p99 of the run's recent step times); each section
    limit is at least the step limit."""

    step_floor_s: float | None = Field(None, ge=5, le=86_400, description="Floor of the step limit (s).")
    step_time_multiple: float | None = Field(
        None, ge=1, le=1000, description="The step limit as a multiple of the p99 step time."
    )
    startup_s: float | None = Field(
        None, ge=5, le=86_400, description="Start-up: process start, model build, checkpoint load, 1st step."
    )
    checkpoint_save_s: float | None = Field(None, ge=5, le=86_400, description="Inside a checkpoint save.")
    validation_s: float | None = Field(None, ge=5, le=86_400, description="Inside a validation pass.")

    @model_validator(mode="after")
    def _sections_at_least_the_floor(self) -> HangOverrides:
        if self.step_floor_s is not None:
            for name in ("startup_s", "checkpoint_save_s", "validation_s"):
                value = getattr(self, name)
                if value is not None and value < self.step_floor_s:
                    raise ValueError(f"hang.{name} must be >= hang.step_floor_s")
        return self


class RunConfig(Strict):
    """What to train and how to look after it."""

    preset: str = Field("tiny", description="Model preset: tiny, small, 125M ... 175B (OPT Table 1).")
    target_steps: int = Field(..., ge=1, le=10_000_000_000)
    target_tokens: int | None = Field(None, ge=1)
    checkpoint_interval: int = Field(10, ge=1, description="Steps between checkpoints.")
    launcher: Literal["local", "slurm"] = "local"
    host_count: int = Field(2, ge=1, le=100_000)
    procs_per_host: int = Field(1, ge=1, le=64)
    precision: Literal["fp16", "bf16", "fp32"] = "fp16"
    hyperparameters: dict[str, float | int | str | bool] = Field(
        default_factory=dict, description="Passed to the trainer: lr, batch_size, seq_len, warmup_steps, ..."
    )
    max_restarts: int = Field(20, ge=0, description="Restart budget before the run needs attention.")
    slurm: SlurmConfig | None = None
    faults: list[str] = Field(default_factory=list, description="Fault injection specs (tests and demo).")
    hang: HangOverrides | None = Field(
        None, description="Per-run hang limits (14 s steps, 2-minute saves); unset = the orchestrator's."
    )


class RunCreate(Strict):
    name: Name
    owner: Annotated[str, StringConstraints(min_length=1, max_length=200)]
    config: RunConfig
    start: bool = Field(False, description="Ask the orchestrator to start it right away.")

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "name": "opt-125m-ablation-3",
                    "owner": "alice",
                    "config": {
                        "preset": "125M",
                        "target_steps": 143000,
                        "checkpoint_interval": 250,
                        "host_count": 16,
                        "hyperparameters": {"lr": 6e-4},
                    },
                    "start": True,
                }
            ]
        },
    )


class RunPublic(ORM):
    id: int
    name: str
    owner: str
    config: dict[str, Any]
    desired_state: DesiredState
    phase: RunPhase
    phase_reason: str | None
    lr_scale: float
    lr_override: float | None
    clip_override: float | None
    pending_restart: dict[str, Any] | None
    restart_count: int
    created_at: dt.datetime
    updated_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None


class StopRequest(Strict):
    reason: Reason = "stopped by operator"


class RestartRequest(Strict):
    """An operator's restart, with the OPT team's levers."""

    reason: Reason
    from_checkpoint_id: int | None = Field(
        None,
        ge=1,
        description="Restore this checkpoint (default: the orchestrator picks the last healthy one).",
    )
    lr: float | None = Field(None, gt=0, le=1.0, description="Absolute peak LR from now on.")
    lr_scale: float | None = Field(None, gt=0, le=10.0, description="Multiply the schedule's LR from now on.")
    clip: float | None = Field(None, gt=0, le=100.0, description="Gradient-norm clipping threshold.")
    reset_loss_scale: bool = False
    skip_batches: int = Field(0, ge=0, le=10_000_000, description="Skip this many batches after the restore.")

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"reason": "loss spike at step 12000", "lr_scale": 0.5, "clip": 0.3, "reset_loss_scale": True}
            ]
        },
    )


class AttemptPublic(ORM):
    id: int
    run_id: int
    number: int
    hosts: list[Any]
    restored_from_checkpoint_id: int | None
    overrides: dict[str, Any]
    launcher: dict[str, Any]
    start_step: int
    last_step: int | None
    started_at: dt.datetime
    ended_at: dt.datetime | None
    exit_reason: str | None
    exit_code: int | None
    steps_lost: int | None
    findings: dict[str, Any]
    last_progress_at: dt.datetime | None
    detected_at: dt.datetime | None
    first_step_at: dt.datetime | None


class FailureTimesPublic(BaseModel):
    count: int
    mean_time_to_detect_s: float | None
    mean_time_to_recover_s: float | None


class GoodputPublic(BaseModel):
    """Productive time (steps that survive) over wall time, and where the rest went."""

    run_id: int
    wall_s: float
    productive_s: float
    goodput: float | None
    lost: dict[str, float]
    steps_surviving: int
    steps_recomputed: int
    attempts: int
    failures: dict[str, FailureTimesPublic]


# ---- telemetry -------------------------------------------------------------------------------------


class MetricPoint(TypedDict, total=False):
    """One step's telemetry from a trainer rank; fields left out are stored as NULL.

    A TypedDict, not a model: a batch carries up to 10,000 of them, and validating into plain dicts
    saves building (and then taking apart) one object per point on the ingest path (bench/ingest.py).
    """

    __pydantic_config__ = ConfigDict(extra="forbid")  # type: ignore[misc]

    step: Required[Annotated[int, Field(ge=0, le=MAX_STEP)]]
    time: Annotated[float | None, Field(description="Unix seconds; server time when absent.")]
    tokens: Annotated[int | None, Field(ge=0, le=MAX_STEP)]
    loss: float | None
    grad_norm: float | None
    loss_scale: float | None
    act_norm: Annotated[float | None, Field(description="L2 norm of the final layer's activations.")]
    lr: float | None
    clip: float | None
    tokens_per_s: float | None
    tflops_per_gpu: float | None
    step_time_s: float | None
    values: dict[str, float | int | None] | None


METRIC_POINT = TypeAdapter(MetricPoint)


class MetricBatch(Strict):
    attempt: int = Field(..., ge=1, le=MAX_ID)
    points: list[MetricPoint] = Field(..., max_length=10_000)

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "attempt": 1,
                    "points": [
                        {
                            "step": 10,
                            "loss": 5.1,
                            "loss_scale": 65536.0,
                            "act_norm": 41.2,
                            "lr": 6e-4,
                            "clip": 1.0,
                            "values": {"mfu": 0.41},
                        }
                    ],
                }
            ]
        },
    )


class IngestReply(BaseModel):
    accepted: int
    duplicates: int


class MetricPublic(ORM):
    step: int
    attempt: int
    time: dt.datetime
    tokens: int | None
    loss: float | None
    grad_norm: float | None
    loss_scale: float | None
    act_norm: float | None
    lr: float | None
    clip: float | None
    tokens_per_s: float | None
    tflops_per_gpu: float | None
    step_time_s: float | None
    values: dict[str, Any] | None


class MetricSeries(ORM):
    run_id: int
    total: int = Field(description="Rows in the requested range.")
    bucket_steps: int = Field(description="Steps averaged per returned point; 1 = raw rows.")
    points: list[MetricPublic]


class HeartbeatCreate(Strict):
    attempt: int = Field(..., ge=1, le=MAX_ID)
    rank: int = Field(..., ge=0, le=1_000_000)
    host: Hostname | None = None
    step: int = Field(..., ge=0, le=MAX_STEP)


class HeartbeatPublic(ORM):
    attempt: int
    rank: int
    host: str | None
    step: int
    time: dt.datetime


# ---- checkpoints -----------------------------------------------------------------------------------


class CheckpointCreate(Strict):
    attempt: int | None = Field(None, ge=1, le=MAX_ID)
    step: int = Field(..., ge=0, le=MAX_STEP)
    tokens: int | None = Field(None, ge=0, le=MAX_STEP)
    path: Annotated[str, StringConstraints(min_length=1, max_length=1024)]
    size_bytes: int | None = Field(None, ge=0, le=MAX_STEP)
    checksum: str | None = Field(None, max_length=128)
    state: Literal["writing", "committed"] = "committed"
    loss_scale: float | None = None
    lr: float | None = None
    clip: float | None = None
    loss: float | None = None
    act_norm: float | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)


class CheckpointMark(Strict):
    reason: Reason
    state: Literal["verified", "corrupt", "deleted"] | None = None
    healthy: bool | None = None
    pinned: bool | None = None

    @model_validator(mode="after")
    def _something_to_change(self) -> CheckpointMark:
        if self.state is None and self.healthy is None and self.pinned is None:
            raise ValueError("give at least one of state, healthy, pinned")
        return self


class CheckpointPublic(ORM):
    id: int
    run_id: int
    attempt: int | None
    step: int
    tokens: int | None
    path: str
    size_bytes: int | None
    checksum: str | None
    state: CheckpointState
    loss_scale: float | None
    lr: float | None
    clip: float | None
    loss: float | None
    act_norm: float | None
    healthy: bool | None
    healthy_reason: str | None = Field(description="The verdict's reason, in words.")
    verdict: Literal["healthy", "unhealthy", "pending"] = Field(
        description="OPT's restart rule on the steps that descend from it, kept current by the orchestrator."
    )
    verdict_numbers: dict[str, Any] | None = Field(
        description="The evidence: loss scale at save, the activation norm's course after it, loss after it."
    )
    verdict_final: bool = Field(description="No later step can change the verdict any more.")
    verdict_at: dt.datetime | None
    pinned: bool
    pinned_by: str | None = Field(
        description="Who set the pin state last: the orchestrator's automatic pin of the newest healthy "
        "checkpoint, or an operator."
    )
    metadata: dict[str, Any] = Field(validation_alias="meta")
    created_at: dt.datetime
    committed_at: dt.datetime | None


class RejectedCheckpoint(BaseModel):
    step: int
    reason: str


class RestartPreviewPublic(BaseModel):
    """What the orchestrator would restore now after a failure of this kind, and why (OPT's rule for a
    divergence; the newest intact checkpoint otherwise)."""

    run_id: int
    failure: Literal["divergence", "hardware", "hang"]
    divergence_onset: int | None = Field(description="The current divergence onset the rule cuts off at.")
    onset_source: str | None = Field(description="Where that onset was seen.")
    checkpoint: CheckpointPublic | None = Field(
        description="The checkpoint it would restore, with its stored verdict and pin; null: none."
    )
    fresh_start: bool = Field(description="Nothing to restore: it would start from scratch.")
    needs_attention: bool = Field(
        description="A divergence with no qualifying checkpoint: the run would need an operator."
    )
    reason: str
    rejected: list[RejectedCheckpoint] = Field(description="Newer checkpoints passed over, newest first.")


# ---- nodes and diagnostics --------------------------------------------------------------------------


class GpuSpec(Strict):
    index: int = Field(..., ge=0, le=1024)
    uuid: Annotated[str, StringConstraints(min_length=1, max_length=128)]
    model: Annotated[str, StringConstraints(min_length=1, max_length=128)]
    memory_mb: int = Field(..., ge=0, le=MAX_ID)


class NodeCreate(Strict):
    hostname: Hostname
    labels: dict[str, str] = Field(default_factory=dict)
    gpus: list[GpuSpec] = Field(default_factory=list, max_length=1024)

    @model_validator(mode="after")
    def _unique_gpu_indices(self) -> NodeCreate:
        if len({g.index for g in self.gpus}) != len(self.gpus):
            raise ValueError("GPU indices must be unique")
        return self


class GpuPublic(ORM):
    index: int
    uuid: str
    model: str
    memory_mb: int


class NodePublic(ORM):
    id: int
    hostname: str
    state: NodeState
    state_reason: str | None
    state_changed_at: dt.datetime
    labels: dict[str, Any]
    last_heartbeat_at: dt.datetime | None
    failure_count: int
    blame_count: int
    gpus: list[GpuPublic]


class NodeStateChange(Strict):
    reason: Reason


class DiagnosticPublic(ORM):
    id: int
    hostname: str
    kind: str
    level: str
    status: DiagnosticStatus
    reason: str | None
    measurements: dict[str, Any]
    sweep_id: str | None
    started_at: dt.datetime
    finished_at: dt.datetime | None


# ---- logbook and tokens ----------------------------------------------------------------------------


class NoteCreate(Strict):
    message: Annotated[str, StringConstraints(min_length=1, max_length=20_000, strip_whitespace=True)]
    run_id: int | None = Field(None, ge=1, le=MAX_ID)
    hostname: Hostname | None = None
    severity: Severity = Severity.info
    evidence: dict[str, Any] = Field(default_factory=dict)


class LogEntryPublic(ORM):
    id: int
    run_id: int | None
    node_id: int | None
    time: dt.datetime
    kind: LogKind
    severity: Severity
    author: str
    message: str
    evidence: dict[str, Any]


class TokenCreate(Strict):
    name: Name
    role: Role
    run_id: int | None = Field(None, ge=1, le=MAX_ID)


class TokenPublic(ORM):
    id: int
    name: str
    role: Role
    run_id: int | None
    created_at: dt.datetime
    revoked_at: dt.datetime | None


class TokenCreated(TokenPublic):
    token: str = Field(description="The secret; shown only now.")
