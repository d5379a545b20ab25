"""Cost of telemetry, heartbeats and reporting: tokens/s with them on vs off, side by side in one run.

Both arms are the same 2-rank torchrun training (FSDP2 over gloo on CPU), alternated round by round so machine
noise hits both; the figure is the median over rounds of each round's on/off ratio. "on" = the training
signals (activation and embedding probes, per-layer-group gradient statistics, parameter norm, the all_reduce
of maxima), every rank's heartbeat sender, per-rank metrics JSONL, and rank 0's reporter posting every step to
a local HTTP sink; "off" = `--no-telemetry`. A run's tokens/s comes from the median step time of its steady
steps (summary.json). Also prints MFU against this CPU's measured fp32 matmul rate (no peak spec exists for a
shared CPU).

    PYTHONPATH=. .venv/bin/python bench/trainer_overhead.py [--preset tiny] [--steps 60] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]


class Sink(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        self.server.posts += 1  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: object) -> None:
        """Quiet."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_matmul_tflops(threads: int) -> float:
    torch.set_num_threads(threads)
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    for _ in range(3):
        a @ b
    n, t0 = 20, time.perf_counter()
    for _ in range(n):
        a @ b
    return 2 * 1024**3 * n / (time.perf_counter() - t0) / 1e12


def telemetry_cost_s(tmp: Path, url: str, preset: str, tokens: int) -> float:
    """In-process cost of one step's telemetry work (what `--no-telemetry` removes) on one rank: the
    activation probes' four hooks on activations of the run's shape, the per-group gradient and parameter
    statistics beyond the gradient norm (zero counts, maxima, parameter norm) and the all_reduce of maxima
    (here in a world of one), the named values, recording the heartbeat, the metrics line, and a reporter
    enqueue. The gradient statistics run on the whole unsharded model, twice a rank's shard at 2 ranks."""
    import torch.distributed as dist
    import torch.nn.functional as F

    from trainer.model import build_model, preset_model_config
    from trainer.reporting import HeartbeatSender, HttpReporter
    from trainer.telemetry import (
        ActivationProbes,
        ClipCounter,
        GradientStats,
        Heartbeat,
        MetricsFile,
        reduce_step_stats,
    )

    cfg = preset_model_config(preset, dropout=0.0)
    model = build_model(cfg, device="cpu")
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.02)
    seq = min(cfg.max_seq_len, tokens)
    batch = torch.randint(0, cfg.vocab_size, (max(1, tokens // seq), seq))
    F.cross_entropy(model(batch).flatten(0, 1), batch.flatten()).backward()
    probes = ActivationProbes(model, torch.device("cpu"))
    detailed = GradientStats(model, n_layers=cfg.n_layers, detailed=True)
    plain = GradientStats(model, n_layers=cfg.n_layers, detailed=False)
    clips = ClipCounter()
    h = torch.randn(batch.shape[0], seq, cfg.d_model)
    pos = torch.randn(seq, cfg.d_model)
    block, tok_embed, pos_embed, first = (
        model.final_block,
        model.embed_tokens,
        model.embed_positions,
        model.layers[0],
    )
    sender = HeartbeatSender(url=url, token="t", run_id=1, attempt=1, log=lambda _: None)
    beat, lines = Heartbeat(sender, rank=0, host="h"), MetricsFile(tmp / "m", rank=0)
    rep = HttpReporter(url=url, token="t", run_id=1, attempt=1, spool_dir=tmp / "spool", log=lambda _: None)
    point = {"step": 1, "loss": 5.0, "grad_norm": 1.0}
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    times = []
    for step in range(300):
        t0 = time.perf_counter()
        # the hooks, as a training forward pass calls them
        probes._token_embedding(tok_embed, (), h)
        probes._position_embedding(pos_embed, (), pos)
        probes._first_block_input(first, (h,))
        probes._final_block(block, (), h)
        # the statistics telemetry adds over the gradient norm the clip needs anyway (`plain`)
        stats = reduce_step_stats(
            torch.tensor(5.0),
            probes.take(),
            detailed.local_sums(),
            1,
            maxima=detailed.local_maxima(),
            group_numel=detailed.group_numel,
        )
        values = {**stats.values(), **clips.observe(stats.grad_norm, 1.0)}
        lines.write({**point, "step": step, "values": values})
        rep.metric({**point, "step": step, "values": values})
        beat.beat(step)
        spent = time.perf_counter() - t0
        t1 = time.perf_counter()
        plain.local_sums()  # what the loop computes with telemetry off too
        times.append(spent - (time.perf_counter() - t1))
    dist.destroy_process_group()
    rep.close()
    sender.close()
    lines.close()
    return statistics.median(times)


def _time_maxima_all_reduce(rank: int, port: int, n: int, out: Any) -> None:
    import torch.distributed as dist

    from trainer.contract import TRAINER_LAYER_GROUPS

    store = dist.TCPStore("127.0.0.1", port, 2, is_master=rank == 0)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2)
    maxima = torch.zeros(len(TRAINER_LAYER_GROUPS) + 3, dtype=torch.float64)  # + GPU memory on CUDA
    times = []
    for _ in range(n):
        dist.barrier()
        t0 = time.perf_counter()
        dist.all_reduce(maxima, op=dist.ReduceOp.MAX)
        times.append(time.perf_counter() - t0)
    if rank == 0:
        out.put(statistics.median(times))
    dist.destroy_process_group()


def maxima_all_reduce_s(n: int = 500) -> float:
    """Median time of the one collective telemetry adds per step, the all_reduce (max) of the per-group
    gradient maxima, between 2 gloo processes on this machine (the in-process timing runs in a world of
    one)."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_time_maxima_all_reduce, args=(r, port, n, out)) for r in (0, 1)]
    for proc in procs:
        proc.start()
    median = float(out.get(timeout=120))
    for proc in procs:
        proc.join(30)
    return median


def run(run_dir: Path, flags: list[str], env: dict[str, str]) -> dict[str, float]:
    cmd = [
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
        "--run-dir",
        str(run_dir),
        *flags,
    ]
    result = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"trainer failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return json.loads((run_dir / "summary.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--precision", default="fp32")
    args = parser.parse_args()
    server = ThreadingHTTPServer(("127.0.0.1", 0), Sink)
    server.posts = 0  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base_env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    on_env = {
        **base_env,
        "TRAINOPS_API_URL": f"http://127.0.0.1:{server.server_port}",
        "TRAINOPS_TOKEN": "bench",
        "TRAINOPS_RUN_ID": "1",
        "TRAINOPS_ATTEMPT": "1",
    }
    flags = [
        "--preset",
        args.preset,
        "--max-steps",
        str(args.steps),
        "--precision",
        args.precision,
        "--checkpoint-interval",
        "0",
        "--threads",
        "1",
        "--report-interval-s",
        "0.5",
    ]
    arms: dict[str, list[dict[str, float]]] = {"on": [], "off": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for arm in ("on", "off") if r % 2 == 0 else ("off", "on"):
                extra = ["--telemetry"] if arm == "on" else ["--no-telemetry"]
                summary = run(Path(tmp) / f"{arm}{r}", [*flags, *extra], on_env if arm == "on" else base_env)
                arms[arm].append(summary)
                print(
                    f"round {r} telemetry {arm:3s}: {summary['tokens_per_s']:9.1f} tokens/s "
                    f"(median step {summary['median_step_time_s'] * 1e3:.1f} ms)",
                    flush=True,
                )
    with tempfile.TemporaryDirectory() as tmp:
        per_step = telemetry_cost_s(
            Path(tmp), on_env["TRAINOPS_API_URL"], args.preset, int(arms["off"][0]["batch_tokens"]) // 2
        )
    server.shutdown()
    collective = maxima_all_reduce_s()
    tps = {arm: statistics.median(s["tokens_per_s"] for s in runs) for arm, runs in arms.items()}
    paired = statistics.median(
        on["tokens_per_s"] / off["tokens_per_s"] for on, off in zip(arms["on"], arms["off"], strict=True)
    )
    tflops = statistics.median(s["tflops_per_device"] for s in arms["on"])
    peak = cpu_matmul_tflops(1)
    print(f"tokens/s (median over rounds) telemetry on: {tps['on']:.1f}  off: {tps['off']:.1f}")
    print(
        f"on/off tokens/s, median of per-round ratios: {paired:.4f} "
        f"(cost {100 * (1 - paired):.2f}%, target <= 2%)"
    )
    off_step = statistics.median(s["median_step_time_s"] for s in arms["off"])
    print(
        f"telemetry work per step, timed in-process: {per_step * 1e6:.0f} us = "
        f"{100 * per_step / off_step:.3f}% of the median step ({off_step * 1e3:.1f} ms)"
    )
    print(
        f"the all_reduce of maxima telemetry adds, 2 gloo processes: {collective * 1e6:.0f} us = "
        f"{100 * collective / off_step:.3f}% of the median step; telemetry work in all: "
        f"{100 * (per_step + collective) / off_step:.3f}%"
    )
    print(f"control-plane requests received during 'on' runs: {server.posts}")  # type: ignore[attr-defined]
    print(
        f"model TFLOP/s per rank: {tflops:.4f}; this CPU's 1-thread fp32 matmul: {peak:.4f} TFLOP/s; "
        f"MFU vs that: {tflops / peak:.3f}"
    )


if __name__ == "__main__":
    main()
