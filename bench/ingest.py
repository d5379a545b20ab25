"""Ingest benchmark: metric batches over HTTP into PostgreSQL, against a single-row INSERT loop.

What it does, in one command:

1. creates a fresh PostgreSQL database (dropped at the end) and runs the migrations;
2. starts a real uvicorn server (``service.main.create_app`` with ``TRAINOPS_DATABASE_URL`` set, i.e.
   ``create_app(Settings(database_url=...))``) in a subprocess on a free loopback port;
3. creates a run and a per-run trainer token through the API;
4. posts 1,000-point batches to ``POST /api/v1/runs/{id}/metrics`` from 2 client threads (a run's
   reporter is its rank 0: clients stand for concurrent runs), disjoint step ranges, and measures
   points/s and the latency of each batch; repeats this 3 times and reports the median repetition;
5. re-sends a batch and checks it adds nothing; counts the rows in the database;
6. runs the baseline in the same database: a plain single-row INSERT loop (one INSERT + one commit per
   row, psycopg, same table and row shape), and prints the ratio.

A *point* is one step's wide row, i.e. one ``MetricPoint``: step, time, tokens, the nine float fields
(loss, grad_norm, loss_scale, act_norm, lr, clip, tokens_per_s, tflops_per_gpu, step_time_s) and a
``values`` dict with two extra named values. One point is one row of ``metrics``; it carries
``VALUES_PER_POINT`` = 12 scalar values (tokens, the nine floats, two extra values; step and time are
keys, not counted), and the bench prints values/s too: MLflow's figures (mlflow#3010, 1,000 metrics
per request) count one value per point. The baseline inserts the same rows.

    .venv/bin/python bench/ingest.py            # full run (~1 min)
    .venv/bin/python bench/ingest.py --quick    # small sizes, seconds (tests/service/test_bench_ingest.py)

Numbers are only comparable inside one run: the machine is shared and noisy, hence the ratio.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import psycopg

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from service import migrate  # noqa: E402
from service.config import DEFAULT_BOOTSTRAP_TOKEN  # noqa: E402

DEFAULT_ADMIN_DSN = os.environ.get("TRAINOPS_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")
ADMIN_HEADERS = {"Authorization": f"Bearer {DEFAULT_BOOTSTRAP_TOKEN}"}
VALUES_PER_POINT = 12
WARMUP_ATTEMPT = 1
BASELINE_ATTEMPT = 2
FIRST_HTTP_ATTEMPT = 3  # repetition k posts to attempt FIRST_HTTP_ATTEMPT + k
T0 = 1_700_000_000.0


def make_point(step: int, rng: random.Random) -> dict:
    """One step's wide row, as the trainer's reporter sends it (MetricPoint)."""
    return {
        "step": step,
        "time": T0 + step * 0.9,
        "tokens": step * 2_097_152,
        "loss": 2.0 + rng.random(),
        "grad_norm": 0.2 + rng.random(),
        "loss_scale": 65536.0,
        "act_norm": 40.0 + rng.random(),
        "lr": 1.2e-4,
        "clip": 1.0,
        "tokens_per_s": 2.3e6 + rng.random() * 1e4,
        "tflops_per_gpu": 147.0 + rng.random(),
        "step_time_s": 0.9 + rng.random() * 0.01,
        "values": {"mfu": 0.47 + rng.random() * 0.01, "skipped_batches": 0},
    }


def make_body(attempt: int, start: int, n: int, rng: random.Random) -> bytes:
    """The request body exactly as the trainer's reporter sends it (httpx's ``json=`` encoding)."""
    body = {"attempt": attempt, "points": [make_point(s, rng) for s in range(start, start + n)]}
    return httpx.Request("POST", "http://reporter", json=body).content


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pg_url(admin_dsn: str, dbname: str) -> str:
    base = admin_dsn.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    return f"{base}/{dbname}"


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


@dataclass
class Repetition:
    seconds: float
    points_per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float


@dataclass
class Result:
    """The median repetition (by points/s) of the HTTP phase, the re-send check, and the baseline."""

    point_definition: str
    values_per_point: int
    batch_size: int
    batches: int
    clients: int
    workers: int
    repetitions: list[Repetition]
    points_sent: int  # per repetition
    seconds: float
    points_per_s: float
    values_per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    resend_accepted: int
    resend_duplicates: int
    rows_in_db: int
    distinct_keys_in_db: int
    baseline_rows: int
    baseline_seconds: float
    baseline_rows_per_s: float
    ratio: float


class Server:
    def __init__(self, database_url: str, workers: int, env: dict[str, str] | None = None) -> None:
        """`env`: more of the API's environment (bench/fleet_sim.py: the runs directory, the Prometheus
        multiprocess directory)."""
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, **(env or {}), "TRAINOPS_DATABASE_URL": database_url, "TRAINOPS_MODE": "dev"}
        env.pop("TRAINOPS_BOOTSTRAP_ADMIN_TOKEN", None)
        cmd = [
            sys.executable, "-m", "uvicorn", "service.main:create_app", "--factory",
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", str(workers),
            "--no-access-log", "--log-level", "warning",
        ]  # fmt: skip
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env)

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"uvicorn exited with {self.proc.returncode}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError("uvicorn did not become ready")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def post_batches(url: str, headers: dict, bodies: list[bytes], clients: int) -> tuple[float, list[float]]:
    """Posts the bodies from ``clients`` threads (body i to client i % clients): wall s, latencies."""
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    start_gate = threading.Barrier(clients + 1)
    hdrs = {**headers, "Content-Type": "application/json"}

    def worker(mine: list[bytes]) -> None:
        local: list[float] = []
        with httpx.Client(timeout=60.0) as http:
            start_gate.wait()
            for body in mine:
                t = time.perf_counter()
                r = http.post(url, content=body, headers=hdrs)
                local.append(time.perf_counter() - t)
                if r.status_code != 200:
                    errors.append(f"{r.status_code} {r.text[:200]}")
                    return
        with lock:
            latencies.extend(local)

    threads = [threading.Thread(target=worker, args=(bodies[i::clients],)) for i in range(clients)]
    for t in threads:
        t.start()
    start_gate.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"ingest failed: {errors[0]}")
    return wall, latencies


def baseline_insert_loop(dsn: str, run_id: int, rows: int, rng: random.Random) -> float:
    """A plain single-row INSERT loop: one INSERT and one commit per row (psycopg, autocommit)."""
    sql = (
        "INSERT INTO metrics (run_id, attempt, step, time, tokens, loss, grad_norm, loss_scale, act_norm, "
        'lr, clip, tokens_per_s, tflops_per_gpu, step_time_s, "values") '
        "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
    )
    points = [make_point(s, rng) for s in range(rows)]
    with psycopg.connect(dsn, autocommit=True) as conn:
        t0 = time.perf_counter()
        for p in points:
            conn.execute(
                sql,
                (
                    run_id, BASELINE_ATTEMPT, p["step"], dt.datetime.fromtimestamp(p["time"], dt.UTC),
                    p["tokens"], p["loss"], p["grad_norm"], p["loss_scale"], p["act_norm"], p["lr"],
                    p["clip"], p["tokens_per_s"], p["tflops_per_gpu"], p["step_time_s"],
                    json.dumps(p["values"]),
                ),
            )  # fmt: skip
        return time.perf_counter() - t0


def run(args: argparse.Namespace) -> Result:
    rng = random.Random(1234)
    dbname = f"trainops_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(args.admin_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{dbname}"')
    db_dsn = f"{args.admin_dsn.rsplit('/', 1)[0]}/{dbname}"
    server: Server | None = None
    try:
        migrate.upgrade(_pg_url(args.admin_dsn, dbname))
        server = Server(_pg_url(args.admin_dsn, dbname), args.workers)
        server.wait_ready()
        with httpx.Client(base_url=server.url, headers=ADMIN_HEADERS, timeout=30.0) as api:
            r = api.post(
                "/api/v1/runs",
                json={"name": "bench-ingest", "owner": "bench", "config": {"target_steps": 10_000_000}},
            )
            r.raise_for_status()
            run_id = r.json()["id"]
            r = api.post(
                "/api/v1/tokens", json={"name": "bench-trainer", "role": "trainer", "run_id": run_id}
            )
            r.raise_for_status()
            trainer = {"Authorization": f"Bearer {r.json()['token']}"}
        url = f"{server.url}/api/v1/runs/{run_id}/metrics"
        n = args.batch_size

        # warm-up (imports, pools, plans) on an attempt of its own, not measured
        warm = [make_body(WARMUP_ATTEMPT, i * n, n, rng) for i in range(max(args.clients * 2, 4))]
        post_batches(url, trainer, warm, args.clients)

        reps: list[Repetition] = []
        for k in range(args.repeat):
            attempt = FIRST_HTTP_ATTEMPT + k
            bodies = [make_body(attempt, i * n, n, rng) for i in range(args.batches)]
            wall, lat = post_batches(url, trainer, bodies, args.clients)
            reps.append(
                Repetition(
                    seconds=wall,
                    points_per_s=n * args.batches / wall,
                    p50_ms=_pct(lat, 0.50) * 1000,
                    p90_ms=_pct(lat, 0.90) * 1000,
                    p99_ms=_pct(lat, 0.99) * 1000,
                    max_ms=max(lat) * 1000,
                )
            )
        median = sorted(reps, key=lambda r: r.points_per_s)[len(reps) // 2]
        points_sent = n * args.batches

        with httpx.Client(timeout=30.0) as http:
            r = http.post(url, content=bodies[0], headers={**trainer, "Content-Type": "application/json"})
            r.raise_for_status()
            resend = r.json()
        with psycopg.connect(db_dsn) as conn:
            rows, distinct = conn.execute(
                "SELECT count(*), count(DISTINCT (attempt, step)) FROM metrics "
                "WHERE run_id = %s AND attempt >= %s",
                (run_id, FIRST_HTTP_ATTEMPT),
            ).fetchone()

        baseline_s = baseline_insert_loop(db_dsn, run_id, args.baseline_rows, rng)
        baseline_rate = args.baseline_rows / baseline_s
        rate = median.points_per_s
        return Result(
            point_definition="one MetricPoint = one step's wide row (step, time, tokens, 9 floats, "
            f"values{{2}}) = one row of metrics = {VALUES_PER_POINT} scalar values",
            values_per_point=VALUES_PER_POINT,
            batch_size=n,
            batches=args.batches,
            clients=args.clients,
            workers=args.workers,
            repetitions=reps,
            points_sent=points_sent,
            seconds=median.seconds,
            points_per_s=rate,
            values_per_s=rate * VALUES_PER_POINT,
            p50_ms=median.p50_ms,
            p90_ms=median.p90_ms,
            p99_ms=median.p99_ms,
            max_ms=median.max_ms,
            resend_accepted=resend["accepted"],
            resend_duplicates=resend["duplicates"],
            rows_in_db=int(rows),
            distinct_keys_in_db=int(distinct),
            baseline_rows=args.baseline_rows,
            baseline_seconds=baseline_s,
            baseline_rows_per_s=baseline_rate,
            ratio=rate / baseline_rate,
        )
    finally:
        if server is not None:
            server.stop()
        if not args.keep_db:
            with psycopg.connect(args.admin_dsn, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')


def report(res: Result) -> None:
    print(f"point = {res.point_definition}")
    print(
        f"HTTP ingest: {len(res.repetitions)} x {res.points_sent} points in {res.batches} batches of "
        f"{res.batch_size}, {res.clients} client threads, {res.workers} uvicorn workers"
    )
    for k, rep in enumerate(res.repetitions, 1):
        print(
            f"  repetition {k}: {rep.points_per_s:9,.0f} points/s   p50 {rep.p50_ms:.1f} ms   "
            f"p90 {rep.p90_ms:.1f} ms   p99 {rep.p99_ms:.1f} ms   max {rep.max_ms:.1f} ms"
        )
    print(f"median repetition ({res.seconds:.2f} s):")
    print(f"  points/s        {res.points_per_s:12,.0f}")
    print(f"  values/s        {res.values_per_s:12,.0f}   ({res.values_per_point} scalar values per point)")
    print(
        f"  batch latency   p50 {res.p50_ms:.1f} ms   p90 {res.p90_ms:.1f} ms   p99 {res.p99_ms:.1f} ms"
        f"   max {res.max_ms:.1f} ms"
    )
    print(f"  re-send         accepted {res.resend_accepted}, duplicates {res.resend_duplicates}")
    print(f"  rows in DB      {res.rows_in_db} ({res.distinct_keys_in_db} distinct attempt/step keys)")
    print(
        f"baseline: single-row INSERT + commit loop, {res.baseline_rows} rows in {res.baseline_seconds:.2f} s"
        f" = {res.baseline_rows_per_s:,.0f} points/s"
    )
    print(f"ratio: {res.ratio:.1f}x the single-row INSERT loop")
    print("RESULT " + json.dumps(asdict(res)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes (seconds), for the test")
    p.add_argument("--batches", type=int, default=None, help="batches to post (default 600; quick 20)")
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument(
        "--repeat",
        type=int,
        default=None,
        help="repetitions of the HTTP phase; the median is reported (default 3; quick 1)",
    )
    p.add_argument(
        "--clients", type=int, default=2, help="client threads (reporters: rank 0 of concurrent runs)"
    )
    p.add_argument("--workers", type=int, default=2, help="uvicorn worker processes")
    p.add_argument(
        "--baseline-rows", type=int, default=None, help="rows of the baseline (default 3000; quick 200)"
    )
    p.add_argument(
        "--admin-dsn", default=DEFAULT_ADMIN_DSN, help="PostgreSQL DSN to create the database from"
    )
    p.add_argument("--keep-db", action="store_true", help="keep the bench database (debugging)")
    args = p.parse_args(argv)
    if args.batches is None:
        args.batches = 20 if args.quick else 600
    if args.repeat is None:
        args.repeat = 1 if args.quick else 3
    if args.baseline_rows is None:
        args.baseline_rows = 200 if args.quick else 3000
    if args.quick:
        args.clients = min(args.clients, 2)
    report(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
