"""Fleet sweeps end to end: planted faults on simulated hosts, real Celery workers on Redis (one process
per host) and the embedded in-process path; the right hosts end up cordoned and the logbook says why."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker

from health.celery_app import HealthCelery, make_app
from health.config import HealthConfig, host_queue
from service.crud.diagnostics import list_diagnostics
from service.crud.logbook import list_logbook
from service.crud.nodes import cordon_node, get_node, register_node, uncordon_node
from service.db import make_engine, make_session_factory, transaction
from service.fleet.policy import CordonRules
from service.fleet.sweep import blame_nodes, run_sweep
from service.migrate import upgrade
from service.statemachine import DiagnosticStatus, NodeState


def sessions(url: str) -> sessionmaker[Session]:
    upgrade(url)
    return make_session_factory(make_engine(url))


def register(factory: sessionmaker[Session], hosts: list[str]) -> None:
    with transaction(factory) as session:
        for host in hosts:
            register_node(session, hostname=host, author="test")


def states(factory: sessionmaker[Session], hosts: list[str]) -> dict[str, NodeState]:
    with transaction(factory) as session:
        return {h: get_node(session, hostname=h).state for h in hosts}


def node_log(factory: sessionmaker[Session], host: str) -> list[Any]:
    with transaction(factory) as session:
        node = get_node(session, hostname=host)
        return list_logbook(session, node_id=node.id, limit=1000)[0]


class Fleet:
    """Simulated hosts and their fault script; names are unique per test so queues never collide."""

    def __init__(self, tmp_path: Path, count: int) -> None:
        prefix = f"t{uuid.uuid4().hex[:6]}"
        self.hosts = [f"{prefix}-h{i}" for i in range(1, count + 1)]
        self.script = tmp_path / "faults.json"
        self.checkpoints = tmp_path / "ckpt"
        self.plant({})

    def plant(self, faults: dict[str, dict[str, Any]]) -> None:
        self.script.write_text(json.dumps({"default_gpus": 8, "hosts": faults}))
        # The cache key includes the mtime; make a rewrite within the same tick visible.
        os.utime(self.script, ns=(time.time_ns(), time.time_ns()))

    def config(self, **changes: Any) -> HealthConfig:
        base: dict[str, Any] = dict(
            fake_nvml_path=self.script,
            checkpoint_dir=self.checkpoints,
            min_free_disk_gb=0.001,
            quick_check_timeout_s=5.0,
            deep_check_timeout_s=60.0,
            gemm_size=128,
            memory_test_mb=4,
            allreduce_mb=0.5,
            disk_test_mb=4,
            min_disk_write_mb_s=1.0,
            # Deep sweeps of several hosts run the cross-host all-reduce: all "hosts" are this machine.
            fabric_master_addr="127.0.0.1",
            fabric_join_timeout_s=20.0,
        )
        base.update(changes)
        return HealthConfig(**base)


def planted_faults(fleet: Fleet) -> dict[str, dict[str, Any]]:
    h = fleet.hosts
    return {
        h[1]: {"faults": [{"gpu": 3, "kind": "ecc_dbe"}]},
        h[2]: {"faults": [{"gpu": 1, "kind": "thermal"}]},
        h[3]: {"faults": [{"gpu": 5, "kind": "xid", "xid": 79}]},
        h[4]: {"active": {"memory_bitflip": True}},
    }


def sweep_story(factory: sessionmaker[Session], app: HealthCelery, fleet: Fleet) -> None:
    """The story both paths must pass: one quick sweep cordons the broken hosts at once, a thermal
    host is suspect and cordoned only after repeating, a deep sweep finds bad memory, and every
    cordon is explained in the logbook; hosts without faults are never touched."""
    h = fleet.hosts
    fleet.plant(planted_faults(fleet))
    report = run_sweep(factory, hosts=h, level="quick", deadline_s=60, author="test/orchestrator", app=app)
    assert report.missed == []
    assert states(factory, h) == {
        h[0]: NodeState.healthy,
        h[1]: NodeState.cordoned,
        h[2]: NodeState.suspect,
        h[3]: NodeState.cordoned,
        h[4]: NodeState.healthy,  # bad memory shows only under load, in the deep checks
    }
    [why] = [e for e in node_log(factory, h[1]) if e.evidence.get("to") == "cordoned"]
    assert "double-bit" in why.message and why.author == "test/orchestrator"
    assert why.evidence["sweep_id"] == report.sweep_id
    assert why.evidence["findings"][0]["faults"] == ["ecc_dbe"]
    [lost] = [e for e in node_log(factory, h[3]) if e.evidence.get("to") == "cordoned"]
    assert "GpuIsLost" in lost.message
    with transaction(factory) as session:
        rows, total = list_diagnostics(session, sweep_id=report.sweep_id, limit=1000)
    assert total == report.results_ingested == 11 * len(h)
    failed = {(host, d.kind) for d, host in rows if d.status is DiagnosticStatus.failed}
    assert {kind for host, kind in failed if host == h[1]} == {"nvml.ecc"}
    assert {kind for host, kind in failed if host == h[2]} == {"nvml.thermal"}
    assert not {host for host, _ in failed} & {h[0], h[4]}

    for _ in range(2):  # the thermal host keeps throttling: the third bad sweep in a row cordons it
        run_sweep(factory, hosts=h, level="quick", deadline_s=60, author="test/beat", app=app)
    assert states(factory, h)[h[2]] is NodeState.cordoned
    [thermal] = [e for e in node_log(factory, h[2]) if e.evidence.get("to") == "cordoned"]
    assert "3 bad sweeps in a row" in thermal.message and "thermal" in thermal.message

    deep = run_sweep(
        factory, hosts=[h[0], h[4]], level="deep", deadline_s=120, author="test/restart", app=app
    )
    assert deep.missed == []
    assert states(factory, [h[0], h[4]]) == {h[0]: NodeState.healthy, h[4]: NodeState.cordoned}
    [memory] = [e for e in node_log(factory, h[4]) if e.evidence.get("to") == "cordoned"]
    assert "memory pattern" in memory.message
    # Healthy hosts: registered, checked, never moved.
    assert [e.message for e in node_log(factory, h[0])] == [f"node {h[0]} registered with 0 GPU(s)"]


@pytest.mark.slow
def test_embedded_sweep_without_redis_cordons_the_broken_hosts(migrated_url: str, tmp_path: Path) -> None:
    fleet = Fleet(tmp_path, 5)
    factory = make_session_factory(make_engine(migrated_url))
    register(factory, fleet.hosts)
    app = make_app(fleet.config())
    assert app.embedded_worker is not None
    try:
        sweep_story(factory, app, fleet)
    finally:
        app.embedded_worker.stop()


def test_a_lemon_is_retired_after_repeated_blame_and_stays_retired(sqlite_url: str, tmp_path: Path) -> None:
    factory = sessions(sqlite_url)
    register(factory, ["lemon", "bystander"])
    for attempt in range(1, 4):
        blame_nodes(
            factory,
            hosts=["lemon"],
            failure=f"NCCL watchdog timeout, attempt {attempt}",
            author="orchestrator",
        )
        if attempt < 3:
            with transaction(factory) as session:  # repaired and returned between attempts
                node = get_node(session, hostname="lemon")
                assert node.state is NodeState.suspect
    assert states(factory, ["lemon", "bystander"]) == {
        "lemon": NodeState.retired,
        "bystander": NodeState.healthy,
    }
    retired = [e for e in node_log(factory, "lemon") if e.evidence.get("to") == "retired"]
    assert len(retired) == 1 and "lemon" in retired[0].message and retired[0].author == "orchestrator"


# --- real worker processes on Redis -------------------------------------------------------------------
class Workers:
    def __init__(self, fleet: Fleet, broker: str, tmp_path: Path, **env: str) -> None:
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.fleet = fleet
        self.broker = broker
        self.logs = tmp_path / "worker-logs"
        self.logs.mkdir(exist_ok=True)
        self.env = env

    def start(self, host: str) -> None:
        env = {
            **os.environ,
            "TRAINOPS_BROKER_URL": self.broker,
            "TRAINOPS_FAKE_NVML": str(self.fleet.script),
            "TRAINOPS_HEALTH_CHECKPOINT_DIR": str(self.fleet.checkpoints),
            "TRAINOPS_HEALTH_MIN_FREE_DISK_GB": "0.001",
            "TRAINOPS_HEALTH_GEMM_SIZE": "128",
            "TRAINOPS_HEALTH_MEMORY_TEST_MB": "4",
            "TRAINOPS_HEALTH_ALLREDUCE_MB": "0.5",
            "TRAINOPS_HEALTH_DISK_TEST_MB": "4",
            "TRAINOPS_HEALTH_MIN_DISK_WRITE_MB_S": "1",
            **self.env,
        }
        log = open(self.logs / f"{host}.log", "wb")  # noqa: SIM115 - lives as long as the worker
        self.procs[host] = subprocess.Popen(
            [sys.executable, "-m", "health.worker_main", "--host", host], env=env, stdout=log, stderr=log
        )

    def wait_ready(self, app: HealthCelery, hosts: list[str]) -> None:
        pending = {h: app.send_task("health.identify", queue=host_queue(h)) for h in hosts}
        for host, result in pending.items():
            answer = result.get(timeout=90)
            assert answer["host"] == host and answer["nvml"] == "fake"

    def kill(self, host: str) -> None:
        self.procs[host].send_signal(signal.SIGKILL)
        self.procs[host].wait(10)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def redis_fleet(
    tmp_path: Path, sqlite_url: str, redis_url: str
) -> Iterator[tuple[Fleet, Workers, HealthCelery, Any]]:
    fleet = Fleet(tmp_path, 5)
    factory = sessions(sqlite_url)
    register(factory, fleet.hosts)
    workers = Workers(fleet, redis_url, tmp_path)
    app = make_app(fleet.config(broker_url=redis_url))
    try:
        yield fleet, workers, app, factory
    finally:
        workers.stop()


@pytest.mark.redis
@pytest.mark.slow
def test_quick_and_deep_sweeps_over_real_workers_cordon_only_the_broken_hosts(
    redis_fleet: tuple[Fleet, Workers, HealthCelery, Any],
) -> None:
    fleet, workers, app, factory = redis_fleet
    for host in fleet.hosts:
        workers.start(host)
    workers.wait_ready(app, fleet.hosts)
    sweep_story(factory, app, fleet)
    with transaction(factory) as session:
        rows, _ = list_diagnostics(session, hostname=fleet.hosts[0], limit=1)
    # Results came back from the worker process that owns the host's queue.
    assert rows[0][0].measurements["worker"] == f"{fleet.hosts[0]}@trainops"


@pytest.mark.redis
@pytest.mark.slow
def descendants(pid: int) -> list[int]:
    """Every process below `pid` (by parent links in /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], list(children.get(pid, []))
    while todo:
        child = todo.pop()
        found.append(child)
        todo.extend(children.get(child, []))
    return found


def zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return False


def test_a_worker_killed_mid_check_makes_its_host_suspect_not_cordoned_nor_healthy(
    redis_fleet: tuple[Fleet, Workers, HealthCelery, Any],
) -> None:
    fleet, workers, app, factory = redis_fleet
    h = fleet.hosts[:3]
    # h[1]'s driver wedges in the temperature read; h[2]'s wedges too and its worker gets killed.
    fleet.plant(
        {host: {"faults": [{"kind": "hang", "function": "nvmlDeviceGetTemperature"}]} for host in h[1:]}
    )
    for host in h:
        workers.start(host)
    workers.wait_ready(app, h)

    reports: list[Any] = []
    thread = threading.Thread(
        target=lambda: reports.append(run_sweep(factory, hosts=h, level="quick", deadline_s=12, app=app))
    )
    thread.start()
    time.sleep(3)  # both wedged hosts are now inside the hung temperature read
    left_behind = descendants(workers.procs[h[2]].pid)  # its forkserver and the hung check process
    assert left_behind
    workers.kill(h[2])
    thread.join(60)
    # Neither outlives the killed worker: the forkserver sees its alive pipe close (the check process no
    # longer holds a copy) and exits, and the check process dies with it (PR_SET_PDEATHSIG).
    deadline = time.monotonic() + 20
    while (alive := [pid for pid in left_behind if Path(f"/proc/{pid}").exists() and not zombie(pid)]) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.2)
    assert not alive, f"left running after their worker was killed: {alive}"
    [report] = reports
    assert report.missed == [h[2]]
    assert states(factory, h) == {h[0]: NodeState.healthy, h[1]: NodeState.suspect, h[2]: NodeState.suspect}
    with transaction(factory) as session:
        hung, _ = list_diagnostics(session, hostname=h[1], kind="nvml.thermal", limit=1)
        missed, _ = list_diagnostics(session, hostname=h[2], kind="health.worker", limit=1)
    assert hung[0][0].status is DiagnosticStatus.timeout and "killed" in (hung[0][0].reason or "")
    assert missed[0][0].status is DiagnosticStatus.timeout and host_queue(h[2]) in (missed[0][0].reason or "")


