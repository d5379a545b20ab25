"""The orchestrator's typed config (one per component, read once at the edge), and its loader.

The recovery rules (detection, the restart rule, verdicts) take their sections of it; the API loads the same
document for restart-preview and the runs directory, so the loader lives here, below the orchestrator.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_settings import SettingsConfigDict

from health.config import LayeredSettings
from service.config import Settings
from trainer.contract import OPT_MIN_LOSS_SCALE

ORCHESTRATOR_ENV_PREFIX = "TRAINOPS_ORCHESTRATOR_"


class _Section(BaseModel):
    """A section of the orchestrator config: keyword-constructed, unknown keys refused, documented by the
    docstrings under its fields."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


class DivergenceConfig(_Section):
    loss_spike_window: int = 20
    """Trailing steps whose median and MAD are the baseline of the loss-spike test."""
    loss_spike_ratio: float = 1.5
    """A step spikes when its loss exceeds the trailing median by this factor ..."""
    loss_spike_z: float = 6.0
    """... and by this many robust standard deviations (1.4826 x MAD)."""
    loss_spike_patience: int = 3
    """Consecutive spiking steps before it counts as a divergence (OPT saw many spikes that recovered)."""
    min_loss_scale: float = 1.0
    """A dynamic loss scale below this is a divergence signal, and a checkpoint saved under it unhealthy, in a
    run of precision fp16-mixed (scale from 65536, window 1000: its healthy recordings never left
    32768-65536; OPT restarted from checkpoints >= 1.0). A precision fp16 run is judged against its own floor
    instead (`divergence_for_run`)."""
    act_norm_window: int = 20
    """Trailing steps whose maximum is the activation norm's baseline (the window ends `act_norm_patience`
    steps back, so a jump that then holds its level still counts for every step of the patience)."""
    act_norm_multiple: float = 3.0
    """The final layer's activation norm above this multiple of its baseline is runaway growth ..."""
    act_norm_patience: int = 3
    """... when it stays there for this many consecutive steps."""
    judge_after_step: int = 20
    """Training steps before which the spike and runaway tests judge nothing: early in training the loss
    falls fast and the activation norm grows from its tiny initial value, which is not a divergence."""
    min_points: int = 8
    """Steps needed in a trailing window before the spike and runaway tests judge anything."""

    @model_validator(mode="after")
    def _check_invariants(self) -> Self:
        if self.loss_spike_ratio <= 1 or self.act_norm_multiple <= 1:
            raise ValueError("loss_spike_ratio and act_norm_multiple must be > 1")
        if (
            min(
                self.loss_spike_window, self.act_norm_window, self.loss_spike_patience, self.act_norm_patience
            )
            < 1
        ):
            raise ValueError("windows and patiences must be >= 1")
        if self.min_points > min(self.loss_spike_window, self.act_norm_window):
            raise ValueError("min_points must not exceed the trailing windows")
        return self


def divergence_for_run(cfg: DivergenceConfig, *, run_config: Mapping[str, Any] | None) -> DivergenceConfig:
    """The divergence rules for one run (its stored `RunConfig`): the loss-scale threshold follows its format.

    precision fp16 (OPT's format) starts the scale at 4 and doubles it only after 2^14 / (data-parallel size x
    accumulation steps) clean steps: 8192 on 2 ranks, 132 on OPT-175B's 124. Each overflow halves it, so a
    healthy run that met three sits at 0.5 for thousands of steps (tests/data/healthy_fp16_*), and how low a
    healthy scale goes depends on the run's parallelism: no fixed level separates healthy from diverging.
    What the format does define is its floor: the trainer stops with exit 43 when an overflow would take the
    scale to or below `min_loss_scale` (1e-4 unless the run's hyperparameters set it), as metaseq stopped
    OPT. The threshold is that floor: a healthy fp16 attempt never reports a scale below it, and exit 43 is
    the divergence verdict (`classify_exit`). Other formats keep `cfg.min_loss_scale`."""
    config = run_config or {}
    if config.get("precision", "fp16") != "fp16":
        return cfg
    floor = (config.get("hyperparameters") or {}).get("min_loss_scale")
    return cfg.model_copy(
        update={"min_loss_scale": float(floor) if floor is not None else OPT_MIN_LOSS_SCALE}
    )


class RestartPointConfig(_Section):
    act_norm_trend_window: int = 20
    """Steps after a checkpoint over which the activation norm's trend is measured (OPT's restart rule)."""
    act_norm_flat_tolerance: float = 0.002
    """Largest relative slope per step (slope / mean norm) still called flat; above it, the norm rises."""
    onset_margin_steps: int = 2
    """Steps just before the detected onset left out of the trend: a divergence starts a step or two before
    any test can call it one, and those steps would make every recent checkpoint look bad."""
    min_trend_points: int = 5
    """Fewer stored points after a checkpoint than this and its trend is unknown (it does not qualify)."""


