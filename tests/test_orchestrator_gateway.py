"""What the orchestrator does to hosts goes through the health layer: cordons and blame, with the logbook."""

from __future__ import annotations

import sqlalchemy as sa

from service import migrate
from service.crud.logbook import list_logbook
from service.crud.nodes import get_node, register_node
from service.db import make_engine, make_session_factory, transaction
from service.models import LogEntry
from service.orchestrator.health_gateway import SweepHealthGateway


def test_a_host_blamed_for_three_run_failures_is_retired_as_a_lemon(sqlite_url: str) -> None:
    migrate.upgrade(sqlite_url)
    engine = make_engine(sqlite_url)
    factory = make_session_factory(engine)
    with transaction(factory) as session:
        register_node(session, hostname="gpu-13", author="user:test")
        register_node(session, hostname="gpu-14", author="user:test")
    gateway = SweepHealthGateway(factory)
    states = []
    for n in range(3):
        gateway.blame(["gpu-13"], reason=f"hang of run r (#{n + 1})", run_id=None)
        with transaction(factory) as session:
            states.append(get_node(session, hostname="gpu-13").state.value)
    assert states == ["suspect", "suspect", "retired"]
    gateway.cordon(["gpu-14"], reason="straggler: 4.1x slower", evidence={"rank": 1}, run_id=None)
    with transaction(factory) as session:
        node = get_node(session, hostname="gpu-14")
        assert node.state.value == "cordoned" and node.state_reason == "straggler: 4.1x slower"
        entries, _ = list_logbook(session, node_id=node.id)
        assert entries[-1].author == "system:orchestrator" and entries[-1].evidence["rank"] == 1
        lemon = session.scalars(sa.select(LogEntry).where(LogEntry.message.contains("lemon"))).all()
        assert len(lemon) == 1
    engine.dispose()
