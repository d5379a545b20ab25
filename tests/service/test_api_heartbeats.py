"""Issue 13, point 2: the heartbeats table is the orchestrator's one source for hangs and stragglers. A batch
of beats is upserted latest-per-rank in one statement (on SQLite and PostgreSQL), every field is bounded,
and a rank's last beat is still there after the control plane restarts."""

from __future__ import annotations

import json
import math
import time
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.config import Settings
from service.crud.telemetry import attempt_heartbeats
from service.db import make_engine, make_session_factory, transaction
from service.main import create_app
from service.schemas import HEARTBEAT_BATCH_LIMIT_BYTES, HeartbeatBatch
from tests.conftest import ADMIN_HEADERS, make_run, make_token


def rank_beat(rank: int, at: float, **fields: Any) -> dict[str, Any]:
    return {
        "rank": rank,
        "host": f"h{rank // 8 + 1}",
        "pid": 4000 + rank,
        "step": 41,
        "time": at,
        "section": "step",
        "step_time_s": 0.31,
        "last_step_s": 0.34,
        "busy_s": [[40, 0.30], [41, 0.33]],
        **fields,
    }


def stored(client: TestClient, run_id: int, attempt: int = 1) -> dict[int, dict[str, Any]]:
    page = client.get(f"/api/v1/runs/{run_id}/heartbeats", params={"attempt": attempt, "limit": 500}).json()
    return {b["rank"]: b for b in page["items"]}


def test_a_batch_keeps_the_latest_beat_per_rank_and_a_late_beat_changes_nothing(
    admin: TestClient, settings: Settings
) -> None:
    run = make_run(admin)
    trainer = make_token(admin, "trainer", run_id=run["id"])
    url = f"/api/v1/runs/{run['id']}/heartbeats"
    now = time.time()
    first = {"attempt": 1, "beats": [rank_beat(r, now - 10) for r in range(3)]}
    assert admin.post(url, json=first, headers=trainer).status_code == 204
    later = {
        "attempt": 1,
        "beats": [
            rank_beat(0, now, step=42, section="checkpoint_save", busy_s=[[s, 0.3] for s in range(27, 43)]),
            rank_beat(1, now, step=42, step_time_s=None, last_step_s=None, busy_s=[]),
            rank_beat(2, now - 20, step=40),  # sent before the stored one, arrived after: a late arrival
        ],
    }
    assert admin.post(url, json=later, headers=trainer).status_code == 204
    # the single form, without `time`: stamped with the server's clock
    single = {"attempt": 1, "rank": 3, "host": "h1", "step": 42}
    assert admin.post(url, json=single, headers=trainer).status_code == 204

    beats = stored(admin, run["id"])
    assert sorted(beats) == [0, 1, 2, 3]
    assert (beats[0]["step"], beats[0]["section"], len(beats[0]["busy_s"])) == (42, "checkpoint_save", 16)
    assert beats[0]["busy_s"][-1] == [42, 0.3] and beats[0]["pid"] == 4000
    assert (beats[1]["step"], beats[1]["step_time_s"], beats[1]["busy_s"]) == (42, None, None)
    assert beats[2]["step"] == 41  # the late beat did not replace the newer one
    assert beats[3]["section"] == "step" and beats[3]["pid"] is None
    assert all(b["received_at"] is not None for b in beats.values())

    # what the orchestrator reads: one query, the rank's own time and the control plane's arrival time
    engine = make_engine(settings.resolved_database_url)
    try:
        with transaction(make_session_factory(engine)) as session:
            read = {b.rank: b for b in attempt_heartbeats(session, run_id=run["id"], attempt=1)}
    finally:
        engine.dispose()
    assert read[0].time == pytest.approx(now, abs=1e-3) and read[0].section == "checkpoint_save"
    assert read[2].time == pytest.approx(now - 10, abs=1e-3)
    assert read[0].busy_s[-1] == (42, 0.3) and read[1].busy_s == ()
    assert read[3].received_at is not None and read[3].time == pytest.approx(read[3].received_at, abs=1e-3)


