"""The full re-hash of committed checkpoints, off the reconcile loop.

Before a restore the orchestrator runs only the metadata check (`verify_checkpoint(deep=False)`: marker,
manifest, every file present with its recorded size, every rank's digests present; no file content read).
Re-reading the bytes of a 175B checkpoint (~2.5 TB) takes tens of minutes, so it happens here: a bounded
pool of daemon worker threads owned by the orchestrator process hashes each newly committed checkpoint
against its manifest, newest first, one checkpoint per worker. The loop's only part is
`CheckpointVerifier.step` once per pass: it records the verifications that have finished (a few catalog
writes) and hands the free workers the next unverified checkpoints (one catalog query). It never waits for
a worker, so one run's verification cannot delay another run's detection
(`tests/orchestrator/test_checkpoint_verify.py`).

Each verification has a deadline derived from the checkpoint's size: `deadline_floor_s` plus
`deadline_factor` x bytes / expected throughput, the expected throughput being the smallest of the configured
`hash_throughput_mb_s`, the throughput this pool measured on its last large verifications, and the read
limit. Outcomes, stored in the catalog (`state`, and `metadata.deep_verification` with the evidence) and in
the logbook:

- verified: every byte matches its manifest -> state `verified`;
- corrupt: a file's bytes do not match -> state `corrupt`, never restored (restart candidates skip corrupt
  rows), unhealthy;
- metadata_failed: the metadata check fails on a directory still there (a file missing or resized, or
  retention deleting it right now): recorded, state unchanged; the check before a restore marks it corrupt
  if it still fails then;
- deadline_missed: not finished in time -> recorded as such (warning), the state stays `committed` and the
  checkpoint stays restorable on its metadata check; not retried for the same file (its checksum);
- error: the orchestrator could not read a file (permissions): recorded, state unchanged;
- vanished / replaced: the directory went away (retention) or now holds a re-save: nothing is recorded for
  the old file (the catalog sync and `mark_vanished_checkpoints` account for it).
"""

from __future__ import annotations

import enum
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from service.crud.checkpoints import checkpoint_path_problem, mark_checkpoint
from service.crud.logbook import write_log
from service.db import transaction
from service.models import Checkpoint, Run, utcnow
from service.recovery.config import CheckpointVerifyConfig
from service.statemachine import CheckpointState, LogKind, Severity
from trainer.checkpoint import read_manifest, sha256_file, verify_checkpoint
from trainer.contract import checkpoints_dir

log = logging.getLogger("trainops.orchestrator")

MB = 1_000_000
VERIFICATION_KEY = "deep_verification"  # the catalog row's metadata key holding the last verification


class Outcome(enum.StrEnum):
    verified = "verified"
    corrupt = "corrupt"
    metadata_failed = "metadata_failed"
    deadline_missed = "deadline_missed"
    error = "error"
    vanished = "vanished"
    replaced = "replaced"


@dataclass(frozen=True)
class VerifyJob:
    checkpoint_id: int
    run_id: int
    step: int
    path: Path
    checksum: str
    expected_bytes_per_s: float  # the throughput the deadline assumes (`expected_throughput`)


@dataclass(frozen=True)
class VerifyResult:
    job: VerifyJob
    outcome: Outcome
    reason: str
    total_bytes: int = 0  # the manifest's bytes
    hashed_bytes: int = 0
    elapsed_s: float = 0.0
    deadline_s: float | None = None
    file: str | None = None  # the file that did not match, or was being hashed at the deadline

    def evidence(self) -> dict[str, Any]:
        rate = self.hashed_bytes / self.elapsed_s / MB if self.elapsed_s > 0 else None
        return {
            "outcome": self.outcome.value,
            "reason": self.reason,
            "checksum": self.job.checksum,
            "total_bytes": self.total_bytes,
            "hashed_bytes": self.hashed_bytes,
            "elapsed_s": round(self.elapsed_s, 6),
            "deadline_s": round(self.deadline_s, 6) if self.deadline_s is not None else None,
            "throughput_mb_s": round(rate, 1) if rate is not None else None,
            "expected_mb_s": round(self.job.expected_bytes_per_s / MB, 1),
            "file": self.file,
            "at": utcnow().isoformat(),
        }


