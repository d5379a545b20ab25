"""Issue 13, point 3: orchestrator failover on PostgreSQL, with real torchrun attempts.

Three `trainops orchestrator` processes share one database: one leads, two stand by. The test SIGKILLs the
leader mid-run: a standby takes over within 2 x loop_interval_s + leader_lease_s and adopts the running
attempt (no relaunch; the attempt's exit status, written by its supervisor, is still read after its
parent died). Then the attempt crashes (a trainer fault) and the new leader records attempt 2 and dies
right there (the `attempt-recorded:2` fault point, a deterministic SIGKILL): the last standby starts that
attempt, exactly once, and the run completes.
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from service import migrate
from service.crud.nodes import register_node
from service.crud.orchestrators import LEADER_SESSION_SQL, orchestrator_sessions
from service.crud.runs import create_run
from service.db import make_engine, make_session_factory, transaction
from service.models import Attempt, LogEntry, Run
from service.orchestrator.launchers.local import LAUNCH_CLAIM_FILE, LocalLauncher
from service.orchestrator.leadership import Holder
from service.schemas import RunConfig
from tests.livesrv import LiveServer

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

LOOP_INTERVAL_S = 0.5
LEADER_LEASE_S = 2.0
TAKEOVER_BOUND_S = 2 * LOOP_INTERVAL_S + LEADER_LEASE_S
TOOK_THE_LEAD = "took the lead"


class Fleet:
    """A control plane on a PostgreSQL database of its own and three orchestrator processes."""

    def __init__(self, home: Path, database_url: str) -> None:
        self.home = home
        migrate.upgrade(database_url)
        self.engine = make_engine(database_url, pool_size=2)
        self.factory = make_session_factory(self.engine)
        with transaction(self.factory) as session:
            for host in ("h1", "h2", "h3"):
                register_node(session, hostname=host, author="user:test")
        # Not started yet: the orchestrators start first (their start-up overlaps the API's), with its URL.
        self.server = LiveServer(home, database_url=database_url)
        self.env = {
            **self.server.env,
            "TRAINOPS_ORCHESTRATOR_LOOP_INTERVAL_S": str(LOOP_INTERVAL_S),
            "TRAINOPS_ORCHESTRATOR_LEADER_LEASE_S": str(LEADER_LEASE_S),
            "TRAINOPS_ORCHESTRATOR_REMEDIATION__BACKOFF_BASE_S": "0.5",
            # every orchestrator dies right after recording attempt 2, before starting it
            "TRAINOPS_FAULT_POINT": "attempt-recorded:2",
        }
        self.orchestrators: dict[int, subprocess.Popen[bytes]] = {}

    def start_orchestrator(self, index: int) -> None:
        log = open(self.home / f"orchestrator-{index}.log", "ab")  # noqa: SIM115 - owned by the child
        proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "orchestrator"], env=self.env, stdout=log, stderr=log
        )
        self.orchestrators[proc.pid] = proc

    def logs(self) -> str:
        return "\n".join(p.read_text()[-3000:] for p in sorted(self.home.glob("orchestrator-*.log")))

    def leader(self) -> Holder | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.text(LEADER_SESSION_SQL)).first()
        return Holder.from_application_name(row.application_name) if row else None

    def wait_for(self, what: str, predicate: Callable[[Session], Any], timeout: float = 120.0) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with transaction(self.factory) as session:
                found = predicate(session)
            if found:
                return found
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}:\n{self.timeline()}")

    def attempts(self, session: Session, run_id: int) -> list[Attempt]:
        return list(
            session.scalars(sa.select(Attempt).where(Attempt.run_id == run_id).order_by(Attempt.number))
        )

    def entries(self, session: Session, containing: str) -> list[LogEntry]:
        return list(
            session.scalars(
                sa.select(LogEntry).where(LogEntry.message.contains(containing)).order_by(LogEntry.id)
            )
        )

    def timeline(self) -> str:
        """The logbook with times, and the orchestrators' logs: what a failure message needs."""
        with transaction(self.factory) as session:
            entries = session.scalars(sa.select(LogEntry).order_by(LogEntry.id))
            logbook = "\n".join(f"{e.time:%H:%M:%S.%f} {e.message[:160]}" for e in entries)
        return f"{logbook}\n{self.logs()}"

    def close(self) -> None:
        for proc in self.orchestrators.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        with transaction(self.factory) as session:  # no attempt outlives the test
            infos = [
                a.launcher for a in session.scalars(sa.select(Attempt)) if a.launcher and "tag" in a.launcher
            ]
        for info in infos:
            LocalLauncher().kill(info, grace_s=2)
        self.server.stop()
        self.engine.dispose()


