"""Issue 13, point 3: one leader among orchestrators on one database, fenced; SQLite allows one orchestrator.

PostgreSQL tests use a database of their own and a scratch table (no schema needed: the leader lock and the
fence live in pg_locks). Each `PostgresLeadership` is given its own identity, as separate processes have.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from pydantic import ValidationError
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner

from service import migrate
from service.cli import app
from service.crud.orchestrators import FENCE_LOCK, LEADER_SESSION_SQL, LOCK_NAMESPACE, orchestrator_sessions
from service.db import make_engine, make_session_factory, transaction
from service.fleet.gateway import SweepHealthGateway
from service.models import Attempt, Run
from service.orchestrator.launchers.base import LaunchSpec
from service.orchestrator.leadership import (
    Holder,
    LeadershipChange,
    LeadershipLost,
    LeadershipRefused,
    PostgresLeadership,
    SqliteLeadership,
    fenced,
    fenced_sessions,
)
from service.orchestrator.loop import Orchestrator
from service.recovery.config import OrchestratorConfig, RemediationConfig
from service.statemachine import RunPhase
from tests.orchestrator.test_interrupted_launch import two_hosts_and_a_run
from tests.orchestrator.test_pass_scaling import wait_until
from tests.orchestrator.test_trainer_token_expiry import ScriptedLauncher

WRITES = sa.Table("fenced_writes", sa.MetaData(), sa.Column("what", sa.String(40)))


@pytest.fixture
def pg(postgres_url: str) -> Iterator[tuple[Engine, sessionmaker[Session]]]:
    engine = make_engine(postgres_url, pool_size=4)
    WRITES.metadata.create_all(engine)
    try:
        yield engine, make_session_factory(engine)
    finally:
        engine.dispose()


@pytest.fixture
def rivals(
    pg: tuple[Engine, sessionmaker[Session]],
) -> Iterator[tuple[PostgresLeadership, PostgresLeadership]]:
    """Two orchestrators' leaderships on one database, as two processes on two hosts would hold them."""
    engine, _ = pg
    first = PostgresLeadership(engine, lease_s=2, holder=Holder("host-a", 101))
    second = PostgresLeadership(engine, lease_s=2, holder=Holder("host-b", 202))
    try:
        yield first, second
    finally:
        first.release()
        second.release()


def leader_session_pid(engine: Engine) -> int:
    """The backend pid of the session holding this database's leader lock."""
    with engine.connect() as conn:
        return int(conn.execute(sa.text(LEADER_SESSION_SQL)).one().pid)


def written(factory: sessionmaker[Session]) -> list[str]:
    with transaction(factory) as session:
        return list(session.scalars(sa.select(WRITES.c.what)))


def kill_leader_session(engine: Engine) -> None:
    """Drop the leader's lock session, as a dead host's connection is dropped. With a timeout,
    pg_terminate_backend returns once the backend is gone (its lock freed); without one it only signals it,
    and a fence checked in between still saw the lock held (CI saw that once)."""
    with engine.connect() as conn:
        conn.execute(sa.text("SELECT pg_terminate_backend(:pid, 10000)"), {"pid": leader_session_pid(engine)})


@pytest.mark.postgres
def test_one_leads_the_other_stands_by_and_only_the_leaders_writes_commit(
    pg: tuple[Engine, sessionmaker[Session]], rivals: tuple[PostgresLeadership, PostgresLeadership]
) -> None:
    engine, factory = pg
    first, second = rivals
    taken = first.poll()
    assert taken is not None and taken.acquired and first.is_leader
    assert second.poll() is None and not second.is_leader
    assert second.current_holder() == Holder("host-a", 101)
    with transaction(factory) as session:
        assert orchestrator_sessions(session) == (1, 1)

    with transaction(fenced_sessions(factory, first)) as session:
        session.execute(sa.insert(WRITES).values(what="leader, core insert"))
    with (
        pytest.raises(LeadershipLost, match="not the leader"),
        transaction(fenced_sessions(factory, second)) as session,
    ):
        session.execute(sa.text("INSERT INTO fenced_writes VALUES ('standby, text insert')"))
    with transaction(fenced_sessions(factory, second)) as session:  # reading needs no lead
        assert session.execute(sa.text("SELECT count(*) FROM fenced_writes")).scalar_one() == 1
    assert written(factory) == ["leader, core insert"]

    # The leader's lock session dies (its connection dropped): PostgreSQL frees the lock, the leader's
    # next write fails its fence although this process still believes it leads ... (pg_terminate_backend
    # waits until the backend is gone: `kill_leader_session`)
    kill_leader_session(engine)
    assert first.is_leader
    with (
        pytest.raises(LeadershipLost, match="no longer this orchestrator's"),
        transaction(fenced_sessions(factory, first)) as session,
    ):
        session.execute(sa.insert(WRITES).values(what="deposed leader"))
    # ... the standby takes over, naming its predecessor; the old leader's poll says it lost.
    taken = second.poll()
    assert taken is not None and taken.acquired and taken.previous == Holder("host-a", 101)
    lost = first.poll()
    assert lost is not None and not lost.acquired and "lock session failed" in lost.reason
    assert first.poll() is None and not first.is_leader  # now a standby
    with transaction(fenced_sessions(factory, second)) as session:
        session.execute(sa.insert(WRITES).values(what="new leader"))
    assert written(factory) == ["leader, core insert", "new leader"]