class RemediationConfig(_Section):
    lr_factor: float = 0.5
    """LR scale multiplier per divergence, compounding across repeats."""
    min_lr_scale: float = 0.05
    """Floor of the compounded LR scale."""
    lowered_clip: float = 0.3
    """Gradient clipping after `clip_after_divergences` divergences (OPT lowered 1.0 -> 0.3)."""
    clip_after_divergences: int = 2
    """Divergences before the clip is lowered."""
    reset_loss_scale: bool = True
    """Reset the dynamic loss scaler on a divergence restart (recovered some of OPT's divergences)."""
    skip_spike_window: bool = False
    """Also skip the batches between the restored checkpoint and the divergence onset."""
    max_restarts: int = 20
    """Restarts allowed within `restart_window_s` before the run needs attention."""
    restart_window_s: float = 3600.0
    """Window of the restart budget."""
    no_progress_restarts: int = 3
    """Failures of one class, without a newer checkpoint saved since the first of them, that are restarted
    before the next one makes the run need attention (a crash loop; failures of other classes in between
    do not count, see `policy.no_progress_streak`)."""
    backoff_base_s: float = 1.0
    """First delay between a failure and the relaunch; doubles with each consecutive failure."""
    backoff_max_s: float = 60.0
    """Largest back-off delay."""
    hosts_wait_s: float = 120.0
    """How long to wait for enough healthy hosts before the run needs attention."""
    deep_check_before_relaunch: bool = True
    """Run deep diagnostics on the hosts of the next attempt after a hardware failure."""
    deep_check_deadline_s: float = 120.0
    """Deadline for those diagnostics."""

    @model_validator(mode="after")
    def _check_invariants(self) -> Self:
        if not 0 < self.lr_factor < 1:
            raise ValueError("lr_factor must be in (0, 1)")
        if not 0 < self.min_lr_scale <= 1:
            raise ValueError("min_lr_scale must be in (0, 1]")
        if self.backoff_base_s < 0 or self.backoff_max_s < self.backoff_base_s:
            raise ValueError("need 0 <= backoff_base_s <= backoff_max_s")
        return self


class HangConfig(_Section):
    """How the hang limits are calibrated to each run (`detect.hang_limits`); a run's `RunConfig.hang`
    overrides any of them for that run."""

    step_time_multiple: float = 5.0
    """The step limit is this multiple of the run's `step_time_quantile` step time (at least the floor,
    `OrchestratorConfig.hang_timeout_s`)."""
    step_time_quantile: float = 0.99
    """Quantile of the recent step times the step limit is a multiple of (p99)."""
    step_time_window: int = 200
    """Newest steps of the run (any attempt) whose step times calibrate the step limit."""
    checkpoint_save_s: float = 600.0
    """Limit for a rank inside a checkpoint save (OPT's synchronous saves took about 2 minutes)."""
    validation_s: float = 600.0
    """Limit for a rank inside a validation pass."""

    @model_validator(mode="after")
    def _check_invariants(self) -> Self:
        if self.step_time_multiple < 1:
            raise ValueError("hang.step_time_multiple must be >= 1")
        if not 0 < self.step_time_quantile <= 1:
            raise ValueError("hang.step_time_quantile must be in (0, 1]")
        if self.step_time_window < 1:
            raise ValueError("hang.step_time_window must be >= 1")
        return self


