"""The run and node state machines refuse what the tables do not allow, whatever the sequence."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.config import Settings
from service.statemachine import (
    NODE_TRANSITIONS,
    RUN_TRANSITIONS,
    TERMINAL_PHASES,
    InvalidTransition,
    NodeState,
    RunPhase,
    check_node_transition,
    check_run_transition,
)

ALLOWED_RUN = {
    ("pending", "starting"),
    ("pending", "needs_attention"),
    ("pending", "stopped"),
    ("pending", "failed"),
    ("starting", "running"),
    ("starting", "restarting"),
    ("starting", "needs_attention"),
    ("starting", "failed"),
    ("starting", "stopped"),
    ("starting", "completed"),
    ("running", "restarting"),
    ("running", "needs_attention"),
    ("running", "completed"),
    ("running", "failed"),
    ("running", "stopped"),
    ("restarting", "starting"),
    ("restarting", "needs_attention"),
    ("restarting", "failed"),
    ("restarting", "stopped"),
    ("needs_attention", "starting"),
    ("needs_attention", "restarting"),
    ("needs_attention", "stopped"),
    ("needs_attention", "failed"),
    ("needs_attention", "completed"),
    ("stopped", "starting"),
    ("stopped", "needs_attention"),
    ("failed", "starting"),
    ("failed", "needs_attention"),
    ("failed", "stopped"),
}


@pytest.mark.parametrize("current", list(RunPhase))
@pytest.mark.parametrize("target", list(RunPhase))
def test_run_transition_table(current: RunPhase, target: RunPhase) -> None:
    if (current.value, target.value) in ALLOWED_RUN:
        check_run_transition(current, target)
    else:
        with pytest.raises(InvalidTransition) as err:
            check_run_transition(current, target)
        assert current.value in str(err.value) and target.value in str(err.value)


def test_an_operator_restart_of_a_live_attempt_goes_through_restarting() -> None:
    with pytest.raises(InvalidTransition, match="'running' to 'starting'"):
        check_run_transition(RunPhase.running, RunPhase.starting)
    check_run_transition(RunPhase.running, RunPhase.restarting)
    check_run_transition(RunPhase.restarting, RunPhase.starting)


def test_every_phase_but_completed_can_be_escalated_and_stopped() -> None:
    for phase in set(RunPhase) - {RunPhase.completed, RunPhase.needs_attention}:
        check_run_transition(phase, RunPhase.needs_attention)
    for phase in set(RunPhase) - {RunPhase.completed, RunPhase.stopped}:
        check_run_transition(phase, RunPhase.stopped)


def test_completed_is_final_and_every_phase_is_reachable() -> None:
    assert RUN_TRANSITIONS[RunPhase.completed] == frozenset()
    reachable = {RunPhase.pending}
    frontier = [RunPhase.pending]
    while frontier:
        for nxt in RUN_TRANSITIONS[frontier.pop()]:
            if nxt not in reachable:
                reachable.add(nxt)
                frontier.append(nxt)
    assert reachable == set(RunPhase)


@given(st.lists(st.sampled_from(list(RunPhase)), max_size=40))
def test_any_sequence_of_requests_leaves_a_valid_history(targets: list[RunPhase]) -> None:
    phase = RunPhase.pending
    history = [phase]
    for target in targets:
        try:
            check_run_transition(phase, target)
        except InvalidTransition:
            continue
        phase = target
        history.append(phase)
    for a, b in itertools.pairwise(history):
        assert b in RUN_TRANSITIONS[a]
    if RunPhase.completed in history:
        assert history[-1] == RunPhase.completed


@given(st.lists(st.sampled_from(list(NodeState)), max_size=40))
def test_a_retired_node_only_comes_back_through_probation(targets: list[NodeState]) -> None:
    state = NodeState.healthy
    for target in targets:
        try:
            check_node_transition(state, target)
        except InvalidTransition:
            continue
        if state == NodeState.retired:
            assert target == NodeState.probation
        state = target
    assert all(s in NODE_TRANSITIONS for s in NodeState)


def test_terminal_phases() -> None:
    assert {RunPhase.completed, RunPhase.failed, RunPhase.stopped} == TERMINAL_PHASES


def test_prod_mode_refuses_the_default_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRAINOPS_MODE", "prod")
    with pytest.raises(ValueError, match="BOOTSTRAP_ADMIN_TOKEN"):
        Settings()
    monkeypatch.setenv("TRAINOPS_BOOTSTRAP_ADMIN_TOKEN", "q7Vd2LxN9rTfKp4mWz8bYc3HsJ6eUa1GvR5tQn0XoEi")
    assert Settings().mode == "prod"


def test_embedded_default_is_sqlite_under_home(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.delenv("TRAINOPS_DATABASE_URL", raising=False)
    monkeypatch.setenv("TRAINOPS_HOME", str(tmp_path / ".trainops"))
    s = Settings()
    assert s.resolved_database_url == f"sqlite:///{(tmp_path / '.trainops' / 'trainops.db').resolve()}"
    assert s.broker_url is None
    monkeypatch.setenv("TRAINOPS_DATABASE_URL", "postgresql+psycopg://u@db/trainops")
    assert Settings().resolved_database_url == "postgresql+psycopg://u@db/trainops"
