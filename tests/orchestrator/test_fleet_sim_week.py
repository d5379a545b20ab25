"""The fleet simulator's ETTR arithmetic (bench/fleet_sim.py): the simulated week and docs/goodput.md's fleet
table, from fixed per-class costs (no live phases, no database)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.fleet_sim import (
    DEEP_CHECK_S,
    FAILURE_MIX,
    LLAMA3_DAYS,
    LLAMA3_INTERRUPTIONS,
    ClassCost,
    fleet_table,
    main,
    mix_costs,
    week_timeline,
)
from service.recovery.config import RemediationConfig

ROOT = Path(__file__).resolve().parents[2]
RECORDED = ROOT / "bench" / "recorded" / "fleet_sim_rerun_2026-12-01.json"
DAY = 86400.0

# every class: 10 s to detect, 3 s of decisions, one launch
FLAT = {kind: ClassCost(detect_s=10.0, decision_s=3.0, launches=1, measured=1) for kind in FAILURE_MIX}


def one_day(events: list[tuple[float, str]], *, deep_check_s: float, rollback_s: float = 0.0) -> dict:
    return week_timeline(
        {**FLAT, "diverge": ClassCost(10.0, 3.0, 1, 1)},
        gpus=8192,
        startup_s=60.0,
        checkpoint_s=600.0,
        save_stall_s=0.0,
        val_every_s=0.0,
        val_s=0.0,
        divergences=0,
        divergence_rollback_s=rollback_s,
        deep_check_s=deep_check_s,
        days=1.0,
        events=events,
    )


def test_a_gpu_fault_costs_the_deep_check_a_crash_does_not() -> None:
    """Production deep-checks the next hosts after a hardware failure (on by default, 120 s deadline); the
    live phases run without it, so the week must charge it: a GPU fault at 3,900 s (300 s after the last
    checkpoint) is down 10 + 3 + 100 + 60 s, the crash after it 10 + 3 + 60 s and no deep check."""
    assert RemediationConfig().deep_check_before_relaunch and DEEP_CHECK_S == 120.0
    week = one_day([(3900.0, "gpu"), (7200.0, "crash")], deep_check_s=100.0)
    # trained: 3,600 kept of 3,900; 3,000 kept of the 3,127 from 4,073 to the crash; the rest after 7,273
    assert week["ettr"] == pytest.approx((3600 + 3000 + (DAY - 7273)) / DAY)
    assert week["lost_h"]["deep_check"] * 3600 == pytest.approx(100.0)
    alone = [(3900.0, "gpu")]
    lost = (one_day(alone, deep_check_s=0.0)["ettr"] - one_day(alone, deep_check_s=100.0)["ettr"]) * DAY
    assert lost == pytest.approx(100.0)
    crash = [(3900.0, "crash")]
    assert one_day(crash, deep_check_s=100.0)["ettr"] == one_day(crash, deep_check_s=0.0)["ettr"]


def test_a_second_host_dying_during_the_restart_keeps_the_run_down_longer() -> None:
    """A host fault 50 s into the GPU fault's 173 s recovery: the relaunch in progress is lost and the run
    is down until the host fault's own 173 s recovery is over (4,123 s), where the old timeline dropped it."""
    week = one_day([(3900.0, "gpu"), (3950.0, "host")], deep_check_s=100.0)
    assert week["failures"] == {"gpu": 1, "host": 1} and week["failures_during_restart"] == 1
    assert week["lost_h"]["failure_during_restart"] * 3600 == pytest.approx(50.0)
    assert week["ettr"] == pytest.approx((3600 + (DAY - 4123)) / DAY)


def test_a_divergence_drawn_while_the_run_is_down_happens_when_it_trains_again() -> None:
    week = one_day([(3900.0, "gpu"), (3950.0, "diverge")], deep_check_s=100.0, rollback_s=120.0)
    assert week["failures"] == {"gpu": 1, "diverge": 1} and week["failures_during_restart"] == 0
    # the run resumes at 4,073, diverges at once (rolls back 120 s), is down 73 s more
    assert week["ettr"] == pytest.approx((3600 - 120 + (DAY - 4146)) / DAY)


def test_the_drawn_week_counts_every_failure_however_long_the_restarts() -> None:
    """With three-hour start-ups most failures land while the run is down; they are charged, not dropped:
    the same draw (same seed) counts as many failures as with instant restarts."""

    def week(startup_s: float) -> dict:
        return week_timeline(
            FLAT,
            gpus=16_384,
            startup_s=startup_s,
            checkpoint_s=600.0,
            save_stall_s=2.0,
            val_every_s=0.0,
            val_s=0.0,
            divergences=2,
            divergence_rollback_s=100.0,
            seed=3,
        )

    quick, slow = week(0.0), week(3 * 3600.0)
    assert slow["failures_during_restart"] > 0
    assert sum(slow["failures"].values()) == sum(quick["failures"].values())
    assert slow["lost_h"]["failure_during_restart"] > 0 and slow["ettr"] < quick["ettr"]


def test_the_fleet_table_weights_each_class_by_the_llama3_mix() -> None:
    """goodput.md's table from per-class costs: detection and decisions as measured, the deep check for the
    hardware classes only (58.7 + 17 + 3 % of the mix), the hang's wasted relaunch as 8.4 % of a launch."""
    costs = {**FLAT, "hang": ClassCost(detect_s=80.0, decision_s=3.0, launches=2, measured=1)}
    mix = mix_costs(costs, deep_check_s=100.0)
    assert mix["detect_s"] == pytest.approx(10 + 0.084 * 70)
    assert mix["decision_s"] == pytest.approx(3.0)
    assert mix["deep_check_s"] == pytest.approx(100 * (0.587 + 0.17 + 0.03))
    assert mix["launches"] == pytest.approx(1.084)
    table = fleet_table(costs, deep_check_s=100.0, save_stall_s=2.0)
    mtbf = LLAMA3_DAYS * 86400 / LLAMA3_INTERRUPTIONS
    per_failure = 10 + 0.084 * 70 + 3 + 78.7 + 1.084 * 60 + 90  # C = 3 min, L = 60 s
    assert table["ettr"]["3"]["60"] == pytest.approx((1 - 2 / 180) * (1 - per_failure / mtbf))
    assert list(table["ettr"]) == ["2", "3", "5", "10", "30"]
    assert list(table["ettr"]["10"]) == ["60", "120", "300"]


def test_an_unmeasured_class_is_charged_the_worst_measured_one() -> None:
    measured = {"crash": ClassCost(5.0, 2.0, 1, 3), "hang": ClassCost(70.0, 3.0, 1, 1)}
    mix = mix_costs(measured, deep_check_s=0.0)
    assert mix["detect_s"] == pytest.approx(0.129 * 5 + (1 - 0.129) * 70)


def test_the_recorded_costs_print_the_week_and_the_table_without_a_live_run(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """What docs/goodput.md quotes: `bench/fleet_sim.py --from-costs bench/recorded/...` (no database)."""
    report = main(["--from-costs", str(RECORDED)])
    out = capsys.readouterr().out
    assert "| 3 min |" in out and "deep check 94.4 s" in out
    assert report["fleet_table"]["deep_check_s"] == pytest.approx(0.787 * 120)
    assert report["ettr_week"]["gpus"] == 8192
    weeks = [report["ettr_week"][k] for k in ("L=60s", "L=120s", "L=300s")]
    assert all(w["lost_h"]["deep_check"] > 0 for w in weeks)
    assert weeks[0]["ettr"] > weeks[2]["ettr"]