class CheckpointVerifyConfig(_Section):
    """The full re-hash of committed checkpoints (`service/orchestrator/checkpoint_verify.py`): a pool of
    worker threads owned by the orchestrator, off the reconcile loop. Before a restore only the metadata
    check runs (marker, manifest, sizes, the ranks' digests present); this pool re-reads the bytes."""

    workers: int = 2
    """Worker threads hashing checkpoints at once (each one checkpoint at a time, newest first)."""
    hash_throughput_mb_s: float = 200.0
    """The most one worker is assumed to read and hash per second (MB/s) on the runs' filesystem; a slower
    rate the pool measures lowers it (`bench/checkpoint_verify.py` measures it: 223-254 MB/s from this
    machine's disk, docs/benchmarks.md)."""
    deadline_factor: float = 3.0
    """A checkpoint's deadline is `deadline_floor_s` plus this multiple of its expected hashing time: its
    size over the smaller of the configured and the measured throughput (and of `read_limit_mb_s`)."""
    deadline_floor_s: float = 30.0
    """Seconds every deadline allows on top (opening files, a busy filesystem's first reads)."""
    read_limit_mb_s: float | None = None
    """Cap on each worker's read rate (MB/s), so background verification leaves the shared filesystem's
    bandwidth to the trainers' saves and loads; None = as fast as it reads."""
    measure_min_mb: float = 256.0
    """Verifications of at least this many MB update the measured throughput (smaller ones time mostly
    opening files)."""

    @model_validator(mode="after")
    def _check_invariants(self) -> Self:
        if self.workers < 1:
            raise ValueError("checkpoint_verify.workers must be >= 1")
        if self.hash_throughput_mb_s <= 0 or (self.read_limit_mb_s is not None and self.read_limit_mb_s <= 0):
            raise ValueError("checkpoint_verify.hash_throughput_mb_s and read_limit_mb_s must be > 0")
        # A deadline below the expected hashing time would call every healthy verification late.
        if self.deadline_factor < 1 or self.deadline_floor_s < 0:
            raise ValueError("need checkpoint_verify.deadline_factor >= 1 and deadline_floor_s >= 0")
        if self.measure_min_mb < 0:
            raise ValueError("checkpoint_verify.measure_min_mb must be >= 0")
        return self


