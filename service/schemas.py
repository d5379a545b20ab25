"""Request and response schemas of the REST API (XCreate / XPublic)."""

from __future__ import annotations

import datetime as dt
import json
import math
import time
from typing import Annotated, Any, Generic, Literal, Required, TypeVar

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
    field_validator,
    model_validator,
)
from typing_extensions import TypedDict

from service.sbatch_flags import check_sbatch_flags
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
from trainer.contract import (
    HEARTBEAT_BUSY_HISTORY,
    MAX_BEATS_PER_BATCH,
    METRIC_FLOAT_FIELDS,
    NAN_KEY,
    Section,
    check_run_hyperparameters,
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


# ---- limits (docs/security.md, "Limits") --------------------------------------------------------------
# Every request body is read whole before it is parsed, so its size is capped per route before a byte is
# parsed (service/api/body_guard.py), and every free-form field is bounded in shape so what is stored
# stays small enough to read back, render and scrape.
KIB = 1024
MIB = 1024 * KIB
DEFAULT_BODY_LIMIT_BYTES = 64 * KIB
# A logbook note may hold 20,000 characters; JSON-escaped non-ASCII text takes up to 12 bytes a character.
NOTE_BODY_LIMIT_BYTES = 256 * KIB

# Free-form JSON (checkpoint metadata, logbook evidence): nesting depth, keys plus values in all, characters
# in a string or key. Finite numbers only (JSON has no literal for NaN) and no lone UTF-16 surrogates (text
# that cannot be stored as UTF-8).
FREE_JSON_MAX_DEPTH = 8
FREE_JSON_MAX_NODES = 1000
FREE_JSON_MAX_STRING = 4096
FREE_JSON_MAX_KEY = 256

# Metric points: named values per point and characters in a name; the window a point's time must fall in.
MAX_POINTS_PER_BATCH = 10_000
MAX_VALUES_PER_POINT = 48  # the trainer's own signals take up to 33 (docs/reporting-contract.md)
MAX_VALUE_NAME_CHARS = 64
METRIC_TIME_MAX_PAST_S = 10 * 365 * 86_400  # a spool replayed long after; never 1970 or a negative time
METRIC_TIME_MAX_FUTURE_S = 86_400  # clock skew between hosts; a millisecond epoch is ~55,000 years ahead

# Hyper-parameters: how many, the characters of a name and of a string value.
MAX_HYPERPARAMETERS = 64
MAX_HYPERPARAMETER_NAME = 64
MAX_HYPERPARAMETER_STRING = 256


def _json_path(path: tuple[str | int, ...]) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".") or "(top level)"


def _has_lone_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def check_free_json(value: Any) -> Any:
    """Free-form JSON within FREE_JSON_* (depth, size, string length), finite numbers, storable text.

    Raises ValueError naming where in the value the problem is (pydantic puts the field in front)."""
    nodes = 0
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(value, ())]
    while stack:
        item, path = stack.pop()
        nodes += 1
        if nodes > FREE_JSON_MAX_NODES:
            raise ValueError(f"more than {FREE_JSON_MAX_NODES} keys and values in all")
        if len(path) > FREE_JSON_MAX_DEPTH:
            raise ValueError(f"nested deeper than {FREE_JSON_MAX_DEPTH} levels at {_json_path(path)}")
        if isinstance(item, dict):
            for key, child in item.items():
                key = str(key)
                if len(key) > FREE_JSON_MAX_KEY or _has_lone_surrogate(key):
                    raise ValueError(
                        f"a key at {_json_path(path)} is longer than {FREE_JSON_MAX_KEY} characters "
                        "or holds a lone UTF-16 surrogate"
                    )
                stack.append((child, (*path, key)))
        elif isinstance(item, list):
            stack.extend((child, (*path, i)) for i, child in enumerate(item))
        elif isinstance(item, str):
            if len(item) > FREE_JSON_MAX_STRING:
                raise ValueError(
                    f"string at {_json_path(path)} is longer than {FREE_JSON_MAX_STRING} characters"
                )
            if _has_lone_surrogate(item):
                raise ValueError(f"string at {_json_path(path)} holds a lone UTF-16 surrogate")
        elif isinstance(item, float) and not math.isfinite(item):
            raise ValueError(f"number at {_json_path(path)} is not finite")
    return value


FreeJson = Annotated[dict[str, Any], AfterValidator(check_free_json)]
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]


