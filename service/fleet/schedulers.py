"""The scheduler adapters a control plane mirrors cordons to, built from its settings.

``TRAINOPS_SCHEDULER`` (service/config.py, validated there) names them: ``pool`` is the node state itself and
always on (it needs no adapter: sweeps and the gateway change it directly), ``slurm`` drains with
``scontrol``, ``kubernetes`` cordons and taints through the API server at ``TRAINOPS_KUBERNETES_API_URL``
(in a pod: the service account's token and CA), each call bounded by ``TRAINOPS_KUBERNETES_TIMEOUT_S``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from service.config import Settings
from service.fleet.scheduler import KubernetesAdapter, SchedulerAdapter, SlurmAdapter


def kubernetes_core_v1(api_url: str, *, token_file: Path, ca_file: Path | None) -> Any:
    """A ``CoreV1Api`` on ``api_url`` with the bearer token read from ``token_file`` (re-read before every
    call: projected service-account tokens rotate) and ``ca_file`` verifying an
    https server."""
    import urllib3
    from kubernetes import client  # the `kubernetes` extra; imported only when the adapter is chosen

    def read_token(config: Any) -> None:
        config.api_key["authorization"] = token_file.read_text().strip()

    config = client.Configuration()
    config.host = api_url
    config.api_key_prefix["authorization"] = "Bearer"
    read_token(config)
    config.refresh_api_key_hook = read_token
    if api_url.startswith("https://") and ca_file is not None:
        config.ssl_ca_cert = str(ca_file)
    # A refused connection is retried (it fails fast); a call that timed out is not: urllib3's default
    # would retry a GET three times, so one pass would wait four timeouts. The next sync pass retries.
    config.retries = urllib3.Retry(total=2, read=0)
    return client.CoreV1Api(client.ApiClient(config))


def build_scheduler_adapters(settings: Settings) -> list[SchedulerAdapter]:
    """The external schedulers of ``settings.scheduler`` (Slurm, Kubernetes), in that order."""
    adapters: list[SchedulerAdapter] = []
    if "slurm" in settings.scheduler:
        adapters.append(SlurmAdapter())
    if "kubernetes" in settings.scheduler:
        url = settings.resolved_kubernetes_api_url
        assert url is not None  # Settings refuses kubernetes without an API server
        adapters.append(
            KubernetesAdapter(
                kubernetes_core_v1(
                    url, token_file=settings.kubernetes_token_file, ca_file=settings.kubernetes_ca_file
                ),
                timeout_s=settings.kubernetes_timeout_s,
            )
        )
    return adapters
