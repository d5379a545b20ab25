"""The orchestrator's judgement, as pure functions: what failed, where to restart, what to change."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from service.orchestrator.policy import FailureRecord, backoff_s, plan_remediation
from service.recovery.config import (
    DivergenceConfig,
    OrchestratorConfig,
    RemediationConfig,
    RestartPointConfig,
)
from service.recovery.detect import (
    FailureClass,
    MetricSample,
    RankBeat,
    classify_exit,
    detect_divergence,
    detect_hang,
    detect_straggler,
    hang_limits,
)
from service.recovery.restart_point import (
    CheckpointCandidate,
    CheckpointVerdict,
    Verdict,
    act_norm_trend,
    judge_checkpoint,
    pick_restart_checkpoint,
    rule_for_run,
)

DATA = Path(__file__).parents[1] / "data"


def _recorded(name: str) -> list[MetricSample]:
    points = json.loads((DATA / name).read_text())["points"]
    return [MetricSample(p["step"], p["loss"], p["loss_scale"], p["act_norm"]) for p in points]


# ---- exits ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "outcome"),
    [
        (0, "completed"),
        (42, "divergence"),
        (43, "divergence"),  # fp16: the loss scale reached its floor (metaseq stopped OPT there)
        (2, "config"),
        (3, "crash"),  # the restore point failed the ranks' re-hash at load: restart from another
        (137, "signal"),
        (-9, "signal"),
        (143, "signal"),
        (1, "crash"),
        (13, "crash"),
    ],
)
def test_exit_codes_tell_divergence_signal_and_error_apart(code: int, outcome: str) -> None:
    assert classify_exit(code).outcome == outcome


# ---- divergence -----------------------------------------------------------------------------------


def test_a_healthy_recorded_run_raises_no_divergence_at_any_point() -> None:
    samples = _recorded("healthy_tiny_run.json")
    cfg = DivergenceConfig()
    # judged as the orchestrator sees it: after every step, on the stream so far
    for n in range(1, len(samples) + 1):
        assert detect_divergence(samples[:n], cfg) is None, f"false positive after step {samples[n - 1].step}"


def test_the_recorded_lr_blowup_is_caught_at_its_onset() -> None:
    samples = _recorded("diverged_tiny_run.json")
    found = detect_divergence(samples, DivergenceConfig())
    assert found is not None
    assert found.onset_step == 31  # the first step with the LR x100 applied is step 31's update
    assert set(found.evidence["onsets"]) >= {"loss_spike", "act_norm_runaway"}
    # and not a step earlier: the stream up to step 30 is healthy
    assert detect_divergence([s for s in samples if s.step <= 30], DivergenceConfig()) is None


def _flat(n: int, *, loss: float = 3.0, norm: float = 10.0, scale: float = 2.0**16) -> list[MetricSample]:
    return [
        MetricSample(step, loss + 0.01 * (step % 3), scale, norm + 0.1 * (step % 2))
        for step in range(1, n + 1)
    ]


def test_non_finite_loss_is_a_divergence_at_once() -> None:
    samples = [*_flat(30), MetricSample(31, math.nan, 2.0**15, 10.0)]
    found = detect_divergence(samples, DivergenceConfig())
    assert found is not None and found.onset_step == 31 and "non-finite" in found.detail


def test_loss_scale_below_one_is_a_divergence() -> None:
    samples = [*_flat(30), *[MetricSample(s, 3.0, 0.5, 10.0) for s in range(31, 34)]]
    found = detect_divergence(samples, DivergenceConfig())
    assert found is not None and found.onset_step == 31 and "loss scale" in found.detail


def test_a_single_recovered_spike_is_not_a_divergence() -> None:
    samples = _flat(40)
    samples[34] = MetricSample(35, 12.0, 2.0**16, 10.0)
    assert detect_divergence(samples, DivergenceConfig()) is None


def test_runaway_activation_norm_that_holds_its_level_is_caught() -> None:
    samples = [*_flat(30), *[MetricSample(s, 3.0, 2.0**16, 45.0) for s in range(31, 36)]]
    found = detect_divergence(samples, DivergenceConfig())
    assert found is not None and found.onset_step == 31 and "activation norm" in found.detail


# ---- hangs and stragglers -------------------------------------------------------------------------


def test_hang_is_declared_after_the_timeout_and_not_before() -> None:
    beats = [RankBeat(0, "h1", 50, time=100.0), RankBeat(1, "h2", 49, time=99.0)]
    limits = hang_limits(
        [], floor_s=12.0, multiple=5.0, q=0.99, startup_s=60.0, checkpoint_save_s=600.0, validation_s=600.0
    )
    common = {"world_size": 2, "attempt_started_at": 0.0, "limits": limits}
    assert detect_hang(beats, now=110.0, **common) is None
    found = detect_hang(beats, now=113.0, **common)
    assert found is not None and found.stale_ranks == (0, 1) and found.behind_hosts == ("h2",)
    assert detect_hang([], now=50.0, **common) is None
    assert detect_hang([], now=61.0, **common) is not None  # never reached a first step


def test_straggler_is_the_rank_far_slower_than_the_others() -> None:
    steady = tuple((s, 0.5) for s in range(6, 11))
    beats = [RankBeat(r, f"h{r}", 10, 1.0, step_time_s=0.5, busy=steady) for r in range(3)]
    assert detect_straggler(beats, ratio=3.0, confirm_steps=5) is None
    slow = [*beats, RankBeat(3, "h3", 10, 1.0, step_time_s=2.0, busy=tuple((s, 2.0) for s in range(6, 11)))]
    found = detect_straggler(slow, ratio=3.0, confirm_steps=5)
    assert found is not None and found.host == "h3" and len(found.observations) == 5


# ---- the restart point ----------------------------------------------------------------------------


def _ckpt(step: int, *, scale: float | None = 2.0**16, usable: bool = True) -> CheckpointCandidate:
    return CheckpointCandidate(
        id=step,
        step=step,
        path=f"/c/{step}",
        usable=usable,
        loss_scale=scale,
        unusable_reason="" if usable else "no COMMITTED marker",
    )


def test_hardware_and_hang_restart_from_the_newest_intact_checkpoint() -> None:
    ckpts = [_ckpt(10), _ckpt(20), _ckpt(30, usable=False)]
    for failure in (FailureClass.hardware, FailureClass.hang, FailureClass.signal):
        choice = pick_restart_checkpoint(ckpts, failure=failure, cfg=RestartPointConfig())
        assert choice.checkpoint is not None and choice.checkpoint.step == 20
        assert choice.rejected == ((30, "no COMMITTED marker"),)
    none = pick_restart_checkpoint([], failure=FailureClass.crash, cfg=RestartPointConfig())
    assert none.checkpoint is None and "scratch" in none.reason


def test_divergence_applies_the_opt_rule() -> None:
    # norms: flat before 10 and after 20, falling after 30; runaway (x1.3 per step) after 10; onset at 45
    norms = {s: 10.0 for s in range(1, 11)}
    norms |= {s: 10.0 * 1.3 ** (s - 10) for s in range(11, 21)}
    norms |= {s: norms[20] for s in range(21, 31)}
    norms |= {s: norms[20] * (1 - (s - 30) * 0.02) for s in range(31, 45)}
    ckpts = [_ckpt(10), _ckpt(20), _ckpt(30, scale=0.5), _ckpt(40), _ckpt(44), _ckpt(50)]
    cfg = RestartPointConfig(act_norm_trend_window=10)
    choice = pick_restart_checkpoint(
        ckpts, failure=FailureClass.divergence, cfg=cfg, divergence_onset=45, act_norms=norms
    )
    assert choice.checkpoint is not None and choice.checkpoint.step == 20
    assert "stayed flat" in choice.reason and "loss scale 65536" in choice.reason
    reasons = dict(choice.rejected)
    assert "after the divergence began" in reasons[50]
    # the update of step 44 produced the first bad reading at 45: the checkpoint of step 44 holds it
    assert "after the divergence began" in reasons[44]
    assert "unknown yet (3 / 5" in reasons[40]  # 41..43 stored before the onset's margin
    assert "loss scale 0.5" in reasons[30]
    assert 10 not in reasons  # not reached: 20 qualified first
    # with a window reaching into the falling stretch, the same checkpoint's norm "trended down"
    wide = pick_restart_checkpoint(
        ckpts, failure=FailureClass.divergence, cfg=RestartPointConfig(), divergence_onset=45, act_norms=norms
    )
    assert wide.checkpoint is not None and wide.checkpoint.step == 20 and "trended down" in wide.reason
    # without 20 and 30, 10 is judged: the norm ran away after it (x13.8 in 10 steps)
    back = pick_restart_checkpoint(
        [_ckpt(10), _ckpt(40)], failure=FailureClass.divergence, cfg=cfg, divergence_onset=45, act_norms=norms
    )
    assert back.checkpoint is None and "no checkpoint qualifies" in back.reason
    assert "ran away" in dict(back.rejected)[10]


def test_divergence_goes_further_back_and_escalates_when_nothing_qualifies() -> None:
    flat_then_runaway = {s: 5.0 for s in range(1, 11)} | {s: 5.0 * 1.2 ** (s - 10) for s in range(11, 60)}
    choice = pick_restart_checkpoint(
        [_ckpt(10), _ckpt(20)],
        failure=FailureClass.divergence,
        cfg=RestartPointConfig(),
        divergence_onset=55,
        act_norms=flat_then_runaway,
    )
    assert choice.checkpoint is None and "no checkpoint qualifies" in choice.reason
    assert [s for s, _ in choice.rejected] == [20, 10]


def test_bounded_growth_is_healthy_runaway_is_not() -> None:
    """OPT restarted away from norms "growing unboundedly", not from a young model's norm rising."""
    cfg = RestartPointConfig()

    def verdict(norms: dict[int, float], step: int) -> CheckpointVerdict:
        return judge_checkpoint(step=step, loss_scale=2.0**15, norms=norms, cfg=cfg)

    # a young model: fast growth that slows down (power law), then flattens
    young = {s: 2.0 * s**0.8 for s in range(1, 200)}
    for step in (5, 20, 60, 150):
        v = verdict(young, step)
        assert v.verdict == Verdict.healthy and "grew boundedly" in v.reason, (step, v)
    # slow steady growth from a flat history (+1 %/step: x1.2 per window) is bounded
    slow = {s: 10.0 for s in range(1, 41)} | {s: 10.0 * 1.01 ** (s - 40) for s in range(41, 80)}
    assert verdict(slow, 40).verdict == Verdict.healthy
    # multiplicative growth faster than the run ever grew (+8 %/step from flat) is runaway: over 12 steps
    # it has not yet reached x3, but its pace would within the trend window
    fast = {s: 10.0 for s in range(1, 41)} | {s: 10.0 * 1.08 ** (s - 40) for s in range(41, 53)}
    v = verdict(fast, 40)
    assert v.verdict == Verdict.unhealthy and "multiplicatively" in v.reason
    assert v.numbers["rate_per_step"] == pytest.approx(math.log(1.08), rel=1e-3)
    # the same pace over a full window: the level it reached says it
    v = verdict(fast | {s: 10.0 * 1.08 ** (s - 40) for s in range(53, 80)}, 40)
    assert v.verdict == Verdict.unhealthy and "ran away" in v.reason
    # a jump to 4x that holds, from a flat history
    jump = {s: 10.0 for s in range(1, 46)} | {s: 40.0 for s in range(46, 80)}
    v = verdict(jump, 40)
    assert v.verdict == Verdict.unhealthy and "ran away" in v.reason and v.numbers["growth"] == 4.0
    # too few stored steps after it: pending, with the count
    v = verdict({s: 10.0 for s in range(1, 43)}, 40)
    assert v.verdict == Verdict.pending and "2 / 5" in v.reason
    # a collapsed loss scale is unhealthy whatever the norm did
    v = judge_checkpoint(step=40, loss_scale=0.25, norms=young, cfg=cfg)
    assert v.verdict == Verdict.unhealthy and "loss scale 0.25" in v.reason


