"""The operator's job from the `trainops` CLI against a real control plane: runs from YAML checked against the
API's schema, --json everywhere, exit codes per failure, --wait, `runs follow`, diagnostics, logbook dates."""

from __future__ import annotations

import datetime as dt
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.cli import ExitCode
from service.config import DEFAULT_BOOTSTRAP_TOKEN
from service.crud.decisions import propose_decision
from service.crud.runs import active_attempt, create_attempt, end_attempt, get_run, set_run_phase
from service.db import make_engine, make_session_factory, transaction
from service.statemachine import RunPhase
from tests.livesrv import LiveServer

ADMIN = {"Authorization": f"Bearer {DEFAULT_BOOTSTRAP_TOKEN}"}
NO_TRACEBACK = "Traceback"

RUN_YAML = """\
name: opt-yaml
owner: alice
start: false
config:
  preset: tiny
  target_steps: 20
  hang:
    step_floor_s: {floor}
"""


@pytest.fixture
def server(tmp_path: Path) -> Iterator[LiveServer]:
    srv = LiveServer(tmp_path).start()
    try:
        yield srv
    finally:
        srv.stop()


def move_run(server: LiveServer, run_id: int, *phases: RunPhase, attempt: bool = False) -> None:
    """What the orchestrator would do, through the same crud functions, on the server's database."""
    engine = make_engine(f"sqlite:///{server.home / 'trainops.db'}")
    try:
        with transaction(make_session_factory(engine)) as session:
            run = get_run(session, run_id=run_id, for_update=True)
            for phase in phases:
                live = active_attempt(session, run_id=run_id)
                if phase == RunPhase.restarting and live is not None:  # the orchestrator ends it first
                    end_attempt(
                        session,
                        attempt=live,
                        exit_reason="superseded",
                        exit_code=None,
                        last_step=None,
                        steps_lost=None,
                        author="test",
                    )
                if attempt and phase == RunPhase.starting:
                    create_attempt(
                        session,
                        run=run,
                        hosts=["h1"],
                        restored_from_checkpoint_id=None,
                        overrides={},
                        launcher={},
                        start_step=0,
                        author="test",
                    )
                set_run_phase(session, run=run, target=phase, reason=f"test: {phase.value}", author="test")
    finally:
        engine.dispose()


