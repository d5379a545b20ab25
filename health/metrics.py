"""Prometheus instruments of the host agent, updated in its Celery workers.

They are defined here, not in the control plane, so a GPU host's worker imports nothing of it;
service/metrics.py lists them with every other instrument trainops exports.
"""

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

__all__ = ["CHECKS_TOTAL", "CHECK_DURATION", "TASK_DURATION"]
