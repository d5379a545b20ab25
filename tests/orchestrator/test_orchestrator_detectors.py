"""Hang and straggler detectors calibrated to each run, as tables: observations in, findings out."""

from __future__ import annotations

import random
import statistics
import time
from dataclasses import replace
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from service.config import Settings
from service.crud.telemetry import attempt_heartbeats
from service.db import make_engine, make_session_factory, transaction
from service.orchestrator.decide import (
    EndAttempt,
    ObservedAttempt,
    ObservedRun,
    decide,
    run_hang_limits,
)
from service.orchestrator.launchers.base import ProcessStatus
from service.orchestrator.observe import rank_beat
from service.recovery.config import HangConfig, OrchestratorConfig
from service.recovery.detect import (
    RankBeat,
    Section,
    detect_hang,
    detect_straggler,
    hang_limits,
    median_without,
    quantile,
)
from service.schemas import HangOverrides, RunConfig
from service.statemachine import DesiredState, NodeState, RunPhase
from tests.conftest import make_run

NOW = 10_000.0
CFG = OrchestratorConfig()  # floor 12 s, 5 x p99, start-up 180 s, save 600 s, validation 600 s
OPT_175B_STEPS = [13.6 + 0.01 * (i % 50) for i in range(200)]  # ~14 s per step (issue 10)
TOY_STEPS = [0.3] * 200


def limits(step_times: list[float], **changes: float) -> Any:
    settings: dict[str, float] = {
        "floor_s": 12.0,
        "multiple": 5.0,
        "q": 0.99,
        "startup_s": 180.0,
        "checkpoint_save_s": 600.0,
        "validation_s": 600.0,
    }
    settings.update(changes)
    return hang_limits(step_times, **settings)  # type: ignore[arg-type]


# ---- hang limits ------------------------------------------------------------------------------------

# (story, step times, expected step limit, expected save limit)
LIMITS_TABLE = [
    ("no step times yet: the floor", [], 12.0, 600.0),
    ("toy steps of 0.3 s: the floor still holds", TOY_STEPS, 12.0, 600.0),
    ("OPT-175B's 14 s steps: 5 x p99", OPT_175B_STEPS, 5 * 14.09, 600.0),
    ("one slow step in a hundred is below the p99", [1.0] * 99 + [30.0], 12.0, 600.0),
    ("two slow steps in a hundred are the p99", [1.0] * 98 + [30.0, 30.0], 150.0, 600.0),
    ("300 s steps: every section is at least the step limit", [300.0] * 10, 1500.0, 1500.0),
]


@pytest.mark.parametrize(("story", "times", "step", "save"), LIMITS_TABLE, ids=[t[0] for t in LIMITS_TABLE])
def test_hang_limits_follow_the_runs_own_step_times(
    story: str, times: list[float], step: float, save: float
) -> None:
    found = limits(times)
    assert found.step_s == pytest.approx(step)
    assert found.checkpoint_save_s == pytest.approx(save)
    assert min(found.startup_s, found.validation_s, found.checkpoint_save_s) >= found.step_s
    evidence = found.evidence()
    assert set(evidence) == {"startup", "step", "checkpoint_save", "validation"}
    assert evidence["step"]["limit_s"] == pytest.approx(step, abs=1e-3)
    assert ("floor 12 s" in evidence["step"]["computed"]) and evidence["checkpoint_save"]["computed"]


def test_quantile_is_an_observed_value() -> None:
    assert quantile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert quantile([1.0] * 99 + [7.0], 0.99) == 1.0
    assert quantile([5.0], 0.99) == 5.0


# ---- detect_hang --------------------------------------------------------------------------------------


def beat(rank: int, age: float, section: Section = Section.step, step: int = 40) -> RankBeat:
    return RankBeat(rank, f"h{rank + 1}", step, NOW - age, section=section)


