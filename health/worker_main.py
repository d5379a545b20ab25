"""Start the health worker of one host: ``python -m health.worker_main --host h1``.

It consumes ``health.<host>`` with the solo pool (checks run one set at a time, each check in its own
killable process) and holds no database credentials. ``--control`` starts the control-side worker
instead (shared queue; needs ``TRAINOPS_DATABASE_URL``), and ``--beat`` embeds Celery beat in it.
"""

from __future__ import annotations

import argparse
import os
import sys

from health.config import SHARED_QUEUE, host_queue


def worker_argv(*, host: str | None, control: bool, beat: bool, loglevel: str) -> list[str]:
    if control:
        queues, name = [SHARED_QUEUE], "control@trainops"
    else:
        assert host is not None
        queues, name = [host_queue(host)], f"{host}@trainops"
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


def main(args: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", help="this host's name; the worker consumes health.<host>")
    parser.add_argument("--control", action="store_true", help="run the control-side worker (shared queue)")
    parser.add_argument("--beat", action="store_true", help="with --control: schedule the quick sweeps")
    parser.add_argument("--broker", help="redis://... (default: TRAINOPS_BROKER_URL)")
    parser.add_argument("--loglevel", default="WARNING")
    opts = parser.parse_args(args)
    if not opts.control and not opts.host:
        parser.error("--host is required for a host worker")
    if opts.broker:
        os.environ["TRAINOPS_BROKER_URL"] = opts.broker
    if not opts.control:
        os.environ["TRAINOPS_HEALTH_HOST"] = opts.host
    if not os.environ.get("TRAINOPS_BROKER_URL"):
        sys.exit("a worker process needs a broker: TRAINOPS_BROKER_URL or --broker")
    # Imported after the environment is set: the app reads its config once, at the edge.
    from health.celery_app import app

    app.worker_main(worker_argv(host=opts.host, control=opts.control, beat=opts.beat, loglevel=opts.loglevel))


if __name__ == "__main__":
    main()
