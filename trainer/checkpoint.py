"""Atomic, verifiable checkpoints with torch.distributed.checkpoint, and their listing for the orchestrator.

Layout of `<run_dir>/checkpoints/`:

    .tmp_step_00000020/      being written (never loaded; removed at the next start)
    step_00000010/
        __0_0.distcp ...     DCP shards of model + optimizer (fp32 master weights, Adam state)
        .metadata            DCP index
        rng_rank{R}.pt       per-rank RNG states (dropout streams)
        meta.json            step, tokens, loss scale, LR, clip, loss/act-norm windows, data position,
        scheduler
        manifest.json        size and sha256 of every file above
        COMMITTED            marker, written last
        PINNED               optional: retention never deletes this one (written by the orchestrator)

Commit protocol: all files are written (and fsynced) into `.tmp_step_N`, rank 0 writes the manifest, renames
the directory to `step_N`, fsyncs the parent, then writes `COMMITTED`. A directory without the marker, with a
missing/extra/changed file, or with a bad manifest is reported invalid by `verify_checkpoint` and never
chosen.

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


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


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


def _payload_files(path: Path) -> list[Path]:
    return sorted(
        p for p in path.rglob("*") if p.is_file() and p.relative_to(path).as_posix() not in _UNLISTED
    )


def write_manifest(path: Path) -> str:
    """Hash every payload file into manifest.json; returns the checkpoint checksum ("sha256:...")."""
    files = {
        p.relative_to(path).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in _payload_files(path)
    }
    digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
    atomic_write_text(
        path / MANIFEST,
        json.dumps({"format": 1, "files": files, "checksum": f"sha256:{digest}"}, indent=1, sort_keys=True),
    )
    return f"sha256:{digest}"


def verify_checkpoint(path: str | Path, *, deep: bool = True) -> tuple[bool, str]:
    """(ok, reason). deep=False checks marker, manifest and sizes only (no hashing)."""
    path = Path(path)
    try:
        if not path.is_dir():
            return False, "not a directory"
        if not (path / MARKER).is_file():
            return False, "no COMMITTED marker (torn or in-progress save)"
    except OSError as e:  # a path the OS cannot use (a name over 255 bytes, no permission): not a checkpoint
        return False, f"unusable path: {e.strerror or e}"
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files: dict[str, dict[str, Any]] = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return False, f"unreadable manifest: {e}"
    if META not in files:
        return False, "manifest does not list meta.json"
    present = {p.relative_to(path).as_posix() for p in _payload_files(path)}
    if missing := sorted(set(files) - present):
        return False, f"missing files: {', '.join(missing)}"
    if extra := sorted(present - set(files)):
        return False, f"files not in manifest: {', '.join(extra)}"
    try:
        for rel, entry in files.items():
            f = path / rel
            if f.stat().st_size != entry["size"]:
                return False, f"size mismatch: {rel}"
            if deep and _sha256(f) != entry["sha256"]:
                return False, f"checksum mismatch: {rel}"
    except OSError as e:  # deleted by retention (or the disk) while we read it
        return False, f"unreadable: {e.strerror or e}"
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


def list_checkpoints(checkpoint_dir: str | Path, *, deep: bool = True) -> list[CheckpointInfo]:
    """Every `step_*` directory, oldest first, each verified (invalid ones included, with the reason)."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return []
    infos = []
    for path in root.iterdir():
        step = _step_of(path)
        if step is None or not path.is_dir():
            continue
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
    return sorted(infos, key=lambda i: i.step)


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


def commit(tmp: Path, final: Path, *, before_marker: Callable[[], None] = lambda: None) -> str:
    """Manifest, rename, marker. Returns the checksum. `before_marker` is the fault-injection point."""
    checksum = write_manifest(tmp)
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
        # training's); a dedicated gloo group keeps them apart.
        self._pg = dist.new_group(backend="gloo") if mode == "async" else None
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

    def _finish(self, step: int, tmp: Path, meta: dict[str, Any], upload: Future[Any] | None) -> None:
        if upload is not None:
            upload.result()  # on rank 0 this returns after every rank's shards are written
        if self.rank != 0:
            return
        final = self.dir / checkpoint_name(step)
        checksum = commit(tmp, final, before_marker=lambda: self.before_marker(step))
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
