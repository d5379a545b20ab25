"""Atomic, verifiable checkpoints with torch.distributed.checkpoint, and their listing for the orchestrator.

Layout of `<run_dir>/checkpoints/`:

    .tmp_step_00000020/      being written (never loaded; removed at the next start)
    step_00000010/
        __0_0.distcp ...     DCP shards of model + optimizer (fp32 master weights, Adam state)
        .metadata            DCP index
        rng_rank{R}.pt       per-rank RNG states (dropout streams)
        meta.json            step, tokens, loss scale, LR, clip, loss/act-norm windows, data position,
        scheduler
        manifest.json        size and sha256 of every file above, and the rank that hashed it (format 2)
        COMMITTED            marker, written last
        PINNED               optional: retention never deletes this one (written by the orchestrator)

Commit protocol: all files are written (and fsynced) into `.tmp_step_N`; each rank hashes the files it wrote
itself (`rank_files`, `hash_files`: its DCP shards `__<rank>_*.distcp` and its RNG file), in parallel with
the other ranks; rank 0 gathers the digests, hashes what no rank reported (`.metadata`, meta.json), writes
the manifest, renames the directory to `step_N`, fsyncs the parent, then writes `COMMITTED`. A directory
without the marker, with a missing/extra/resized file, or with a bad or incomplete manifest is reported
invalid by `verify_checkpoint(deep=False)` (metadata only, no file content read); `deep=True` also re-hashes
every file. Neither is ever chosen when invalid.

Manifest format 2 (format 1, written before ranks hashed their own shards, is still read):

    {"format": 2, "world_size": W,
     "files": {"<relative path>": {"size": <bytes>, "sha256": "<64 hex>", "rank": <who hashed it>}, ...},
     "ranks": {"<rank>": {"files": <n>, "bytes": <bytes>, "hash_s": <seconds>}, ...},
     "checksum": "sha256:<sha256 of {path: {size, sha256}} as sorted JSON>"}

Every rank in 0..W-1 reports at least its RNG file, so a manifest missing a rank's report is incomplete.

Everything above `Checkpointer` works without torch.distributed (the orchestrator calls it).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MARKER = "COMMITTED"
MANIFEST = "manifest.json"
META = "meta.json"
PINNED = "PINNED"
_UNLISTED = {MARKER, MANIFEST, PINNED}  # files the manifest does not (cannot) cover
TMP_PREFIX = ".tmp_"


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def _step_of(path: Path) -> int | None:
    name = path.name
    if not name.startswith("step_"):
        return None
    try:
        return int(name[5:])
    except ValueError:
        return None


HASH_CHUNK_BYTES = 1 << 22


def sha256_file(path: Path, *, on_chunk: Callable[[int], None] | None = None) -> str:
    """The file's SHA-256 (hex). `on_chunk(n)` runs after each chunk of n bytes: the orchestrator's
    background verification throttles there and stops at its deadline (by raising)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(HASH_CHUNK_BYTES):
            h.update(chunk)
            if on_chunk is not None:
                on_chunk(len(chunk))
    return h.hexdigest()


