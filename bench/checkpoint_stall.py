"""How long the training loop is blocked by a checkpoint: async save vs sync save of the same state.

One process (gloo, world of one), the OPT-125M preset (125M parameters; seq_len 128 to keep the warm-up step
cheap on CPU), fp32 master weights + AdamW state = ~1.5 GB. Each save goes through the trainer's Checkpointer
(DCP files, manifest with sha256, rename, marker). Sync: the loop waits for all of it. Async: the loop waits
for get_state_dict + the copy into reused CPU buffers; writing, hashing and committing run on background
threads.
The first async save also allocates its staging buffers, so it is reported separately.

    PYTHONPATH=. .venv/bin/python bench/checkpoint_stall.py [--preset 125M] [--rounds 3] [--dir /tmp/stall]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from trainer.checkpoint import Checkpointer
from trainer.config import TrainConfig
from trainer.model import build_model, init_weights, preset_model_config
from trainer.train import build_optimizer, shard_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="125M")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir, removed after)")
    args = parser.parse_args()
    os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29731")
    dist.init_process_group("gloo")
    root = Path(args.dir or tempfile.mkdtemp(prefix="ckpt-stall-"))

    cfg = preset_model_config(args.preset, max_seq_len=128)
    model = build_model(cfg)
    shard_model(model, "fp32", 1, False, torch.device("cpu"))
    model.to_empty(device="cpu")
    init_weights(model, 0)
    optimizer = build_optimizer(model, TrainConfig())
    tokens = torch.randint(0, cfg.vocab_size, (1, 129))

    def train_step() -> float:
        t0 = time.perf_counter()
        loss = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return time.perf_counter() - t0

    train_step()  # creates the Adam state, so the checkpoint holds everything a real one does
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model {args.preset}: {n_params / 1e6:.1f}M parameters; state ~{n_params * 12 / 2**30:.2f} GiB")

    results: dict[str, list[float]] = {}
    step = 0
    for mode in ("sync", "async"):
        ckpt = Checkpointer(
            root / mode,
            rank=0,
            mode=mode,
            keep=2,
            on_commit=lambda *_: None,
            before_marker=lambda _: None,
            log=lambda _: None,
        )
        stalls = []
        for _ in range(args.rounds + (1 if mode == "async" else 0)):
            step += 1
            meta = {"step": step, "tokens": 0, "loss": 0.0}
            stalls.append(ckpt.save(step, model, optimizer, meta, {"cpu": torch.get_rng_state()}))
            after = train_step()  # the next step runs while an async save is still writing
            t0 = time.perf_counter()
            ckpt.wait()
            print(
                f"{mode:5s} save {step}: loop blocked {stalls[-1]:.3f}s; next step {after:.2f}s; "
                f"background finished {time.perf_counter() - t0:.2f}s after it"
            )
        ckpt.close()
        results[mode] = stalls
    sync = statistics.median(results["sync"])
    first_async, steady_async = results["async"][0], statistics.median(results["async"][1:])
    print(f"sync save, loop blocked (median of {args.rounds}): {sync:.3f}s")
    print(
        f"async save, loop blocked (median of {args.rounds}, buffers reused): {steady_async:.3f}s "
        f"(first async save, allocating buffers: {first_async:.3f}s)"
    )
    print(f"ratio async/sync: {steady_async / sync:.3f}  (target <= 0.10)")
    dist.destroy_process_group()
    if args.dir is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
