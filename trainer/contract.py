"""The trainer <-> orchestrator contract in code: the twin of docs/reporting-contract.md.

Both sides build against this module: the trainer (trainer/train.py, launch.py, reporting.py, telemetry.py)
writes what it defines, the control plane (service/orchestrator/*, service/crud/telemetry.py) reads it.
It imports nothing from service/ and nothing heavier than the standard library.

- Exit codes: `EXIT_OK`, `EXIT_CONFIG`, `EXIT_CHECKPOINT_CORRUPT`, `EXIT_DIVERGED`, `EXIT_LOSS_SCALE_FLOOR`.
- Run-directory layout: `checkpoints_dir`, `spool_dir`, `metrics_dir`, `metrics_path`, `attempt_dir`,
  `cache_dir`, `faults_dir`, `trainer_log_path`, `summary_path`, `overrides_path`.
- Heartbeats (POST /runs/{id}/heartbeats, the orchestrator's one source for hangs and stragglers): `Section`,
  `HeartbeatRecord`, `heartbeat_record`, `HEARTBEAT_BUSY_HISTORY`, `MAX_BEATS_PER_BATCH`,
  `HEARTBEAT_SEND_INTERVAL_S`, `heartbeat_batch`.
- Metric points: `MetricPoint`, `METRIC_WIDE_FIELDS`, `METRIC_FLOAT_FIELDS`, `json_safe_point`
  (what the reporter sends: strict JSON, a non-finite loss flagged in `values.nonfinite_loss`).
- Non-finite encoding of stored points: `NAN_KEY`, `encode_nonfinite`, `decode_nan_names`,
  `decode_nonfinite`.
- Spool: `Spool`, `SpoolKind`, `metrics_spool_record`, `checkpoint_spool_record`, `parse_spool_record`.
- Trainer flags the orchestrator sets: `ORCHESTRATOR_TRAINER_FIELDS`, `trainer_flag`, `negated_trainer_flag`.
"""

from __future__ import annotations

import enum
import json
import math
import os
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

# -- exit codes of trainer.train and trainer.launch -------------------------------------------------------
EXIT_OK = 0  # reached its target
EXIT_CONFIG = 2  # bad configuration / arguments: permanent, restarting cannot help
# the checkpoint --resume-from names failed the ranks' re-hash at load (its bytes do not match its manifest):
# the orchestrator marks it corrupt and restarts from another
EXIT_CHECKPOINT_CORRUPT = 3
EXIT_DIVERGED = 42  # non-finite loss on some rank (metrics flushed first)
# fp16 (OPT's format): an overflow would have taken the dynamic loss scale to or below --min-loss-scale, the
# point where metaseq stopped training ("Minimum loss scale reached"); every rank sees the same verdict (the
# reduced gradient norm), the step's metric point carries `values.loss_scale_floor` = 1, metrics are flushed
# first. The orchestrator treats it as a divergence, like EXIT_DIVERGED.
EXIT_LOSS_SCALE_FLOOR = 43
LOSS_SCALE_FLOOR_VALUE = "loss_scale_floor"  # the `values` name of that event in the step's metric point
# precision fp16's --min-loss-scale when a run leaves it unset (metaseq's `min_loss_scale` when OPT-175B
# trained); the control plane reads it to know where a run's trainer stops (service/recovery/config.py)
OPT_MIN_LOSS_SCALE = 1e-4
# anything else is a crash; 128 + N (or -N from Popen) is death by signal N


def root_cause_exit_code(failed_codes_by_time: Sequence[int]) -> int:
    """The exit code a multi-rank attempt reports from its failed ranks' codes (earliest first), as torchrun
    reports a failed worker group, with the trainer's deliberate verdicts first: EXIT_DIVERGED when any rank
    diverged, else EXIT_LOSS_SCALE_FLOOR, else EXIT_CONFIG when every failed rank refused its configuration,
    else EXIT_CHECKPOINT_CORRUPT when any rank found its restore point corrupt (its peers' deaths follow from
    it: a peer inside a collective when it left aborts, a signal that can be stamped earlier), else the code
    of the rank that failed first."""
    codes = list(failed_codes_by_time)
    if not codes:
        return 1
    for verdict in (EXIT_DIVERGED, EXIT_LOSS_SCALE_FLOOR):
        if verdict in codes:
            return verdict
    if all(code == EXIT_CONFIG for code in codes):
        return EXIT_CONFIG
    if EXIT_CHECKPOINT_CORRUPT in codes:
        return EXIT_CHECKPOINT_CORRUPT
    return codes[0]