def _sha256(path: Path) -> str:
    return sha256_file(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def payload_sizes(path: Path) -> dict[str, int]:
    """Every payload file's size by its manifest name, in one walk: one directory read per directory and
    one stat per file. At 8,192 ranks a checkpoint holds ~16,000 files and the metadata check runs before
    every relaunch, on a shared filesystem where each stat is a round trip: `rglob` + `is_file` + `stat`
    cost three per file (measured: seconds per check at 8,192 ranks)."""
    sizes: dict[str, int] = {}
    pending = [(path, "")]
    while pending:
        directory, prefix = pending.pop()
        with os.scandir(directory) as entries:
            for entry in entries:
                rel = prefix + entry.name
                if entry.is_dir(follow_symlinks=False):
                    pending.append((Path(entry.path), rel + "/"))
                elif entry.is_file() and rel not in _UNLISTED:
                    sizes[rel] = entry.stat().st_size
    return dict(sorted(sizes.items()))


@dataclass(frozen=True)
class FileDigest:
    """One file's size and SHA-256, as the rank that wrote it measured them."""

    size: int
    sha256: str


def rank_files(path: Path, rank: int) -> list[Path]:
    """The files `rank` wrote into a checkpoint directory: its torch.distributed.checkpoint shards and its
    RNG state.

    DCP's FileSystemWriter numbers each rank's files from 0 without gaps (`__<rank>_<n>.distcp`, one per
    write bucket or item), so they are found by name, one stat each, until the first number missing. A glob
    would list the whole directory on every rank: at 8,192 ranks that is 8,192 listings of 16,000+ entries
    per save on a shared filesystem (the fleet simulator's finding)."""
    files: list[Path] = []
    n = 0
    while (shard := path / f"__{rank}_{n}.distcp").exists():
        files.append(shard)
        n += 1
    if (rng := path / f"rng_rank{rank}.pt").exists():
        files.append(rng)
    return sorted(files)


def hash_files(root: Path, files: list[Path]) -> dict[str, FileDigest]:
    """Size and SHA-256 of `files` (relative to `root`): what a rank reports for its own files at save."""
    return {
        f.relative_to(root).as_posix(): FileDigest(size=f.stat().st_size, sha256=sha256_file(f))
        for f in files
    }


def _table_checksum(files: dict[str, dict[str, Any]]) -> str:
    """The checkpoint's checksum: sha256 of its file table's sizes and digests (who hashed a file is not
    part of its identity: formats 1 and 2 give the same bytes the same checksum)."""
    table = {rel: {"size": e["size"], "sha256": e["sha256"]} for rel, e in files.items()}
    return "sha256:" + hashlib.sha256(json.dumps(table, sort_keys=True).encode()).hexdigest()


def write_manifest(
    path: Path,
    reported: dict[int, dict[str, FileDigest]] | None = None,
    *,
    world_size: int = 1,
    hash_seconds: dict[int, float] | None = None,
) -> str:
    """Write manifest.json (format 2) from the ranks' reported digests, hashing here only the payload
    files no rank reported (rank 0's `.metadata` and meta.json; everything when `reported` is None).
    Returns the checkpoint checksum ("sha256:..."). Raises ValueError when a reported file is gone or has
    another size now (the report is not of these bytes) or a rank of 0..world_size-1 reported nothing."""
    reported = reported or {}
    seconds = dict(hash_seconds or {})
    files: dict[str, dict[str, Any]] = {}
    for rank, digests in sorted(reported.items()):
        for rel, digest in digests.items():
            files[rel] = {"size": digest.size, "sha256": digest.sha256, "rank": rank}
    present = payload_sizes(path)
    if gone := sorted(set(files) - set(present)):
        raise ValueError(f"reported files missing from {path}: {', '.join(gone)}")
    if resized := sorted(rel for rel, e in files.items() if present[rel] != e["size"]):
        raise ValueError(f"reported files whose size changed since they were hashed: {', '.join(resized)}")
    started = time.perf_counter()
    leftovers = hash_files(path, [path / rel for rel in present if rel not in files])
    for rel, digest in leftovers.items():
        files[rel] = {"size": digest.size, "sha256": digest.sha256, "rank": 0}
    seconds[0] = seconds.get(0, 0.0) + (time.perf_counter() - started)
    ranks: dict[str, dict[str, Any]] = {}
    for entry in files.values():
        summary = ranks.setdefault(str(entry["rank"]), {"files": 0, "bytes": 0, "hash_s": 0.0})
        summary["files"] += 1
        summary["bytes"] += entry["size"]
    for rank, summary in ranks.items():
        summary["hash_s"] = round(seconds.get(int(rank), 0.0), 6)
    if silent := sorted(set(range(world_size)) - {int(r) for r in ranks}):
        raise ValueError(f"ranks that reported no files: {', '.join(map(str, silent))}")
    checksum = _table_checksum(files)
    manifest = {"format": 2, "world_size": world_size, "files": files, "ranks": ranks, "checksum": checksum}
    atomic_write_text(path / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))
    return checksum


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The checkpoint's manifest.json (raises OSError / ValueError when unreadable)."""
    manifest = json.loads((Path(path) / MANIFEST).read_text())
    if not isinstance(manifest, dict):
        raise ValueError("manifest.json is not an object")
    return manifest


_HEX = frozenset("0123456789abcdef")


