"""The service's one typed config, read once at the edge (env prefix ``TRAINOPS_``).

It is a `health.config.LayeredSettings` like the health and orchestrator configs: one mechanism, one
precedence (keywords > environment > config file > defaults) for all three.
"""

from __future__ import annotations

import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from health.config import LayeredSettings

DEFAULT_BOOTSTRAP_TOKEN = "trainops-dev-admin-token"
# Outside dev mode the bootstrap token is an admin credential accepted without a database row, so it must
# be long and random: secrets.token_urlsafe(32) gives 43 characters of about 6 bits each.
MIN_BOOTSTRAP_TOKEN_CHARS = 32
# A long token made of few characters ("x" * 32, "abab...") is not random whatever its length; a random
# hex or url-safe token of 32 characters has well over this many distinct ones.
MIN_BOOTSTRAP_TOKEN_DISTINCT_CHARS = 10
# Words of documentation examples, templates and the dev default (compared with case and punctuation
# dropped): a token containing one was copied, not generated.
PLACEHOLDER_TOKEN_WORDS = (
    "changeme",
    "replaceme",
    "placeholder",
    "example",
    "yoursecret",
    "yourtoken",
    "devadmintoken",
)
GENERATE_TOKEN_HINT = "python -c 'import secrets; print(secrets.token_urlsafe(32))'"
SCHEDULERS = ("pool", "slurm", "kubernetes")
SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")


