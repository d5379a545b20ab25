"""Every Prometheus metric trainops exports, in one place: `trainops_<thing>_<unit>`, small label sets.

Two kinds live here:

* request-path instruments (histograms and counters, and the orchestrator's leader gauge) that processes
  update as they work; with several processes they are aggregated by prometheus_client's multiprocess mode
  (see service/observability.py);
* the definitions (name, help, labels) of the per-run, per-node and per-GPU gauges read from the control
  plane's database at scrape time; the collector that reads them, ``ControlPlaneCollector``, lives in
  service/metrics_collector.py, so this module holds instruments and definitions only and imports nothing
  of the control plane.

Labels are limited to bounded sets: run (name), node (hostname), gpu (index), reason, phase, state,
check, queue, failure_class, outcome, plus method/route/status on the request histogram. Never step
numbers or error text.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

from health.metrics import CHECK_DURATION, CHECKS_TOTAL, TASK_DURATION

# ---- request-path instruments (multiprocess-safe: histograms and counters only) ------------------------

HTTP_REQUEST_DURATION = Histogram(
    "trainops_http_request_duration_seconds",
    "API request latency by route template and status class.",
    ["method", "route", "status"],
    buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
METRIC_POINTS_INGESTED = Counter(
    "trainops_metric_points_ingested_total",
    "Per-step metric rows accepted from trainers (duplicates excluded).",
)
METRIC_POINTS_DUPLICATE = Counter(
    "trainops_metric_points_duplicate_total",
    "Per-step metric rows re-sent by trainers and ignored.",
)
ORCHESTRATOR_LOOP_DURATION = Histogram(
    "trainops_orchestrator_loop_duration_seconds",
    "Duration of one reconcile pass of the orchestrator over every run.",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
)
ORCHESTRATOR_FAILED_PASSES = Counter(
    "trainops_orchestrator_failed_passes_total",
    "Reconcile passes of one run that raised, by stage (observe, decide, apply) and whether the error was "
    "transient (database or network); the run is retried with back-off.",
    ["stage", "transient"],
)
ORCHESTRATOR_RUNS_ESCALATED = Counter(
    "trainops_orchestrator_escalated_runs_total",
    "Runs put in needs_attention (and paged) because their reconcile passes kept failing.",
)
ORCHESTRATOR_LAUNCHES_DEFERRED = Counter(
    "trainops_orchestrator_launches_deferred_total",
    "Launches a reconcile pass left to the next one because it had spent its launch budget "
    "(`launch_budget_s`): a burst of new runs never holds up the detection of the running ones.",
)
ORCHESTRATOR_LEADER = Gauge(
    "trainops_orchestrator_leader",
    "1 while this orchestrator process leads (reconciles), 0 while it stands by (docs/orchestrator.md, "
    "Failover). Summed over an orchestrator host's live processes in multiprocess mode.",
    multiprocess_mode="livesum",
)
ORCHESTRATOR_LEADERSHIP_CHANGES = Counter(
    "trainops_orchestrator_leadership_changes_total",
    "Times this orchestrator took the lead (change=acquired) or lost it (change=lost).",
    ["change"],
)
ORCHESTRATOR_PAGES = Counter(
    "trainops_orchestrator_pages_total",
    "The orchestrator's own webhook pages (TRAINOPS_PAGE_WEBHOOK_URL) by outcome: sent, failed (retries "
    "spent), deduplicated (same run and reason within the window) or dropped (queue full).",
    ["outcome"],
)
# The host agent's instruments (updated in its Celery workers) are defined in health/metrics.py.
HEALTH_CHECK_DURATION = CHECK_DURATION
HEALTH_CHECKS = CHECKS_TOTAL
HEALTH_TASK_DURATION = TASK_DURATION

INSTRUMENTS: tuple[Counter | Gauge | Histogram, ...] = (
    HTTP_REQUEST_DURATION,
    METRIC_POINTS_INGESTED,
    METRIC_POINTS_DUPLICATE,
    ORCHESTRATOR_LOOP_DURATION,
    ORCHESTRATOR_FAILED_PASSES,
    ORCHESTRATOR_RUNS_ESCALATED,
    ORCHESTRATOR_LAUNCHES_DEFERRED,
    ORCHESTRATOR_LEADER,
    ORCHESTRATOR_LEADERSHIP_CHANGES,
    ORCHESTRATOR_PAGES,
    HEALTH_CHECK_DURATION,
    HEALTH_CHECKS,
    HEALTH_TASK_DURATION,
)


# ---- scrape-time gauges from the database ------------------------------------------------------------


@dataclass(frozen=True)
class MetricSpec:
    name: str
    kind: str  # "gauge", "counter" (named without its `_total` suffix) or "histogram"
    help: str
    labels: tuple[str, ...]
    buckets: tuple[float, ...] = ()
    """A histogram's upper bounds (without +Inf)."""

    def family(self) -> GaugeMetricFamily | CounterMetricFamily | HistogramMetricFamily:
        if self.kind == "counter":
            return CounterMetricFamily(self.name, self.help, labels=list(self.labels))
        if self.kind == "histogram":
            return HistogramMetricFamily(self.name, self.help, labels=list(self.labels))
        return GaugeMetricFamily(self.name, self.help, labels=list(self.labels))

    @property
    def exposed_names(self) -> tuple[str, ...]:
        if self.kind == "histogram":
            return tuple(f"{self.name}{suffix}" for suffix in ("_bucket", "_sum", "_count"))
        return (f"{self.name}_total",) if self.kind == "counter" else (self.name,)

    def histogram_buckets(self, values: list[float]) -> list[tuple[str, float]]:
        """Cumulative (upper bound, count) pairs of ``values`` for HistogramMetricFamily.add_metric."""
        bounds = [*self.buckets, float("inf")]
        return [(floatToGoString(b), float(sum(1 for v in values if v <= b))) for b in bounds]