@pytest.mark.postgres
def test_a_new_leader_waits_for_the_deposed_leaders_side_effect_in_flight(
    pg: tuple[Engine, sessionmaker[Session]], rivals: tuple[PostgresLeadership, PostgresLeadership]
) -> None:
    engine, _ = pg
    first, second = rivals
    inside, release = threading.Event(), threading.Event()
    events: list[str] = []

    def launch() -> None:
        with fenced(first, engine, "start attempt 1"):
            inside.set()
            release.wait(10)
            events.append("side effect done")

    try:
        assert first.poll() is not None
        worker = threading.Thread(target=launch)
        worker.start()
        assert inside.wait(10)
        kill_leader_session(engine)  # the leader's lock session dies mid-launch
        taker = threading.Thread(target=lambda: events.append(f"took over: {second.poll() is not None}"))
        taker.start()
        time.sleep(0.5)
        assert events == []  # it holds the lock but waits for the fenced launch to end
        release.set()
        worker.join(10)
        taker.join(10)
        assert events == ["side effect done", "took over: True"]
        assert second.is_leader
        # the deposed leader's next side effect is refused
        with pytest.raises(LeadershipLost), fenced(first, engine, "kill attempt 1"):
            events.append("must not run")
        assert "must not run" not in events
    finally:
        release.set()


@pytest.mark.postgres
def test_a_leader_that_steps_down_frees_the_lock_at_once(
    rivals: tuple[PostgresLeadership, PostgresLeadership],
) -> None:
    first, second = rivals
    assert first.poll() is not None
    assert second.poll() is None
    first.release()
    taken = second.poll()
    assert taken is not None and taken.previous == Holder("host-a", 101)


def test_sqlite_allows_one_orchestrator_and_a_second_refuses_naming_the_first(tmp_path: Path) -> None:
    database = tmp_path / "trainops.db"
    engine = make_engine(f"sqlite:///{database}")
    factory = make_session_factory(engine)
    with transaction(factory) as session:
        assert orchestrator_sessions(session) == (0, 0)  # nobody leads: OrchestratorLeaderMissing's signal
    first = SqliteLeadership(database, holder=Holder("host-a", 101))
    second = SqliteLeadership(database, holder=Holder("host-b", 202))
    first.acquire()
    try:
        with transaction(factory) as session:
            assert orchestrator_sessions(session) == (1, 0)
        with pytest.raises(LeadershipRefused, match=r"another orchestrator \(host-a pid 101, since .*SQLite"):
            second.acquire()
        assert not second.is_leader
        with pytest.raises(LeadershipLost):
            second.fence(None, "write")  # type: ignore[arg-type]  # SQLite's fence reads no connection
    finally:
        first.release()
    with transaction(factory) as session:
        assert orchestrator_sessions(session) == (0, 0)
    second.acquire()  # the first one stopped: the database is free
    assert second.is_leader
    second.release()
    engine.dispose()


def test_trainops_orchestrator_on_a_sqlite_database_in_use_exits_with_the_reason(tmp_path: Path) -> None:
    home = tmp_path / "home"
    database = home / "trainops.db"
    holder = SqliteLeadership(database.resolve(), holder=Holder("host-a", 101))
    holder.acquire()
    try:
        result = CliRunner().invoke(
            app,
            ["orchestrator", "--once"],
            env={"TRAINOPS_HOME": str(home), "TRAINOPS_DATABASE_URL": f"sqlite:///{database}"},
        )
    finally:
        holder.release()
    assert result.exit_code == 1, result.output
    assert "orchestrator not started" in result.output and "host-a pid 101" in result.output


def test_the_lease_must_exceed_a_loop_interval() -> None:
    with pytest.raises(ValidationError, match="leader_lease_s must be >= 2 and > loop_interval_s"):
        OrchestratorConfig(loop_interval_s=3.0, leader_lease_s=3.0)
    with pytest.raises(ValidationError, match="leader_lease_s"):
        OrchestratorConfig(leader_lease_s=1.0, loop_interval_s=0.5)
    assert OrchestratorConfig(loop_interval_s=0.5, leader_lease_s=2.0).leader_lease_s == 2.0


