"""Orchestrator takeover time: `trainops orchestrator` processes on a PostgreSQL database of their own; the
leader is SIGKILLed again and again (a new standby started each time), and the time from each kill to the
new leader's logbook entry ("... took the lead ...") is the takeover time, against the documented bound of
2 x loop_interval_s + leader_lease_s (docs/orchestrator.md, "Failover").

    .venv/bin/python bench/orchestrator_failover.py --kills 10 --loop-interval 1 --lease 2
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psycopg
import sqlalchemy as sa

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from service import migrate  # noqa: E402
from service.crud.orchestrators import APPLICATION_NAME, LEADER_SESSION_SQL  # noqa: E402
from service.orchestrator.leadership import Holder  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--standbys", type=int, default=1, help="standbys besides the leader")
    parser.add_argument("--loop-interval", type=float, default=1.0)
    parser.add_argument("--lease", type=float, default=2.0)
    parser.add_argument("--admin-dsn", default="postgresql://postgres@127.0.0.1:5432/test")
    args = parser.parse_args()

    name = f"trainops_failover_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(args.admin_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = f"{args.admin_dsn.rsplit('/', 1)[0].replace('postgresql://', 'postgresql+psycopg://')}/{name}"
    home = Path(f"/tmp/{name}")
    env = {
        **os.environ,
        "TRAINOPS_DATABASE_URL": url,
        "TRAINOPS_HOME": str(home),
        "TRAINOPS_ORCHESTRATOR_LOOP_INTERVAL_S": str(args.loop_interval),
        "TRAINOPS_ORCHESTRATOR_LEADER_LEASE_S": str(args.lease),
    }
    processes: dict[int, subprocess.Popen[bytes]] = {}
    engine = sa.create_engine(url)

    def spawn() -> None:
        proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "orchestrator"],
            env=env,
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        processes[proc.pid] = proc

    def connected() -> set[int]:
        """The pids of our orchestrators whose lock sessions are connected."""
        with engine.connect() as conn:
            names = conn.execute(
                sa.text("SELECT application_name FROM pg_stat_activity WHERE application_name LIKE :p"),
                {"p": f"{APPLICATION_NAME} %"},
            ).scalars()
            return {h.pid for h in map(Holder.from_application_name, names) if h} & set(processes)

    def leader() -> Holder | None:
        with engine.connect() as conn:
            row = conn.execute(sa.text(LEADER_SESSION_SQL)).first()
        return Holder.from_application_name(row.application_name) if row else None

    takeovers: list[float] = []
    try:
        migrate.upgrade(url)
        for _ in range(1 + args.standbys):
            spawn()
        for _ in range(args.kills):
            # every process connected and polling (a standby that is still importing is no standby)
            while (
                len(connected()) < 1 + args.standbys
                or (held := leader()) is None
                or held.pid not in processes
            ):
                time.sleep(0.05)
            time.sleep(args.loop_interval + 0.5)
            held = leader()
            assert held is not None
            killed = dt.datetime.now(dt.UTC)
            os.kill(held.pid, signal.SIGKILL)
            processes.pop(held.pid).wait()
            while True:
                with engine.connect() as conn:
                    newest = conn.execute(
                        sa.text("SELECT max(time) FROM logbook WHERE message LIKE '%took the lead%'")
                    ).scalar()
                if newest is not None and newest > killed:
                    break
                time.sleep(0.02)
            takeovers.append((newest - killed).total_seconds())
            spawn()
    finally:
        for proc in processes.values():
            proc.kill()
            proc.wait()
        engine.dispose()
        with psycopg.connect(args.admin_dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    bound = 2 * args.loop_interval + args.lease
    print(
        f"{len(takeovers)} SIGKILLs of the leader ({args.standbys} standby(s), loop_interval_s "
        f"{args.loop_interval:g}, leader_lease_s {args.lease:g}): takeover min {min(takeovers):.3f} s, "
        f"median {statistics.median(takeovers):.3f} s, max {max(takeovers):.3f} s; bound {bound:g} s; "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )


if __name__ == "__main__":
    main()
