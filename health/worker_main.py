"""Start the health worker of one host: ``python -m health.worker_main --host h1``.

It consumes ``health.<host>`` with the solo pool (checks run one set at a time, each check in its own
killable process) and holds no database credentials. The control side's worker (shared queue, sweeps,
beat) is ``python -m service.fleet.worker``; it builds its command line with :func:`worker_argv` too.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from health.config import host_queue

CONTROL_WORKER_MOVED = (
    "the control-side worker is `python -m service.fleet.worker [--beat]` (it needs the control plane)"
)


def worker_argv(*, queues: Sequence[str], name: str, beat: bool, loglevel: str) -> list[str]:
    """``celery worker`` arguments: the solo pool, no gossip or mingle, beat embedded when asked."""
    argv = [
        "worker",
        "--queues",
        ",".join(queues),
        "--hostname",
        name,
        "--pool",
        "solo",
        "--loglevel",
        loglevel,
        "--without-gossip",
        "--without-mingle",
    ]
    if beat:
        argv.append("--beat")
    return argv


def require_broker(broker: str | None) -> None:
    """A worker process needs a broker: ``--broker`` (put in the environment) or TRAINOPS_BROKER_URL."""
    if broker:
        os.environ["TRAINOPS_BROKER_URL"] = broker
    if not os.environ.get("TRAINOPS_BROKER_URL"):
        sys.exit("a worker process needs a broker: TRAINOPS_BROKER_URL or --broker")


def main(args: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", help="this host's name; the worker consumes health.<host>")
    parser.add_argument("--control", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--broker", help="redis://... (default: TRAINOPS_BROKER_URL)")
    parser.add_argument("--loglevel", default="WARNING")
    opts = parser.parse_args(args)
    if opts.control:
        parser.error(CONTROL_WORKER_MOVED)
    if not opts.host:
        parser.error("--host is required for a host worker")
    os.environ["TRAINOPS_HEALTH_HOST"] = opts.host
    require_broker(opts.broker)
    # Imported after the environment is set: the app reads its config once, at the edge.
    from health.celery_app import app

    app.worker_main(
        worker_argv(
            queues=[host_queue(opts.host)], name=f"{opts.host}@trainops", beat=False, loglevel=opts.loglevel
        )
    )


if __name__ == "__main__":
    main()
