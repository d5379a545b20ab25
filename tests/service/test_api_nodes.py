"""Hosts register with their GPUs; on-call cordons a bad one with a reason that lands in the logbook."""

from __future__ import annotations

from fastapi.testclient import TestClient


def _gpus(n: int, host: str) -> list[dict]:
    return [
        {"index": i, "uuid": f"GPU-{host}-{i}", "model": "A100-SXM4-80GB", "memory_mb": 81920}
        for i in range(n)
    ]


def test_register_list_cordon_uncordon(admin: TestClient) -> None:
    r = admin.post(
        "/api/v1/nodes", json={"hostname": "gpu-001", "labels": {"rack": "r1"}, "gpus": _gpus(8, "a")}
    )
    assert r.status_code == 201 and len(r.json()["gpus"]) == 8 and r.json()["state"] == "healthy"
    # re-registering refreshes the inventory: a GPU fell off the bus
    r = admin.post("/api/v1/nodes", json={"hostname": "gpu-001", "gpus": _gpus(7, "a")})
    assert r.status_code == 200 and len(r.json()["gpus"]) == 7
    admin.post("/api/v1/nodes", json={"hostname": "gpu-002", "gpus": _gpus(8, "b")})

    r = admin.post("/api/v1/nodes/gpu-001/cordon", json={"reason": "XID 79 on GPU 7"})
    assert (
        r.status_code == 200
        and r.json()["state"] == "cordoned"
        and r.json()["state_reason"] == "XID 79 on GPU 7"
    )
    assert admin.get("/api/v1/nodes", params={"state": "cordoned"}).json()["total"] == 1
    log = admin.get("/api/v1/logbook", params={"host": "gpu-001", "newest_first": True}).json()["items"]
    assert "XID 79 on GPU 7" in log[0]["message"] and log[0]["evidence"]["to"] == "cordoned"

    # back from repair: on probation until a deep check passes (NodeCordoned runbook), not straight healthy
    r = admin.post("/api/v1/nodes/gpu-001/uncordon", json={"reason": "GPU replaced"})
    assert r.status_code == 200 and r.json()["state"] == "probation"
    log = admin.get("/api/v1/logbook", params={"host": "gpu-001", "newest_first": True}).json()["items"]
    assert log[0]["evidence"] == {"from": "cordoned", "to": "probation", "until": "a deep check passes"}
    r = admin.post("/api/v1/nodes/gpu-001/uncordon", json={"reason": "again"})
    assert r.status_code == 409


def test_cordon_needs_a_reason_and_a_known_host(admin: TestClient) -> None:
    admin.post("/api/v1/nodes", json={"hostname": "gpu-003"})
    assert admin.post("/api/v1/nodes/gpu-003/cordon", json={}).status_code == 422
    assert admin.post("/api/v1/nodes/gpu-003/cordon", json={"reason": "   "}).status_code == 422
    r = admin.post("/api/v1/nodes/nope/cordon", json={"reason": "x"})
    assert r.status_code == 404 and "nope" in r.json()["detail"]
    assert admin.get("/api/v1/nodes/gpu-003").json()["state"] == "healthy"


def test_bad_registrations_are_refused(admin: TestClient) -> None:
    dup = [
        {"index": 0, "uuid": "u1", "model": "m", "memory_mb": 1},
        {"index": 0, "uuid": "u2", "model": "m", "memory_mb": 1},
    ]
    assert admin.post("/api/v1/nodes", json={"hostname": "h", "gpus": dup}).status_code == 422
    assert admin.post("/api/v1/nodes", json={"hostname": "bad host!"}).status_code == 422
    assert admin.get("/api/v1/nodes").json()["total"] == 0


def test_notes_and_logbook_filters(admin: TestClient) -> None:
    admin.post("/api/v1/nodes", json={"hostname": "gpu-009"})
    r = admin.post("/api/v1/logbook", json={"message": "Swapped PSU on gpu-009", "hostname": "gpu-009"})
    assert r.status_code == 201 and r.json()["kind"] == "note"
    notes = admin.get("/api/v1/logbook", params={"kind": "note"}).json()
    assert notes["total"] == 1 and notes["items"][0]["message"] == "Swapped PSU on gpu-009"
    assert admin.post("/api/v1/logbook", json={"message": "x", "run_id": 999}).status_code == 404
    assert admin.post("/api/v1/logbook", json={"message": ""}).status_code == 422
    assert admin.get("/api/v1/logbook", params={"kind": "gossip"}).status_code == 422
