"""`restart-preview` answers "what would you restore now, and why"; an operator's restart without a
checkpoint restores the same choice the orchestrator would make, and says which."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from service.config import DEFAULT_BOOTSTRAP_TOKEN, Settings
from service.crud.telemetry import ingest_metrics
from service.db import make_engine, make_session_factory, transaction
from service.models import Attempt
from service.orchestrator.decide import Launch, ObservedRun, decide
from service.recovery.config import OrchestratorConfig
from service.recovery.restart_point import CheckpointCandidate
from service.statemachine import DesiredState, NodeState, RunPhase
from tests.conftest import make_run
from tests.livesrv import LiveServer
from tests.service.test_checkpoint_catalog import record_of, recorded, save_checkpoint

ADMIN = {"Authorization": f"Bearer {DEFAULT_BOOTSTRAP_TOKEN}"}
CFG = OrchestratorConfig()


def seed(url: str, run_id: int, *, points: list[dict[str, Any]], active: bool) -> None:
    """Attempt 1 of the run, running or ended, with the recorded metrics."""
    engine = make_engine(url)
    try:
        with transaction(make_session_factory(engine)) as session:
            session.add(
                Attempt(
                    run_id=run_id,
                    number=1,
                    hosts=["h1"],
                    ended_at=None if active else dt.datetime.now(dt.UTC),
                    exit_reason=None if active else "crash",
                )
            )
            ingest_metrics(
                session,
                run_id=run_id,
                attempt=1,
                points=[{k: p[k] for k in ("step", "loss", "loss_scale", "act_norm")} for p in points],
            )
    finally:
        engine.dispose()


def catalogue(client: TestClient, run: dict[str, Any], ckpt_dir: Path, steps: list[int]) -> None:
    for step in steps:
        r = client.post(
            f"/api/v1/runs/{run['id']}/checkpoints",
            json=record_of(save_checkpoint(ckpt_dir, step, attempt=1)),
        )
        assert r.status_code == 201, r.text


def test_preview_for_each_failure_on_a_healthy_run(admin: TestClient, settings: Settings) -> None:
    run = make_run(admin, name="healthy")
    healthy = recorded("healthy_tiny_run.json")
    seed(settings.resolved_database_url, run["id"], points=healthy[:50], active=False)
    catalogue(admin, run, settings.home / "runs" / "healthy" / "checkpoints", [20, 30, 40, 50])
    url = f"/api/v1/runs/{run['id']}/restart-preview"

    hardware = admin.get(url, params={"failure": "hardware"}).json()
    assert hardware["checkpoint"]["step"] == 50 and hardware["rejected"] == []
    assert "newest intact checkpoint" in hardware["reason"] and not hardware["fresh_start"]

    # no divergence in sight: the newest healthy checkpoint; 50 has no steps after it yet
    divergence = admin.get(url).json()
    assert divergence["failure"] == "divergence" and divergence["divergence_onset"] is None
    assert divergence["checkpoint"]["step"] == 40 and not divergence["needs_attention"]
    assert [r["step"] for r in divergence["rejected"]] == [50]
    assert "unknown yet" in divergence["rejected"][0]["reason"]

    assert admin.get(url, params={"failure": "sideways"}).status_code == 422
    assert admin.get("/api/v1/runs/4242/restart-preview").status_code == 404


def test_preview_of_a_diverging_attempt_cuts_off_at_its_onset(admin: TestClient, settings: Settings) -> None:
    run = make_run(admin, name="diverging")
    seed(settings.resolved_database_url, run["id"], points=recorded("diverged_tiny_run.json"), active=True)
    catalogue(admin, run, settings.home / "runs" / "diverging" / "checkpoints", [10, 20, 30])
    p = admin.get(f"/api/v1/runs/{run['id']}/restart-preview", params={"failure": "divergence"}).json()
    assert p["divergence_onset"] is not None and 29 <= p["divergence_onset"] <= 32
    assert p["onset_source"] == "attempt 1's metrics (running)"
    assert p["checkpoint"]["step"] == 20
    assert p["rejected"][0]["step"] == 30 and "after the divergence began" in p["rejected"][0]["reason"]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[LiveServer]:
    srv = LiveServer(tmp_path).start()
    try:
        yield srv
    finally:
        srv.stop()


def test_cli_shows_the_restart_preview(server: LiveServer) -> None:
    r = httpx.post(
        f"{server.url}/api/v1/runs",
        json={"name": "cli-run", "owner": "alice", "config": {"target_steps": 10}},
        headers=ADMIN,
    )
    run = r.raise_for_status().json()
    ckpt_dir = server.home / "runs" / "cli-run" / "checkpoints"
    for step in (4, 8):
        body = record_of(save_checkpoint(ckpt_dir, step, attempt=1))
        httpx.post(
            f"{server.url}/api/v1/runs/{run['id']}/checkpoints", json=body, headers=ADMIN
        ).raise_for_status()

    out = server.cli("runs", "restart-preview", str(run["id"]), "--failure", "hang").stdout
    assert "after a hang failure it would restore step 8" in out and "newest intact checkpoint" in out
    out = server.cli("runs", "restart-preview", str(run["id"])).stdout  # divergence: nothing judged yet
    assert "nothing qualifies" in out and "rejected step" in out
    shown = json.loads(server.cli("runs", "restart-preview", str(run["id"]), "--json").stdout)
    assert shown["needs_attention"] and [r["step"] for r in shown["rejected"]] == [8, 4]
    bad = server.cli("runs", "restart-preview", str(run["id"]), "--failure", "sideways", check=False)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


# ---- an operator's restart without a checkpoint --------------------------------------------------------


def observed(checkpoints: tuple[CheckpointCandidate, ...], norms: dict[int, float]) -> ObservedRun:
    return ObservedRun(
        run_id=1,
        name="r",
        desired=DesiredState.running,
        phase=RunPhase.needs_attention,
        target_steps=100,
        host_count=1,
        max_restarts=10,
        lr_scale=1.0,
        lr_override=None,
        clip_override=None,
        pending_restart={"reason": "loss spike", "author": "user:oncall"},
        now=1000.0,
        attempt=None,
        history=(),
        node_states={"h1": NodeState.healthy},
        busy_hosts=frozenset(),
        checkpoints=checkpoints,
        act_norms=norms,
    )


def candidate(step: int) -> CheckpointCandidate:
    return CheckpointCandidate(id=step, step=step, path=f"/c/{step}", usable=True, loss_scale=65536.0)


def launch_of(run: ObservedRun) -> Launch:
    launches = [a for a in decide(run, CFG) if isinstance(a, Launch)]
    assert len(launches) == 1, launches
    return launches[0]


def test_an_operator_restart_defaults_to_the_newest_healthy_checkpoint() -> None:
    norms = {p["step"]: p["act_norm"] for p in recorded("healthy_tiny_run.json")[:50]}
    launch = launch_of(observed(tuple(candidate(s) for s in (20, 30, 40, 50)), norms))
    assert launch.checkpoint is not None and launch.checkpoint.step == 40
    assert "the newest healthy checkpoint, step 40" in launch.reason
    assert launch.evidence["restart_point"].startswith("the newest healthy checkpoint")
    assert [r[0] for r in launch.evidence["rejected_checkpoints"]] == [50]


def test_with_none_healthy_yet_it_takes_the_newest_intact_and_says_so() -> None:
    norms = {p["step"]: p["act_norm"] for p in recorded("healthy_tiny_run.json")[:52]}
    launch = launch_of(observed((candidate(50),), norms))
    assert launch.checkpoint is not None and launch.checkpoint.step == 50
    assert "no checkpoint is healthy yet under the OPT rule; the newest intact one, step 50" in launch.reason
    assert launch_of(observed((), norms)).checkpoint is None


def test_preview_judges_the_loss_scale_by_the_runs_number_format(
    admin: TestClient, settings: Settings
) -> None:
    """The same recorded metrics (OPT's fp16 format: three transient overflows left the scale at 0.5) in two
    runs. Stored as precision fp16 the run is healthy, its trainer stops itself at its floor, and the
    checkpoint saved at 0.5 is the one to restore; stored as fp16-mixed (whose scale starts at 65536) the same
    0.5 is a collapse: a divergence from step 100, the checkpoint after it rejected."""
    points = recorded("healthy_fp16_tiny_seed7.json")[:120]
    previews = {}
    for precision in ("fp16", "fp16-mixed"):
        run = make_run(admin, name=f"scale-{precision}", precision=precision)
        seed(settings.resolved_database_url, run["id"], points=points, active=True)
        ckpt_dir = settings.home / "runs" / f"scale-{precision}" / "checkpoints"
        for step in (95, 105):
            scale = next(p["loss_scale"] for p in points if p["step"] == step)
            body = record_of(save_checkpoint(ckpt_dir, step, attempt=1, loss_scale=scale))
            assert admin.post(f"/api/v1/runs/{run['id']}/checkpoints", json=body).status_code == 201
        previews[precision] = admin.get(f"/api/v1/runs/{run['id']}/restart-preview").json()
    fidelity, mixed = previews["fp16"], previews["fp16-mixed"]
    assert fidelity["divergence_onset"] is None and not fidelity["needs_attention"]
    assert fidelity["checkpoint"]["step"] == 105 and "loss scale 0.5 (>= 0.0001)" in fidelity["reason"]
    assert mixed["divergence_onset"] == 100
    assert (
        mixed["rejected"][0]["step"] == 105 and "after the divergence began" in mixed["rejected"][0]["reason"]
    )
