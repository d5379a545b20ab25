"""What one orchestrator pass pays for a run's heartbeats at 8, 800 and 8,000 ranks (issue 13, point 2).

The orchestrator reads every rank's newest beat of a run's current attempt from the control plane's
``heartbeats`` table, one query per run per pass (``crud.telemetry.attempt_heartbeats``), and its hang and
straggler detectors look at each beat once. This measures, in one command:

1. a fresh PostgreSQL database (dropped at the end; ``--sqlite`` for the embedded backend), migrated;
2. one running run per size (``--ranks``, default 8, 800, 8000; 8 ranks a host, every host registered),
   each with an attempt in progress and every rank's beat stored through the ingest path
   (``record_heartbeats``, batches of 8 beats: one host's ranks per request) with a 16-step busy history;
3. ``--passes`` rounds; each round times, for every size in turn (so machine noise hits all sizes alike):
   the heartbeat read alone (the query and the conversion to the detectors' beats), and the whole
   ``observe_run`` + ``decide`` of the run (everything a pass does for it but apply);
4. for reference, the path it replaced: the same beats as ``rank{R}.json`` files on this machine's local
   disk, read and parsed (a shared filesystem adds a network round trip per file on top).

It prints the median of each, the cost per rank, and the ratio of each size to the smallest: linear growth
is a ratio near the ratio of ranks (100x, 1000x), flat per-rank cost. The whole pass also reads every node
(fleet-wide, the same for every size), so its per-rank cost falls with size.

    .venv/bin/python bench/heartbeat_observe.py            # 8, 800, 8000 ranks on PostgreSQL (~1 min)
    .venv/bin/python bench/heartbeat_observe.py --sqlite
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import psycopg

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from sqlalchemy.orm import Session, sessionmaker  # noqa: E402

from service import migrate  # noqa: E402
from service.crud.nodes import register_node  # noqa: E402
from service.crud.runs import create_attempt, create_run  # noqa: E402
from service.crud.telemetry import attempt_heartbeats, record_heartbeats  # noqa: E402
from service.db import make_engine, make_session_factory, transaction  # noqa: E402
from service.models import utcnow  # noqa: E402
from service.orchestrator.decide import decide  # noqa: E402
from service.orchestrator.launchers.base import Launcher, LaunchSpec, ProcessStatus  # noqa: E402
from service.orchestrator.observe import observe_run, rank_beat  # noqa: E402
from service.recovery.config import OrchestratorConfig  # noqa: E402
from service.schemas import RunConfig  # noqa: E402

DEFAULT_ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/test"
RANKS_PER_HOST = 8
AUTHOR = "bench:heartbeat_observe"


class RunningAttempts:
    """A launcher whose attempts are all running: the benchmark observes, it never launches or kills."""

    kind = "bench"

    def prepare(self, spec: LaunchSpec) -> dict[str, Any]:
        raise RuntimeError("the heartbeat benchmark launches nothing")

    def start(self, spec: LaunchSpec, info: Mapping[str, Any]) -> dict[str, Any]:
        raise RuntimeError("the heartbeat benchmark launches nothing")

    def status(self, info: Mapping[str, Any]) -> ProcessStatus:
        return ProcessStatus("running")

    def kill(self, info: Mapping[str, Any], *, grace_s: float = 5.0) -> None:
        raise RuntimeError("the heartbeat benchmark kills nothing")


def beat(rank: int, now: float) -> dict[str, Any]:
    """A rank at step 1000, healthy: every rank at the same pace, its beat a second old."""
    return {
        "rank": rank,
        "host": f"gpu-{rank // RANKS_PER_HOST:04d}",
        "pid": 10_000 + rank,
        "step": 1000,
        "time": now - 1.0,
        "section": "step",
        "step_time_s": 13.9,
        "last_step_s": 14.0,
        "busy_s": [[s, 13.9] for s in range(985, 1001)],
    }


def fill(factory: sessionmaker[Session], sizes: list[int], now: float) -> dict[int, int]:
    """One running run per size with an attempt on its hosts and every rank's beat, recorded a second
    before `now`, stored; run id by size. Observing at `now` sees every rank healthy."""
    with transaction(factory) as session:
        for host in range(max(sizes) // RANKS_PER_HOST or 1):
            register_node(session, hostname=f"gpu-{host:04d}", author=AUTHOR)
    runs: dict[int, int] = {}
    for ranks in sizes:
        hosts = [f"gpu-{h:04d}" for h in range(max(1, ranks // RANKS_PER_HOST))]
        config = RunConfig(preset="tiny", target_steps=100_000, host_count=len(hosts))
        with transaction(factory) as session:
            run = create_run(
                session,
                name=f"bench-{ranks}",
                owner="bench",
                config=config.model_dump(mode="json"),
                start=True,
                author=AUTHOR,
            )
            attempt = create_attempt(
                session,
                run=run,
                hosts=hosts,
                restored_from_checkpoint_id=None,
                overrides={},
                launcher={"kind": "bench", "tag": f"bench-{ranks}", "world_size": ranks},
                start_step=0,
                author=AUTHOR,
            )
            attempt.first_step_at = utcnow()  # training: its first step is long done
            runs[ranks] = run.id
        started = time.perf_counter()
        for first in range(0, ranks, RANKS_PER_HOST):  # one request per host, as a host relay would send
            with transaction(factory) as session:
                batch = [beat(r, now) for r in range(first, min(ranks, first + RANKS_PER_HOST))]
                record_heartbeats(session, run_id=runs[ranks], attempt=1, beats=batch)
        took = time.perf_counter() - started
        batches = -(-ranks // RANKS_PER_HOST)
        print(f"stored {ranks} beats in {batches} batches: {took * 1e6 / ranks:.0f} us/beat")
    return runs


def write_beat_files(directory: Path, ranks: int, now: float) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for rank in range(ranks):
        (directory / f"rank{rank}.json").write_text(json.dumps(beat(rank, now)))


def read_beat_files(directory: Path) -> int:
    """What each pass did before: every rank's file read and parsed."""
    return len([json.loads(p.read_text()) for p in sorted(directory.glob("rank*.json"))])


