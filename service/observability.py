"""Prometheus plumbing: the registry a scrape reads (multiprocess-aware), and a metrics server for
processes that are not the API (orchestrator, Celery workers).

Process-local instruments (service.metrics.INSTRUMENTS) come from prometheus_client's default registry,
or, when ``PROMETHEUS_MULTIPROC_DIR`` is set, from the files every process of the deployment writes there.
The database-backed gauges (service.metrics_collector.ControlPlaneCollector) are added per scrape by the
API only, so each is exported once however many processes there are.

``python -m service.observability --port 9101`` serves a multiprocess directory on its own: run it next
to a Celery worker or the orchestrator, with the same ``PROMETHEUS_MULTIPROC_DIR``.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Iterable
from wsgiref.simple_server import WSGIServer

from prometheus_client import REGISTRY, CollectorRegistry, multiprocess, start_http_server
from prometheus_client.core import Metric
from prometheus_client.registry import Collector
from sqlalchemy.orm import Session, sessionmaker

from service.metrics_collector import ControlPlaneCollector, ScrapeCache
from service.recovery.config import DivergenceConfig

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


class _DefaultRegistry(Collector):
    """The process's default registry as one collector of a per-scrape registry."""

    def collect(self) -> Iterable[Metric]:
        return REGISTRY.collect()


def process_registry() -> CollectorRegistry:
    """Instruments of this process, or of every process sharing the multiprocess directory."""
    registry = CollectorRegistry()
    if os.environ.get(MULTIPROC_ENV):
        multiprocess.MultiProcessCollector(registry)
    else:
        registry.register(_DefaultRegistry())
    return registry


def registry_for_scrape(
    session_factory: sessionmaker[Session] | None = None,
    broker_url: str | None = None,
    cache: ScrapeCache | None = None,
    divergence: DivergenceConfig | None = None,
) -> CollectorRegistry:
    """What the API's /metrics exposes: the instruments plus, given a database, the per-run/node gauges
    (read through ``cache`` when given: the process's instruments are always current, the database's
    gauges at most the cache's TTL old)."""
    registry = process_registry()
    if session_factory is not None:
        registry.register(ControlPlaneCollector(session_factory, broker_url, cache, divergence))
    return registry


def serve_metrics(port: int, addr: str = "0.0.0.0") -> WSGIServer:
    """Serve this process's instruments (or the multiprocess directory's) on a port, in a thread."""
    server, _ = start_http_server(port, addr=addr, registry=process_registry())
    return server


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=9101)
    parser.add_argument("--addr", default="0.0.0.0")
    args = parser.parse_args(argv)
    if not os.environ.get(MULTIPROC_ENV):
        parser.error(f"set {MULTIPROC_ENV} to the directory the worker processes write")
    serve_metrics(args.port, args.addr)
    while True:  # the server runs in a daemon thread; keep the process alive until it is stopped
        time.sleep(3600)


if __name__ == "__main__":
    main()
