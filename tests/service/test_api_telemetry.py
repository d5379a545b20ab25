"""Trainer ranks report metrics and heartbeats; a re-sent batch adds nothing; long runs are downsampled."""

from __future__ import annotations

import math

import sqlalchemy as sa
from fastapi.testclient import TestClient

from service.db import make_engine
from tests.conftest import make_run, make_token


def _points(start: int, n: int) -> list[dict]:
    return [
        {
            "step": s,
            "loss": 10.0 - s * 0.01,
            "loss_scale": 65536.0,
            "act_norm": 40.0 + s,
            "actv_norm": 39.0 + s,
            "lr": 6e-4,
            "clip": 1.0,
            "tokens": s * 4096,
            "values": {"mfu": 0.4},
        }
        for s in range(start, start + n)
    ]


def test_ingestion_is_idempotent(admin: TestClient) -> None:
    run = make_run(admin)
    trainer = make_token(admin, "trainer", run_id=run["id"])
    url = f"/api/v1/runs/{run['id']}/metrics"
    r = admin.post(url, json={"attempt": 1, "points": _points(0, 50)}, headers=trainer)
    assert r.status_code == 200 and r.json() == {"accepted": 50, "duplicates": 0}
    # the reporter's retry after a lost reply re-sends an overlapping batch
    r = admin.post(url, json={"attempt": 1, "points": _points(40, 20)}, headers=trainer)
    assert r.json() == {"accepted": 10, "duplicates": 10}
    series = admin.get(url, params={"max_points": 1000}).json()
    assert series["total"] == 60 and series["bucket_steps"] == 1
    assert [p["step"] for p in series["points"]] == list(range(60))
    assert series["points"][5]["values"] == {"mfu": 0.4}
    assert (series["points"][5]["act_norm"], series["points"][5]["actv_norm"]) == (45.0, 44.0)


def test_recomputed_steps_of_a_new_attempt_are_kept_apart(admin: TestClient) -> None:
    run = make_run(admin)
    url = f"/api/v1/runs/{run['id']}/metrics"
    admin.post(url, json={"attempt": 1, "points": _points(0, 20)})
    r = admin.post(url, json={"attempt": 2, "points": _points(10, 20)})
    assert r.json() == {"accepted": 20, "duplicates": 0}
    assert admin.get(url, params={"attempt": 2}).json()["total"] == 20
    assert admin.get(url, params={"start_step": 10, "end_step": 19}).json()["total"] == 20


def test_non_finite_loss_is_stored_and_returned(admin: TestClient) -> None:
    run = make_run(admin)
    url = f"/api/v1/runs/{run['id']}/metrics"
    body = '{"attempt": 1, "points": [{"step": 1, "loss": NaN, "grad_norm": Infinity, "loss_scale": 0.5}]}'
    r = admin.post(url, content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 200, r.text
    point = admin.get(url).json()["points"][0]
    assert point["loss"] == "NaN" and point["grad_norm"] == "Infinity" and point["loss_scale"] == 0.5


def test_long_ranges_are_downsampled_into_step_buckets(admin: TestClient) -> None:
    run = make_run(admin)
    url = f"/api/v1/runs/{run['id']}/metrics"
    admin.post(url, json={"attempt": 1, "points": _points(0, 1000)})
    series = admin.get(url, params={"max_points": 100}).json()
    assert series["total"] == 1000
    assert series["bucket_steps"] == 10
    assert len(series["points"]) == 100
    first = series["points"][0]
    assert first["step"] == 0
    assert math.isclose(first["act_norm"], sum(40.0 + s for s in range(10)) / 10)
    assert math.isclose(first["actv_norm"], sum(39.0 + s for s in range(10)) / 10)
    ranged = admin.get(url, params={"start_step": 500, "end_step": 599, "max_points": 50}).json()
    assert ranged["total"] == 100 and ranged["bucket_steps"] == 2 and ranged["points"][0]["step"] == 500


def test_heartbeats_keep_the_latest_per_rank(admin: TestClient) -> None:
    run = make_run(admin)
    trainer = make_token(admin, "trainer", run_id=run["id"])
    url = f"/api/v1/runs/{run['id']}/heartbeats"
    for step in (1, 2, 3):
        for rank in (0, 1):
            r = admin.post(
                url, json={"attempt": 1, "rank": rank, "host": f"h{rank}", "step": step}, headers=trainer
            )
            assert r.status_code == 204
    beats = admin.get(url).json()
    assert [(b["rank"], b["step"], b["host"]) for b in beats["items"]] == [(0, 3, "h0"), (1, 3, "h1")]
    assert beats["total"] == 2


def test_heartbeats_are_listed_a_page_at_a_time(admin: TestClient) -> None:
    """One heartbeat per rank: a 4,096-rank run's list is paged, not sent whole."""
    run = make_run(admin)
    url = f"/api/v1/runs/{run['id']}/heartbeats"
    for attempt in (1, 2):
        for rank in range(4):
            body = {"attempt": attempt, "rank": rank, "host": f"h{rank}", "step": 1}
            assert admin.post(url, json=body).status_code == 204
    page = admin.get(url, params={"limit": 3, "offset": 3}).json()
    assert [(b["attempt"], b["rank"]) for b in page["items"]] == [(1, 3), (2, 0), (2, 1)]
    assert (page["total"], page["limit"], page["offset"]) == (8, 3, 3)
    only_second = admin.get(url, params={"attempt": 2, "limit": 2}).json()
    assert [b["rank"] for b in only_second["items"]] == [0, 1] and only_second["total"] == 4
    assert admin.get(url, params={"limit": 501}).status_code == 422


def test_a_batch_with_a_bad_point_is_refused_whole(admin: TestClient) -> None:
    run = make_run(admin)
    url = f"/api/v1/runs/{run['id']}/metrics"
    pts = [*_points(0, 5), {"step": -1}]
    r = admin.post(url, json={"attempt": 1, "points": pts})
    assert r.status_code == 422
    assert admin.get(url).json()["total"] == 0
    too_many = {"attempt": 1, "points": [{"step": i} for i in range(10_001)]}
    assert admin.post(url, json=too_many).status_code == 422


def test_a_batch_for_a_run_that_does_not_exist_is_refused_and_stores_nothing(
    admin: TestClient, migrated_url: str
) -> None:
    # `metrics` has no foreign key (migration 0003): the route's run check is what keeps orphans out.
    make_run(admin)
    r = admin.post("/api/v1/runs/987654/metrics", json={"attempt": 1, "points": _points(0, 5)})
    assert r.status_code == 404 and r.json()["detail"] == "run 987654 does not exist"
    engine = make_engine(migrated_url)
    try:
        with engine.connect() as conn:
            assert conn.scalar(sa.text("SELECT count(*) FROM metrics")) == 0
    finally:
        engine.dispose()
