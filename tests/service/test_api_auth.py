"""Every API route refuses anonymous and under-privileged callers (401/403), and accepts the right role."""

from __future__ import annotations

import re

from fastapi.testclient import TestClient

from tests.conftest import checkpoint_path, make_run, make_token

# (method, path template) -> least role that may call it; "ingest" = operator, or the run's own trainer token.
ROUTE_ROLES: dict[tuple[str, str], str] = {
    ("POST", "/api/v1/runs"): "operator",
    ("GET", "/api/v1/runs"): "viewer",
    ("GET", "/api/v1/runs/{run_id}"): "viewer",
    ("POST", "/api/v1/runs/{run_id}/start"): "operator",
    ("POST", "/api/v1/runs/{run_id}/stop"): "operator",
    ("POST", "/api/v1/runs/{run_id}/restart"): "operator",
    ("GET", "/api/v1/runs/{run_id}/restart-preview"): "viewer",
    ("GET", "/api/v1/runs/{run_id}/attempts"): "viewer",
    ("GET", "/api/v1/runs/{run_id}/goodput"): "viewer",
    ("GET", "/api/v1/runs/{run_id}/attempts/{number}"): "viewer",
    ("POST", "/api/v1/runs/{run_id}/metrics"): "ingest",
    ("GET", "/api/v1/runs/{run_id}/metrics"): "viewer",
    ("POST", "/api/v1/runs/{run_id}/heartbeats"): "ingest",
    ("GET", "/api/v1/runs/{run_id}/heartbeats"): "viewer",
    ("POST", "/api/v1/runs/{run_id}/checkpoints"): "ingest",
    ("GET", "/api/v1/runs/{run_id}/checkpoints"): "viewer",
    ("POST", "/api/v1/runs/{run_id}/checkpoints/{checkpoint_id}/commit"): "ingest",
    ("GET", "/api/v1/checkpoints/{checkpoint_id}"): "viewer",
    ("POST", "/api/v1/checkpoints/{checkpoint_id}/mark"): "operator",
    ("POST", "/api/v1/nodes"): "operator",
    ("GET", "/api/v1/nodes"): "viewer",
    ("GET", "/api/v1/nodes/{host}"): "viewer",
    ("POST", "/api/v1/nodes/{host}/cordon"): "operator",
    ("POST", "/api/v1/nodes/{host}/uncordon"): "operator",
    ("POST", "/api/v1/nodes/{host}/diagnostics"): "operator",
    ("POST", "/api/v1/diagnostics/sweep"): "operator",
    ("GET", "/api/v1/diagnostics"): "viewer",
    ("GET", "/api/v1/logbook"): "viewer",
    ("POST", "/api/v1/logbook"): "operator",
    ("POST", "/api/v1/tokens"): "admin",
    ("GET", "/api/v1/tokens"): "admin",
    ("POST", "/api/v1/tokens/{token_id}/revoke"): "admin",
    ("GET", "/api/v1/decisions"): "viewer",
    ("GET", "/api/v1/decisions/{decision_id}"): "viewer",
    ("POST", "/api/v1/decisions/{decision_id}/approve"): "operator",
    ("POST", "/api/v1/decisions/{decision_id}/reject"): "operator",
}
RANK = {"viewer": 1, "operator": 2, "ingest": 2, "admin": 3}


def _api_routes(client: TestClient) -> list[tuple[str, str]]:
    # The OpenAPI document is the app's public, flat list of routes.
    paths = client.get("/openapi.json").json()["paths"]
    return sorted((m.upper(), p) for p, ops in paths.items() if p.startswith("/api/") for m in ops)


def test_every_route_has_an_access_rule(admin: TestClient) -> None:
    routes = set(_api_routes(admin))
    assert len(routes) >= 28
    assert routes - set(ROUTE_ROLES) == set(), "new routes need an entry in ROUTE_ROLES"


def test_auth_matrix(admin: TestClient) -> None:
    run = make_run(admin, "r1")
    other = make_run(admin, "r2")
    admin.post("/api/v1/nodes", json={"hostname": "h1"})
    ckpt = admin.post(
        f"/api/v1/runs/{run['id']}/checkpoints", json={"step": 1, "path": checkpoint_path(admin, run, 1)}
    ).json()
    tokens = {
        "viewer": make_token(admin, "viewer"),
        "operator": make_token(admin, "operator"),
        "admin": make_token(admin, "admin"),
        "own-trainer": make_token(admin, "trainer", run_id=run["id"]),
        "other-trainer": make_token(admin, "trainer", run_id=other["id"]),
        "garbage": {"Authorization": "Bearer tops_not-a-real-token"},
        "basic": {"Authorization": "Basic dXNlcjpwYXNz"},
        "none": {},
    }
    params = {
        "run_id": run["id"],
        "number": 1,
        "checkpoint_id": ckpt["id"],
        "host": "h1",
        "token_id": 1,
        "decision_id": 1,
    }
    anon = TestClient(admin.app, raise_server_exceptions=False)
    checked = 0
    for method, template in _api_routes(admin):
        path = re.sub(r"\{(\w+)\}", lambda m: str(params[m.group(1)]), template)
        need = ROUTE_ROLES[(method, template)]
        for who, headers in tokens.items():
            # an empty JSON body: authorization is decided before the body is validated
            r = anon.request(method, path, headers=headers, json={} if method == "POST" else None)
            if who in ("garbage", "basic", "none"):
                expected = {401}
            elif who in ("viewer", "operator", "admin"):
                expected = {403} if RANK[who] < RANK[need] else None
            elif who == "own-trainer":
                expected = None if need == "ingest" else {403}
            else:
                expected = {403}
            if expected is None:
                assert r.status_code not in (401, 403), (who, method, path, r.status_code, r.text)
            else:
                assert r.status_code in expected, (who, method, path, r.status_code, r.text)
                assert r.json()["detail"]
            checked += 1
    assert checked == len(_api_routes(admin)) * len(tokens) >= 28 * 8


def test_revoked_token_stops_working(admin: TestClient) -> None:
    r = admin.post("/api/v1/tokens", json={"name": "ci-bot", "role": "viewer"})
    token_id, secret = r.json()["id"], r.json()["token"]
    anon = TestClient(admin.app)
    assert anon.get("/api/v1/runs", headers={"Authorization": f"Bearer {secret}"}).status_code == 200
    assert admin.post(f"/api/v1/tokens/{token_id}/revoke").status_code == 200
    assert anon.get("/api/v1/runs", headers={"Authorization": f"Bearer {secret}"}).status_code == 401
    listed = admin.get("/api/v1/tokens").json()
    assert all("token" not in t and "token_hash" not in t for t in listed)


def test_trainer_tokens_must_name_a_run(admin: TestClient) -> None:
    assert admin.post("/api/v1/tokens", json={"name": "t", "role": "trainer"}).status_code == 400
    assert admin.post("/api/v1/tokens", json={"name": "t", "role": "viewer", "run_id": 1}).status_code == 400
    assert (
        admin.post("/api/v1/tokens", json={"name": "t", "role": "trainer", "run_id": 77}).status_code == 404
    )
    assert admin.post("/api/v1/tokens", json={"name": "t", "role": "root"}).status_code == 422