def test_missed_deadlines_cordon_a_host_that_stays_silent(
    sqlite_url: str, tmp_path: Path, redis_url: str
) -> None:
    """A host whose worker never answers is suspect after one sweep and cordoned after three."""
    fleet = Fleet(tmp_path, 1)
    factory = sessions(sqlite_url)
    register(factory, fleet.hosts)
    app = make_app(fleet.config(broker_url=redis_url))
    for sweep in range(1, 4):
        run_sweep(factory, hosts=fleet.hosts, level="quick", deadline_s=0.3, app=app, rules=CordonRules())
        expected = NodeState.suspect if sweep < 3 else NodeState.cordoned
        assert states(factory, fleet.hosts)[fleet.hosts[0]] is expected


@pytest.mark.slow
def test_no_nvml_on_a_gpu_host_is_suspect_and_probation_ends_on_a_deep_check(
    migrated_url: str, tmp_path: Path
) -> None:
    """Through the embedded Celery worker and the real database: a host that declares GPUs but has no
    driver is suspect with the reason, never clean; a CPU host without NVML is not. An uncordoned host is
    on probation: quick sweeps leave it there, a clean deep sweep makes it healthy."""
    fleet = Fleet(tmp_path, 3)
    gpu_host, cpu_host, repaired = fleet.hosts
    factory = make_session_factory(make_engine(migrated_url))
    gpus = [
        {"index": i, "uuid": f"GPU-{gpu_host}-{i}", "model": "H100", "memory_mb": 81920} for i in range(8)
    ]
    with transaction(factory) as session:
        register_node(session, hostname=gpu_host, gpus=gpus, author="test")
        register_node(session, hostname=cpu_host, author="test")
        register_node(session, hostname=repaired, author="test")
    fleet.plant({gpu_host: {"driver": False}, cpu_host: {"driver": False}})
    app = make_app(fleet.config(expected_gpus=0))  # hosts without an inventory declare no GPUs
    assert app.embedded_worker is not None
    try:
        run_sweep(
            factory, hosts=[gpu_host, cpu_host], level="quick", deadline_s=60, author="test/beat", app=app
        )
        assert states(factory, [gpu_host, cpu_host]) == {
            gpu_host: NodeState.suspect,
            cpu_host: NodeState.healthy,
        }
        [why] = [e for e in node_log(factory, gpu_host) if e.evidence.get("to") == "suspect"]
        assert "no NVML on this host" in why.message and "declares 8 GPU(s)" in why.message
        assert why.evidence["findings"][0]["faults"] == ["nvml_missing"]

        with transaction(factory) as session:
            cordon_node(session, hostname=repaired, reason="XID 79", author="test")
            assert uncordon_node(session, hostname=repaired, reason="GPU swapped", author="test").state is (
                NodeState.probation
            )
        run_sweep(factory, hosts=[repaired], level="quick", deadline_s=60, author="test/beat", app=app)
        assert states(factory, [repaired])[repaired] is NodeState.probation
        run_sweep(
            factory, hosts=[repaired], level="deep", deadline_s=120, author="test/orchestrator", app=app
        )
        assert states(factory, [repaired])[repaired] is NodeState.healthy
        [graduated] = [e for e in node_log(factory, repaired) if e.evidence.get("to") == "healthy"]
        assert "deep diagnostics are clean" in graduated.message and graduated.evidence["level"] == "deep"
    finally:
        app.embedded_worker.stop()
