"""Start the control side's health worker: ``python -m service.fleet.worker [--beat]``, once per fleet.

It consumes the shared queue ``health.shared`` (sweeps on demand; with ``--beat``, Celery beat embedded
schedules the quick sweep of every registered host) and needs the control plane's database
(``TRAINOPS_DATABASE_URL``). Host workers are ``python -m health.worker_main --host <name>``.
"""

from __future__ import annotations

import argparse

from health.config import SHARED_QUEUE
from health.worker_main import require_broker, worker_argv

CONTROL_WORKER_NAME = "control@trainops"


def main(args: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--beat", action="store_true", help="embed Celery beat: schedule the quick sweeps")
    parser.add_argument("--control", action="store_true", help="accepted for the old command line; implied")
    parser.add_argument("--broker", help="redis://... (default: TRAINOPS_BROKER_URL)")
    parser.add_argument("--loglevel", default="WARNING")
    opts = parser.parse_args(args)
    require_broker(opts.broker)
    # Imported after the environment is set: the app reads its config once, at the edge; importing the
    # tasks registers the control side's tasks on it.
    from health.celery_app import app
    from service.fleet import tasks  # noqa: F401

    app.worker_main(
        worker_argv(queues=[SHARED_QUEUE], name=CONTROL_WORKER_NAME, beat=opts.beat, loglevel=opts.loglevel)
    )


if __name__ == "__main__":
    main()
