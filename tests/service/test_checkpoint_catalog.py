"""The checkpoint catalog tells the truth about the files, and keeps health verdicts and the pin current.

The trainer's registration and the orchestrator's discovery on disk are one upsert; a re-save after a
rollback replaces the row's description; verdicts are judged on each checkpoint's own descendants; the
newest healthy checkpoint is pinned on disk, where the trainer's retention honours it.
"""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from service.config import Settings
from service.crud.checkpoints import (
    AUTO_PIN_AUTHOR,
    CatalogSource,
    UpsertOutcome,
    mark_checkpoint,
    register_checkpoint,
    upsert_checkpoint,
)
from service.crud.logbook import list_logbook
from service.crud.runs import create_run
from service.crud.telemetry import ingest_metrics
from service.db import make_engine, make_session_factory, transaction
from service.models import Attempt, Checkpoint
from service.orchestrator.observe import sync_checkpoints
from service.recovery.config import OrchestratorConfig
from service.recovery.verdicts import refresh_checkpoint_verdicts
from service.statemachine import CheckpointState
from tests.conftest import make_run
from trainer.checkpoint import (
    PINNED,
    apply_retention,
    catalog_record,
    checkpoint_name,
    commit,
    list_checkpoints,
    read_checksum,
)

DATA = Path(__file__).parents[1] / "data"
CFG = OrchestratorConfig()  # trend window 20, >= 5 points, runaway x3


def recorded(name: str) -> list[dict[str, Any]]:
    return json.loads((DATA / name).read_text())["points"]


def save_checkpoint(
    root: Path, step: int, *, attempt: int, loss_scale: float = 65536.0, act_norm: float = 10.0
) -> Path:
    """A committed checkpoint as the trainer writes it (payload, meta.json, manifest, marker)."""
    tmp = root / f".tmp_{checkpoint_name(step)}"
    tmp.mkdir(parents=True)
    (tmp / "__0_0.distcp").write_bytes(bytes(range(256)) * (step + attempt))
    (tmp / "meta.json").write_text(
        json.dumps(
            {
                "step": step,
                "tokens": step * 512,
                "attempt": attempt,
                "loss_scale": loss_scale,
                "lr": 1e-3,
                "clip": 1.0,
                "loss": 5.0,
                "act_norm": act_norm,
                "loss_window": [5.1, 5.0],
                "act_norm_window": [act_norm],
                "data_position": step * 8,
            }
        )
    )
    final = root / checkpoint_name(step)
    commit(tmp, final)
    return final


def record_of(path: Path) -> dict[str, Any]:
    info = next(i for i in list_checkpoints(path.parent, deep=False) if i.path == path)
    return catalog_record(info.path, info.step, info.meta, read_checksum(path))


@pytest.fixture
def factory(migrated_url: str) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(migrated_url)
    try:
        yield make_session_factory(engine)
    finally:
        engine.dispose()


@pytest.fixture
def runs_dir(tmp_path: Path) -> Path:
    return tmp_path / "runs"


def new_run(factory: sessionmaker[Session], name: str = "r") -> int:
    with transaction(factory) as session:
        return create_run(session, name=name, owner="t", config={}, start=False, author="user:test").id


def sync_from_disk(factory: sessionmaker[Session], runs_dir: Path, run_id: int) -> None:
    """The orchestrator's catalogue of checkpoints found on disk (a step of its observe)."""
    with transaction(factory) as session:
        sync_checkpoints(session, run_id=run_id, runs_dir=runs_dir)


def row(factory: sessionmaker[Session], run_id: int, step: int) -> Checkpoint:
    with transaction(factory) as session:
        found = session.scalars(
            sa.select(Checkpoint).where(Checkpoint.run_id == run_id, Checkpoint.step == step)
        )
        rows = list(found)
        assert len(rows) == 1, rows
        return rows[0]


def messages(factory: sessionmaker[Session], run_id: int) -> list[str]:
    with transaction(factory) as session:
        return [e.message for e in list_logbook(session, run_id=run_id, limit=500)[0]]


