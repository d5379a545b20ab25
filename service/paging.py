"""Paging on-call when a run needs attention: the logbook always, a webhook when one is configured.

With Alertmanager deployed, the RunNeedsAttention alert pages; without it, this webhook is the page.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import httpx

from service.config import Settings

log = logging.getLogger("trainops.paging")


Pager = Callable[[int, str, dict[str, Any]], None]


def make_pager(settings: Settings) -> Pager | None:
    url = settings.page_webhook_url
    if not url:
        return None

    def page(run_id: int, reason: str, evidence: dict[str, Any]) -> None:
        body = {"event": "run_needs_attention", "run_id": run_id, "reason": reason, "evidence": evidence}
        response = httpx.post(url, json=body, timeout=10)
        response.raise_for_status()

    return page
