"""A real torchrun attempt under a real orchestrator: checkpoint verdicts appear as the steps after each
checkpoint arrive, and the newest healthy checkpoint is pinned on disk."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa

from service.models import Checkpoint, Run
from tests.e2e.test_orchestrator_e2e import Stack, in_thread, stack  # noqa: F401 - the fixture
from trainer.checkpoint import PINNED

pytestmark = pytest.mark.slow


def test_verdicts_appear_and_the_newest_healthy_checkpoint_is_pinned_on_disk(stack: Stack) -> None:  # noqa: F811
    run_id = stack.create_run(target_steps=24)  # tiny preset, 2 ranks, a checkpoint every 4 steps
    orch = stack.orchestrator()
    thread = in_thread(orch)
    try:
        stack.wait_for(lambda s: s.get(Run, run_id).phase.value == "completed")
        # the pass after the last metrics arrive judges what is left
        stack.wait_for(
            lambda s: (
                s.scalar(
                    sa.select(sa.func.count()).where(
                        Checkpoint.run_id == run_id,
                        Checkpoint.verdict == "healthy",
                        Checkpoint.pinned.is_(True),
                    )
                )
                == 1
            )
        )
    finally:
        orch.stop()
        thread.join(timeout=30)
    with stack.factory() as session:
        rows = list(
            session.scalars(
                sa.select(Checkpoint).where(Checkpoint.run_id == run_id).order_by(Checkpoint.step)
            )
        )
    healthy = [r for r in rows if r.verdict == "healthy"]
    assert healthy and all(r.verdict_numbers and r.verdict_numbers["points_after"] >= 5 for r in healthy)
    assert all(r.checksum and r.size_bytes and r.meta.get("loss_window") for r in rows)  # never a bare row
    pinned = [r for r in rows if r.pinned]
    assert [r.step for r in pinned] == [max(r.step for r in healthy if Path(r.path).is_dir())]
    assert pinned[0].pinned_by == "system:orchestrator" and (Path(pinned[0].path) / PINNED).exists()
    log = stack.logbook()
    assert any("-> healthy" in m for m in log) and any(m.startswith("pinned checkpoint step") for m in log)