# ---- one upsert ---------------------------------------------------------------------------------------


def test_a_re_save_after_a_rollback_replaces_the_rows_description(
    factory: sessionmaker[Session], runs_dir: Path
) -> None:
    run_id = new_run(factory)
    ckpt_dir = runs_dir / "r" / "checkpoints"
    first = save_checkpoint(ckpt_dir, 100, attempt=1, loss_scale=0.5)
    old = record_of(first)
    with transaction(factory) as session:
        ckpt, created = register_checkpoint(session, run_id=run_id, data=old, runs_dir=runs_dir)
        assert created
        mark_checkpoint(
            session,
            checkpoint_id=ckpt.id,
            author="system:orchestrator",
            state=CheckpointState.corrupt,
            reason="checksum mismatch",
        )
    # attempt 3, restored from an older checkpoint, saves step 100 again: commit() replaces the directory
    new = record_of(save_checkpoint(ckpt_dir, 100, attempt=3, loss_scale=65536.0))
    assert new["checksum"] != old["checksum"]
    with transaction(factory) as session:
        ckpt, outcome = upsert_checkpoint(
            session, run_id=run_id, data=new, source=CatalogSource.trainer, author="trainer"
        )
        assert outcome == UpsertOutcome.replaced
    now = row(factory, run_id, 100)
    assert (now.attempt, now.checksum, now.loss_scale, now.state) == (
        3,
        new["checksum"],
        65536.0,
        CheckpointState.committed,
    )
    assert now.size_bytes == new["size_bytes"] and now.meta == new["metadata"]
    assert now.verdict == "pending" and now.healthy is None
    assert any(
        "re-saved by attempt 3 replaces attempt 1's file" in m
        and "loss scale 0.5 -> 65536" in m
        and "state corrupt -> committed" in m
        for m in messages(factory, run_id)
    )

    # attempt 1's registration arriving late (a replayed spool) describes a file that is gone: ignored
    with transaction(factory) as session:
        _, outcome = upsert_checkpoint(
            session, run_id=run_id, data=old, source=CatalogSource.trainer, author="trainer"
        )
        assert outcome == UpsertOutcome.stale
    assert row(factory, run_id, 100).checksum == new["checksum"]


@pytest.mark.parametrize("trainer_first", [True, False])
def test_discovery_and_registration_converge_in_either_order(
    factory: sessionmaker[Session], runs_dir: Path, trainer_first: bool
) -> None:
    run_id = new_run(factory)
    path = save_checkpoint(runs_dir / "r" / "checkpoints", 40, attempt=2, loss_scale=32768.0, act_norm=12.5)
    registration = record_of(path)

    def register() -> None:
        with transaction(factory) as session:
            register_checkpoint(session, run_id=run_id, data=registration, runs_dir=runs_dir)

    if trainer_first:
        register()
        sync_from_disk(factory, runs_dir, run_id)
    else:
        sync_from_disk(factory, runs_dir, run_id)
        register()
    sync_from_disk(factory, runs_dir, run_id)
    stored = row(factory, run_id, 40)
    assert stored.checksum == registration["checksum"] and stored.checksum is not None
    assert stored.size_bytes == registration["size_bytes"] and stored.size_bytes
    assert (stored.attempt, stored.loss_scale, stored.act_norm, stored.state) == (
        2,
        32768.0,
        12.5,
        CheckpointState.committed,
    )
    assert stored.meta == {
        "loss_window": [5.1, 5.0],
        "act_norm_window": [12.5],
        "data_position": 320,
        "attempt": 2,
    }
    assert not any("re-saved" in m for m in messages(factory, run_id))


def test_discovery_catalogues_a_re_save_the_trainer_could_not_report(
    factory: sessionmaker[Session], runs_dir: Path
) -> None:
    run_id = new_run(factory)
    ckpt_dir = runs_dir / "r" / "checkpoints"
    with transaction(factory) as session:
        register_checkpoint(
            session,
            run_id=run_id,
            data=record_of(save_checkpoint(ckpt_dir, 8, attempt=1, loss_scale=0.25)),
            runs_dir=runs_dir,
        )
    save_checkpoint(ckpt_dir, 8, attempt=2, loss_scale=4096.0)  # control plane down when it was registered
    sync_from_disk(factory, runs_dir, run_id)
    stored = row(factory, run_id, 8)
    assert (stored.attempt, stored.loss_scale) == (2, 4096.0)  # what meta.json on disk says