def _unix_seconds_near_now(value: float | None) -> float | None:
    """A metric point's time: finite Unix seconds within the window around the server's clock."""
    if value is None:
        return None
    now = time.time()
    if not (math.isfinite(value) and now - METRIC_TIME_MAX_PAST_S <= value <= now + METRIC_TIME_MAX_FUTURE_S):
        raise ValueError(
            f"time must be finite Unix seconds from {METRIC_TIME_MAX_PAST_S // (365 * 86_400)} years before "
            f"to {METRIC_TIME_MAX_FUTURE_S // 3600} hours after the server's clock (milliseconds are not "
            "seconds)"
        )
    return value


def _no_reserved_value_name(values: dict[str, Any] | None) -> dict[str, Any] | None:
    if values and NAN_KEY in values:
        raise ValueError(
            f'"{NAN_KEY}" is reserved: the server names NaN fields there (docs/reporting-contract.md); '
            "send a NaN loss as the loss itself, or null with values.nonfinite_loss = 1"
        )
    return values


def _largest_metric_batch_bytes() -> int:
    """The compact JSON size of the largest batch the metric schemas admit: MAX_POINTS_PER_BATCH points,
    each with every field at its widest (the longest float a float64 prints, MAX_STEP, MAX_VALUES_PER_POINT
    names of MAX_VALUE_NAME_CHARS characters)."""
    widest_float = -2.2250738585072014e-308
    point = {
        "step": MAX_STEP,
        "time": widest_float,
        "tokens": MAX_STEP,
        **dict.fromkeys(METRIC_FLOAT_FIELDS, widest_float),
        "values": {
            f"{i:03d}".ljust(MAX_VALUE_NAME_CHARS, "v"): widest_float for i in range(MAX_VALUES_PER_POINT)
        },
    }
    point_bytes = len(json.dumps(point, separators=(",", ":")))
    envelope = len(json.dumps({"attempt": MAX_ID, "points": []}, separators=(",", ":")))
    return envelope + MAX_POINTS_PER_BATCH * (point_bytes + 1)


