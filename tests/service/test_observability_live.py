"""End to end: a real control plane fed with three short runs, a fleet and diagnostics, scraped by a real
Prometheus; every dashboard query and every alert rule is evaluated through Prometheus's HTTP API.

What the API cannot write yet (attempts, run phases, diagnostics: the orchestrator's and the health
layer's work) is written with the same crud functions those components use, into the server's database.
The orchestrator and a Celery worker are stood in for by processes updating their instruments in a
multiprocess directory served by ``python -m service.observability``, as in docker-compose.yml.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
import yaml
from celery import Celery

from service.crud import diagnostics as diag_crud
from service.crud import runs as runs_crud
from service.db import make_engine, make_session_factory, transaction
from service.models import Checkpoint, Heartbeat, Node, Run
from service.statemachine import DiagnosticStatus, RunPhase
from tests.conftest import ADMIN_HEADERS
from tests.livesrv import LiveServer, free_port
from trainer.contract import TRAINER_SIGNAL_VALUES

# Needs Redis and Debian's `prometheus` package, both provided by make test (.ci/prepare-machine).
pytestmark = pytest.mark.redis

REPO = Path(__file__).resolve().parents[2]
PROM_DIR = REPO / "dashboards" / "prometheus"
GRAFANA_DIR = REPO / "dashboards" / "grafana"
HEALTHY, STALLED, ATTENTION = "opt-healthy", "opt-stalled", "opt-attention"

# Per alert: the label sets it must return in this scenario, and its signal (the expression without its
# threshold) with the entities that signal must also show, proving the others stay quiet *because* of
# the threshold and not for want of data.
RULE_EXPECTATIONS: dict[str, tuple[list[dict[str, str]], str, set[str]]] = {
    "RunNeedsAttention": ([{"run": ATTENTION}], "trainops_run_phase", {HEALTHY, STALLED, ATTENTION}),
    "RunRestartLoop": ([{"run": ATTENTION}], "trainops_run_budgeted_restarts", {HEALTHY, STALLED, ATTENTION}),
    "RunStalled": (
        [{"run": STALLED}],
        "time() - trainops_run_last_step_timestamp_seconds",
        {HEALTHY, STALLED},
    ),
    "HeartbeatMissing": (
        [{"run": STALLED}],
        "time() - trainops_run_heartbeat_timestamp_seconds",
        {HEALTHY, STALLED},
    ),
    "LossScaleCollapse": ([{"run": STALLED}], "trainops_run_loss_scale", {HEALTHY, STALLED, ATTENTION}),
    "ActivationNormRunaway": (
        [{"run": ATTENTION}],
        "trainops_run_final_layer_activation_norm",
        {HEALTHY, STALLED, ATTENTION},
    ),
    "CheckpointStale": (
        [{"run": STALLED}],
        "time() - trainops_run_last_checkpoint_timestamp_seconds",
        {HEALTHY, STALLED},
    ),
    "NodeCordoned": ([{"node": "node-2"}], "trainops_node_state", {"node-1", "node-2", "node-3"}),
    "GPUXidError": (
        [{"node": "node-3", "gpu": "1", "reason": "xid_48"}],
        "trainops_gpu_xid_errors_total",
        set(),
    ),
    "GPUEccDoubleBitError": (
        [{"node": "node-3", "gpu": "1"}],
        "trainops_gpu_ecc_uncorrected_errors_total",
        {"node-1", "node-3"},
    ),
    "DiagnosticsWorkerDown": ([], "time() - trainops_diagnostics_last_result_timestamp_seconds", set()),
    "ControlPlaneDown": ([], 'up{job="trainops-api"}', set()),
    "OrchestratorPassesFailing": ([], "trainops_orchestrator_failed_passes_total", set()),
    # the stand-in orchestrator holds no lock on the SQLite database: nobody leads, the alert fires
    "OrchestratorLeaderMissing": ([{}], "trainops_orchestrators", set()),
    # no proposal waits: quiet, though every run shows its (zero) count
    "DecisionAwaitingApproval": ([], "trainops_run_decisions_pending", {HEALTHY, STALLED, ATTENTION}),
    # the stand-in orchestrator finishes passes and does not lead: quiet
    "OrchestratorLoopStalled": ([], "trainops_orchestrator_loop_duration_seconds_count", set()),
    "ControlPlaneDatabaseDown": ([], "trainops_control_plane_database_up", set()),
}

STAND_IN = """
import random, sys, time
from service import metrics
kind = sys.argv[1]
deadline = time.time() + float(sys.argv[2])
while time.time() < deadline:
    if kind == "orchestrator":
        metrics.ORCHESTRATOR_LOOP_DURATION.observe(random.uniform(0.01, 0.2))
        metrics.ORCHESTRATOR_FAILED_PASSES.labels("observe", "true").inc(0)  # the series, at 0: quiet
    else:
        check = random.choice(["nvml.ecc", "nvml.xid", "nvml.thermal"])
        status = random.choice(["passed", "passed", "failed"])
        metrics.HEALTH_CHECKS.labels(check, status).inc()
        metrics.HEALTH_CHECK_DURATION.labels(check, status).observe(random.uniform(0.01, 2.0))
        metrics.HEALTH_TASK_DURATION.labels("health.run_checks", "ok").observe(random.uniform(0.1, 3.0))
    time.sleep(0.1)
