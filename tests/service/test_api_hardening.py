"""Issue 12, defects 1, 2, 9 and 10: bad input to the REST API gets a clear 4xx, and nothing stored is lost
or corrupted. Every test here failed on the code before the fix."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from service.config import Settings
from service.crud import tokens as tokens_crud
from service.db import make_engine, make_session_factory, transaction
from service.main import create_app
from service.schemas import (
    DEFAULT_BODY_LIMIT_BYTES,
    HEARTBEAT_BATCH_LIMIT_BYTES,
    METRIC_BATCH_LIMIT_BYTES,
    NOTE_BODY_LIMIT_BYTES,
    MetricBatch,
)
from service.statemachine import Role
from tests.conftest import ADMIN_HEADERS, checkpoint_path, make_run, make_token

MIB = 1024 * 1024


# ---- defect 1: authentication before the body, body caps, bounded free-form JSON -------------------------


class _StreamedBody:
    """An ASGI ``receive`` that streams ``chunks`` chunks of ``chunk_size`` bytes and counts what was read."""

    def __init__(self, chunks: int, chunk_size: int = MIB) -> None:
        self.chunks = chunks
        self.chunk = b"[" + b"1," * (chunk_size // 2 - 1) + b"1"
        self.read = 0

    async def __call__(self) -> dict[str, Any]:
        if self.read >= self.chunks:
            await asyncio.sleep(3600)  # the client has sent everything; it waits for the reply
        self.read += 1
        return {"type": "http.request", "body": self.chunk, "more_body": self.read < self.chunks}


def _asgi_post(
    app: Any, path: str, body: _StreamedBody, headers: dict[str, str]
) -> tuple[int, dict[str, Any]]:
    """POST a streamed body straight into the ASGI app (no client library buffering it first)."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "client": ("127.0.0.1", 40000),
        "server": ("testserver", 80),
    }
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def call() -> None:
        await asyncio.wait_for(app(scope, body, send), timeout=60)

    asyncio.run(call())
    start = next(m for m in sent if m["type"] == "http.response.start")
    payload = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return int(start["status"]), json.loads(payload)


@pytest.fixture
def sqlite_app(sqlite_url: str, tmp_path: Any) -> Iterator[tuple[Any, int]]:
    from service import migrate

    migrate.upgrade(sqlite_url)
    engine = make_engine(sqlite_url)
    settings = Settings(database_url=sqlite_url, home=tmp_path / "home")
    app = create_app(settings, session_factory=make_session_factory(engine))
    with TestClient(app, raise_server_exceptions=False) as client:
        run_id = make_run(client)["id"]
    yield app, run_id
    engine.dispose()


def test_a_large_post_without_a_token_is_refused_before_its_body_is_read(
    sqlite_app: tuple[Any, int],
) -> None:
    app, run_id = sqlite_app
    for path in ("/api/v1/runs", "/api/v1/logbook", f"/api/v1/runs/{run_id}/metrics"):
        for headers in ({}, {"Authorization": "Bearer not-a-token"}):
            body = _StreamedBody(chunks=52)  # 52 MiB, chunked: no Content-Length
            status, reply = _asgi_post(app, path, body, {"content-type": "application/json", **headers})
            assert status == 401, (path, headers, reply)
            assert reply["detail"]
            assert body.read == 0, f"{path}: the server read {body.read} MiB before refusing"


def test_a_body_over_the_cap_is_413_declared_or_streamed(sqlite_app: tuple[Any, int]) -> None:
    app, run_id = sqlite_app
    auth = {"content-type": "application/json", **ADMIN_HEADERS}
    # declared too large: refused before a byte is read
    body = _StreamedBody(chunks=52)
    status, reply = _asgi_post(app, "/api/v1/runs", body, {**auth, "content-length": str(52 * MIB)})
    assert status == 413 and "64 KiB" in reply["detail"] and body.read == 0
    # streamed (chunked) without a length: counted, and reading stops once the cap is passed
    for path, cap in (
        ("/api/v1/runs", DEFAULT_BODY_LIMIT_BYTES),
        ("/api/v1/logbook", NOTE_BODY_LIMIT_BYTES),
        (f"/api/v1/runs/{run_id}/metrics", METRIC_BATCH_LIMIT_BYTES),
        (f"/api/v1/runs/{run_id}/heartbeats", HEARTBEAT_BATCH_LIMIT_BYTES),
    ):
        body = _StreamedBody(chunks=1000, chunk_size=64 * 1024)
        status, reply = _asgi_post(app, path, body, auth)
        assert status == 413, (path, reply)
        assert body.read * 64 * 1024 <= cap + 64 * 1024, f"{path}: read {body.read} chunks"


