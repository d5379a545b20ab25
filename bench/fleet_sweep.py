"""Fleet sweep benchmark: N simulated hosts x 8 GPUs (fake NVML), 3 planted bad GPUs, embedded Celery.

Measures, per fleet size: the quick sweep's wall time and per-host cost, health results ingested per
second, and the time from sweep start until all three bad hosts are cordoned. Scaling is reported as
the per-host cost relative to the smallest fleet measured in the same run.

    .venv/bin/python bench/fleet_sweep.py                 # 128, 256, 512, 1024, 2048 hosts
    .venv/bin/python bench/fleet_sweep.py --sizes 128 512
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from health.celery_app import make_app
from health.config import HealthConfig
from service.crud.nodes import get_node, register_node
from service.db import make_engine, make_session_factory, transaction
from service.fleet.sweep import run_sweep
from service.migrate import upgrade
from service.statemachine import NodeState

GPUS = 8


def bench(size: int, workdir: Path, concurrency: int) -> dict[str, float]:
    hosts = [f"n{i:05d}" for i in range(size)]
    bad = {hosts[size // 7]: "ecc_dbe", hosts[size // 2]: "missing_gpu", hosts[size - 3]: "xid79"}
    faults = {
        hosts[size // 7]: {"faults": [{"gpu": 3, "kind": "ecc_dbe"}]},
        hosts[size // 2]: {"faults": [{"gpu": 6, "kind": "missing_gpu"}]},
        hosts[size - 3]: {"faults": [{"gpu": 1, "kind": "xid", "xid": 79}]},
    }
    script = workdir / f"faults-{size}.json"
    script.write_text(json.dumps({"default_gpus": GPUS, "hosts": faults}))
    url = f"sqlite:///{workdir / f'fleet-{size}.db'}"
    upgrade(url)
    factory = make_session_factory(make_engine(url))
    with transaction(factory) as session:
        for host in hosts:
            gpus = [
                {"index": i, "uuid": f"GPU-{host}-{i}", "model": "NVIDIA H100 80GB HBM3", "memory_mb": 81559}
                for i in range(GPUS)
            ]
            register_node(session, hostname=host, gpus=gpus, author="bench")
    config = HealthConfig(
        fake_nvml_path=script,
        checkpoint_dir=workdir / "ckpt",
        min_free_disk_gb=0.001,
        quick_interval_s=60,
        quick_deadline_s=120,
    )
    app = make_app(config)
    assert app.embedded_worker is not None
    app.embedded_worker._concurrency = concurrency
    app.embedded_worker.ensure(hosts)  # queue set-up is a one-off, not part of a sweep
    try:
        start = time.monotonic()
        report = run_sweep(factory, level="quick", app=app, author="bench")
        seconds = time.monotonic() - start
    finally:
        app.embedded_worker.stop()
    with transaction(factory) as session:
        changed = [get_node(session, hostname=h) for h in bad]
        assert all(n.state is NodeState.cordoned for n in changed), [
            (n.hostname, n.state, n.state_reason) for n in changed
        ]
        to_cordon = max((n.state_changed_at - report.started_at).total_seconds() for n in changed)
    others = [
        (h.host, h.reason) for h in report.hosts if h.state is not NodeState.healthy and h.host not in bad
    ]
    assert not others and not report.missed, (others, report.missed)
    return {
        "hosts": size,
        "sweep_s": seconds,
        "per_host_ms": seconds / size * 1000,
        "results": report.results_ingested,
        "results_per_s": report.results_ingested / seconds,
        "all_3_cordoned_s": to_cordon,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256, 512, 1024, 2048])
    parser.add_argument("--concurrency", type=int, default=4, help="embedded worker threads")
    opts = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in opts.sizes:
            rows.append(bench(size, Path(tmp), opts.concurrency))
            print(json.dumps(rows[-1]), flush=True)
    base = rows[0]["per_host_ms"]
    print(
        f"\n{'hosts':>6} {'sweep s':>8} {'ms/host':>8} {'x base':>7} {'results/s':>10} {'3 cordoned s':>13}"
    )
    for row in rows:
        print(
            f"{row['hosts']:>6} {row['sweep_s']:>8.1f} {row['per_host_ms']:>8.1f}"
            f" {row['per_host_ms'] / base:>7.2f}"
            f" {row['results_per_s']:>10.0f} {row['all_3_cordoned_s']:>13.1f}"
        )


if __name__ == "__main__":
    main()
