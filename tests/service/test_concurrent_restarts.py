"""Two on-call engineers (or one impatient one) ask for a restart at the same moment: one request wins, the
others are told so (409), and none is acknowledged and then lost."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy.exc import OperationalError

from service import migrate
from service.crud.logbook import list_logbook
from service.crud.runs import consume_restart_request, create_run, get_run, request_restart, stop_run
from service.crud.telemetry import attempt_heartbeats, record_heartbeats
from service.db import make_engine, make_session_factory, transaction
from tests.conftest import ADMIN_HEADERS
from tests.livesrv import LiveServer


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LiveServer]:
    url = None
    if request.param == "postgres":
        url = request.getfixturevalue("postgres_url")
        migrate.upgrade(url)
    srv = LiveServer(tmp_path, database_url=url).start()
    try:
        yield srv
    finally:
        srv.stop()


def test_ten_concurrent_restarts_one_accepted_nine_conflict(server: LiveServer) -> None:
    api = f"{server.url}/api/v1"
    run = httpx.post(
        f"{api}/runs",
        json={"name": "opt-race", "owner": "alice", "config": {"target_steps": 10}},
        headers=ADMIN_HEADERS,
    ).json()
    barrier = threading.Barrier(10)
    answers: list[httpx.Response] = []

    def ask(i: int) -> None:
        barrier.wait()
        answers.append(
            httpx.post(
                f"{api}/runs/{run['id']}/restart",
                json={"reason": f"engineer {i}", "lr_scale": 0.5 + i / 100},
                headers=ADMIN_HEADERS,
                timeout=60,
            )
        )

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    codes = sorted(r.status_code for r in answers)
    assert codes == [200] + [409] * 9, [r.text for r in answers]
    (won,) = [r.json() for r in answers if r.status_code == 200]
    assert all("is still pending" in r.json()["detail"] for r in answers if r.status_code == 409)
    stored = httpx.get(f"{api}/runs/{run['id']}", headers=ADMIN_HEADERS).json()
    # what is stored is exactly the accepted request, overrides included
    assert stored["pending_restart"] == won["pending_restart"] and stored["pending_restart"]["id"]
    assert stored["lr_scale"] == won["lr_scale"]
    log = httpx.get(f"{api}/logbook", params={"run_id": run["id"]}, headers=ADMIN_HEADERS).json()
    assert sum("restart of run opt-race requested" in e["message"] for e in log["items"]) == 1


def test_the_orchestrator_consumes_only_the_request_it_acted_on(migrated_url: str) -> None:
    # The orchestrator observed request 1 and is launching for it; meanwhile an operator stopped the run
    # (which drops request 1) and asked for a new restart. Launching for request 1 must not clear request 2.
    factory = make_session_factory(make_engine(migrated_url))
    with transaction(factory) as session:
        run_id = create_run(session, name="opt-cas", owner="a", config={}, start=False, author="user:a").id
        first = dict(request_restart(session, run_id=run_id, author="user:a", reason="one").pending_restart)
    with transaction(factory) as session:
        stop_run(session, run_id=run_id, reason="hold on", author="user:b")
        second = dict(request_restart(session, run_id=run_id, author="user:b", reason="two").pending_restart)
    assert first["id"] != second["id"]

    with transaction(factory) as session:
        run = get_run(session, run_id=run_id, for_update=True)
        assert not consume_restart_request(session, run=run, request=first, author="system:orchestrator")
    with transaction(factory) as session:
        run = get_run(session, run_id=run_id)
        assert run.pending_restart == second
        entries, _ = list_logbook(session, run_id=run_id)
        assert any("a newer restart request arrived" in e.message for e in entries)

    with transaction(factory) as session:
        run = get_run(session, run_id=run_id, for_update=True)
        assert consume_restart_request(session, run=run, request=second, author="system:orchestrator")
    with transaction(factory) as session:
        assert get_run(session, run_id=run_id).pending_restart is None


@pytest.mark.postgres
def test_a_heartbeat_batch_being_written_does_not_hold_up_the_orchestrator_changing_the_run(
    postgres_url: str,
) -> None:
    # At 1,024 hosts some metric or heartbeat batch is always being written, each holding its run's row
    # FOR KEY SHARE until it commits; the orchestrator's read-modify-write of the run (a phase change, a
    # restart request consumed) must not queue behind them.
    migrate.upgrade(postgres_url)
    factory = make_session_factory(make_engine(postgres_url))
    with transaction(factory) as session:
        run_id = create_run(session, name="opt-busy", owner="a", config={}, start=True, author="user:a").id
    ingest = factory()
    try:
        record_heartbeats(ingest, run_id=run_id, attempt=1, beats=[{"rank": 0, "step": 5}])  # lock held
        with transaction(factory) as session:
            session.execute(sa.text("SET LOCAL lock_timeout = '2s'"))
            run = get_run(session, run_id=run_id, for_update=True)
            run.lr_scale = 0.5
        ingest.commit()
    finally:
        ingest.close()
    with transaction(factory) as session:
        assert get_run(session, run_id=run_id).lr_scale == 0.5
        assert [b.step for b in attempt_heartbeats(session, run_id=run_id, attempt=1)] == [5]
        # two read-modify-writes of the run still exclude each other
        get_run(session, run_id=run_id, for_update=True)
        with transaction(factory) as other:
            other.execute(sa.text("SET LOCAL lock_timeout = '200ms'"))
            with pytest.raises(OperationalError, match="lock timeout"):
                get_run(other, run_id=run_id, for_update=True)