"""


class Feeder(threading.Thread):
    """A trainer's reporting loop: one step, one heartbeat per rank every 0.2 s (activation norm settable)."""

    def __init__(self, url: str, run_id: int, token: str, *, attempt: int, loss_scale: float) -> None:
        super().__init__(daemon=True)
        self.client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=10)
        self.run_id = run_id
        self.attempt = attempt
        self.loss_scale = loss_scale
        self.act_norm = 40.0
        self.step = 0
        self.stop_event = threading.Event()
        self.errors: list[str] = []

    def run(self) -> None:
        while not self.stop_event.is_set():
            self.step += 1
            point: dict[str, Any] = {
                "step": self.step,
                "tokens": self.step * 4096,
                "loss": 6.0 - 0.01 * self.step,
                "grad_norm": 0.8,
                "loss_scale": self.loss_scale,
                "act_norm": self.act_norm,
                "lr": 6e-4,
                "clip": 1.0,
                "tokens_per_s": 12000.0,
                "tflops_per_gpu": 0.3,
                "step_time_s": 0.2,
                "actv_norm": 0.95 * self.act_norm,
                "values": {
                    # every training signal a CUDA run reports (docs/reporting-contract.md)
                    **dict.fromkeys(TRAINER_SIGNAL_VALUES, 0.5),
                    "mfu": 0.01,
                    **({"val_loss": 5.5} if self.step % 5 == 0 else {}),
                },
            }
            responses = [
                self.client.post(
                    f"/api/v1/runs/{self.run_id}/metrics", json={"attempt": self.attempt, "points": [point]}
                )
            ]
            for rank in (0, 1):
                responses.append(
                    self.client.post(
                        f"/api/v1/runs/{self.run_id}/heartbeats",
                        json={
                            "attempt": self.attempt,
                            "rank": rank,
                            "host": f"node-{rank + 1}",
                            "step": self.step,
                        },
                    )
                )
            self.errors += [r.text for r in responses if r.status_code >= 300]
            time.sleep(0.2)

    def stop(self) -> None:
        self.stop_event.set()
        self.join(10)
        self.client.close()


def _start(argv: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)


def _wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer: {log.read_text()[-2000:]}")


@pytest.fixture
def broker(redis_url: str) -> str:
    return redis_url


def _create_run(api: httpx.Client, name: str, **config: Any) -> tuple[int, str]:
    body = {"name": name, "owner": "alice", "config": {"preset": "tiny", "target_steps": 1000, **config}}
    run = api.post("/api/v1/runs", json=body)
    assert run.status_code == 201, run.text
    token = api.post(
        "/api/v1/tokens", json={"name": f"{name}-trainer", "role": "trainer", "run_id": run.json()["id"]}
    )
    assert token.status_code == 201, token.text
    return run.json()["id"], token.json()["token"]