def expected_throughput(cfg: CheckpointVerifyConfig, measured_bytes_per_s: float | None) -> float:
    """Bytes per second one worker is expected to hash: the smallest of the configured throughput, the
    measured one and the read limit (a deadline must not assume more than any of them allows)."""
    rates = [cfg.hash_throughput_mb_s * MB]
    if measured_bytes_per_s is not None:
        rates.append(measured_bytes_per_s)
    if cfg.read_limit_mb_s is not None:
        rates.append(cfg.read_limit_mb_s * MB)
    return min(rates)


def verification_deadline_s(
    size_bytes: int, *, expected_bytes_per_s: float, cfg: CheckpointVerifyConfig
) -> float:
    """The deadline of hashing `size_bytes`: the floor plus `deadline_factor` x the expected time."""
    return cfg.deadline_floor_s + cfg.deadline_factor * size_bytes / expected_bytes_per_s


class _DeadlineMissed(Exception):
    pass


class _Cancelled(Exception):
    pass


def hash_checkpoint(
    job: VerifyJob,
    *,
    cfg: CheckpointVerifyConfig,
    cancelled: threading.Event,
) -> VerifyResult:
    """Re-hash every file of the checkpoint against its manifest, within its deadline (run on a worker)."""
    clock = time.monotonic
    started = clock()
    ok, why = verify_checkpoint(job.path, deep=False)
    if not ok:
        if not job.path.is_dir():
            return VerifyResult(job, Outcome.vanished, why)
        return VerifyResult(job, Outcome.metadata_failed, why, elapsed_s=clock() - started)
    try:
        manifest = read_manifest(job.path)
    except (OSError, ValueError) as exc:
        return VerifyResult(job, Outcome.vanished, f"manifest went away: {exc}")
    if manifest.get("checksum") != job.checksum:
        return VerifyResult(job, Outcome.replaced, f"now holds {manifest.get('checksum')} (a re-save)")
    files: dict[str, dict[str, Any]] = manifest["files"]
    total = sum(int(e["size"]) for e in files.values())
    deadline = verification_deadline_s(total, expected_bytes_per_s=job.expected_bytes_per_s, cfg=cfg)
    limit = cfg.read_limit_mb_s * MB if cfg.read_limit_mb_s is not None else None
    hashed = 0

    def after_chunk(n: int) -> None:
        nonlocal hashed
        hashed += n
        if cancelled.is_set():
            raise _Cancelled
        elapsed = clock() - started
        if limit is not None and (ahead := hashed / limit - elapsed) > 0:
            if elapsed + ahead > deadline:  # the throttle alone would overrun: miss now, not later
                raise _DeadlineMissed
            if cancelled.wait(ahead):
                raise _Cancelled
            elapsed = clock() - started
        if elapsed > deadline:
            raise _DeadlineMissed

    def result(outcome: Outcome, reason: str, file: str | None = None) -> VerifyResult:
        return VerifyResult(
            job,
            outcome,
            reason,
            total_bytes=total,
            hashed_bytes=hashed,
            elapsed_s=clock() - started,
            deadline_s=deadline,
            file=file,
        )

    for rel, entry in sorted(files.items()):
        try:
            digest = sha256_file(job.path / rel, on_chunk=after_chunk)
        except _DeadlineMissed:
            return result(
                Outcome.deadline_missed,
                f"not finished within its deadline of {deadline:.1f} s "
                f"({hashed:,} of {total:,} bytes hashed)",
                rel,
            )
        except OSError as exc:
            if not job.path.is_dir():
                return result(Outcome.vanished, f"deleted while it was hashed: {exc}", rel)
            return result(Outcome.error, f"could not read {rel}: {exc.strerror or exc}", rel)
        if digest != entry["sha256"]:
            return result(
                Outcome.corrupt,
                f"checksum mismatch: {rel} (sha256 {digest}, manifest {entry['sha256']})",
                rel,
            )
    return result(Outcome.verified, f"all {len(files)} files match their manifest digests ({total:,} bytes)")


