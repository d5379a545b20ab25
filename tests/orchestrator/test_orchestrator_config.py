"""OrchestratorConfig as pydantic-settings: the TRAINOPS_ORCHESTRATOR_CONFIG file (JSON or TOML), the
TRAINOPS_ORCHESTRATOR_* environment with nested sections, the precedence overrides > env > file > defaults,
refused keys and the invariants' messages."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from service.config import Settings
from service.recovery.config import (
    CheckpointVerifyConfig,
    DivergenceConfig,
    HangConfig,
    OrchestratorConfig,
    RemediationConfig,
    RestartPointConfig,
    load_orchestrator_config,
)
from service.recovery.restart_point import rule_for_run


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("TRAINOPS_ORCHESTRATOR_"):
            monkeypatch.delenv(name)


def settings_with(
    tmp_path: Path, document: dict[str, Any] | None = None, *, name: str = "orch.json"
) -> Settings:
    path = None
    if document is not None:
        path = tmp_path / name
        path.write_text(json.dumps(document))
    return Settings(home=tmp_path / "home", api_url="http://cp:8000", orchestrator_config=path)


def test_defaults_come_from_the_control_planes_home_and_url(tmp_path: Path) -> None:
    cfg = load_orchestrator_config(settings_with(tmp_path))
    assert cfg.runs_dir == str(tmp_path / "home" / "runs")
    assert cfg.api_url == "http://cp:8000"
    assert cfg.divergence == DivergenceConfig()


def test_the_json_file_sets_top_level_and_section_values(tmp_path: Path) -> None:
    document = {"hang_timeout_s": 20, "runs_dir": "/data/runs", "remediation": {"max_restarts": 50}}
    cfg = load_orchestrator_config(settings_with(tmp_path, document))
    assert (cfg.hang_timeout_s, cfg.runs_dir, cfg.remediation.max_restarts) == (20.0, "/data/runs", 50)
    assert cfg.remediation.lr_factor == RemediationConfig().lr_factor


def test_a_toml_file_is_read_by_its_extension(tmp_path: Path) -> None:
    path = tmp_path / "orchestrator.toml"
    path.write_text("hang_timeout_s = 30.0\n\n[divergence]\nloss_spike_ratio = 2.5\nmin_points = 6\n")
    cfg = load_orchestrator_config(Settings(home=tmp_path, orchestrator_config=path))
    assert (cfg.hang_timeout_s, cfg.divergence.loss_spike_ratio, cfg.divergence.min_points) == (30.0, 2.5, 6)


def test_nested_environment_variables_set_a_sections_field(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRAINOPS_ORCHESTRATOR_DIVERGENCE__LOSS_SPIKE_RATIO", "2")
    monkeypatch.setenv("TRAINOPS_ORCHESTRATOR_HANG__CHECKPOINT_SAVE_S", "900")
    monkeypatch.setenv("TRAINOPS_ORCHESTRATOR_REMEDIATION__DEEP_CHECK_BEFORE_RELAUNCH", "false")
    monkeypatch.setenv("TRAINOPS_ORCHESTRATOR_LOOP_INTERVAL_S", "0.5")
    cfg = load_orchestrator_config(settings_with(tmp_path))
    assert cfg.divergence.loss_spike_ratio == 2.0
    assert cfg.divergence.loss_spike_window == DivergenceConfig().loss_spike_window
    assert cfg.hang.checkpoint_save_s == 900.0
    assert cfg.remediation.deep_check_before_relaunch is False
    assert cfg.loop_interval_s == 0.5
    # Constructing the settings class reads the environment too, like the control plane's Settings.
    assert OrchestratorConfig().divergence.loss_spike_ratio == 2.0


def test_precedence_is_overrides_then_environment_then_file_then_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    document = {
        "hang_timeout_s": 20,
        "startup_grace_s": 200,
        "remediation": {"backoff_base_s": 3.0, "backoff_max_s": 600.0, "max_restarts": 7},
    }
    settings = settings_with(tmp_path, document)
    monkeypatch.setenv("TRAINOPS_ORCHESTRATOR_HANG_TIMEOUT_S", "25")
    monkeypatch.setenv("TRAINOPS_ORCHESTRATOR_REMEDIATION__BACKOFF_BASE_S", "2.0")
    cfg = load_orchestrator_config(settings)
    assert (cfg.hang_timeout_s, cfg.startup_grace_s) == (25.0, 200.0)  # env over file; file over defaults
    assert (cfg.remediation.backoff_base_s, cfg.remediation.max_restarts) == (2.0, 7)
    cfg = load_orchestrator_config(settings, hang_timeout_s=15.0, remediation={"backoff_base_s": 1.0})
    assert cfg.hang_timeout_s == 15.0
    # A section given as a dict merges key by key with the layers below it.
    assert (cfg.remediation.backoff_base_s, cfg.remediation.backoff_max_s) == (1.0, 600.0)
    assert cfg.remediation.max_restarts == 7
    # A section given as a model replaces them.
    cfg = load_orchestrator_config(settings, remediation=RemediationConfig(backoff_base_s=0.5))
    assert (cfg.remediation.backoff_max_s, cfg.remediation.max_restarts) == (60.0, 20)


@pytest.mark.parametrize(
    ("document", "key"),
    [
        ({"hang_timout_s": 20}, "hang_timout_s"),
        ({"divergence": {"loss_spike_ration": 2}}, r"divergence\.loss_spike_ration"),
        ({"hang": {"checkpoint_s": 900}}, r"hang\.checkpoint_s"),
    ],
)
def test_an_unknown_key_in_the_file_is_an_error_naming_it(
    tmp_path: Path, document: dict[str, Any], key: str
) -> None:
    with pytest.raises(ValidationError, match=key):
        load_orchestrator_config(settings_with(tmp_path, document))


def test_an_unknown_key_in_the_environment_or_the_overrides_is_an_error_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ValidationError, match="loop_intervall_s"):
        load_orchestrator_config(settings_with(tmp_path), loop_intervall_s=0.5)
    monkeypatch.setenv("TRAINOPS_ORCHESTRATOR_REMEDIATION__MAX_RESTART", "3")
    with pytest.raises(ValidationError, match=r"remediation\.max_restart"):
        load_orchestrator_config(settings_with(tmp_path))


def test_the_file_named_by_the_environment_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "orchestrator.json"
    path.write_text(json.dumps({"straggler_ratio": 4.0}))
    monkeypatch.setenv("TRAINOPS_ORCHESTRATOR_CONFIG", str(path))
    assert load_orchestrator_config(Settings(home=tmp_path)).straggler_ratio == 4.0


def test_a_missing_file_is_an_error_naming_it(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, orchestrator_config=tmp_path / "absent.json")
    with pytest.raises(FileNotFoundError, match=r"absent\.json"):
        load_orchestrator_config(settings)


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"heartbeat_interval_s": 20}, "heartbeat_interval_s must be < hang_timeout_s"),
        ({"hang": {"validation_s": 5}}, "hang.validation_s must be >= hang_timeout_s"),
        ({"hang": {"step_time_quantile": 0}}, r"hang.step_time_quantile must be in \(0, 1\]"),
        ({"divergence": {"min_points": 50}}, "min_points must not exceed the trailing windows"),
        ({"remediation": {"lr_factor": 1.5}}, r"lr_factor must be in \(0, 1\)"),
        ({"straggler_confirm_steps": 1}, "straggler_confirm_steps must be >= 2"),
    ],
)
def test_a_broken_invariant_in_the_file_is_refused_with_its_message(
    tmp_path: Path, document: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        load_orchestrator_config(settings_with(tmp_path, document))


def test_sections_are_constructed_by_keyword_and_copied_with_model_copy() -> None:
    cfg = OrchestratorConfig(
        hang_timeout_s=30.0,
        hang=HangConfig(step_time_multiple=3.0),
        remediation=RemediationConfig(backoff_base_s=0.2, backoff_max_s=1.0),
        restart_point=RestartPointConfig(act_norm_trend_window=10),
    )
    assert (cfg.hang.step_time_multiple, cfg.remediation.backoff_max_s) == (3.0, 1.0)
    widened = rule_for_run(cfg.restart_point, checkpoint_interval=100)
    assert (widened.act_norm_trend_window, cfg.restart_point.act_norm_trend_window) == (100, 10)
    with pytest.raises(ValidationError, match="unknown_knob"):
        DivergenceConfig(unknown_knob=1)  # type: ignore[call-arg]


def test_every_setting_keeps_its_documentation() -> None:
    sections = {"hang", "divergence", "restart_point", "remediation", "checkpoint_verify"}
    models = (
        OrchestratorConfig,
        DivergenceConfig,
        RestartPointConfig,
        RemediationConfig,
        HangConfig,
        CheckpointVerifyConfig,
    )
    for model in models:
        undocumented = [
            name for name, info in model.model_fields.items() if not info.description and name not in sections
        ]
        assert undocumented == [], model.__name__