def test_trend_is_a_log_growth_rate() -> None:
    rate, n = act_norm_trend({11: 10.0, 12: 9.0, 13: 8.0, 14: 7.0}, after_step=10, until_step=None, window=20)
    assert n == 4 and rate is not None and rate < 0
    rate, n = act_norm_trend({s: 2.0**s for s in range(11, 20)}, after_step=10, until_step=15, window=20)
    assert n == 5 and rate == pytest.approx(math.log(2.0))
    assert act_norm_trend({11: 1.0}, after_step=10, until_step=None, window=20) == (None, 1)


# ---- remediation and budgets ----------------------------------------------------------------------


def test_divergence_lowers_lr_compounding_then_clip_and_resets_the_scaler() -> None:
    cfg = RemediationConfig()
    first = plan_remediation(
        FailureClass.divergence,
        [FailureRecord(100.0, FailureClass.divergence, 20)],
        lr_scale=1.0,
        clip=None,
        now=100.0,
        cfg=cfg,
    )
    assert first.overrides == {"lr_scale": 0.5, "reset_loss_scale": True}
    second = plan_remediation(
        FailureClass.divergence,
        [
            FailureRecord(100.0, FailureClass.divergence, 20),
            FailureRecord(200.0, FailureClass.divergence, 30),
        ],
        lr_scale=0.5,
        clip=None,
        now=200.0,
        cfg=cfg,
    )
    assert second.overrides == {"lr_scale": 0.25, "clip": 0.3, "reset_loss_scale": True}
    floor = plan_remediation(
        FailureClass.divergence,
        [FailureRecord(1.0, FailureClass.divergence, 1)],
        lr_scale=0.06,
        clip=0.3,
        now=1.0,
        cfg=cfg,
    )
    assert floor.overrides["lr_scale"] == cfg.min_lr_scale and "clip" not in floor.overrides