# -- run-directory layout: <run_dir>/... ------------------------------------------------------------------
CHECKPOINTS_DIR = "checkpoints"
SPOOL_DIR = "spool"
METRICS_DIR = "metrics"
ATTEMPTS_DIR = "attempts"
CACHE_DIR = "cache"
FAULTS_DIR = "faults"
TRAINER_LOG = "trainer.log"
SUMMARY_FILE = "summary.json"
OVERRIDES_FILE = "overrides.jsonl"
SPOOL_PENDING_FILE = "pending.jsonl"
SPOOL_REJECTED_FILE = "rejected.jsonl"


def checkpoints_dir(run_dir: Path) -> Path:
    return run_dir / CHECKPOINTS_DIR


def spool_dir(run_dir: Path) -> Path:
    return run_dir / SPOOL_DIR


def metrics_dir(run_dir: Path) -> Path:
    return run_dir / METRICS_DIR


def metrics_path(run_dir: Path, rank: int) -> Path:
    return metrics_dir(run_dir) / f"rank{rank}.jsonl"


def attempt_dir(run_dir: Path, attempt: int) -> Path:
    """Where the launcher keeps one attempt's files (exit status, logs): attempts/0003/."""
    return run_dir / ATTEMPTS_DIR / f"{attempt:04d}"


def cache_dir(run_dir: Path) -> Path:
    return run_dir / CACHE_DIR


def faults_dir(run_dir: Path) -> Path:
    return run_dir / FAULTS_DIR


def trainer_log_path(run_dir: Path) -> Path:
    return run_dir / TRAINER_LOG


def summary_path(run_dir: Path) -> Path:
    return run_dir / SUMMARY_FILE


def overrides_path(run_dir: Path) -> Path:
    return run_dir / OVERRIDES_FILE


# -- heartbeats: POST /runs/{id}/heartbeats, stored latest per (run, attempt, rank) ------------------------
# Each rank's training loop records its beat (never a thread: a hung loop leaves a stale `time`); a reporter
# thread only transports the newest one. The control plane's table is what the orchestrator reads.
HEARTBEAT_BUSY_HISTORY = 16  # [step, busy seconds] pairs a beat carries at most
MAX_BEATS_PER_BATCH = 1024  # beats one request may carry (a host's ranks, or a relay's)
# Every rank (re)sends its newest beat this often, unchanged when its loop recorded nothing new, so the
# control plane's `received_at` shows the path is alive while the beat's `time` shows whether the loop is.
HEARTBEAT_SEND_INTERVAL_S = 2.0
# The orchestrator sets each attempt's interval in this environment variable: longer than the default on a
# fleet too big for the control plane's heartbeat request budget (docs/reporting-contract.md, "Heartbeats").
HEARTBEAT_INTERVAL_ENV = "TRAINOPS_HEARTBEAT_INTERVAL_S"


def heartbeat_interval_from_env(environ: Mapping[str, str]) -> float:
    """The send interval the orchestrator gave this attempt; HEARTBEAT_SEND_INTERVAL_S when unset. A value
    that is not a positive number is refused (ValueError): sending too often would flood the control plane
    and too rarely would read as a hang."""
    raw = environ.get(HEARTBEAT_INTERVAL_ENV)
    if raw is None or not raw.strip():
        return HEARTBEAT_SEND_INTERVAL_S
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{HEARTBEAT_INTERVAL_ENV}={raw!r} is not a positive number of seconds")
    return value


class Section(enum.StrEnum):
    """Where a rank is; the orchestrator holds each to its own hang limit."""

    STARTUP = "startup"  # process start, model build, checkpoint load, until the first step is done
    STEP = "step"
    CHECKPOINT_SAVE = "checkpoint_save"
    VALIDATION = "validation"


class HeartbeatRecord(TypedDict):
    step: int
    time: float  # Unix seconds (the rank's clock): the loop finished `step`, or entered `section`
    section: str  # a Section value
    step_time_s: float | None  # trailing mean (5 steps) of the rank's busy time per step
    last_step_s: float | None  # wall time of the rank's last step
    busy_s: list[list[float]]  # the last HEARTBEAT_BUSY_HISTORY steps' [step, busy seconds], oldest first
    host: str
    pid: int
    rank: int