class Settings(LayeredSettings):
    """Control-plane settings. Embedded defaults: SQLite under ``./.trainops/``, no Redis."""

    # hide_input_in_errors: a refused setting is a secret (the bootstrap token, a database URL's password);
    # pydantic would otherwise print the inputs next to the error, into the service's startup log.
    model_config = SettingsConfigDict(env_prefix="TRAINOPS_", extra="ignore", hide_input_in_errors=True)

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
    orchestrator_config: Path | None = Field(
        None, description="JSON (or, by a .toml extension, TOML) file of orchestrator settings."
    )
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
    scheduler: Annotated[tuple[Literal["pool", "slurm", "kubernetes"], ...], NoDecode] = Field(
        ("pool",),
        description="Schedulers that mirror cordons and whose outside drains are synced, comma-separated: "
        "pool (the control plane's own pool, always on), slurm (needs TRAINOPS_SLURM_ENABLED, which "
        "implies it), kubernetes.",
    )
    kubernetes_api_url: str | None = Field(
        None,
        description="Kubernetes API server; default in-cluster https://$KUBERNETES_SERVICE_HOST:"
        "$KUBERNETES_SERVICE_PORT.",
    )
    kubernetes_token_file: Path = Field(
        SERVICE_ACCOUNT_DIR / "token", description="Bearer token file (re-read when it rotates)."
    )
    kubernetes_ca_file: Path = Field(
        SERVICE_ACCOUNT_DIR / "ca.crt", description="CA bundle of an https API server."
    )
    kubernetes_timeout_s: float = Field(
        10.0,
        gt=0,
        description="Seconds one Kubernetes API call may take; a call that runs out is a scheduler failure "
        "(logged, never fatal) and the next sync pass tries again.",
    )
    max_page_size: int = Field(500, ge=1)
    max_ingest_points: int = Field(10_000, ge=1)
    db_pool_size: int = Field(10, ge=1)
    metrics_cache_ttl_s: float = Field(
        5.0,
        ge=0,
        le=300,
        description="Seconds the /metrics scrape reuses its database reading (shared by concurrent scrapes; "
        "0 reads the database on every scrape). docs/observability.md.",
    )
    extra_launchers: Annotated[tuple[str, ...], NoDecode] = Field(
        (),
        description="Launchers the orchestrator offers besides local and slurm, comma-separated "
        "`module:Class` import paths; each class is built without arguments and serves the runs whose "
        "config names its `kind` (bench/fleet_sim.py's `bench.fleet_sim:SimLauncher`, kind `sim`).",
    )
    metrics_token: SecretStr | None = Field(
        None,
        description="When set, /metrics answers 401 unless the scrape sends `Authorization: Bearer <it>` "
        "(Prometheus: `authorization: {credentials_file: ...}`). Unset: /metrics is public.",
    )

    @field_validator("scheduler", mode="before")
    @classmethod
    def _split_schedulers(cls, value: object) -> object:
        if isinstance(value, str):
            names = tuple(n.strip().lower() for n in value.split(",") if n.strip())
            unknown = [n for n in names if n not in SCHEDULERS]
            if unknown or not names:
                expected = ", ".join(SCHEDULERS)
                raise ValueError(
                    f"TRAINOPS_SCHEDULER={value!r}: expected a comma-separated list of {expected}"
                )
            return names
        return value

    @field_validator("extra_launchers", mode="before")
    @classmethod
    def _split_launchers(cls, value: object) -> object:
        if isinstance(value, str):
            paths = tuple(p.strip() for p in value.split(",") if p.strip())
            malformed = [p for p in paths if p.count(":") != 1 or not all(p.split(":"))]
            if malformed:
                raise ValueError(
                    f"TRAINOPS_EXTRA_LAUNCHERS: {', '.join(malformed)} is not a `module:Class` import path"
                )
            return paths
        return value

    @model_validator(mode="after")
    def _check_schedulers(self) -> Settings:
        names = dict.fromkeys(("pool", *self.scheduler, *(("slurm",) if self.slurm_enabled else ())))
        self.scheduler = tuple(names)  # type: ignore[assignment]
        if "slurm" in self.scheduler and not self.slurm_enabled:
            raise ValueError(
                "TRAINOPS_SCHEDULER lists slurm but TRAINOPS_SLURM_ENABLED is false; set "
                "TRAINOPS_SLURM_ENABLED=true (scontrol and sinfo on PATH) or drop slurm"
            )
        if "kubernetes" in self.scheduler:
            url = self.resolved_kubernetes_api_url
            if url is None:
                raise ValueError(
                    "TRAINOPS_SCHEDULER lists kubernetes but there is no API server: set "
                    "TRAINOPS_KUBERNETES_API_URL (outside a pod KUBERNETES_SERVICE_HOST is unset)"
                )
            if not url.startswith(("https://", "http://")):
                raise ValueError(f"TRAINOPS_KUBERNETES_API_URL={url!r} is not an http(s) URL")
            if not self.kubernetes_token_file.is_file():
                raise ValueError(
                    f"TRAINOPS_KUBERNETES_TOKEN_FILE={self.kubernetes_token_file} does not exist "
                    "(the service account token; mount it or point the setting at a token file)"
                )
            if url.startswith("https://") and not self.kubernetes_ca_file.is_file():
                raise ValueError(
                    f"TRAINOPS_KUBERNETES_CA_FILE={self.kubernetes_ca_file} does not exist "
                    f"(the CA bundle that verifies {url})"
                )
        return self

    @model_validator(mode="after")
    def _refuse_default_secrets(self) -> Settings:
        if self.mode == "dev":
            return self
        problem = bootstrap_token_problem(self.bootstrap_admin_token.get_secret_value())
        if problem is not None:
            raise ValueError(
                f"TRAINOPS_BOOTSTRAP_ADMIN_TOKEN {problem}; outside dev mode (TRAINOPS_MODE={self.mode}) it "
                f"must be a random secret of at least {MIN_BOOTSTRAP_TOKEN_CHARS} characters. "
                f"Generate one with: {GENERATE_TOKEN_HINT}"
            )
        return self

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.home / 'trainops.db').resolve()}"

    @property
    def resolved_kubernetes_api_url(self) -> str | None:
        if self.kubernetes_api_url:
            return self.kubernetes_api_url.rstrip("/")
        host, port = (
            os.environ.get("KUBERNETES_SERVICE_HOST"),
            os.environ.get("KUBERNETES_SERVICE_PORT", "443"),
        )
        if not host:
            return None
        return f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"

    @property
    def resolved_api_url(self) -> str:
        return (self.api_url or f"http://{self.api_host}:{self.api_port}").rstrip("/")


def bootstrap_token_problem(token: str) -> str | None:
    """Why `token` is no production bootstrap token (a phrase that never quotes it), or None if it may be."""
    if token == DEFAULT_BOOTSTRAP_TOKEN:
        return "is the built-in default"
    if len(token) < MIN_BOOTSTRAP_TOKEN_CHARS:
        return f"is only {len(token)} characters long"
    letters = re.sub(r"[^a-z0-9]", "", token.lower())
    if any(word in letters for word in PLACEHOLDER_TOKEN_WORDS):
        return "is a placeholder from an example"
    if len(set(token)) < MIN_BOOTSTRAP_TOKEN_DISTINCT_CHARS:
        return f"has only {len(set(token))} distinct characters (not random)"
    return None


@lru_cache
def get_settings() -> Settings:
    return Settings()
