"""`trainops demo --exit` on a busy machine, N times in a row: does the main job reach its target?

    .venv/bin/python bench/demo_under_load.py --runs 5

Each run starts a busy-loop process pinned on each core (bench/load.py), runs the demo in a fresh home, and
reports its exit status, wall time, the attempts' endings and the restore decision after the divergence,
read back from the demo's database. The baseline is the same demo without the busy loops (`--baseline`),
run in the same command, so the slowdown is a ratio of two runs on the same machine.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.load import busy_cores  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def one_demo(home: Path) -> dict[str, Any]:
    import sqlalchemy as sa

    from service.db import make_engine, make_session_factory, transaction
    from service.models import Attempt, Checkpoint, Run

    env = {**os.environ, "TRAINOPS_HOME": str(home), "COLUMNS": "200"}
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "service.cli", "demo", "--exit", "--port", str(free_port())],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    wall = time.perf_counter() - started
    engine = make_engine(f"sqlite:///{home / 'demo' / 'trainops.db'}")
    with transaction(make_session_factory(engine)) as session:
        run = session.scalar(sa.select(Run).where(Run.name == "opt-demo"))
        attempts = list(
            session.scalars(sa.select(Attempt).where(Attempt.run_id == run.id).order_by(Attempt.number))
        )
        restore = None
        for a in attempts:
            if a.exit_reason == "divergence":
                nxt = next((b for b in attempts if b.number == a.number + 1), None)
                ck = session.get(Checkpoint, nxt.restored_from_checkpoint_id) if nxt else None
                restore = {
                    "onset": (a.findings or {}).get("onset_step"),
                    "restored_step": ck.step if ck else None,
                }
        result = {
            "exit": done.returncode,
            "phase": run.phase.value,
            "wall_s": round(wall, 1),
            "endings": [a.exit_reason for a in attempts],
            "divergence_restore": restore,
        }
    engine.dispose()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--baseline", action="store_true", help="first one run without the busy loops")
    args = parser.parse_args()
    baseline = None
    with tempfile.TemporaryDirectory() as tmp:
        if args.baseline:
            baseline = one_demo(Path(tmp) / "baseline")
            print("baseline (idle machine):", json.dumps(baseline))
        results = []
        for i in range(args.runs):
            with busy_cores() as pids:
                res = one_demo(Path(tmp) / f"loaded-{i}")
            results.append(res)
            ratio = f", {res['wall_s'] / baseline['wall_s']:.2f}x the baseline" if baseline else ""
            print(f"loaded run {i + 1} ({len(pids)} busy cores){ratio}:", json.dumps(res), flush=True)
    reached = sum(r["phase"] == "completed" for r in results)
    print(f"RESULT {reached}/{len(results)} loaded runs reached the target")


if __name__ == "__main__":
    main()
