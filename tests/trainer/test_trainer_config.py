"""Configuring the trainer: flags generated from the dataclass, a JSON file, one-line errors with exit 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.trainer_helpers import REPO, trainer_env
from trainer.config import ConfigError, TrainConfig, build_parser, parse_args


def test_flags_map_onto_the_typed_config() -> None:
    cfg = parse_args(
        [
            "--max-steps",
            "40",
            "--preset",
            "small",
            "--run-dir",
            "/tmp/r",
            "--checkpoint-interval",
            "10",
            "--resume-from",
            "latest",
            "--lr-scale",
            "0.5",
            "--lr",
            "1e-4",
            "--clip",
            "0.3",
            "--reset-loss-scale",
            "--skip-batches",
            "5",
            "--precision",
            "bf16",
            "--fault",
            "crash:step=12,rank=1,code=13",
            "--fault",
            "slow:rank=0,delay=0.1",
            "--no-grad-predivide",
        ]
    )
    assert (cfg.max_steps, cfg.preset, cfg.run_dir, cfg.checkpoint_interval) == (40, "small", "/tmp/r", 10)
    assert (cfg.resume_from, cfg.lr_scale, cfg.lr, cfg.clip) == ("latest", 0.5, 1e-4, 0.3)
    assert cfg.reset_loss_scale and cfg.skip_batches == 5 and cfg.precision == "bf16"
    assert cfg.fault == ["crash:step=12,rank=1,code=13", "slow:rank=0,delay=0.1"] and not cfg.grad_predivide


def test_fp16_is_opts_format_and_the_mixed_one_keeps_its_own_name(tmp_path: Path) -> None:
    cfg = parse_args([])
    assert cfg.precision == "fp16" and cfg.grad_predivide
    assert (cfg.initial_loss_scale, cfg.loss_scale_window, cfg.min_loss_scale) == (None, None, None)
    mixed = parse_args(["--precision", "fp16-mixed", "--no-grad-predivide", "--initial-loss-scale", "1024"])
    assert mixed.precision == "fp16-mixed" and not mixed.grad_predivide and mixed.initial_loss_scale == 1024
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"precision": "fp8"}))
    with pytest.raises(ConfigError, match="unknown precision 'fp8'"):
        parse_args(["--config", str(path)])


def test_every_field_has_a_flag_with_its_docstring_as_help() -> None:
    help_text = " ".join(build_parser().format_help().split())
    for name in TrainConfig.__dataclass_fields__:
        assert "--" + name.replace("_", "-") in help_text
    assert "Gradient-norm clipping threshold" in help_text


def test_json_config_file_with_flags_taking_precedence(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"max_steps": 7, "clip": 0.3, "fault": ["hang:step=2"]}))
    cfg = parse_args(["--config", str(path), "--max-steps", "9"])
    assert (cfg.max_steps, cfg.clip, cfg.fault) == (9, 0.3, ["hang:step=2"])
    path.write_text(json.dumps({"max_stepz": 7}))
    with pytest.raises(ConfigError, match=r"unknown keys.*max_stepz"):
        parse_args(["--config", str(path)])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--max-steps", "zero"], "invalid int value"),
        (["--max-steps", "0"], "max_steps must be >= 1"),
        (["--precision", "fp8"], "invalid choice"),
        (["--no-grad-predivide"], "fp16 reduces gradients in fp16 and always pre-divides"),
        (["--min-loss-scale", "8"], r"need initial_loss_scale \(4\) >= min_loss_scale \(8\)"),
        (["--precision", "fp16-mixed", "--initial-loss-scale", "0"], "initial_loss_scale must be > 0"),
        (["--loss-scale-window", "0"], "loss_scale_window must be >= 1"),
        (["--keep-checkpoints", "1"], "keep_checkpoints must be >= 2"),
        (["--preset", "7B"], "unknown preset"),
        (["--fault", "explode:step=1"], "unknown fault kind"),
        (["--fault", "crash:rank=1"], "needs step=N"),
        (["--resume-from", "/nonexistent/ckpt"], "neither 'latest' nor a directory"),
        (["--bogus"], "unrecognized arguments"),
    ],
)
def test_bad_configuration_is_rejected(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_args(argv)


@pytest.mark.parametrize("command", [["trainer.train"], ["trainer.launch", "--nproc-per-node", "2", "--"]])
def test_a_bad_flag_exits_2_with_one_line_and_no_traceback(command: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", *command, "--clip", "-1"],
        env=trainer_env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["trainer: error: clip must be > 0"]