def _phase(session: Any, run_id: int, *phases: RunPhase) -> Run:
    run = runs_crud.get_run(session, run_id=run_id)
    for phase in phases:
        runs_crud.set_run_phase(session, run=run, target=phase, reason="test scenario", author="test")
    return run


def _attempt(session: Any, run: Run, *, end_reason: str | None = None) -> None:
    attempt = runs_crud.create_attempt(
        session,
        run=run,
        hosts=["node-1", "node-3"],
        restored_from_checkpoint_id=None,
        overrides={},
        launcher={},
        start_step=0,
        author="test",
    )
    now = dt.datetime.now(dt.UTC)
    attempt.first_step_at = now
    if end_reason:
        runs_crud.end_attempt(
            session,
            attempt=attempt,
            exit_reason=end_reason,
            exit_code=1,
            last_step=10,
            steps_lost=2,
            author="test",
        )
        # What the orchestrator records with a failure (apply.end_attempt): progress stopped 40 s before
        # it was detected; the next attempt's first step, 10 s after detection, ends the recovery.
        attempt.last_progress_at = now - dt.timedelta(seconds=50)
        attempt.detected_at = now - dt.timedelta(seconds=10)


def _until(condition: Callable[[], object], *, what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def _query(prom: str, expr: str) -> list[dict[str, Any]]:
    reply = httpx.get(f"{prom}/api/v1/query", params={"query": expr}, timeout=10).json()
    assert reply["status"] == "success", f"{expr}: {reply}"
    assert reply["data"]["resultType"] == "vector", f"{expr}: {reply['data']['resultType']}"
    return reply["data"]["result"]


def _prometheus_config(tmp_path: Path, ports: dict[str, int]) -> Path:
    """The deployment's prometheus.yml with loopback targets and a 2 s interval; the same jobs and rules."""
    config = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    # 2 s leaves the scrape (timeout = interval) room on a loaded CI machine; one failed scrape would mark
    # every series stale and fail the queries.
    config["global"] = {"scrape_interval": "2s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(PROM_DIR / "trainops.rules.yml")]
    config.pop("alerting")
    jobs = {job["job_name"] for job in config["scrape_configs"]}
    assert jobs == set(ports), f"the test maps jobs {set(ports)}, the deployment scrapes {jobs}"
    for job in config["scrape_configs"]:
        job["static_configs"] = [{"targets": [f"127.0.0.1:{ports[job['job_name']]}"]}]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def _seed(url: str, db_url: str, runs_dir: Path) -> dict[str, Any]:
    api = httpx.Client(base_url=url, headers=ADMIN_HEADERS, timeout=10)
    healthy_id, healthy_token = _create_run(api, HEALTHY)
    # fp16-mixed: its scale starts at 65536, so 0.5 is a collapse (OPT's fp16 may sit there healthy)
    stalled_id, stalled_token = _create_run(api, STALLED, precision="fp16-mixed")
    attention_id, attention_token = _create_run(api, ATTENTION, max_restarts=3)
    for host in ("node-1", "node-2", "node-3"):
        gpus = [{"index": i, "uuid": f"GPU-{host}-{i}", "model": "A100", "memory_mb": 81920} for i in (0, 1)]
        assert api.post("/api/v1/nodes", json={"hostname": host, "gpus": gpus}).status_code == 201
    assert api.post("/api/v1/nodes/node-2/cordon", json={"reason": "NVLink down"}).status_code == 200

    # The stalled run: steps and heartbeats that stopped, a checkpoint 4 h old, a collapsed loss scale.
    stalled = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {stalled_token}"}, timeout=10)
    old = time.time() - 1800
    points = [
        {"step": s, "time": old + s, "loss": 7.0, "loss_scale": 0.5, "act_norm": 40.0} for s in range(1, 51)
    ]
    assert (
        stalled.post(f"/api/v1/runs/{stalled_id}/metrics", json={"attempt": 1, "points": points}).status_code
        == 200
    )
    for rank in (0, 1):
        body = {"attempt": 1, "rank": rank, "host": "node-1", "step": 50}
        assert stalled.post(f"/api/v1/runs/{stalled_id}/heartbeats", json=body).status_code == 204
    for run_id, name, client in ((stalled_id, STALLED, stalled), (healthy_id, HEALTHY, None)):
        client = client or httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {healthy_token}"}, timeout=10
        )
        path = str(runs_dir / name / "checkpoints" / "step_00000040")
        ckpt = {"attempt": 1, "step": 40, "path": path, "state": "committed"}
        assert client.post(f"/api/v1/runs/{run_id}/checkpoints", json=ckpt).status_code == 201

    engine = make_engine(db_url)
    factory = make_session_factory(engine)
    now = dt.datetime.now(dt.UTC)
    with transaction(factory) as session:
        healthy = _phase(session, healthy_id, RunPhase.starting, RunPhase.running)
        _attempt(session, healthy, end_reason="node_failure")
        _attempt(session, healthy)
        healthy.restart_count = 1
        stalled_run = _phase(session, stalled_id, RunPhase.starting, RunPhase.running)
        _attempt(session, stalled_run)
        attention = _phase(session, attention_id, RunPhase.starting, RunPhase.running)
        for _ in range(3):
            _attempt(session, attention, end_reason="diverged")
        attention.restart_count = 3
        _phase(session, attention_id, RunPhase.needs_attention)
        session.execute(
            sa.update(Heartbeat)
            .where(Heartbeat.run_id == stalled_id)
            .values(time=now - dt.timedelta(minutes=10))
        )
        session.execute(
            sa.update(Checkpoint)
            .where(Checkpoint.run_id == stalled_id)
            .values(committed_at=now - dt.timedelta(hours=4))
        )
        session.execute(sa.update(Node).where(Node.hostname == "node-3").values(failure_count=3))
        nodes = {n.hostname: n.id for n in session.scalars(sa.select(Node))}
        zero = {"sbe_volatile": 0, "dbe_volatile": 0}
        results = [
            ("node-1", "nvml.ecc", DiagnosticStatus.passed, {"gpus": {"0": zero, "1": zero}}),
            (
                "node-1",
                "nvml.thermal",
                DiagnosticStatus.passed,
                {"gpus": {"0": {"temperature_c": 45}, "1": {"temperature_c": 47}}},
            ),
            (
                "node-3",
                "nvml.ecc",
                DiagnosticStatus.failed,
                {"gpus": {"0": zero, "1": {"sbe_volatile": 3, "dbe_volatile": 2}}},
            ),
            (
                "node-3",
                "nvml.xid",
                DiagnosticStatus.failed,
                {"events": [{"gpu": 1, "xid": 48, "meaning": "double-bit ECC error"}]},
            ),
            (
                "node-3",
                "nvml.thermal",
                DiagnosticStatus.passed,
                {"gpus": {"0": {"temperature_c": 50}, "1": {"temperature_c": 81}}},
            ),
        ]
        for host, kind, status, measured in results:
            diag_crud.record_diagnostic(
                session,
                node_id=nodes[host],
                kind=kind,
                level="quick",
                status=status,
                reason=None if status == DiagnosticStatus.passed else f"{kind} failed",
                measurements=measured,
                started_at=now - dt.timedelta(seconds=3),
                finished_at=now,
            )
    return {
        "factory": factory,
        "engine": engine,
        "healthy": (healthy_id, healthy_token),
        "attention": (attention_id, attention_token),
    }


def test_every_dashboard_query_and_rule_through_prometheus(tmp_path: Path, broker: str) -> None:
    env_base = {"PYTHONPATH": str(REPO)}
    api_mp, orch_mp, worker_mp = (tmp_path / d for d in ("api-mp", "orch-mp", "worker-mp"))
    for d in (api_mp, orch_mp, worker_mp):
        d.mkdir()
    server = LiveServer(
        tmp_path, env={"PROMETHEUS_MULTIPROC_DIR": str(api_mp), "TRAINOPS_BROKER_URL": broker}
    )
    ports = {
        "trainops-api": server.port,
        "trainops-orchestrator": free_port(),
        "trainops-health-worker": free_port(),
    }
    procs: list[subprocess.Popen[bytes]] = []
    feeders: list[Feeder] = []
    try:
        server.start()
        for job, directory, kind in (
            ("trainops-orchestrator", orch_mp, "orchestrator"),
            ("trainops-health-worker", worker_mp, "worker"),
        ):
            env = {**server.env, **env_base, "PROMETHEUS_MULTIPROC_DIR": str(directory)}
            procs.append(_start([sys.executable, "-c", STAND_IN, kind, "120"], tmp_path / f"{kind}.log", env))
            log = tmp_path / f"{kind}-metrics.log"
            argv = [
                sys.executable,
                "-m",
                "service.observability",
                "--port",
                str(ports[job]),
                "--addr",
                "127.0.0.1",
            ]
            procs.append(_start(argv, log, env))
            _wait_http(f"http://127.0.0.1:{ports[job]}/metrics", procs[-1], log)

        seeded = _seed(server.url, f"sqlite:///{tmp_path / 'trainops.db'}", server.home / "runs")
        healthy_id, healthy_token = seeded["healthy"]
        attention_id, attention_token = seeded["attention"]
        celery = Celery(broker=broker)
        for _ in range(3):
            celery.send_task("health.run_checks", queue="health.shared")
        feeders = [
            Feeder(server.url, healthy_id, healthy_token, attempt=2, loss_scale=8192.0),
            Feeder(server.url, attention_id, attention_token, attempt=3, loss_scale=4096.0),
        ]
        for feeder in feeders:
            feeder.start()

        prom_port = free_port()
        prom = f"http://127.0.0.1:{prom_port}"
        prom_log = tmp_path / "prometheus.log"
        procs.append(
            _start(
                [
                    "prometheus",
                    f"--config.file={_prometheus_config(tmp_path, ports)}",
                    f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{prom_port}",
                ],
                prom_log,
            )
        )
        _wait_http(f"{prom}/-/ready", procs[-1], prom_log)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(_query(prom, "up == 1")) < len(ports):
            time.sleep(0.5)
        assert {s["metric"]["job"] for s in _query(prom, "up == 1")} == set(ports), httpx.get(
            f"{prom}/api/v1/targets"
        ).text

        # History for the range functions: a flat activation norm, then a runaway; a restart mid-way.
        # The flat part is the longer, so the runaway stays above twice the median while rules are checked.
        # Counted in scraped samples, not seconds: on a loaded machine scrapes come late.
        norm = f'trainops_run_final_layer_activation_norm{{run="{ATTENTION}"}}'
        _until(lambda: _query(prom, f"count_over_time({norm}[6h]) >= 6"), what="six flat activation norms")
        with transaction(seeded["factory"]) as session:
            healthy = runs_crud.get_run(session, run_id=healthy_id)
            current = runs_crud.active_attempt(session, run_id=healthy_id)
            assert current is not None
            runs_crud.end_attempt(
                session,
                attempt=current,
                exit_reason="node_failure",
                exit_code=1,
                last_step=20,
                steps_lost=1,
                author="test",
            )
            _attempt(session, healthy)
        feeders[1].act_norm = 400.0
        # scraped after the restart too: the restart's counters have their before and after samples
        _until(lambda: _query(prom, f"{norm} == 400"), what="the runaway activation norm scraped")
        for feeder in feeders:
            assert not feeder.errors, feeder.errors[:3]

        _check_rules(prom)
        _check_dashboards(prom)
        _check_failure_timings(prom)
        seeded["engine"].dispose()
    finally:
        for feeder in feeders:
            feeder.stop()
        for proc in reversed(procs):
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        server.stop()


def _dashboard_queries() -> Iterator[tuple[str, str, str, str]]:
    """(dashboard, panel title, expr, legend) for every Prometheus query of every dashboard."""
    for path in sorted(GRAFANA_DIR.glob("*.json")):
        board = json.loads(path.read_text())
        for panel in board["panels"]:
            for target in panel.get("targets", []):
                if "expr" in target:
                    yield path.name, panel["title"], target["expr"], target.get("legendFormat", "")
        for annotation in board["annotations"]["list"]:
            yield (
                path.name,
                f"annotation {annotation['name']}",
                annotation["expr"],
                annotation.get("textFormat", ""),
            )


def _check_dashboards(prom: str) -> None:
    checked = 0
    for board, title, expr, legend in _dashboard_queries():
        query = expr.replace("$run", HEALTHY)
        assert "$" not in query, f"{board} / {title}: unresolved variable in {expr}"
        series = _query(prom, query)
        assert series, f"{board} / {title}: {query} returned nothing"
        for sample in series:
            value = float(sample["value"][1])
            assert math.isfinite(value), f"{board} / {title}: {query} gave {value} for {sample['metric']}"
            missing = set(re.findall(r"\{\{(\w+)\}\}", legend)) - set(sample["metric"])
            assert not missing, (
                f"{board} / {title}: series {sample['metric']} lacks labels {missing} of its legend"
            )
        if 'run="$run"' in expr:
            assert {s["metric"].get("run") for s in series} <= {HEALTHY, None}, (
                f"{title}: other runs leaked in"
            )
        checked += 1
    assert checked >= 40, checked


def _check_rules(prom: str) -> None:
    rules = yaml.safe_load((PROM_DIR / "trainops.rules.yml").read_text())
    alerts = {rule["alert"]: rule["expr"] for group in rules["groups"] for rule in group["rules"]}
    assert set(alerts) == set(RULE_EXPECTATIONS), "every rule needs an expectation in this test"
    for name, expr in alerts.items():
        expected, signal, entities = RULE_EXPECTATIONS[name]
        firing = _query(prom, expr)
        got = sorted(
            ({k: v for k, v in s["metric"].items() if k in ("run", "node", "gpu", "reason")} for s in firing),
            key=str,
        )
        assert got == sorted(expected, key=str), (
            f"{name}: expected {expected}, got {[s['metric'] for s in firing]}"
        )
        signal_series = _query(prom, signal)
        assert signal_series, f"{name}: its signal {signal} has no data, so the rule is blind"
        seen = {s["metric"].get("run") or s["metric"].get("node") for s in signal_series}
        assert entities <= seen, f"{name}: signal {signal} shows {seen}, expected at least {entities}"
    states = {s["metric"]["alertname"] for s in _query(prom, "ALERTS")}
    assert {name for name, (expected, _, _) in RULE_EXPECTATIONS.items() if expected} <= states


def _check_failure_timings(prom: str) -> None:
    """MTTD and MTTR per failure class and the fleet's ETTR, as the seeded attempts give them."""
    mttd = {
        s["metric"]["failure_class"]: float(s["value"][1])
        for s in _query(
            prom,
            "sum by (failure_class) (trainops_failure_detection_seconds_sum)"
            " / sum by (failure_class) (trainops_failure_detection_seconds_count)",
        )
    }
    assert mttd == {"node_failure": 40.0, "diverged": 40.0}, mttd
    counts = {
        s["metric"]["failure_class"]: float(s["value"][1])
        for s in _query(prom, "trainops_failure_recovery_seconds_count")
    }
    # the failed attempts that another attempt followed: the healthy run's first, the attention run's
    # first two (its third was its last; the healthy run's second ended without detection times)
    assert counts == {"node_failure": 1.0, "diverged": 2.0}, counts
    (ettr,) = _query(prom, "trainops_fleet_effective_training_time_ratio")
    assert 0.0 <= float(ettr["value"][1]) <= 1.0
