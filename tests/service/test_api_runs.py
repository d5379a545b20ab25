"""A researcher creates a run, an on-call engineer starts, stops and restarts it with OPT's levers."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from service.crud.runs import get_run, set_run_phase
from service.db import transaction
from service.models import Attempt, utcnow
from service.statemachine import RunPhase
from tests.conftest import checkpoint_path, make_run


def test_create_list_and_get_runs(admin: TestClient) -> None:
    created = make_run(admin, "opt-125m-a", preset="125M", host_count=16)
    assert created["phase"] == "pending"
    assert created["desired_state"] == "stopped"
    assert created["config"]["host_count"] == 16
    make_run(admin, "opt-125m-b")
    make_run(admin, "other")

    r = admin.get("/api/v1/runs", params={"name": "opt-125m"})
    assert r.status_code == 200
    page = r.json()
    assert page["total"] == 2
    assert {i["name"] for i in page["items"]} == {"opt-125m-a", "opt-125m-b"}

    r = admin.get("/api/v1/runs", params={"limit": 1, "offset": 1})
    assert r.json()["total"] == 3 and len(r.json()["items"]) == 1

    r = admin.get(f"/api/v1/runs/{created['id']}")
    assert r.status_code == 200 and r.json()["name"] == "opt-125m-a"

    r = admin.get("/api/v1/runs", params={"phase": "running"})
    assert r.json()["total"] == 0


def test_duplicate_run_name_is_a_conflict_and_keeps_the_first(admin: TestClient) -> None:
    first = make_run(admin, "dup")
    r = admin.post("/api/v1/runs", json={"name": "dup", "owner": "bob", "config": {"target_steps": 5}})
    assert r.status_code == 409
    assert "already exists" in r.json()["detail"]
    assert admin.get(f"/api/v1/runs/{first['id']}").json()["owner"] == "alice"


def test_start_and_stop_are_recorded_in_the_logbook(admin: TestClient) -> None:
    run = make_run(admin)
    r = admin.post(f"/api/v1/runs/{run['id']}/start")
    assert r.status_code == 200 and r.json()["desired_state"] == "running"
    r = admin.post(f"/api/v1/runs/{run['id']}/stop", json={"reason": "cluster maintenance"})
    assert r.status_code == 200
    # nothing was running yet, so the stop completes at once
    assert r.json()["phase"] == "stopped"
    log = admin.get("/api/v1/logbook", params={"run_id": run["id"]}).json()["items"]
    messages = [e["message"] for e in log]
    assert any("asked to start" in m for m in messages)
    assert any("cluster maintenance" in m for m in messages)
    assert all(e["author"] == "user:bootstrap-admin" for e in log)


def test_restart_with_overrides_sets_standing_and_one_shot_overrides(admin: TestClient) -> None:
    run = make_run(admin)
    ckpt = admin.post(
        f"/api/v1/runs/{run['id']}/checkpoints",
        json={
            "attempt": 1,
            "step": 10,
            "path": checkpoint_path(admin, run, 10),
            "state": "committed",
            "loss_scale": 2.0,
        },
    ).json()
    r = admin.post(
        f"/api/v1/runs/{run['id']}/restart",
        json={
            "reason": "loss spike at step 12",
            "from_checkpoint_id": ckpt["id"],
            "lr_scale": 0.5,
            "clip": 0.3,
            "reset_loss_scale": True,
            "skip_batches": 3,
        },
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["lr_scale"] == 0.5 and body["clip_override"] == 0.3
    assert body["desired_state"] == "running"
    assert body["pending_restart"]["from_checkpoint_id"] == ckpt["id"]
    assert (
        body["pending_restart"]["skip_batches"] == 3 and body["pending_restart"]["reset_loss_scale"] is True
    )
    entry = admin.get("/api/v1/logbook", params={"run_id": run["id"], "newest_first": True}).json()["items"][
        0
    ]
    assert "loss spike at step 12" in entry["message"]
    assert entry["evidence"]["before"]["clip"] is None and entry["evidence"]["after"]["clip"] == 0.3


def test_restart_refuses_a_corrupt_or_foreign_checkpoint(admin: TestClient) -> None:
    run = make_run(admin, "a")
    other = make_run(admin, "b")
    ckpt = admin.post(
        f"/api/v1/runs/{other['id']}/checkpoints", json={"step": 1, "path": checkpoint_path(admin, other, 1)}
    ).json()
    r = admin.post(
        f"/api/v1/runs/{run['id']}/restart", json={"reason": "r", "from_checkpoint_id": ckpt["id"]}
    )
    assert r.status_code == 404
    own = admin.post(
        f"/api/v1/runs/{run['id']}/checkpoints", json={"step": 1, "path": checkpoint_path(admin, run, 1)}
    ).json()
    assert (
        admin.post(
            f"/api/v1/checkpoints/{own['id']}/mark", json={"reason": "bad sha", "state": "corrupt"}
        ).status_code
        == 200
    )
    r = admin.post(f"/api/v1/runs/{run['id']}/restart", json={"reason": "r", "from_checkpoint_id": own["id"]})
    assert r.status_code == 409 and "corrupt" in r.json()["detail"]
    # the refused restarts changed nothing
    assert admin.get(f"/api/v1/runs/{run['id']}").json()["pending_restart"] is None


def test_restart_overrides_are_validated(admin: TestClient) -> None:
    run = make_run(admin)
    for bad in (
        {"reason": "x", "lr": -1},
        {"reason": "x", "clip": 0},
        {"reason": "x", "skip_batches": -2},
        {"reason": ""},
        {"reason": "x", "lr_scale": "half"},
        {"reason": "x", "unknown": 1},
    ):
        r = admin.post(f"/api/v1/runs/{run['id']}/restart", json=bad)
        assert r.status_code == 422, (bad, r.text)
    assert admin.get(f"/api/v1/runs/{run['id']}").json()["lr_scale"] == 1.0


def test_attempts_are_listed_per_run(admin: TestClient) -> None:
    run = make_run(admin)
    assert admin.get(f"/api/v1/runs/{run['id']}/attempts").json() == {
        "items": [],
        "total": 0,
        "limit": 100,
        "offset": 0,
    }
    assert admin.get(f"/api/v1/runs/{run['id']}/attempts/1").status_code == 404
    assert admin.get("/api/v1/runs/999999/attempts").status_code == 404


def test_a_slurm_run_is_refused_where_slurm_is_not_enabled(admin: TestClient) -> None:
    config = {"target_steps": 5, "launcher": "slurm", "slurm": {"partition": "gpu"}}
    r = admin.post("/api/v1/runs", json={"name": "on-slurm", "owner": "alice", "config": config})
    assert r.status_code == 422
    assert "Slurm is not enabled on this control plane" in r.json()["detail"]
    assert admin.get("/api/v1/runs").json()["total"] == 0


def _put_in_phase(client: TestClient, run_id: int, *phases: str) -> None:
    """Walk a run along the state machine, as the orchestrator would."""
    with transaction(client.app.state.session_factory) as session:  # type: ignore[attr-defined]
        run = get_run(session, run_id=run_id, for_update=True)
        for target in phases:
            set_run_phase(session, run=run, target=RunPhase(target), reason="test", author="test")


@pytest.mark.parametrize("gave_up", ["needs_attention", "failed"])
def test_start_of_a_run_that_gave_up_is_a_restart_and_stop_settles_it(
    admin: TestClient, gave_up: str
) -> None:
    run = make_run(admin)
    _put_in_phase(admin, run["id"], "starting", "running", gave_up)
    started = admin.post(f"/api/v1/runs/{run['id']}/start").json()
    # the orchestrator only resumes these on an operator's restart, which the start asks for
    assert started["desired_state"] == "running" and started["phase"] == gave_up
    assert started["pending_restart"]["reason"] == f"started by user:bootstrap-admin from {gave_up}"
    stopped = admin.post(f"/api/v1/runs/{run['id']}/stop", json={"reason": "not today"}).json()
    assert stopped["phase"] == "stopped" and stopped["pending_restart"] is None
    # and a stopped run's start is a plain start (the orchestrator resumes it from its newest checkpoint)
    again = admin.post(f"/api/v1/runs/{run['id']}/start").json()
    assert again["desired_state"] == "running" and again["pending_restart"] is None


def test_goodput_of_a_run_that_never_ran_is_empty_not_an_error(admin: TestClient) -> None:
    run = make_run(admin, "never-ran")
    r = admin.get(f"/api/v1/runs/{run['id']}/goodput")
    assert r.status_code == 200, r.text
    assert r.json()["attempts"] == 0 and r.json()["failures"] == {}


def test_hyperparameters_are_the_recipe_only(admin: TestClient) -> None:
    # Each key becomes a trainer flag after the orchestrator's own: one naming another run's files (or the
    # operator's levers) would win. Refused with the key named, and nothing stored.
    for bad, key in (
        ({"run_dir": "/runs/other-run"}, "run_dir"),
        ({"resume_from": "/runs/other-run/checkpoints/step_00000010"}, "resume_from"),
        ({"lr_scale": 100.0}, "lr_scale"),
        ({"seed": "7"}, "seed"),
        ({"grad_predivide": False}, "grad_predivide"),  # fp16 (OPT's format) always pre-divides
    ):
        r = admin.post(
            "/api/v1/runs",
            json={"name": "bad-hp", "owner": "a", "config": {"target_steps": 5, "hyperparameters": bad}},
        )
        assert r.status_code == 422 and f"hyperparameters.{key}" in r.text, r.text
    assert admin.get("/api/v1/runs").json()["total"] == 0
    r = admin.post(
        "/api/v1/runs",
        json={"name": "ok-hp", "owner": "a", "config": {"target_steps": 5, "hyperparameters": {"lr": 6e-4}}},
    )
    assert r.status_code == 201, r.text
    mixed = {"target_steps": 5, "precision": "fp16-mixed", "hyperparameters": {"grad_predivide": False}}
    r = admin.post("/api/v1/runs", json={"name": "mixed-hp", "owner": "a", "config": mixed})
    assert r.status_code == 201 and r.json()["config"]["precision"] == "fp16-mixed", r.text


def test_attempts_are_listed_a_page_at_a_time(admin: TestClient) -> None:
    """A run restarted for months has thousands of attempts: the list is paged like every other list."""
    run = make_run(admin)
    with transaction(admin.app.state.session_factory) as session:  # type: ignore[attr-defined]
        session.add_all(Attempt(run_id=run["id"], number=n, ended_at=utcnow()) for n in range(1, 8))
    url = f"/api/v1/runs/{run['id']}/attempts"
    page = admin.get(url, params={"limit": 3, "offset": 2}).json()
    assert [a["number"] for a in page["items"]] == [3, 4, 5]
    assert (page["total"], page["limit"], page["offset"]) == (7, 3, 2)
    assert [a["number"] for a in admin.get(url, params={"offset": 6}).json()["items"]] == [7]
    # the documented maximum page size (service/api/deps.py Limit) is enforced
    assert admin.get(url, params={"limit": 501}).status_code == 422
    assert admin.get(url, params={"limit": 0}).status_code == 422