# Rounded up to whole MiB; docs/reporting-contract.md states the figure (a test keeps them equal).
METRIC_BATCH_LIMIT_BYTES = -(-_largest_metric_batch_bytes() // MIB) * MIB


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


ShortText = Annotated[str, StringConstraints(min_length=1, max_length=256)]


class SlurmConfig(Strict):
    partition: Annotated[str, StringConstraints(max_length=128)] | None = None
    account: Annotated[str, StringConstraints(max_length=128)] | None = None
    time_limit: Annotated[str, StringConstraints(max_length=64)] | None = Field(
        None, description="sbatch --time, e.g. 2-00:00:00"
    )
    gpus_per_node: int = Field(0, ge=0, le=64)
    extra_sbatch_flags: list[ShortText] = Field(default_factory=list, max_length=64)
    placement: Literal["nodelist", "exclude"] = Field(
        "nodelist",
        description="nodelist: sbatch --nodelist of the hosts the orchestrator picks; exclude: sbatch "
        "--nodes=N --exclude=<hosts out of service>, Slurm places the job and the attempt's hosts follow.",
    )
    nodelist: list[Annotated[str, StringConstraints(min_length=1, max_length=200)]] = Field(
        default_factory=list,
        max_length=10_000,
        description="With placement=exclude: Slurm nodes the job must include (sbatch --nodelist): spares.",
    )

    @model_validator(mode="after")
    def _flags_refine_only(self) -> SlurmConfig:
        check_sbatch_flags(self.extra_sbatch_flags)  # service/sbatch_flags.py: what may not be overridden
        return self


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


Gate = Literal[
    "lr_cut",
    "clip_change",
    "loss_scale_reset",
    "data_skip",
    "long_rollback",
    "over_budget",
    "node_retirement",
]


# DecisionAwaitingApproval pages about a minute after a proposal (15 s scrape, 15 s evaluation, Alertmanager's
# 30 s group_wait): a shorter timeout would let `on_timeout: approve` act before anyone is paged
MIN_DECISION_TIMEOUT_S = 120.0


class ApprovalPolicy(Strict):
    """Which of the orchestrator's risky actions wait for a human (docs/orchestrator.md, "Approval gates").
    The default requires none: the orchestrator acts alone, as it always did."""

    require: list[Gate] = Field(
        default_factory=list,
        max_length=7,
        description="lr_cut (a lower LR scale), clip_change, loss_scale_reset, data_skip (skipping batches), "
        "long_rollback (further back than `rollback_steps`), over_budget (a restart past the restart budget "
        "or the crash-loop rule, which would otherwise page and stop), node_retirement (a host of the run "
        "charged past its lemon limit is cordoned, and retired only once approved).",
    )
    rollback_steps: int = Field(
        1000, ge=0, le=MAX_STEP, description="long_rollback: a restore more than this many steps back."
    )
    timeout_s: float = Field(
        1800.0,
        le=7 * 86_400,
        description=f"How long a proposal waits for a human (at least {MIN_DECISION_TIMEOUT_S:.0f} s: the "
        "page must reach on-call before the timeout decides).",
    )
    on_timeout: Literal["approve", "hold"] = Field(
        "hold",
        description="approve: carry the proposal out; hold: the run needs attention (nothing risky "
        "happens without a human).",
    )

    @field_validator("timeout_s")
    @classmethod
    def _time_to_be_paged(cls, value: float) -> float:
        if value < MIN_DECISION_TIMEOUT_S:
            raise ValueError(
                f"must be at least {MIN_DECISION_TIMEOUT_S:.0f} s: a pending decision pages on-call through "
                "Alertmanager about a minute after it is proposed, and the timeout must not decide before "
                "anyone could have been paged"
            )
        return value

    @model_validator(mode="after")
    def _gates_once(self) -> ApprovalPolicy:
        if len(set(self.require)) != len(self.require):
            raise ValueError("approvals.require names a gate more than once")
        return self


class RunConfig(Strict):
    """What to train and how to look after it."""

    preset: Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")] = (
        Field("tiny", description="Model preset: tiny, small, 125M ... 175B (OPT Table 1).")
    )
    target_steps: int = Field(..., ge=1, le=10_000_000_000)
    target_tokens: int | None = Field(None, ge=1, le=MAX_STEP)
    checkpoint_interval: int = Field(10, ge=1, le=MAX_STEP, description="Steps between checkpoints.")
    launcher: Literal["local", "slurm"] = "local"
    host_count: int = Field(2, ge=1, le=100_000)
    procs_per_host: int = Field(1, ge=1, le=64)
    precision: Literal["fp16", "fp16-mixed", "bf16", "fp32"] = Field(
        "fp16",
        description="fp16: OPT's format (fp16 weights and reduction, fp32 Adam moments, OPT's loss scaler); "
        "fp16-mixed: fp16 compute over fp32 master weights; bf16; fp32 (docs/trainer.md, Number formats).",
    )
    hyperparameters: dict[
        Annotated[str, StringConstraints(min_length=1, max_length=MAX_HYPERPARAMETER_NAME)],
        FiniteFloat | int | Annotated[str, StringConstraints(max_length=MAX_HYPERPARAMETER_STRING)] | bool,
    ] = Field(
        default_factory=dict,
        max_length=MAX_HYPERPARAMETERS,
        description="The training recipe passed to the trainer: lr, seq_len, micro_batch_size, warmup_steps, "
        "weight_decay, seed, ... (trainer/contract.py RUN_HYPERPARAMETERS lists them; others are a 422).",
    )
    max_restarts: int = Field(
        20, ge=0, le=1_000_000, description="Restart budget before the run needs attention."
    )
    slurm: SlurmConfig | None = None
    faults: list[ShortText] = Field(
        default_factory=list,
        max_length=64,
        description="Fault injection specs (tests and demo): `ATTEMPT:SPEC` injects SPEC into that attempt "
        "only (a bare SPEC: attempt 1); `step=+N` counts N steps from the attempt's restore point.",
    )
    hang: HangOverrides | None = Field(
        None, description="Per-run hang limits (14 s steps, 2-minute saves); unset = the orchestrator's."
    )
    approvals: ApprovalPolicy | None = Field(
        None, description="Risky actions that wait for a human's approval; unset = none (fully automatic)."
    )

    @model_validator(mode="after")
    def _recipe_only(self) -> RunConfig:
        # Each key becomes a trainer flag after the orchestrator's own: paths and levers stay out.
        check_run_hyperparameters(self.hyperparameters)
        if self.precision == "fp16" and self.hyperparameters.get("grad_predivide") is False:
            # the trainer would refuse it at every launch (exit 2): fp16 always pre-divides its reduction
            raise ValueError(
                "hyperparameters.grad_predivide: precision fp16 always pre-divides its fp16 gradient "
                "reduction (as OPT did); use precision fp16-mixed to turn it off"
            )
        return self


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
        le=MAX_ID,
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


