"""Checkpoint verification that scales: metadata only before a restore, the full re-hash on the
orchestrator's own worker threads, with a deadline from the checkpoint's size, its outcome in the catalog
and the logbook, and never in the way of another run's detection."""

from __future__ import annotations

import datetime as dt
import json
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pydantic
import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from service import migrate
from service.crud.checkpoints import CatalogSource, upsert_checkpoint
from service.crud.logbook import list_logbook
from service.crud.nodes import register_node
from service.crud.runs import create_run
from service.db import make_engine, make_session_factory, transaction
from service.fleet.gateway import SweepHealthGateway
from service.models import Attempt, Checkpoint
from service.orchestrator.checkpoint_verify import (
    MB,
    VERIFICATION_KEY,
    CheckpointVerifier,
    Outcome,
    VerifyJob,
    expected_throughput,
    hash_checkpoint,
    verification_deadline_s,
)
from service.orchestrator.launchers.base import LaunchSpec, ProcessStatus
from service.orchestrator.leadership import Holder, LeadershipChange, LeadershipLost
from service.orchestrator.loop import Orchestrator
from service.recovery.config import CheckpointVerifyConfig, OrchestratorConfig
from service.statemachine import CheckpointState
from trainer.checkpoint import catalog_record, checkpoint_name, commit, read_checksum, read_meta
from trainer.contract import checkpoints_dir


def save_checkpoint(run_dir: Path, step: int, *, shard_bytes: int) -> Path:
    """A committed checkpoint of one rank whose shard holds `shard_bytes` real (non-sparse) bytes."""
    tmp = checkpoints_dir(run_dir) / f".tmp_{checkpoint_name(step)}"
    tmp.mkdir(parents=True)
    with (tmp / "__0_0.distcp").open("wb") as f:
        block = bytes(range(256)) * 4096  # 1 MiB
        for _ in range(shard_bytes // len(block)):
            f.write(block)
        f.write(block[: shard_bytes % len(block)])
    (tmp / "rng_rank0.pt").write_bytes(b"rng")
    (tmp / ".metadata").write_bytes(b"index")
    (tmp / "meta.json").write_text(json.dumps({"step": step, "tokens": step * 512, "attempt": 1}))
    final = checkpoints_dir(run_dir) / checkpoint_name(step)
    commit(tmp, final)
    return final


def flip_a_byte(path: Path) -> None:
    """Bit rot: the size stays, so only re-reading the bytes can tell."""
    shard = path / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))


def job_for(path: Path, *, expected_mb_s: float = 1000.0) -> VerifyJob:
    checksum = read_checksum(path)
    assert checksum is not None
    return VerifyJob(
        checkpoint_id=1,
        run_id=1,
        step=10,
        path=path,
        checksum=checksum,
        expected_bytes_per_s=expected_mb_s * MB,
    )


# ---- the deadline ------------------------------------------------------------------------------------------


def test_the_deadline_follows_the_size_and_the_slowest_of_configured_measured_and_limited_throughput() -> (
    None
):
    cfg = CheckpointVerifyConfig(hash_throughput_mb_s=500, deadline_factor=3, deadline_floor_s=30)
    assert expected_throughput(cfg, None) == 500 * MB
    assert expected_throughput(cfg, 200 * MB) == 200 * MB  # measured slower than configured: trust it
    assert expected_throughput(cfg, 900 * MB) == 500 * MB
    assert expected_throughput(cfg.model_copy(update={"read_limit_mb_s": 100.0}), 200 * MB) == 100 * MB
    # a 175B checkpoint (2.5 TB) at 500 MB/s: 5,000 s expected, 15,030 s allowed
    assert verification_deadline_s(2_500_000_000_000, expected_bytes_per_s=500 * MB, cfg=cfg) == 15_030


