"""Scrape benchmark: the Prometheus `/metrics` of the API with its database reading cached (the default,
``TRAINOPS_METRICS_CACHE_TTL_S`` = 5) against read on every scrape (TTL 0), in the same process.

What it does, in one command:

1. creates a fresh PostgreSQL database (dropped at the end) and runs the migrations;
2. fills it like a busy control plane: ``--runs`` running runs, each with ``--steps`` metric rows, three
   attempts, 8 heartbeats and 4 committed checkpoints, and ``--nodes`` hosts with 8 GPUs and the last day's
   diagnostics;
3. builds two apps in this process (``service.main.create_app``), one with the cache, one without, and
   scrapes each ``--scrapes`` times through Starlette's TestClient, in alternating blocks of 5 back-to-back
   scrapes (a Prometheus HA pair, a federation or a dashboard's ad-hoc scrapes share a process's cache:
   back-to-back scrapes stand for them), and prints the median and p90 scrape time of each, the ratio, and
   how many times each read the database. A cached scrape still renders the process's own instruments;
   only the database reading is reused. A reading is served for the TTL from when it *began*: when one
   reading takes longer than the TTL (``--runs 50 --steps 4000 --nodes 128``: ~6 s here), sequential
   scrapes never share one, only concurrent ones do.

    .venv/bin/python bench/metrics_scrape.py            # 20 runs x 1000 steps, 64 nodes (~1 min)
    .venv/bin/python bench/metrics_scrape.py --quick    # small sizes, seconds

Numbers are only comparable inside one run: the machine is shared and noisy, hence the ratio.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import time
import uuid
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fastapi.testclient import TestClient  # noqa: E402
from sqlalchemy.orm import Session  # noqa: E402

from service import migrate  # noqa: E402
from service.config import Settings  # noqa: E402
from service.db import engine_from_settings, make_session_factory, transaction  # noqa: E402
from service.main import create_app  # noqa: E402
from service.models import Attempt, Checkpoint, Diagnostic, Gpu, Heartbeat, Metric, Node, Run  # noqa: E402
from service.statemachine import CheckpointState, DiagnosticStatus, RunPhase  # noqa: E402

SCRAPES_PER_BLOCK = 5
DEFAULT_ADMIN_DSN = os.environ.get("TRAINOPS_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")


def _fill(session: Session, *, runs: int, steps: int, nodes: int) -> None:
    now = dt.datetime.now(dt.UTC)
    for n in range(nodes):
        node = Node(hostname=f"gpu-{n:04d}", last_heartbeat_at=now)
        session.add(node)
        session.flush()
        session.add_all(
            Gpu(node_id=node.id, index=i, uuid=f"GPU-{n}-{i}", model="H100", memory_mb=81_559)
            for i in range(8)
        )
        for kind, measured in (
            ("nvml.thermal", {"gpus": {str(i): {"temperature_c": 60 + i} for i in range(8)}}),
            ("nvml.ecc", {"gpus": {str(i): {"sbe_volatile": 0, "dbe_volatile": 0} for i in range(8)}}),
            ("nvml.xid", {"events": []}),
        ):
            session.add(
                Diagnostic(
                    node_id=node.id,
                    kind=kind,
                    status=DiagnosticStatus.passed,
                    measurements=measured,
                    started_at=now - dt.timedelta(minutes=5),
                    finished_at=now - dt.timedelta(minutes=4),
                )
            )
    for r in range(runs):
        run = Run(name=f"bench-run-{r}", owner="bench", config={"max_restarts": 20}, phase=RunPhase.running)
        session.add(run)
        session.flush()
        for number in (1, 2, 3):
            ended = None if number == 3 else now - dt.timedelta(hours=3 - number)
            session.add(
                Attempt(
                    run_id=run.id,
                    number=number,
                    hosts=[f"gpu-{(r + h) % max(nodes, 1):04d}" for h in range(2)],
                    started_at=now - dt.timedelta(hours=4 - number),
                    ended_at=ended,
                    exit_reason=None if ended is None else "crash",
                    start_step=(number - 1) * steps // 3,
                )
            )
        session.add_all(
            Heartbeat(run_id=run.id, attempt=3, rank=rank, host=f"gpu-{rank:04d}", step=steps - 1, time=now)
            for rank in range(8)
        )
        session.add_all(
            Checkpoint(
                run_id=run.id,
                attempt=3,
                step=step,
                path=f"/runs/bench-run-{r}/checkpoints/step_{step}",
                state=CheckpointState.committed,
                committed_at=now,
            )
            for step in range(steps // 4, steps + 1, steps // 4)
        )
        session.execute(
            Metric.__table__.insert(),
            [
                {
                    "run_id": run.id,
                    "attempt": 3,
                    "step": step,
                    "time": now - dt.timedelta(seconds=steps - step),
                    "tokens": step * 4096,
                    "loss": 5.0 - step / steps,
                    "grad_norm": 1.0,
                    "loss_scale": 65536.0,
                    "act_norm": 3.0,
                    "lr": 3e-4,
                    "clip": 1.0,
                    "tokens_per_s": 1e5,
                    "tflops_per_gpu": 300.0,
                    "step_time_s": 0.4,
                    "values": {"val_loss": 5.1} if step % 100 == 0 else {},
                }
                for step in range(steps)
            ],
        )


def _time_scrapes(client: TestClient, count: int) -> list[float]:
    took = []
    for _ in range(count):
        started = time.perf_counter()
        response = client.get("/metrics")
        took.append(time.perf_counter() - started)
        assert response.status_code == 200, response.text
        assert "trainops_control_plane_database_up 1.0" in response.text
    return took


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--steps", type=int, default=1000, help="metric rows per run")
    parser.add_argument("--nodes", type=int, default=64)
    parser.add_argument("--scrapes", type=int, default=None, help="scrapes of each app (40; --quick 10)")
    parser.add_argument("--ttl", type=float, default=5.0, help="the cached app's TTL (s)")
    parser.add_argument("--quick", action="store_true", help="5 runs x 500 steps, 16 nodes")
    parser.add_argument("--admin-dsn", default=DEFAULT_ADMIN_DSN)
    args = parser.parse_args(argv)
    if args.quick:
        args.runs, args.steps, args.nodes = 5, 500, 16
    if args.scrapes is None:
        args.scrapes = 10 if args.quick else 40

    name = f"trainops_scrape_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(args.admin_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = args.admin_dsn.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1) + f"/{name}"
    try:
        migrate.upgrade(url)
        engine = engine_from_settings(Settings(database_url=url))
        filled = time.perf_counter()
        with transaction(make_session_factory(engine)) as session:
            _fill(session, runs=args.runs, steps=args.steps, nodes=args.nodes)
        engine.dispose()
        print(
            f"filled: {args.runs} runs x {args.steps} metric rows, {args.nodes} nodes x 8 GPUs "
            f"({time.perf_counter() - filled:.1f} s)"
        )
        home = Path(os.environ.get("TMPDIR", "/tmp")) / name
        uncached_app = create_app(Settings(database_url=url, home=home, metrics_cache_ttl_s=0))
        cached_app = create_app(Settings(database_url=url, home=home, metrics_cache_ttl_s=args.ttl))
        with TestClient(uncached_app) as uncached, TestClient(cached_app) as cached:
            _time_scrapes(uncached, 2)  # warm both: connections, the first query plans
            _time_scrapes(cached, 1)
            times: dict[str, list[float]] = {"uncached": [], "cached": []}
            # In blocks of back-to-back scrapes (several scrapers of one process, staggered), the two apps
            # alternating block by block so both see the same moments of a noisy machine.
            for block in range(0, args.scrapes, SCRAPES_PER_BLOCK):
                count = min(SCRAPES_PER_BLOCK, args.scrapes - block)
                times["uncached"] += _time_scrapes(uncached, count)
                times["cached"] += _time_scrapes(cached, count)
            readings = {
                label: app.state.scrape_cache.readings
                for label, app in (("uncached", uncached_app), ("cached", cached_app))
            }
    finally:
        with psycopg.connect(args.admin_dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    result: dict[str, object] = {"runs": args.runs, "steps": args.steps, "nodes": args.nodes}
    for label, took in times.items():
        ordered = sorted(took)
        p50 = statistics.median(ordered)
        p90 = ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]
        result[label] = {"p50_ms": round(p50 * 1000, 2), "p90_ms": round(p90 * 1000, 2)}
        print(f"{label:>8}: p50 {p50 * 1000:8.2f} ms  p90 {p90 * 1000:8.2f} ms  readings {readings[label]}")
    ratio = statistics.median(times["uncached"]) / statistics.median(times["cached"])
    result["ratio_p50"] = round(ratio, 1)
    result["readings"] = readings
    print(
        f"ratio (uncached / cached, p50): {ratio:.1f}x over {args.scrapes} scrapes each, TTL {args.ttl:g} s"
    )
    print("RESULT " + json.dumps(result))
    return result


if __name__ == "__main__":
    main()