def test_create_from_yaml_checks_the_schema_and_every_answer_has_its_exit_code(
    server: LiveServer, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(RUN_YAML.format(floor=0))
    r = server.cli("runs", "create", "-f", str(bad), check=False)
    assert r.returncode == ExitCode.validation == 65
    assert "config.hang.step_floor_s: Input should be greater than or equal to 5" in r.stderr
    assert NO_TRACEBACK not in r.stderr
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [unclosed\n")
    r = server.cli("runs", "create", "-f", str(broken), check=False)
    assert r.returncode == ExitCode.validation and "not YAML or JSON" in r.stderr, r.stderr

    good = tmp_path / "run.yaml"
    good.write_text(RUN_YAML.format(floor=30))
    run = json.loads(server.cli("runs", "create", "-f", str(good), "--json").stdout)
    assert run["name"] == "opt-yaml" and run["owner"] == "alice" and run["phase"] == "pending"
    assert run["config"]["hang"]["step_floor_s"] == 30 and run["desired_state"] == "stopped"
    config_json = tmp_path / "config.json"
    config_json.write_text(json.dumps({"target_steps": 5}))
    r = server.cli("runs", "create", "opt-json", "--config", str(config_json), "--no-start", "--json")
    assert json.loads(r.stdout)["name"] == "opt-json"

    r = server.cli("runs", "create", "-f", str(good), check=False)  # the name is taken
    assert r.returncode == ExitCode.conflict and "HTTP 409" in r.stderr and "opt-yaml" in r.stderr
    r = server.cli("runs", "show", "99", check=False)
    assert r.returncode == ExitCode.not_found and "HTTP 404" in r.stderr
    r = server.cli("runs", "list", "--phase", "sideways", check=False)  # the server's 422, the same way
    assert r.returncode == ExitCode.validation and "phase" in r.stderr and NO_TRACEBACK not in r.stderr
    r = server.cli("runs", "list", "--token", "tops_wrong", check=False)
    assert r.returncode == ExitCode.forbidden and "HTTP 401" in r.stderr
    server.env["TRAINOPS_TOKEN"] = server.cli("tokens", "create", "--name", "v", "--role", "viewer", "--json")
    server.env["TRAINOPS_TOKEN"] = json.loads(server.env["TRAINOPS_TOKEN"].stdout)["token"]
    r = server.cli("runs", "stop", "1", check=False)  # a viewer may look, not steer
    assert r.returncode == ExitCode.forbidden and "HTTP 403" in r.stderr
    r = server.cli("runs", "list", "--url", "http://127.0.0.1:9", check=False)
    assert (
        r.returncode == ExitCode.unreachable and "cannot reach" in r.stderr and NO_TRACEBACK not in r.stderr
    )
    assert str(ExitCode.unreachable.value) in server.cli("--help").stdout


def test_json_on_mutating_commands_and_the_admin_fallback_is_said(server: LiveServer, tmp_path: Path) -> None:
    r = server.cli("nodes", "register", "gpu-1", "--json")
    assert json.loads(r.stdout)["hostname"] == "gpu-1"
    assert "dev mode: using the bootstrap admin token" in r.stderr  # said, on stderr, once
    assert r.stderr.count("bootstrap admin") == 1
    assert json.loads(server.cli("nodes", "cordon", "gpu-1", "--reason", "xid", "--json").stdout)[
        "state"
    ] == ("cordoned")
    assert json.loads(server.cli("db", "upgrade", "--json").stdout)["revision"] == "head"
    note = json.loads(server.cli("logbook", "--note", "hello", "--json").stdout)
    assert note["message"] == "hello"
    created = json.loads(
        server.cli("tokens", "create", "--name", "op", "--role", "operator", "--json").stdout
    )
    server.env["TRAINOPS_TOKEN"] = created["token"]
    r = server.cli("runs", "list")
    assert "bootstrap admin" not in r.stderr  # a token of one's own: no fallback, no note
    today = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")
    log = server.cli("logbook").stdout
    assert f"{today}T" in log and "Z" in log  # full dates, in UTC, not bare times


def test_wait_reaches_the_state_or_times_out(server: LiveServer, tmp_path: Path) -> None:
    httpx.post(
        f"{server.url}/api/v1/runs",
        json={"name": "w", "owner": "a", "config": {"target_steps": 5}},
        headers=ADMIN,
    ).raise_for_status()
    # No orchestrator serves this control plane: the run never starts.
    r = server.cli("runs", "start", "1", "--wait", "--timeout", "1", check=False)
    assert (
        r.returncode == ExitCode.timeout and "still pending" in r.stderr and "waiting up to 1 s" in r.stderr
    )
    r = server.cli("runs", "stop", "1", "--wait", "--timeout", "10", "--json")  # no attempt: stopped at once
    assert json.loads(r.stdout)["phase"] == "stopped"

    follower = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "runs", "start", "1", "--wait", "--timeout", "30", "--json"],
        env=server.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(1.5)
    move_run(server, 1, RunPhase.starting, RunPhase.running, attempt=True)
    out, err = follower.communicate(timeout=30)
    assert follower.returncode == 0, err
    assert json.loads(out)["phase"] == "running" and "running (attempt 1)" in err

    # restart --wait: running is not enough, it waits for an attempt newer than the one it replaced
    restarter = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "service.cli",
            "runs",
            "restart",
            "1",
            "--reason",
            "spike",
            "--wait",
            "--json",
        ],
        env=server.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert restarter.stderr is not None
    while "waiting up to 600 s" not in restarter.stderr.readline():
        assert restarter.poll() is None
    time.sleep(1.5)
    assert restarter.poll() is None  # still attempt 1, running
    move_run(server, 1, RunPhase.restarting, RunPhase.starting, RunPhase.running, attempt=True)
    out, err = restarter.communicate(timeout=30)
    assert restarter.returncode == 0, err
    assert json.loads(out)["phase"] == "running" and "running (attempt 2)" in err