def _g(name: str, help_text: str, *labels: str) -> MetricSpec:
    return MetricSpec(name, "gauge", help_text, labels)


def _c(name: str, help_text: str, *labels: str) -> MetricSpec:
    return MetricSpec(name, "counter", help_text, labels)


RUN = "run"
# Latest-row fields of the metrics table, exported per run: (spec, column or values key, scale).
RUN_STEP_FIELDS: tuple[tuple[MetricSpec, str, float], ...] = (
    (_g("trainops_run_step", "Latest step reported by the run's trainer.", RUN), "step", 1.0),
    (
        _g("trainops_run_trained_tokens", "Tokens consumed up to the latest reported step.", RUN),
        "tokens",
        1.0,
    ),
    (_g("trainops_run_loss", "Training loss at the latest step that measured it.", RUN), "loss", 1.0),
    (
        _g("trainops_run_validation_loss", "Validation loss of the latest evaluation.", RUN),
        "values.val_loss",
        1.0,
    ),
    (_g("trainops_run_grad_norm", "Global gradient norm before clipping.", RUN), "grad_norm", 1.0),
    (_g("trainops_run_loss_scale", "fp16 dynamic loss scale.", RUN), "loss_scale", 1.0),
    (
        _g(
            "trainops_run_final_layer_activation_norm",
            "Final block's output: root-mean-square over tokens of each token's L2 norm (trainops' own).",
            RUN,
        ),
        "act_norm",
        1.0,
    ),
    (
        _g(
            "trainops_run_final_layer_activation_mean_norm",
            "Final block's output: mean over tokens of each token's L2 norm (metaseq's actv_norm).",
            RUN,
        ),
        "actv_norm",
        1.0,
    ),
    (
        _g("trainops_run_token_embedding_norm", "Mean per-token L2 norm of the token embeddings.", RUN),
        "values.tok_norm",
        1.0,
    ),
    (
        _g("trainops_run_position_embedding_norm", "Mean per-token L2 norm of the position embeddings.", RUN),
        "values.pos_norm",
        1.0,
    ),
    (
        _g(
            "trainops_run_embedding_norm",
            "Mean per-token L2 norm of token plus position embedding (the first block's input).",
            RUN,
        ),
        "values.emb_norm",
        1.0,
    ),
    (_g("trainops_run_parameter_norm", "L2 norm of all parameters.", RUN), "values.param_norm", 1.0),
    (
        _g(
            "trainops_run_grad_clip_fraction",
            "Share of the last 100 steps whose gradient norm exceeded the clip (metaseq's clip / 100).",
            RUN,
        ),
        "values.clip_frac",
        1.0,
    ),
    (
        _g(
            "trainops_run_gpu_memory_allocated_bytes",
            "Peak GPU memory allocated in a step, busiest rank.",
            RUN,
        ),
        "values.cuda_gb_allocated",
        float(2**30),
    ),
    (
        _g(
            "trainops_run_gpu_memory_reserved_bytes", "Peak GPU memory reserved in a step, busiest rank.", RUN
        ),
        "values.cuda_gb_reserved",
        float(2**30),
    ),
    (
        _g(
            "trainops_run_gpu_memory_free_bytes",
            "GPU memory less the step's allocated peak, busiest rank.",
            RUN,
        ),
        "values.cuda_gb_free",
        float(2**30),
    ),
    (_g("trainops_run_learning_rate", "Learning rate in effect.", RUN), "lr", 1.0),
    (_g("trainops_run_grad_clip_threshold", "Gradient-norm clipping threshold in effect.", RUN), "clip", 1.0),
    (_g("trainops_run_tokens_per_second", "Training throughput of the whole run.", RUN), "tokens_per_s", 1.0),
    (
        _g("trainops_run_gpu_flops_per_second", "Achieved model FLOP/s per GPU.", RUN),
        "tflops_per_gpu",
        1e12,
    ),
    (_g("trainops_run_mfu_ratio", "Model FLOPs utilisation (achieved / peak).", RUN), "values.mfu", 1.0),
    (
        _g("trainops_run_step_duration_seconds", "Wall-clock time of the latest step.", RUN),
        "step_time_s",
        1.0,
    ),
)
RUN_PHASE = _g(
    "trainops_run_phase", "1 for the run's current phase, 0 for the others (state set).", RUN, "phase"
)
RUN_LAST_STEP_TIME = _g(
    "trainops_run_last_step_timestamp_seconds", "Unix time of the latest reported step (progress).", RUN
)
RUN_RESTARTS = _c(
    "trainops_run_restarts",
    "Attempts that were followed by another attempt, by the earlier attempt's exit reason.",
    RUN,
    "reason",
)
RUN_BUDGETED_RESTARTS = _g(
    "trainops_run_budgeted_restarts", "Restarts counted against the run's restart budget.", RUN
)
RUN_RESTART_BUDGET = _g("trainops_run_restart_budget", "The run's restart budget (config.max_restarts).", RUN)
RUN_GOODPUT = _g(
    "trainops_run_goodput_ratio",
    "Share of wall-clock time since the run first started spent in attempts whose steps were kept.",
    RUN,
)
RUN_HEARTBEAT_TIME = _g(
    "trainops_run_heartbeat_timestamp_seconds",
    "Unix time of the heartbeat of the current attempt's least recently heard rank.",
    RUN,
)
RUN_CHECKPOINT_STEP = _g("trainops_run_last_checkpoint_step", "Step of the latest committed checkpoint.", RUN)
RUN_CHECKPOINT_TIME = _g(
    "trainops_run_last_checkpoint_timestamp_seconds",
    "Unix time the latest committed checkpoint committed.",
    RUN,
)
NODE = "node"
NODE_STATE = _g(
    "trainops_node_state", "1 for the node's current state, 0 for the others (state set).", NODE, "state"
)
NODE_GPUS = _g("trainops_node_gpus", "GPUs registered on the node.", NODE)
NODE_FAILURES = _c("trainops_node_failures", "Failures recorded against the node.", NODE)
NODE_BLAMES = _c("trainops_node_blames", "Run failures attributed to the node.", NODE)
NODE_HEARTBEAT_TIME = _g(
    "trainops_node_last_heartbeat_timestamp_seconds", "Unix time the node last registered or reported.", NODE
)
NODE_DIAGNOSTIC_PASSED = _g(
    "trainops_node_diagnostic_passed",
    "1 when the latest result of a check on the node (last 24 h) passed, 0 otherwise.",
    NODE,
    "check",
)
NODE_DIAGNOSTIC_DURATION = _g(
    "trainops_node_diagnostic_duration_seconds",
    "Duration of the latest run of a check on the node.",
    NODE,
    "check",
)
GPU_TEMPERATURE = _g(
    "trainops_gpu_temperature_celsius", "GPU core temperature (latest thermal check).", NODE, "gpu"
)
GPU_ECC_CORRECTED = _c(
    "trainops_gpu_ecc_corrected_errors", "Single-bit ECC errors corrected since boot (volatile).", NODE, "gpu"
)
GPU_ECC_UNCORRECTED = _c(
    "trainops_gpu_ecc_uncorrected_errors", "Double-bit ECC errors since boot (volatile).", NODE, "gpu"
)
GPU_XID_ERRORS = _c(
    "trainops_gpu_xid_errors", "XID events seen by the health checks, by XID.", NODE, "gpu", "reason"
)
DIAGNOSTICS_LAST_RESULT_TIME = _g(
    "trainops_diagnostics_last_result_timestamp_seconds",
    "Unix time the newest diagnostics result was stored.",
)
CELERY_QUEUE_LENGTH = _g("trainops_celery_queue_length", "Tasks waiting in a health.* Celery queue.", "queue")
ORCHESTRATORS = _g(
    "trainops_orchestrators",
    "Orchestrators running against the database, by role: the leader (0 or 1) and standbys "
    "(docs/orchestrator.md, Failover); on SQLite the leader is the one orchestrator holding its file lock.",
    "role",
)
DECISIONS_PENDING = _g(
    "trainops_decisions_pending",
    "Orchestrator proposals waiting for a human's approval (approval gates, docs/orchestrator.md).",
)
RUN_DECISIONS_PENDING = _g(
    "trainops_run_decisions_pending",
    "The run's proposals waiting for a human's approval (0 or more; exported for every exported run and "
    "for any run with a pending decision). DecisionAwaitingApproval pages on it at once, per run.",
    "run",
)
RUN_LOSS_SCALE_THRESHOLD = _g(
    "trainops_run_loss_scale_threshold",
    "Loss scale below which the control plane calls the run diverging, by its format (divergence_for_run): "
    "min_loss_scale (1) for fp16-mixed; the run's own floor for OPT's fp16, which starts at 4 and may sit "
    "below 1 while healthy. LossScaleCollapse compares trainops_run_loss_scale with it.",
    "run",
)
DECISION_OLDEST_PENDING_AGE = _g(
    "trainops_decision_oldest_pending_age_seconds",
    "Age of the oldest proposal waiting for a human (0 when none waits).",
)
FAILURE_CLASS = "failure_class"
FAILURE_DETECTION = MetricSpec(
    name="trainops_failure_detection_seconds",
    kind="histogram",
    help="Time to detect each failure the orchestrator recorded, by class: the failed attempt's last step "
    "progress -> the failure noticed (MTTD = _sum / _count). Every run's attempts, since the database began.",
    labels=(FAILURE_CLASS,),
    buckets=(1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600),
)
FAILURE_RECOVERY = MetricSpec(
    name="trainops_failure_recovery_seconds",
    kind="histogram",
    help="Time to recover from each failure, by class: noticed -> the next attempt's first step "
    "(MTTR = _sum / _count). Failures without a next attempt that stepped are not counted (yet).",
    labels=(FAILURE_CLASS,),
    buckets=(10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200),
)
FLEET_ETTR = _g(
    "trainops_fleet_effective_training_time_ratio",
    "Fleet-wide ETTR: the productive step time of every exported run (running, or finished within 24 h) "
    "over their wall time, first attempt's start -> finish or now (docs/goodput.md, Fleet ETTR).",
)
DATABASE_UP = _g("trainops_control_plane_database_up", "1 when the scrape-time database read succeeded.")
COLLECT_DURATION = _g("trainops_collector_duration_seconds", "Time the scrape-time database read took.")