def heartbeat_record(
    *,
    step: int,
    time: float,
    section: str,
    step_time_s: float | None,
    last_step_s: float | None,
    busy: Sequence[tuple[int, float]],
    host: str,
    pid: int,
    rank: int,
) -> HeartbeatRecord:
    """One beat as the API takes it: non-finite timings become null (JSON has no NaN; the API refuses it),
    and only the newest HEARTBEAT_BUSY_HISTORY busy pairs are kept."""
    return {
        "step": step,
        "time": time,
        "section": str(section),
        "step_time_s": finite_or_none(step_time_s),
        "last_step_s": finite_or_none(last_step_s),
        "busy_s": [[s, round(b, 6)] for s, b in list(busy)[-HEARTBEAT_BUSY_HISTORY:] if math.isfinite(b)],
        "host": host,
        "pid": pid,
        "rank": rank,
    }


def heartbeat_batch(attempt: int, beats: Sequence[HeartbeatRecord]) -> dict[str, Any]:
    """The body of one heartbeat request for up to MAX_BEATS_PER_BATCH beats of distinct ranks."""
    if len(beats) > MAX_BEATS_PER_BATCH:
        raise ValueError(f"{len(beats)} beats: at most {MAX_BEATS_PER_BATCH} go in one request")
    return {"attempt": attempt, "beats": list(beats)}


# -- metric points: POST /runs/{id}/metrics, the spool, metrics/rank{R}.jsonl -----------------------------
class MetricPoint(TypedDict, total=False):
    step: int  # the only required field; everything else null/absent = not measured
    time: float
    tokens: int
    loss: float | None
    grad_norm: float | None
    loss_scale: float | None
    act_norm: float | None  # RMS over tokens of the final block's per-token L2 norm (trainops' original)
    lr: float | None
    clip: float | None
    tokens_per_s: float | None
    tflops_per_gpu: float | None
    step_time_s: float | None
    actv_norm: (
        float | None
    )  # mean over tokens of the same norms: metaseq's `actv_norm` (since migration 0009)
    values: dict[str, Any]


METRIC_WIDE_FIELDS = (
    "tokens",
    "loss",
    "grad_norm",
    "loss_scale",
    "act_norm",
    "lr",
    "clip",
    "tokens_per_s",
    "tflops_per_gpu",
    "step_time_s",
    "actv_norm",
)
METRIC_FLOAT_FIELDS = METRIC_WIDE_FIELDS[1:]
NONFINITE_LOSS_FLAG = "nonfinite_loss"  # values key the reporter sets (1.0) when the loss was not finite

# The final layer's activation norm, in two definitions (docs/reporting-contract.md, "Training signals"):
# `actv_norm`, metaseq's mean per-token L2 norm, which OPT's logbook reports and the recovery rules read,
# and `act_norm`, trainops' original root-mean-square of the same norms, kept so rows stored before
# migration 0009 (which have only it) are never read as the other. Both average per-token L2 norms (none is
# divided by sqrt(d_model)): mean <= RMS, equal when every token's norm is the same.
ACT_NORM_MEAN_L2 = "actv_norm"
ACT_NORM_RMS = "act_norm"

# Named values the trainer adds to each point with telemetry on (metaseq's names where it has one):
# `loss_bits` (the loss in bits, metaseq's `loss`), `tok_norm`/`pos_norm`/`emb_norm` (mean per-token L2
# norm of the token and position embeddings and their sum), `param_norm`, per layer group G of
# TRAINER_LAYER_GROUPS `gnorm_G`/`gmax_G`/`gzero_G`, `clipped` and `clip_frac`, and on CUDA
# `cuda_gb_allocated`/`cuda_gb_reserved`/`cuda_gb_free` (trainer/telemetry.py defines each).
TRAINER_LAYER_GROUPS = ("embed", "lower", "upper", "head")
TRAINER_SIGNAL_VALUES = (
    "loss_bits",
    "tok_norm",
    "pos_norm",
    "emb_norm",
    "param_norm",
    *(f"{kind}_{group}" for kind in ("gnorm", "gmax", "gzero") for group in TRAINER_LAYER_GROUPS),
    "clipped",
    "clip_frac",
    "cuda_gb_allocated",
    "cuda_gb_reserved",
    "cuda_gb_free",
)