class _DaemonPool:
    """A fixed set of daemon worker threads. Not `ThreadPoolExecutor`: its threads are joined at interpreter
    exit, and a process exiting mid-verification would wait for a 2.5 TB hash to finish."""

    def __init__(self, workers: int) -> None:
        self._jobs: queue.SimpleQueue[tuple[Future[VerifyResult], Callable[[], VerifyResult]] | None] = (
            queue.SimpleQueue()
        )
        self._threads = [
            threading.Thread(target=self._work, name=f"trainops-ckpt-verify-{i}", daemon=True)
            for i in range(workers)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, fn: Callable[[], VerifyResult]) -> Future[VerifyResult]:
        future: Future[VerifyResult] = Future()
        self._jobs.put((future, fn))
        return future

    def _work(self) -> None:
        while (item := self._jobs.get()) is not None:
            future, fn = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except BaseException as exc:  # handed to the loop, which records it as an error
                future.set_exception(exc)

    def shutdown(self) -> None:
        for _ in self._threads:
            self._jobs.put(None)


class CheckpointVerifier:
    """The orchestrator's background verification: `step(run_ids)` once per reconcile pass."""

    def __init__(
        self,
        session_factory: sessionmaker[Session],
        cfg: CheckpointVerifyConfig,
        *,
        runs_dir: Path,
        author: str,
    ) -> None:
        self.factory = session_factory
        self.cfg = cfg
        self.runs_dir = runs_dir
        self.author = author
        self.measured_bytes_per_s: float | None = None
        """Throughput of the last large verifications (exponentially weighted), once there was one."""
        self.in_flight: dict[int, tuple[VerifyJob, Future[VerifyResult]]] = {}
        self._cancelled = threading.Event()
        """Set to stop the jobs submitted so far (`forget`, `shutdown`); later jobs get a new one."""
        self._pool: _DaemonPool | None = None  # started with the first job: most tests never hash

    def step(self, run_ids: Sequence[int]) -> list[VerifyResult]:
        """Record the verifications that finished since the last pass, then give the free workers the
        newest unverified checkpoints of `run_ids`. Never waits for a worker."""
        done = self.collect()
        self.submit_due(run_ids)
        return done

    def collect(self) -> list[VerifyResult]:
        results = []
        for checkpoint_id in [cid for cid, (_, f) in self.in_flight.items() if f.done()]:
            job, future = self.in_flight[checkpoint_id]
            try:
                result = future.result()
            except _Cancelled:
                del self.in_flight[checkpoint_id]
                continue
            except Exception as exc:  # a bug in hashing: recorded, never silently dropped
                result = VerifyResult(job, Outcome.error, f"verification failed: {type(exc).__name__}: {exc}")
            with transaction(self.factory) as session:  # raises (database down): collected again next pass
                record_verification(session, result, author=self.author)
            del self.in_flight[checkpoint_id]
            self._learn(result)
            results.append(result)
        return results

    def submit_due(self, run_ids: Sequence[int]) -> None:
        free = self.cfg.workers - len(self.in_flight)
        if free <= 0 or not run_ids:
            return
        with transaction(self.factory) as session:
            rows = session.execute(
                sa.select(
                    Checkpoint.id,
                    Checkpoint.run_id,
                    Checkpoint.step,
                    Checkpoint.path,
                    Checkpoint.checksum,
                    Checkpoint.meta,
                    Run.name,
                )
                .join(Run, Run.id == Checkpoint.run_id)
                .where(
                    Checkpoint.run_id.in_(list(run_ids)),
                    Checkpoint.state == CheckpointState.committed,
                    Checkpoint.checksum.is_not(None),
                )
                .order_by(Checkpoint.id.desc())
            ).all()
        for row in rows:
            if free <= 0:
                break
            if (
                row.id in self.in_flight
                or ((row.meta or {}).get(VERIFICATION_KEY) or {}).get("checksum") == row.checksum
            ):
                continue  # being verified, or this file's verification already ended (a missed deadline)
            if checkpoint_path_problem(row.path, checkpoint_dir=checkpoints_dir(self.runs_dir / row.name)):
                continue  # outside the run's directory: never restored, never read
            job = VerifyJob(
                checkpoint_id=row.id,
                run_id=row.run_id,
                step=row.step,
                path=Path(row.path),
                checksum=row.checksum,
                expected_bytes_per_s=expected_throughput(self.cfg, self.measured_bytes_per_s),
            )
            if self._pool is None:
                self._pool = _DaemonPool(self.cfg.workers)
            self.in_flight[row.id] = (
                job,
                self._pool.submit(
                    lambda job=job, cancelled=self._cancelled: hash_checkpoint(
                        job, cfg=self.cfg, cancelled=cancelled
                    )
                ),
            )
            free -= 1

    def _learn(self, result: VerifyResult) -> None:
        """Large completed verifications teach the pool its real throughput (throttled reads included)."""
        if result.outcome not in (Outcome.verified, Outcome.corrupt) or result.elapsed_s <= 0:
            return
        if result.hashed_bytes < self.cfg.measure_min_mb * MB:
            return
        rate = result.hashed_bytes / result.elapsed_s
        previous = self.measured_bytes_per_s
        self.measured_bytes_per_s = rate if previous is None else 0.5 * (previous + rate)

    def forget(self) -> None:
        """Another orchestrator leads: it verifies the checkpoints itself. Jobs still queued are dropped and
        those hashing stop at their next chunk (a deposed leader could not record their results anyway:
        its writes are fenced, and its disk reads would only slow the new leader's); nothing in flight is
        kept, so leading again starts afresh."""
        self._cancelled.set()
        self._cancelled = threading.Event()
        for _, future in self.in_flight.values():
            future.cancel()
        self.in_flight.clear()

    def shutdown(self) -> None:
        """Stop the workers at their next chunk; what they were verifying is verified again next start."""
        self._cancelled.set()
        if self._pool is not None:
            self._pool.shutdown()