@pytest.mark.parametrize(
    "bad",
    [
        {"workers": 0},
        {"hash_throughput_mb_s": 0},
        {"read_limit_mb_s": 0},
        {"deadline_factor": 0.5},  # a deadline shorter than the expected time calls healthy work late
        {"deadline_floor_s": -1},
    ],
)
def test_the_verification_knobs_are_checked(bad: dict[str, float]) -> None:
    with pytest.raises(pydantic.ValidationError, match="checkpoint_verify"):
        OrchestratorConfig(checkpoint_verify=bad)


# ---- one verification ----------------------------------------------------------------------------------


def test_a_verification_tells_intact_corrupt_late_and_gone_apart(tmp_path: Path) -> None:
    cfg = CheckpointVerifyConfig(deadline_floor_s=60)
    never = threading.Event()
    good = save_checkpoint(tmp_path / "good", 10, shard_bytes=6 * MB)
    result = hash_checkpoint(job_for(good), cfg=cfg, cancelled=never)
    assert result.outcome == Outcome.verified and result.hashed_bytes == result.total_bytes > 6 * MB

    rotten = save_checkpoint(tmp_path / "rotten", 10, shard_bytes=MB)
    flip_a_byte(rotten)
    result = hash_checkpoint(job_for(rotten), cfg=cfg, cancelled=never)
    assert (result.outcome, result.file) == (Outcome.corrupt, "__0_0.distcp")
    assert result.reason.startswith("checksum mismatch: __0_0.distcp")

    # expected far faster than any disk, no floor: the deadline passes during the first chunk
    strict = CheckpointVerifyConfig(hash_throughput_mb_s=1e9, deadline_factor=1, deadline_floor_s=0)
    result = hash_checkpoint(job_for(good, expected_mb_s=1e9), cfg=strict, cancelled=never)
    assert result.outcome == Outcome.deadline_missed and 0 < result.hashed_bytes < result.total_bytes
    assert "not finished within its deadline" in result.reason

    # the read limit holds each worker to its rate: 6 MB at 30 MB/s takes at least 0.2 s
    throttled = cfg.model_copy(update={"read_limit_mb_s": 30.0})
    result = hash_checkpoint(job_for(good, expected_mb_s=30), cfg=throttled, cancelled=never)
    assert result.outcome == Outcome.verified and result.elapsed_s >= 0.2

    replaced = job_for(good)
    replaced = VerifyJob(**{**replaced.__dict__, "checksum": "sha256:" + "0" * 64})
    assert hash_checkpoint(replaced, cfg=cfg, cancelled=never).outcome == Outcome.replaced
    (rotten / "rng_rank0.pt").unlink()  # a file missing (or retention deleting it right now): not its bytes
    result = hash_checkpoint(job_for(rotten), cfg=cfg, cancelled=never)
    assert (result.outcome, result.reason) == (Outcome.metadata_failed, "missing files: rng_rank0.pt")
    job = job_for(good)
    shutil.rmtree(good)  # retention deleted it: not corrupt, nothing to record
    assert hash_checkpoint(job, cfg=cfg, cancelled=never).outcome == Outcome.vanished


def catalogue(factory: sessionmaker[Session], run_id: int, path: Path) -> int:
    """The orchestrator's disk sync of one checkpoint (the same record the trainer registers)."""
    with transaction(factory) as session:
        record = catalog_record(path, read_meta(path)["step"], read_meta(path), read_checksum(path))
        ckpt, _ = upsert_checkpoint(
            session, run_id=run_id, data=record, source=CatalogSource.disk, author="test"
        )
        return ckpt.id


def settle(verifier: CheckpointVerifier, run_ids: list[int], *, timeout_s: float = 20.0) -> None:
    """Pass after pass (as the loop does) until nothing is in flight and nothing new starts."""
    deadline = time.monotonic() + timeout_s
    verifier.step(run_ids)
    while verifier.in_flight and time.monotonic() < deadline:
        time.sleep(0.02)
        verifier.step(run_ids)
    assert not verifier.in_flight