class DecisionOverrides(Strict):
    """An operator's own levers, in place of the proposal's (the restart request's, less the checkpoint)."""

    lr: float | None = Field(None, gt=0, le=1.0, description="Absolute peak LR from now on.")
    lr_scale: float | None = Field(None, gt=0, le=10.0, description="Multiply the schedule's LR from now on.")
    clip: float | None = Field(None, gt=0, le=100.0, description="Gradient-norm clipping threshold.")
    reset_loss_scale: bool | None = None
    skip_batches: int | None = Field(None, ge=0, le=10_000_000)


class DecisionApprove(Strict):
    reason: ShortText | None = Field(None, description="Why (kept in the logbook).")
    overrides: DecisionOverrides | None = Field(
        None, description="Carry the proposal out with these levers changed."
    )


class DecisionReject(Strict):
    reason: Reason
    overrides: DecisionOverrides | None = Field(
        None,
        description="Restart with these levers instead of the proposal's; without them the run holds "
        "(needs attention).",
    )


class DecisionPublic(ORM):
    id: int
    run_id: int
    status: DecisionStatus
    gates: list[str]
    reason: str
    proposal: dict[str, Any]
    evidence: dict[str, Any]
    on_timeout: str
    created_at: dt.datetime
    expires_at: dt.datetime
    decided_by: str | None
    decided_at: dt.datetime | None
    decision_reason: str | None
    operator_overrides: dict[str, Any] | None
    consumed_at: dt.datetime | None
    consumed_by_attempt: int | None


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
    time: Annotated[
        float | None,
        Field(
            description="Unix seconds, finite, within 10 years before and a day after the server's clock; "
            "server time when absent."
        ),
        AfterValidator(_unix_seconds_near_now),
    ]
    tokens: Annotated[int | None, Field(ge=0, le=MAX_STEP)]
    loss: float | None
    grad_norm: float | None
    loss_scale: float | None
    act_norm: Annotated[
        float | None,
        Field(
            description="The final layer's activation norm as trainops defined it first: the "
            "root-mean-square over tokens of each token's L2 norm."
        ),
    ]
    lr: float | None
    clip: float | None
    tokens_per_s: float | None
    tflops_per_gpu: float | None
    step_time_s: float | None
    actv_norm: Annotated[
        float | None,
        Field(
            description="The final layer's activation norm as metaseq (OPT's logbook) defines it: the mean "
            "over tokens of each token's L2 norm. What the divergence detector and restart rule read."
        ),
    ]
    values: Annotated[
        dict[
            Annotated[str, StringConstraints(min_length=1, max_length=MAX_VALUE_NAME_CHARS)],
            FiniteFloat | int | None,
        ]
        | None,
        Field(
            max_length=MAX_VALUES_PER_POINT,
            description=f"Other named values: finite numbers or null, at most {MAX_VALUES_PER_POINT} names "
            f'of at most {MAX_VALUE_NAME_CHARS} characters; "{NAN_KEY}" is reserved.',
        ),
        AfterValidator(_no_reserved_value_name),
    ]


METRIC_POINT = TypeAdapter(MetricPoint)


class MetricBatch(Strict):
    attempt: int = Field(..., ge=1, le=MAX_ID)
    points: list[MetricPoint] = Field(..., max_length=MAX_POINTS_PER_BATCH)

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
                            "actv_norm": 40.7,
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
    actv_norm: float | None = None
    values: dict[str, Any] | None


class MetricSeries(ORM):
    run_id: int
    total: int = Field(description="Rows in the requested range.")
    skipped: int = Field(
        0,
        description="Stored rows in the range that could not be read (a bad time or values), left out.",
    )
    bucket_steps: int = Field(description="Steps averaged per returned point; 1 = raw rows.")
    points: list[MetricPublic]


# Heartbeats (docs/reporting-contract.md, "Heartbeats"): the orchestrator's one source for hangs and
# stragglers, so every field it reads is bounded here.
MAX_RANK = 1_000_000
HEARTBEAT_MAX_SECONDS = 1_000_000.0  # a step time, a busy time: beyond 11 days is a broken clock, not a step
HeartbeatSeconds = Annotated[float, Field(ge=0, le=HEARTBEAT_MAX_SECONDS, allow_inf_nan=False)]


