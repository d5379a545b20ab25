"""The README's main job: `trainops demo` keeps a run going through a killed rank, a GPU fault, a hang and a
divergence, and its logbook tells the story."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa

from bench.load import busy_cores
from service.db import make_engine, make_session_factory, transaction
from service.models import Attempt, Checkpoint, LogEntry, Metric, Node, Run
from service.readmodels.goodput import compute_goodput
from tests.livesrv import free_port

pytestmark = [pytest.mark.slow, pytest.mark.serial]  # it loads every core on purpose


def test_the_demo_run_reaches_its_target_by_itself_on_a_busy_machine(tmp_path: Path) -> None:
    """`trainops demo --exit` while a busy loop is pinned on every core: the calibrated detectors must not
    take a slow machine for a failing one, and every decision must come out as on an idle machine."""
    env = {**os.environ, "TRAINOPS_HOME": str(tmp_path), "COLUMNS": "200"}
    with busy_cores() as busy:
        assert len(busy) == len(os.sched_getaffinity(0))
        result = subprocess.run(
            [sys.executable, "-m", "service.cli", "demo", "--exit", "--port", str(free_port())],
            env=env,
            capture_output=True,
            text=True,
            timeout=1500,
        )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "goodput" in result.stdout and "Traceback" not in result.stderr

    engine = make_engine(f"sqlite:///{tmp_path / 'demo' / 'trainops.db'}")
    factory = make_session_factory(engine)
    with transaction(factory) as session:
        run = session.scalar(sa.select(Run).where(Run.name == "opt-demo"))
        assert run is not None and run.phase.value == "completed"
        attempts = list(
            session.scalars(sa.select(Attempt).where(Attempt.run_id == run.id).order_by(Attempt.number))
        )
        assert [a.exit_reason for a in attempts] == ["signal", "hardware", "hang", "divergence", "completed"]

        # the bad host was cordoned with its evidence and excluded from every later attempt
        bad = session.scalar(sa.select(Node).where(Node.state == "cordoned"))
        assert bad is not None and "ECC" in (bad.state_reason or "")
        assert bad.hostname in attempts[1].hosts
        assert all(bad.hostname not in a.hosts for a in attempts[2:])

        # hardware failures and hangs restart from the newest checkpoint; the divergence from an earlier,
        # healthy one (OPT's rule) with a lower LR and a fresh loss scale, which the trainer applied
        onset = attempts[3].findings["onset_step"]
        restored = session.get(Checkpoint, attempts[4].restored_from_checkpoint_id)
        assert restored.step < onset and restored.loss_scale >= 1.0
        assert attempts[4].overrides["lr_scale"] == 0.5 and attempts[4].overrides["reset_loss_scale"] is True

        def lr_at(attempt: int, step: int) -> float:
            return session.scalar(
                sa.select(Metric.lr).where(
                    Metric.run_id == run.id, Metric.attempt == attempt, Metric.step == step
                )
            )

        step = restored.step + 1
        assert lr_at(5, step) == pytest.approx(0.5 * lr_at(4, step), rel=1e-6)
        first_scale = session.scalar(
            sa.select(Metric.loss_scale)
            .where(Metric.run_id == run.id, Metric.attempt == 5)
            .order_by(Metric.step)
        )
        assert first_scale == 4.0  # fp16 is OPT's format: the scale restarts at OPT's 4
        assert session.scalar(sa.select(sa.func.max(Metric.step)).where(Metric.run_id == run.id)) == 120

        # the logbook tells the story in order
        messages = [
            e.message
            for e in session.scalars(
                sa.select(LogEntry).where(LogEntry.run_id == run.id).order_by(LogEntry.id)
            )
        ]
        story = ["killed by signal 9", "became unfit", "no progress for", "divergence", "reached the target"]
        positions = [next(i for i, m in enumerate(messages) if needle in m) for needle in story]
        assert positions == sorted(positions), messages
        decision = next(m for m in messages if m.startswith("attempt 5: restart after divergence"))
        assert "loss scale" in decision and "activation norm" in decision and "LR scale 1 -> 0.5" in decision

        goodput = compute_goodput(session, run_id=run.id)
        assert goodput.goodput is not None and 0 < goodput.goodput < 1
        assert set(goodput.failures) == {"signal", "hardware", "hang", "divergence"}
        assert goodput.steps_recomputed > 0
    engine.dispose()