def finite_or_none(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def json_safe_point(point: Mapping[str, Any]) -> dict[str, Any]:
    """What the trainer sends: strict JSON, non-finite numbers become null (not measured / not
    representable), and a non-finite loss sets `values.nonfinite_loss` = 1.0."""
    out = {k: finite_or_none(v) if isinstance(v, float) else v for k, v in point.items() if k != "values"}
    out["values"] = {k: finite_or_none(v) for k, v in point["values"].items()}
    if point["loss"] is not None and not math.isfinite(point["loss"]):
        out["values"][NONFINITE_LOSS_FLAG] = 1.0
    return out


# -- non-finite encoding of stored points ------------------------------------------------------------------
# SQLite turns NaN into NULL, and a NaN loss is the very signal of a divergence: a NaN wide field is stored
# as NULL on every backend and named in values["nan"], from which reads restore it. +-Infinity is stored as
# it is (float8 and REAL hold it).
NAN_KEY = "nan"


def encode_nonfinite(point: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """(the point as stored, the names of its NaN float fields). Without NaN the point is returned as is."""
    nan_names = [f for f in METRIC_FLOAT_FIELDS if isinstance(point.get(f), float) and math.isnan(point[f])]
    if not nan_names:
        return dict(point), []
    values = dict(point.get("values") or {})
    values[NAN_KEY] = nan_names
    return {**point, **dict.fromkeys(nan_names), "values": values}, nan_names


def decode_nan_names(values: object) -> frozenset[str]:
    """The float fields a stored `values` names as NaN. Robust to malformed rows: anything but a dict whose
    `nan` is a list of strings names none (never raises, never invents a NaN); names that are not float
    fields are ignored."""
    if not isinstance(values, Mapping):
        return frozenset()
    names = values.get(NAN_KEY)
    if not isinstance(names, list | tuple) or not all(isinstance(n, str) for n in names):
        return frozenset()
    return frozenset(names).intersection(METRIC_FLOAT_FIELDS)


def decode_nonfinite(stored: Mapping[str, Any]) -> dict[str, Any]:
    """A stored point (wide fields and `values`) with its NaN fields restored."""
    out = dict(stored)
    for name in decode_nan_names(stored.get("values")):
        out[name] = math.nan
    return out


# -- spool: <run_dir>/spool/pending.jsonl, records the reporter could not deliver -------------------------
class SpoolKind(enum.StrEnum):
    METRICS = "metrics"  # {"kind": "metrics", "attempt": 3, "point": {...}}
    CHECKPOINT = "checkpoint"  # {"kind": "checkpoint", "body": {"attempt": 3, ...}}


def metrics_spool_record(attempt: int, point: Mapping[str, Any]) -> dict[str, Any]:
    return {"kind": SpoolKind.METRICS.value, "attempt": attempt, "point": point}


def checkpoint_spool_record(attempt: int, body: Mapping[str, Any]) -> dict[str, Any]:
    return {"kind": SpoolKind.CHECKPOINT.value, "body": {"attempt": attempt, **body}}


@dataclass(frozen=True)
class SpooledMetricPoint:
    attempt: int
    point: Mapping[str, Any]


@dataclass(frozen=True)
class SpooledCheckpoint:
    body: Mapping[str, Any]


def parse_spool_record(record: object) -> SpooledMetricPoint | SpooledCheckpoint | None:
    """One spool record; None for a kind this version does not know (skipped). Raises ValueError for a
    malformed record (not an object, no kind, a metrics record without an integer attempt or an object
    point, a checkpoint without an object body)."""
    if not isinstance(record, Mapping) or "kind" not in record:
        raise ValueError(f"not a spool record: {record!r:.200}")
    kind = record["kind"]
    if kind == SpoolKind.METRICS:
        point, attempt = record.get("point"), record.get("attempt")
        if not isinstance(point, Mapping):
            raise ValueError("metrics record without a point object")
        try:
            return SpooledMetricPoint(attempt=int(attempt), point=point)  # type: ignore[arg-type]
        except (TypeError, ValueError) as exc:
            raise ValueError(f"metrics record with attempt {attempt!r}") from exc
    if kind == SpoolKind.CHECKPOINT:
        body = record.get("body")
        if not isinstance(body, Mapping):
            raise ValueError("checkpoint record without a body object")
        return SpooledCheckpoint(body=body)
    return None


class Spool:
    """Append-only JSONL of undelivered records, rewritten atomically after a (partial) replay."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / SPOOL_PENDING_FILE
        self.rejected = directory / SPOOL_REJECTED_FILE
        self.lock = threading.Lock()

    def append(self, records: Iterable[Mapping[str, Any]]) -> None:
        lines = "".join(json.dumps(r) + "\n" for r in records)
        if not lines:
            return
        with self.lock, self.path.open("a") as f:
            f.write(lines)
            f.flush()
            os.fsync(f.fileno())

    def read(self) -> list[Any]:
        """Every whole line's JSON value, in order (a line torn by a crash mid-append is skipped)."""
        with self.lock:
            if not self.path.exists():
                return []
            lines = self.path.read_text().splitlines()
        out = []
        for line in lines:
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def drop_first(self, n: int) -> None:
        """Remove the first n records (delivered), keeping anything appended meanwhile."""
        with self.lock:
            lines = self.path.read_text().splitlines(keepends=True) if self.path.exists() else []
            rest = lines[n:]
            tmp = self.path.with_name(".pending.tmp")
            tmp.write_text("".join(rest))
            os.replace(tmp, self.path)

    def reject(self, records: Iterable[Mapping[str, Any]], reason: str) -> None:
        with self.lock, self.rejected.open("a") as f:
            f.write("".join(json.dumps({"reason": reason, **r}) + "\n" for r in records))


# -- trainer flags the orchestrator sets (service/orchestrator/launchers/base.py build_trainer_args) ------
# Each is a trainer.config.TrainConfig field (tests/trainer/test_contract.py checks); a run's
# `hyperparameters` may pass only the fields of RUN_HYPERPARAMETERS below.
ORCHESTRATOR_TRAINER_FIELDS: frozenset[str] = frozenset(
    {
        "preset",
        "max_steps",
        "checkpoint_interval",
        "precision",
        "run_dir",
        "resume_from",
        "lr_scale",
        "lr",
        "clip",
        "reset_loss_scale",
        "skip_batches",
        "fault",
    }
)


# -- what a run's `hyperparameters` may set ------------------------------------------------------------------
# The training recipe only. Each becomes a trainer flag after the orchestrator's own, so anything that names
# files or places (run_dir, resume_from, corpus, tokenizer_dir), the operator's levers (lr_scale,
# skip_batches, reset_loss_scale), the run config's own fields (preset, max_steps, precision,
# checkpoint_interval, fault) and what the orchestrator relies on (telemetry, device) stay out: a client
# could otherwise point a run at another run's files or blind its watcher. Value kinds: int, float (an int
# is accepted), bool, or the tuple of allowed strings. tests/trainer/test_contract.py checks each against
# TrainConfig.
RUN_HYPERPARAMETERS: Mapping[str, type | tuple[str, ...]] = {
    "seq_len": int,
    "micro_batch_size": int,
    "global_batch_tokens": int,
    "lr": float,
    "warmup_steps": int,
    "total_tokens": int,
    "min_lr_ratio": float,
    "weight_decay": float,
    "weight_decay_all_params": bool,
    "beta1": float,
    "beta2": float,
    "adam_eps": float,
    "clip": float,
    "grad_predivide": bool,
    "initial_loss_scale": float,
    "loss_scale_window": int,
    "min_loss_scale": float,
    "dropout": float,
    "seed": int,
    "checkpoint_mode": ("async", "sync"),
    "keep_checkpoints": int,
    "val_interval": int,
    "val_batches": int,
    "bpe_vocab_size": int,
    "peak_tflops": float,
    "threads": int,
    "pg_timeout_s": float,
    "report_interval_s": float,
}


def check_run_hyperparameters(values: Mapping[str, Any]) -> None:
    """Raise ValueError naming the first key a run's `hyperparameters` may not set, or whose value is of the
    wrong kind (the API answers 422 with it)."""
    for key, value in values.items():
        kind = RUN_HYPERPARAMETERS.get(key)
        if kind is None:
            raise ValueError(
                f"hyperparameters.{key}: not a hyperparameter a run may set; allowed: "
                + ", ".join(sorted(RUN_HYPERPARAMETERS))
            )
        if isinstance(kind, tuple):
            ok = value in kind
            expected = " or ".join(repr(k) for k in kind)
        elif kind is bool:
            ok, expected = isinstance(value, bool), "true or false"
        elif kind is int:
            ok, expected = isinstance(value, int) and not isinstance(value, bool), "an integer"
        else:
            ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
            expected = "a finite number"
        if not ok:
            raise ValueError(f"hyperparameters.{key}: must be {expected}, not {value!r}")
    if "keep_checkpoints" in values and values["keep_checkpoints"] < 2:
        raise ValueError("hyperparameters.keep_checkpoints: must be >= 2 (as the trainer requires)")


def trainer_flag(field_name: str) -> str:
    """The trainer's command-line flag for a TrainConfig field: max_steps -> --max-steps."""
    return "--" + field_name.replace("_", "-")


def negated_trainer_flag(field_name: str) -> str:
    """The flag that sets a boolean TrainConfig field false: telemetry -> --no-telemetry."""
    return "--no-" + field_name.replace("_", "-")
