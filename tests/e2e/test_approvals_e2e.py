"""An on-call engineer approves the orchestrator's rollback with an LR cut from the CLI, and the run recovers.

Real torchrun attempts, a real control plane process, the `trainops` CLI as a subprocess. The run's policy
requires a human for an LR cut: the divergence (the LR x100 from step 20) ends attempt 1, the orchestrator
proposes the rollback with the LR halved and pages, and waits; the operator lists the pending decision and
approves it; attempt 2 restores the proposed checkpoint at LR scale 0.5 and reaches the target."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from service.config import DEFAULT_BOOTSTRAP_TOKEN
from service.crud.decisions import list_decisions
from service.models import Run
from service.statemachine import DecisionStatus
from tests.e2e.test_orchestrator_e2e import Stack, in_thread, phase, stack  # noqa: F401  (fixture)

pytestmark = pytest.mark.slow

ADMIN = {"Authorization": f"Bearer {DEFAULT_BOOTSTRAP_TOKEN}"}


def test_a_gated_rollback_waits_for_the_operator_who_approves_it_from_the_cli(stack: Stack) -> None:  # noqa: F811
    run_id = stack.create_run(
        # 28 steps after the LR blow-up: at 7-10 steps a second a loaded CI saw attempt 1 reach a 32-step
        # target before its diverging metrics were judged (it then ends `completed`, nothing to approve)
        target_steps=48,
        faults=["1:diverge:step=20,factor=100"],
        approvals={"require": ["lr_cut"], "timeout_s": 600, "on_timeout": "hold"},
    )
    orchestrator = stack.orchestrator()
    thread = in_thread(orchestrator)
    try:
        stack.wait_for(lambda s: bool(list_decisions(s, run_id=run_id, status=DecisionStatus.pending)[0]))
        with stack.factory() as session:
            assert session.get(Run, run_id).phase.value == "restarting"  # waiting: nothing was launched
            assert len(session.get(Run, run_id).attempts) == 1
        assert any("awaits approval (lr_cut)" in p["reason"] for p in stack.pages)

        token = stack.server.cli("tokens", "create", "--name", "oncall", "--role", "operator").stdout
        stack.server.env["TRAINOPS_TOKEN"] = token.strip().splitlines()[-1]
        pending = json.loads(stack.server.cli("decisions", "list", "--status", "pending", "--json").stdout)
        [decision] = pending
        assert decision["gates"] == ["lr_cut"] and decision["proposal"]["overrides"]["lr_scale"] == 0.5
        out = stack.server.cli("decisions", "approve", str(decision["id"]), "--reason", "OPT rule").stdout
        assert "approved" in out
        again = stack.server.cli("decisions", "approve", str(decision["id"]), check=False)
        said = " ".join((again.stderr + again.stdout).split())  # the console wraps long lines
        assert again.returncode != 0 and "HTTP 409: decision 1 is already approved by user:oncall" in said

        stack.wait_for(phase(run_id, "completed", "needs_attention", "failed"))
    finally:
        orchestrator.stop()
        thread.join(10)

    with stack.factory() as session:
        run = session.get(Run, run_id)
        assert run.phase.value == "completed", stack.logbook()
        first, second = run.attempts
        assert first.exit_reason == "divergence" and second.overrides["lr_scale"] == 0.5
        assert second.restored_from_checkpoint_id is not None
        (done,) = list_decisions(session, run_id=run_id)[0]
        assert done.status == DecisionStatus.approved and done.decided_by == "user:oncall"
        assert done.consumed_by_attempt == 2 and done.consumed_at is not None
    log = stack.logbook()
    assert any(m.startswith(f"decision {done.id} awaits approval (lr_cut)") for m in log)
    assert any(f"decision {done.id} of run r approved by user:oncall: OPT rule" in m for m in log)
    assert any(m.startswith("attempt 2:") and f"decision {done.id} approved by user:oncall" in m for m in log)
    page: Any = httpx.get(f"{stack.server.url}/api/v1/decisions", headers=ADMIN).json()
    assert page["total"] == 1 and page["items"][0]["status"] == "approved"
