"""Prometheus metrics of the health layer (to move into the observability module when it exists)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

CHECK_DURATION = Histogram(
    "trainops_health_check_duration_seconds",
    "Duration of one health check on one host.",
    labelnames=("check", "status"),
    buckets=(0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900),
)
CHECKS_TOTAL = Counter(
    "trainops_health_checks_total",
    "Health checks run, by check and outcome status.",
    labelnames=("check", "status"),
)
TASK_DURATION = Histogram(
    "trainops_health_task_duration_seconds",
    "Duration of one health Celery task, by task name and outcome (ok / error).",
    labelnames=("task", "outcome"),
    buckets=(0.01, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 1800),
)