def _digest_problem(manifest: dict[str, Any], files: dict[str, Any]) -> str | None:
    """What is wrong with the per-file digests a manifest records, or None: every file has a size and a
    SHA-256 and, in format 2, the rank that hashed it, and every rank of the world reported."""
    fmt = manifest.get("format", 1)
    if fmt not in (1, 2):
        return f"unsupported manifest format {fmt!r}"
    world = manifest.get("world_size", 1) if fmt == 2 else None
    if world is not None and (not isinstance(world, int) or world < 1):
        return f"bad world_size {world!r}"
    reporters: set[int] = set()
    for rel, entry in files.items():
        digest = entry.get("sha256") if isinstance(entry, dict) else None
        if not isinstance(digest, str) or len(digest) != 64 or not set(digest) <= _HEX:
            return f"no sha256 digest for {rel}"
        if not isinstance(entry.get("size"), int) or entry["size"] < 0:
            return f"no size for {rel}"
        if world is not None:
            rank = entry.get("rank")
            if not isinstance(rank, int) or not 0 <= rank < world:
                return f"{rel}: hashed by rank {rank!r}, not a rank of the world of {world}"
            reporters.add(rank)
    if world is not None and (silent := sorted(set(range(world)) - reporters)):
        return f"no digests reported by rank(s) {', '.join(map(str, silent))} of {world}"
    return None


def verify_checkpoint(path: str | Path, *, deep: bool = True) -> tuple[bool, str]:
    """(ok, reason). deep=False is the metadata check (no file content read): marker, manifest, every
    file present with its recorded size, the per-file digests (and, format 2, every rank's report)
    present. deep=True also re-hashes every file against its digest."""
    path = Path(path)
    try:
        if not path.is_dir():
            return False, "not a directory"
        if not (path / MARKER).is_file():
            return False, "no COMMITTED marker (torn or in-progress save)"
    except OSError as e:  # a path the OS cannot use (a name over 255 bytes, no permission): not a checkpoint
        return False, f"unusable path: {e.strerror or e}"
    try:
        manifest = read_manifest(path)
        files: dict[str, dict[str, Any]] = manifest["files"]
        if not isinstance(files, dict):
            raise TypeError("files is not an object")
    except (OSError, ValueError, KeyError, TypeError) as e:
        return False, f"unreadable manifest: {e}"
    if META not in files:
        return False, "manifest does not list meta.json"
    if problem := _digest_problem(manifest, files):
        return False, f"incomplete manifest: {problem}"
    try:
        present = payload_sizes(path)
        if missing := sorted(set(files) - set(present)):
            return False, f"missing files: {', '.join(missing)}"
        if extra := sorted(set(present) - set(files)):
            return False, f"files not in manifest: {', '.join(extra)}"
        for rel, entry in files.items():
            if present[rel] != entry["size"]:
                return False, f"size mismatch: {rel}"
            if deep and _sha256(path / rel) != entry["sha256"]:
                return False, f"checksum mismatch: {rel}"
    except OSError as e:  # deleted by retention (or the disk) while we read it
        return False, f"unreadable: {e.strerror or e}"
    return True, "ok"


def verify_share(path: str | Path, *, rank: int, world_size: int) -> tuple[bool, str]:
    """The metadata check, then a re-hash of this rank's share of the files only: those its rank number
    hashed at save (spread over the ranks by number when the world size changed; format 1 by position).
    Run on every rank at once (`Checkpointer.verify`), the ranks re-hash the checkpoint together, each
    1/world_size of it, where every rank hashing every file would read world_size times the checkpoint."""
    path = Path(path)
    ok, why = verify_checkpoint(path, deep=False)
    if not ok:
        return ok, why
    try:
        files: dict[str, dict[str, Any]] = read_manifest(path)["files"]
        for i, (rel, entry) in enumerate(sorted(files.items())):
            if int(entry.get("rank", i)) % world_size == rank and _sha256(path / rel) != entry["sha256"]:
                return False, f"checksum mismatch: {rel}"
    except (OSError, ValueError) as e:  # deleted while we read it
        return False, f"unreadable: {getattr(e, 'strerror', None) or e}"
    return True, "ok"


def read_meta(path: str | Path) -> dict[str, Any]:
    """The checkpoint's metadata (step, tokens, loss_scale, lr, clip, loss, act_norm, windows, ...), no
    tensors."""
    return json.loads((Path(path) / META).read_text())


@dataclass
class CheckpointInfo:
    path: Path
    step: int
    ok: bool
    reason: str
    pinned: bool = False
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens(self) -> int | None:
        return self.meta.get("tokens")

    @property
    def loss_scale(self) -> float | None:
        return self.meta.get("loss_scale")