# (story, step times, beats as (section, age of the newest beat), hang expected)
HANG_TABLE = [
    ("toy run: 13 s without a step is a hang", TOY_STEPS, [(Section.step, 13.0), (Section.step, 1.0)], True),
    ("toy run: 10 s is not", TOY_STEPS, [(Section.step, 10.0), (Section.step, 1.0)], False),
    ("OPT-175B: a 14 s step is not a hang", OPT_175B_STEPS, [(Section.step, 20.0)] * 2, False),
    ("OPT-175B: 75 s without a step is", OPT_175B_STEPS, [(Section.step, 75.0)] * 2, True),
    ("a 2-minute synchronous save is not a hang", TOY_STEPS, [(Section.checkpoint_save, 120.0)] * 2, False),
    ("a save stuck for 11 minutes is", TOY_STEPS, [(Section.checkpoint_save, 660.0)] * 2, True),
    ("a 5-minute validation pass is not a hang", TOY_STEPS, [(Section.validation, 300.0)] * 2, False),
    (
        "a slow first step after a large load is not a hang",
        [],
        [(Section.startup, 150.0), (Section.startup, 150.0)],
        False,
    ),
    ("start-up past its limit is", [], [(Section.startup, 200.0), (Section.startup, 1.0)], True),
    (
        "one rank saving, the other stuck in a step",
        TOY_STEPS,
        [(Section.checkpoint_save, 30.0), (Section.step, 30.0)],
        True,
    ),
]


@pytest.mark.parametrize(("story", "times", "beats", "hang"), HANG_TABLE, ids=[t[0] for t in HANG_TABLE])
def test_each_section_has_its_own_limit(
    story: str, times: list[float], beats: list[tuple[Section, float]], hang: bool
) -> None:
    found = detect_hang(
        [beat(r, age, section) for r, (section, age) in enumerate(beats)],
        world_size=len(beats),
        now=NOW,
        attempt_started_at=NOW - 1000,
        limits=limits(times),
    )
    assert (found is not None) == hang
    if found is not None:
        assert found.evidence["limits"]["step"]["computed"]
        assert all("section" in b and "limit_s" in b for b in found.evidence["beats"])


def test_no_first_step_within_the_startup_limit_is_a_hang() -> None:
    common: dict[str, Any] = {"world_size": 2, "now": NOW, "limits": limits([])}
    assert detect_hang([], attempt_started_at=NOW - 170, **common) is None
    found = detect_hang([], attempt_started_at=NOW - 190, **common)
    assert found is not None and "start-up limit 180 s" in found.detail


# ---- through decide(): the run's metrics, its heartbeats and its own overrides --------------------------


def observed(beats: tuple[RankBeat, ...], **run: Any) -> ObservedRun:
    attempt = ObservedAttempt(
        number=1,
        hosts=("h1", "h2"),
        started_at=NOW - 1000,
        world_size=2,
        process=ProcessStatus("running"),
        beats=beats,
        last_step=40,
        first_step_seen=True,
    )
    base = ObservedRun(
        run_id=1,
        name="r",
        desired=DesiredState.running,
        phase=RunPhase.running,
        target_steps=1000,
        host_count=2,
        max_restarts=10,
        lr_scale=1.0,
        lr_override=None,
        clip_override=None,
        pending_restart=None,
        now=NOW,
        attempt=attempt,
        history=(),
        node_states={"h1": NodeState.healthy, "h2": NodeState.healthy},
        busy_hosts=frozenset(),
        checkpoints=(),
    )
    return replace(base, **run)


def test_decide_calibrates_on_the_runs_stored_step_times_and_logs_how() -> None:
    quiet = (beat(0, 40.0), beat(1, 40.0))
    assert decide(observed(quiet, step_times=tuple(OPT_175B_STEPS)), CFG) == []
    [end] = decide(observed(quiet), CFG)  # the same silence on a run with no step times yet: the floor
    assert isinstance(end, EndAttempt) and end.outcome == "hang"
    assert "floor 12 s" in end.evidence["limits"]["step"]["computed"]
    [end] = decide(observed((beat(0, 80.0), beat(1, 80.0)), step_times=tuple(OPT_175B_STEPS)), CFG)
    # 5 x p99 of the step times, + 2 s: a beat reaches the control plane up to one send interval late
    assert end.outcome == "hang" and end.evidence["hang_timeout_s"] == pytest.approx(72.45)
    assert "5 x p99 14.1 s of the 200 newest step times" in end.evidence["limits"]["step"]["computed"]
    assert end.evidence["limits"]["step"]["computed"].endswith("+ 2 s heartbeat interval")


