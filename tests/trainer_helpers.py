"""Launch the real trainer (torchrun via trainer.launch) from tests; read what it leaves in its run dir."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
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


def train_one_process(run_dir: Path, precision: str, *flags: str) -> subprocess.CompletedProcess[str]:
    """One rank of the tiny preset (`trainer.train`, no torchrun), 256-token batches, saving every 2 steps."""
    return subprocess.run(
        [
            *(sys.executable, "-m", "trainer.train", "--preset", "tiny", "--precision", precision),
            *("--micro-batch-size", "2", "--global-batch-tokens", "256", "--threads", "1"),
            *("--run-dir", str(run_dir), "--checkpoint-interval", "2", *flags),
        ],
        cwd=REPO,
        env=trainer_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


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


def optimizer_state(checkpoint: Path, tmp: Path) -> dict[str, torch.Tensor]:
    """Full (unsharded) optimizer state tensors of a DCP checkpoint, flattened to "<param>.<key>" names."""
    out = tmp / f"{checkpoint.parent.parent.name}-{checkpoint.name}.pt"
    if not out.exists():
        dcp_to_torch_save(checkpoint, out)
    state = torch.load(out, weights_only=False)["optim"]["state"]
    return {f"{param}.{key}": value for param, values in state.items() for key, value in values.items()}


def explain(result: subprocess.CompletedProcess[str]) -> str:
    out, err = result.stdout[-4000:], result.stderr[-4000:]
    return f"exit {result.returncode}\n--- stdout ---\n{out}\n--- stderr ---\n{err}"


class _Receiver(BaseHTTPRequestHandler):
    """Records every POST (path, Authorization, JSON body) and answers with the server's `status`."""

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        server: Any = self.server
        server.requests.append((self.path, self.headers["Authorization"], body))
        if self.path.endswith("heartbeats"):  # what the control plane answers a heartbeat: 204, no body
            self.send_response(204)
            self.end_headers()
            return
        self.send_response(server.status)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: object) -> None:
        """Quiet."""


def start_receiver(port: int = 0, status: int = 200) -> Any:
    """A real local HTTP endpoint on a thread; `.requests` lists what arrived, in order. `.shutdown()` it."""
    server: Any = ThreadingHTTPServer(("127.0.0.1", port), _Receiver)
    server.requests = []
    server.status = status
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server
