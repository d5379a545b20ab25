"""Shared fixtures: every API test runs against SQLite and against the real PostgreSQL on 127.0.0.1:5432."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient

from service import migrate
from service.config import DEFAULT_BOOTSTRAP_TOKEN, Settings
from service.main import create_app

PG_ADMIN_DSN = os.environ.get("TRAINOPS_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")
ADMIN_HEADERS = {"Authorization": f"Bearer {DEFAULT_BOOTSTRAP_TOKEN}"}


REDIS_SERVER = os.environ.get("TRAINOPS_TEST_REDIS", "redis://127.0.0.1:6379")
# Databases 1-15 are lent to tests one at a time; database 0 holds the loans (`trainops-tests:db:N`).
REDIS_TEST_DBS = range(1, 16)
REDIS_LOAN_S = 1800  # a loan outlives any one test; a crashed test's loan expires on its own


@pytest.fixture
def redis_url() -> Iterator[str]:
    """A Redis database of this test's own (a Celery broker's queues are named after hosts, so two tests on
    one database would take each other's tasks), emptied when the test ends. Like a free port: loaned by
    an atomic SET NX in database 0, so parallel test workers and side-by-side suites never share one."""
    import redis

    loans = redis.Redis.from_url(f"{REDIS_SERVER}/0")
    owner = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    for db in REDIS_TEST_DBS:
        key = f"trainops-tests:db:{db}"
        if loans.set(key, owner, nx=True, ex=REDIS_LOAN_S):
            break
    else:
        pytest.fail(f"every Redis test database {REDIS_TEST_DBS} is on loan (keys trainops-tests:db:*)")
    url = f"{REDIS_SERVER}/{db}"
    redis.Redis.from_url(url).flushdb()
    try:
        yield url
    finally:
        redis.Redis.from_url(url).flushdb()
        if loans.get(key) == owner.encode():
            loans.delete(key)


def _pg_url(dbname: str) -> str:
    base = PG_ADMIN_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    return f"{base}/{dbname}"


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database of its own, dropped afterwards."""
    name = f"trainops_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield _pg_url(name)
    finally:
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'trainops.db'}"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return request.getfixturevalue("sqlite_url")
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def migrated_url(db_url: str) -> str:
    migrate.upgrade(db_url)
    return db_url


@pytest.fixture
def settings(migrated_url: str, tmp_path: Path) -> Settings:
    return Settings(database_url=migrated_url, home=tmp_path / "home")


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        yield c


@pytest.fixture
def admin(client: TestClient) -> TestClient:
    client.headers.update(ADMIN_HEADERS)
    return client


def make_token(
    client: TestClient, role: str, run_id: int | None = None, name: str | None = None
) -> dict[str, str]:
    body: dict[str, object] = {"name": name or f"{role}-{uuid.uuid4().hex[:6]}", "role": role}
    if run_id is not None:
        body["run_id"] = run_id
    r = client.post("/api/v1/tokens", json=body, headers=ADMIN_HEADERS)
    assert r.status_code == 201, r.text
    return {"Authorization": f"Bearer {r.json()['token']}"}


def make_run(client: TestClient, name: str = "opt-tiny", **config: object) -> dict:
    cfg = {"preset": "tiny", "target_steps": 100, **config}
    r = client.post(
        "/api/v1/runs", json={"name": name, "owner": "alice", "config": cfg}, headers=ADMIN_HEADERS
    )
    assert r.status_code == 201, r.text
    return r.json()


def checkpoint_path(client: TestClient, run: dict, step: int) -> str:
    """Where the run's trainer would save `step`: the only place the API lets a checkpoint be registered
    (<runs_dir>/<run name>/checkpoints/step_<N>)."""
    from service.recovery.verdicts import runs_dir_of
    from trainer.checkpoint import checkpoint_name

    app: Any = client.app
    return str(runs_dir_of(app.state.settings) / run["name"] / "checkpoints" / checkpoint_name(step))