@pytest.fixture
def fleet(tmp_path: Path, postgres_url: str) -> Iterator[Fleet]:
    f = Fleet(tmp_path, postgres_url)
    try:
        yield f
    finally:
        f.close()


def took_lead_after(fleet: Fleet, session: Session, after: dt.datetime) -> LogEntry | None:
    return next((e for e in fleet.entries(session, TOOK_THE_LEAD) if e.time > after), None)


def test_standbys_take_over_a_killed_leader_adopt_its_attempt_and_finish_its_half_done_launch(
    fleet: Fleet,
) -> None:
    # Attempt 1 steps slowly (0.5 s a step on both ranks, so no straggler) and crashes at step 12: the
    # leader is killed at its first step, and the crash comes over 5 s later, after the takeover (<= 3 s).
    slow = [f"1:slow:rank={rank},step=1,delay=0.5" for rank in (0, 1)]
    config = RunConfig(
        preset="tiny",
        checkpoint_interval=4,
        host_count=2,
        target_steps=16,
        faults=[*slow, "1:crash:step=12,rank=0,code=13"],
    )
    with transaction(fleet.factory) as session:
        run_id = create_run(
            session,
            name="failover",
            owner="test",
            config=config.model_dump(mode="json"),
            start=True,
            author="t",
        ).id
    for index in range(3):
        fleet.start_orchestrator(index)
    fleet.server.start(timeout=120)  # before any trainer reports (a trainer takes seconds to start)
    fleet.wait_for("one leader and two standbys", lambda s: orchestrator_sessions(s) == (1, 2), 60)
    scrape = httpx.get(f"{fleet.server.url}/metrics", timeout=10).text
    assert 'trainops_orchestrators{role="leader"} 1.0' in scrape
    assert 'trainops_orchestrators{role="standby"} 2.0' in scrape

    # -- the leader dies mid-run ---------------------------------------------------------------------
    fleet.wait_for(
        "attempt 1's first step", lambda s: any(a.first_step_at for a in fleet.attempts(s, run_id))
    )
    first_leader = fleet.leader()
    assert first_leader is not None and first_leader.pid in fleet.orchestrators
    killed_at = dt.datetime.now(dt.UTC)
    os.kill(first_leader.pid, signal.SIGKILL)
    fleet.orchestrators[first_leader.pid].wait()

    takeover = fleet.wait_for("a standby to take over", lambda s: took_lead_after(fleet, s, killed_at), 30)
    assert (takeover.time - killed_at).total_seconds() <= TAKEOVER_BOUND_S, takeover.time - killed_at
    assert takeover.evidence["previous"] == {"host": first_leader.host, "pid": first_leader.pid}
    second_leader = Holder(**takeover.evidence["holder"])
    assert second_leader.pid in fleet.orchestrators and second_leader != first_leader
    with transaction(fleet.factory) as session:
        (running,) = fleet.attempts(session, run_id)
        assert running.number == 1 and running.ended_at is None  # adopted, not relaunched

    # -- attempt 1 crashes; the new leader records attempt 2 and dies before starting it ----------------
    fleet.wait_for(
        "the run to complete",
        lambda s: s.get(Run, run_id).phase.value in ("completed", "needs_attention", "failed"),
        180,
    )
    assert fleet.orchestrators[second_leader.pid].wait(10) == -signal.SIGKILL, fleet.logs()
    with transaction(fleet.factory) as session:
        assert session.get(Run, run_id).phase.value == "completed", fleet.timeline()
        first, second = fleet.attempts(session, run_id)
        # the dead leader's child reported its exit status to the leader that adopted it
        assert (first.exit_reason, first.exit_code) == ("crash", 13)
        assert second.exit_reason == "completed" and second.restored_from_checkpoint_id is not None
        recorded = fleet.entries(session, "attempt 2 launched on")
        (third_takeover,) = [e for e in fleet.entries(session, TOOK_THE_LEAD) if e.time > takeover.time]
        assert third_takeover.evidence["previous"] == {"host": second_leader.host, "pid": second_leader.pid}
        assert (third_takeover.time - recorded[0].time).total_seconds() <= TAKEOVER_BOUND_S + 1.0
        started_late = fleet.entries(session, "attempt 2: starting it")
        assert len(recorded) == 1 and len(started_late) == 1, fleet.timeline()
        assert len(fleet.entries(session, "launched on")) == 2  # attempts 1 and 2, no third
        claim = Path(second.launcher["attempt_dir"]) / LAUNCH_CLAIM_FILE
        assert claim.exists() and second.launcher["runner_pid"] > 0
