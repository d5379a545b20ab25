"""bench/ingest.py --quick runs end to end and reports consistent numbers (never asserts speed)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.postgres
def test_ingest_bench_quick_reports_consistent_numbers() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "ingest.py"), "--quick", "--repeat", "2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout
    for label in ("points/s", "values/s", "p50", "p99", "baseline", "ratio", "point = "):
        assert label in out
    [line] = [x for x in out.splitlines() if x.startswith("RESULT ")]
    res = json.loads(line.removeprefix("RESULT "))

    assert res["points_sent"] == res["batches"] * res["batch_size"] > 0
    # every point sent (in every repetition) is one row, once; the re-sent batch adds nothing
    reps = res["repetitions"]
    assert len(reps) >= 1
    assert res["rows_in_db"] == res["points_sent"] * len(reps)
    assert res["distinct_keys_in_db"] == res["rows_in_db"]
    # the figures printed are those of the median repetition
    assert sorted(r["points_per_s"] for r in reps)[len(reps) // 2] == res["points_per_s"]
    assert res["resend_accepted"] == 0 and res["resend_duplicates"] == res["batch_size"]
    # the printed figures agree with each other
    assert math.isclose(res["points_per_s"], res["points_sent"] / res["seconds"], rel_tol=1e-9)
    assert math.isclose(res["values_per_s"], res["points_per_s"] * res["values_per_point"], rel_tol=1e-9)
    assert math.isclose(
        res["baseline_rows_per_s"], res["baseline_rows"] / res["baseline_seconds"], rel_tol=1e-9
    )
    assert math.isclose(res["ratio"], res["points_per_s"] / res["baseline_rows_per_s"], rel_tol=1e-9)
    assert 0 < res["p50_ms"] <= res["p99_ms"] <= res["max_ms"]