def test_on_a_big_fleet_hosts_beat_less_often_and_every_hang_limit_allows_for_it() -> None:
    # 1,024 hosts at the default budget of 50 heartbeat requests/s: each host sends every 20.48 s
    interval = CFG.heartbeat_interval_for(1024)
    assert interval == pytest.approx(20.48) and CFG.heartbeat_interval_for(8) == CFG.heartbeat_interval_s
    late = (beat(0, 80.0), beat(1, 80.0))  # 80 s old: past 72.45 s at a 2 s interval
    run = observed(late, step_times=tuple(OPT_175B_STEPS))
    assert run.attempt is not None
    big = replace(run, attempt=replace(run.attempt, heartbeat_interval_s=interval))
    assert decide(big, CFG) == []
    assert run_hang_limits(big, big.attempt, CFG).step_s == pytest.approx(70.45 + 20.48)
    [end] = decide(replace(big, now=NOW + 15.0), CFG)
    assert (
        end.outcome == "hang" and "+ 20.5 s heartbeat interval" in end.evidence["limits"]["step"]["computed"]
    )
    assert end.evidence["heartbeat_interval_s"] == 20.48  # out of the simulator's evidence wait


def test_a_ranks_own_last_step_time_calibrates_before_any_metric_is_stored() -> None:
    slow = tuple(replace(beat(r, 40.0), last_step_s=14.0) for r in range(2))
    assert decide(observed(slow), CFG) == []


def test_a_runs_overrides_win_over_the_orchestrators_settings() -> None:
    saving = (beat(0, 200.0, Section.checkpoint_save), beat(1, 200.0, Section.checkpoint_save))
    assert decide(observed(saving), CFG) == []
    [end] = decide(observed(saving, hang_overrides={"checkpoint_save_s": 150.0}), CFG)
    assert end.outcome == "hang" and end.evidence["limits"]["checkpoint_save"]["limit_s"] == 150.0 + 2.0
    stepping = (beat(0, 20.0), beat(1, 20.0))
    assert decide(observed(stepping, hang_overrides={"step_floor_s": 30.0}), CFG) == []
    run = observed(stepping, hang_overrides={"step_time_multiple": 2.0}, step_times=tuple(OPT_175B_STEPS))
    assert run.attempt is not None
    assert run_hang_limits(run, run.attempt, CFG).step_s == pytest.approx(2 * 14.09 + 2.0)


