"""The service's one typed config, read once at the edge (env prefix ``TRAINOPS_``)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_BOOTSTRAP_TOKEN = "trainops-dev-admin-token"


class Settings(BaseSettings):
    """Control-plane settings. Embedded defaults: SQLite under ``./.trainops/``, no Redis."""

    model_config = SettingsConfigDict(env_prefix="TRAINOPS_", extra="ignore")

    mode: Literal["dev", "prod"] = Field("dev", description="`prod` refuses default secrets.")
    home: Path = Field(Path(".trainops"), description="State directory of the embedded mode.")
    database_url: str | None = Field(
        None,
        description="SQLAlchemy URL; default sqlite:///<home>/trainops.db. "
        "Production: postgresql+psycopg://user@host/db.",
    )
    broker_url: str | None = Field(None, description="Celery broker (redis://...); unset = in-process.")
    api_host: str = "127.0.0.1"
    api_port: int = Field(8000, ge=1, le=65535)
    api_url: str | None = Field(None, description="URL the CLI talks to; default http://api_host:api_port.")
    token: SecretStr | None = Field(None, description="Bearer token the CLI sends.")
    bootstrap_admin_token: SecretStr = Field(
        SecretStr(DEFAULT_BOOTSTRAP_TOKEN),
        description="An admin token accepted without a database row, so a fresh install can be driven. "
        "Must be changed outside dev mode.",
    )
    orchestrator_config: Path | None = Field(None, description="JSON file of orchestrator settings.")
    page_webhook_url: str | None = Field(
        None, description="Webhook POSTed when a run needs attention (for setups without Alertmanager)."
    )
    slurm_enabled: bool = Field(
        False,
        description="Offer the `slurm` launcher (sbatch/squeue/scontrol on PATH, SLURM_CONF if not the "
        "default) and mirror cordons as Slurm drains.",
    )
    slurm_partition: str | None = Field(None, description="Default sbatch --partition for Slurm runs.")
    slurm_account: str | None = Field(None, description="Default sbatch --account for Slurm runs.")
    max_page_size: int = Field(500, ge=1)
    max_ingest_points: int = Field(10_000, ge=1)
    db_pool_size: int = Field(10, ge=1)

    @model_validator(mode="after")
    def _refuse_default_secrets(self) -> Settings:
        if self.mode != "dev" and self.bootstrap_admin_token.get_secret_value() == DEFAULT_BOOTSTRAP_TOKEN:
            raise ValueError(
                "TRAINOPS_BOOTSTRAP_ADMIN_TOKEN is the built-in default; set a secret of your own "
                "outside dev mode (TRAINOPS_MODE=prod)."
            )
        return self

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.home / 'trainops.db').resolve()}"

    @property
    def resolved_api_url(self) -> str:
        return (self.api_url or f"http://{self.api_host}:{self.api_port}").rstrip("/")


@lru_cache
def get_settings() -> Settings:
    return Settings()