def test_hardware_failures_change_no_hyperparameters_but_back_off() -> None:
    cfg = RemediationConfig(backoff_base_s=2.0, backoff_max_s=30.0)
    hist = [FailureRecord(10.0, FailureClass.crash, 10), FailureRecord(20.0, FailureClass.hardware, 20)]
    plan = plan_remediation(FailureClass.hardware, hist, lr_scale=1.0, clip=None, now=20.0, cfg=cfg)
    assert plan.overrides == {} and plan.escalate is None
    assert plan.not_before == 20.0 + 2.0  # the second failure came after progress: no longer back-off
    stuck = [FailureRecord(10.0, FailureClass.crash, 10), FailureRecord(20.0, FailureClass.hardware, 10)]
    plan = plan_remediation(FailureClass.hardware, stuck, lr_scale=1.0, clip=None, now=20.0, cfg=cfg)
    assert plan.not_before == 20.0 + 4.0  # two failures in a row at the same checkpoint: 2 s x 2
    assert [backoff_s(n, cfg) for n in range(7)] == [0.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]


def test_budget_and_no_progress_escalate() -> None:
    cfg = RemediationConfig(max_restarts=3, no_progress_restarts=3)
    spent = [FailureRecord(float(t), FailureClass.crash, t) for t in range(4)]
    assert "budget" in (
        plan_remediation(FailureClass.crash, spent, lr_scale=1, clip=None, now=5, cfg=cfg).escalate or ""
    )
    stuck = [FailureRecord(float(t), FailureClass.crash, 40) for t in range(4)]
    cfg_big = RemediationConfig(max_restarts=10, no_progress_restarts=3)
    assert "no progress" in (
        plan_remediation(FailureClass.crash, stuck, lr_scale=1, clip=None, now=5, cfg=cfg_big).escalate or ""
    )
    assert plan_remediation(FailureClass.config, [], lr_scale=1, clip=None, now=0, cfg=cfg).escalate


