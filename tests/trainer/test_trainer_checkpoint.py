"""What the orchestrator relies on when it picks a restart checkpoint: listing and verification without
torch.distributed, metadata without tensors, torn/corrupt detection, retention with pins."""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

import trainer.checkpoint as checkpoint_module
from trainer.checkpoint import (
    MARKER,
    apply_retention,
    checkpoint_name,
    commit,
    latest_valid_checkpoint,
    list_checkpoints,
    pin_checkpoint,
    read_meta,
    verify_checkpoint,
)


def make_checkpoint(root: Path, step: int, *, committed: bool = True) -> Path:
    tmp = root / f".tmp_{checkpoint_name(step)}"
    tmp.mkdir(parents=True)
    (tmp / "__0_0.distcp").write_bytes(bytes(range(256)) * (step + 1))
    (tmp / ".metadata").write_bytes(b"index")
    (tmp / "meta.json").write_text(
        json.dumps(
            {
                "step": step,
                "tokens": step * 512,
                "loss_scale": 2.0**step,
                "loss_window": [5.0, 4.0],
                "act_norm_window": [1.0],
            }
        )
    )
    final = root / checkpoint_name(step)
    if committed:
        commit(tmp, final)
    else:

        def die() -> None:
            raise KeyboardInterrupt  # the process dies between rename and marker

        with contextlib.suppress(KeyboardInterrupt):
            commit(tmp, final, before_marker=die)
    return final


def test_listing_reads_metadata_and_skips_torn_saves(tmp_path: Path) -> None:
    make_checkpoint(tmp_path, 10)
    make_checkpoint(tmp_path, 20)
    make_checkpoint(tmp_path, 30, committed=False)
    infos = list_checkpoints(tmp_path)
    assert [(i.step, i.ok) for i in infos] == [(10, True), (20, True), (30, False)]
    assert "COMMITTED" in infos[2].reason
    assert infos[1].tokens == 20 * 512 and infos[1].meta["loss_window"] == [5.0, 4.0]
    assert latest_valid_checkpoint(tmp_path).step == 20
    assert read_meta(infos[0].path)["loss_scale"] == 1024.0


def test_a_flipped_byte_a_missing_file_or_an_extra_file_is_detected(tmp_path: Path) -> None:
    path = make_checkpoint(tmp_path, 1)
    assert verify_checkpoint(path) == (True, "ok")
    shard = path / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert verify_checkpoint(path) == (False, "checksum mismatch: __0_0.distcp")
    assert verify_checkpoint(path, deep=False)[0]  # same size: only hashing catches it
    shard.unlink()
    assert verify_checkpoint(path) == (False, "missing files: __0_0.distcp")
    make_checkpoint(tmp_path, 2)
    other = make_checkpoint(tmp_path, 3)
    (other / "stray.bin").write_bytes(b"x")
    assert verify_checkpoint(other) == (False, "files not in manifest: stray.bin")
    assert latest_valid_checkpoint(tmp_path).step == 2


def test_garbage_manifest_and_missing_marker(tmp_path: Path) -> None:
    path = make_checkpoint(tmp_path, 5)
    (path / "manifest.json").write_text("{not json")
    assert verify_checkpoint(path)[1].startswith("unreadable manifest")
    other = make_checkpoint(tmp_path, 6)
    (other / MARKER).unlink()
    assert not verify_checkpoint(other)[0]
    assert latest_valid_checkpoint(tmp_path) is None


def test_retention_keeps_the_newest_k_plus_pinned_and_prunes_old_torn_ones(tmp_path: Path) -> None:
    for step in (1, 2, 3):
        make_checkpoint(tmp_path, step)
    make_checkpoint(tmp_path, 4, committed=False)
    for step in (5, 6, 7):
        make_checkpoint(tmp_path, step)
    pin_checkpoint(tmp_path / checkpoint_name(2))
    deleted = apply_retention(tmp_path, keep=2)
    assert sorted(p.name for p in deleted) == [checkpoint_name(s) for s in (1, 3, 4, 5)]
    assert [(i.step, i.pinned) for i in list_checkpoints(tmp_path)] == [(2, True), (6, False), (7, False)]