COLLECTED: tuple[MetricSpec, ...] = (
    *(spec for spec, _, _ in RUN_STEP_FIELDS),
    RUN_PHASE,
    RUN_LAST_STEP_TIME,
    RUN_RESTARTS,
    RUN_BUDGETED_RESTARTS,
    RUN_RESTART_BUDGET,
    RUN_GOODPUT,
    RUN_HEARTBEAT_TIME,
    RUN_CHECKPOINT_STEP,
    RUN_CHECKPOINT_TIME,
    NODE_STATE,
    NODE_GPUS,
    NODE_FAILURES,
    NODE_BLAMES,
    NODE_HEARTBEAT_TIME,
    NODE_DIAGNOSTIC_PASSED,
    NODE_DIAGNOSTIC_DURATION,
    GPU_TEMPERATURE,
    GPU_ECC_CORRECTED,
    GPU_ECC_UNCORRECTED,
    GPU_XID_ERRORS,
    DIAGNOSTICS_LAST_RESULT_TIME,
    CELERY_QUEUE_LENGTH,
    ORCHESTRATORS,
    DECISIONS_PENDING,
    RUN_DECISIONS_PENDING,
    RUN_LOSS_SCALE_THRESHOLD,
    DECISION_OLDEST_PENDING_AGE,
    FAILURE_DETECTION,
    FAILURE_RECOVERY,
    FLEET_ETTR,
    DATABASE_UP,
    COLLECT_DURATION,
)


def exported_metric_names() -> frozenset[str]:
    """Every sample name trainops can expose (histograms with their `_bucket`/`_sum`/`_count`)."""
    names: set[str] = set()
    for instrument in INSTRUMENTS:
        for family in instrument.describe():
            if family.type == "histogram":
                names.update(f"{family.name}{suffix}" for suffix in ("_bucket", "_sum", "_count"))
            elif family.type == "counter":
                names.add(f"{family.name}_total")
            else:
                names.add(family.name)
    for spec in COLLECTED:
        names.update(spec.exposed_names)
    return frozenset(names)