def test_run_config_carries_validated_hang_overrides() -> None:
    cfg = RunConfig(target_steps=10, hang={"step_floor_s": 60, "checkpoint_save_s": 900})
    assert cfg.model_dump(mode="json")["hang"]["checkpoint_save_s"] == 900
    with pytest.raises(ValidationError):
        HangOverrides(step_floor_s=60, validation_s=30)  # a section below the floor
    with pytest.raises(ValidationError):
        HangOverrides(step_time_multiple=0.5)
    with pytest.raises(ValidationError):
        HangOverrides(step_floor_s=1)  # below any heartbeat cadence


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"hang": HangConfig(checkpoint_save_s=5.0)}, "checkpoint_save_s"),
        ({"hang": HangConfig(validation_s=5.0)}, "validation_s"),
        ({"startup_grace_s": 5.0}, "startup_grace_s"),
        ({"straggler_confirm_steps": 1}, "straggler_confirm_steps"),
        ({"heartbeat_interval_s": 20.0}, "heartbeat_interval_s"),
    ],
)
def test_detector_settings_are_checked_at_construction(changes: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        OrchestratorConfig(**changes)
    for bad in ({"step_time_multiple": 0.5}, {"step_time_quantile": 0.0}, {"step_time_window": 0}):
        with pytest.raises(ValueError):
            HangConfig(**bad)  # type: ignore[arg-type]


# ---- stragglers -------------------------------------------------------------------------------------


def ranks(*histories: list[float], first_step: int = 11) -> list[RankBeat]:
    """One beat per rank whose busy history covers `first_step`.. with the given per-step times."""
    return [
        RankBeat(
            r,
            f"h{r + 1}",
            first_step + len(h) - 1,
            NOW,
            busy=tuple((first_step + i, t) for i, t in enumerate(h)),
        )
        for r, h in enumerate(histories)
    ]


FAST = [0.5] * 8
# (story, per-rank busy histories, straggling rank expected or None)
STRAGGLER_TABLE = [
    ("every rank at the same pace", [FAST, FAST, FAST], None),
    ("one 4x step is a reading, not a straggler", [FAST, FAST, [0.5] * 7 + [2.0]], None),
    ("four slow steps of five confirm nothing", [FAST, FAST, [0.5] * 3 + [2.0, 2.0, 0.5, 2.0, 2.0]], None),
    ("five consecutive 4x steps confirm it", [FAST, FAST, [0.5] * 3 + [2.0] * 5], 2),
    ("slow but under the ratio", [FAST, FAST, [1.4] * 8], None),
    ("too few steps reported yet", [[0.5] * 3, [0.5] * 3, [2.0] * 3], None),
    ("the slow rank alternates: no one host is at fault", [[0.5, 2.0] * 4, [2.0, 0.5] * 4, FAST], None),
]


@pytest.mark.parametrize(
    ("story", "histories", "expected"), STRAGGLER_TABLE, ids=[t[0] for t in STRAGGLER_TABLE]
)
def test_a_straggler_is_confirmed_over_consecutive_steps(
    story: str, histories: list[list[float]], expected: int | None
) -> None:
    found = detect_straggler(ranks(*histories), ratio=3.0, confirm_steps=5)
    assert (found.rank if found else None) == expected
    if found is not None:
        assert [o.step for o in found.observations] == [14, 15, 16, 17, 18]
        assert all(o.ratio > 3.0 for o in found.observations)
        assert found.step_time_s > 3.0 * found.others_median_s


def test_ranks_a_step_apart_are_compared_on_the_steps_they_share() -> None:
    beats = [
        *ranks(FAST, FAST),
        RankBeat(2, "h3", 17, NOW, busy=tuple((s, 2.0) for s in range(10, 18))),
    ]
    found = detect_straggler(beats, ratio=3.0, confirm_steps=5)
    assert found is not None and [o.step for o in found.observations] == [13, 14, 15, 16, 17]


def test_decide_acts_on_a_confirmed_straggler_only_and_logs_the_observations() -> None:
    one_reading = tuple(ranks(FAST, [0.5] * 7 + [2.0]))
    assert decide(observed(one_reading), CFG) == []
    confirmed = tuple(ranks(FAST, [0.5] * 3 + [2.0] * 5))
    [end] = decide(observed(confirmed), CFG)
    assert isinstance(end, EndAttempt) and end.outcome == "hardware" and end.cordon_hosts == ("h2",)
    assert "in each of 5 consecutive steps (14-18)" in end.reason
    assert [o["step"] for o in end.evidence["observations"]] == [14, 15, 16, 17, 18]
    assert all(o["ratio"] == 4.0 for o in end.evidence["observations"])


# ---- the heartbeats table as the orchestrator reads it --------------------------------------------------


def test_no_beat_arriving_from_any_rank_holds_the_verdict_until_beats_arrive_again() -> None:
    """Ranks re-send their newest beat every 2 s: stale ranks whose beats keep arriving are hung; stale
    ranks from which nothing arrives at all are behind a control-plane outage, not judged."""
    common: dict[str, Any] = {"world_size": 2, "now": NOW, "attempt_started_at": NOW - 1000}
    common["limits"] = limits(TOY_STEPS)

    def stale(heard_ago: float) -> list[RankBeat]:
        return [replace(beat(r, 30.0), received_at=NOW - heard_ago) for r in range(2)]

    found = detect_hang(stale(1.0), quiet_after_s=6.0, **common)
    assert found is not None and found.evidence["last_heard_s"] == 1.0
    assert detect_hang(stale(20.0), quiet_after_s=6.0, **common) is None
    assert detect_hang(stale(20.0), **common) is not None  # without the rule, as before
    # through decide(): the orchestrator's heartbeat_interval_s (2 s) sets the rule at 6 s
    assert decide(observed(tuple(stale(20.0))), CFG) == []
    [end] = decide(observed(tuple(stale(5.0))), CFG)
    assert isinstance(end, EndAttempt) and end.outcome == "hang"


def test_a_fleet_sized_hang_keeps_its_logbook_entry_small() -> None:
    """8,192 ranks stuck in a collective: the evidence lists the 64 stalest beats and counts the rest."""
    beats = [beat(r, 30.0 + (r == 4097)) for r in range(8192)]
    found = detect_hang(
        beats, world_size=8192, now=NOW, attempt_started_at=NOW - 1000, limits=limits(TOY_STEPS)
    )
    assert found is not None and len(found.stale_ranks) == 8192
    assert len(found.evidence["beats"]) == 64 and found.evidence["beats"][0]["rank"] == 4097
    assert (found.evidence["ranks_beating"], found.evidence["ranks_stale"]) == (8192, 8192)
    assert "and 8176 more" in found.detail and len(found.detail) < 300


def test_the_others_median_is_the_median_of_the_others() -> None:
    rng = random.Random(13)
    for size in (2, 3, 4, 7, 8, 101):
        values = [round(rng.uniform(0.1, 3.0), 1) for _ in range(size)]  # rounded: ties too
        ordered = sorted(values)
        for i, value in enumerate(values):
            assert median_without(ordered, value) == statistics.median(values[:i] + values[i + 1 :])


def test_a_straggler_among_8192_ranks_is_found_in_one_pass() -> None:
    histories = [FAST] * 8192
    histories[5000] = [0.5] * 3 + [2.0] * 5
    started = time.perf_counter()
    found = detect_straggler(ranks(*histories), ratio=3.0, confirm_steps=5)
    assert found is not None and found.rank == 5000
    assert time.perf_counter() - started < 5  # ranks x log(ranks): 0.3 s here; a median per rank took 19 s


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # both: tests/service/test_api_heartbeats.py
def test_beats_posted_to_the_api_reach_the_hang_and_straggler_detectors(
    admin: TestClient, settings: Settings
) -> None:
    run = make_run(admin)
    url = f"/api/v1/runs/{run['id']}/heartbeats"
    now = time.time()

    def post(*beats: dict[str, Any]) -> list[RankBeat]:
        assert admin.post(url, json={"attempt": 1, "beats": list(beats)}).status_code == 204
        engine = make_engine(settings.resolved_database_url)
        try:
            with transaction(make_session_factory(engine)) as session:
                return [rank_beat(b) for b in attempt_heartbeats(session, run_id=run["id"], attempt=1)]
        finally:
            engine.dispose()

    def wire(rank: int, at: float, busy: list[float]) -> dict[str, Any]:
        history = [[s, b] for s, b in zip(range(41 - len(busy) + 1, 42), busy, strict=True)]
        return {"rank": rank, "host": f"h{rank + 1}", "step": 41, "time": at, "busy_s": history}

    # rank 1's loop stopped 30 s ago while its beat keeps arriving: a hang, blamed on nobody in particular
    beats = post(wire(0, now - 1, FAST), wire(1, now - 30, FAST))
    assert [(b.rank, b.host, b.section) for b in beats] == [(0, "h1", Section.step), (1, "h2", Section.step)]
    [end] = decide(observed(tuple(beats), now=now), CFG)
    assert isinstance(end, EndAttempt) and end.outcome == "hang"
    assert [b["rank"] for b in end.evidence["beats"] if b["age_s"] > 12] == [1]
    # both fresh, rank 1 slow in each of the last five steps: a straggler on h2
    beats = post(wire(0, now, FAST), wire(1, now, [0.5] * 3 + [2.0] * 5))
    [end] = decide(observed(tuple(beats), now=now), CFG)
    assert isinstance(end, EndAttempt) and end.outcome == "hardware" and end.cordon_hosts == ("h2",)


# ---- probation: a deep check before an uncordoned host takes work --------------------------------------


def test_a_host_on_probation_gets_deep_diagnostics_before_a_launch() -> None:
    idle = replace(observed(()), attempt=None, phase=RunPhase.pending)
    [launch] = decide(idle, CFG)
    assert launch.hosts == ("h1", "h2") and not launch.deep_check
    on_probation = replace(idle, node_states={"h1": NodeState.healthy, "h2": NodeState.probation})
    [launch] = decide(on_probation, CFG)
    assert launch.deep_check and "h2 on probation" in launch.reason