def checkpoint_precision(path: str | Path, meta: dict[str, Any]) -> str | None:
    """The number format a checkpoint was written in, from its meta.json (`meta`): its `precision`, except
    that `fp16` from before fp16 became OPT's format meant what fp16-mixed means now; such a checkpoint holds
    fp32 weights, and DCP's index (`.metadata`, no tensor read) says so. None when the meta names none."""
    recorded = meta.get("precision")
    if recorded != "fp16":
        return recorded
    import torch
    from torch.distributed.checkpoint import FileSystemReader

    index = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    weights = {getattr(m.properties, "dtype", None) for k, m in index.items() if k.startswith("model.")}
    return "fp16-mixed" if torch.float32 in weights else "fp16"


def checkpoint_dirs(checkpoint_dir: str | Path) -> list[tuple[int, Path]]:
    """Every `step_*` directory as (step, path), oldest first, nothing verified or read."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return []
    found = [
        (step, path) for path in root.iterdir() if (step := _step_of(path)) is not None and path.is_dir()
    ]
    return sorted(found, key=lambda found_dir: found_dir[0])


def list_checkpoints(checkpoint_dir: str | Path, *, deep: bool = True) -> list[CheckpointInfo]:
    """Every `step_*` directory, oldest first, each verified (invalid ones included, with the reason)."""
    infos = []
    for step, path in checkpoint_dirs(checkpoint_dir):
        ok, reason = verify_checkpoint(path, deep=deep)
        meta: dict[str, Any] = {}
        if ok:
            try:
                meta = read_meta(path)
            except (OSError, ValueError) as e:
                ok, reason = False, f"unreadable meta.json: {e}"
        infos.append(
            CheckpointInfo(
                path=path, step=step, ok=ok, reason=reason, pinned=(path / PINNED).exists(), meta=meta
            )
        )
    return infos


def latest_valid_checkpoint(checkpoint_dir: str | Path) -> CheckpointInfo | None:
    valid = [i for i in list_checkpoints(checkpoint_dir) if i.ok]
    return valid[-1] if valid else None


CATALOG_META_KEYS = ("loss_window", "act_norm_window", "data_position", "attempt")


def catalog_record(path: Path, step: int, meta: dict[str, Any], checksum: str | None) -> dict[str, Any]:
    """What the control plane catalogues for a committed checkpoint, all read from the checkpoint itself
    (meta.json, manifest, sizes): the trainer's registration and the orchestrator's discovery on disk send
    the same record, so either order converges on one row."""

    def finite(x: Any) -> float | None:
        return float(x) if isinstance(x, int | float) and math.isfinite(x) else None

    return {
        "attempt": meta.get("attempt"),
        "step": step,
        "tokens": meta.get("tokens"),
        "path": str(path),
        "size_bytes": dir_size(path),
        "checksum": checksum,
        "state": "committed",
        "loss_scale": meta.get("loss_scale"),
        "lr": meta.get("lr"),
        "clip": meta.get("clip"),
        "loss": finite(meta.get("loss")),
        "act_norm": finite(meta.get("act_norm")),
        "metadata": {k: meta[k] for k in CATALOG_META_KEYS if k in meta},
    }


def pin_checkpoint(path: str | Path) -> bool:
    """Exempt a checkpoint from retention (the control plane pins restart candidates). The marker is the
    contract between the control plane and retention: the trainer never asks the control plane.

    Returns False, pinning nothing, when the checkpoint's directory is gone: retention or a re-save of the
    same step (which replaces the directory) can remove it between the caller's check and this write."""
    marker = Path(path) / PINNED
    if marker.exists():
        return True
    try:
        atomic_write_text(marker, "")
        _fsync_dir(Path(path))
    except FileNotFoundError:
        return False
    return True


def unpin_checkpoint(path: str | Path) -> None:
    """Let retention delete a checkpoint again (no-op when it is not pinned or is gone)."""
    try:
        (Path(path) / PINNED).unlink()
        _fsync_dir(Path(path))
    except FileNotFoundError:  # not pinned, or the checkpoint itself is gone
        return


def is_pinned(path: str | Path) -> bool:
    return (Path(path) / PINNED).exists()


def read_checksum(path: str | Path) -> str | None:
    """The checksum its manifest records (sha256 of the file table); None if unreadable."""
    try:
        checksum = json.loads((Path(path) / MANIFEST).read_text()).get("checksum")
    except (OSError, ValueError, AttributeError):
        return None
    return checksum if isinstance(checksum, str) else None