class RankBeat(TypedDict, total=False):
    """One rank's beat. A TypedDict, not a model, for the same reason as `MetricPoint`: a batch carries up
    to MAX_BEATS_PER_BATCH of them."""

    __pydantic_config__ = ConfigDict(extra="forbid")  # type: ignore[misc]

    rank: Required[Annotated[int, Field(ge=0, le=MAX_RANK)]]
    step: Required[Annotated[int, Field(ge=0, le=MAX_STEP)]]
    time: Annotated[
        float | None,
        Field(
            description="Unix seconds (the rank's clock) when its training loop recorded the beat; the "
            "metric time rules; server time when absent."
        ),
        AfterValidator(_unix_seconds_near_now),
    ]
    section: Annotated[Section, Field(description="Where the rank is; absent = step.")]
    host: Hostname | None
    pid: Annotated[int | None, Field(ge=1, le=MAX_ID)]
    step_time_s: HeartbeatSeconds | None
    last_step_s: HeartbeatSeconds | None
    busy_s: Annotated[
        list[tuple[Annotated[int, Field(ge=0, le=MAX_STEP)], HeartbeatSeconds]] | None,
        Field(
            max_length=HEARTBEAT_BUSY_HISTORY,
            description="The last steps' [step, busy seconds], oldest first, "
            f"at most {HEARTBEAT_BUSY_HISTORY}.",
        ),
    ]


class HeartbeatBatch(Strict):
    """Ranks' beats of one attempt in one request (a host's ranks, a relay, the fleet simulator). The single
    form, one beat's fields beside `attempt`, is read as a batch of one."""

    attempt: int = Field(..., ge=1, le=MAX_ID)
    beats: list[RankBeat] = Field(..., min_length=1, max_length=MAX_BEATS_PER_BATCH)

    @model_validator(mode="before")
    @classmethod
    def _single_form_as_batch(cls, data: Any) -> Any:
        if isinstance(data, dict) and "beats" not in data and "rank" in data:
            beat = {k: v for k, v in data.items() if k != "attempt"}
            return {"attempt": data.get("attempt"), "beats": [beat]}
        return data

    @model_validator(mode="after")
    def _one_beat_per_rank(self) -> HeartbeatBatch:
        # One row per rank: PostgreSQL's ON CONFLICT DO UPDATE may not touch a row twice in one statement.
        seen: set[int] = set()
        for beat in self.beats:
            if beat["rank"] in seen:
                raise ValueError(f"rank {beat['rank']} has more than one beat in this batch; send its newest")
            seen.add(beat["rank"])
        return self


def _largest_heartbeat_batch_bytes() -> int:
    """The compact JSON size of the largest batch the heartbeat schemas admit: MAX_BEATS_PER_BATCH beats,
    each with every field at its widest."""
    widest_float = -2.2250738585072014e-308
    beat = {
        "rank": MAX_RANK,
        "step": MAX_STEP,
        "time": widest_float,
        "section": max((s.value for s in Section), key=len),
        "host": "h" * 255,
        "pid": MAX_ID,
        "step_time_s": widest_float,
        "last_step_s": widest_float,
        "busy_s": [[MAX_STEP, widest_float]] * HEARTBEAT_BUSY_HISTORY,
    }
    beat_bytes = len(json.dumps(beat, separators=(",", ":")))
    envelope = len(json.dumps({"attempt": MAX_ID, "beats": []}, separators=(",", ":")))
    return envelope + MAX_BEATS_PER_BATCH * (beat_bytes + 1)


# Rounded up to whole MiB; docs/reporting-contract.md states the figure (a test keeps them equal).
HEARTBEAT_BATCH_LIMIT_BYTES = -(-_largest_heartbeat_batch_bytes() // MIB) * MIB


class HeartbeatPublic(ORM):
    attempt: int
    rank: int
    host: str | None
    step: int
    time: dt.datetime
    section: str
    pid: int | None
    step_time_s: float | None
    last_step_s: float | None
    busy_s: list[Any] | None
    received_at: dt.datetime | None


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
    metadata: FreeJson = Field(default_factory=dict)


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
    labels: dict[
        Annotated[str, StringConstraints(min_length=1, max_length=128)],
        Annotated[str, StringConstraints(max_length=1024)],
    ] = Field(default_factory=dict, max_length=64)
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
    evidence: FreeJson = Field(default_factory=dict)


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
    expires_at: AwareDatetime | None = Field(
        None, description="When the token stops authenticating (401 `token expired`); null = never."
    )


class TokenPublic(ORM):
    id: int
    name: str
    role: Role
    run_id: int | None
    attempt_id: int | None = Field(description="For a trainer token, the attempt it was made for.")
    created_at: dt.datetime
    revoked_at: dt.datetime | None
    expires_at: dt.datetime | None


class TokenCreated(TokenPublic):
    token: str = Field(description="The secret; shown only now.")