def timed(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 800, 8000])
    parser.add_argument("--passes", type=int, default=15)
    parser.add_argument("--sqlite", action="store_true", help="the embedded backend instead of PostgreSQL")
    parser.add_argument("--admin-dsn", default=DEFAULT_ADMIN_DSN)
    args = parser.parse_args(argv)
    sizes = sorted(args.ranks)

    work = Path(tempfile.mkdtemp(prefix="trainops-heartbeat-bench-"))
    name = f"trainops_heartbeat_bench_{uuid.uuid4().hex[:8]}"
    if args.sqlite:
        url = f"sqlite:///{work / 'trainops.db'}"
    else:
        with psycopg.connect(args.admin_dsn, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        url = (
            args.admin_dsn.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1) + f"/{name}"
        )
    cfg = OrchestratorConfig(runs_dir=str(work / "runs"))
    launchers: dict[str, Launcher] = {"bench": RunningAttempts()}
    times: dict[str, dict[int, list[float]]] = {"read": {}, "pass": {}, "files": {}}
    try:
        migrate.upgrade(url)
        engine = make_engine(url)
        factory = make_session_factory(engine)
        now = time.time()
        runs = fill(factory, sizes, now)
        for ranks in sizes:
            write_beat_files(work / "files" / str(ranks), ranks, now)

        def read_beats(ranks: int) -> None:
            with transaction(factory) as session:
                beats = [rank_beat(b) for b in attempt_heartbeats(session, run_id=runs[ranks], attempt=1)]
            assert len(beats) == ranks

        def one_pass(ranks: int) -> None:
            with transaction(factory) as session:
                observed = observe_run(
                    session,
                    run_id=runs[ranks],
                    runs_dir=Path(cfg.runs_dir),
                    cfg=cfg,
                    launchers=launchers,
                    waiting_for_hosts_since=None,
                    now=now,  # the pass as it would run a second after the beats were recorded
                )
            assert observed.attempt is not None and len(observed.attempt.beats) == ranks
            assert decide(observed, cfg) == []  # healthy ranks: no action

        for ranks in sizes:  # warm: connections, query plans, the page cache
            read_beats(ranks)
            one_pass(ranks)
        for _ in range(args.passes):
            for ranks in sizes:
                times["read"].setdefault(ranks, []).append(timed(lambda r=ranks: read_beats(r)))
                times["pass"].setdefault(ranks, []).append(timed(lambda r=ranks: one_pass(r)))
                directory = work / "files" / str(ranks)
                times["files"].setdefault(ranks, []).append(timed(lambda d=directory: read_beat_files(d)))
        engine.dispose()
    finally:
        if not args.sqlite:
            with psycopg.connect(args.admin_dsn, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    labels = {
        "read": "heartbeat read (1 query + conversion)",
        "pass": "whole observe_run + decide",
        "files": "replaced: rank{R}.json files, local disk",
    }
    result: dict[str, Any] = {"backend": "sqlite" if args.sqlite else "postgresql", "passes": args.passes}
    smallest = sizes[0]
    for kind, by_size in times.items():
        medians = {ranks: statistics.median(took) for ranks, took in by_size.items()}
        result[kind] = {
            str(ranks): {
                "p50_ms": round(medians[ranks] * 1000, 3),
                "us_per_rank": round(medians[ranks] * 1e6 / ranks, 2),
                "ratio_to_smallest": round(medians[ranks] / medians[smallest], 1),
            }
            for ranks in sizes
        }
        print(f"{labels[kind]}:")
        for ranks in sizes:
            row = result[kind][str(ranks)]
            print(
                f"  {ranks:>6} ranks: p50 {row['p50_ms']:9.3f} ms  {row['us_per_rank']:8.2f} us/rank  "
                f"x{row['ratio_to_smallest']} of {smallest} ranks"
            )
    print("RESULT " + json.dumps(result))
    return result


if __name__ == "__main__":
    main()
