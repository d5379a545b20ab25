"""Creating and restarting Slurm runs through the API on a real Slurm cluster (slurm_cluster.py): what Slurm
would refuse is a 422 naming the problem, and nothing is stored."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service import migrate
from service.config import Settings
from service.crud.runs import create_run
from service.db import make_engine, make_session_factory, transaction
from service.main import create_app
from tests.conftest import ADMIN_HEADERS
from tests.slurm_cluster import (
    DOWN_PARTITION,
    PARTITION,
    RESTRICTED_ACCOUNT,
    RESTRICTED_PARTITION,
    SlurmCluster,
)

PARTITIONS = ", ".join(sorted([PARTITION, DOWN_PARTITION, RESTRICTED_PARTITION]))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    with SlurmCluster(tmp_path_factory.mktemp("slurm-api") / "cluster").start() as running:
        yield running


@pytest.fixture
def api(cluster: SlurmCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    monkeypatch.setenv("SLURM_CONF", str(cluster.conf))  # the control plane's own sbatch/scontrol setup
    url = f"sqlite:///{tmp_path / 'trainops.db'}"
    migrate.upgrade(url)
    settings = Settings(database_url=url, home=tmp_path / "home", slurm_enabled=True)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        client.headers.update(ADMIN_HEADERS)
        yield client


def post_run(api: TestClient, name: str, **slurm: Any) -> Any:
    config = {"target_steps": 5, "host_count": 2, "launcher": "slurm", "slurm": slurm}
    return api.post("/api/v1/runs", json={"name": name, "owner": "alice", "config": config})


@pytest.mark.parametrize(
    ("slurm", "message"),
    [
        (
            {"partition": "gpu-big"},
            f"Slurm partition 'gpu-big' does not exist (available: {PARTITIONS})",
        ),
        ({"partition": DOWN_PARTITION}, f"Slurm partition '{DOWN_PARTITION}' is DOWN, not UP"),
        (
            {"partition": RESTRICTED_PARTITION, "account": "interns"},
            f"Slurm account 'interns' may not run jobs in partition '{RESTRICTED_PARTITION}' "
            f"(allowed accounts: {RESTRICTED_ACCOUNT})",
        ),
        (
            {"placement": "exclude", "nodelist": ["n2", "n9"]},
            "Slurm does not know node name(s) n9 (known: n1, n2, n3, n4)",
        ),
    ],
)
def test_what_slurm_would_refuse_is_a_422_and_nothing_is_stored(
    api: TestClient, slurm: dict[str, Any], message: str
) -> None:
    r = post_run(api, "refused", **slurm)
    assert r.status_code == 422, r.text
    assert r.json()["detail"] == message
    assert api.get("/api/v1/runs").json()["total"] == 0


def test_what_slurm_accepts_is_created(api: TestClient) -> None:
    r = post_run(api, "fine", partition=RESTRICTED_PARTITION, account=RESTRICTED_ACCOUNT)
    assert r.status_code == 201, r.text
    r = post_run(api, "fine-exclude", placement="exclude", nodelist=["n3"])
    assert r.status_code == 201, r.text
    assert r.json()["config"]["slurm"]["placement"] == "exclude"


def test_restart_checks_the_stored_slurm_settings_again(api: TestClient, tmp_path: Path) -> None:
    # A run stored while its partition still existed (written directly: the API would refuse it today).
    factory = make_session_factory(make_engine(f"sqlite:///{tmp_path / 'trainops.db'}"))
    config = {"target_steps": 5, "host_count": 2, "launcher": "slurm", "slurm": {"partition": "retired"}}
    with transaction(factory) as session:
        run_id = create_run(session, name="old", owner="alice", config=config, start=False, author="t").id
    r = api.post(f"/api/v1/runs/{run_id}/restart", json={"reason": "try again"})
    assert r.status_code == 422
    assert r.json()["detail"] == f"Slurm partition 'retired' does not exist (available: {PARTITIONS})"
    assert api.get(f"/api/v1/runs/{run_id}").json()["pending_restart"] is None


def test_sbatch_flags_that_override_trainops_are_a_422_on_create_and_on_restart(
    api: TestClient, tmp_path: Path
) -> None:
    r = post_run(api, "evil", extra_sbatch_flags=["--exclusive", "--export=ALL,LD_PRELOAD=/tmp/x.so"])
    assert r.status_code == 422 and "--export is not allowed" in r.text, r.text
    assert api.get("/api/v1/runs").json()["total"] == 0
    assert post_run(api, "refined", extra_sbatch_flags=["--exclusive", "--mem=0"]).status_code == 201

    # stored before the API checked flags (written directly): a restart is refused, nothing is launched
    factory = make_session_factory(make_engine(f"sqlite:///{tmp_path / 'trainops.db'}"))
    config = {
        "target_steps": 5,
        "host_count": 2,
        "launcher": "slurm",
        "slurm": {"extra_sbatch_flags": ["--output=/x"]},
    }
    with transaction(factory) as session:
        run_id = create_run(session, name="old-flags", owner="a", config=config, start=False, author="t").id
    r = api.post(f"/api/v1/runs/{run_id}/restart", json={"reason": "try again"})
    assert r.status_code == 422 and "--output is not allowed" in r.text, r.text
    assert api.get(f"/api/v1/runs/{run_id}").json()["pending_restart"] is None