def apply_retention(checkpoint_dir: str | Path, keep: int) -> list[Path]:
    """Delete committed checkpoints beyond the newest `keep` (pinned ones stay) and torn ones older than the
    newest committed. Returns the deleted paths."""
    infos = list_checkpoints(checkpoint_dir, deep=False)
    committed = [i for i in infos if i.ok]
    kept = {i.path for i in committed[-keep:]}
    newest = committed[-1].step if committed else -1
    doomed = [i.path for i in infos if not i.pinned and i.path not in kept and (i.ok or i.step < newest)]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def commit(
    tmp: Path,
    final: Path,
    *,
    before_marker: Callable[[], None] = lambda: None,
    reported: dict[int, dict[str, FileDigest]] | None = None,
    world_size: int = 1,
    hash_seconds: dict[int, float] | None = None,
) -> str:
    """Manifest (from the ranks' `reported` digests, `write_manifest`), rename, marker. Returns the
    checksum. `before_marker` is the fault-injection point."""
    checksum = write_manifest(tmp, reported, world_size=world_size, hash_seconds=hash_seconds)
    if final.exists():  # a torn save of the same step from an earlier attempt
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(final.parent)
    before_marker()
    atomic_write_text(final / MARKER, f"{time.time()}\n")
    _fsync_dir(final)
    return checksum


def read_rng_state(path: Path, rank: int) -> dict[str, Any] | None:
    """A rank's RNG state saved with its checkpoint (None when absent). Loaded with `weights_only=True`: the
    file sits in a directory a trainer token can write to, and a full unpickle would run whatever code a
    crafted file names. RNG state is a dict of byte tensors, which the restricted unpickler accepts."""
    import torch

    rng_file = path / f"rng_rank{rank}.pt"
    if not rng_file.exists():
        return None
    try:
        state = torch.load(rng_file, weights_only=True)
    except Exception as exc:  # UnpicklingError names the refused global; any failure means an unusable file
        raise ValueError(f"{rng_file}: not a plain RNG state ({type(exc).__name__}: {exc})") from exc
    if not isinstance(state, dict):
        raise ValueError(f"{rng_file}: not a plain RNG state (a {type(state).__name__}, not a dict)")
    return state


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ------------------------------------------------------------------------------------------------------------
# Distributed saving and loading (needs an initialised process group).
# ------------------------------------------------------------------------------------------------------------


def _reused_cpu_stager() -> Any:
    """A DCP async stager copying the state into CPU buffers allocated once and reused for every save.

    Allocating (and first-touching) fresh buffers is most of a naive staging copy's cost; with reused
    buffers the
    training loop's stall is one memcpy of the local shards. One save is in flight at a time, so reuse is
    safe.
    """
    import torch
    from torch.distributed._state_dict_utils import _copy_state_dict, _create_cpu_state_dict
    from torch.distributed.checkpoint.staging import AsyncStager

    class ReusedCPUStager(AsyncStager):
        _synchronize_after_execute = False

        def __init__(self) -> None:
            self._buffers: dict[str, Any] | None = None

        def stage(self, state_dict: dict[str, Any]) -> dict[str, Any]:
            if self._buffers is None:
                self._buffers = _create_cpu_state_dict(state_dict, pin_memory=torch.cuda.is_available())
            return _copy_state_dict(state_dict, self._buffers)

        def synchronize_staging(self) -> None:
            """Staging is a blocking copy; nothing to wait for."""

        def close(self) -> None:
            self._buffers = None

    return ReusedCPUStager()