class OrchestratorConfig(LayeredSettings):
    """The orchestrator's settings, highest precedence first: keyword arguments (`load_orchestrator_config`'s
    overrides) > ``TRAINOPS_ORCHESTRATOR_<FIELD>`` and ``TRAINOPS_ORCHESTRATOR_<SECTION>__<FIELD>`` >
    the JSON or TOML file ``TRAINOPS_ORCHESTRATOR_CONFIG`` names > the control plane's runs directory and
    API URL > the defaults below. Unknown keys are refused wherever they come from."""

    model_config = SettingsConfigDict(
        env_prefix=ORCHESTRATOR_ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        use_attribute_docstrings=True,
    )

    loop_interval_s: float = 1.0
    """Period of the reconcile loop (events may wake it earlier; they never decide)."""
    launch_budget_s: float = 2.0
    """Time one reconcile pass may spend launching attempts (records, tokens, the launcher's start); the
    launches decided after it is spent wait for the next pass (counted in
    `trainops_orchestrator_launches_deferred_total`). Runs with an attempt in progress are reconciled
    first, so 100 new runs submitted at once start over several passes instead of holding up the detection
    of every running attempt (the fleet simulator's first 100-run pass launched 99 attempts in one go, for
    over a minute at a load average of 15). A pass launches at least one attempt."""
    heartbeat_interval_s: float = 2.0
    """The shortest interval at which a host (re)sends its ranks' newest beats
    (`trainer.contract.HEARTBEAT_SEND_INTERVAL_S`). Each attempt gets `heartbeat_interval_for` the fleet:
    this, or longer on a fleet too big for `heartbeat_max_requests_per_s`. No beat of an attempt received
    for 3 x its interval holds the hang verdict (the control plane is unreachable)."""
    heartbeat_max_requests_per_s: float = 50.0
    """The control plane's heartbeat request budget: every host of the pool sending one request per
    interval may not exceed it, so on a big fleet the interval grows (Nomad's `max_heartbeats_per_second`,
    whose default this is; at 1,024 hosts one request per host every 2 s was ~512 requests/s, which the
    fleet simulator's API could not ingest: docs/benchmarks.md). A beat then reaches the control plane up
    to one interval late, which every hang limit adds (`decide.run_hang_limits`)."""
    hang_timeout_s: float = 12.0
    """Floor of the step limit: no step progress for this long is a hang even when the run's own step
    times would allow less (the limit is max(this, `hang.step_time_multiple` x p99 of recent step times))."""
    startup_grace_s: float = 180.0
    """Limit of the start-up section: process start, model build, checkpoint load and the first step."""
    runs_dir: str = ".trainops/runs"
    """Where each run's files live: <runs_dir>/<run name>/ (checkpoints, heartbeats, logs)."""
    api_url: str | None = None
    """Control plane URL given to trainers for reporting; None = trainers do not report over HTTP."""
    straggler_ratio: float = 3.0
    """A rank whose step time exceeds the median of the others by this factor is a straggler ..."""
    straggler_confirm_steps: int = 5
    """... in each of this many consecutive steps (one slow reading is no evidence)."""
    hang: HangConfig = Field(default_factory=HangConfig)
    failing_pass_limit: int = 5
    """Consecutive failed reconcile passes of one run (an exception while observing, deciding or applying)
    after which the run goes to needs_attention with the error in the logbook and on-call is paged. Between
    tries the run waits `loop_interval_s`, then twice that, ... up to `failing_pass_backoff_max_s`."""
    failing_pass_backoff_max_s: float = 30.0
    """Largest wait between two tries of a run whose pass keeps failing."""
    transient_failure_patience_s: float = 300.0
    """A streak of transient errors (database or network unreachable) escalates only once it has also lasted
    this long: a database restart is waited out, an outage that lasts is paged."""
    trainer_token_grace_s: float = 300.0
    """How long an ended attempt's trainer token still authenticates: its ranks' last deliveries (the
    reporter's final flush, up to 10 s; a rank that outlives the kill, e.g. Slurm's KillWait of 30 s) are
    accepted, then it expires (docs/security.md, "Tokens"). What the reporter could not deliver is in the
    spool, which the orchestrator drains itself and a later attempt replays with its own token."""
    leader_lease_s: float = 10.0
    """PostgreSQL, several orchestrators: how long the database may take to notice a leader whose host or
    network vanished (its lock session's TCP keepalives and user timeout); a killed leader's lock is freed
    at once. A standby takes over within 2 x `loop_interval_s` + this (docs/orchestrator.md, "Failover")."""
    divergence: DivergenceConfig = Field(default_factory=DivergenceConfig)
    restart_point: RestartPointConfig = Field(default_factory=RestartPointConfig)
    remediation: RemediationConfig = Field(default_factory=RemediationConfig)
    checkpoint_verify: CheckpointVerifyConfig = Field(default_factory=CheckpointVerifyConfig)

    def heartbeat_interval_for(self, fleet_hosts: int) -> float:
        """How often each host of an attempt sends its ranks' beats when the pool has `fleet_hosts` hosts:
        max(heartbeat_interval_s, fleet_hosts / heartbeat_max_requests_per_s). Every host of the pool is
        counted, busy or not, so attempts launched at different times together stay within the budget."""
        return max(self.heartbeat_interval_s, fleet_hosts / self.heartbeat_max_requests_per_s)

    @model_validator(mode="after")
    def _check_invariants(self) -> Self:
        # NVRx invariant: declare a hang only after several missed heartbeats, or slow steps look hung.
        if self.heartbeat_interval_s >= self.hang_timeout_s:
            raise ValueError("heartbeat_interval_s must be < hang_timeout_s")
        if self.launch_budget_s <= 0:
            raise ValueError("launch_budget_s must be > 0")
        if self.heartbeat_max_requests_per_s <= 0:
            raise ValueError("heartbeat_max_requests_per_s must be > 0")
        if self.loop_interval_s <= 0 or self.loop_interval_s > self.hang_timeout_s:
            raise ValueError("loop_interval_s must be in (0, hang_timeout_s]")
        if self.straggler_ratio <= 1:
            raise ValueError("straggler_ratio must be > 1")
        if self.straggler_confirm_steps < 2:
            raise ValueError("straggler_confirm_steps must be >= 2 (one reading is no confirmation)")
        # Every section's limit is at least the step floor, or a rank would be called hung faster while
        # saving or validating than while stepping.
        for name, limit in (
            ("startup_grace_s", self.startup_grace_s),
            ("hang.checkpoint_save_s", self.hang.checkpoint_save_s),
            ("hang.validation_s", self.hang.validation_s),
        ):
            if limit < self.hang_timeout_s:
                raise ValueError(f"{name} must be >= hang_timeout_s")
        if self.trainer_token_grace_s < 0:
            raise ValueError("trainer_token_grace_s must be >= 0")
        if self.failing_pass_limit < 1:
            raise ValueError("failing_pass_limit must be >= 1")
        # TCP keepalive counts in whole seconds; a lease shorter than a pass would depose healthy leaders.
        if self.leader_lease_s < 2 or self.leader_lease_s <= self.loop_interval_s:
            raise ValueError("leader_lease_s must be >= 2 and > loop_interval_s")
        if self.failing_pass_backoff_max_s < self.loop_interval_s or self.transient_failure_patience_s < 0:
            raise ValueError(
                "need failing_pass_backoff_max_s >= loop_interval_s and transient_failure_patience_s >= 0"
            )
        return self


def load_orchestrator_config(settings: Settings, **overrides: Any) -> OrchestratorConfig:
    """`overrides` > the environment (``TRAINOPS_ORCHESTRATOR_*``) > the JSON or TOML file named by
    TRAINOPS_ORCHESTRATOR_CONFIG > the runs directory under the control plane's home and its API URL >
    the defaults. A section given as a dict merges key by key with the layers below; given as a model,
    it replaces them."""
    return OrchestratorConfig.load(
        file=settings.orchestrator_config,
        defaults={"runs_dir": str(settings.home / "runs"), "api_url": settings.resolved_api_url},
        **overrides,
    )
