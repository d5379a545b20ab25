"""What the orchestrator relies on when it picks a restart checkpoint: listing and verification without
torch.distributed, metadata without tensors, torn/corrupt detection, retention with pins."""

from __future__ import annotations

import contextlib
import json
import shutil
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
