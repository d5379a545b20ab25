"""Health-layer configuration: one typed object read once at the edge (env prefix ``TRAINOPS_HEALTH_``).

Also home of `LayeredSettings`, the pydantic-settings base every trainops config shares (this one,
the orchestrator's and the control plane's): health may not import the service, so the base lives here.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    InitSettingsSource,
    JsonConfigSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

SHARED_QUEUE = "health.shared"
HEALTH_CONFIG_FILE_ENV = "TRAINOPS_HEALTH_CONFIG"


def host_queue(host: str) -> str:
    """The Celery queue a host's worker consumes."""
    return f"health.{host}"


@dataclass(frozen=True)
class _LoadLayers:
    """What one `LayeredSettings.load` reads beneath its keyword arguments, for the class it loads."""

    settings_cls: type[BaseSettings]
    environ: Mapping[str, str] | None
    file: Path | None
    defaults: Mapping[str, Any] = field(default_factory=dict)


# The sources of a pydantic-settings class are chosen in a classmethod with no per-call arguments, so the
# layers of one `load` reach it through a context variable set for the duration of that construction.
_LOAD_LAYERS: ContextVar[_LoadLayers | None] = ContextVar("trainops_settings_load_layers", default=None)


class _MappingEnvSource(EnvSettingsSource):
    """The environment source reading a given mapping instead of ``os.environ`` (`from_env(environ)`)."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        self._environ = environ  # read by _load_env_vars, which the base constructor calls
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return {
            (name if self.case_sensitive else name.lower()): value
            for name, value in self._environ.items()
            if not (self.env_ignore_empty and value == "")
        }


def config_file_source(settings_cls: type[BaseSettings], path: Path) -> PydanticBaseSettingsSource:
    """The source of a config file: TOML by its ``.toml`` extension, JSON otherwise."""
    if path.suffix.lower() == ".toml":
        return TomlConfigSettingsSource(settings_cls, toml_file=path)
    return JsonConfigSettingsSource(settings_cls, json_file=path)


class LayeredSettings(BaseSettings):
    """pydantic-settings with the one precedence every trainops config follows, highest first:
    keyword arguments > environment > config file (JSON, or TOML by extension) > load defaults > field
    defaults. Constructing the class reads keywords and the environment; `load` adds the file and the
    defaults (and may read a given mapping as the environment). Nested sections merge key by key across
    layers."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # A .env file and a secrets directory, where a class configures them, rank with the environment.
        layers = _LOAD_LAYERS.get()
        if layers is None or layers.settings_cls is not settings_cls:
            return (init_settings, env_settings, dotenv_settings, file_secret_settings)
        env = env_settings if layers.environ is None else _MappingEnvSource(settings_cls, layers.environ)
        below_env: list[PydanticBaseSettingsSource] = []
        if layers.file is not None:
            below_env.append(config_file_source(settings_cls, layers.file))
        if layers.defaults:
            below_env.append(InitSettingsSource(settings_cls, init_kwargs=dict(layers.defaults)))
        return (init_settings, env, dotenv_settings, file_secret_settings, *below_env)

    @classmethod
    def load(
        cls,
        *,
        file: Path | str | None = None,
        environ: Mapping[str, str] | None = None,
        defaults: Mapping[str, Any] | None = None,
        **overrides: Any,
    ) -> Self:
        """`overrides` > the environment (``os.environ`` unless `environ` is given) > `file` > `defaults`.
        A named file that does not exist is an error (a typo must not silently fall back to defaults)."""
        path = Path(file) if file is not None else None
        if path is not None and not path.is_file():
            raise FileNotFoundError(f"{cls.__name__} config file {path} does not exist")
        with _layers(_LoadLayers(cls, environ, path, dict(defaults or {}))):
            return cls(**overrides)


@contextmanager
def _layers(layers: _LoadLayers) -> Iterator[None]:
    token = _LOAD_LAYERS.set(layers)
    try:
        yield
    finally:
        _LOAD_LAYERS.reset(token)


