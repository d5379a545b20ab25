"""Prometheus metrics of the health layer, defined with every other metric in service/metrics.py."""

from __future__ import annotations

from service.metrics import HEALTH_CHECK_DURATION as CHECK_DURATION
from service.metrics import HEALTH_CHECKS as CHECKS_TOTAL
from service.metrics import HEALTH_TASK_DURATION as TASK_DURATION

__all__ = ["CHECKS_TOTAL", "CHECK_DURATION", "TASK_DURATION"]
