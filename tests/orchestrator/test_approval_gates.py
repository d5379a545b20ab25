"""Approval gates: a run whose policy requires a human for a risky action gets a proposal instead of the
action, waits, and then does what was approved, what the operator chose instead, or holds.

decide() as a table here (pure); the API, the orchestrator and the CLI together in
tests/e2e/test_approvals_e2e.py."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from service.orchestrator.decide import (
    ApprovalGates,
    CloseDecision,
    Escalate,
    Launch,
    ObservedDecision,
    ObservedRun,
    ProposeDecision,
    RetireHosts,
    SetPhase,
    decide,
)
from service.statemachine import DesiredState, RunPhase
from tests.orchestrator.test_orchestrator_decide import CFG, NOW, ckpt, ended, only, run

NORMS = {s: 10.0 for s in range(1, 60)}
LR_GATE = ApprovalGates(require=frozenset({"lr_cut", "loss_scale_reset"}), timeout_s=600.0)


def diverged(**kw: Any) -> ObservedRun:
    return run(
        history=(replace(ended("divergence", onset_step=48), last_step=52),),
        checkpoints=(ckpt(20), ckpt(40), ckpt(50)),
        act_norms=NORMS,
        **kw,
    )


def proposed(status: str, **kw: object) -> ObservedDecision:
    return ObservedDecision(
        id=7,
        status=status,
        gates=("lr_cut", "loss_scale_reset"),
        proposal={
            "failure": "divergence",
            "checkpoint_id": 40,
            "checkpoint_step": 40,
            "overrides": {"lr_scale": 0.5, "lr": None, "clip": None, "reset_loss_scale": True},
        },
        expires_at=kw.pop("expires_at", NOW + 600),  # type: ignore[arg-type]
        on_timeout=kw.pop("on_timeout", "hold"),  # type: ignore[arg-type]
        **kw,  # type: ignore[arg-type]
    )


def test_without_a_policy_the_orchestrator_acts_alone_as_before() -> None:
    launch = only(decide(diverged(), CFG), Launch)
    assert launch.overrides["lr_scale"] == 0.5 and launch.close_decision is None


def test_a_gated_lr_cut_is_proposed_not_launched() -> None:
    acts = decide(diverged(approvals=LR_GATE), CFG)
    assert isinstance(acts[0], SetPhase)
    proposal = only(acts, ProposeDecision)
    assert not [a for a in acts if isinstance(a, Launch)]
    assert proposal.gates == ("lr_cut", "loss_scale_reset") and proposal.timeout_s == 600.0
    assert proposal.proposal["checkpoint_step"] == 40 and proposal.proposal["overrides"]["lr_scale"] == 0.5
    assert "LR scale 1 -> 0.5" in proposal.reason
    # a gate the policy does not list is not crossed: clip stays automatic
    only_clip = replace(LR_GATE, require=frozenset({"clip_change"}))
    assert only(decide(diverged(approvals=only_clip), CFG), Launch).close_decision is None


def test_while_the_proposal_waits_nothing_happens() -> None:
    acts = decide(diverged(approvals=LR_GATE, open_decision=proposed("pending")), CFG)
    assert not [a for a in acts if isinstance(a, Launch | ProposeDecision | Escalate)]


def test_approved_it_launches_what_was_approved_with_the_operators_levers() -> None:
    answer = proposed("approved", decided_by="user:alice", operator_overrides={"clip": 0.3})
    launch = only(decide(diverged(approvals=LR_GATE, open_decision=answer), CFG), Launch)
    assert launch.checkpoint is not None and launch.checkpoint.step == 40
    assert launch.overrides["lr_scale"] == 0.5 and launch.overrides["clip"] == 0.3
    assert launch.overrides["reset_loss_scale"] is True
    assert launch.close_decision == CloseDecision(
        7, "timed_out", "approved by user:alice with their levers {'clip': 0.3}"
    )
    assert "decision 7 approved by user:alice" in launch.reason


def test_rejected_with_levers_it_restarts_with_those_alone() -> None:
    answer = proposed(
        "rejected",
        decided_by="user:bob",
        decision_reason="too aggressive",
        operator_overrides={"lr_scale": 0.8},
    )
    launch = only(decide(diverged(approvals=LR_GATE, open_decision=answer), CFG), Launch)
    assert launch.overrides["lr_scale"] == 0.8 and not launch.overrides.get("reset_loss_scale")
    assert "rejected by user:bob: too aggressive" in launch.reason


def test_rejected_without_levers_or_unanswered_under_hold_the_run_holds() -> None:
    rejected = proposed("rejected", decided_by="user:bob", decision_reason="look first")
    [escalate] = [
        a for a in decide(diverged(approvals=LR_GATE, open_decision=rejected), CFG) if isinstance(a, Escalate)
    ]
    assert "rejected by user:bob: look first; the run holds" in escalate.reason
    assert escalate.close_decision is not None and escalate.close_decision.decision_id == 7
    late = proposed("pending", expires_at=NOW - 1)
    [escalate] = [
        a for a in decide(diverged(approvals=LR_GATE, open_decision=late), CFG) if isinstance(a, Escalate)
    ]
    assert "was not answered in time; the run holds" in escalate.reason
    assert escalate.close_decision == CloseDecision(7, "timed_out", escalate.close_decision.note)


def test_unanswered_under_approve_it_carries_the_proposal_out() -> None:
    late = proposed("pending", expires_at=NOW - 1, on_timeout="approve")
    launch = only(decide(diverged(approvals=LR_GATE, open_decision=late), CFG), Launch)
    assert launch.overrides["lr_scale"] == 0.5 and "the policy approves it" in launch.reason
    assert launch.close_decision is not None and launch.close_decision.status_if_pending == "timed_out"


def test_an_approved_restore_point_that_rotted_meanwhile_is_not_restored() -> None:
    answer = proposed("approved", decided_by="user:alice")
    gone = diverged(approvals=LR_GATE, open_decision=answer)
    gone = replace(gone, checkpoints=(ckpt(20), ckpt(40, usable=False), ckpt(50)))
    [escalate] = [a for a in decide(gone, CFG) if isinstance(a, Escalate)]
    assert "no longer intact" in escalate.reason


def test_a_long_rollback_and_a_restart_past_the_budget_can_be_gated_too() -> None:
    far = ApprovalGates(require=frozenset({"long_rollback"}), rollback_steps=10)
    proposal = only(decide(diverged(approvals=far), CFG), ProposeDecision)  # 52 -> 40: 12 steps back
    assert proposal.gates == ("long_rollback",)
    assert only(decide(diverged(approvals=replace(far, rollback_steps=12)), CFG), Launch)
    crashes = tuple(ended("crash", number=n, ago=100 - n, newest=40) for n in range(1, 4))
    spent = run(history=crashes, max_restarts=1)
    assert isinstance(decide(spent, CFG)[0], Escalate)  # no gate: the budget stops the run, as before
    proposal = only(
        decide(replace(spent, approvals=ApprovalGates(require=frozenset({"over_budget"}))), CFG),
        ProposeDecision,
    )
    assert proposal.gates == ("over_budget",) and "restart budget spent" in proposal.reason


def test_an_operators_restart_or_stop_supersedes_the_open_proposal() -> None:
    pending = proposed("pending")
    restart = {"id": "r1", "author": "user:carol", "reason": "by hand"}
    launch = only(
        decide(diverged(approvals=LR_GATE, open_decision=pending, pending_restart=restart), CFG), Launch
    )
    assert launch.close_decision is not None and launch.close_decision.status_if_pending == "superseded"
    acts = decide(diverged(open_decision=pending, desired=DesiredState.stopped), CFG)
    assert acts[0] == CloseDecision(7, "superseded", "superseded: the run was asked to stop")


def retirement(status: str, **kw: Any) -> ObservedDecision:
    return replace(
        proposed(status, **kw),
        id=9,
        gates=("node_retirement",),
        proposal={"action": "retire_hosts", "hosts": ["h3"]},
        action="retire_hosts",
    )


def test_answered_retirements_are_carried_out_or_left_to_an_operator() -> None:
    def carried(d: ObservedDecision) -> list[RetireHosts]:
        return [a for a in decide(run(open_retirements=(d,)), CFG) if isinstance(a, RetireHosts)]

    assert carried(retirement("pending")) == []  # waiting for a human
    [yes] = carried(retirement("approved", decided_by="user:alice"))
    assert (yes.hosts, yes.retire, yes.close.decision_id) == (("h3",), True, 9)
    assert yes.close.note == "approved by user:alice; h3 retired"
    [no] = carried(retirement("rejected", decided_by="user:bob", decision_reason="fan swapped"))
    assert (
        not no.retire
        and no.close.note == "rejected by user:bob: fan swapped; h3 left cordoned for an operator"
    )
    [late] = carried(retirement("pending", expires_at=NOW - 1))
    assert not late.retire  # policy hold
    [late] = carried(retirement("pending", expires_at=NOW - 1, on_timeout="approve"))
    assert late.retire and late.close.note.startswith("unanswered in time; the policy retires them")


def test_a_run_that_ended_closes_its_relaunch_question_but_still_retires_its_lemons() -> None:
    # the run completed (or was stopped) while its questions waited: nothing is left to relaunch, but the
    # lemon's fate does not depend on the run
    approved = retirement("approved", decided_by="user:alice")
    done = run(phase=RunPhase.completed, open_decision=proposed("pending"), open_retirements=(approved,))
    acts = decide(done, CFG)
    assert only(acts, RetireHosts).retire
    assert only(acts, CloseDecision) == CloseDecision(7, "superseded", "superseded: the run completed")
    stopped = replace(done, phase=RunPhase.stopped, desired=DesiredState.stopped)
    acts = decide(stopped, CFG)
    assert only(acts, RetireHosts).retire
    assert only(acts, CloseDecision) == CloseDecision(
        7, "superseded", "superseded: the run was asked to stop"
    )


def answered(proposal: ProposeDecision, status: str, **kw: Any) -> ObservedDecision:
    """The decision the orchestrator recorded for `proposal`, as an operator left it."""
    return ObservedDecision(
        id=11,
        status=status,
        gates=proposal.gates,
        proposal=proposal.proposal,
        expires_at=NOW + 600,
        on_timeout="hold",
        **kw,
    )


def rejected_for(proposal: ProposeDecision, reason: str, **levers: Any) -> ObservedDecision:
    """Bob rejects the proposal, with his own levers or none (the run then holds)."""
    return answered(
        proposal, "rejected", decided_by="user:bob", decision_reason=reason, operator_overrides=levers or None
    )


CLIP_GATE = ApprovalGates(require=frozenset({"clip_change"}), timeout_s=600.0)
SKIPPING = CFG.model_copy(
    update={"remediation": CFG.remediation.model_copy(update={"skip_spike_window": True})}
)
DATA_GATE = ApprovalGates(require=frozenset({"data_skip"}), timeout_s=600.0)


def diverged_twice(**kw: Any) -> ObservedRun:
    """The run's second divergence: OPT's remedy lowers the clip 1.0 -> 0.3 on top of the LR cut."""
    return run(
        history=(
            replace(ended("divergence", number=1, ago=900, onset_step=28, newest=20), last_step=30),
            replace(ended("divergence", number=2, onset_step=48, newest=50), last_step=52),
        ),
        checkpoints=(ckpt(20), ckpt(40), ckpt(50)),
        act_norms=NORMS,
        **kw,
    )


def test_a_gated_clip_change_waits_for_approval_then_launches_the_lowered_clip() -> None:
    assert only(decide(diverged_twice(), CFG), Launch).overrides["clip"] == 0.3  # ungated: at once
    proposal = only(decide(diverged_twice(approvals=CLIP_GATE), CFG), ProposeDecision)
    assert proposal.gates == ("clip_change",)  # the LR cut and the loss-scale reset are not listed
    assert proposal.proposal["overrides"]["clip"] == 0.3 and "gradient clipping 1 -> 0.3" in proposal.reason
    # a first divergence keeps the clip: nothing to approve, it launches at once
    assert only(decide(diverged(approvals=CLIP_GATE), CFG), Launch).close_decision is None

    yes = answered(proposal, "approved", decided_by="user:alice")
    launch = only(decide(diverged_twice(approvals=CLIP_GATE, open_decision=yes), CFG), Launch)
    assert launch.overrides["clip"] == 0.3 and launch.overrides["lr_scale"] == 0.5
    assert launch.close_decision == CloseDecision(11, "timed_out", "approved by user:alice")


def test_a_rejected_clip_change_keeps_the_clip() -> None:
    proposal = only(decide(diverged_twice(approvals=CLIP_GATE), CFG), ProposeDecision)
    levers = rejected_for(proposal, "keep 1.0", lr_scale=0.5)
    launch = only(decide(diverged_twice(approvals=CLIP_GATE, open_decision=levers), CFG), Launch)
    assert launch.overrides["clip"] is None and launch.overrides["lr_scale"] == 0.5
    assert "rejected by user:bob: keep 1.0" in launch.reason
    bare = rejected_for(proposal, "look first")
    [escalate] = [
        a
        for a in decide(diverged_twice(approvals=CLIP_GATE, open_decision=bare), CFG)
        if isinstance(a, Escalate)
    ]
    assert "rejected by user:bob: look first; the run holds" in escalate.reason


def test_a_gated_data_skip_waits_for_approval_then_skips_to_the_onset() -> None:
    assert only(decide(diverged(), SKIPPING), Launch).overrides["skip_batches"] == 8  # ungated: at once
    proposal = only(decide(diverged(approvals=DATA_GATE), SKIPPING), ProposeDecision)
    assert proposal.gates == ("data_skip",)
    assert proposal.proposal["overrides"]["skip_batches"] == 8  # restored at 40, onset at 48
    assert "skipping the 8 batches up to the onset" in proposal.reason
    assert only(decide(diverged(approvals=DATA_GATE), CFG), Launch)  # no skip planned: no question

    yes = answered(proposal, "approved", decided_by="user:alice")
    launch = only(decide(diverged(approvals=DATA_GATE, open_decision=yes), SKIPPING), Launch)
    assert launch.overrides["skip_batches"] == 8 and launch.checkpoint is not None
    assert launch.checkpoint.step == 40
    assert launch.close_decision == CloseDecision(11, "timed_out", "approved by user:alice")


def test_a_rejected_data_skip_replays_the_batches() -> None:
    proposal = only(decide(diverged(approvals=DATA_GATE), SKIPPING), ProposeDecision)
    levers = rejected_for(proposal, "the data is fine", lr_scale=0.5)
    launch = only(decide(diverged(approvals=DATA_GATE, open_decision=levers), SKIPPING), Launch)
    assert not launch.overrides.get("skip_batches") and launch.overrides["lr_scale"] == 0.5
    bare = rejected_for(proposal, "replay it all")
    acts = decide(diverged(approvals=DATA_GATE, open_decision=bare), SKIPPING)
    assert not [a for a in acts if isinstance(a, Launch)] and only(acts, Escalate).close_decision is not None
