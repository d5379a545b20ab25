"""What the orchestrator does to hosts goes through the health layer: cordons and blame, with the logbook,
and every hardware failure it attributes to a host counts to that host's lemon score, which decays."""

from __future__ import annotations

import datetime as dt

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from service import migrate
from service.crud.logbook import list_logbook
from service.crud.nodes import get_node, record_offence, register_node
from service.db import make_engine, make_session_factory, transaction
from service.fleet.gateway import SweepHealthGateway
from service.models import LogEntry, NodeOffence, utcnow
from service.statemachine import NodeState


def _fleet(url: str, *hosts: str) -> sessionmaker[Session]:
    migrate.upgrade(url)
    factory = make_session_factory(make_engine(url))
    with transaction(factory) as session:
        for host in hosts:
            register_node(session, hostname=host, author="user:test")
    return factory


def _state(factory: sessionmaker[Session], host: str) -> str:
    with transaction(factory) as session:
        return get_node(session, hostname=host).state.value


def test_a_host_blamed_for_three_run_failures_is_retired_as_a_lemon(sqlite_url: str) -> None:
    factory = _fleet(sqlite_url, "gpu-13", "gpu-14")
    gateway = SweepHealthGateway(factory)
    states = []
    for n in range(3):
        gateway.blame(["gpu-13"], reason=f"hang of run r (#{n + 1})", run_id=None)
        states.append(_state(factory, "gpu-13"))
    assert states == ["suspect", "suspect", "retired"]
    gateway.cordon(
        ["gpu-14"], reason="straggler: 4.1x slower", evidence={"rank": 1}, run_id=None, offence="straggler"
    )
    with transaction(factory) as session:
        node = get_node(session, hostname="gpu-14")
        assert node.state.value == "cordoned" and node.state_reason.startswith("straggler: 4.1x slower")
        entries, _ = list_logbook(session, node_id=node.id)
        assert entries[-1].author == "system:orchestrator" and entries[-1].evidence["rank"] == 1
        assert entries[-1].evidence["offences"][0]["kind"] == "straggler"
        lemon = session.scalars(sa.select(LogEntry).where(LogEntry.message.contains("lemon: score"))).all()
        assert len(lemon) == 1 and lemon[0].evidence["lemon_score"] >= 2.5


def test_every_hardware_failure_counts_not_only_hangs(sqlite_url: str) -> None:
    # a straggler, then (repaired and back) a hang it is blamed for, then a crash while it was unfit
    factory = _fleet(sqlite_url, "gpu-21")
    gateway = SweepHealthGateway(factory)
    gateway.cordon(["gpu-21"], reason="straggler", evidence={}, run_id=None, offence="straggler")
    assert _state(factory, "gpu-21") == "cordoned"
    with transaction(factory) as session:  # an operator returns it after a repair
        node = get_node(session, hostname="gpu-21", for_update=True)
        node.state = NodeState.probation
    gateway.blame(["gpu-21"], reason="hang of run r", run_id=None)
    assert _state(factory, "gpu-21") == "suspect"
    gateway.cordon(["gpu-21"], reason="exited 13 while gpu-21 is suspect", evidence={}, run_id=None)
    assert _state(factory, "gpu-21") == "retired"
    with transaction(factory) as session:
        kinds = session.scalars(sa.select(NodeOffence.kind).order_by(NodeOffence.id)).all()
        assert kinds == ["straggler", "hang", "hardware"]
        assert get_node(session, hostname="gpu-21").blame_count == 3


def test_old_offences_decay(sqlite_url: str) -> None:
    factory = _fleet(sqlite_url, "gpu-31")
    with transaction(factory) as session:
        node = get_node(session, hostname="gpu-31", for_update=True)
        for days in (40, 45):
            record_offence(
                session,
                node=node,
                kind="hang",
                reason=f"hang {days} days ago",
                author="test",
                at=utcnow() - dt.timedelta(days=days),
            )
    gateway = SweepHealthGateway(factory)
    gateway.blame(["gpu-31"], reason="hang of run r", run_id=None)
    assert _state(factory, "gpu-31") == "suspect"  # 1 + 0.14 + 0.11: not a lemon
    with transaction(factory) as session:
        node = get_node(session, hostname="gpu-31")
        [entry] = [e for e in list_logbook(session, node_id=node.id)[0] if e.evidence.get("to") == "suspect"]
        ages = [o["age_s"] for o in entry.evidence["offences"]]
        assert len(ages) == 3 and ages[0] < 60 and ages[2] > 44 * 86400
        assert 1.2 < entry.evidence["lemon_score"] < 1.3


class _FailingScheduler:
    """A scheduler whose every call fails, like `scontrol` on a slurmctld that is down."""

    name = "slurm"

    def __init__(self) -> None:
        self.calls: list[str] = []

    def cordon(self, host: str, reason: str) -> None:
        self.calls.append(f"cordon {host}")
        raise RuntimeError("scontrol: error: Unable to contact slurm controller")

    def uncordon(self, host: str, reason: str) -> None:
        self.calls.append(f"uncordon {host}")
        raise RuntimeError("scontrol: error: Unable to contact slurm controller")


def test_a_failing_scheduler_call_is_logged_and_skips_neither_the_cordon_nor_the_blame(
    sqlite_url: str,
) -> None:
    factory = _fleet(sqlite_url, "gpu-31", "gpu-32")
    scheduler = _FailingScheduler()
    gateway = SweepHealthGateway(factory, adapters=[scheduler])
    gateway.cordon(["gpu-31", "gpu-32"], reason="XID 79", evidence={"xid": 79}, run_id=None)
    gateway.blame(["gpu-31"], reason="hang of run r", run_id=None)
    assert scheduler.calls == ["cordon gpu-31", "cordon gpu-32", "cordon gpu-31"]
    assert _state(factory, "gpu-31") == "cordoned" and _state(factory, "gpu-32") == "cordoned"
    with transaction(factory) as session:
        offences = session.scalars(sa.select(NodeOffence).order_by(NodeOffence.id)).all()
        assert [o.kind for o in offences] == ["hardware", "hardware", "hang"]
        failures = session.scalars(
            sa.select(LogEntry).where(LogEntry.message.contains("could not cordon")).order_by(LogEntry.id)
        ).all()
        assert [f.message.split(":")[0] for f in failures] == [
            "slurm could not cordon gpu-31",
            "slurm could not cordon gpu-32",
            "slurm could not cordon gpu-31",
        ]
        assert {f.evidence["adapter"] for f in failures} == {"slurm"}
        assert all("Unable to contact" in f.evidence["error"] for f in failures)