@pytest.mark.postgres
def test_concurrent_upserts_on_postgres_do_not_collide(postgres_url: str, tmp_path: Path) -> None:
    from service import migrate

    migrate.upgrade(postgres_url)
    engine = make_engine(postgres_url, pool_size=8)
    factory = make_session_factory(engine)
    try:
        run_id = new_run(factory)
        ckpt_dir = tmp_path / "runs" / "r" / "checkpoints"
        records = [record_of(save_checkpoint(ckpt_dir, step, attempt=1)) for step in (5, 10, 15)]
        errors: list[BaseException] = []
        start = threading.Barrier(6)

        def upsert(source: CatalogSource) -> None:
            try:
                start.wait()
                for record in records:
                    with transaction(factory) as session:
                        upsert_checkpoint(session, run_id=run_id, data=record, source=source, author="t")
            except BaseException as exc:
                errors.append(exc)

        threads = [
            threading.Thread(target=upsert, args=(s,))
            for s in [CatalogSource.trainer, CatalogSource.disk] * 3
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        with transaction(factory) as session:
            rows = list(session.scalars(sa.select(Checkpoint).where(Checkpoint.run_id == run_id)))
        assert sorted(r.step for r in rows) == [5, 10, 15]
        assert all(r.checksum and r.state == CheckpointState.committed for r in rows)
    finally:
        engine.dispose()


# ---- verdicts and the pin -----------------------------------------------------------------------------


def add_attempt(
    session: Session,
    run_id: int,
    number: int,
    *,
    start_step: int = 0,
    restored_from: int | None = None,
    onset: int | None = None,
) -> None:
    session.add(
        Attempt(
            run_id=run_id,
            number=number,
            hosts=["h1"],
            start_step=start_step,
            restored_from_checkpoint_id=restored_from,
            exit_reason="divergence" if onset is not None else None,
            findings={"onset_step": onset} if onset is not None else {},
        )
    )
    session.flush()


def add_metrics(session: Session, run_id: int, attempt: int, points: list[dict[str, Any]]) -> None:
    ingest_metrics(
        session,
        run_id=run_id,
        attempt=attempt,
        points=[{k: p[k] for k in ("step", "loss", "loss_scale", "act_norm")} for p in points],
    )


def catalogue(factory: sessionmaker[Session], run_id: int, path: Path) -> int:
    with transaction(factory) as session:
        return register_checkpoint(session, run_id=run_id, data=record_of(path), runs_dir=path.parents[2])[
            0
        ].id


def refresh(factory: sessionmaker[Session], run_id: int, ckpt_dir: Path) -> Any:
    with transaction(factory) as session:
        return refresh_checkpoint_verdicts(session, run_id=run_id, checkpoint_dir=ckpt_dir, cfg=CFG)


def test_verdicts_follow_the_recorded_healthy_run_and_the_pin_moves_forward(
    factory: sessionmaker[Session], runs_dir: Path
) -> None:
    healthy = {p["step"]: p for p in recorded("healthy_tiny_run.json")}
    run_id = new_run(factory)
    ckpt_dir = runs_dir / "r" / "checkpoints"
    with transaction(factory) as session:
        add_attempt(session, run_id, 1)
        add_metrics(session, run_id, 1, [healthy[s] for s in range(1, 51)])
    ids = {
        s: catalogue(
            factory, run_id, save_checkpoint(ckpt_dir, s, attempt=1, loss_scale=healthy[s]["loss_scale"])
        )
        for s in (20, 30, 40, 50)
    }
    # an operator keeps step 20 for an evaluation
    with transaction(factory) as session:
        mark_checkpoint(
            session, checkpoint_id=ids[20], author="user:alice", pinned=True, reason="eval", runs_dir=runs_dir
        )

    done = refresh(factory, run_id, ckpt_dir)
    verdicts = {s: row(factory, run_id, s) for s in ids}
    assert verdicts[50].verdict == "pending" and verdicts[50].healthy is None  # no step after it yet
    assert verdicts[40].verdict == "healthy" and not verdicts[40].verdict_final  # 10 of 20 steps so far
    assert verdicts[30].verdict == "healthy" and verdicts[30].verdict_final  # a full window
    numbers = verdicts[40].verdict_numbers
    assert numbers["loss_scale"] == healthy[40]["loss_scale"] and numbers["points_after"] == 10
    assert numbers["loss_after"]["last"] == pytest.approx(healthy[50]["loss"])
    assert done.pinned == 40 and (ckpt_dir / checkpoint_name(40) / PINNED).exists()
    assert verdicts[40].pinned_by == AUTO_PIN_AUTHOR
    entries = messages(factory, run_id)

    # nothing new: no new verdict, no new logbook entry
    assert refresh(factory, run_id, ckpt_dir).changed == []
    assert messages(factory, run_id) == entries

    # the steps after 50 arrive: 50 proves healthy, the automatic pin moves, the operator's stays
    with transaction(factory) as session:
        add_metrics(session, run_id, 1, [healthy[s] for s in range(51, 61)])
    done = refresh(factory, run_id, ckpt_dir)
    assert done.changed == [(50, "pending", "healthy")] and done.pinned == 50 and done.unpinned == [40]
    assert (ckpt_dir / checkpoint_name(50) / PINNED).exists()
    assert not (ckpt_dir / checkpoint_name(40) / PINNED).exists()
    assert (ckpt_dir / checkpoint_name(20) / PINNED).exists() and row(factory, run_id, 20).pinned
    assert any(
        m.startswith("pinned checkpoint step 50, the newest healthy one") and "unpinned step(s) 40" in m
        for m in messages(factory, run_id)
    )
    assert sum("checkpoint step 50: pending -> healthy" in m for m in messages(factory, run_id)) == 1

    # the trainer's own retention (keep 1) keeps the pinned ones and deletes the rest
    deleted = {p.name for p in apply_retention(ckpt_dir, keep=1)}
    assert deleted == {checkpoint_name(30), checkpoint_name(40)}
    # ... and the catalog follows: what retention deleted is `deleted`, never offered as usable again
    done = refresh(factory, run_id, ckpt_dir)
    assert done.deleted == [30, 40]
    assert [(s, row(factory, run_id, s).state.value) for s in (20, 30, 40, 50)] == [
        (20, "committed"),
        (30, "deleted"),
        (40, "deleted"),
        (50, "committed"),
    ]
    assert row(factory, run_id, 20).pinned and row(factory, run_id, 50).pinned
    assert any("step 40" in m and "-> deleted: its directory is gone" in m for m in messages(factory, run_id))
    assert refresh(factory, run_id, ckpt_dir).deleted == []  # once


def test_a_control_plane_that_cannot_see_the_runs_directory_marks_nothing_deleted(
    factory: sessionmaker[Session], runs_dir: Path, tmp_path: Path
) -> None:
    run_id = new_run(factory)
    elsewhere = tmp_path / "elsewhere" / "checkpoints"
    with transaction(factory) as session:  # a row catalogued before registrations were confined
        ckpt_id = upsert_checkpoint(
            session,
            run_id=run_id,
            data=record_of(save_checkpoint(elsewhere, 10, attempt=1, loss_scale=4.0)),
            source=CatalogSource.disk,
            author="test",
        )[0].id
    shutil.rmtree(elsewhere.parent)
    # the run's own checkpoint directory does not exist here (another host's filesystem): nothing is judged
    assert refresh(factory, run_id, runs_dir / "r" / "checkpoints").deleted == []
    # a catalogued path outside the run's directory is never judged, even when the directory exists
    (runs_dir / "r" / "checkpoints").mkdir(parents=True)
    assert refresh(factory, run_id, runs_dir / "r" / "checkpoints").deleted == []
    with transaction(factory) as session:
        assert session.get(Checkpoint, ckpt_id).state == CheckpointState.committed


def test_a_rollback_judges_each_checkpoint_on_its_own_descendants(
    factory: sessionmaker[Session], runs_dir: Path
) -> None:
    healthy = {p["step"]: p for p in recorded("healthy_tiny_run.json")}
    diverged = {p["step"]: p for p in recorded("diverged_tiny_run.json")}  # LR x100 from step 30
    run_id = new_run(factory)
    ckpt_dir = runs_dir / "r" / "checkpoints"
    with transaction(factory) as session:
        add_attempt(session, run_id, 1, onset=31)
        add_metrics(session, run_id, 1, list(diverged.values()))
    c20 = catalogue(factory, run_id, save_checkpoint(ckpt_dir, 20, attempt=1))
    catalogue(factory, run_id, save_checkpoint(ckpt_dir, 30, attempt=1))
    refresh(factory, run_id, ckpt_dir)
    assert row(factory, run_id, 20).verdict == "healthy"  # its course ends before the onset
    thirty = row(factory, run_id, 30)
    assert thirty.verdict == "unhealthy" and "after the divergence began" in (thirty.healthy_reason or "")
    assert (ckpt_dir / checkpoint_name(20) / PINNED).exists()

    # attempt 2 restores step 20 and computes 21..45 again, healthily; it re-saves step 30
    with transaction(factory) as session:
        add_attempt(session, run_id, 2, start_step=20, restored_from=c20)
        add_metrics(session, run_id, 2, [healthy[s] for s in range(21, 46)])
    catalogue(factory, run_id, save_checkpoint(ckpt_dir, 30, attempt=2))
    assert row(factory, run_id, 30).verdict == "pending"  # a new file: judged afresh
    done = refresh(factory, run_id, ckpt_dir)
    thirty = row(factory, run_id, 30)
    # judged on attempt 2's steps after it, not on attempt 1's diverged ones
    assert thirty.verdict == "healthy", thirty.healthy_reason
    assert thirty.verdict_numbers["act_norm_end"] < 3 * thirty.verdict_numbers["act_norm_at_save"]
    assert done.pinned == 30 and done.unpinned == [20]


# ---- the API pin reaches disk --------------------------------------------------------------------------


def test_api_pin_and_unpin_reach_disk_and_retention_honours_them(
    admin: TestClient, settings: Settings
) -> None:
    run = make_run(admin, name="pinned-run")
    ckpt_dir = settings.home / "runs" / "pinned-run" / "checkpoints"
    paths = [save_checkpoint(ckpt_dir, s, attempt=1) for s in (10, 20, 30)]
    ids = []
    for p in paths:
        r = admin.post(f"/api/v1/runs/{run['id']}/checkpoints", json=record_of(p))
        assert r.status_code == 201, r.text
        ids.append(r.json()["id"])

    r = admin.post(f"/api/v1/checkpoints/{ids[0]}/mark", json={"reason": "keep for eval", "pinned": True})
    assert r.status_code == 200 and r.json()["pinned"] and r.json()["pinned_by"] == "user:bootstrap-admin"
    assert (paths[0] / PINNED).exists()
    assert {p.name for p in apply_retention(ckpt_dir, keep=1)} == {checkpoint_name(20)}
    assert paths[0].is_dir()

    r = admin.post(f"/api/v1/checkpoints/{ids[0]}/mark", json={"reason": "eval done", "pinned": False})
    assert r.status_code == 200 and not r.json()["pinned"]
    assert not (paths[0] / PINNED).exists()
    assert {p.name for p in apply_retention(ckpt_dir, keep=1)} == {checkpoint_name(10)}
    # gone from disk: nothing to pin
    r = admin.post(f"/api/v1/checkpoints/{ids[0]}/mark", json={"reason": "again", "pinned": True})
    assert r.status_code == 409 and "not on disk" in r.json()["detail"]


@pytest.mark.parametrize(
    "path",
    [
        "/tmp/elsewhere/step_00000010",  # anywhere
        "{runs}/other/checkpoints/step_00000010",  # another run's checkpoint
        "{dir}/../../other/checkpoints/step_00000010",  # the same, by ..
        "{dir}/step_00000011",  # a symlink in our directory to another run's checkpoint
        "{dir}",  # the directory itself
        "{dir}/meta.json",  # not a step directory
    ],
)
def test_a_checkpoint_is_registered_only_inside_its_runs_directory(
    admin: TestClient, settings: Settings, path: str
) -> None:
    # A trainer token is a credential a client holds: the path it registers is what this run's restart
    # would load, so another run's files (by name, by .., by symlink) are refused.
    run = make_run(admin, name="confined")
    runs = settings.home / "runs"
    ckpt_dir = runs / "confined" / "checkpoints"
    ckpt_dir.mkdir(parents=True)
    other = save_checkpoint(runs / "other" / "checkpoints", 10, attempt=1, loss_scale=4.0)
    (ckpt_dir / "step_00000011").symlink_to(other)
    url = f"/api/v1/runs/{run['id']}/checkpoints"
    r = admin.post(url, json={"step": 10, "path": path.format(dir=ckpt_dir, runs=runs)})
    assert r.status_code == 422 and "this run's" in r.json()["detail"], r.text
    assert admin.get(url).json()["total"] == 0
    assert admin.post(url, json={"step": 10, "path": str(ckpt_dir / "step_00000010")}).status_code == 201


def test_api_pin_stays_inside_the_runs_checkpoint_directory(
    admin: TestClient, settings: Settings, factory: sessionmaker[Session]
) -> None:
    # a row catalogued before registrations were confined: pinning it writes nothing outside the run
    run = make_run(admin, name="confined")
    ckpt_dir = settings.home / "runs" / "confined" / "checkpoints"
    ckpt_dir.mkdir(parents=True)
    elsewhere = save_checkpoint(settings.home / "elsewhere", 10, attempt=1, loss_scale=4.0)
    with transaction(factory) as session:
        legacy, _ = upsert_checkpoint(
            session, run_id=run["id"], data=record_of(elsewhere), source=CatalogSource.disk, author="test"
        )
    r = admin.post(f"/api/v1/checkpoints/{legacy.id}/mark", json={"reason": "x", "pinned": True})
    assert r.status_code == 409 and "not in its run's checkpoint directory" in r.json()["detail"]
    assert not (elsewhere / PINNED).exists() and not (ckpt_dir / PINNED).exists()


def test_a_pass_reads_no_catalogued_checkpoint_again_until_its_manifest_changes(
    factory: sessionmaker[Session], runs_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every pass looks at every retained checkpoint: one already in the catalog costs a stat, not a
    metadata check of its files or a parse of its manifest (at a thousand hosts, ~16,000 entries)."""
    from service.orchestrator import observe

    run_id = new_run(factory)
    ckpt_dir = runs_dir / "r" / "checkpoints"
    for step in (100, 200):
        save_checkpoint(ckpt_dir, step, attempt=1)
    sync_from_disk(factory, runs_dir, run_id)
    assert row(factory, run_id, 100).attempt == 1 and row(factory, run_id, 200).attempt == 1

    calls: list[str] = []
    real_verify, real_checksum = observe.verify_checkpoint, observe.read_checksum
    monkeypatch.setattr(
        observe, "verify_checkpoint", lambda p, **kw: calls.append("verify") or real_verify(p, **kw)
    )
    monkeypatch.setattr(observe, "read_checksum", lambda p: calls.append("checksum") or real_checksum(p))
    sync_from_disk(factory, runs_dir, run_id)
    assert calls == []
    # step 100 saved again after a rollback: a new manifest, read and catalogued on the next pass
    save_checkpoint(ckpt_dir, 100, attempt=3)
    sync_from_disk(factory, runs_dir, run_id)
    assert calls == ["checksum", "verify"]
    assert row(factory, run_id, 100).attempt == 3 and row(factory, run_id, 200).attempt == 1
