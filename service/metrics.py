"""Every Prometheus metric the service exports, in one place: `trainops_<thing>_<unit>`, small label sets."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

HTTP_REQUEST_DURATION = Histogram(
    "trainops_http_request_duration_seconds",
    "API request latency by route template and status class.",
    ["method", "route", "status"],
    buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
METRIC_POINTS_INGESTED = Counter(
    "trainops_metric_points_ingested_total",
    "Per-step metric rows accepted from trainers (duplicates excluded).",
)
METRIC_POINTS_DUPLICATE = Counter(
    "trainops_metric_points_duplicate_total",
    "Per-step metric rows re-sent by trainers and ignored.",
)
