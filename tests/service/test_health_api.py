"""The diagnostics routes: an operator checks one host, or sweeps the fleet, through the REST API."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from health.celery_app import HealthCelery, make_app
from health.config import HealthConfig
from tests.conftest import make_token

API = "/api/v1"


@pytest.fixture
def health_app(admin: TestClient, tmp_path: Path) -> Iterator[HealthCelery]:
    script = tmp_path / "faults.json"
    script.write_text(json.dumps({"hosts": {"bad": {"faults": [{"gpu": 3, "kind": "ecc_dbe"}]}}}))
    app = make_app(
        HealthConfig(fake_nvml_path=script, checkpoint_dir=tmp_path / "ckpt", min_free_disk_gb=0.001)
    )
    admin.app.state.health_app = app  # type: ignore[attr-defined]
    yield app
    assert app.embedded_worker is not None
    app.embedded_worker.stop()


def test_operator_checks_one_host_and_a_double_bit_ecc_error_cordons_it(
    admin: TestClient, health_app: HealthCelery
) -> None:
    for host in ("bad", "good"):
        assert admin.post(f"{API}/nodes", json={"hostname": host}).status_code == 201
    response = admin.post(
        f"{API}/nodes/bad/diagnostics", json={"level": "quick", "wait": True, "deadline_s": 30}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["finished"] and body["changed"] == {"bad": "healthy->cordoned"}
    assert "double-bit" in body["outcomes"][0]["reason"]
    assert admin.get(f"{API}/nodes/bad").json()["state"] == "cordoned"
    assert admin.get(f"{API}/nodes/good").json()["state"] == "healthy"
    diags = admin.get(f"{API}/diagnostics", params={"sweep_id": body["sweep_id"], "status": "failed"}).json()
    assert [d["kind"] for d in diags["items"]] == ["nvml.ecc"]


def test_a_fleet_sweep_runs_in_the_background_and_bad_requests_are_refused(
    admin: TestClient, health_app: HealthCelery
) -> None:
    for host in ("bad", "good"):
        admin.post(f"{API}/nodes", json={"hostname": host})
    started = admin.post(f"{API}/diagnostics/sweep", json={"level": "quick", "deadline_s": 30})
    assert started.status_code == 202 and started.json()["task_id"]
    deadline = time.monotonic() + 60
    while admin.get(f"{API}/nodes/bad").json()["state"] != "cordoned":
        assert time.monotonic() < deadline, "the background sweep did not cordon the bad host"
        time.sleep(0.2)
    assert admin.get(f"{API}/nodes/good").json()["state"] == "healthy"

    assert admin.post(f"{API}/nodes/nosuch/diagnostics", json={}).status_code == 404
    assert admin.post(f"{API}/diagnostics/sweep", json={"checks": ["nvml.magic"]}).status_code == 422
    assert admin.post(f"{API}/diagnostics/sweep", json={"level": "extreme"}).status_code == 422
    viewer = make_token(admin, "viewer", name=f"v-{uuid.uuid4().hex[:6]}")
    assert admin.post(f"{API}/diagnostics/sweep", json={}, headers=viewer).status_code == 403
