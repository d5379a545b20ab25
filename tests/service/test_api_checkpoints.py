"""The trainer registers checkpoints; operators and the orchestrator judge, pin and mark them."""

from __future__ import annotations

from fastapi.testclient import TestClient

from service.config import Settings
from tests.conftest import checkpoint_path, make_run, make_token


def test_register_commit_and_mark(admin: TestClient, settings: Settings) -> None:
    run = make_run(admin)
    trainer = make_token(admin, "trainer", run_id=run["id"])
    base = f"/api/v1/runs/{run['id']}/checkpoints"
    on_disk = settings.home / "runs" / run["name"] / "checkpoints" / "step_00000100"
    on_disk.mkdir(parents=True)
    body = {
        "attempt": 1,
        "step": 100,
        "tokens": 409600,
        "path": str(on_disk),
        "size_bytes": 1234,
        "checksum": "sha256:ab",
        "state": "writing",
        "loss_scale": 4.0,
        "lr": 6e-4,
        "clip": 1.0,
        "loss": 3.2,
        "act_norm": 40.0,
        "metadata": {"loss_window": [3.3, 3.2]},
    }
    r = admin.post(base, json=body, headers=trainer)
    assert r.status_code == 201 and r.json()["state"] == "writing"
    ckpt_id = r.json()["id"]
    # registering again is idempotent and returns the stored row
    r = admin.post(base, json=body, headers=trainer)
    assert r.status_code == 200 and r.json()["id"] == ckpt_id
    r = admin.post(f"{base}/{ckpt_id}/commit", headers=trainer)
    assert r.status_code == 200 and r.json()["state"] == "committed" and r.json()["committed_at"]
    assert r.json()["metadata"] == {"loss_window": [3.3, 3.2]}

    r = admin.post(
        f"/api/v1/checkpoints/{ckpt_id}/mark",
        json={"reason": "verified manifest", "state": "verified", "healthy": True, "pinned": True},
    )
    assert r.status_code == 200
    assert r.json()["state"] == "verified" and r.json()["healthy"] is True and r.json()["pinned"] is True
    assert (on_disk / "PINNED").exists()  # the pin reached disk: the trainer's retention keeps it
    assert r.json()["verdict"] == "healthy" and r.json()["verdict_final"] is True  # an operator's verdict
    # verified -> writing is not a transition; the checkpoint keeps its state
    r = admin.post(f"/api/v1/checkpoints/{ckpt_id}/mark", json={"reason": "x", "state": "deleted"})
    assert r.status_code == 200
    r = admin.post(f"/api/v1/checkpoints/{ckpt_id}/mark", json={"reason": "x", "state": "verified"})
    assert r.status_code == 409
    assert admin.get(f"/api/v1/checkpoints/{ckpt_id}").json()["state"] == "deleted"


def test_list_filters_by_state_newest_first(admin: TestClient) -> None:
    run = make_run(admin)
    base = f"/api/v1/runs/{run['id']}/checkpoints"
    for step in (10, 20, 30):
        admin.post(base, json={"step": step, "path": checkpoint_path(admin, run, step)})
    bad = admin.get(base).json()["items"][0]
    admin.post(
        f"/api/v1/checkpoints/{bad['id']}/mark", json={"reason": "checksum mismatch", "state": "corrupt"}
    )
    page = admin.get(base, params={"state": "committed"}).json()
    assert [c["step"] for c in page["items"]] == [20, 10]
    log = admin.get("/api/v1/logbook", params={"run_id": run["id"], "min_severity": "warning"}).json()[
        "items"
    ]
    assert len(log) == 1 and "checksum mismatch" in log[0]["message"]


def test_mark_needs_something_to_change(admin: TestClient) -> None:
    run = make_run(admin)
    c = admin.post(
        f"/api/v1/runs/{run['id']}/checkpoints", json={"step": 1, "path": checkpoint_path(admin, run, 1)}
    ).json()
    assert admin.post(f"/api/v1/checkpoints/{c['id']}/mark", json={"reason": "nothing"}).status_code == 422
    assert (
        admin.post("/api/v1/checkpoints/424242/mark", json={"reason": "x", "pinned": True}).status_code == 404
    )
