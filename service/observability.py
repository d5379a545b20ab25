"""Prometheus plumbing: the registry to scrape (multiprocess-aware) and request timing."""

from __future__ import annotations

import os

from prometheus_client import REGISTRY, CollectorRegistry, multiprocess


def registry_for_scrape() -> CollectorRegistry:
    # With several API processes, prometheus_client's multiprocess mode aggregates their files.
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return registry
    return REGISTRY
