"""The orchestrator on a real Slurm cluster (munged, slurmctld, four slurmd on loopback; slurm_cluster.py):
launch, drain on a bad host, a node lost mid-attempt, an admin's drain, the restart budget, placement by
Slurm with --exclude, and sbatch refusals (permanent: needs attention; transient: retried)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from health.celery_app import HealthCelery, make_app
from health.config import HealthConfig
from service.crud.logbook import list_logbook
from service.crud.nodes import get_node, register_node, uncordon_node
from service.crud.runs import create_run, get_run, list_attempts, stop_run
from service.db import make_engine, make_session_factory, transaction
from service.fleet.gateway import SweepHealthGateway
from service.fleet.scheduler import SlurmAdapter
from service.fleet.slurm import parse_scontrol_record
from service.fleet.sweep import run_sweep
from service.migrate import upgrade
from service.models import Heartbeat
from service.orchestrator.launchers.local import tagged_pids
from service.orchestrator.launchers.slurm import SlurmLauncher
from service.orchestrator.loop import Orchestrator
from service.recovery.config import OrchestratorConfig, RemediationConfig
from service.schemas import RunConfig
from service.statemachine import NodeState, RunPhase
from tests.livesrv import LiveServer
from tests.slurm_cluster import DOWN_PARTITION, NODES, PARTITION, SlurmCluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    with SlurmCluster(tmp_path_factory.mktemp("slurm") / "cluster").start() as running:
        yield running


@dataclass
class Stack:
    factory: sessionmaker[Session]
    orchestrator: Orchestrator
    gateway: SweepHealthGateway
    health_app: HealthCelery
    faults: Path
    cluster: SlurmCluster

    def create_run(self, name: str, *, slurm: dict[str, Any] | None = None, **config: Any) -> int:
        run_config = RunConfig(
            preset="tiny",
            target_steps=12,
            checkpoint_interval=4,
            host_count=2,
            launcher="slurm",
            slurm={"partition": PARTITION, "time_limit": "00:10:00", **(slurm or {})},
            **config,
        )
        with transaction(self.factory) as session:
            return create_run(
                session,
                name=name,
                owner="test",
                config=run_config.model_dump(mode="json"),
                start=True,
                author="test",
            ).id

    def attempts(self, run_id: int) -> list[Any]:
        with transaction(self.factory) as session:
            return [
                {
                    "number": a.number,
                    "hosts": tuple(a.hosts),
                    "exit_reason": a.exit_reason,
                    "detail": (a.findings or {}).get("detail", ""),
                    "launcher": dict(a.launcher or {}),
                    "first_step": a.first_step_at is not None,
                }
                for a in list_attempts(session, run_id=run_id)
            ]

    def beat_hosts(self, run_id: int) -> set[str | None]:
        """The hosts the run's ranks named in their heartbeats (the control plane's table)."""
        with transaction(self.factory) as session:
            return set(session.scalars(sa.select(Heartbeat.host).where(Heartbeat.run_id == run_id)))

    def first_step_seen(self, run_id: int, number: int = 1) -> bool:
        attempts = self.attempts(run_id)
        return len(attempts) >= number and bool(attempts[number - 1]["first_step"])

    def phase(self, run_id: int) -> RunPhase:
        with transaction(self.factory) as session:
            return get_run(session, run_id=run_id).phase

    def node_state(self, host: str) -> tuple[NodeState, str]:
        with transaction(self.factory) as session:
            node = get_node(session, hostname=host)
            return node.state, node.state_reason or ""

    def logbook(self, **filters: Any) -> list[str]:
        with transaction(self.factory) as session:
            return [e.message for e in list_logbook(session, limit=1000, **filters)[0]]

    def node_log(self, host: str) -> list[str]:
        with transaction(self.factory) as session:
            node_id = get_node(session, hostname=host).id
        return self.logbook(node_id=node_id)

    def stop(self, run_id: int) -> None:
        with transaction(self.factory) as session:
            stop_run(session, run_id=run_id, reason="test over", author="test")
        wait_for(lambda: self.phase(run_id) == RunPhase.stopped, 60, "the run to stop")
        wait_for(lambda: not self.cluster.job_ids(), 30, "Slurm jobs to end")


def wait_for(ready: Callable[[], object], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")


@pytest.fixture
def stack(cluster: SlurmCluster, tmp_path: Path) -> Iterator[Stack]:
    # A fresh cluster state per test: every node back in service, nothing queued.
    cluster.run(["scancel", "--full", "--quiet", f"--partition={PARTITION}"], check=False)
    for node in NODES:
        cluster.revive_node(node)  # a failed test may have left a node dead
    cluster.run(["scontrol", "update", f"NodeName={','.join(NODES)}", "State=RESUME"], check=False)
    cluster.wait_idle(timeout_s=60)

    url = f"sqlite:///{tmp_path / 'trainops.db'}"
    upgrade(url)
    factory = make_session_factory(make_engine(url))
    with transaction(factory) as session:
        for host in NODES:
            register_node(session, hostname=host, author="test")
    faults = tmp_path / "faults.json"
    faults.write_text(json.dumps({"default_gpus": 8, "hosts": {}}))
    health_app = make_app(
        HealthConfig(
            fake_nvml_path=faults,
            checkpoint_dir=tmp_path / "health-ckpt",
            min_free_disk_gb=0.001,
            quick_check_timeout_s=10.0,
            deep_check_timeout_s=60.0,
            gemm_size=64,
            memory_test_mb=2,
            allreduce_mb=0.25,
            disk_test_mb=2,
            min_disk_write_mb_s=1.0,
        )
    )
    # The control plane the ranks report to (their heartbeats are what the orchestrator watches).
    server = LiveServer(tmp_path, database_url=url).start()
    slurm = SlurmAdapter(env={"SLURM_CONF": str(cluster.conf)})
    gateway = SweepHealthGateway(factory, adapters=[slurm], app=health_app)
    cfg = OrchestratorConfig(
        loop_interval_s=0.5,
        hang_timeout_s=90.0,  # two CPU cores shared by four ranks' worth of work: steps can stall
        startup_grace_s=150.0,
        runs_dir=str(tmp_path / "runs"),
        api_url=server.url,
        remediation=RemediationConfig(backoff_base_s=0.2, backoff_max_s=1.0, deep_check_deadline_s=60.0),
    )
    orchestrator = Orchestrator(
        factory,
        cfg,
        launchers={"slurm": SlurmLauncher(env={"SLURM_CONF": str(cluster.conf)})},
        health=gateway,
        trainer_env={"TRAINOPS_API_URL": server.url},
    )
    thread = threading.Thread(target=orchestrator.run_forever, daemon=True)
    thread.start()
    try:
        yield Stack(factory, orchestrator, gateway, health_app, faults, cluster)
    finally:
        orchestrator.stop()
        thread.join(30)
        cluster.run(["scancel", "--full", "--quiet", f"--partition={PARTITION}"], check=False)
        server.stop()


def sbatch_of(attempt: dict[str, Any]) -> list[str]:
    command = json.loads((Path(attempt["launcher"]["attempt_dir"]) / "command.json").read_text())
    return list(command["sbatch"])


def test_two_node_attempt_reaches_its_target(stack: Stack) -> None:
    run_id = stack.create_run("slurm-ok")
    wait_for(lambda: stack.phase(run_id) == RunPhase.completed, 150, "the run to complete")
    (attempt,) = stack.attempts(run_id)
    assert attempt["exit_reason"] == "completed" and attempt["hosts"] == ("n1", "n2")
    argv = sbatch_of(attempt)
    assert "--nodelist=n1,n2" in argv and "--nodes=2" in argv and "--no-requeue" in argv
    assert f"--comment=trainops run={run_id} attempt=1 tag={attempt['launcher']['tag']}" in argv
    assert "--job-name=trainops-slurm-ok-a1" in argv and "--time=00:10:00" in argv
    # Ranks reported the Slurm node names they ran on (TRAINOPS_HOSTS came from the allocation).
    assert stack.beat_hosts(run_id) == {"n1", "n2"}
    assert stack.cluster.node_states() == dict.fromkeys(NODES, "idle")


def test_bad_host_is_drained_excluded_and_resumed_on_uncordon(stack: Stack) -> None:
    run_id = stack.create_run("slurm-bad-host")
    wait_for(lambda: stack.first_step_seen(run_id), 120, "attempt 1's first step")
    assert stack.attempts(run_id)[0]["hosts"] == ("n1", "n2")

    # A health worker's quick check finds a double-bit ECC error on n2: cordoned, drained in Slurm.
    stack.faults.write_text(json.dumps({"hosts": {"n2": {"faults": [{"gpu": 3, "kind": "ecc_dbe"}]}}}))
    run_sweep(
        stack.factory,
        hosts=["n2"],
        level="quick",
        app=stack.health_app,
        adapters=stack.gateway.adapters,
    )
    assert stack.node_state("n2")[0] == NodeState.cordoned
    assert stack.cluster.node_states()["n2"] in ("drain", "drng")
    assert stack.cluster.node_reason("n2").startswith("trainops: ")

    wait_for(lambda: len(stack.attempts(run_id)) == 2, 120, "the relaunch")
    first, second = stack.attempts(run_id)
    assert first["exit_reason"] == "hardware"
    assert second["hosts"] == ("n1", "n3") and "--nodelist=n1,n3" in sbatch_of(second)
    log = stack.logbook(run_id=run_id)
    assert any("n2 is cordoned" in m for m in log), log
    assert any(m.startswith("attempt 2:") for m in log), log
    stack.stop(run_id)

    # An operator returns n2 to service in trainops; the next pass resumes it in Slurm.
    with transaction(stack.factory) as session:
        uncordon_node(session, hostname="n2", reason="GPU swapped", author="test")
    stack.cluster.wait_idle(["n2"], timeout_s=30)
    assert any("released in slurm (back in service in trainops)" in m for m in stack.node_log("n2"))


def test_node_lost_mid_attempt_is_cordoned_and_the_run_moves_on(stack: Stack) -> None:
    run_id = stack.create_run("slurm-node-down")
    wait_for(lambda: stack.first_step_seen(run_id), 120, "attempt 1's first step")
    tag = stack.attempts(run_id)[0]["launcher"]["tag"]

    stack.cluster.kill_node("n2", reason="pulled the plug")
    wait_for(lambda: len(stack.attempts(run_id)) == 2, 120, "the relaunch")
    first, second = stack.attempts(run_id)
    # A hardware failure naming n2, whichever the orchestrator saw first: the job's NODE_FAIL, or n2
    # cordoned by the node sync; either way the relaunch was deep-checked.
    assert first["exit_reason"] == "hardware" and "n2" in first["detail"], first
    assert second["hosts"] == ("n1", "n3")
    assert any(
        m.startswith("deep diagnostics before relaunch on n1, n3") for m in stack.logbook(run_id=run_id)
    )
    state, reason = stack.node_state("n2")
    assert state == NodeState.cordoned and "n2 is down: pulled the plug" in reason
    # Every process of the failed attempt is gone, on the dead node and on the survivor.
    wait_for(lambda: not tagged_pids(tag), 30, "attempt 1's processes to end")
    stack.stop(run_id)

    # The node comes back in Slurm: the sync's own cordon is lifted.
    stack.cluster.revive_node("n2")
    wait_for(lambda: stack.node_state("n2")[0] == NodeState.healthy, 30, "n2 to be released")


def test_admin_drain_is_respected(stack: Stack) -> None:
    stack.cluster.run(["scontrol", "update", "NodeName=n1", "State=DRAIN", "Reason=fan noise, ticket 4711"])
    # The orchestrator learns of the drain at the start of its next pass (the scheduler sync); a run created
    # while a pass that synced just before the drain is still placing runs could land on n1 (CI saw it once
    # on a loaded machine), so the story starts once trainops knows.
    wait_for(lambda: stack.node_state("n1")[0] == NodeState.cordoned, 30, "the drain to be synced")
    run_id = stack.create_run("slurm-admin-drain")
    wait_for(lambda: bool(stack.attempts(run_id)), 30, "attempt 1")
    (attempt,) = stack.attempts(run_id)
    assert attempt["hosts"] == ("n2", "n3")
    state, reason = stack.node_state("n1")
    assert state == NodeState.cordoned and "drained outside trainops: fan noise, ticket 4711" in reason
    # trainops leaves the admin's drain and reason alone.
    assert stack.cluster.node_reason("n1") == "fan noise, ticket 4711"
    stack.stop(run_id)
    assert stack.cluster.node_states()["n1"] in ("drain", "drng")

    stack.cluster.run(["scontrol", "update", "NodeName=n1", "State=RESUME"])
    wait_for(lambda: stack.node_state("n1")[0] == NodeState.healthy, 30, "n1 to be released")


def test_restart_budget_is_honoured(stack: Stack) -> None:
    run_id = stack.create_run(
        "slurm-budget",
        max_restarts=1,
        faults=["1:crash:step=2,code=3", "2:crash:step=2,code=3", "3:crash:step=2,code=3"],
    )
    wait_for(lambda: stack.phase(run_id) == RunPhase.needs_attention, 200, "the run to need attention")
    attempts = stack.attempts(run_id)
    assert [a["exit_reason"] for a in attempts] == ["crash", "crash"]
    assert any("restart budget spent" in m for m in stack.logbook(run_id=run_id))
    assert not stack.cluster.job_ids()


def test_exclude_placement_lets_slurm_place_and_the_attempt_follows_the_allocation(stack: Stack) -> None:
    stack.gateway.cordon(["n2"], reason="test: bad GPU", evidence={}, run_id=None)  # drained in Slurm too
    # n1 is taken by a job trainops does not know: the orchestrator still picks it, Slurm places elsewhere.
    stack.cluster.run(
        [
            "sbatch",
            "--parsable",
            "--exclusive",
            "--nodelist=n1",
            f"--partition={PARTITION}",
            "--output=/dev/null",
            "--wrap=sleep 300",
        ]
    )
    stack.cluster.wait_state("n1", ["alloc"])
    run_id = stack.create_run("slurm-exclude", slurm={"placement": "exclude"})
    wait_for(
        lambda: stack.attempts(run_id) and stack.attempts(run_id)[0]["hosts"] == ("n3", "n4"), 60, "n3, n4"
    )
    (attempt,) = stack.attempts(run_id)
    argv = sbatch_of(attempt)
    assert "--exclude=n2" in argv and "--nodes=2" in argv
    assert not any(a.startswith("--nodelist") for a in argv)
    job = stack.cluster.run(["scontrol", "show", "job", "-o", str(attempt["launcher"]["job_id"])])
    allocated = stack.cluster.run(["scontrol", "show", "hostnames", parse_scontrol_record(job)["NodeList"]])
    assert tuple(allocated.split()) == attempt["hosts"]
    assert any("the scheduler placed it on n3, n4" in m for m in stack.logbook(run_id=run_id))
    # The ranks report the allocated nodes (TRAINOPS_HOSTS from SLURM_JOB_NODELIST).
    wait_for(lambda: stack.first_step_seen(run_id), 120, "attempt 1's first step")
    wait_for(lambda: stack.beat_hosts(run_id) == {"n3", "n4"}, 30, "beats from the allocated nodes")
    stack.cluster.run(["scancel", "--full", "--quiet", "--nodelist=n1", "--name=wrap"], check=False)
    stack.stop(run_id)


def test_a_permanent_sbatch_refusal_needs_attention_at_once(stack: Stack) -> None:
    run_id = stack.create_run("slurm-gone", slurm={"partition": "gone"})
    wait_for(lambda: stack.phase(run_id) == RunPhase.needs_attention, 30, "the run to need attention")
    assert [a["exit_reason"] for a in stack.attempts(run_id)] == ["config"]
    log = stack.logbook(run_id=run_id)
    refusal = (
        "attempt 1: slurm refused the launch (permanent: the run needs attention): Slurm partition 'gone'"
    )
    assert any(m.startswith(refusal) for m in log), log
    assert not stack.cluster.job_ids()


def test_a_transient_sbatch_refusal_is_retried_within_the_budget(stack: Stack) -> None:
    run_id = stack.create_run("slurm-maint", slurm={"partition": DOWN_PARTITION}, max_restarts=1)
    wait_for(lambda: stack.phase(run_id) == RunPhase.needs_attention, 30, "the run to need attention")
    assert [a["exit_reason"] for a in stack.attempts(run_id)] == ["crash", "crash"]
    log = stack.logbook(run_id=run_id)
    assert any(f"(transient: retrying): Slurm partition '{DOWN_PARTITION}' is DOWN" in m for m in log), log
    assert any("restart budget spent" in m for m in log), log