def record_verification(session: Session, result: VerifyResult, *, author: str) -> None:
    """Store a verification's outcome on its catalog row, if the row still describes the file that was
    hashed, with one logbook entry carrying the evidence."""
    job = result.job
    if result.outcome in (Outcome.vanished, Outcome.replaced):
        return
    ckpt = session.get(Checkpoint, job.checkpoint_id, with_for_update=True)
    if (
        ckpt is None
        or ckpt.checksum != job.checksum
        or ckpt.path != str(job.path)
        or ckpt.state not in (CheckpointState.committed, CheckpointState.verified)
    ):
        return  # re-saved, deleted or marked by someone else meanwhile: this result is not about it any more
    evidence = result.evidence()
    ckpt.meta = {**(ckpt.meta or {}), VERIFICATION_KEY: evidence}
    if result.outcome in (Outcome.verified, Outcome.corrupt):
        intact = result.outcome == Outcome.verified
        mark_checkpoint(
            session,
            checkpoint_id=ckpt.id,
            author=author,
            state=CheckpointState.verified if intact else CheckpointState.corrupt,
            healthy=None if intact else False,
            reason=f"full verification: {result.reason} in {result.elapsed_s:.1f} s"
            if intact
            else f"full verification: its bytes do not match its manifest: {result.reason}; never restored",
            evidence={"verification": evidence},
        )
    else:
        what = {
            Outcome.deadline_missed: "missed its deadline (not corrupt: it stays committed, restorable on "
            "its metadata check)",
            Outcome.metadata_failed: "found it failing its metadata check (state unchanged: the check before "
            "a restore marks it corrupt if it still fails then)",
        }.get(result.outcome, "could not be completed (state unchanged)")
        write_log(
            session,
            kind=LogKind.diagnosis,
            severity=Severity.warning,
            author=author,
            run_id=job.run_id,
            message=f"checkpoint step {job.step} ({job.path}): full verification {what}: {result.reason}",
            evidence={"checkpoint_id": ckpt.id, "step": job.step, "verification": evidence},
        )
