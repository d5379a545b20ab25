"""The decisions API: operators answer the orchestrator's proposals once; everyone else reads them."""

from __future__ import annotations

import datetime as dt
import re
import threading

import httpx
from fastapi.testclient import TestClient

from service.config import Settings
from service.crud.decisions import propose_decision
from service.db import make_engine, make_session_factory, transaction
from service.models import Decision, utcnow
from tests.conftest import ADMIN_HEADERS, make_run, make_token
from tests.livesrv import LiveServer


def propose(settings: Settings, run_id: int) -> int:
    factory = make_session_factory(make_engine(settings.resolved_database_url))
    with transaction(factory) as session:
        return propose_decision(
            session,
            run_id=run_id,
            gates=["lr_cut"],
            reason="restart after divergence: LR scale 1 -> 0.5",
            proposal={"checkpoint_id": None, "checkpoint_step": 40, "overrides": {"lr_scale": 0.5}},
            evidence={"failure": "divergence"},
            timeout_s=600,
            on_timeout="hold",
            author="system:orchestrator",
        ).id


def test_viewers_read_operators_answer_once_and_bad_answers_are_refused(
    admin: TestClient, settings: Settings
) -> None:
    run = make_run(admin, "opt-gated", approvals={"require": ["lr_cut"]})
    assert run["config"]["approvals"]["on_timeout"] == "hold"
    decision_id = propose(settings, run["id"])
    viewer = make_token(admin, "viewer")
    listed = admin.get("/api/v1/decisions", params={"status": "pending"}, headers=viewer).json()
    assert listed["total"] == 1 and listed["items"][0]["gates"] == ["lr_cut"]
    assert admin.post(f"/api/v1/decisions/{decision_id}/approve", json={}, headers=viewer).status_code == 403
    r = admin.post(f"/api/v1/decisions/{decision_id}/reject", json={})
    assert r.status_code == 422 and "reason" in r.text  # a rejection says why
    r = admin.post(f"/api/v1/decisions/{decision_id}/approve", json={"overrides": {"lr_scale": -1}})
    assert r.status_code == 422
    assert admin.post("/api/v1/decisions/999/approve", json={}).status_code == 404
    assert admin.get("/api/v1/decisions", params={"status": "maybe"}).status_code == 422

    with transaction(make_session_factory(make_engine(settings.resolved_database_url))) as session:
        # proposed five minutes ago, still unanswered
        session.get(Decision, decision_id).created_at = utcnow() - dt.timedelta(seconds=300)  # type: ignore[union-attr]
    scrape = admin.get("/metrics").text
    assert "trainops_decisions_pending 1.0" in scrape
    assert 'trainops_run_decisions_pending{run="opt-gated"} 1.0' in scrape  # what the page names
    (age,) = re.findall(r"^trainops_decision_oldest_pending_age_seconds (\S+)$", scrape, re.MULTILINE)
    assert 300 <= float(age) < 3600  # seconds, since the proposal

    operator = make_token(admin, "operator", name="oncall")
    body = {"reason": "too aggressive", "overrides": {"lr_scale": 0.8, "clip": 0.3}}
    answered = admin.post(f"/api/v1/decisions/{decision_id}/reject", json=body, headers=operator).json()
    assert answered["status"] == "rejected" and answered["decided_by"] == "user:oncall"
    assert answered["operator_overrides"] == {"lr_scale": 0.8, "clip": 0.3}
    late = admin.post(f"/api/v1/decisions/{decision_id}/approve", json={})
    assert late.status_code == 409 and "already rejected by user:oncall" in late.json()["detail"]
    log = admin.get("/api/v1/logbook", params={"run_id": run["id"]}).json()["items"]
    assert any("rejected by user:oncall: too aggressive" in e["message"] for e in log)


def test_ten_operators_answer_at_once_one_wins(tmp_path: object) -> None:
    srv = LiveServer(tmp_path).start()  # type: ignore[arg-type]
    try:
        api = f"{srv.url}/api/v1"
        run = httpx.post(
            f"{api}/runs",
            json={"name": "opt-race", "owner": "a", "config": {"target_steps": 10}},
            headers=ADMIN_HEADERS,
        ).json()
        decision_id = propose(Settings(home=srv.home), run["id"])
        barrier = threading.Barrier(10)
        codes: list[int] = []

        def answer(i: int) -> None:
            barrier.wait()
            verb = "approve" if i % 2 else "reject"
            body = {"reason": f"engineer {i}"}
            codes.append(
                httpx.post(
                    f"{api}/decisions/{decision_id}/{verb}", json=body, headers=ADMIN_HEADERS, timeout=60
                ).status_code
            )

        threads = [threading.Thread(target=answer, args=(i,)) for i in range(10)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(codes) == [200] + [409] * 9
    finally:
        srv.stop()


def test_a_timeout_shorter_than_the_page_takes_is_refused(admin: TestClient) -> None:
    # with on_timeout: approve, 30 s would carry out the LR cut before Alertmanager's page reached anyone
    cfg = {"target_steps": 10, "approvals": {"require": ["lr_cut"], "timeout_s": 30, "on_timeout": "approve"}}
    r = admin.post("/api/v1/runs", json={"name": "opt-hasty", "owner": "a", "config": cfg})
    assert r.status_code == 422
    assert "approvals" in r.text and "timeout_s" in r.text and "at least 120 s" in r.text
    assert make_run(admin, "opt-patient", approvals={"require": ["lr_cut"], "timeout_s": 120})["id"]