def test_the_metric_batch_cap_fits_the_largest_batch_the_schema_admits(admin: TestClient) -> None:
    """The cap is derived from the batch limits: a full batch of the widest points fits, and is stored."""
    run = make_run(admin)
    widest_value = -1.2345678901234567e-300
    point = {
        "step": 0,
        "time": time.time(),
        "tokens": 2**62,
        **dict.fromkeys(
            (
                "loss",
                "grad_norm",
                "loss_scale",
                "act_norm",
                "lr",
                "clip",
                "tokens_per_s",
                "tflops_per_gpu",
                "step_time_s",
            ),
            widest_value,
        ),
        "values": {f"{i:02d}" + "v" * 62: widest_value for i in range(32)},
    }
    points = [{**point, "step": 2**62 - s} for s in range(10_000)]
    body = json.dumps({"attempt": 2**31 - 1, "points": points}, separators=(",", ":")).encode()
    assert len(body) <= METRIC_BATCH_LIMIT_BYTES
    MetricBatch.model_validate_json(body)  # the schema admits it
    r = admin.post(
        f"/api/v1/runs/{run['id']}/metrics", content=body, headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 200 and r.json()["accepted"] == 10_000, r.text[:300]
    with open("docs/reporting-contract.md", encoding="utf-8") as doc:
        assert f"{METRIC_BATCH_LIMIT_BYTES:,} bytes" in doc.read()


def _deep(depth: int) -> Any:
    value: Any = "leaf"
    for _ in range(depth):
        value = {"k": value}
    return value


def test_free_form_json_fields_are_bounded(admin: TestClient) -> None:
    run = make_run(admin)
    ckpt = {"step": 10, "path": checkpoint_path(admin, run, 10), "state": "committed"}
    cases: list[tuple[str, dict[str, Any], str]] = [
        (f"/api/v1/runs/{run['id']}/checkpoints", {**ckpt, "metadata": _deep(40)}, "metadata"),
        (f"/api/v1/runs/{run['id']}/checkpoints", {**ckpt, "metadata": {"x": "y" * 20_000}}, "metadata"),
        (f"/api/v1/runs/{run['id']}/checkpoints", {**ckpt, "metadata": list(range(5000))}, "metadata"),
        ("/api/v1/logbook", {"message": "m", "evidence": _deep(40)}, "evidence"),
        ("/api/v1/logbook", {"message": "m", "evidence": {str(i): i for i in range(2000)}}, "evidence"),
        (
            "/api/v1/runs",
            {"name": "r2", "owner": "a", "config": {"target_steps": 5, "preset": "p" * 5000}},
            "preset",
        ),
        (
            "/api/v1/runs",
            {
                "name": "r3",
                "owner": "a",
                "config": {"target_steps": 5, "hyperparameters": {"lr": "x" * 5000}},
            },
            "hyperparameters",
        ),
        (
            "/api/v1/runs",
            {
                "name": "r4",
                "owner": "a",
                "config": {"target_steps": 5, "hyperparameters": {f"k{i}": i for i in range(1000)}},
            },
            "hyperparameters",
        ),
    ]
    for path, body, field in cases:
        r = admin.post(path, json=body)
        assert r.status_code == 422, (path, field, r.status_code, r.text[:300])
        assert field in r.text, (field, r.text[:500])
    assert admin.get("/api/v1/runs").json()["total"] == 1
    assert admin.get(f"/api/v1/runs/{run['id']}/checkpoints").json()["total"] == 0


# ---- defect 2: metric times and named values are validated; reads survive any stored row -----------------


def _post_raw(client: TestClient, url: str, text: str, headers: dict[str, str] | None = None) -> Any:
    return client.post(url, content=text, headers={"Content-Type": "application/json", **(headers or {})})


def test_metric_times_must_be_finite_seconds_near_now(admin: TestClient) -> None:
    run = make_run(admin)
    url = f"/api/v1/runs/{run['id']}/metrics"
    for bad in ("1.76e12", "-1", "-1e12", "1e300", "NaN", "Infinity", "-Infinity", "0"):
        r = _post_raw(admin, url, '{"attempt": 1, "points": [{"step": 1, "time": ' + bad + "}]}")
        assert r.status_code == 422, (bad, r.status_code, r.text[:300])
        assert "time" in r.text
    assert admin.get(url).json()["total"] == 0
    r = admin.post(url, json={"attempt": 1, "points": [{"step": 1, "time": time.time() - 3600}]})
    assert r.status_code == 200 and r.json()["accepted"] == 1


def test_named_values_are_finite_and_the_reserved_name_is_refused(admin: TestClient) -> None:
    run = make_run(admin)
    url = f"/api/v1/runs/{run['id']}/metrics"
    for values in ('{"nan": 1}', '{"nan": ["loss"]}', '{"mfu": NaN}', '{"mfu": Infinity}', '{"x": 1e999}'):
        r = _post_raw(admin, url, '{"attempt": 1, "points": [{"step": 1, "values": ' + values + "}]}")
        assert r.status_code == 422, (values, r.status_code, r.text[:300])
        assert "values" in r.text
    # a NaN loss is still the documented encoding: stored as null, named in values.nan, read back as NaN
    r = _post_raw(admin, url, '{"attempt": 1, "points": [{"step": 2, "loss": NaN, "values": {"mfu": 0.4}}]}')
    assert r.status_code == 200, r.text
    [point] = admin.get(url).json()["points"]
    assert point["loss"] == "NaN" and point["values"]["mfu"] == 0.4
    assert admin.get("/metrics").status_code == 200


def _insert_metric_rows(url: str, run_id: int, rows: list[dict[str, Any]]) -> None:
    """Rows as an older server (or a hand-edited database) may have stored them, bypassing validation."""
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            for row in rows:
                columns = ", ".join(f'"{c}"' for c in row)
                params = ", ".join(f":{c}" for c in row)
                conn.execute(
                    sa.text(
                        f"INSERT INTO metrics (run_id, attempt, {columns}) VALUES (:run_id, 1, {params})"
                    ),
                    {"run_id": run_id, **row},
                )
    finally:
        engine.dispose()


def test_reads_and_the_scrape_survive_bad_stored_rows(admin: TestClient, migrated_url: str) -> None:
    run = make_run(admin, name="bad-rows")
    other = make_run(admin, name="healthy")
    for r in (run, other):
        admin.post(f"/api/v1/runs/{r['id']}/start")
    now = dt.datetime.now(dt.UTC).replace(tzinfo=None).isoformat(sep=" ")
    postgres = migrated_url.startswith("postgresql")
    bad_rows: list[dict[str, Any]] = [
        {"step": 1, "time": now, "loss": 3.0, "values": '{"nan": 1}'},
        {"step": 2, "time": now, "loss": 2.9, "values": "[1, 2]"},
        {"step": 3, "time": now, "loss": 2.8, "values": '"text"'},
        {"step": 4, "time": now, "loss": 2.7, "values": '{"nan": "loss"}'},
        {"step": 5, "time": now, "loss": 2.6, "values": '{"mfu": {"deep": 1}}'},
    ]
    if postgres:
        bad_rows += [
            {"step": 6, "time": "infinity", "loss": 2.5, "values": None},
            {"step": 7, "time": "57000-01-01 00:00:00+00", "loss": 2.4, "values": None},
            {"step": 8, "time": "4000-01-01 00:00:00 BC", "loss": 2.3, "values": None},
        ]
    else:
        bad_rows += [{"step": 6, "time": "not a time", "loss": 2.5, "values": None}]
    good = {"step": 100, "time": now, "loss": 2.0, "values": '{"mfu": 0.5}'}
    _insert_metric_rows(migrated_url, run["id"], [*bad_rows, good])
    _insert_metric_rows(migrated_url, other["id"], [{"step": 1, "time": now, "loss": 1.5, "values": None}])

    series = admin.get(f"/api/v1/runs/{run['id']}/metrics")
    assert series.status_code == 200, series.text[:500]
    steps = {p["step"] for p in series.json()["points"]}
    assert 100 in steps
    assert series.json()["skipped"] >= (3 if postgres else 1)
    for p in series.json()["points"]:
        assert p["values"] is None or isinstance(p["values"], dict)
    downsampled = admin.get(f"/api/v1/runs/{run['id']}/metrics", params={"max_points": 2})
    assert downsampled.status_code == 200, downsampled.text[:500]

    scrape = admin.get("/metrics")
    assert scrape.status_code == 200
    assert "trainops_control_plane_database_up 1.0" in scrape.text
    assert 'run="healthy"' in scrape.text and 'run="bad-rows"' in scrape.text


# ---- defect 9: names derived from user input stay within their columns (PostgreSQL enforces them) ---------


@pytest.mark.postgres
def test_long_names_fit_their_columns_on_postgres(postgres_url: str, tmp_path: Any) -> None:
    from service import migrate

    migrate.upgrade(postgres_url)
    settings = Settings(database_url=postgres_url, home=tmp_path / "home")
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        client.headers.update(ADMIN_HEADERS)
        long_name = "r" * 195
        run = make_run(client, name=long_name)
        factory = make_session_factory(make_engine(postgres_url))
        # the orchestrator names each attempt's trainer token "<run name>-attempt-N"
        names = set()
        for number in (1, 2, 12345):
            with transaction(factory) as session:
                token, _ = tokens_crud.create_token(
                    session, name=f"{long_name}-attempt-{number}", role=Role.trainer, run_id=run["id"]
                )
                assert len(token.name) <= 200
                names.add(token.name)
        assert len(names) == 3, "derived names must stay distinct"

        operator = make_token(client, "operator", name="o" * 200)
        r = client.post("/api/v1/logbook", json={"message": "hello"}, headers=operator)
        assert r.status_code == 201, r.text
        assert len(r.json()["author"]) <= 200 and r.json()["author"].startswith("user:ooo")
        r = client.post(f"/api/v1/runs/{run['id']}/start", headers=operator)
        assert r.status_code == 200, r.text
        trainer = make_token(client, "trainer", run_id=run["id"], name="t" * 200)
        r = client.post(
            f"/api/v1/runs/{run['id']}/checkpoints",
            json={"step": 10, "path": checkpoint_path(client, run, 10), "state": "committed"},
            headers=trainer,
        )
        assert r.status_code == 201, r.text


def test_derived_names_are_stable_and_bounded() -> None:
    fit_name = tokens_crud.fit_name

    assert fit_name("short", 200) == "short"
    long = "x" * 300
    assert fit_name(long, 200) == fit_name(long, 200) and len(fit_name(long, 200)) == 200
    assert fit_name(long + "a", 200) != fit_name(long + "b", 200)


# ---- defect 10: 5xx on bad input ---------------------------------------------------------------------------


def test_non_finite_floats_in_validated_fields_are_422(admin: TestClient) -> None:
    run = make_run(admin)
    url = f"/api/v1/runs/{run['id']}/restart"
    for body in (
        '{"reason": "r", "lr": NaN}',
        '{"reason": "r", "lr": Infinity}',
        '{"reason": "r", "lr_scale": NaN}',
        '{"reason": "r", "lr_scale": -Infinity}',
        '{"reason": "r", "clip": NaN}',
    ):
        r = _post_raw(admin, url, body)
        assert r.status_code == 422, (body, r.status_code, r.text[:300])
        assert r.json()["detail"]


def test_lone_surrogates_are_422(admin: TestClient) -> None:
    run = make_run(admin)
    cases = [
        ("/api/v1/runs", '{"name": "s1", "owner": "al\\ud800ice", "config": {"target_steps": 5}}', "owner"),
        ("/api/v1/logbook", '{"message": "note \\udc00"}', "message"),
        (
            f"/api/v1/runs/{run['id']}/checkpoints",
            '{"step": 1, "path": "/ckpt/\\ud83d", "state": "committed"}',
            "path",
        ),
        (
            f"/api/v1/runs/{run['id']}/checkpoints",
            '{"step": 1, "path": "/ckpt/1", "metadata": {"k\\udfff": 1}}',
            "metadata",
        ),
    ]
    for path, body, field in cases:
        r = _post_raw(admin, path, body)
        assert r.status_code == 422, (path, body, r.status_code, r.text[:300])
        assert field in r.text
    assert admin.get("/api/v1/runs").json()["total"] == 1


def test_out_of_range_numbers_are_422(admin: TestClient) -> None:
    run = make_run(admin)
    r = admin.post(f"/api/v1/runs/{run['id']}/restart", json={"reason": "r", "from_checkpoint_id": 2**63})
    assert r.status_code == 422, r.text
    assert "from_checkpoint_id" in r.text


def test_goodput_of_a_run_without_attempts(admin: TestClient) -> None:
    run = make_run(admin)
    r = admin.get(f"/api/v1/runs/{run['id']}/goodput")
    assert r.status_code == 200, r.text
    assert r.json()["attempts"] == 0 and r.json()["goodput"] is None


def test_concurrent_ingest_into_one_attempt_counts_duplicates_right(admin: TestClient) -> None:
    run = make_run(admin)
    url = f"/api/v1/runs/{run['id']}/metrics"
    replies: list[Any] = []
    lock = threading.Lock()

    def report(offset: int) -> None:
        for batch in range(5):
            start = offset * 7 + batch * 20
            points = [{"step": s, "loss": 1.0} for s in range(start, start + 40)]
            r = admin.post(url, json={"attempt": 1, "points": points})
            with lock:
                replies.append(r)

    threads = [threading.Thread(target=report, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r.status_code == 200 for r in replies), [r.text for r in replies if r.status_code != 200]
    assert all(r.json()["duplicates"] >= 0 and r.json()["accepted"] >= 0 for r in replies)
    stored = admin.get(url, params={"max_points": 10_000}).json()["total"]
    assert sum(r.json()["accepted"] for r in replies) == stored
    assert sum(r.json()["accepted"] + r.json()["duplicates"] for r in replies) == 6 * 5 * 40


def test_a_422_echoing_unencodable_input_is_still_json(admin: TestClient) -> None:
    r = _post_raw(admin, "/api/v1/runs", '{"name": "x", "owner": 1.5, "config": {"target_steps": NaN}}')
    assert r.status_code == 422, r.text
    assert json.loads(r.text)["detail"]


@dataclass
class _RunningLauncher:
    """A launcher whose attempts start and keep running, with no processes: only naming is under test."""

    kind: str = "fake"

    def prepare(self, spec: Any) -> dict[str, Any]:
        return {"kind": self.kind, "world_size": len(spec.hosts)}

    def start(self, spec: Any, info: Mapping[str, Any]) -> dict[str, Any]:
        return {}

    def status(self, info: Mapping[str, Any]) -> Any:
        from service.orchestrator.launchers.base import ProcessStatus

        return ProcessStatus("running")

    def kill(self, info: Mapping[str, Any], *, grace_s: float = 5.0) -> None:
        return None


@pytest.mark.postgres
def test_a_run_with_a_200_character_name_starts_on_postgres(postgres_url: str, tmp_path: Any) -> None:
    """The orchestrator names each attempt's trainer token "<run name>-attempt-N" (over 200 characters
    here); the attempt must still be launched, with its token stored."""
    from service import migrate
    from service.crud.nodes import register_node
    from service.crud.runs import active_attempt, create_run
    from service.fleet.gateway import SweepHealthGateway
    from service.models import ApiToken
    from service.orchestrator.loop import Orchestrator
    from service.recovery.config import OrchestratorConfig

    migrate.upgrade(postgres_url)
    engine = make_engine(postgres_url)
    factory = make_session_factory(engine)
    try:
        with transaction(factory) as session:
            register_node(session, hostname="h1", author="test")
            run_id = create_run(
                session,
                name="n" * 200,
                owner="test",
                config={"preset": "tiny", "target_steps": 100, "host_count": 1, "launcher": "fake"},
                start=True,
                author="test",
            ).id
        orchestrator = Orchestrator(
            factory,
            OrchestratorConfig(loop_interval_s=0.01, runs_dir=str(tmp_path)),
            launchers={"fake": _RunningLauncher()},
            health=SweepHealthGateway(factory),
            pager=lambda run, reason, evidence: None,
        )
        orchestrator.reconcile_once()
        with transaction(factory) as session:
            assert active_attempt(session, run_id=run_id) is not None
            names = list(session.scalars(sa.select(ApiToken.name).where(ApiToken.run_id == run_id)))
        assert names and all(len(name) <= 200 for name in names)
    finally:
        engine.dispose()
