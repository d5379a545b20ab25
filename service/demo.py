"""`trainops demo`: the whole product on embedded defaults, with the OPT team's bad days in a few minutes.

It starts the control plane (SQLite), the in-process health worker and its beat, and the orchestrator; then
launches a small OPT-style run on two CPU ranks over three simulated hosts and injects, in order: a killed
rank, a GPU fault on one host (fake NVML: a double-bit ECC error), a hang, and a loss divergence (LR x100).
The run must reach its target by itself; the terminal shows it live and ends with the logbook and goodput.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from service.console import print_goodput, print_logbook

console = Console()

HOSTS = ("demo-h1", "demo-h2", "demo-h3")
GPUS_PER_HOST = 2
TARGET_STEPS = 120
GPU_FAULT_AFTER_STEP = 30  # plant the ECC error once attempt 2 has trained past this step
# Attempt-scoped faults (see service.orchestrator.apply.parse_faults): each fires once, in its attempt.
# Attempts 3 and 4 count from their restore points (`step=+N`): where attempt 3 starts depends on how far
# attempt 2 trained before its GPU fault was found (a quick sweep every 3 s at 7-10 steps a second: CI once
# saw it reach step 73, past a fixed hang at 62, which then never fired).
FAULTS = (
    "1:crash:step=14,rank=1,signal=KILL",  # a rank killed (OOM killer, preempted process)
    "3:hang:step=+10,rank=1",  # a rank stuck in a collective
    "4:diverge:step=+20,factor=100",  # the LR blows up: loss spike, activation norm runaway
)


def simulated_fleet_env(home: Path, *, gpus_per_host: int) -> dict[str, str]:
    """Settings for a fleet of simulated hosts on this machine (also used by bench/chaos.py): fake NVML
    scripted from a file, and active checks small enough that deep diagnostics take seconds on two cores.
    Each component reads them once at its edge."""
    return {
        "TRAINOPS_HOME": str(home),
        "TRAINOPS_FAKE_NVML": str(home / "fake_nvml.json"),
        "TRAINOPS_HEALTH_CHECKPOINT_DIR": str(home / "diskcheck"),
        "TRAINOPS_HEALTH_MIN_FREE_DISK_GB": "0.5",
        "TRAINOPS_HEALTH_MIN_DISK_WRITE_MB_S": "1",
        "TRAINOPS_HEALTH_DISK_TEST_MB": "8",
        "TRAINOPS_HEALTH_GEMM_SIZE": "128",
        "TRAINOPS_HEALTH_MEMORY_TEST_MB": "8",
        "TRAINOPS_HEALTH_ALLREDUCE_MB": "1",
        "TRAINOPS_HEALTH_EXPECTED_GPUS": str(gpus_per_host),
        "TRAINOPS_HEALTH_QUICK_INTERVAL_S": "3",
        "TRAINOPS_HEALTH_QUICK_DEADLINE_S": "6",
        "TRAINOPS_HEALTH_QUICK_CHECK_TIMEOUT_S": "5",
        "TRAINOPS_HEALTH_DEEP_DEADLINE_S": "120",
        "TRAINOPS_HEALTH_DEEP_CHECK_TIMEOUT_S": "60",
    }


def write_fake_nvml(
    home: Path, hosts: Sequence[str], faults: dict[str, list[dict[str, Any]]], *, gpus_per_host: int
) -> None:
    """(Re)script the simulated GPUs; the health checks re-read the file when it changes."""
    script = {
        "default_gpus": gpus_per_host,
        "hosts": {
            h: {"gpus": gpus_per_host, "model": "NVIDIA A100-SXM4-80GB", "faults": faults.get(h, [])}
            for h in hosts
        },
    }
    tmp = home / ".fake_nvml.json.tmp"
    tmp.write_text(json.dumps(script))
    os.replace(tmp, home / "fake_nvml.json")


def start_api_in_thread(settings: Any, factory: Any) -> Any:
    """The control plane's API in a thread of this process (embedded stacks: the demo, the chaos bench)."""
    import uvicorn

    from service.main import create_app

    server = uvicorn.Server(
        uvicorn.Config(
            create_app(settings, session_factory=factory),
            host=settings.api_host,
            port=settings.api_port,
            log_level="warning",
        )
    )
    threading.Thread(target=server.run, name="trainops-api", daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return server


def register_simulated_hosts(factory: Any, hosts: Sequence[str], *, gpus_per_host: int, author: str) -> None:
    from service.crud.nodes import register_node
    from service.db import transaction

    with transaction(factory) as session:
        for host in hosts:
            gpus = [
                {"index": i, "uuid": f"GPU-{host}-{i}", "model": "NVIDIA A100-SXM4-80GB", "memory_mb": 81920}
                for i in range(gpus_per_host)
            ]
            register_node(session, hostname=host, author=author, labels={"rack": "simulated"}, gpus=gpus)


def run_demo(*, home: Path, port: int, exit_when_done: bool, timeout_s: float = 900.0) -> int:
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    (home / "diskcheck").mkdir(exist_ok=True)
    os.environ.update(simulated_fleet_env(home, gpus_per_host=GPUS_PER_HOST))
    write_fake_nvml(home, HOSTS, {}, gpus_per_host=GPUS_PER_HOST)

    from service import migrate
    from service.config import Settings
    from service.crud.runs import create_run
    from service.db import engine_from_settings, make_session_factory, transaction
    from service.orchestrator.runtime import (
        build_orchestrator,
        start_embedded_beat,
        start_in_thread,
    )
    from service.recovery.config import load_orchestrator_config
    from service.schemas import RunConfig

    settings = Settings(home=home, api_port=port)
    migrate.upgrade(settings.resolved_database_url)
    factory = make_session_factory(engine_from_settings(settings))
    server = start_api_in_thread(settings, factory)
    register_simulated_hosts(factory, HOSTS, gpus_per_host=GPUS_PER_HOST, author="user:demo")
    with transaction(factory) as session:
        config = RunConfig(
            preset="tiny",
            target_steps=TARGET_STEPS,
            checkpoint_interval=5,
            host_count=2,
            precision="fp16",
            faults=list(FAULTS),
            hyperparameters={"keep_checkpoints": 6},
        )
        run = create_run(
            session,
            name="opt-demo",
            owner="demo",
            config=config.model_dump(mode="json"),
            start=True,
            author="user:demo",
        )
        run_id = run.id

    stop = threading.Event()
    start_embedded_beat(settings, factory, interval_s=3.0, stop=stop)
    cfg = load_orchestrator_config(settings, loop_interval_s=0.5)
    orchestrator = build_orchestrator(settings, factory, cfg)
    start_in_thread(orchestrator)
    console.print(
        f"[bold]trainops demo[/]: control plane on {settings.resolved_api_url} (docs at /docs); run "
        f"'opt-demo' on {', '.join(HOSTS)}; files under {home}"
    )

    started = time.monotonic()
    planted = False
    with Live(console=console, refresh_per_second=4) as live:
        while True:
            view = _snapshot(factory, run_id)
            live.update(_render(view, time.monotonic() - started))
            if not planted and view["attempt"] == 2 and (view["step"] or 0) > GPU_FAULT_AFTER_STEP:
                victim = view["hosts"][-1]
                write_fake_nvml(
                    home,
                    HOSTS,
                    {victim: [{"gpu": 1, "kind": "ecc_dbe", "count": 1}]},
                    gpus_per_host=GPUS_PER_HOST,
                )
                planted = True
            if view["phase"] in ("completed", "needs_attention", "failed", "stopped"):
                break
            if time.monotonic() - started > timeout_s:
                console.print("[red]the demo did not finish in time[/]")
                break
            time.sleep(0.5)
    orchestrator.stop()
    stop.set()
    _report(factory, run_id)
    ok = view["phase"] == "completed"
    if not exit_when_done:
        console.print(
            f"\nThe API stays up for exploring at {settings.resolved_api_url}/docs (bootstrap admin token "
            f"'{settings.bootstrap_admin_token.get_secret_value()}'). Ctrl-C to quit."
        )
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    server.should_exit = True
    return 0 if ok else 1


def _snapshot(factory: Any, run_id: int) -> dict[str, Any]:
    import sqlalchemy as sa

    from service.db import transaction
    from service.models import Attempt, LogEntry, Metric, Run

    with transaction(factory) as session:
        run = session.get(Run, run_id)
        assert run is not None
        attempt = session.scalar(
            sa.select(Attempt).where(Attempt.run_id == run_id).order_by(Attempt.number.desc())
        )
        metric = session.scalar(
            sa.select(Metric)
            .where(Metric.run_id == run_id)
            .order_by(Metric.attempt.desc(), Metric.step.desc())
        )
        last = session.scalars(
            sa.select(LogEntry).where(LogEntry.run_id == run_id).order_by(LogEntry.id.desc()).limit(6)
        ).all()
        return {
            "phase": run.phase.value,
            "restarts": run.restart_count,
            "lr_scale": run.lr_scale,
            "clip": run.clip_override,
            "attempt": attempt.number if attempt else 0,
            "hosts": list(attempt.hosts) if attempt else [],
            "step": metric.step if metric else None,
            "loss": metric.loss if metric else None,
            "loss_scale": metric.loss_scale if metric else None,
            "act_norm": metric.act_norm if metric else None,
            "log": [f"{e.time:%H:%M:%S} {e.message}" for e in reversed(last)],
        }


def _render(view: dict[str, Any], elapsed: float) -> Group:
    table = Table(
        "elapsed",
        "phase",
        "attempt",
        "hosts",
        "step",
        "loss",
        "loss scale",
        "act norm",
        "LR scale",
        "restarts",
        title="opt-demo",
    )

    def fmt(x: float | None, spec: str) -> str:
        return "-" if x is None else format(x, spec)

    table.add_row(
        f"{elapsed:.0f} s",
        view["phase"],
        str(view["attempt"]),
        ",".join(view["hosts"]),
        f"{view['step'] or 0}/{TARGET_STEPS}",
        fmt(view["loss"], ".3f"),
        fmt(view["loss_scale"], "g"),
        fmt(view["act_norm"], ".2f"),
        fmt(view["lr_scale"], "g"),
        str(view["restarts"]),
    )
    log = Table.grid()
    for line in view["log"]:
        log.add_row(line[:160])
    return Group(table, log)


def _report(factory: Any, run_id: int) -> None:
    from service.crud.logbook import list_logbook
    from service.db import transaction
    from service.readmodels.goodput import compute_goodput
    from service.schemas import GoodputPublic, LogEntryPublic

    with transaction(factory) as session:
        entries, _ = list_logbook(session, limit=500)
        rows = [LogEntryPublic.model_validate(e).model_dump(mode="json") for e in entries]
        goodput = GoodputPublic.model_validate(compute_goodput(session, run_id=run_id).as_dict()).model_dump()
    console.rule("logbook")
    print_logbook(rows)
    console.rule("goodput")
    print_goodput(goodput)
