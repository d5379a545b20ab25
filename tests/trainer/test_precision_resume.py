"""A checkpoint resumes only in the number format it was written in (docs/trainer.md, "Number formats")."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.trainer_helpers import explain, metrics, train_one_process
from trainer.checkpoint import checkpoint_dirs, checkpoint_precision, read_meta, write_manifest


def test_a_checkpoint_written_before_fp16_became_opts_format_is_not_resumed_as_it(tmp_path: Path) -> None:
    """A run stored with precision "fp16" before that name meant OPT's format trained fp16-mixed: fp32
    master weights, loss scale 65536, and meta.json saying "fp16". Relaunched today with the same config it
    would resume as OPT's format: its weights cast to fp16 and the 65536 scale kept, silently another run.
    The trainer reads the checkpoint's format (fp32 weights: fp16-mixed) and refuses with its configuration
    exit, which the orchestrator does not retry; the same format resumes, and a conversion needs asking."""
    run_dir = tmp_path / "run"

    def train(precision: str, *flags: str) -> subprocess.CompletedProcess[str]:
        return train_one_process(run_dir, precision, "--val-interval", "0", *flags)

    first = train("fp16-mixed", "--max-steps", "2")
    assert first.returncode == 0, explain(first)
    [(_, ckpt)] = checkpoint_dirs(run_dir / "checkpoints")
    meta = read_meta(ckpt)
    assert (meta["precision"], meta["loss_scale"]) == ("fp16-mixed", 65536.0)
    # what the same checkpoint said when fp16 meant this format (its manifest re-hashed: it is intact)
    (ckpt / "meta.json").write_text(json.dumps({**meta, "precision": "fp16"}))
    write_manifest(ckpt)
    assert checkpoint_precision(ckpt, read_meta(ckpt)) == "fp16-mixed"

    refused = train("fp16", "--max-steps", "4", "--resume-from", "latest")
    assert refused.returncode == 2, explain(refused)
    assert "was written in precision fp16-mixed and this run is configured for fp16" in refused.stderr
    assert "--allow-precision-change" in refused.stderr
    assert [p["step"] for p in metrics(run_dir)] == [1, 2]  # nothing trained

    resumed = train("fp16-mixed", "--max-steps", "3", "--resume-from", "latest")
    assert resumed.returncode == 0, explain(resumed)
    assert [p["step"] for p in metrics(run_dir)][-1] == 3
    assert metrics(run_dir)[-1]["loss_scale"] == 65536.0  # the format it was trained in, scaler included

    converted = train("fp16", "--max-steps", "4", "--resume-from", "latest", "--allow-precision-change")
    assert converted.returncode == 0, explain(converted)
    assert [p["step"] for p in metrics(run_dir)][-1] == 4
    newest = max(checkpoint_dirs(run_dir / "checkpoints"))[1]
    assert checkpoint_precision(newest, read_meta(newest)) == "fp16"  # fp16 weights from now on
