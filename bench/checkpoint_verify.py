"""Checkpoint verification at 1, 10 and 100 GB of shards: the metadata check against the full re-hash.

For each size, a checkpoint of `--ranks` equal DCP-named shard files (`__<rank>_0.distcp`), per-rank RNG
files, `.metadata` and meta.json, committed through `trainer.checkpoint.commit` with the digests each
"rank" reported (manifest format 2). Shards are real bytes (a random 4 MiB block, repeated, hashed while
written) while the disk has room for them with `--keep-free-gb` to spare; larger sizes are sparse files
(no disk blocks: their full hash measures SHA-256 over zeros from the kernel, CPU only, no disk reads).

Measured, in this one process, per size:
- metadata check: `verify_checkpoint(deep=False)` (what the orchestrator runs before a restore now; no file
  content read), median of `--repeats`;
- full hash: `verify_checkpoint(deep=True)` once, real shards evicted from the page cache first
  (posix_fadvise DONTNEED after fsync), so they are read from disk (what the reconcile loop did before a
  restore; what the background verifier does now, off the loop);
- save-time hashing: one process hashing every shard (rank 0 at commit, before) against the shards hashed
  by `--ranks` processes at once on this machine's cores (each rank its own, now), both on a warm page cache
  as right after the ranks wrote them.
Ratios: full hash / metadata check, and serial / parallel save-time hashing. Everything written is deleted.

`--metadata-only` measures the metadata check alone, on sparse shards whatever the free space: its cost
follows the number of files, so this is how it is measured at a fleet's rank count (`--ranks 8192`: 16,384
shard and RNG files), where the full hash of 8,192 files would measure nothing the 8-rank run does not.

    .venv/bin/python bench/checkpoint_verify.py [--sizes-gb 1,10,100] [--ranks 8] [--dir /tmp/...]
    .venv/bin/python bench/checkpoint_verify.py --ranks 8192 --metadata-only
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from service.orchestrator.checkpoint_verify import MB, expected_throughput, verification_deadline_s
from service.recovery.config import CheckpointVerifyConfig
from trainer.checkpoint import (
    FileDigest,
    checkpoint_name,
    commit,
    payload_sizes,
    sha256_file,
    verify_checkpoint,
)

GB = 1_000_000_000
BLOCK = 4 * 1024 * 1024


def write_real(path: Path, size: int, block: bytes) -> FileDigest:
    """`size` real bytes (the block repeated, its first 8 bytes a counter so no two blocks are equal),
    hashed as written: the digest costs no read-back, as a rank hashing its own shard would not."""
    digest = hashlib.sha256()
    with path.open("wb") as f:
        written, n = 0, 0
        while written < size:
            chunk = (n.to_bytes(8, "little") + block[8:])[: size - written]
            f.write(chunk)
            digest.update(chunk)
            written += len(chunk)
            n += 1
        f.flush()
        os.fsync(f.fileno())
    return FileDigest(size=size, sha256=digest.hexdigest())


def write_sparse(path: Path, size: int, zeros_digest: dict[int, str]) -> FileDigest:
    with path.open("wb") as f:
        f.truncate(size)
    if size not in zeros_digest:  # equal shards: SHA-256 over their zeros once
        digest, left = hashlib.sha256(), size
        zeros = bytes(BLOCK)
        while left:
            digest.update(zeros[: min(left, BLOCK)])
            left -= min(left, BLOCK)
        zeros_digest[size] = digest.hexdigest()
    return FileDigest(size=size, sha256=zeros_digest[size])


def evict(files: list[Path]) -> None:
    for p in files:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def build(root: Path, size: int, ranks: int, *, real: bool) -> tuple[Path, list[Path]]:
    tmp = root / f".tmp_{checkpoint_name(size // GB)}"
    tmp.mkdir(parents=True)
    block, zeros_digest = os.urandom(BLOCK), {}
    reported: dict[int, dict[str, FileDigest]] = {}
    shards = []
    for rank in range(ranks):
        shard = tmp / f"__{rank}_0.distcp"
        digest = (
            write_real(shard, size // ranks, block)
            if real
            else write_sparse(shard, size // ranks, zeros_digest)
        )
        shards.append(shard)
        (tmp / f"rng_rank{rank}.pt").write_bytes(b"rng%d" % rank)
        reported[rank] = {
            shard.name: digest,
            f"rng_rank{rank}.pt": FileDigest(
                size=len(b"rng%d" % rank), sha256=hashlib.sha256(b"rng%d" % rank).hexdigest()
            ),
        }
    (tmp / ".metadata").write_bytes(b"index")
    (tmp / "meta.json").write_text(json.dumps({"step": 1, "tokens": 1}))
    final = root / checkpoint_name(size // GB)
    commit(tmp, final, reported=reported, world_size=ranks)
    return final, [final / s.name for s in shards]


def walk_as_before(path: Path) -> dict[str, int]:
    """The metadata check's walk before 2026-12-02 (the baseline): `rglob` + `is_file` + `stat`, three
    system calls per file where `payload_sizes` makes one."""
    present = {p.relative_to(path).as_posix() for p in sorted(path.rglob("*")) if p.is_file()}
    return {rel: (path / rel).stat().st_size for rel in present}


def timed(fn: Callable[..., object], *args: object, **kwargs: object) -> float:
    started = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - started


def hash_serially(shards: list[Path]) -> None:
    """Before: rank 0 hashed every shard at commit, one after the other."""
    for shard in shards:
        sha256_file(shard)


def hash_in_parallel(pool: ProcessPoolExecutor, shards: list[Path]) -> None:
    """Now: each rank hashes its own shard, all at once (here: as many at once as there are cores)."""
    list(pool.map(sha256_file, shards))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-gb", default="1,10,100")
    parser.add_argument("--ranks", type=int, default=8, help="shard files per checkpoint (one per rank)")
    parser.add_argument("--repeats", type=int, default=5, help="metadata checks per size (median)")
    parser.add_argument(
        "--keep-free-gb", type=float, default=20.0, help="real bytes only while this much stays free"
    )
    parser.add_argument(
        "--dir", default=None, help="where to write (default: a temp dir under /tmp, removed)"
    )
    parser.add_argument(
        "--metadata-only",
        action="store_true",
        help="sparse shards, the metadata check only (no save-time hashing, no full hash)",
    )
    args = parser.parse_args()
    base = Path(args.dir or tempfile.gettempdir())
    workers = min(args.ranks, os.cpu_count() or 1)
    cfg = CheckpointVerifyConfig()
    print(
        f"{args.ranks} shard files per checkpoint; save-time hashing in parallel on {workers} processes "
        f"({os.cpu_count()} cores); free on {base}: {shutil.disk_usage(base).free / GB:.0f} GB"
    )
    header = (
        f"{'size':>6} {'bytes':>6} {'metadata check':>15} {'full hash':>10} {'MB/s':>6} {'full/meta':>10} "
        f"{'save: serial':>13} {'parallel':>9} {'serial/par':>10} {'deadline':>9}"
    )
    print(header)
    for size_gb in [float(s) for s in args.sizes_gb.split(",")]:
        size = int(size_gb * GB)
        root = Path(tempfile.mkdtemp(prefix="ckpt-verify-", dir=base))
        try:
            real = not args.metadata_only and shutil.disk_usage(base).free - size > args.keep_free_gb * GB
            started = time.perf_counter()
            path, shards = build(root, size, args.ranks, real=real)
            build_s = time.perf_counter() - started
            if args.metadata_only:
                meta_s = statistics.median(
                    timed(verify_checkpoint, path, deep=False) for _ in range(args.repeats)
                )
                assert verify_checkpoint(path, deep=False) == (True, "ok")
                files = sum(1 for _ in path.iterdir())
                # the walk alone, the old way against the new one, alternated in this process
                before, now = [], []
                for _ in range(args.repeats):
                    before.append(timed(walk_as_before, path))
                    now.append(timed(payload_sizes, path))
                before_s, now_s = statistics.median(before), statistics.median(now)
                print(
                    f"{size_gb:>4g}GB {'sparse':>6} {meta_s * 1000:>12.2f} ms {'-':>10} {'-':>6} {'-':>10} "
                    f"{'-':>13} {'-':>9} {'-':>10} {'-':>9}   ({files} files; written and committed in "
                    f"{build_s:.1f} s; the walk: before {before_s * 1000:.0f} ms, now {now_s * 1000:.0f} ms, "
                    f"{before_s / now_s:.2f}x)"
                )
                continue
            serial_s = timed(hash_serially, shards)
            with ProcessPoolExecutor(max_workers=workers) as pool:
                for started in [pool.submit(os.getpid) for _ in range(workers)]:  # processes up before timing
                    started.result()
                parallel_s = timed(hash_in_parallel, pool, shards)
            if real:
                evict(shards)
            meta_s = statistics.median(
                timed(verify_checkpoint, path, deep=False) for _ in range(args.repeats)
            )
            assert verify_checkpoint(path, deep=False) == (True, "ok")
            started = time.perf_counter()
            ok = verify_checkpoint(path, deep=True)
            full_s = time.perf_counter() - started
            assert ok == (True, "ok"), ok
            rate = size / full_s
            deadline = verification_deadline_s(
                size, expected_bytes_per_s=expected_throughput(cfg, rate), cfg=cfg
            )
            kind = "real" if real else "sparse"
            print(
                f"{size_gb:>4g}GB {kind:>6} {meta_s * 1000:>12.2f} ms {full_s:>8.2f} s "
                f"{rate / MB:>6.0f} {full_s / meta_s:>9.0f}x {serial_s:>11.2f} s {parallel_s:>7.2f} s "
                f"{serial_s / parallel_s:>9.2f}x {deadline:>7.0f} s"
            )
        finally:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
