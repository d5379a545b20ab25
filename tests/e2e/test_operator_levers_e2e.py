"""The operator's levers in the production layout, driven as the README says.

PostgreSQL, prod mode, `trainops db upgrade`, `trainops up --no-orchestrator`, one `trainops orchestrator`
process, the first token made with `trainops tokens create --bootstrap`, hosts registered with `trainops nodes
register`, the run created, restarted, stopped and started with the CLI; real torchrun attempts. Each lever is
checked where it shows: the new attempt, its recorded overrides, and the LR and clip the trainer reports.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from service.crud.runs import create_run
from service.db import make_engine, make_session_factory, transaction
from service.models import Attempt, Checkpoint, LogEntry, Metric, Run
from service.orchestrator.launchers.local import LocalLauncher
from trainer.schedule import LRSchedule

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

REPO = Path(__file__).resolve().parents[2]
# Prod mode wants a random token of at least 32 characters (secrets.token_urlsafe(32) makes one like it).
BOOTSTRAP_SECRET = "q7Vd2LxN9rTfKp4mWz8bYc3HsJ6eUa1GvR5tQn0XoEi"
CRASH_STEP = 80  # attempt 3 crashes here (a crash, within budget: the run waits in `restarting`)
CONFIG_EXIT_STEP = 120  # attempt 4 exits with the trainer's config code here (the run needs attention)


class PageSink:
    """The on-call webhook (TRAINOPS_PAGE_WEBHOOK_URL): records what the orchestrator pages."""

    def __init__(self) -> None:
        self.pages: list[dict[str, Any]] = []
        pages = self.pages

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                pages.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/page"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


class ProdStack:
    def __init__(self, home: Path, database_url: str, pages: PageSink) -> None:
        from tests.livesrv import free_port

        self.home = home
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        orchestrator_config = home / "orchestrator.json"
        orchestrator_config.write_text(
            json.dumps(
                {
                    "loop_interval_s": 0.5,
                    "hang_timeout_s": 60,  # two cores shared with other tests: steps can stall
                    "failing_pass_limit": 3,
                    "failing_pass_backoff_max_s": 2,
                    # a crashed attempt waits 10 minutes: the operator's restart does not
                    "remediation": {"backoff_base_s": 600, "backoff_max_s": 600},
                }
            )
        )
        fake_nvml = home / "fake-nvml.json"
        fake_nvml.write_text(json.dumps({"default_gpus": 2, "hosts": {}}))
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINOPS_")}
        self.env.update(
            TRAINOPS_MODE="prod",
            TRAINOPS_BOOTSTRAP_ADMIN_TOKEN=BOOTSTRAP_SECRET,
            TRAINOPS_DATABASE_URL=database_url,
            TRAINOPS_HOME=str(home),
            TRAINOPS_API_PORT=str(port),
            TRAINOPS_API_URL=self.url,
            TRAINOPS_ORCHESTRATOR_CONFIG=str(orchestrator_config),
            TRAINOPS_PAGE_WEBHOOK_URL=pages.url,
            TRAINOPS_FAKE_NVML=str(fake_nvml),
            PYTHONPATH=str(REPO),
            OMP_NUM_THREADS="1",
        )
        self.engine = make_engine(database_url)
        self.factory = make_session_factory(self.engine)
        self.processes: list[subprocess.Popen[bytes]] = []

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [sys.executable, "-m", "service.cli", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"trainops {' '.join(args)} failed: {result.stdout}{result.stderr}")
        return result

    def spawn(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        log = open(self.home / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child process
        proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", *args], env=self.env, stdout=log, stderr=subprocess.STDOUT
        )
        self.processes.append(proc)
        return proc

    def serve(self) -> None:
        """`trainops up --no-orchestrator` until it answers /readyz."""
        import httpx

        api = self.spawn("api", "up", "--no-orchestrator", "--quick-interval", "0")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert api.poll() is None, (self.home / "api.log").read_text()[-3000:]
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError("the control plane did not become ready")

    def wait_for(self, predicate: Callable[[Session], object], what: str, timeout_s: float = 240.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with transaction(self.factory) as session:
                if predicate(session):
                    return
            for proc in self.processes:
                assert proc.poll() is None, f"{proc.args} exited: {self.logs()}"
            time.sleep(0.3)
        raise AssertionError(f"timed out waiting for {what}: {self.logs()}")

    def logs(self) -> str:
        return "".join(f"\n--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.home.glob("*.log")))

    def close(self) -> None:
        # Trainers run in sessions of their own (they outlive an orchestrator restart): end them first.
        with transaction(self.factory) as session:
            infos = [dict(a.launcher) for a in session.scalars(sa.select(Attempt)) if a.launcher]
        for proc in self.processes:
            proc.terminate()
        for info in infos:
            if "tag" in info:
                LocalLauncher().kill(info, grace_s=2.0)
        for proc in self.processes:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.engine.dispose()


@pytest.fixture
def pages() -> Iterator[PageSink]:
    sink = PageSink()
    yield sink
    sink.close()


@pytest.fixture
def prod(tmp_path: Path, postgres_url: str, pages: PageSink) -> Iterator[ProdStack]:
    stack = ProdStack(tmp_path, postgres_url, pages)
    try:
        yield stack
    finally:
        stack.close()


def attempts_of(session: Session, run_id: int) -> list[Attempt]:
    return list(session.scalars(sa.select(Attempt).where(Attempt.run_id == run_id).order_by(Attempt.number)))


def attempt_reported(session: Session, run_id: int, number: int, steps: int = 2) -> bool:
    """Attempt `number` exists and its trainer has reported `steps` steps."""
    count = session.scalar(
        sa.select(sa.func.count()).where(Metric.run_id == run_id, Metric.attempt == number)
    )
    return (count or 0) >= steps


def base_schedule(run_dir: Path) -> dict[str, Any]:
    """The LR schedule the trainer saved with its checkpoints (peak LR, warm-up, length; scale aside)."""
    for _ in range(50):  # retention may delete a checkpoint while we read it
        for meta in sorted((run_dir / "checkpoints").glob("step_*/meta.json"), reverse=True):
            try:
                return {k: v for k, v in json.loads(meta.read_text())["schedule"].items() if k != "scale"}
            except (OSError, ValueError):
                continue
        time.sleep(0.2)
    raise AssertionError(f"no checkpoint metadata under {run_dir}")


def check_levers(
    session: Session, run_id: int, number: int, *, lr_scale: float, clip: float, schedule: dict[str, Any]
) -> Attempt:
    """Attempt `number` carries the overrides and its trainer trained with them (reported LR and clip)."""
    attempt = attempts_of(session, run_id)[number - 1]
    assert attempt.number == number
    assert attempt.overrides["lr_scale"] == lr_scale and attempt.overrides["clip"] == clip, attempt.overrides
    rows = session.execute(
        sa.select(Metric.step, Metric.lr, Metric.clip, Metric.values).where(
            Metric.run_id == run_id, Metric.attempt == number
        )
    ).all()
    assert rows
    expected = LRSchedule(**schedule, scale=lr_scale)
    for row in rows:
        assert row.clip == pytest.approx(clip), (number, row.step, row.clip)
        assert row.lr == pytest.approx(expected.lr_at(row.step), rel=1e-6), (number, row.step, row.lr)
    first = min(rows, key=lambda r: r.step)
    assert first.values["override_lr_scale"] == lr_scale and first.values["override_clip"] == clip
    return attempt


def test_restart_stop_and_start_work_in_every_phase_in_the_production_layout(
    prod: ProdStack, pages: PageSink
) -> None:
    # ---- the README's production steps ----
    prod.cli("db", "upgrade")
    prod.serve()
    # prod mode: no silent fallback to the bootstrap token ...
    refused = prod.cli("runs", "list", check=False)
    assert refused.returncode != 0 and "401" in refused.stderr, refused.stderr
    # ... the first token is made with it, explicitly
    created = prod.cli("tokens", "create", "--bootstrap", "--name", "oncall", "--role", "operator")
    prod.env["TRAINOPS_TOKEN"] = created.stdout.strip().splitlines()[-1]
    prod.cli("nodes", "register", "gpu-001", "--gpus-from-nvml", "--label", "rack=r1")
    prod.cli("nodes", "register", "gpu-002", "--gpus-from-nvml", "--label", "rack=r1")
    nodes = json.loads(prod.cli("nodes", "list", "--json").stdout)["items"]
    assert [(n["hostname"], n["state"], len(n["gpus"])) for n in nodes] == [
        ("gpu-001", "healthy", 2),
        ("gpu-002", "healthy", 2),
    ]
    prod.spawn("orchestrator", "orchestrator")

    # A run left by a control plane that had Slurm: every pass of it fails here; it must not loop silently.
    with transaction(prod.factory) as session:
        orphan_id = create_run(
            session,
            name="slurm-era",
            owner="test",
            config={"preset": "tiny", "target_steps": 5, "host_count": 1, "launcher": "slurm"},
            start=True,
            author="test",
        ).id

    config = prod.home / "run.json"
    config.write_text(
        json.dumps(
            {
                "preset": "tiny",
                "target_steps": 1000,
                "checkpoint_interval": 2,
                "host_count": 1,
                "hyperparameters": {"threads": 1},
                "faults": [
                    f"3:crash:step={CRASH_STEP},rank=0,code=13",
                    f"4:crash:step={CONFIG_EXIT_STEP},rank=0,code=2",
                ],
            }
        )
    )
    prod.cli("runs", "create", "levers", "--config", str(config), "--owner", "alice")
    with transaction(prod.factory) as session:
        run_id = session.scalar(sa.select(Run.id).where(Run.name == "levers"))
    run_dir = prod.home / "runs" / "levers"

    def newest_checkpoint(session: Session) -> int:
        return session.scalar(sa.select(sa.func.max(Checkpoint.step)).where(Checkpoint.run_id == run_id)) or 0

    def phase_is(*phases: str) -> Callable[[Session], bool]:
        return lambda session: session.get(Run, run_id).phase.value in phases

    # ---- restart of a running run ----
    prod.wait_for(
        lambda s: phase_is("running")(s) and newest_checkpoint(s) >= 4 and attempt_reported(s, run_id, 1, 4),
        "attempt 1 to run and checkpoint",
    )
    schedule = base_schedule(run_dir)
    prod.cli("runs", "restart", str(run_id), "--reason", "loss spike", "--lr-scale", "0.5", "--clip", "0.3")
    prod.wait_for(lambda s: attempt_reported(s, run_id, 2), "attempt 2 to train")
    with transaction(prod.factory) as session:
        first, second = attempts_of(session, run_id)[:2]
        assert first.exit_reason == "superseded"
        assert second.restored_from_checkpoint_id is not None and second.start_step >= 4
        check_levers(session, run_id, 2, lr_scale=0.5, clip=0.3, schedule=schedule)
        assert session.get(Run, run_id).phase.value in ("starting", "running")

    # ---- stop of a running run, start of the stopped run ----
    prod.cli("runs", "stop", str(run_id), "--reason", "maintenance")
    prod.wait_for(phase_is("stopped"), "the run to stop")
    with transaction(prod.factory) as session:
        assert [a.exit_reason for a in attempts_of(session, run_id)] == ["superseded", "stopped"]
        assert newest_checkpoint(session) < CRASH_STEP, "attempt 3 must resume before its crash step"
    prod.cli("runs", "start", str(run_id))
    prod.wait_for(lambda s: attempt_reported(s, run_id, 3), "attempt 3 to train")
    with transaction(prod.factory) as session:
        third = check_levers(session, run_id, 3, lr_scale=0.5, clip=0.3, schedule=schedule)  # standing
        assert third.restored_from_checkpoint_id is not None

    # ---- restart of a restarting run (a crash, in back-off) ----
    prod.wait_for(phase_is("restarting"), f"attempt 3 to crash at step {CRASH_STEP}")
    with transaction(prod.factory) as session:
        assert attempts_of(session, run_id)[2].exit_reason == "crash"
        assert len(attempts_of(session, run_id)) == 3  # the back-off holds the relaunch
    prod.cli("runs", "restart", str(run_id), "--reason", "do not wait", "--lr-scale", "0.25")
    prod.wait_for(lambda s: attempt_reported(s, run_id, 4), "attempt 4 to train")
    with transaction(prod.factory) as session:
        check_levers(session, run_id, 4, lr_scale=0.25, clip=0.3, schedule=schedule)

    # ---- restart of a run that needs attention ----
    prod.wait_for(phase_is("needs_attention"), f"attempt 4's config exit at step {CONFIG_EXIT_STEP}")
    prod.wait_for(lambda s: any(p["run_id"] == run_id for p in pages.pages), "the page")
    prod.cli("runs", "restart", str(run_id), "--reason", "config checked", "--clip", "0.5")
    prod.wait_for(lambda s: attempt_reported(s, run_id, 5), "attempt 5 to train")
    with transaction(prod.factory) as session:
        check_levers(session, run_id, 5, lr_scale=0.25, clip=0.5, schedule=schedule)
        assert session.get(Run, run_id).phase.value in ("starting", "running")

    # ---- stop again: every attempt has ended ----
    prod.cli("runs", "stop", str(run_id), "--reason", "test over")
    prod.wait_for(phase_is("stopped"), "the run to stop again")
    with transaction(prod.factory) as session:
        outcomes = [(a.exit_reason, a.exit_code) for a in attempts_of(session, run_id)]
        log = list(
            session.scalars(
                sa.select(LogEntry.message).where(LogEntry.run_id == run_id).order_by(LogEntry.id)
            )
        )
    assert [o for o, _ in outcomes] == ["superseded", "stopped", "crash", "config", "stopped"], outcomes
    launches = [m for m in log if m.startswith("attempt ") and ": operator restart (user:oncall)" in m]
    assert [m.split(":")[0] for m in launches] == ["attempt 2", "attempt 4", "attempt 5"], log
    assert "InvalidTransition" not in (prod.home / "orchestrator.log").read_text()

    # ---- the run whose passes kept failing: needs attention, with the error, and was paged ----
    prod.wait_for(lambda s: s.get(Run, orphan_id).phase.value == "needs_attention", "the orphan's escalation")
    page = next(p for p in pages.pages if p["run_id"] == orphan_id)
    assert "launcher 'slurm'" in page["evidence"]["error"] and page["evidence"]["failed_passes"] == 3