# (what is wrong, the body's beats or the body itself, where the 422 points)
BAD_BEATS: list[tuple[str, Any, str]] = [
    ("17 busy pairs", [rank_beat(0, 0, busy_s=[[s, 0.1] for s in range(17)])], "busy_s"),
    ("a NaN step time", [rank_beat(0, 0, step_time_s=math.nan)], "step_time_s"),
    ("a negative busy time", [rank_beat(0, 0, busy_s=[[1, -0.5]])], "busy_s"),
    ("an unknown section", [rank_beat(0, 0, section="lunch")], "section"),
    ("a time in milliseconds", [rank_beat(0, 0, time=time.time() * 1000)], "time"),
    ("a time before 2016", [rank_beat(0, 0, time=1.0)], "time"),
    ("an unknown field", [rank_beat(0, 0, gpu_temp=80)], "gpu_temp"),
    ("a rank past the bound", [rank_beat(1_000_001, 0)], "rank"),
    ("the same rank twice", [rank_beat(0, 0), rank_beat(0, 0)], "more than one beat"),
    ("no beats", [], "beats"),
    ("1,025 beats", [rank_beat(r, 0) for r in range(1025)], "beats"),
]


@pytest.mark.parametrize(("story", "beats", "where"), BAD_BEATS, ids=[b[0] for b in BAD_BEATS])
def test_a_bad_beat_refuses_the_batch_whole_naming_the_field(
    sqlite_client: TestClient, story: str, beats: list[dict[str, Any]], where: str
) -> None:
    now = time.time()
    beats = [{**b, "time": now} if b.get("time") == 0 else b for b in beats]
    run_id = sqlite_client.app.state.heartbeat_run_id  # type: ignore[attr-defined]
    with_a_valid_beat = [rank_beat(5, now), *beats] if beats else []
    r = sqlite_client.post(
        f"/api/v1/runs/{run_id}/heartbeats",
        content=json.dumps({"attempt": 1, "beats": with_a_valid_beat}),
        headers={"Content-Type": "application/json"},
    )
    assert r.status_code == 422, (story, r.text[:300])
    assert where in r.text
    assert stored(sqlite_client, run_id) == {}  # the valid beat beside it was not stored either


@pytest.fixture(scope="module")
def sqlite_client(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One SQLite control plane for the validation table (each case stores nothing)."""
    from service import migrate

    home = tmp_path_factory.mktemp("heartbeats")
    url = f"sqlite:///{home / 'trainops.db'}"
    migrate.upgrade(url)
    with TestClient(create_app(Settings(database_url=url, home=home)), raise_server_exceptions=False) as c:
        c.headers.update(ADMIN_HEADERS)
        c.app.state.heartbeat_run_id = make_run(c)["id"]  # type: ignore[attr-defined]
        yield c


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # the backend with the tighter parameter limit
def test_the_heartbeat_cap_fits_the_largest_batch_the_schema_admits(admin: TestClient) -> None:
    run = make_run(admin)
    widest = -1.2345678901234567e-300
    now = time.time()
    beats = [
        {
            "rank": 1_000_000 - i,
            "step": 2**62,
            "time": now,
            "section": "checkpoint_save",
            "host": "h" * 255,
            "pid": 2**31 - 1,
            "step_time_s": abs(widest),
            "last_step_s": abs(widest),
            "busy_s": [[2**62, abs(widest)]] * 16,
        }
        for i in range(1024)
    ]
    body = json.dumps({"attempt": 2**31 - 1, "beats": beats}, separators=(",", ":")).encode()
    assert len(body) <= HEARTBEAT_BATCH_LIMIT_BYTES
    HeartbeatBatch.model_validate_json(body)
    r = admin.post(
        f"/api/v1/runs/{run['id']}/heartbeats", content=body, headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 204, r.text[:300]
    assert admin.get(f"/api/v1/runs/{run['id']}/heartbeats").json()["total"] == 1024
    with open("docs/reporting-contract.md", encoding="utf-8") as doc:
        assert f"{HEARTBEAT_BATCH_LIMIT_BYTES:,} bytes" in doc.read()


@pytest.mark.postgres
@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)  # the production backend
def test_a_ranks_last_beat_is_readable_after_the_control_plane_restarts(settings: Settings) -> None:
    now = time.time()
    with TestClient(create_app(settings)) as before:
        before.headers.update(ADMIN_HEADERS)
        run = make_run(before)
        beats = [rank_beat(0, now - 30, section="validation"), rank_beat(1, now - 2)]
        r = before.post(f"/api/v1/runs/{run['id']}/heartbeats", json={"attempt": 2, "beats": beats})
        assert r.status_code == 204
        seen_before = stored(before, run["id"], attempt=2)
    # a new control plane process on the same database: nothing lives in memory
    with TestClient(create_app(settings)) as after:
        after.headers.update(ADMIN_HEADERS)
        seen_after = stored(after, run["id"], attempt=2)
    assert seen_after == seen_before
    assert seen_after[0]["section"] == "validation" and seen_after[1]["busy_s"] == [[40, 0.3], [41, 0.33]]