class HealthConfig(LayeredSettings):
    """How checks run, how long they may take, and what counts as healthy.

    Every field is read from ``TRAINOPS_HEALTH_<FIELD>`` (tables as JSON objects), and by `from_env` also
    from the JSON or TOML file ``TRAINOPS_HEALTH_CONFIG`` names; the environment wins over the file.
    ``TRAINOPS_FAKE_NVML`` and ``TRAINOPS_BROKER_URL`` are accepted for `fake_nvml_path` and `broker_url`."""

    model_config = SettingsConfigDict(
        env_prefix="TRAINOPS_HEALTH_",
        frozen=True,
        extra="forbid",
        populate_by_name=True,
        env_ignore_empty=True,
        use_attribute_docstrings=True,
    )

    host: str | None = None
    """This worker's host identity (``TRAINOPS_HEALTH_HOST``); None on the control side and in embedded mode,
    where one in-process worker serves every host's queue."""
    broker_url: str | None = Field(
        None, validation_alias=AliasChoices("TRAINOPS_HEALTH_BROKER_URL", "TRAINOPS_BROKER_URL")
    )
    """Celery broker and result backend (redis://...); None = embedded, in-process (memory://)."""
    quick_interval_s: float = 30.0
    """How often Celery beat sweeps every registered host with the quick checks."""
    quick_check_timeout_s: float = 10.0
    """Time limit of one quick (passive) check; a check past it is killed and reported as ``timeout``."""
    deep_check_timeout_s: float = 300.0
    """Time limit of one deep (active) check."""
    quick_deadline_s: float = 25.0
    """How long a quick sweep waits for all hosts; a host that has not answered by then is a finding."""
    deep_deadline_s: float = 900.0
    """How long a deep sweep waits for all hosts."""
    expected_gpus: int = 8
    """GPUs a host should have when the control plane has no inventory for it."""
    fake_nvml_path: Path | None = Field(
        None, validation_alias=AliasChoices("TRAINOPS_HEALTH_FAKE_NVML_PATH", "TRAINOPS_FAKE_NVML")
    )
    """JSON fault script for the fake NVML backend (``TRAINOPS_FAKE_NVML``); None = the real driver."""
    checkpoint_dir: Path = Path(".trainops/checkpoints")
    """Directory whose write/read throughput and free space the deep and quick checks measure."""
    max_temperature_c: int = 87
    """GPU core temperature above which a GPU is reported as running hot (soft fault)."""
    sbe_storm_threshold: int = 1000
    """Volatile single-bit ECC corrections since boot above which the GPU is flagged (soft fault)."""
    min_gemm_ratio: float = 0.7
    """Measured GEMM throughput / expected figure below which a GPU is slow (soft fault)."""
    min_busbw_ratio: float = 0.7
    """Measured all-reduce bus bandwidth / expected figure below which the fabric is slow (soft fault)."""
    cpu_gemm_baseline_gflops: float | None = None
    """Calibrated CPU GEMM figure (``python -m health.calibrate``); None = the CPU GEMM check is skipped."""
    cpu_busbw_baseline_gbps: float | None = None
    """Calibrated gloo all-reduce bus bandwidth on this class of machine; None = no ratio judged."""
    gemm_size: int = 2048
    """Square matrix size of the GEMM check (smaller on CPU test fleets)."""
    memory_test_mb: int = 256
    """Bytes per device the memory pattern test writes and reads back."""
    allreduce_mb: float = 64.0
    """Message size of the all-reduce bandwidth checks."""
    disk_test_mb: int = 256
    """Bytes the checkpoint-directory throughput test writes and reads back."""
    min_disk_write_mb_s: float = 100.0
    """Checkpoint-directory write throughput below which the disk is slow (soft fault)."""
    min_free_disk_gb: float = 50.0
    """Free space of the checkpoint directory below which the host cannot take checkpoints (soft fault)."""
    max_clock_skew_s: float = 1.0
    """Allowed difference between the host's clock and the control plane's."""
    expected_tflops: Mapping[str, float] = Field(
        default_factory=lambda: {
            # Dense BF16 figures a healthy part reaches in a large GEMM (about 70-75% of the datasheet peak).
            "H100": 700.0,
            "H200": 700.0,
            "A100": 230.0,
            "B200": 1400.0,
        }
    )
    """Expected GEMM TFLOP/s by GPU model name fragment."""
    expected_busbw_gbps: Mapping[str, float] = Field(
        default_factory=lambda: {"H100": 360.0, "H200": 360.0, "A100": 230.0, "B200": 700.0}
    )
    """Expected intra-node NCCL all-reduce bus bandwidth (GB/s) by GPU model name fragment."""
    expected_fabric_busbw_gbps: Mapping[str, float] = Field(
        # One rank per host drives one GPU and its NIC (400 Gb/s NDR per H100/H200, 200 Gb/s HDR per A100,
        # 800 Gb/s XDR per B200), about 80% of line rate; the NVLink figures above would flag every host.
        default_factory=lambda: {"H100": 40.0, "H200": 40.0, "A100": 20.0, "B200": 80.0}
    )
    """Expected cross-host all-reduce bus bandwidth (GB/s, one rank per host) by GPU model name fragment."""
    fabric_join_timeout_s: float = 60.0
    """How long a host waits for the other hosts of a cross-host all-reduce to join; a host that has not
    joined by then is a finding, never a hang."""
    lemon_score_limit: float = 2.5
    """Lemon score at which a host is retired (``CordonRules.lemon_score_limit``): each hardware failure
    attributed to it counts 1, halved every ``lemon_half_life_s``."""
    lemon_half_life_s: float = 14 * 24 * 3600.0
    """Age at which an offence counts half (old offences decay; two weeks by default)."""
    fabric_master_addr: str | None = None
    """Address the ranks of a cross-host all-reduce reach the master host at; None = the master host's
    name (``127.0.0.1`` in embedded mode, where every host's ranks run on this machine). Set
    ``127.0.0.1`` for simulated fleets of worker processes on one machine."""

    @field_validator("cpu_gemm_baseline_gflops", "cpu_busbw_baseline_gbps", mode="before")
    @classmethod
    def _none_spelled_out(cls, value: object) -> object:
        # "none" un-sets a calibrated baseline from the environment, as it always has.
        return None if isinstance(value, str) and value.strip().lower() in ("", "none") else value

    @model_validator(mode="after")
    def _check_invariants(self) -> Self:
        positive = (
            "quick_interval_s",
            "quick_check_timeout_s",
            "deep_check_timeout_s",
            "quick_deadline_s",
            "deep_deadline_s",
            "gemm_size",
            "memory_test_mb",
            "allreduce_mb",
            "disk_test_mb",
            "fabric_join_timeout_s",
            "lemon_half_life_s",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.lemon_score_limit < 1:
            raise ValueError("lemon_score_limit must be >= 1")
        if self.expected_gpus < 0:
            raise ValueError("expected_gpus must be >= 0")
        if self.quick_check_timeout_s >= self.quick_deadline_s:
            raise ValueError("quick_check_timeout_s must be shorter than quick_deadline_s")
        if self.deep_check_timeout_s >= self.deep_deadline_s:
            raise ValueError("deep_check_timeout_s must be shorter than deep_deadline_s")
        if self.quick_deadline_s > self.quick_interval_s * 2:
            # A quick sweep must finish before the next-but-one starts, or beat piles sweeps up.
            raise ValueError("quick_deadline_s must be at most twice quick_interval_s")
        for name in ("min_gemm_ratio", "min_busbw_ratio"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in (0, 1]")
        return self

    def with_changes(self, **changes: Any) -> HealthConfig:
        """A copy with `changes`, validated like any construction (`model_copy` would skip the checks)."""
        return type(self)(**{**self.model_dump(), **changes})

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> HealthConfig:
        """``TRAINOPS_HEALTH_<FIELD>`` (plus ``TRAINOPS_FAKE_NVML`` and ``TRAINOPS_BROKER_URL``) over the file
        ``TRAINOPS_HEALTH_CONFIG`` names (JSON, or TOML by extension) over the defaults. `environ` stands in
        for ``os.environ``."""
        env = os.environ if environ is None else environ
        return cls.load(file=env.get(HEALTH_CONFIG_FILE_ENV) or None, environ=environ)