def test_a_checkpoint_deleted_while_it_is_verified_is_reported_not_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Retention in the trainer may delete a checkpoint while the orchestrator is verifying it.
    path = make_checkpoint(tmp_path, 10)
    real_sha256 = checkpoint_module._sha256

    def vanish_then_hash(f: Path) -> str:
        shutil.rmtree(path)
        return real_sha256(f)

    monkeypatch.setattr(checkpoint_module, "_sha256", vanish_then_hash)
    ok, reason = verify_checkpoint(path)
    assert not ok and reason.startswith("unreadable")
    assert list_checkpoints(tmp_path) == []


def test_pinning_a_checkpoint_that_just_vanished_says_so_instead_of_raising(tmp_path: Path) -> None:
    """Retention, or a re-save of the same step, can remove a checkpoint's directory between the control
    plane's look at the disk and its pin: the pin reports it and writes nothing."""
    from trainer.checkpoint import is_pinned, pin_checkpoint

    here = tmp_path / "step_00000010"
    here.mkdir()
    assert pin_checkpoint(here) is True and is_pinned(here)
    assert pin_checkpoint(here) is True  # already pinned
    gone = tmp_path / "step_00000020"
    assert pin_checkpoint(gone) is False and not gone.exists()


class _RunsCodeWhenUnpickled:
    """What a hostile trainer token could leave as `rng_rank0.pt`: unpickling it calls `Path.touch`."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (Path.touch.__get__(self.target), ())  # type: ignore[return-value]


def test_a_crafted_rng_file_is_refused_without_running_its_code(tmp_path: Path) -> None:
    import torch

    path = make_checkpoint(tmp_path, 10)
    torch.save({"cpu": torch.get_rng_state()}, path / "rng_rank1.pt")
    state = checkpoint_module.read_rng_state(path, 1)
    assert state is not None and torch.equal(state["cpu"], torch.get_rng_state())
    assert checkpoint_module.read_rng_state(path, 2) is None  # a rank saved without RNG state

    proof = tmp_path / "code-ran"
    torch.save({"cpu": _RunsCodeWhenUnpickled(proof)}, path / "rng_rank0.pt")
    with pytest.raises(ValueError, match="not a plain RNG state"):
        checkpoint_module.read_rng_state(path, 0)
    assert not proof.exists()


# ---- per-rank digests (manifest format 2) ------------------------------------------------------------------


def two_rank_save(root: Path, step: int) -> tuple[Path, dict[int, dict[str, checkpoint_module.FileDigest]]]:
    """What two ranks leave in `.tmp_step_N` (DCP's per-rank shard names, their RNG files, rank 0's index
    and meta.json), and the digests each rank reports of its own files."""
    tmp = root / f".tmp_{checkpoint_name(step)}"
    tmp.mkdir(parents=True)
    for rank in (0, 1):
        (tmp / f"__{rank}_0.distcp").write_bytes(bytes([rank + 1]) * (5000 + rank))
        (tmp / f"rng_rank{rank}.pt").write_bytes(b"rng%d" % rank)
    (tmp / ".metadata").write_bytes(b"index")
    (tmp / "meta.json").write_text(json.dumps({"step": step, "tokens": 1}))
    return tmp, {r: checkpoint_module.hash_files(tmp, checkpoint_module.rank_files(tmp, r)) for r in (0, 1)}


def test_a_rank_finds_its_files_by_name_without_listing_the_shared_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # rank 3 wrote three shards (DCP numbers them from 0); ranks 30 and 13 share its prefixes' digits
    for name in (
        "__3_0.distcp",
        "__3_1.distcp",
        "__3_2.distcp",
        "rng_rank3.pt",
        "__30_0.distcp",
        "__13_0.distcp",
        "rng_rank30.pt",
        ".metadata",
    ):
        (tmp_path / name).write_bytes(b"x")

    def no_listing(*args: object, **kwargs: object) -> None:
        raise AssertionError("rank_files listed the checkpoint directory")

    # 8,192 ranks each listing 16,000+ entries per save was the fleet simulator's finding
    monkeypatch.setattr(Path, "glob", no_listing)
    monkeypatch.setattr(Path, "iterdir", no_listing)
    found = checkpoint_module.rank_files(tmp_path, 3)
    assert [f.name for f in found] == ["__3_0.distcp", "__3_1.distcp", "__3_2.distcp", "rng_rank3.pt"]
    assert checkpoint_module.rank_files(tmp_path, 7) == []


def test_ranks_hash_their_own_shards_and_rank_0_only_what_no_rank_reported(tmp_path: Path) -> None:
    tmp, reported = two_rank_save(tmp_path, 10)
    assert sorted(reported[1]) == ["__1_0.distcp", "rng_rank1.pt"]
    path = tmp_path / checkpoint_name(10)
    checksum = commit(tmp, path, reported=reported, world_size=2, hash_seconds={0: 0.5, 1: 0.25})
    manifest = json.loads((path / "manifest.json").read_text())
    assert (manifest["format"], manifest["world_size"], manifest["checksum"]) == (2, 2, checksum)
    assert {rel: e["rank"] for rel, e in manifest["files"].items()} == {
        "__0_0.distcp": 0,
        "__1_0.distcp": 1,
        "rng_rank0.pt": 0,
        "rng_rank1.pt": 1,
        ".metadata": 0,  # written by DCP's coordinator: hashed by rank 0 at commit
        "meta.json": 0,
    }
    assert manifest["ranks"]["1"] == {"files": 2, "bytes": 5001 + len(b"rng1"), "hash_s": 0.25}
    assert verify_checkpoint(path, deep=False) == (True, "ok") and verify_checkpoint(path) == (True, "ok")
    # the checksum names the bytes, not who hashed them: a single-process manifest of the same files agrees
    assert checkpoint_module.write_manifest(path) == checksum


def test_a_rank_report_that_no_longer_describes_the_file_fails_the_commit(tmp_path: Path) -> None:
    tmp, reported = two_rank_save(tmp_path, 10)
    (tmp / "__1_0.distcp").write_bytes(b"shorter")
    with pytest.raises(ValueError, match=r"size changed since they were hashed: __1_0\.distcp"):
        commit(tmp, tmp_path / checkpoint_name(10), reported=reported, world_size=2)
    with pytest.raises(ValueError, match="ranks that reported no files: 1, 2"):
        commit(tmp, tmp_path / checkpoint_name(10), reported={0: reported[0]}, world_size=3)
    assert not (tmp_path / checkpoint_name(10)).exists()  # nothing renamed, no marker


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (
            lambda m: m["files"]["__1_0.distcp"].pop("sha256"),
            "incomplete manifest: no sha256 digest for __1_0.distcp",
        ),
        (lambda m: m["files"]["__1_0.distcp"].update(sha256="xyz"), "incomplete manifest: no sha256 digest"),
        (
            lambda m: [e.update(rank=0) for e in m["files"].values()],
            "incomplete manifest: no digests reported by rank(s) 1 of 2",
        ),
        (
            lambda m: m["files"]["rng_rank1.pt"].update(rank=5),
            "incomplete manifest: rng_rank1.pt: hashed by rank 5",
        ),
        (lambda m: m.update(format=9), "incomplete manifest: unsupported manifest format 9"),
        (lambda m: m["files"]["__1_0.distcp"].update(size=1), "size mismatch: __1_0.distcp"),
    ],
)
def test_the_metadata_check_needs_every_digest_and_every_rank_without_reading_a_byte(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, damage: object, reason: str
) -> None:
    tmp, reported = two_rank_save(tmp_path, 10)
    path = tmp_path / checkpoint_name(10)
    commit(tmp, path, reported=reported, world_size=2)
    manifest = json.loads((path / "manifest.json").read_text())
    damage(manifest)  # type: ignore[operator]
    (path / "manifest.json").write_text(json.dumps(manifest))

    def no_reading(f: Path) -> str:
        raise AssertionError(f"the metadata check read {f}")

    monkeypatch.setattr(checkpoint_module, "_sha256", no_reading)
    ok, why = verify_checkpoint(path, deep=False)
    assert not ok and why.startswith(reason), why


def test_a_format_1_manifest_is_still_read(tmp_path: Path) -> None:
    """Checkpoints committed before the ranks hashed their own shards: no ranks, no world size."""
    path = make_checkpoint(tmp_path, 10)
    manifest = json.loads((path / "manifest.json").read_text())
    old = {rel: {"size": e["size"], "sha256": e["sha256"]} for rel, e in manifest["files"].items()}
    (path / "manifest.json").write_text(
        json.dumps({"format": 1, "files": old, "checksum": manifest["checksum"]})
    )
    assert verify_checkpoint(path, deep=False) == (True, "ok") and verify_checkpoint(path) == (True, "ok")
    assert checkpoint_module.verify_share(path, rank=1, world_size=2) == (True, "ok")


def test_ranks_at_load_each_re_hash_their_share_and_together_all_of_it(tmp_path: Path) -> None:
    tmp, reported = two_rank_save(tmp_path, 10)
    path = tmp_path / checkpoint_name(10)
    commit(tmp, path, reported=reported, world_size=2)
    data = bytearray((path / "__1_0.distcp").read_bytes())
    data[100] ^= 0xFF
    (path / "__1_0.distcp").write_bytes(bytes(data))
    # rank 0's share (its own files, .metadata, meta.json) is intact; rank 1's share holds the flipped byte
    assert checkpoint_module.verify_share(path, rank=0, world_size=2) == (True, "ok")
    assert checkpoint_module.verify_share(path, rank=1, world_size=2) == (
        False,
        "checksum mismatch: __1_0.distcp",
    )
    # resumed on one rank (the world shrank), that rank's share is everything
    assert checkpoint_module.verify_share(path, rank=0, world_size=1)[0] is False


@pytest.fixture
def one_rank_group() -> Iterator[None]:
    """A process group of one (gloo, in this process): enough for `Checkpointer`'s collectives."""
    import torch.distributed as dist

    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_at_resume_the_ranks_verify_together_and_latest_skips_a_checkpoint_that_rotted(
    tmp_path: Path, one_rank_group: None
) -> None:
    make_checkpoint(tmp_path, 10)
    rotten = make_checkpoint(tmp_path, 20)
    shard = rotten / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[10] ^= 0xFF
    shard.write_bytes(bytes(data))
    logged: list[str] = []
    checkpointer = checkpoint_module.Checkpointer(
        tmp_path,
        rank=0,
        mode="sync",
        keep=3,
        on_commit=lambda info, checksum: None,
        before_marker=lambda step: None,
        log=logged.append,
    )
    try:
        assert checkpointer.verify(rotten) == (False, "rank 0: checksum mismatch: __0_0.distcp")
        latest = checkpointer.latest_loadable()
        assert latest is not None and latest.step == 10
        assert logged == ["checkpoint step_00000020 not loadable: rank 0: checksum mismatch: __0_0.distcp"]
    finally:
        checkpointer.close()


def test_a_restore_point_the_ranks_refuse_exits_with_its_own_code(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Exit 3, not 2: the orchestrator marks the checkpoint corrupt and restarts from another one, where a
    bad configuration (2) would end the run."""
    import trainer.train as train_module
    from trainer.contract import EXIT_CHECKPOINT_CORRUPT

    def refused(cfg: object) -> int:
        raise train_module.CheckpointUnloadable("checkpoint x is not loadable: rank 1: checksum mismatch")

    monkeypatch.setattr(train_module, "train", refused)
    assert train_module.main(["--run-dir", str(tmp_path)]) == EXIT_CHECKPOINT_CORRUPT == 3
