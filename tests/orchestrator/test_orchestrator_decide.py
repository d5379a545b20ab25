"""decide() as a table: a run's desired and observed state in, the actions that reconcile them out."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from service.orchestrator.decide import (
    EndAttempt,
    EndedAttempt,
    Escalate,
    Launch,
    MarkFirstStep,
    ObservedAttempt,
    ObservedRun,
    SetPhase,
    WaitForHosts,
    decide,
    failure_of,
)
from service.orchestrator.launchers.base import ProcessStatus
from service.recovery.config import OrchestratorConfig, RemediationConfig, divergence_for_run
from service.recovery.detect import MetricSample, RankBeat
from service.recovery.restart_point import CheckpointCandidate
from service.statemachine import DesiredState, NodeState, RunPhase, check_run_transition

NOW = 10_000.0
CFG = OrchestratorConfig(remediation=RemediationConfig(backoff_base_s=5.0, hosts_wait_s=60.0))
HEALTHY = {"h1": NodeState.healthy, "h2": NodeState.healthy, "h3": NodeState.healthy}


def ckpt(step: int, **kw: Any) -> CheckpointCandidate:
    return CheckpointCandidate(
        id=step,
        step=step,
        path=f"/ck/{step}",
        usable=kw.pop("usable", True),
        loss_scale=kw.pop("loss_scale", 65536.0),
        **kw,
    )


def attempt(state: str = "running", code: int | None = None, **kw: Any) -> ObservedAttempt:
    beats = kw.pop("beats", (RankBeat(0, "h1", 30, NOW - 1), RankBeat(1, "h2", 30, NOW - 1)))
    return ObservedAttempt(
        number=kw.pop("number", 1),
        hosts=("h1", "h2"),
        started_at=NOW - 100,
        world_size=2,
        process=ProcessStatus(state, code),
        beats=beats,
        last_step=kw.pop("last_step", 30),
        first_step_seen=kw.pop("first_step_seen", True),
        **kw,
    )


def run(**kw: Any) -> ObservedRun:
    base = ObservedRun(
        run_id=1,
        name="r",
        desired=DesiredState.running,
        phase=RunPhase.running,
        target_steps=100,
        host_count=2,
        max_restarts=10,
        lr_scale=1.0,
        lr_override=None,
        clip_override=None,
        pending_restart=None,
        now=NOW,
        attempt=None,
        history=(),
        node_states=HEALTHY,
        busy_hosts=frozenset(),
        checkpoints=(),
    )
    return replace(base, **kw)


def ended(outcome: str, *, number: int = 1, ago: float = 100.0, **findings: Any) -> EndedAttempt:
    return EndedAttempt(
        number=number,
        hosts=("h1", "h2"),
        ended_at=NOW - ago,
        outcome=outcome,
        findings=findings,
        newest_checkpoint_step=findings.get("newest"),
    )


def flat_then_blowup(onset: int) -> tuple[MetricSample, ...]:
    pts = [MetricSample(s, 3.0 + 0.01 * (s % 3), 65536.0, 10.0) for s in range(1, onset)]
    pts += [MetricSample(s, 30.0, 65536.0, 500.0) for s in range(onset, onset + 4)]
    return tuple(pts)


def only(actions: list, kind: type) -> Any:
    matching = [a for a in actions if isinstance(a, kind)]
    assert len(matching) == 1, actions
    return matching[0]


def test_stop_kills_the_attempt_then_settles_the_phase() -> None:
    acts = decide(run(desired=DesiredState.stopped, attempt=attempt()), CFG)
    assert acts == [EndAttempt("stopped", "the run was asked to stop", kill=True)]
    assert decide(run(desired=DesiredState.stopped), CFG) == [
        SetPhase(RunPhase.stopped, "stopped as asked; no attempt is running")
    ]
    assert decide(run(desired=DesiredState.stopped, phase=RunPhase.stopped), CFG) == []


def test_first_launch_takes_healthy_hosts_from_scratch() -> None:
    launch = only(decide(run(phase=RunPhase.pending), CFG), Launch)
    assert (
        launch.hosts == ("h1", "h2")
        and launch.checkpoint is None
        and launch.reason == "first launch from scratch"
    )
    assert not launch.deep_check


def test_completion_at_the_target() -> None:
    acts = decide(run(attempt=attempt("exited", 0, last_step=100)), CFG)
    assert [type(a) for a in acts] == [EndAttempt, SetPhase]
    assert acts[0].outcome == "completed" and acts[1].target == RunPhase.completed
    early = only(decide(run(attempt=attempt("exited", 0, last_step=50)), CFG), EndAttempt)
    assert early.outcome == "crash"


@pytest.mark.parametrize(
    ("code", "outcome"),
    [(137, "signal"), (1, "crash"), (42, "divergence"), (43, "divergence"), (2, "config")],
)
def test_exits_end_the_attempt_with_their_class(code: int, outcome: str) -> None:
    end = only(decide(run(attempt=attempt("exited", code)), CFG), EndAttempt)
    assert end.outcome == outcome and end.exit_code == code


def test_a_cordoned_host_in_use_is_a_hardware_failure_and_suspects_get_cordoned() -> None:
    states = {**HEALTHY, "h2": NodeState.suspect}
    end = only(decide(run(attempt=attempt(), node_states=states), CFG), EndAttempt)
    assert end.outcome == "hardware" and end.kill and end.cordon_hosts == ("h2",)
    states = {**HEALTHY, "h2": NodeState.cordoned}
    end = only(decide(run(attempt=attempt(), node_states=states), CFG), EndAttempt)
    assert end.outcome == "hardware" and end.cordon_hosts == ()


def test_stale_heartbeats_are_a_hang() -> None:
    stale = (RankBeat(0, "h1", 30, NOW - 20), RankBeat(1, "h2", 29, NOW - 21))
    end = only(decide(run(attempt=attempt(beats=stale)), CFG), EndAttempt)
    assert end.outcome == "hang" and end.kill and end.blame_hosts == ("h2",)


def test_no_hang_while_the_trainer_shuts_down_after_its_target() -> None:
    done = (RankBeat(0, "h1", 100, NOW - 20), RankBeat(1, "h2", 100, NOW - 20))
    assert decide(run(attempt=attempt(beats=done, last_step=100)), CFG) == []


def test_divergence_in_the_metric_stream_stops_the_attempt() -> None:
    end = only(decide(run(attempt=attempt(samples=flat_then_blowup(40))), CFG), EndAttempt)
    assert end.outcome == "divergence" and end.evidence["onset_step"] == 40


def test_the_loss_scale_floor_exit_is_a_divergence_from_where_the_scale_began_to_fall() -> None:
    # fp16 at OPT's scale 4: clean until step 20, then an overflow every step until the trainer stops at its
    # floor (exit 43). With the orchestrator's own threshold below the trainer's floor, the metrics raise no
    # signal of their own: the exit alone makes it a divergence, whose onset is the scale's first drop.
    scales = [4.0] * 19 + [4.0 / 2**k for k in range(1, 12)]
    samples = tuple(MetricSample(s, 3.0, scale, 10.0) for s, scale in enumerate(scales, start=1))
    cfg = CFG.model_copy(update={"divergence": CFG.divergence.model_copy(update={"min_loss_scale": 1e-6})})
    end = only(decide(run(attempt=attempt("exited", 43, samples=samples, last_step=30)), cfg), EndAttempt)
    assert (
        end.outcome == "divergence" and end.exit_code == 43 and "loss scale reached its floor" in end.reason
    )
    assert end.evidence["onset_step"] == 20 and "signals" not in end.evidence
    # with the default threshold (1.0, OPT's healthy scale) the stream's own signal names the onset
    end = only(decide(run(attempt=attempt("exited", 43, samples=samples, last_step=30)), CFG), EndAttempt)
    assert end.outcome == "divergence" and end.exit_code == 43
    assert end.evidence["onset_step"] == 22 and any("loss scale" in s for s in end.evidence["signals"])
    # no metrics at all: the step after the last one
    end = only(decide(run(attempt=attempt("exited", 43, last_step=30)), cfg), EndAttempt)
    assert end.outcome == "divergence" and end.evidence["onset_step"] == 31


def test_an_fp16_run_stopped_at_its_floor_restarts_from_before_the_collapse_not_before_every_overflow() -> (
    None
):
    """A recorded fp16 run in OPT's format (tests/data/floored_fp16_tiny_seed7_at111.json): transient
    overflows at steps 40, 70 and 100 leave the scale at 0.5 (it would double back after 8192 clean steps),
    then one at every step from 111 until the trainer stops at its floor (exit 43). The run's own rules see
    no signal in the metrics (0.5 is healthy in this format); the divergence starts at the collapse, step
    111, not at the first transient overflow, and the restart takes the checkpoint before it."""
    data = json.loads((Path(__file__).parents[1] / "data" / "floored_fp16_tiny_seed7_at111.json").read_text())
    pts = data["points"]
    samples = tuple(
        MetricSample(p["step"], p["loss"], p["loss_scale"], p["act_norm"], p["actv_norm"]) for p in pts
    )
    own = divergence_for_run(CFG.divergence, run_config={"precision": "fp16"})
    exited = attempt("exited", data["exit_code"], samples=samples, last_step=pts[-1]["step"])
    end = only(decide(run(attempt=exited, divergence=own), CFG), EndAttempt)
    assert end.outcome == "divergence" and end.exit_code == 43 and "signals" not in end.evidence
    assert end.evidence["onset_step"] == 111
    checkpoints = tuple(ckpt(p["step"], loss_scale=p["loss_scale"]) for p in pts if p["step"] % 5 == 0)
    relaunch = run(
        phase=RunPhase.restarting,
        history=(ended("divergence", onset_step=111),),
        checkpoints=checkpoints,
        act_norms={p["step"]: p["actv_norm"] for p in pts},
        divergence=own,
    )
    launch = only(decide(relaunch, CFG), Launch)
    # 105's course to the onset's margin is too short to judge; 100 is the newest healthy one
    assert launch.checkpoint.step == 100 and launch.checkpoint.loss_scale == 0.5, launch.reason
    # the threshold of the 65536 era (1.0) rejects every checkpoint after the third transient overflow
    fixed = only(decide(replace(relaunch, divergence=None), CFG), Launch)
    assert fixed.checkpoint.step == 95 and fixed.checkpoint.loss_scale == 1.0, fixed.reason


def test_first_step_moves_starting_to_running() -> None:
    acts = decide(run(phase=RunPhase.starting, attempt=attempt(first_step_seen=False)), CFG)
    assert acts == [MarkFirstStep(1), SetPhase(RunPhase.running, "attempt 1 made its first step")]


def test_operator_restart_supersedes_then_launches_as_asked() -> None:
    pending = {
        "reason": "spike",
        "author": "user:alice",
        "from_checkpoint_id": 20,
        "skip_batches": 7,
        "reset_loss_scale": True,
    }
    end = only(decide(run(attempt=attempt(), pending_restart=pending), CFG), EndAttempt)
    assert end.outcome == "superseded" and end.kill
    launch = only(
        decide(
            run(
                phase=RunPhase.restarting,
                pending_restart=pending,
                lr_scale=0.5,
                checkpoints=(ckpt(10), ckpt(20), ckpt(30)),
                history=(ended("superseded"),),
            ),
            CFG,
        ),
        Launch,
    )
    assert launch.checkpoint is not None and launch.checkpoint.step == 20 and launch.consume_pending_restart
    assert launch.overrides["skip_batches"] == 7 and launch.overrides["reset_loss_scale"] is True
    assert launch.overrides["lr_scale"] == 0.5


def test_after_a_divergence_restart_from_the_opt_checkpoint_with_a_lower_lr() -> None:
    norms = {s: 10.0 for s in range(1, 60)}
    observed = run(
        history=(ended("divergence", onset_step=48),),
        checkpoints=(ckpt(20), ckpt(40), ckpt(50)),
        act_norms=norms,
    )
    acts = decide(observed, CFG)
    assert isinstance(acts[0], SetPhase) and acts[0].target == RunPhase.restarting
    launch = only(acts, Launch)
    assert launch.checkpoint is not None and launch.checkpoint.step == 40
    assert launch.overrides["lr_scale"] == 0.5 and launch.overrides["reset_loss_scale"] is True
    assert "divergence" in launch.reason and "LR scale 1 -> 0.5" in launch.reason


def test_divergence_with_no_qualifying_checkpoint_escalates() -> None:
    # flat, then +10 %/step from step 21: runaway growth after the only checkpoint
    runaway = {s: 5.0 for s in range(1, 21)} | {s: 5.0 * 1.1 ** (s - 20) for s in range(21, 60)}
    acts = decide(
        run(history=(ended("divergence", onset_step=45),), checkpoints=(ckpt(20),), act_norms=runaway), CFG
    )
    assert isinstance(acts[0], Escalate) and "no checkpoint qualifies" in acts[0].reason


def test_after_a_hardware_failure_relaunch_on_a_spare_with_deep_checks() -> None:
    states = {**HEALTHY, "h2": NodeState.cordoned}
    launch = only(
        decide(
            run(
                phase=RunPhase.restarting,
                history=(ended("hardware"),),
                node_states=states,
                checkpoints=(ckpt(20),),
            ),
            CFG,
        ),
        Launch,
    )
    assert launch.hosts == ("h1", "h3") and launch.deep_check and launch.checkpoint.step == 20


def test_not_enough_hosts_waits_then_escalates() -> None:
    states = {"h1": NodeState.healthy, "h2": NodeState.cordoned}
    observed = run(phase=RunPhase.restarting, history=(ended("hardware"),), node_states=states)
    assert decide(observed, CFG) == [WaitForHosts(2, 1)]
    late = replace(observed, waiting_for_hosts_since=NOW - 61)
    assert isinstance(decide(late, CFG)[0], Escalate)
    busy = run(phase=RunPhase.pending, busy_hosts=frozenset({"h1", "h2"}))
    assert decide(busy, CFG) == [WaitForHosts(2, 1)]


def test_back_off_between_consecutive_failures() -> None:
    recent = run(phase=RunPhase.restarting, history=(ended("crash", ago=2.0),))
    assert decide(recent, CFG) == []
    later = run(phase=RunPhase.restarting, history=(ended("crash", ago=6.0),))
    assert isinstance(decide(later, CFG)[0], Launch)


def test_humans_decide_once_a_run_needs_attention_or_is_done() -> None:
    assert decide(run(phase=RunPhase.needs_attention, history=(ended("crash"),)), CFG) == []
    assert decide(run(phase=RunPhase.completed), CFG) == []
    assert decide(run(phase=RunPhase.failed), CFG) == []


def test_restart_budget_escalates() -> None:
    history = tuple(ended("crash", number=i, ago=100.0 - i, newest=i) for i in range(1, 13))
    acts = decide(run(phase=RunPhase.restarting, history=history, max_restarts=10), CFG)
    assert isinstance(acts[0], Escalate) and "budget" in acts[0].reason


def test_a_node_failure_is_hardware_and_cordons_failed_nodes_still_counted_fit() -> None:
    failed = ProcessStatus("lost", detail="node failure of h2", node_failure=True, failed_hosts=("h2",))
    end = only(decide(run(attempt=replace(attempt(), process=failed)), CFG), EndAttempt)
    assert end.outcome == "hardware" and end.kill and end.cordon_hosts == ("h2",)
    assert end.evidence == {"failed_hosts": ["h2"]}
    # The scheduler sync already cordoned it (Slurm has it DOWN): nothing more to cordon.
    states = {**HEALTHY, "h2": NodeState.cordoned}
    end = only(decide(run(attempt=replace(attempt(), process=failed), node_states=states), CFG), EndAttempt)
    assert end.outcome == "hardware" and end.cordon_hosts == ()


@pytest.mark.parametrize("code", [137, 13])
def test_ranks_that_died_on_a_host_found_unfit_are_a_hardware_failure(code: int) -> None:
    # A GPU that fell off the bus kills its ranks; the sweep has marked the host by the time the loop sees
    # the exit: the crash is the host's, remediated as hardware, and the suspect gets cordoned.
    states = {**HEALTHY, "h2": NodeState.suspect}
    end = only(decide(run(attempt=attempt("exited", code), node_states=states), CFG), EndAttempt)
    assert end.outcome == "hardware" and end.exit_code == code and end.cordon_hosts == ("h2",)
    assert "h2 is suspect" in end.reason and end.evidence["hosts"] == {"h2": "suspect"}
    # A divergence or a bad configuration is the run's own, whatever the hosts.
    for own in (42, 2):
        end = only(decide(run(attempt=attempt("exited", own), node_states=states), CFG), EndAttempt)
        assert end.outcome != "hardware"
    # Hosts the attempt did not use say nothing about it.
    states = {**HEALTHY, "h3": NodeState.cordoned}
    end = only(decide(run(attempt=attempt("exited", code), node_states=states), CFG), EndAttempt)
    assert end.outcome == ("signal" if code == 137 else "crash")


def test_a_crash_on_a_bad_host_after_a_divergence_began_is_a_divergence_and_still_cordons() -> None:
    """chaos: the LR blew up at step 100, then the bad host crashed at 110. Both signals are weighed:
    the restart rolls back past the onset (divergence), and the suspect host is cordoned."""
    samples = flat_then_blowup(30)
    crashed = attempt("exited", 137, samples=samples, last_step=33)
    acts = decide(run(attempt=crashed, node_states={**HEALTHY, "h2": NodeState.suspect}), CFG)
    end = only(acts, EndAttempt)
    assert end.outcome == "divergence" and end.evidence["onset_step"] == 30
    assert end.cordon_hosts == ("h2",) and "killed by signal 9" in end.reason
    assert end.evidence["also"] == "killed by signal 9"
    # a plain crash with clean metrics stays a crash
    clean = attempt("exited", 1, samples=flat_then_blowup(30)[:25], last_step=25)
    assert only(decide(run(attempt=clean), CFG), EndAttempt).outcome == "crash"


def test_a_divergence_from_the_attempts_first_step_is_judged_against_its_lineage() -> None:
    """An attempt restored from a checkpoint that already holds a bad update diverges from its first step:
    against its own stream there is no baseline, against the lineage it resumed from it is plain."""
    history = flat_then_blowup(200)[:100]  # steps 1..100 of earlier attempts, healthy
    blown = tuple(MetricSample(s, 9.0, 65536.0, 98.0 * 1.6 ** (s - 100)) for s in range(101, 115))
    alone = attempt(samples=blown, last_step=114, number=2)
    # alone, the baseline is made of diverging steps: seen late, if at all, and the onset is misplaced
    late = [a for a in decide(run(attempt=alone, target_steps=200), CFG) if isinstance(a, EndAttempt)]
    assert not late or late[0].evidence["onset_step"] > 105
    with_lineage = replace(alone, lineage=history)
    end = only(decide(run(attempt=with_lineage, target_steps=200), CFG), EndAttempt)
    assert end.outcome == "divergence" and end.evidence["onset_step"] == 101
    # and the next launch does not restore the checkpoint of step 100: it holds step 100's update, which
    # produced the first bad reading at 101
    choice = decide(
        run(
            history=(ended("divergence", number=2, onset_step=101),),
            checkpoints=(ckpt(90), ckpt(95), ckpt(100)),
            act_norms={s.step: s.act_norm for s in history if s.act_norm is not None},
        ),
        CFG,
    )
    launch = only(choice, Launch)
    assert launch.checkpoint == ckpt(90)
    rejected = dict(launch.evidence["rejected_checkpoints"])
    assert "step 100's update was already bad" in rejected[100]
    assert "unknown yet (4 / 5" in rejected[95]  # 96..99: the onset's margin leaves too few steps


# ---- operator levers in every phase ----------------------------------------------------------------

PENDING_RESTART = {"reason": "loss spike", "author": "user:oncall", "from_checkpoint_id": None}
# the phases in which an attempt can be active
LIVE_PHASES = (RunPhase.starting, RunPhase.running, RunPhase.needs_attention)


def phases_through(observed: ObservedRun, actions: list) -> list[RunPhase]:
    """The run phases `Orchestrator.apply` moves through for `actions`, each step checked against the
    state machine (raises InvalidTransition where apply would)."""
    path = [observed.phase]

    def move(target: RunPhase) -> None:
        if path[-1] != target:
            check_run_transition(path[-1], target)
            path.append(target)

    for action in actions:
        if isinstance(action, SetPhase):
            move(action.target)
        elif isinstance(action, EndAttempt):
            if action.outcome == "stopped":
                move(RunPhase.stopped)
            elif failure_of(action.outcome) is not None and path[-1] in (RunPhase.running, RunPhase.starting):
                move(RunPhase.restarting)
        elif isinstance(action, Launch):
            move(RunPhase.starting)
        elif isinstance(action, Escalate):
            move(RunPhase.needs_attention)
    return path


@pytest.mark.parametrize("phase", LIVE_PHASES)
def test_an_operator_restart_ends_a_live_attempt_and_goes_through_restarting(phase: RunPhase) -> None:
    observed = run(phase=phase, attempt=attempt(), pending_restart=PENDING_RESTART)
    acts = decide(observed, CFG)
    assert [type(a) for a in acts] == [EndAttempt, SetPhase]
    assert acts[0].outcome == "superseded" and acts[0].kill
    assert phases_through(observed, acts)[-1] == RunPhase.restarting


@pytest.mark.parametrize(
    ("phase", "last_outcome"),
    [
        (RunPhase.restarting, "superseded"),  # the usual: the pass after the supersede
        (RunPhase.running, "superseded"),  # an orchestrator that died between the two passes
        (RunPhase.restarting, "crash"),  # in back-off after a crash: the operator does not wait
        (RunPhase.needs_attention, "crash"),  # the orchestrator gave up; the operator restarts
        (RunPhase.stopped, "stopped"),
        (RunPhase.failed, "crash"),
        (RunPhase.pending, None),
    ],
)
def test_an_operator_restart_launches_from_every_phase_with_its_overrides(
    phase: RunPhase, last_outcome: str | None
) -> None:
    history = (ended(last_outcome, ago=0.5),) if last_outcome else ()
    observed = run(
        phase=phase,
        pending_restart=PENDING_RESTART,
        lr_scale=0.5,
        clip_override=0.3,
        history=history,
        checkpoints=(ckpt(10), ckpt(20)),
    )
    acts = decide(observed, CFG)
    launch = only(acts, Launch)
    assert launch.consume_pending_restart and launch.checkpoint == ckpt(20)
    assert launch.overrides["lr_scale"] == 0.5 and launch.overrides["clip"] == 0.3
    assert launch.reason.startswith("operator restart (user:oncall): loss spike")
    assert phases_through(observed, acts)[-1] == RunPhase.starting


def test_start_of_a_stopped_run_resumes_it_with_its_standing_overrides() -> None:
    observed = run(
        phase=RunPhase.stopped,
        lr_scale=0.5,
        clip_override=0.3,
        history=(ended("superseded", number=1), ended("stopped", number=2)),
        checkpoints=(ckpt(10), ckpt(20, usable=False, unusable_reason="torn"), ckpt(14)),
    )
    acts = decide(observed, CFG)
    launch = only(acts, Launch)
    assert launch.checkpoint == ckpt(14) and launch.reason == "resuming from checkpoint step 14"
    assert launch.overrides == {"lr_scale": 0.5, "lr": None, "clip": 0.3}
    assert not launch.consume_pending_restart
    assert phases_through(observed, acts) == [RunPhase.stopped, RunPhase.starting]
    # asked to stay stopped, it does
    assert decide(replace(observed, desired=DesiredState.stopped), CFG) == []


@pytest.mark.parametrize("phase", [p for p in RunPhase if p != RunPhase.completed])
def test_stop_settles_every_phase_in_stopped(phase: RunPhase) -> None:
    live = phase in LIVE_PHASES
    observed = run(phase=phase, desired=DesiredState.stopped, attempt=attempt() if live else None)
    acts = decide(observed, CFG)
    assert phases_through(observed, acts)[-1] == RunPhase.stopped
    if live:
        assert acts == [EndAttempt("stopped", "the run was asked to stop", kill=True)]


@pytest.mark.parametrize(
    ("phase", "live"),
    [(p, False) for p in RunPhase if p != RunPhase.completed] + [(p, True) for p in LIVE_PHASES],
)
@pytest.mark.parametrize("desired", list(DesiredState))
@pytest.mark.parametrize("pending", [None, PENDING_RESTART])
@pytest.mark.parametrize("last_outcome", [None, "superseded", "stopped", "crash", "divergence", "config"])
def test_no_decision_asks_for_a_transition_the_state_machine_refuses(
    phase: RunPhase, live: bool, desired: DesiredState, pending: dict | None, last_outcome: str | None
) -> None:
    observed = run(
        phase=phase,
        desired=desired,
        pending_restart=pending,
        attempt=attempt(first_step_seen=False) if live else None,
        history=(ended(last_outcome, ago=1000.0, onset_step=25),) if last_outcome else (),
        checkpoints=(ckpt(10), ckpt(20)),
        act_norms={s: 10.0 for s in range(1, 30)},
    )
    phases_through(observed, decide(observed, CFG))  # raises InvalidTransition on a refused step


def _hang_on(hosts: tuple[str, ...], behind: set[str], pool: int) -> EndAttempt:
    """A hang of an attempt on `hosts` (one rank each) in a pool of `pool` healthy hosts, the ranks on the
    `behind` hosts a step behind the others."""
    beats = tuple(RankBeat(r, h, 29 if h in behind else 30, NOW - 20) for r, h in enumerate(hosts))
    hung = replace(attempt(beats=beats), hosts=hosts, world_size=len(hosts))
    states = {f"h{i}": NodeState.healthy for i in range(1, pool + 1)}
    return only(decide(run(attempt=hung, node_states=states, host_count=len(hosts)), CFG), EndAttempt)


def test_a_hang_blames_the_lagging_hosts_only_as_far_as_the_pool_can_replace_them() -> None:
    hosts = tuple(f"h{i}" for i in range(1, 17))  # 16 hosts in use, 2 spares
    one_behind = _hang_on(hosts, {"h7"}, pool=18)
    assert one_behind.outcome == "hang" and one_behind.blame_hosts == ("h7",)
    assert "blame_withheld" not in one_behind.evidence
    # a stall that leaves 6 hosts a step behind (a fabric, or late beats) does not point at those hosts:
    # blaming them would leave the run 4 hosts short; it restarts where it was, and says why
    wide = _hang_on(hosts, {f"h{i}" for i in range(3, 9)}, pool=18)
    assert wide.outcome == "hang" and wide.kill and wide.blame_hosts == ()
    withheld = wide.evidence["blame_withheld"]
    assert withheld["behind_hosts"] == 6 and withheld["spare_hosts"] == 2
    assert withheld["first_behind"] == ["h3", "h4", "h5", "h6", "h7", "h8"]
    # one host behind is blamed even with no spare (the run waits for one deep check); two are not
    assert _hang_on(hosts, {"h7"}, pool=16).blame_hosts == ("h7",)
    assert _hang_on(hosts, {"h7", "h9"}, pool=16).blame_hosts == ()


def test_a_run_that_diverged_in_its_last_steps_is_not_handed_over_as_completed() -> None:
    """The LR blew up at step 30 of a 33-step run; the trainer reached the target and exited 0 before a pass
    judged those steps. Its final weights are the diverged ones: the attempt ends as a divergence (rolled
    back past the onset, remediated), not `completed`. Clean final metrics still complete the run."""
    diverged = attempt("exited", 0, samples=flat_then_blowup(30), last_step=33)
    acts = decide(run(attempt=diverged, target_steps=33), CFG)
    end = only(acts, EndAttempt)
    assert end.outcome == "divergence" and end.evidence["onset_step"] == 30
    assert end.evidence["also"] == "exited 0 at the target" and not any(isinstance(a, SetPhase) for a in acts)
    clean = attempt("exited", 0, samples=flat_then_blowup(30)[:25], last_step=25)
    acts = decide(run(attempt=clean, target_steps=25), CFG)
    assert only(acts, EndAttempt).outcome == "completed" and only(acts, SetPhase).target == RunPhase.completed