def test_independent_failures_within_one_checkpoint_interval_are_not_a_crash_loop() -> None:
    # the fleet simulator's big run: a crash, a GPU fault on another host and a network hang, 6-7 steps
    # apart, each restarted from the checkpoint at step 40; then a fourth, unrelated, failure
    cfg = RemediationConfig(max_restarts=10, no_progress_restarts=3)
    mixed = [
        FailureRecord(1.0, FailureClass.crash, 40),
        FailureRecord(2.0, FailureClass.hardware, 40),
        FailureRecord(3.0, FailureClass.hang, 40),
        FailureRecord(4.0, FailureClass.signal, 40),
    ]
    plan = plan_remediation(FailureClass.signal, mixed, lr_scale=1, clip=None, now=5, cfg=cfg)
    assert plan.escalate is None
    # the same cause again and again is a loop, whatever else failed in between
    looping = [*mixed, *(FailureRecord(5.0 + t, FailureClass.crash, 40) for t in range(3))]
    escalate = plan_remediation(FailureClass.crash, looping, lr_scale=1, clip=None, now=9, cfg=cfg).escalate
    assert escalate == (
        "no progress: 4 crash failures without a newer checkpoint than step 40 "
        "(other failures meanwhile: hang, hardware, signal)"
    )
    # a newer checkpoint ends the streak: older crashes no longer count
    progressed = [*looping[:-1], FailureRecord(9.0, FailureClass.crash, 50)]
    assert (
        plan_remediation(FailureClass.crash, progressed, lr_scale=1, clip=None, now=9, cfg=cfg).escalate
        is None
    )


