"""Issue 13: at 1,024 hosts one heartbeat request per host every 2 s (~512 requests/s) swamped the control
plane the fleet simulator ran, and its backlog read as a hang. The orchestrator now gives each attempt a send
interval from the pool's size and its heartbeat budget (Nomad's `max_heartbeats_per_second`), hands it to
the trainer in the attempt's environment, records it with the attempt, and widens that attempt's hang limits
by it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from service import migrate
from service.crud.nodes import register_node
from service.crud.runs import create_run
from service.db import make_engine, make_session_factory, transaction
from service.fleet.gateway import SweepHealthGateway
from service.orchestrator.launchers.base import LaunchSpec
from service.orchestrator.loop import Orchestrator
from service.recovery.config import OrchestratorConfig, RemediationConfig
from tests.orchestrator.test_trainer_token_expiry import ScriptedLauncher
from trainer import contract


class EnvKeepingLauncher(ScriptedLauncher):
    def __init__(self) -> None:
        super().__init__()
        self.envs: list[dict[str, str]] = []

    def prepare(self, spec: LaunchSpec) -> dict[str, Any]:
        self.envs.append(dict(spec.env))
        return super().prepare(spec)


def test_a_big_pool_gets_a_longer_beat_interval_which_the_attempt_records_and_its_limits_allow_for(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'trainops.db'}"
    migrate.upgrade(url)
    factory = make_session_factory(make_engine(url))
    with transaction(factory) as session:
        for i in range(12):  # the pool: 12 hosts, 6 requests/s allowed -> every host beats every 2 s
            register_node(session, hostname=f"h{i:02d}", author="test")
        run_id = create_run(
            session,
            name="beats",
            owner="test",
            config={"preset": "tiny", "target_steps": 10, "host_count": 2, "launcher": "fake"},
            start=True,
            author="test",
        ).id
    launcher = EnvKeepingLauncher()
    cfg = OrchestratorConfig(
        loop_interval_s=0.01,
        runs_dir=str(tmp_path / "runs"),
        heartbeat_max_requests_per_s=4.0,  # 12 hosts / 4 per s: 3 s, longer than the 2 s minimum
        remediation=RemediationConfig(backoff_base_s=0.0, deep_check_before_relaunch=False),
    )
    orchestrator = Orchestrator(
        factory, cfg, launchers={"fake": launcher}, health=SweepHealthGateway(factory), pager=None
    )
    orchestrator.reconcile_once()
    (env,) = launcher.envs
    assert env[contract.HEARTBEAT_INTERVAL_ENV] == "3"
    assert contract.heartbeat_interval_from_env(env) == 3.0
    observed = orchestrator.observe(run_id)
    assert observed.attempt is not None and observed.attempt.heartbeat_interval_s == 3.0


@pytest.mark.parametrize("raw", ["0", "-1", "nan", "inf", "soon"])
def test_the_trainer_refuses_a_beat_interval_that_is_not_a_positive_number(raw: str) -> None:
    with pytest.raises(ValueError, match="TRAINOPS_HEARTBEAT_INTERVAL_S"):
        contract.heartbeat_interval_from_env({contract.HEARTBEAT_INTERVAL_ENV: raw})
    assert contract.heartbeat_interval_from_env({}) == contract.HEARTBEAT_SEND_INTERVAL_S