def test_follow_shows_each_step_until_the_run_ends(server: LiveServer) -> None:
    for name in ("f", "g"):
        httpx.post(
            f"{server.url}/api/v1/runs",
            json={"name": name, "owner": "a", "config": {"target_steps": 5}},
            headers=ADMIN,
        ).raise_for_status()
    move_run(server, 1, RunPhase.starting, RunPhase.running, attempt=True)
    follower = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "runs", "follow", "1", "--interval", "0.2", "--json"],
        env=server.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    points = [{"step": s, "loss": 9.0 - s, "loss_scale": 65536.0, "act_norm": 40.0 + s} for s in range(1, 4)]
    for point in points:
        r = httpx.post(
            f"{server.url}/api/v1/runs/1/metrics", json={"attempt": 1, "points": [point]}, headers=ADMIN
        )
        r.raise_for_status()
        time.sleep(0.3)
    time.sleep(0.5)
    move_run(server, 1, RunPhase.completed)
    out, err = follower.communicate(timeout=30)
    assert follower.returncode == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    seen = [(p["step"], p["loss"], p["loss_scale"], p["act_norm"]) for p in lines if p["type"] == "point"]
    assert seen == [(p["step"], p["loss"], p["loss_scale"], p["act_norm"]) for p in points]
    assert lines[-1]["type"] == "run" and lines[-1]["phase"] == "completed"

    move_run(server, 2, RunPhase.needs_attention)
    r = server.cli("runs", "follow", "2", "--interval", "0.2", check=False)  # plain lines: not a terminal
    assert r.returncode == ExitCode.run_not_completed and "needs_attention" in r.stderr

    # Ctrl-C leaves quietly (the run goes on): a start asked from needs_attention waits for the orchestrator
    waiter = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "runs", "start", "2", "--wait", "--timeout", "60"],
        env=server.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # as from a terminal: a suite started in the background (`make test &`) ignores SIGINT, and Python
        # keeps an inherited SIG_IGN instead of raising KeyboardInterrupt
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert waiter.stderr is not None
    while "waiting up to 60 s" not in waiter.stderr.readline():  # after the dev-mode admin-token note
        assert waiter.poll() is None
    time.sleep(1.5)
    assert waiter.poll() is None  # still needs_attention, as asked: waiting, not failed
    waiter.send_signal(signal.SIGINT)
    _, err = waiter.communicate(timeout=30)
    assert waiter.returncode == 130 and "stopped waiting" in err and NO_TRACEBACK not in err, err


def test_diagnostics_list_and_sweep(server: LiveServer) -> None:
    page = json.loads(server.cli("diagnostics", "list", "--json").stdout)
    assert page["items"] == [] and page["total"] == 0
    r = server.cli("diagnostics", "sweep", "--host", "ghost", check=False)
    assert r.returncode == ExitCode.not_found and "ghost" in r.stderr
    r = server.cli("diagnostics", "sweep", "--check", "no_such_check", check=False)
    assert r.returncode == ExitCode.validation and "unknown checks" in r.stderr  # 65, like a bad --level
    started = json.loads(server.cli("diagnostics", "sweep", "--json").stdout)
    assert started["finished"] is False and started["task_id"]


def test_decisions_list_shows_each_proposals_evidence(server: LiveServer) -> None:
    # on-call, paged, looks at the pending decision from the terminal: what it proposes, and why
    run = httpx.post(
        f"{server.url}/api/v1/runs",
        json={"name": "opt-gated", "owner": "a", "config": {"target_steps": 10}},
        headers=ADMIN,
    ).json()
    engine = make_engine(f"sqlite:///{server.home / 'trainops.db'}")
    try:
        with transaction(make_session_factory(engine)) as session:
            propose_decision(
                session,
                run_id=run["id"],
                gates=["lr_cut"],
                reason="restart after divergence: LR scale 1 -> 0.5",
                proposal={"checkpoint_id": None, "checkpoint_step": 40, "overrides": {"lr_scale": 0.5}},
                evidence={
                    "failure": "divergence",
                    "remediation": ["LR scale 1 -> 0.5"],
                    "rejected_checkpoints": [[50, "after the onset"]],
                },
                timeout_s=600,
                on_timeout="hold",
                author="system:orchestrator",
            )
    finally:
        engine.dispose()
    wide = {**server.env, "COLUMNS": "300"}  # a wide terminal: one line per row
    out = subprocess.run(
        [sys.executable, "-m", "service.cli", "decisions", "list", "--status", "pending"],
        env=wide,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert "evidence" in out
    assert "failure=divergence, remediation=LR scale 1 -> 0.5, rejected_checkpoints=1 item(s)" in out