def test_config_invariants_are_checked_at_construction() -> None:
    with pytest.raises(ValueError, match="heartbeat_interval_s"):
        OrchestratorConfig(heartbeat_interval_s=20, hang_timeout_s=10)
    with pytest.raises(ValueError):
        RemediationConfig(lr_factor=1.5)
    with pytest.raises(ValueError):
        DivergenceConfig(min_points=50)


def test_the_course_spans_the_runs_checkpoint_interval() -> None:
    """A run that checkpoints every 250 steps is judged on 250 steps of course: a slow runaway (+1 %/step,
    x12 over the interval) is not bounded growth, while a young model's power-law growth still is."""
    base = RestartPointConfig()
    assert rule_for_run(base, checkpoint_interval=5) is base
    assert rule_for_run(base, checkpoint_interval=None) is base
    rule = rule_for_run(base, checkpoint_interval=250)
    assert rule.act_norm_trend_window == 250
    slow_runaway = {s: 20.0 for s in range(1, 501)} | {s: 20.0 * 1.01 ** (s - 500) for s in range(501, 760)}
    assert judge_checkpoint(step=500, loss_scale=8.0, norms=slow_runaway, cfg=base).verdict == Verdict.healthy
    verdict = judge_checkpoint(step=500, loss_scale=8.0, norms=slow_runaway, cfg=rule)
    assert verdict.verdict == Verdict.unhealthy and verdict.numbers["steps"] == 250
    young = {s: 2.0 * s**0.8 for s in range(1, 800)}
    assert judge_checkpoint(step=500, loss_scale=8.0, norms=young, cfg=rule).verdict == Verdict.healthy


def test_a_stored_metric_row_reads_back_as_the_detector_expects() -> None:
    """A loss stored as null because it was non-finite is NaN again; a malformed `values.nan` (a number, a
    string) written by a careless client neither raises in the loop nor invents a NaN."""
    from types import SimpleNamespace

    from service.recovery.samples import stored_metric_sample

    def row(values: object) -> SimpleNamespace:
        return SimpleNamespace(step=3, loss=None, loss_scale=1.0, act_norm=2.0, actv_norm=1.9, values=values)

    assert math.isnan(stored_metric_sample(row({"nan": ["loss"]})).loss or 0.0)
    for odd in ({"nan": 1}, {"nan": "loss"}, {"nan": None}, None, [1, 2]):
        sample = stored_metric_sample(row(odd))
        assert sample.loss is None and (sample.act_norm, sample.actv_norm) == (2.0, 1.9)


def test_a_fault_can_count_from_its_attempts_restore_point() -> None:
    """A chaos run's later faults must fire wherever the attempt before stopped: attempt 3 restored from
    step 70 hangs at 80 with `step=+10`, where a fixed `step=62` would lie behind it and never fire."""
    from service.orchestrator.apply import parse_faults

    specs = ["1:crash:step=14,rank=1", "3:hang:step=+10,rank=1", "3:slow:rank=0,step=62", "hang:step=5"]
    assert parse_faults(specs, 1) == ["crash:step=14,rank=1", "hang:step=5"]
    assert parse_faults(specs, 3, start_step=70) == ["hang:step=80,rank=1", "slow:rank=0,step=62"]
    assert parse_faults(specs, 2, start_step=70) == []
