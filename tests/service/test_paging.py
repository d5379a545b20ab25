"""The orchestrator's own pages (service/paging.py) against real local HTTP receivers: queued without waiting
on the network, retried with back-off through failures, given up on within the budget when the receiver is
down, and deduplicated per run and reason."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from prometheus_client import REGISTRY

from service.paging import WebhookPager, dedup_key
from tests.livesrv import free_port


class Receiver(ThreadingHTTPServer):
    """A webhook that answers `failures` 503s first, then 200s, and can be held to answer late."""

    def __init__(self, failures: int = 0, status: int = 503) -> None:
        self.failures = failures
        self.status = status
        self.received: list[dict[str, Any]] = []
        self.arrived = threading.Event()
        self.answered = 0
        self.release = threading.Event()
        self.release.set()
        super().__init__(("127.0.0.1", 0), _Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/page"


class _Handler(BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.received.append(body)
        failing = len(self.server.received) <= self.server.failures
        self.server.arrived.set()
        self.server.release.wait(30)
        self.send_response(self.server.status if failing else 200)
        self.end_headers()
        self.server.answered += 1

    def log_message(self, *args: Any) -> None:
        """Quiet."""


@pytest.fixture
def receiver(request: pytest.FixtureRequest) -> Iterator[Receiver]:
    server = Receiver(*getattr(request, "param", ()))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.release.set()
    server.shutdown()
    server.server_close()


def _count(outcome: str) -> float:
    return REGISTRY.get_sample_value("trainops_orchestrator_pages_total", {"outcome": outcome}) or 0.0


def _fast(url: str, **kwargs: Any) -> WebhookPager:
    return WebhookPager(url, first_retry_s=0.01, max_retry_wait_s=0.05, timeout_s=5, **kwargs)


@pytest.mark.parametrize("receiver", [(3,)], indirect=True)
def test_a_page_is_retried_through_failures_and_sent_once(receiver: Receiver) -> None:
    sent, deduplicated = _count("sent"), _count("deduplicated")
    now = [1000.0]
    pager = _fast(receiver.url, retry_budget_s=30, dedup_window_s=600, clock=lambda: now[0])
    receiver.release.clear()  # the receiver holds the first post unanswered
    pager(7, "restart budget spent", {"restarts": 3})
    # The call returned while its post is still waiting for an answer: the loop never waits on the network.
    assert receiver.arrived.wait(10)
    assert len(receiver.received) == 1 and receiver.answered == 0
    receiver.release.set()
    assert pager.flush(30)
    # three 503s, then the 200: four posts of the same page, one dedup key
    assert len(receiver.received) == 4
    assert {r["dedup_key"] for r in receiver.received} == {dedup_key(7, "restart budget spent")}
    assert receiver.received[-1] == {
        "event": "run_needs_attention",
        "dedup_key": dedup_key(7, "restart budget spent"),
        "run_id": 7,
        "reason": "restart budget spent",
        "evidence": {"restarts": 3},
    }
    assert _count("sent") == sent + 1

    # The same run and reason again within the window: not posted. Another reason, or later: posted.
    pager(7, "restart budget spent", {"restarts": 3})
    assert pager.flush(30) and len(receiver.received) == 4
    assert _count("deduplicated") == deduplicated + 1
    pager(7, "divergence after rollback", {})
    now[0] += 601
    pager(7, "restart budget spent", {"restarts": 3})
    assert pager.flush(30)
    assert [r["reason"] for r in receiver.received[4:]] == [
        "divergence after rollback",
        "restart budget spent",
    ]


@pytest.mark.parametrize("receiver", [(5, 400)], indirect=True)
def test_a_refused_page_is_not_retried(receiver: Receiver) -> None:
    failed = _count("failed")
    pager = _fast(receiver.url, retry_budget_s=30)
    pager(8, "no healthy nodes", {})
    assert pager.flush(30)
    assert len(receiver.received) == 1 and _count("failed") == failed + 1


def test_a_down_receiver_is_given_up_on_within_the_budget_and_paged_again_later() -> None:
    failed, deduplicated = _count("failed"), _count("deduplicated")
    pager = _fast(f"http://127.0.0.1:{free_port()}/page", retry_budget_s=0.3)
    pager(9, "restart budget spent", {})
    assert pager.flush(30), "the retries outlived their budget"
    assert _count("failed") == failed + 1
    # Never delivered, so the next page for the same reason is not a duplicate: it is tried again.
    pager(9, "restart budget spent", {})
    assert pager.flush(30)
    assert _count("failed") == failed + 2 and _count("deduplicated") == deduplicated
