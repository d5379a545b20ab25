"""Record real training curves of the embedded trainer as test data for the divergence and restart rules.

    .venv/bin/python tests/data/record_curves.py            # every curve missing from tests/data
    .venv/bin/python tests/data/record_curves.py --force    # re-record them all

Each curve is a run of the real trainer (torchrun, 2 CPU ranks, fp16 with dynamic loss scaling) and its
rank-0 metrics file, kept as `{"source": ..., "points": [{step, loss, loss_scale, act_norm, actv_norm,
grad_norm, lr}]}`: the final layer's activation norm in both definitions (docs/reporting-contract.md,
"Training signals"), metaseq's mean `actv_norm` and the RMS `act_norm`. healthy_tiny_run and diverged_tiny_run
were recorded from the control plane before `actv_norm` existed and carry the RMS only.
A diverged curve and the healthy curve of the same preset and seed share every step before the fault (same
init, data order and dropout), so the healthy one is the course a restart from a checkpoint before the onset
would have taken without the fault: the table test in tests/test_recorded_curves.py reads it that way.
Nothing here runs in the test suite; the recordings are committed.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent


@dataclass(frozen=True)
class Curve:
    name: str
    preset: str
    seed: int
    steps: int
    fault: str | None = None  # a trainer fault spec, e.g. diverge:step=60,factor=100

    def describe(self) -> str:
        what = f"the {self.preset} preset on 2 CPU ranks (fp16), seed {self.seed}, {self.steps} steps"
        if self.fault:
            what += f", with the fault {self.fault} (trainer/faults.py)"
        return what + "; rank 0's metrics file, recorded by tests/data/record_curves.py"


CURVES = (
    Curve(name="healthy_tiny_seed7", preset="tiny", seed=7, steps=150),
    Curve(
        name="diverged_tiny_seed7_at60", preset="tiny", seed=7, steps=75, fault="diverge:step=60,factor=100"
    ),
    Curve(name="healthy_tiny_seed99", preset="tiny", seed=99, steps=150),
    Curve(
        name="diverged_tiny_seed99_at110",
        preset="tiny",
        seed=99,
        steps=125,
        fault="diverge:step=110,factor=30",
    ),
    Curve(name="healthy_small_seed5", preset="small", seed=5, steps=90),
    Curve(
        name="diverged_small_seed5_at50", preset="small", seed=5, steps=65, fault="diverge:step=50,factor=100"
    ),
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def record(curve: Curve) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        args = [
            sys.executable,
            "-m",
            "trainer.launch",
            "--nnodes",
            "1",
            "--nproc-per-node",
            "2",
            "--rdzv-backend",
            "c10d",
            "--rdzv-endpoint",
            f"127.0.0.1:{free_port()}",
            "--",
            "--preset",
            curve.preset,
            "--seed",
            str(curve.seed),
            "--max-steps",
            str(curve.steps),
            "--precision",
            "fp16",
            "--checkpoint-interval",
            "0",
            "--run-dir",
            str(run_dir),
        ]
        if curve.fault:
            args += ["--fault", curve.fault]
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINOPS_")}
        done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
        if done.returncode not in (0, 42):
            raise SystemExit(f"{curve.name}: the trainer exited {done.returncode}\n{done.stderr[-3000:]}")
        points = []
        for line in (run_dir / "metrics" / "rank0.jsonl").read_text().splitlines():
            row = json.loads(line)
            points.append(
                {
                    k: row.get(k)
                    for k in ("step", "loss", "loss_scale", "act_norm", "actv_norm", "grad_norm", "lr")
                }
            )
    return {"source": curve.describe(), "exit_code": done.returncode, "points": points}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="re-record curves that exist")
    parser.add_argument("names", nargs="*", help="only these curves")
    args = parser.parse_args()
    for curve in CURVES:
        path = HERE / f"{curve.name}.json"
        if (args.names and curve.name not in args.names) or (path.exists() and not args.force):
            continue
        data = record(curve)
        path.write_text(json.dumps(data, indent=None, separators=(",", ":")) + "\n")
        print(f"{path.name}: {len(data['points'])} steps, exit {data['exit_code']}")


if __name__ == "__main__":
    main()