class Checkpointer:
    """Saves (sync or async) and loads the sharded training state; rank 0 commits, registers, prunes."""

    def __init__(
        self,
        checkpoint_dir: Path,
        *,
        rank: int,
        mode: str,
        keep: int,
        on_commit: Callable[[CheckpointInfo, str], None],
        before_marker: Callable[[int], None],
        log: Callable[[str], None],
    ) -> None:
        import torch.distributed as dist

        self.dir = checkpoint_dir
        self.rank = rank
        self.mode = mode
        self.keep = keep
        self.on_commit = on_commit
        self.before_marker = before_marker
        self.log = log
        self.pending: Future[Any] | None = None
        self._committer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-commit")
        # Thread-mode async_save deadlocks on the default group (its collectives would interleave with
        # training's); a dedicated gloo group keeps them apart. The gather of the ranks' shard digests at
        # commit runs on it too, in either mode (gloo gathers Python objects on CPU whatever the training
        # backend).
        self._pg = dist.new_group(backend="gloo")
        self.world_size = dist.get_world_size()
        self._stager = _reused_cpu_stager()
        if rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            for stale in self.dir.glob(TMP_PREFIX + "*"):
                shutil.rmtree(stale, ignore_errors=True)
        dist.barrier()

    def save(self, step: int, model: Any, optimizer: Any, meta: dict[str, Any], rng: dict[str, Any]) -> float:
        """Start (async) or do (sync) the save of `step`; returns seconds the caller was blocked."""
        import torch
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        t0 = time.perf_counter()
        self.wait()  # one save in flight; also surfaces a failed previous save
        tmp = self.dir / f"{TMP_PREFIX}{checkpoint_name(step)}"
        tmp.mkdir(parents=True, exist_ok=True)
        torch.save(rng, tmp / f"rng_rank{self.rank}.pt")
        if self.rank == 0:
            atomic_write_text(tmp / META, json.dumps(meta, indent=1, sort_keys=True))
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        if self.mode == "sync":
            dcp.save(state, checkpoint_id=str(tmp))
            self._finish(step, tmp, meta, None)
        else:
            upload = dcp.async_save(
                state, checkpoint_id=str(tmp), process_group=self._pg, async_stager=self._stager
            )
            self.pending = self._committer.submit(self._finish, step, tmp, meta, upload)
        return time.perf_counter() - t0

    def _gather_digests(self, tmp: Path) -> tuple[dict[int, dict[str, FileDigest]], dict[int, float]]:
        """Every rank hashes the files it wrote (in parallel with the others; rank 0 no longer reads the
        whole checkpoint), and rank 0 gathers the digests and each rank's hashing time. A rank that cannot
        hash its files reports the error, which fails the save on rank 0 (no manifest, no marker)."""
        import torch.distributed as dist

        started = time.perf_counter()
        try:
            report: Any = hash_files(tmp, rank_files(tmp, self.rank))
        except OSError as exc:
            report = f"rank {self.rank} could not hash its files: {exc}"
        elapsed = time.perf_counter() - started
        gathered: list[Any] | None = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object((report, elapsed), gathered, dst=0, group=self._pg)
        if gathered is None:
            return {}, {}
        if errors := [r for r, _ in gathered if isinstance(r, str)]:
            raise RuntimeError("; ".join(errors))
        return (
            {rank: r for rank, (r, _) in enumerate(gathered)},
            {rank: s for rank, (_, s) in enumerate(gathered)},
        )

    def _finish(self, step: int, tmp: Path, meta: dict[str, Any], upload: Future[Any] | None) -> None:
        if upload is not None:
            upload.result()  # returns after every rank's shards are written (DCP's finish step)
        reported, seconds = self._gather_digests(tmp)
        if self.rank != 0:
            return
        final = self.dir / checkpoint_name(step)
        checksum = commit(
            tmp,
            final,
            before_marker=lambda: self.before_marker(step),
            reported=reported,
            world_size=self.world_size,
            hash_seconds=seconds,
        )
        info = CheckpointInfo(path=final, step=step, ok=True, reason="ok", meta=meta)
        self.log(f"checkpoint committed: {final} ({checksum})")
        self.on_commit(info, checksum)
        for path in apply_retention(self.dir, self.keep):
            self.log(f"retention: deleted {path.name}")

    def wait(self) -> None:
        """Block until the in-flight save is committed (raises if it failed)."""
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.result()

    def verify(self, path: Path) -> tuple[bool, str]:
        """Whether the checkpoint is loadable, decided by all ranks together: each re-hashes its share
        (`verify_share`) and every rank learns every finding, so all agree."""
        import torch.distributed as dist

        mine = verify_share(path, rank=self.rank, world_size=self.world_size)
        found: list[Any] = [None] * self.world_size
        dist.all_gather_object(found, mine, group=self._pg)
        failures = [f"rank {r}: {why}" for r, (ok, why) in enumerate(found) if not ok]
        return not failures, "; ".join(failures) or "ok"

    def latest_loadable(self) -> CheckpointInfo | None:
        """The newest committed checkpoint that all ranks verify together (`verify`); None if none."""
        for info in reversed(list_checkpoints(self.dir, deep=False)):
            if not info.ok:
                continue
            ok, why = self.verify(info.path)
            if ok:
                return info
            self.log(f"checkpoint {info.path.name} not loadable: {why}")
        return None

    def load(self, path: Path, model: Any, optimizer: Any) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """Load model+optimizer shards in place; returns (meta, this rank's RNG state or None)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=str(path))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        return read_meta(path), read_rng_state(path, self.rank)

    def close(self) -> None:
        self.wait()
        self._committer.shutdown(wait=True)
        self._stager.close()
