"""When an attempt ends, the orchestrator stores what its trainer spooled; the spool is a file a client
can write, so a checkpoint in it is held to the API's rule: only this run's own directory."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa

from service import migrate
from service.crud.runs import create_run
from service.db import make_engine, make_session_factory, transaction
from service.models import Checkpoint, LogEntry, Metric
from service.orchestrator.spool import drain_spool
from trainer import contract
from trainer.checkpoint import checkpoint_name


def test_spooled_metrics_are_stored_and_a_foreign_checkpoint_is_refused(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'trainops.db'}"
    migrate.upgrade(url)
    factory = make_session_factory(make_engine(url))
    with transaction(factory) as session:
        run_id = create_run(session, name="r", owner="a", config={}, start=False, author="t").id
    run_dir = tmp_path / "runs" / "r"
    own = contract.checkpoints_dir(run_dir) / checkpoint_name(10)
    foreign = tmp_path / "runs" / "other" / "checkpoints" / checkpoint_name(10)
    contract.Spool(contract.spool_dir(run_dir)).append(
        [
            contract.metrics_spool_record(1, {"step": 9, "loss": 2.5}),
            contract.checkpoint_spool_record(1, {"step": 10, "path": str(own), "state": "committed"}),
            contract.checkpoint_spool_record(1, {"step": 10, "path": str(foreign), "state": "committed"}),
        ]
    )

    drain_spool(factory, run_id=run_id, run_dir=run_dir, author="system:orchestrator")

    with transaction(factory) as session:
        assert session.scalars(sa.select(Checkpoint.path)).all() == [str(own)]
        assert session.scalars(sa.select(Metric.step)).all() == [9]
        (entry,) = session.scalars(sa.select(LogEntry).where(LogEntry.message.like("stored %"))).all()
    assert "1 checkpoint(s) outside the run's directory refused" in entry.message
    assert entry.evidence["refused"] and str(foreign) in entry.evidence["refused"][0]
    assert contract.Spool(contract.spool_dir(run_dir)).read() == []  # drained, not retried forever