def test_the_lock_sessions_name_says_who_holds_it() -> None:
    holder = Holder("gpu-ctl-1.example", 4242)
    assert Holder.from_application_name(holder.application_name) == holder
    assert Holder.from_application_name("psql") is None


@pytest.mark.postgres
def test_a_leader_whose_lock_session_died_steps_down_then_leads_again_on_a_new_session(
    pg: tuple[Engine, sessionmaker[Session]],
) -> None:
    engine, _ = pg
    leader = PostgresLeadership(engine, lease_s=2, holder=Holder("host-b", 202))
    try:
        assert leader.poll() is not None
        kill_leader_session(engine)
        lost = leader.poll()
        assert lost is not None and not lost.acquired and "lock session failed" in lost.reason
        taken = leader.poll()  # a fresh lock session; nobody else wanted the lock
        assert taken is not None and taken.acquired
    finally:
        leader.release()


PAUSED_LEADER = """
import sys, time
from service.db import make_engine
from service.orchestrator.leadership import Holder, PostgresLeadership
leadership = PostgresLeadership(make_engine(sys.argv[1]), lease_s=2, holder=Holder("host-a", 101))
assert leadership.poll() is not None
print("leading", flush=True)
time.sleep(600)
"""


@pytest.mark.postgres
def test_a_leader_whose_process_stops_loses_the_lock_within_the_lease(
    pg: tuple[Engine, sessionmaker[Session]], postgres_url: str
) -> None:
    """SIGSTOP: the process lives and its kernel still answers TCP keepalives, so only the lease ends it."""
    engine, _ = pg
    leader = subprocess.Popen(
        [sys.executable, "-c", PAUSED_LEADER, postgres_url],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    standby = PostgresLeadership(engine, lease_s=2, holder=Holder("host-b", 202))
    try:
        assert leader.stdout is not None and leader.stdout.readline().strip() == "leading"
        time.sleep(3)  # more than the lease: a running leader's renewals keep its session
        assert standby.poll() is None and standby.current_holder() == Holder("host-a", 101)
        os.kill(leader.pid, signal.SIGSTOP)
        stopped = time.monotonic()
        taken = None
        while taken is None and time.monotonic() - stopped < 15:
            time.sleep(0.1)
            taken = standby.poll()
        waited = time.monotonic() - stopped
        assert taken is not None and taken.previous == Holder("host-a", 101)
        assert waited <= 2 + 1.5, waited  # the lease, plus the server's timer and this loop's 0.1 s
    finally:
        leader.kill()
        leader.wait()
        standby.release()


@dataclass
class LockLosingLauncher(ScriptedLauncher):
    """A launcher during whose `prepare` (inside the transaction that records the attempt) the leader's lock
    session is dropped, as a network blip or the database's restart of that backend would drop it."""

    engine: Engine | None = None
    prepared: list[int] = field(default_factory=list)

    def prepare(self, spec: LaunchSpec) -> dict[str, Any]:
        self.prepared.append(spec.attempt)
        if self.engine is not None:
            kill_leader_session(self.engine)
            self.engine = None  # once: the next leader prepares in peace
        return super().prepare(spec)


@pytest.mark.postgres
def test_a_leader_deposed_while_it_records_a_launch_commits_nothing_and_its_successor_launches_once(
    postgres_url: str, tmp_path: Path
) -> None:
    """The applier's transactions are fenced too: the attempt row, its token and the run's move to
    `starting` are one transaction, which the deposed leader may not commit."""
    migrate.upgrade(postgres_url)
    engine = make_engine(postgres_url, pool_size=4)
    factory = make_session_factory(engine)
    run_id = two_hosts_and_a_run(factory, name="fenced-launch")
    cfg = OrchestratorConfig(
        loop_interval_s=0.5,
        leader_lease_s=2.0,
        runs_dir=str(tmp_path / "runs"),
        remediation=RemediationConfig(backoff_base_s=0.0, deep_check_before_relaunch=False),
    )
    launcher = LockLosingLauncher(engine=engine)

    def orchestrator(holder: Holder) -> Orchestrator:
        return Orchestrator(
            factory,
            cfg,
            launchers={"fake": launcher},
            health=SweepHealthGateway(factory),
            leadership=PostgresLeadership(engine, lease_s=cfg.leader_lease_s, holder=holder),
        )

    def state() -> tuple[RunPhase, list[int]]:
        with transaction(factory) as session:
            phase = session.scalars(sa.select(Run.phase).where(Run.id == run_id)).one()
            return phase, list(session.scalars(sa.select(Attempt.number)))

    first, second = orchestrator(Holder("host-a", 101)), orchestrator(Holder("host-b", 202))
    try:
        assert first.leads() and not second.leads()
        with pytest.raises(LeadershipLost, match="no longer this orchestrator's"):
            first.reconcile_once()
        assert launcher.prepared == [1]  # it got as far as preparing attempt 1 ...
        assert state() == (RunPhase.pending, [])  # ... and recorded none of it

        assert not first.leads()  # its next poll says it lost; the standby takes over and launches once
        assert second.leads()
        second.reconcile_once()
        assert state() == (RunPhase.starting, [1])
        assert launcher.prepared == [1, 1]
    finally:
        first.stop()
        second.stop()
        first.step_down()
        second.step_down()
        engine.dispose()


FENCED_STEP_LEADER = """
import sys, time
from service.db import make_engine
from service.orchestrator.leadership import Holder, PostgresLeadership, fenced
engine = make_engine(sys.argv[1])
leadership = PostgresLeadership(engine, lease_s=2, holder=Holder("host-a", 101))
assert leadership.poll() is not None
with fenced(leadership, engine, "start attempt 1"):
    print("inside", flush=True)
    time.sleep(600)
"""


def fence_holders(engine: Engine) -> int:
    """How many sessions hold the fence (a leader's fenced steps)."""
    with engine.connect() as conn:
        return conn.execute(
            sa.text(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 2"
                " AND classid::bigint = :namespace AND objid::bigint = :fence"
            ),
            {"namespace": LOCK_NAMESPACE, "fence": FENCE_LOCK},
        ).scalar_one()


def stopped(pid: int) -> bool:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"


@pytest.mark.postgres
def test_a_leader_stopped_inside_a_fenced_launch_does_not_hold_off_the_standby(
    pg: tuple[Engine, sessionmaker[Session]], postgres_url: str
) -> None:
    """SIGSTOP mid-launch: the stopped leader's fence (on a pooled connection) must go within the lease like
    its leader lock, or the standby, having taken the lock, would wait for the fence as long as TCP lets the
    stopped process's kernel answer for it."""
    engine, _ = pg
    interval_s = 0.5
    leader = subprocess.Popen(
        [sys.executable, "-c", FENCED_STEP_LEADER, postgres_url],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    standby = PostgresLeadership(engine, lease_s=2, holder=Holder("host-b", 202))
    taken: list[LeadershipChange] = []
    quit_polling = threading.Event()

    def stand_by() -> None:  # the standby's loop: one poll per interval
        while not quit_polling.is_set() and not taken:
            change = standby.poll()
            if change is not None:
                taken.append(change)
            quit_polling.wait(interval_s)

    poller = threading.Thread(target=stand_by)
    try:
        assert leader.stdout is not None and leader.stdout.readline().strip() == "inside"
        time.sleep(3)  # longer than the lease: a running leader's fenced launch keeps lock and fence
        assert standby.poll() is None and fence_holders(engine) == 1
        os.kill(leader.pid, signal.SIGSTOP)
        poller.start()
        wait_until(lambda: bool(taken), timeout_s=60)  # bound: 2 x interval + lease; generous here
        assert taken[0].acquired and taken[0].previous == Holder("host-a", 101)
        assert stopped(leader.pid)  # it led while the old leader was still stopped mid-launch
        assert fence_holders(engine) == 0
    finally:
        quit_polling.set()
        leader.kill()  # its sockets close: an old standby stuck waiting for the fence gets it now
        leader.wait()
        if poller.is_alive() or poller.ident is not None:
            poller.join(30)
        standby.release()


@pytest.mark.postgres
def test_a_fence_held_past_the_lease_is_ended_and_named_in_the_takeover(
    pg: tuple[Engine, sessionmaker[Session]], postgres_url: str
) -> None:
    """A fenced step whose session the server cannot time out (busy in a statement that never returns, or
    an orchestrator from before fences had a lease) holds the fence: the new leader waits the lease for it,
    then ends that session, and its takeover's evidence (the logbook entry) names it."""
    engine, _ = pg
    holder = psycopg.connect(postgres_url.replace("postgresql+psycopg://", "postgresql://"))
    holder.execute("SELECT pg_advisory_xact_lock_shared(%s, %s)", (LOCK_NAMESPACE, FENCE_LOCK))
    pid = holder.info.backend_pid
    errors: list[BaseException] = []

    def stuck() -> None:
        try:
            holder.execute("SELECT pg_sleep(60)")
            holder.rollback()
        except psycopg.Error as error:
            errors.append(error)

    worker = threading.Thread(target=stuck)
    worker.start()
    standby = PostgresLeadership(engine, lease_s=2, holder=Holder("host-b", 202))
    try:
        wait_until(lambda: fence_holders(engine) == 1)
        taken = standby.poll()
        assert taken is not None and taken.acquired
        (ended,) = taken.evidence["fence_holders_terminated"]
        assert ended["pid"] == pid and "pg_sleep" in ended["query"]
        worker.join(30)
        assert errors and isinstance(errors[0], psycopg.errors.AdminShutdown)
    finally:
        standby.release()
        worker.join(60)
        holder.close()