def test_a_missed_deadline_is_recorded_as_such_and_not_as_corrupt(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'trainops.db'}"
    migrate.upgrade(url)
    factory = make_session_factory(make_engine(url))
    with transaction(factory) as session:
        run_id = create_run(
            session, name="big", owner="test", config={"target_steps": 5}, start=False, author="t"
        ).id
    path = save_checkpoint(tmp_path / "runs" / "big", 10, shard_bytes=MB)
    checkpoint_id = catalogue(factory, run_id, path)
    strict = CheckpointVerifyConfig(hash_throughput_mb_s=1e9, deadline_factor=1, deadline_floor_s=0)
    verifier = CheckpointVerifier(factory, strict, runs_dir=tmp_path / "runs", author="system:orchestrator")
    settle(verifier, [run_id])
    with transaction(factory) as session:
        row = session.get(Checkpoint, checkpoint_id)
        assert row.state == CheckpointState.committed  # still restorable on its metadata check
        evidence = row.meta[VERIFICATION_KEY]
        assert evidence["outcome"] == "deadline_missed" and evidence["checksum"] == row.checksum
        assert (
            evidence["deadline_s"] < evidence["elapsed_s"]
            and evidence["hashed_bytes"] < evidence["total_bytes"]
        )
        entries = [e for e in list_logbook(session, run_id=run_id)[0] if "full verification" in e.message]
        assert len(entries) == 1 and "missed its deadline (not corrupt" in entries[0].message
        assert entries[0].severity.value == "warning" and entries[0].evidence["verification"] == evidence
    settle(verifier, [run_id])  # the same file is not tried again pass after pass
    with transaction(factory) as session:
        assert (
            len([e for e in list_logbook(session, run_id=run_id)[0] if "full verification" in e.message]) == 1
        )
    verifier.shutdown()


# ---- in the loop ------------------------------------------------------------------------------------------


@dataclass
class ExitOnCue:
    """Attempts that run until the test makes one exit (by its tag); nothing is started."""

    kind: str = "scripted"
    exits: dict[str, int] = field(default_factory=dict)

    def prepare(self, spec: LaunchSpec) -> dict[str, Any]:
        return {"kind": self.kind, "tag": uuid.uuid4().hex, "world_size": len(spec.hosts)}

    def start(self, spec: LaunchSpec, info: Mapping[str, Any]) -> dict[str, Any]:
        return {"started": time.time()}

    def status(self, info: Mapping[str, Any]) -> ProcessStatus:
        code = self.exits.get(str(info["tag"]))
        return ProcessStatus("running") if code is None else ProcessStatus("exited", exit_code=code)

    def kill(self, info: Mapping[str, Any], *, grace_s: float = 5.0) -> None:
        return None


def attempts_of(factory: sessionmaker[Session], run_id: int) -> list[Attempt]:
    with transaction(factory) as session:
        return list(
            session.scalars(sa.select(Attempt).where(Attempt.run_id == run_id).order_by(Attempt.number))
        )


def checkpoint_of(factory: sessionmaker[Session], run_id: int, step: int) -> Checkpoint | None:
    with transaction(factory) as session:
        return session.scalar(
            sa.select(Checkpoint).where(Checkpoint.run_id == run_id, Checkpoint.step == step)
        )


