"""Bad input gets a clear 4xx, never a 500 or a traceback, and nothing stored is lost."""

from __future__ import annotations

from fastapi.testclient import TestClient

from tests.conftest import make_run


def test_malformed_json_and_wrong_types(admin: TestClient) -> None:
    run = make_run(admin)
    cases = [
        ("POST", "/api/v1/runs", '{"name": "x", "owner": ', "application/json"),
        ("POST", "/api/v1/runs", '["not", "an", "object"]', "application/json"),
        (
            "POST",
            "/api/v1/runs",
            '{"name": "x", "owner": "a", "config": {"target_steps": "many"}}',
            "application/json",
        ),
        (
            "POST",
            "/api/v1/runs",
            '{"name": "x", "owner": "a", "config": {"target_steps": 0}}',
            "application/json",
        ),
        ("POST", "/api/v1/runs", "name=x", "application/x-www-form-urlencoded"),
        (
            "POST",
            f"/api/v1/runs/{run['id']}/metrics",
            '{"attempt": 1, "points": {"step": 1}}',
            "application/json",
        ),
        ("POST", f"/api/v1/runs/{run['id']}/metrics", '{"attempt": 0, "points": []}', "application/json"),
        (
            "POST",
            f"/api/v1/runs/{run['id']}/heartbeats",
            '{"attempt": 1, "rank": -1, "step": 0}',
            "application/json",
        ),
        ("POST", "/api/v1/nodes", '{"hostname": ""}', "application/json"),
    ]
    for method, path, body, ctype in cases:
        r = admin.request(method, path, content=body, headers={"Content-Type": ctype})
        assert r.status_code == 422, (path, body, r.status_code, r.text)
        assert "detail" in r.json() and "Traceback" not in r.text
    assert admin.get("/api/v1/runs").json()["total"] == 1


def test_unknown_ids_are_404_with_a_message(admin: TestClient) -> None:
    for path in (
        "/api/v1/runs/424242",
        "/api/v1/runs/424242/metrics",
        "/api/v1/runs/424242/checkpoints",
        "/api/v1/checkpoints/424242",
        "/api/v1/nodes/ghost",
        "/api/v1/runs/424242/heartbeats",
    ):
        r = admin.get(path)
        assert r.status_code == 404, path
        assert r.json()["detail"]
    r = admin.post("/api/v1/runs/424242/metrics", json={"attempt": 1, "points": [{"step": 1}]})
    assert r.status_code == 404


def test_pagination_bounds(admin: TestClient) -> None:
    make_run(admin)
    for params in ({"limit": 0}, {"limit": 501}, {"limit": 10**12}, {"offset": -1}, {"limit": "ten"}):
        r = admin.get("/api/v1/runs", params=params)
        assert r.status_code == 422, params
    r = admin.get("/api/v1/runs", params={"limit": 500, "offset": 10_000})
    assert r.status_code == 200 and r.json()["items"] == [] and r.json()["total"] == 1
    assert admin.get("/api/v1/runs/0").status_code == 422
    assert admin.get("/api/v1/runs/-5").status_code == 422
    assert admin.get("/api/v1/runs/99999999999999999999999").status_code == 422


def test_state_conflicts_are_409(admin: TestClient) -> None:
    run = make_run(admin)
    admin.post("/api/v1/nodes", json={"hostname": "h1"})
    assert admin.post("/api/v1/nodes/h1/uncordon", json={"reason": "x"}).status_code == 409
    admin.post(f"/api/v1/runs/{run['id']}/stop", json={"reason": "done for today"})
    r = admin.post(f"/api/v1/runs/{run['id']}/stop", json={"reason": "again"})
    assert r.status_code == 200 and r.json()["phase"] == "stopped"


def test_probes_and_metrics(admin: TestClient) -> None:
    anon = TestClient(admin.app)
    assert anon.get("/healthz").json() == {"status": "ok"}
    assert anon.get("/readyz").json() == {"status": "ready"}
    anon.get("/api/v1/runs")
    admin.get("/api/v1/runs/424242")
    anon.get("/no/such/path")
    text = anon.get("/metrics").text
    assert "trainops_http_request_duration_seconds_bucket" in text
    assert 'route="/api/v1/runs"' in text
    # Labels are route templates and status classes, never concrete ids.
    assert 'method="GET",route="/api/v1/runs/{run_id}",status="4xx"' in text
    assert 'route="unmatched",status="4xx"' in text
    assert "424242" not in text


def test_openapi_documents_every_route_with_examples(admin: TestClient) -> None:
    spec = admin.get("/openapi.json").json()
    assert "/api/v1/runs/{run_id}/restart" in spec["paths"]
    schemas = spec["components"]["schemas"]
    assert schemas["RunCreate"]["examples"] and schemas["RestartRequest"]["examples"]
    assert schemas["MetricBatch"]["examples"]
    assert admin.get("/docs").status_code == 200
