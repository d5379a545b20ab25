"""HealthConfig as pydantic-settings: the TRAINOPS_HEALTH_* environment, the TRAINOPS_HEALTH_CONFIG file,
their precedence, refused keys and the invariants' messages."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from health.config import HealthConfig, LayeredSettings
from service.demo import simulated_fleet_env

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The process environment must not leak a developer's or another test's settings into these."""
    for name in list(os.environ):
        if name.startswith("TRAINOPS_HEALTH_") or name in ("TRAINOPS_FAKE_NVML", "TRAINOPS_BROKER_URL"):
            monkeypatch.delenv(name)


def test_the_process_environment_is_read_by_from_env_and_by_construction(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TRAINOPS_HEALTH_QUICK_INTERVAL_S", "60")
    monkeypatch.setenv("TRAINOPS_HEALTH_CHECKPOINT_DIR", "/data/ckpt")
    monkeypatch.setenv("TRAINOPS_FAKE_NVML", "/tmp/faults.json")
    monkeypatch.setenv("TRAINOPS_BROKER_URL", "redis://broker:6379/0")
    for config in (HealthConfig.from_env(), HealthConfig()):
        assert config.quick_interval_s == 60.0
        assert config.checkpoint_dir == Path("/data/ckpt")
        assert config.fake_nvml_path == Path("/tmp/faults.json")
        assert config.broker_url == "redis://broker:6379/0"
    # A keyword wins over the environment.
    assert HealthConfig(quick_interval_s=45.0).quick_interval_s == 45.0


def test_the_health_prefixed_names_win_over_the_shared_ones() -> None:
    config = HealthConfig.from_env(
        {
            "TRAINOPS_FAKE_NVML": "/shared.json",
            "TRAINOPS_HEALTH_FAKE_NVML_PATH": "/own.json",
            "TRAINOPS_BROKER_URL": "redis://shared",
            "TRAINOPS_HEALTH_BROKER_URL": "redis://own",
        }
    )
    assert (config.fake_nvml_path, config.broker_url) == (Path("/own.json"), "redis://own")


def test_empty_and_none_values_keep_the_defaults_or_unset_a_baseline() -> None:
    config = HealthConfig.from_env(
        {
            "TRAINOPS_HEALTH_HOST": "",
            "TRAINOPS_FAKE_NVML": "",
            "TRAINOPS_HEALTH_CPU_GEMM_BASELINE_GFLOPS": "none",
            "TRAINOPS_HEALTH_CPU_BUSBW_BASELINE_GBPS": "1.8",
        }
    )
    assert (config.host, config.fake_nvml_path) == (None, None)
    assert (config.cpu_gemm_baseline_gflops, config.cpu_busbw_baseline_gbps) == (None, 1.8)


def test_a_table_from_the_environment_is_a_json_object_and_keeps_the_models_case() -> None:
    config = HealthConfig.from_env({"TRAINOPS_HEALTH_EXPECTED_TFLOPS": '{"H100": 650, "MI300": 900}'})
    assert dict(config.expected_tflops) == {"H100": 650.0, "MI300": 900.0}


def test_the_config_file_is_read_and_the_environment_wins_over_it(tmp_path: Path) -> None:
    file = tmp_path / "health.json"
    file.write_text(
        json.dumps({"gemm_size": 512, "expected_gpus": 4, "expected_busbw_gbps": {"H200": 400.0}})
    )
    config = HealthConfig.from_env(
        {"TRAINOPS_HEALTH_CONFIG": str(file), "TRAINOPS_HEALTH_EXPECTED_GPUS": "2"}
    )
    assert (config.gemm_size, config.expected_gpus) == (512, 2)
    assert dict(config.expected_busbw_gbps) == {"H200": 400.0}
    # load: keywords > environment > file > defaults
    loaded = HealthConfig.load(
        file=file, environ={"TRAINOPS_HEALTH_GEMM_SIZE": "256"}, gemm_size=128, memory_test_mb=8
    )
    assert (loaded.gemm_size, loaded.expected_gpus, loaded.memory_test_mb) == (128, 4, 8)
    assert HealthConfig.load(file=file, environ={"TRAINOPS_HEALTH_GEMM_SIZE": "256"}).gemm_size == 256


def test_a_toml_config_file_is_read_by_its_extension(tmp_path: Path) -> None:
    file = tmp_path / "health.toml"
    file.write_text('host = "gpu-17"\nlemon_score_limit = 4.0\n\n[expected_tflops]\nH100 = 680.0\n')
    config = HealthConfig.from_env({"TRAINOPS_HEALTH_CONFIG": str(file)})
    assert (config.host, config.lemon_score_limit) == ("gpu-17", 4.0)
    assert dict(config.expected_tflops) == {"H100": 680.0}


def test_a_missing_config_file_is_an_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nowhere\.json"):
        HealthConfig.from_env({"TRAINOPS_HEALTH_CONFIG": str(tmp_path / "nowhere.json")})


def test_unknown_keys_are_refused_naming_the_key(tmp_path: Path) -> None:
    file = tmp_path / "health.json"
    file.write_text(json.dumps({"quick_intervall_s": 60}))
    with pytest.raises(ValidationError, match="quick_intervall_s"):
        HealthConfig.from_env({"TRAINOPS_HEALTH_CONFIG": str(file)})
    with pytest.raises(ValidationError, match="gemm_sise"):
        HealthConfig(gemm_sise=128)  # type: ignore[call-arg]


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"TRAINOPS_HEALTH_GEMM_SIZE": "0"}, "gemm_size must be > 0, got 0"),
        ({"TRAINOPS_HEALTH_QUICK_CHECK_TIMEOUT_S": "30"}, "quick_check_timeout_s must be shorter than"),
        (
            {"TRAINOPS_HEALTH_QUICK_INTERVAL_S": "5"},
            "quick_deadline_s must be at most twice quick_interval_s",
        ),
        ({"TRAINOPS_HEALTH_MIN_BUSBW_RATIO": "1.5"}, r"min_busbw_ratio must be in \(0, 1\]"),
        ({"TRAINOPS_HEALTH_LEMON_SCORE_LIMIT": "0.5"}, "lemon_score_limit must be >= 1"),
    ],
)
def test_invariants_are_refused_with_a_message_naming_the_setting(
    environ: dict[str, str], message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        HealthConfig.from_env(environ)


def test_the_config_is_frozen_and_with_changes_validates_the_copy() -> None:
    config = HealthConfig()
    with pytest.raises(ValidationError):
        config.gemm_size = 64  # type: ignore[misc]
    smaller = config.with_changes(gemm_size=64, fake_nvml_path=Path("/f.json"))
    assert (smaller.gemm_size, smaller.fake_nvml_path, config.gemm_size) == (64, Path("/f.json"), 2048)
    with pytest.raises(ValidationError, match="memory_test_mb must be > 0"):
        config.with_changes(memory_test_mb=0)


def test_every_field_keeps_its_documentation() -> None:
    undocumented = [name for name, info in HealthConfig.model_fields.items() if not info.description]
    assert undocumented == []
    assert issubclass(HealthConfig, LayeredSettings)


def test_every_documented_and_demo_variable_is_a_setting(tmp_path: Path) -> None:
    documented = set()
    for doc in [REPO / "README.md", *(REPO / "docs").glob("*.md")]:
        documented |= set(re.findall(r"TRAINOPS_HEALTH_[A-Z0-9_]*[A-Z0-9]", doc.read_text()))
    demo = simulated_fleet_env(tmp_path, gpus_per_host=2)
    documented |= {name for name in demo if name.startswith("TRAINOPS_HEALTH_")}
    fields = {f"TRAINOPS_HEALTH_{name.upper()}" for name in HealthConfig.model_fields}
    assert documented - fields - {"TRAINOPS_HEALTH_CONFIG"} == set()
    # The demo's simulated fleet reads into the values it means.
    config = HealthConfig.from_env(demo)
    assert (config.gemm_size, config.expected_gpus, config.quick_deadline_s) == (128, 2, 6.0)
    assert config.fake_nvml_path == tmp_path / "fake_nvml.json"