def wait_for(what: Callable[[], Any], *, timeout_s: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := what():
            return value
        time.sleep(0.01)
    raise AssertionError("timed out")


def big_and_small_runs(postgres_url: str, hosts: int) -> tuple[sessionmaker[Session], int, int]:
    """A fresh database with `hosts` hosts and two started one-host runs, "big" and "small"."""
    migrate.upgrade(postgres_url)
    factory = make_session_factory(make_engine(postgres_url))
    with transaction(factory) as session:
        for i in range(1, hosts + 1):
            register_node(session, hostname=f"h{i}", author="test")
        config = {"preset": "tiny", "target_steps": 1000, "host_count": 1, "launcher": "scripted"}
        big = create_run(session, name="big", owner="test", config=config, start=True, author="test").id
        small = create_run(session, name="small", owner="test", config=config, start=True, author="test").id
    return factory, big, small


@contextmanager
def orchestrating(
    factory: sessionmaker[Session], cfg: OrchestratorConfig, launcher: ExitOnCue
) -> Iterator[Orchestrator]:
    """The real orchestrator's loop on a thread of this process, stopped at the end."""
    orch = Orchestrator(factory, cfg, launchers={"scripted": launcher}, health=SweepHealthGateway(factory))
    thread = threading.Thread(target=orch.run_forever, daemon=True)
    thread.start()
    try:
        yield orch
    finally:
        orch.stop()
        thread.join(10)


@pytest.mark.postgres
def test_a_slow_verification_of_one_run_never_delays_another_runs_crash_detection(
    postgres_url: str, tmp_path: Path
) -> None:
    factory, big, small = big_and_small_runs(postgres_url, hosts=2)
    runs_dir = tmp_path / "runs"
    cfg = OrchestratorConfig(
        loop_interval_s=0.05,
        runs_dir=str(runs_dir),
        remediation={"backoff_base_s": 0.0, "backoff_max_s": 0.0},
        # 24 MB read at 8 MB/s: the big run's verification takes 3 s (its deadline allows 39 s)
        checkpoint_verify={"workers": 2, "read_limit_mb_s": 8.0, "measure_min_mb": 16.0},
    )
    launcher = ExitOnCue()
    with orchestrating(factory, cfg, launcher) as orch:
        attempts = partial(attempts_of, factory)
        checkpoint = partial(checkpoint_of, factory)

        small_attempt = wait_for(lambda: attempts(small))[0]
        wait_for(lambda: attempts(big))
        save_checkpoint(runs_dir / "big", 10, shard_bytes=24 * MB)
        save_checkpoint(runs_dir / "small", 10, shard_bytes=64 * 1024)
        flip_a_byte(save_checkpoint(runs_dir / "small", 20, shard_bytes=64 * 1024))

        # the small run's checkpoints are judged in the background: step 20's bytes do not match
        wait_for(lambda: (c := checkpoint(small, 20)) is not None and c.state == CheckpointState.corrupt)
        wait_for(lambda: (c := checkpoint(small, 10)) is not None and c.state == CheckpointState.verified)
        # the catalog row appears one pass before the pool takes it: wait for the hashing to start
        in_flight = orch.checkpoint_verifier.in_flight
        big_ckpt = wait_for(lambda: (c := checkpoint(big, 10)) is not None and c.id in in_flight and c)
        assert big_ckpt.state == CheckpointState.committed  # 3 s of hashing ahead of it

        # the small run crashes while the big run's checkpoint is being hashed
        crashed_at = time.time()
        launcher.exits[small_attempt.launcher["tag"]] = 1
        ended = wait_for(lambda: (a := attempts(small)[0]).ended_at is not None and a)
        detected_s = ended.detected_at.timestamp() - crashed_at
        relaunch = wait_for(lambda: len(a := attempts(small)) == 2 and a[1])
        assert big_ckpt.id in orch.checkpoint_verifier.in_flight  # still hashing the big one
        assert checkpoint(big, 10).state == CheckpointState.committed
        assert ended.exit_reason == "crash" and detected_s < 1.0, detected_s
        # restored from step 10: step 20, whose bytes do not match, is never restored
        assert relaunch.restored_from_checkpoint_id == checkpoint(small, 10).id

        big_done = wait_for(lambda: (c := checkpoint(big, 10)).state == CheckpointState.verified and c)
        evidence = big_done.meta[VERIFICATION_KEY]
        assert evidence["outcome"] == "verified" and evidence["elapsed_s"] >= 2.9
        # it finished after the crash was acted on
        assert dt.datetime.fromisoformat(evidence["at"]).timestamp() > ended.detected_at.timestamp()
        # the pool measured what it really reads (8 MB/s here): later deadlines start from that
        assert orch.checkpoint_verifier.measured_bytes_per_s == pytest.approx(8 * MB, rel=0.15)
    with transaction(factory) as session:
        messages = [e.message for e in list_logbook(session, run_id=small)[0]]
    assert any("state committed -> corrupt" in m and "bytes do not match its manifest" in m for m in messages)
    assert any("state committed -> verified" in m and "full verification" in m for m in messages)


@pytest.mark.postgres
def test_a_slow_metadata_check_before_one_runs_relaunch_never_holds_up_another_runs_relaunch(
    postgres_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    """At 8,192 ranks a restore point has ~16,000 files and its metadata check stats each one: seconds on
    a shared filesystem. The big run's relaunch waits for that check off the pass; the small run, which
    crashes meanwhile, is detected and relaunched from its own checkpoint, and the big run is relaunched
    exactly once when its check is done."""
    from service.orchestrator import apply as apply_module

    factory, big, small = big_and_small_runs(postgres_url, hosts=4)
    runs_dir = tmp_path / "runs"

    checking = threading.Event()  # the big checkpoint's metadata check has begun
    release = threading.Event()  # ... and may finish
    metadata_check = apply_module.verify_checkpoint

    def slow_for_the_big_run(path: str | Path, *, deep: bool = True) -> tuple[bool, str]:
        if Path(path).parent.parent.name == "big":
            checking.set()
            release.wait(60)
        return metadata_check(path, deep=deep)

    monkeypatch.setattr(apply_module, "verify_checkpoint", slow_for_the_big_run)
    request.addfinalizer(release.set)  # a failed assertion must not leave the check waiting on `release`
    cfg = OrchestratorConfig(
        loop_interval_s=0.05,
        runs_dir=str(runs_dir),
        launch_budget_s=0.2,
        remediation={"backoff_base_s": 0.0, "backoff_max_s": 0.0},
    )
    launcher = ExitOnCue()
    with orchestrating(factory, cfg, launcher) as orch:
        attempts = partial(attempts_of, factory)
        checkpoint = partial(checkpoint_of, factory)

        big_attempt = wait_for(lambda: attempts(big))[0]
        small_attempt = wait_for(lambda: attempts(small))[0]
        save_checkpoint(runs_dir / "big", 10, shard_bytes=64 * 1024)
        save_checkpoint(runs_dir / "small", 10, shard_bytes=64 * 1024)
        big_ckpt = wait_for(lambda: checkpoint(big, 10))
        small_ckpt = wait_for(lambda: checkpoint(small, 10))

        launcher.exits[big_attempt.launcher["tag"]] = 1
        assert checking.wait(20), "the big run's relaunch never checked its restore point"
        wait_for(lambda: big in orch.applier.restore_checks.pending())

        # the small run crashes while the big run's restore point is still being checked
        launcher.exits[small_attempt.launcher["tag"]] = 1
        relaunch = wait_for(lambda: len(a := attempts(small)) == 2 and a[1])
        assert relaunch.restored_from_checkpoint_id == small_ckpt.id
        assert len(attempts(big)) == 1 and big in orch.applier.restore_checks.pending()

        release.set()
        big_relaunch = wait_for(lambda: len(a := attempts(big)) == 2 and a[1])
        assert big_relaunch.restored_from_checkpoint_id == big_ckpt.id
        wait_for(lambda: not orch.applier.restore_checks.pending())
        time.sleep(0.5)  # passes go on: the finished check is not consumed twice
        assert len(attempts(big)) == 2


def test_a_restore_points_metadata_check_answers_in_the_pass_when_quick_and_waits_only_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from service.orchestrator import apply as apply_module

    checks = apply_module.RestorePointChecks()
    release = threading.Event()
    try:
        intact = save_checkpoint(tmp_path / "run", 10, shard_bytes=4096)
        # a small checkpoint's check takes milliseconds: the launch goes on in the same pass
        assert checks.poll(1, str(intact), wait_s=10.0) == (True, "ok")
        assert not checks.pending()
        (intact / "rng_rank0.pt").unlink()
        assert checks.poll(1, str(intact), wait_s=10.0) == (False, "missing files: rng_rank0.pt")

        metadata_check = apply_module.verify_checkpoint

        def slow(path: str | Path, *, deep: bool = True) -> tuple[bool, str]:
            release.wait(20)  # a verdict comes only after 20 s, or once released
            return metadata_check(path, deep=deep)

        monkeypatch.setattr(apply_module, "verify_checkpoint", slow)
        assert checks.poll(2, str(intact), wait_s=0.2) is None  # the poll that starts it waits its budget
        # a later poll does not wait: with 60 s it would have had the verdict
        assert checks.poll(2, str(intact), wait_s=60.0) is None
        assert checks.pending() == {2: str(intact)}
        release.set()
        verdict = wait_for(lambda: checks.poll(2, str(intact), wait_s=0.0))
        assert verdict == (False, "missing files: rng_rank0.pt")
        assert not checks.pending()
    finally:
        release.set()
        checks.shutdown()


@dataclass
class HandedOver:
    """A leadership that another orchestrator takes from this one when the test says so (the fence lets
    this process act only while it leads, as PostgreSQL's does)."""

    is_leader: bool = True
    lost: bool = False

    def poll(self) -> LeadershipChange | None:
        if self.lost and self.is_leader:
            self.is_leader = False
            return LeadershipChange(acquired=False, holder=Holder("host-a", 101), reason="lock lost")
        return None

    def fence(self, connection: Any, what: str) -> None:
        if not self.is_leader:
            raise LeadershipLost(f"not the leader: {what} not done")

    def keep_fence(self, connection: Any) -> AbstractContextManager[None]:
        return nullcontext()

    def release(self) -> None:
        self.is_leader = False


def test_a_deposed_leader_stops_hashing_checkpoints_and_a_new_lead_verifies_them_afresh(
    tmp_path: Path,
) -> None:
    """Its verifications' results could not be recorded (fenced) and its reads would slow the new leader's
    own: on losing the lead the verifier drops what it had in flight and stops its hashes."""
    url = f"sqlite:///{tmp_path / 'trainops.db'}"
    migrate.upgrade(url)
    engine = make_engine(url)
    factory = make_session_factory(engine)
    with transaction(factory) as session:
        run_id = create_run(
            session, name="big", owner="test", config={"target_steps": 5}, start=False, author="t"
        ).id
    ids = [
        catalogue(factory, run_id, save_checkpoint(tmp_path / "runs" / "big", step, shard_bytes=8 * MB))
        for step in (10, 20)
    ]
    leadership = HandedOver()
    orch = Orchestrator(
        factory,
        OrchestratorConfig(
            runs_dir=str(tmp_path / "runs"),
            # throttled to 16 s a checkpoint: both are mid-hash when the lead goes
            checkpoint_verify={"workers": 2, "read_limit_mb_s": 0.5, "deadline_floor_s": 600},
        ),
        launchers={},
        health=SweepHealthGateway(factory),
        leadership=leadership,
    )
    verifier = orch.checkpoint_verifier
    try:
        assert orch.leads()
        verifier.step([run_id])
        futures = [future for _, future in verifier.in_flight.values()]
        assert sorted(verifier.in_flight) == sorted(ids) and not any(f.done() for f in futures)

        leadership.lost = True
        assert not orch.leads()
        assert verifier.in_flight == {}
        wait_for(lambda: all(f.done() for f in futures))  # stopped at their next chunk, not after 16 s
        assert all(f.cancelled() or f.exception() is not None for f in futures)
        with transaction(factory) as session:
            rows = [session.get(Checkpoint, i) for i in ids]
            assert all(r.state == CheckpointState.committed and VERIFICATION_KEY not in r.meta for r in rows)

        # leading again (the lock came back): its verifications start afresh, unthrottled, and finish
        leadership.is_leader, leadership.lost = True, False
        verifier.cfg = verifier.cfg.model_copy(update={"read_limit_mb_s": None})
        settle(verifier, [run_id])
        with transaction(factory) as session:
            assert all(session.get(Checkpoint, i).state == CheckpointState.verified for i in ids)
    finally:
        orch.stop()
        engine.dispose()
