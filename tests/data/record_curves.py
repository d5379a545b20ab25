"""Record real training curves of the embedded trainer as test data for the divergence and restart rules.

    .venv/bin/python tests/data/record_curves.py            # every curve missing from tests/data
    .venv/bin/python tests/data/record_curves.py --force    # re-record them all
    .venv/bin/python tests/data/record_curves.py --relabel  # rewrite the recorded files' source and precision

Each curve is a run of the real trainer (torchrun, 2 CPU ranks, an fp16 format with dynamic loss scaling) and
its rank-0 metrics file, kept as `{"source": ..., "precision": ..., "exit_code": ..., "points": [{step, loss,
loss_scale, act_norm, actv_norm, grad_norm, lr}]}`. `precision` is the `--precision` the run used:
`fp16-mixed` for the curves recorded before `fp16` became OPT's format (scale from 65536, window 1000; the
flag then meant what fp16-mixed means now), `fp16` for the fidelity-mode curves (scale from 4, window
2^14 / (data-parallel size x update frequency), exit 43 at the floor; docs/trainer.md). The points carry the
final layer's activation norm in both definitions (docs/reporting-contract.md, "Training signals"), metaseq's
mean `actv_norm` and the RMS `act_norm`. healthy_tiny_run and diverged_tiny_run were recorded from the control
plane (fp16-mixed) before `actv_norm` existed and carry the RMS only.
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

from trainer.contract import EXIT_DIVERGED, EXIT_LOSS_SCALE_FLOOR

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent


@dataclass(frozen=True)
class Curve:
    name: str
    preset: str
    seed: int
    steps: int
    precision: str  # the trainer's --precision: fp16 (OPT's format) or fp16-mixed (the earlier one)
    faults: tuple[str, ...] = ()  # trainer fault specs, e.g. diverge:step=60,factor=100

    def describe(self) -> str:
        what = f"the {self.preset} preset on 2 CPU ranks ({self.precision}), seed {self.seed}"
        what += f", {self.steps} steps"
        if self.faults:
            what += f", with the fault{'s' if len(self.faults) > 1 else ''} {', '.join(self.faults)}"
            what += " (trainer/faults.py)"
        return what + "; rank 0's metrics file, recorded by tests/data/record_curves.py"


def overflows(*steps: int) -> tuple[str, ...]:
    """An fp16 gradient overflow at each of `steps` (an inf in one gradient: the step is skipped and the loss
    scale halved), as a healthy run meets now and then and a collapsing one at every step."""
    return tuple(f"inf_grad:step={s}" for s in steps)


MIXED, FIDELITY = "fp16-mixed", "fp16"
CURVES = (
    Curve(name="healthy_tiny_seed7", preset="tiny", seed=7, steps=150, precision=MIXED),
    Curve(
        name="diverged_tiny_seed7_at60",
        preset="tiny",
        seed=7,
        steps=75,
        precision=MIXED,
        faults=("diverge:step=60,factor=100",),
    ),
    Curve(name="healthy_tiny_seed99", preset="tiny", seed=99, steps=150, precision=MIXED),
    Curve(
        name="diverged_tiny_seed99_at110",
        preset="tiny",
        seed=99,
        steps=125,
        precision=MIXED,
        faults=("diverge:step=110,factor=30",),
    ),
    Curve(name="healthy_small_seed5", preset="small", seed=5, steps=90, precision=MIXED),
    Curve(
        name="diverged_small_seed5_at50",
        preset="small",
        seed=5,
        steps=65,
        precision=MIXED,
        faults=("diverge:step=50,factor=100",),
    ),
    # fp16 as OPT trained (`--precision fp16`: scale from 4, window 2^14 / (2 ranks x 1) = 8192 steps, so a
    # halved scale does not come back within a recording). Three transient overflows take the healthy runs'
    # scale from 4 to 0.5, where it stays; their twins share them and then diverge, or overflow at every step
    # until the trainer stops at its floor (1e-4) with exit 43.
    Curve(
        name="healthy_fp16_tiny_seed7",
        preset="tiny",
        seed=7,
        steps=150,
        precision=FIDELITY,
        faults=overflows(40, 70, 100),
    ),
    Curve(
        name="diverged_fp16_tiny_seed7_at110",
        preset="tiny",
        seed=7,
        steps=130,
        precision=FIDELITY,
        faults=(*overflows(40, 70, 100), "diverge:step=110,factor=100"),
    ),
    Curve(
        name="floored_fp16_tiny_seed7_at111",
        preset="tiny",
        seed=7,
        steps=150,
        precision=FIDELITY,
        faults=overflows(40, 70, 100, *range(111, 131)),
    ),
    Curve(
        name="healthy_fp16_small_seed5",
        preset="small",
        seed=5,
        steps=90,
        precision=FIDELITY,
        faults=overflows(25, 40, 55),
    ),
    Curve(
        name="diverged_fp16_small_seed5_at60",
        preset="small",
        seed=5,
        steps=75,
        precision=FIDELITY,
        faults=(*overflows(25, 40, 55), "diverge:step=60,factor=100"),
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
            curve.precision,
            "--checkpoint-interval",
            "0",
            "--run-dir",
            str(run_dir),
        ]
        for fault in curve.faults:
            args += ["--fault", fault]
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINOPS_")}
        done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
        if done.returncode not in (0, EXIT_DIVERGED, EXIT_LOSS_SCALE_FLOOR):
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
    return {
        "source": curve.describe(),
        "precision": curve.precision,
        "exit_code": done.returncode,
        "points": points,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="re-record curves that exist")
    parser.add_argument(
        "--relabel", action="store_true", help="only rewrite the source and precision of recorded curves"
    )
    parser.add_argument("names", nargs="*", help="only these curves")
    args = parser.parse_args()
    for curve in CURVES:
        path = HERE / f"{curve.name}.json"
        if args.names and curve.name not in args.names:
            continue
        if args.relabel:
            if path.exists():
                kept = json.loads(path.read_text())
                data = {"source": curve.describe(), "precision": curve.precision}
                path.write_text(json.dumps({**kept, **data}, indent=None, separators=(",", ":")) + "\n")
            continue
        if path.exists() and not args.force:
            continue
        data = record(curve)
        path.write_text(json.dumps(data, indent=None, separators=(",", ":")) + "\n")
        print(f"{path.name}: {len(data['points'])} steps, exit {data['exit_code']}")


if __name__ == "__main__":
    main()
