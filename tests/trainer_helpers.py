"""Launch the real trainer (torchrun via trainer.launch) from tests; read what it leaves in its run dir."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from trainer.telemetry import read_metrics

REPO = Path(__file__).resolve().parents[1]
TINY = ["--preset", "tiny", "--micro-batch-size", "2", "--global-batch-tokens", "512", "--threads", "1"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def trainer_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINOPS_")}
    env.update(PYTHONPATH=str(REPO), TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1", OMP_NUM_THREADS="1")
    env.update(extra or {})
    return env


def launch_command(run_dir: Path, *flags: str, nproc: int = 2) -> list[str]:
    return [
        sys.executable,
        "-m",
        "trainer.launch",
        "--nnodes",
        "1",
        "--nproc-per-node",
        str(nproc),
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"127.0.0.1:{free_port()}",
        "--monitor-interval",
        "0.2",
        "--",
        *TINY,
        "--run-dir",
        str(run_dir),
        *flags,
    ]


def run_trainer(
    run_dir: Path, *flags: str, nproc: int = 2, env: dict[str, str] | None = None, timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        launch_command(run_dir, *flags, nproc=nproc),
        env=trainer_env(env),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_trainer(
    run_dir: Path, *flags: str, nproc: int = 2, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        launch_command(run_dir, *flags, nproc=nproc),
        env=trainer_env(env),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def metrics(run_dir: Path, rank: int = 0) -> list[dict[str, Any]]:
    return read_metrics(run_dir / "metrics" / f"rank{rank}.jsonl")


def model_weights(checkpoint: Path, tmp: Path) -> dict[str, torch.Tensor]:
    """Full (unsharded) model tensors of a DCP checkpoint, read without a process group."""
    out = tmp / f"{checkpoint.parent.parent.name}-{checkpoint.name}.pt"
    dcp_to_torch_save(checkpoint, out)
    return torch.load(out, weights_only=False)["model"]


def explain(result: subprocess.CompletedProcess[str]) -> str:
    out, err = result.stdout[-4000:], result.stderr[-4000:]
    return f"exit {result.returncode}\n--- stdout ---\n{out}\n--- stderr ---\n{err}"
