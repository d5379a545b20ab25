"""The fleet simulator's smoke test: the real control plane (PostgreSQL, two API workers) and the real
`trainops orchestrator` process against simulated ranks (bench/fleet_sim.py, bench/sim_ranks.py), small and
fast: 4 hosts x 2 ranks, a software crash then a GPU fault, every simulated duration x 0.05."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bench.fleet_sim import main as fleet_sim

pytestmark = pytest.mark.postgres


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    workdir = tmp_path_factory.mktemp("fleet-sim")
    return fleet_sim(
        [
            "--fleet-hosts", "4", "--ranks-per-host", "2", "--runs",
            "--fleet-faults", "crash,gpu", "--fleet-max-s", "60", "--progress-steps", "3",
            "--time-scale", "0.05", "--checkpoint-min", "1", "--api-workers", "2",
            "--workdir", str(workdir), "--json", str(Path(workdir) / "report.json"), "--quiet",
        ]
    )  # fmt: skip


def test_report_has_every_section(report: dict[str, Any]) -> None:
    assert {"phases", "false_actions", "detection", "scaling", "ettr_week", "class_costs"} <= set(report)
    (phase,) = report["phases"]
    assert phase["ranks"] == 8 and phase["runs"] == 1
    orchestrator = phase["orchestrator"]
    assert orchestrator["passes"] > 10  # read from its own pass-duration histogram
    assert 0 < orchestrator["pass_s_mean"] < 5 and orchestrator["cpu_s_per_pass"] > 0
    heartbeats = phase["api"]["heartbeats"]
    assert heartbeats["requests"] > 0 and heartbeats["statuses"] == {"204": heartbeats["requests"]}
    assert heartbeats["server_requests"] >= heartbeats["requests"] * 0.9  # the API's own histogram agrees
    assert phase["api"]["metrics"]["statuses"].keys() == {"200"}
    assert phase["api"]["checkpoints"]["requests"] >= 1
    for startup in ("L=60s", "L=120s", "L=300s"):
        assert 0.5 < report["ettr_week"][startup]["ettr"] < 1.0


def test_the_crash_is_detected_and_the_run_relaunched(report: dict[str, Any]) -> None:
    (crash,) = [f for f in report["phases"][0]["failures"] if f["kind"] == "crash"]
    assert crash["outcome"] == "ok" and crash["detected_as"] == "crash"
    assert crash["recovered"] and crash["relaunched_on"] == "same hosts"
    assert crash["restored_step"] > 0  # from the checkpoint the simulated ranks wrote and registered
    assert 0 <= crash["reaction_s"] < 10 and crash["decision_s"] < 30


def test_the_gpu_fault_ends_on_other_hosts_with_the_host_cordoned(report: dict[str, Any]) -> None:
    (gpu,) = [f for f in report["phases"][0]["failures"] if f["kind"] == "gpu"]
    assert gpu["recovered"] and gpu["relaunched_on"] == "other hosts"
    assert gpu["host_state"] == "cordoned"


def test_no_false_actions(report: dict[str, Any]) -> None:
    assert report["false_actions"] == []
