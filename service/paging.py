"""Paging on-call when a run needs attention: the logbook always, a webhook when one is configured.

With Alertmanager deployed, the RunNeedsAttention alert pages; without it, this webhook is the page. The
orchestrator calls the pager from its reconcile loop, so the pager only queues: one worker thread posts,
retrying a failed post with exponential back-off (tenacity) for at most ``retry_budget_s``, and the same run
paged for the same reason again within ``dedup_window_s`` is not posted twice (the body's ``dedup_key``,
Alertmanager- and PagerDuty-style, lets the receiver deduplicate across orchestrator restarts too).
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_delay,
    wait_exponential_jitter,
)

from service.config import Settings
from service.metrics import ORCHESTRATOR_PAGES

log = logging.getLogger("trainops.paging")


Pager = Callable[[int, str, dict[str, Any]], None]


def dedup_key(run_id: int, reason: str) -> str:
    """The same run and reason give the same key, on every orchestrator."""
    return hashlib.sha256(f"trainops/run/{run_id}/{reason}".encode()).hexdigest()[:32]


def _retryable(error: BaseException) -> bool:
    """Network errors, timeouts, 5xx and 429 may pass on a retry; any other 4xx will not."""
    if isinstance(error, httpx.HTTPStatusError):
        status = error.response.status_code
        return status >= 500 or status == 429
    return isinstance(error, httpx.TransportError)


@dataclass(frozen=True)
class _Page:
    key: str
    body: dict[str, Any]


class WebhookPager:
    """Posts pages to ``url`` from a worker thread; calling it never waits on the network."""

    def __init__(
        self,
        url: str,
        *,
        dedup_window_s: float = 3600.0,
        retry_budget_s: float = 120.0,
        first_retry_s: float = 1.0,
        max_retry_wait_s: float = 30.0,
        timeout_s: float = 10.0,
        max_queued: int = 100,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if dedup_window_s < 0 or retry_budget_s < 0 or first_retry_s <= 0 or timeout_s <= 0 or max_queued < 1:
            raise ValueError("windows and budgets must be >= 0, waits, timeouts and the queue size positive")
        self.url = url
        self.dedup_window_s = dedup_window_s
        self.retry_budget_s = retry_budget_s
        self.first_retry_s = first_retry_s
        self.max_retry_wait_s = max_retry_wait_s
        self.timeout_s = timeout_s
        self.clock = clock
        self._queue: queue.Queue[_Page] = queue.Queue(maxsize=max_queued)
        self._paged_at: dict[str, float] = {}
        """dedup key -> when it was queued; a key whose delivery failed for good is forgotten."""
        self._lock = threading.Lock()
        self._worker: threading.Thread | None = None

    def __call__(self, run_id: int, reason: str, evidence: dict[str, Any]) -> None:
        key = dedup_key(run_id, reason)
        now = self.clock()
        with self._lock:
            paged_at = self._paged_at.get(key)
            if paged_at is not None and now - paged_at < self.dedup_window_s:
                ORCHESTRATOR_PAGES.labels("deduplicated").inc()
                log.info(
                    "run %s: page for %r already sent %.0f s ago, not repeated",
                    run_id,
                    reason,
                    now - paged_at,
                )
                return
            body = {
                "event": "run_needs_attention",
                "dedup_key": key,
                "run_id": run_id,
                "reason": reason,
                "evidence": evidence,
            }
            try:
                self._queue.put_nowait(_Page(key, body))
            except queue.Full:
                ORCHESTRATOR_PAGES.labels("dropped").inc()
                log.error(
                    "run %s: page for %r dropped: %d pages already wait", run_id, reason, self._queue.qsize()
                )
                return
            self._paged_at[key] = now
            for old in [k for k, t in self._paged_at.items() if now - t >= self.dedup_window_s]:
                del self._paged_at[old]
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._work, name="trainops-pager", daemon=True)
                self._worker.start()

    def flush(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for every queued page to be sent or given up; whether they all were."""
        deadline = time.monotonic() + timeout_s
        while self._queue.unfinished_tasks:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
        return True

    def _work(self) -> None:
        while True:
            page = self._queue.get()
            try:
                self._deliver(page)
            finally:
                self._queue.task_done()

    def _deliver(self, page: _Page) -> None:
        retrying = Retrying(
            stop=stop_after_delay(self.retry_budget_s),
            wait=wait_exponential_jitter(multiplier=self.first_retry_s, max=self.max_retry_wait_s),
            retry=retry_if_exception(_retryable),
            before_sleep=self._log_retry,
            reraise=True,
        )
        try:
            retrying(self._post, page.body)
        except Exception as exc:
            ORCHESTRATOR_PAGES.labels("failed").inc()
            with self._lock:  # not sent: the next page for this run and reason is not a duplicate
                self._paged_at.pop(page.key, None)
            log.error("run %s: page not delivered to the webhook: %s", page.body["run_id"], exc)
            return
        ORCHESTRATOR_PAGES.labels("sent").inc()

    def _post(self, body: dict[str, Any]) -> None:
        response = httpx.post(self.url, json=body, timeout=self.timeout_s)
        response.raise_for_status()

    @staticmethod
    def _log_retry(state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        wait = state.next_action.sleep if state.next_action else 0.0
        log.warning("page: attempt %d failed (%s); retrying in %.1f s", state.attempt_number, error, wait)


def make_pager(settings: Settings) -> WebhookPager | None:
    url = settings.page_webhook_url
    if not url:
        return None
    return WebhookPager(url)
