"""bench/metrics_scrape.py --quick runs end to end and reports consistent numbers (never asserts speed)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.postgres
def test_scrape_bench_quick_reads_the_database_once_when_cached() -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import metrics_scrape
    finally:
        sys.path.remove(str(ROOT / "bench"))
    scrapes = 3
    # a TTL longer than the whole bench: every cached scrape after the first is served the same reading
    result = metrics_scrape.main(["--quick", "--scrapes", str(scrapes), "--ttl", "300"])
    assert result["readings"] == {"uncached": scrapes + 2, "cached": 1}
    for label in ("uncached", "cached"):
        timings = result[label]
        assert isinstance(timings, dict) and 0 < timings["p50_ms"] <= timings["p90_ms"]
    assert isinstance(result["ratio_p50"], float) and result["ratio_p50"] > 0
