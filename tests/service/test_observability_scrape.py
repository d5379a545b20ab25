"""The /metrics scrape: its database reading is cached for a few seconds and shared by concurrent scrapes,
and an optional bearer token guards it (docs/observability.md, "Scraping")."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client.core import GaugeMetricFamily, Metric

from service.config import Settings
from service.main import create_app
from service.metrics_collector import ScrapeCache
from tests.conftest import make_run


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _reading(value: float) -> list[Metric]:
    family = GaugeMetricFamily("reading", "which reading this is")
    family.add_metric([], value)
    return [family]


def _value(families: list[Metric]) -> float:
    return families[0].samples[0].value


def test_a_reading_is_served_for_ttl_seconds_from_when_it_began() -> None:
    clock = FakeClock()
    cache = ScrapeCache(ttl_s=5.0, clock=clock)
    readings = iter(range(1, 100))

    def read() -> list[Metric]:
        return _reading(float(next(readings)))

    assert _value(cache.get(read)) == 1
    clock.now += 4.9
    assert _value(cache.get(read)) == 1 and cache.readings == 1
    clock.now += 0.1  # 5 s after the reading began: stale, never served
    assert _value(cache.get(read)) == 2 and cache.readings == 2


def test_ttl_zero_reads_on_every_scrape() -> None:
    cache = ScrapeCache(ttl_s=0.0, clock=FakeClock())
    values = [_value(cache.get(lambda n=n: _reading(float(n)))) for n in range(3)]
    assert values == [0.0, 1.0, 2.0] and cache.readings == 3


def test_concurrent_scrapes_share_one_reading() -> None:
    cache = ScrapeCache(ttl_s=5.0)
    reading_started = threading.Event()
    release = threading.Event()

    def slow_read() -> list[Metric]:
        reading_started.set()
        assert release.wait(10)
        return _reading(7.0)

    results: list[float] = []
    threads = [
        threading.Thread(target=lambda: results.append(_value(cache.get(slow_read)))) for _ in range(8)
    ]
    threads[0].start()
    assert reading_started.wait(10)
    for thread in threads[1:]:
        thread.start()
    time.sleep(0.05)  # the others are now waiting for the reading in flight (not a timing assertion)
    release.set()
    for thread in threads:
        thread.join(10)
    assert results == [7.0] * 8 and cache.readings == 1


def _settings(migrated_url: str, tmp_path: Path, **overrides: object) -> Settings:
    return Settings(database_url=migrated_url, home=tmp_path / "home", **overrides)  # type: ignore[arg-type]


@pytest.fixture
def cached_client(migrated_url: str, tmp_path: Path) -> Iterator[TestClient]:
    with TestClient(create_app(_settings(migrated_url, tmp_path, metrics_cache_ttl_s=30))) as client:
        yield client


def test_the_scrape_reads_the_database_at_most_once_per_ttl(cached_client: TestClient) -> None:
    clock = FakeClock()
    cache: ScrapeCache = cached_client.app.state.scrape_cache  # type: ignore[attr-defined]
    cache.clock = clock
    make_run(cached_client, "before")
    first = cached_client.get("/metrics")
    assert first.status_code == 200 and first.headers["content-type"].startswith("text/plain")
    assert 'run="before"' in first.text
    make_run(cached_client, "after")
    clock.now += 29
    assert 'run="after"' not in cached_client.get("/metrics").text  # the cached reading
    assert cache.readings == 1
    clock.now += 1
    assert 'run="after"' in cached_client.get("/metrics").text
    assert cache.readings == 2


def test_the_metrics_token_guards_the_scrape_when_set(migrated_url: str, tmp_path: Path) -> None:
    token = "scrape-" + "k" * 40
    with TestClient(create_app(_settings(migrated_url, tmp_path, metrics_token=token))) as client:
        missing = client.get("/metrics")
        assert missing.status_code == 401
        assert missing.headers["www-authenticate"] == "Bearer"
        assert "metrics token" in missing.json()["detail"]
        assert client.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert client.get("/metrics", headers={"Authorization": f"Basic {token}"}).status_code == 401
        scraped = client.get("/metrics", headers={"Authorization": f"Bearer {token}"})
        assert scraped.status_code == 200 and "trainops_control_plane_database_up 1.0" in scraped.text
        # the probes stay open: a load balancer has no token
        assert client.get("/healthz").status_code == 200


def test_without_a_metrics_token_the_scrape_is_public(client: TestClient) -> None:
    assert client.get("/metrics").status_code == 200


def test_each_run_exports_the_loss_scale_threshold_its_format_is_judged_by(client: TestClient) -> None:
    """LossScaleCollapse compares a run's scale with this: OPT's fp16 starts at 4 and may sit at 0.5 for
    thousands of healthy steps, so its threshold is its floor; fp16-mixed (65536 at start) keeps 1."""
    make_run(client, "opt-fp16")
    make_run(client, "opt-fp16-floor", hyperparameters={"min_loss_scale": 0.01})
    make_run(client, "opt-mixed", precision="fp16-mixed")
    scrape = client.get("/metrics").text
    assert 'trainops_run_loss_scale_threshold{run="opt-fp16"} 0.0001' in scrape
    assert 'trainops_run_loss_scale_threshold{run="opt-fp16-floor"} 0.01' in scrape
    assert 'trainops_run_loss_scale_threshold{run="opt-mixed"} 1.0' in scrape
