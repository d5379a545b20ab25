"""A busy control plane that crashes: eight trainers report, two operators a second ask for restarts, and the
API process is SIGKILLed and started again twice. Afterwards every acknowledged metric is stored exactly
once, and every acknowledged restart was carried out by the orchestrator (the others were answered 409).

The production layout on PostgreSQL: `trainops up` and `trainops orchestrator` as processes, a real
torchrun trainer for the restarted run (issue 12, "a stress test").
"""

from __future__ import annotations

import json
import re
import signal
import threading
import time
from collections import Counter
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from service.db import transaction
from service.models import LogEntry, Metric, Run
from tests.e2e.test_operator_levers_e2e import ProdStack, pages, prod  # noqa: F401 - the fixtures

pytestmark = [pytest.mark.slow, pytest.mark.serial, pytest.mark.postgres]

REPORTERS = 8
POINTS_PER_BATCH = 25
RESTARTS_PER_S = 2.0
KILLS = 2
SECONDS_BETWEEN_KILLS = 5.0


class Reporter(threading.Thread):
    """One trainer's reporter: posts batches of steps for its own attempt and, like trainer/reporting.py,
    sends a batch again until it is acknowledged (ingest is idempotent per run, attempt and step)."""

    def __init__(self, url: str, token: str, run_id: int, attempt: int, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.url, self.run_id, self.attempt, self.stop_event = url, run_id, attempt, stop
        self.headers = {"Authorization": f"Bearer {token}"}
        self.acknowledged: set[int] = set()
        self.server_errors: list[str] = []
        self.refused: list[str] = []

    def run(self) -> None:
        step = 0
        with httpx.Client(timeout=10, headers=self.headers) as client:
            while not self.stop_event.is_set():
                steps = range(step + 1, step + 1 + POINTS_PER_BATCH)
                body = {
                    "attempt": self.attempt,
                    "points": [{"step": s, "loss": 2.0 + s * 1e-4} for s in steps],
                }
                while True:  # the same batch until it is acknowledged
                    try:
                        r = client.post(f"{self.url}/api/v1/runs/{self.run_id}/metrics", json=body)
                    except httpx.HTTPError:
                        time.sleep(0.1)  # the API is down: retry, as the trainer's spool would
                        continue
                    if r.status_code >= 500:
                        self.server_errors.append(f"{r.status_code} {r.text[:200]}")
                        time.sleep(0.1)
                        continue
                    if r.status_code >= 300:
                        self.refused.append(f"{r.status_code} {r.text[:200]}")
                        return
                    self.acknowledged.update(steps)
                    break
                step += POINTS_PER_BATCH
                time.sleep(0.02)


class Operators(threading.Thread):
    """Two on-call engineers asking for restarts, RESTARTS_PER_S in all."""

    def __init__(self, url: str, token: str, run_id: int, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.url, self.run_id, self.stop_event = url, run_id, stop
        self.headers = {"Authorization": f"Bearer {token}"}
        self.answers: list[tuple[int, dict[str, Any]]] = []

    def run(self) -> None:
        i = 0
        with httpx.Client(timeout=10, headers=self.headers) as client:
            while not self.stop_event.wait(1 / RESTARTS_PER_S):
                i += 1
                try:
                    r = client.post(
                        f"{self.url}/api/v1/runs/{self.run_id}/restart",
                        json={"reason": f"stress {i}", "lr_scale": 1.0},
                    )
                except httpx.HTTPError:
                    continue  # not acknowledged: nothing to account for
                self.answers.append((r.status_code, r.json()))


def kill_and_restart_api(stack: ProdStack) -> None:
    api = next(p for p in stack.processes if "up" in p.args)
    api.send_signal(signal.SIGKILL)
    api.wait()
    stack.processes.remove(api)
    stack.serve()


def test_acknowledged_metrics_and_restarts_survive_a_busy_crashing_api(prod: ProdStack) -> None:  # noqa: F811
    prod.cli("db", "upgrade")
    prod.serve()
    operator = prod.cli("tokens", "create", "--bootstrap", "--name", "oncall", "--role", "operator")
    prod.env["TRAINOPS_TOKEN"] = operator.stdout.strip().splitlines()[-1]
    prod.cli("nodes", "register", "gpu-001", "--gpus-from-nvml")
    config = prod.home / "run.json"
    config.write_text(
        json.dumps(
            {
                "preset": "tiny",
                "target_steps": 100000,
                "checkpoint_interval": 5,
                "host_count": 1,
                "hyperparameters": {"threads": 1},
            }
        )
    )
    prod.cli("runs", "create", "restarted", "--config", str(config), "--owner", "alice")
    # The reporters' run: meant to run (a stopped or finished run takes no trainer reports), on more hosts
    # than the fleet has, so the orchestrator waits for hosts and launches nothing for it.
    waiting = prod.home / "waiting.json"
    waiting.write_text(json.dumps({**json.loads(config.read_text()), "host_count": 4}))
    prod.cli("runs", "create", "reported", "--config", str(waiting), "--owner", "alice")
    with transaction(prod.factory) as session:
        ids = dict(session.execute(sa.select(Run.name, Run.id)).all())
    reporter = prod.cli(
        "tokens",
        "create",
        "--bootstrap",
        "--name",
        "reporters",
        "--role",
        "trainer",
        "--run",
        str(ids["reported"]),
    )
    reporter_token = reporter.stdout.strip().splitlines()[-1]
    prod.spawn("orchestrator", "orchestrator")
    prod.wait_for(
        lambda s: s.scalar(sa.select(sa.func.count()).where(Metric.run_id == ids["restarted"])), "training"
    )

    stop = threading.Event()
    reporters = [
        Reporter(prod.url, reporter_token, ids["reported"], n, stop) for n in range(1, REPORTERS + 1)
    ]
    operators = Operators(prod.url, prod.env["TRAINOPS_TOKEN"], ids["restarted"], stop)
    for thread in [*reporters, operators]:
        thread.start()
    for _ in range(KILLS):
        time.sleep(SECONDS_BETWEEN_KILLS)
        kill_and_restart_api(prod)
    time.sleep(SECONDS_BETWEEN_KILLS)
    stop.set()
    for thread in [*reporters, operators]:
        thread.join(60)

    # ---- every acknowledged metric is stored, exactly once ----
    assert all(not r.server_errors and not r.refused for r in reporters), [
        (r.server_errors[:3], r.refused) for r in reporters
    ]
    with transaction(prod.factory) as session:
        rows = session.execute(
            sa.select(Metric.attempt, Metric.step).where(Metric.run_id == ids["reported"])
        ).all()
    stored = Counter((attempt, step) for attempt, step in rows)
    assert max(stored.values()) == 1
    for r in reporters:
        assert r.acknowledged, f"reporter {r.attempt} never got a batch through"
        assert r.acknowledged <= {step for (attempt, step) in stored if attempt == r.attempt}

    # ---- every acknowledged restart was carried out; the others were told 409 ----
    codes = Counter(code for code, _ in operators.answers)
    assert set(codes) <= {200, 409}, operators.answers
    accepted = [body["pending_restart"]["id"] for code, body in operators.answers if code == 200]
    assert accepted and codes[409] > 0, codes
    prod.wait_for(
        lambda s: s.get(Run, ids["restarted"]).pending_restart is None, "the last restart to be carried out"
    )
    with transaction(prod.factory) as session:
        entries = session.scalars(sa.select(LogEntry).where(LogEntry.run_id == ids["restarted"])).all()
        # each accepted request started exactly one attempt (the launch's logbook decision carries it)
        carried_out = [
            e.evidence["pending_restart"]["id"]
            for e in entries
            if re.match(r"attempt \d+: ", e.message) and "pending_restart" in (e.evidence or {})
        ]
    assert sorted(carried_out) == sorted(accepted), (carried_out, accepted)
