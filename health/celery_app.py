"""The one Celery app of the health layer, the host agent's tasks, and the embedded (in-process) worker.

Host workers consume ``health.<host>`` and only run checks; they hold no database credentials and
return typed results through the result backend. Control-side tasks (sweeps, the beat-driven quick
sweep) are declared with :func:`health_task` in service/fleet/tasks.py, on this same app, and run on the
shared queue ``health.shared`` in a process that has the control plane's database.
With no broker configured, the same app and tasks run through an in-process ``memory://`` broker and a
worker thread (:class:`EmbeddedWorker`): one code path, no eager shortcut.
"""

from __future__ import annotations

import functools
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from celery import Celery
from celery.concurrency.thread import TaskPool as ThreadTaskPool
from celery.result import _set_task_join_will_block
from celery.worker import state as worker_state
from celery.worker.worker import WorkController

from health.checks import checks_for
from health.checks.context import CheckContext
from health.checks.fabric import CollectiveOutcome, CollectiveSpec, join_and_allreduce
from health.config import SHARED_QUEUE, HealthConfig, host_queue
from health.metrics import CHECK_DURATION, CHECKS_TOTAL, TASK_DURATION
from health.nvml import XidWatcher, open_nvml
from health.results import CheckResult, CheckStatus, Fault, HostReport, Level
from health.runner import run_call_isolated, run_isolated

F = TypeVar("F", bound=Callable[..., Any])

# (function, task options) of every task; each app registers all of them on itself, so a bound task's
# ``self.app`` is the app that runs it (its broker, backend and health config).
_TASKS: list[tuple[Callable[..., Any], dict[str, Any]]] = []
_ROUTES: dict[str, dict[str, str]] = {}
# Every app built so far: a task declared later (the control side's, service/fleet/tasks.py, imported
# after this module built its default app) is registered on them too.
_APPS: weakref.WeakSet[HealthCelery] = weakref.WeakSet()


class HealthCelery(Celery):
    """The Celery app, carrying the health config its tasks read."""

    def __init__(self, config: HealthConfig) -> None:
        embedded = config.broker_url is None
        super().__init__(
            "trainops.health",
            broker=config.broker_url or "memory://",
            backend=config.broker_url or "cache+memory://",
            set_as_current=False,
        )
        self.health_config = config
        # The control plane's database for control-side tasks; None = from the service settings.
        self.session_factory: Any = None
        self.embedded_worker: EmbeddedWorker | None = EmbeddedWorker(self) if embedded else None
        for fn, options in _TASKS:
            self.task(**options)(fn)
        _APPS.add(self)
        self.conf.update(
            task_serializer="json",
            result_serializer="json",
            accept_content=["json"],
            task_default_queue=SHARED_QUEUE,
            task_routes=dict(_ROUTES),
            task_create_missing_queues=True,
            # One check set at a time per host worker; a task that dies with its worker is not
            # re-delivered to run late: the sweep has already reported the host as missing.
            worker_prefetch_multiplier=1,
            task_acks_late=False,
            result_expires=3600,
            result_extended=False,
            broker_connection_retry_on_startup=True,
            worker_hijack_root_logger=False,
            worker_send_task_events=False,
            # kombu's memory transport sleeps this long whenever its queues look empty (default 1 s).
            broker_transport_options={"polling_interval": 0.005} if embedded else {},
            beat_schedule={
                "health-quick-sweep": {
                    "task": "health.quick_sweep",
                    "schedule": config.quick_interval_s,
                    "options": {"queue": SHARED_QUEUE, "expires": config.quick_interval_s},
                }
            },
        )


def make_app(config: HealthConfig | None = None) -> HealthCelery:
    app = HealthCelery(config or HealthConfig.from_env())
    app.finalize()
    return app


def health_task(*, name: str, queue: str, time_limit_s: float | None = None) -> Callable[[F], F]:
    """Register a thin task adapter: fixed name and default queue, time limits, duration/outcome metrics.

    The time limits apply under the prefork pool; host workers run ``--pool=solo`` and rely on the
    per-check limits of :func:`health.runner.run_isolated`, which kill only the overrunning check.
    """

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def measured(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            outcome = "error"
            try:
                result = fn(*args, **kwargs)
                outcome = "ok"
                return result
            finally:
                TASK_DURATION.labels(task=name, outcome=outcome).observe(time.perf_counter() - start)

        options: dict[str, Any] = {"name": name, "bind": True, "shared": False}
        if time_limit_s is not None:
            options.update(soft_time_limit=time_limit_s, time_limit=time_limit_s + 30)
        _TASKS.append((measured, options))
        _ROUTES[name] = {"queue": queue}
        for app in list(_APPS):
            app.task(**options)(measured)
            app.conf.task_routes = {**app.conf.task_routes, name: {"queue": queue}}
        return fn

    return wrap


# --- host side -----------------------------------------------------------------------------------------
_watchers: dict[str, XidWatcher] = {}
_watchers_lock = threading.Lock()


def xid_watcher(config: HealthConfig, host: str) -> XidWatcher:
    with _watchers_lock:
        if host not in _watchers:
            _watchers[host] = XidWatcher(open_nvml(config, host))
        return _watchers[host]


def run_host_checks(
    config: HealthConfig,
    *,
    host: str,
    level: Level,
    checks: list[str] | None,
    expected_gpus: int,
    reference_time: float | None,
    worker: str,
) -> HostReport:
    """What a host worker does for one task: drain XIDs, run the checks isolated, return typed results."""
    names = checks_for(level, checks)
    if config.host is not None and config.host != host:
        result = CheckResult(
            check="health.worker",
            status=CheckStatus.error,
            reason=f"task for host {host} reached the worker of {config.host}; check the queue bindings",
            faults=[Fault.check_error],
        )
        return HostReport(host=host, level=level, results=[result], worker=worker)
    ctx = CheckContext(
        host=host,
        config=config,
        expected_gpus=expected_gpus,
        xids=xid_watcher(config, host).drain(),
        reference_time=reference_time,
    )
    timeout = config.quick_check_timeout_s if level is Level.quick else config.deep_check_timeout_s
    results = run_isolated(names, ctx, timeout_s=timeout)
    for result in results:
        CHECKS_TOTAL.labels(check=result.check, status=result.status.value).inc()
        CHECK_DURATION.labels(check=result.check, status=result.status.value).observe(result.duration_s)
    return HostReport(host=host, level=level, results=results, worker=worker)


@health_task(name="health.run_checks", queue=SHARED_QUEUE)
def run_checks_task(
    self: Any,
    host: str,
    level: str,
    checks: list[str] | None = None,
    expected_gpus: int = 8,
    reference_time: float | None = None,
) -> dict[str, Any]:
    report = run_host_checks(
        self.app.health_config,
        host=host,
        level=Level(level),
        checks=checks,
        expected_gpus=expected_gpus,
        reference_time=reference_time,
        worker=self.request.hostname or f"pid{os.getpid()}",
    )
    return report.to_json()


def run_host_collective(config: HealthConfig, *, host: str, spec: CollectiveSpec) -> CollectiveOutcome:
    """What a host worker does for its rank of a cross-host all-reduce: join and time it in a killable
    child, so a peer that vanishes mid-collective cannot wedge the worker."""
    failed = CollectiveOutcome(
        host=host,
        group=spec.group,
        rank=spec.rank,
        world_size=spec.world_size,
        joined=False,
        backend="unknown",
    )
    if config.host is not None and config.host != host:
        failed.error = f"task for host {host} reached the worker of {config.host}; check the queue bindings"
        return failed
    call = run_call_isolated(
        join_and_allreduce, (host, spec, config), timeout_s=spec.join_timeout_s + config.deep_check_timeout_s
    )
    if isinstance(call.value, CollectiveOutcome):
        return call.value
    failed.error = f"collective process: {call.error}"
    return failed


@health_task(name="health.collective", queue=SHARED_QUEUE)
def collective_task(self: Any, host: str, spec: dict[str, Any]) -> dict[str, Any]:
    return run_host_collective(self.app.health_config, host=host, spec=CollectiveSpec(**spec)).to_json()


@health_task(name="health.identify", queue=SHARED_QUEUE)
def identify_task(self: Any) -> dict[str, Any]:
    """Which worker answers, for which host, with which NVML backend (readiness probe and ops aid)."""
    config: HealthConfig = self.app.health_config
    return {
        "worker": self.request.hostname,
        "host": config.host,
        "pid": os.getpid(),
        "nvml": "fake" if config.fake_nvml_path else "pynvml",
    }


# --- embedded mode -------------------------------------------------------------------------------------
class AppThreadPool(ThreadTaskPool):
    """Celery's thread pool, with the worker's app current in each pool thread.

    Celery resolves the task registry through the thread-local current app; without this, pool threads
    would see the process default app instead of the embedded one.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.executor.shutdown()
        self.executor = ThreadPoolExecutor(max_workers=self.limit, initializer=self.app.set_current)


class EmbeddedWorker:
    """A Celery worker thread in this process, consuming the shared queue and every host queue asked for,
    with a pool thread per queue.

    kombu's memory transport cannot add a queue to a running consumer from another thread safely, so a
    new host set restarts the worker with the union of queues (rare: it happens when hosts register).
    """

    def __init__(self, app: Celery, *, concurrency: int = 4) -> None:
        self._app = app
        self._min_concurrency = concurrency
        self._concurrency = concurrency
        self._queues: set[str] = {SHARED_QUEUE}
        self._controller: WorkController | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def ensure(self, hosts: Iterable[str]) -> None:
        wanted = self._queues | {host_queue(h) for h in hosts}
        # One pool thread per queue: the ranks of a cross-host all-reduce must all run at once, or the
        # group never forms.
        concurrency = max(self._min_concurrency, len(wanted))
        with self._lock:
            if self._controller is not None and wanted == self._queues and concurrency == self._concurrency:
                return
            self._stop_locked()
            self._queues, self._concurrency = wanted, concurrency
            self._start_locked()

    def _start_locked(self) -> None:
        ready = threading.Event()

        class Controller(WorkController):
            def on_consumer_ready(self, consumer: Any) -> None:
                ready.set()

        controller = Controller(
            app=self._app,
            hostname=f"embedded-{os.getpid()}@trainops",
            pool_cls=AppThreadPool,
            concurrency=self._concurrency,
            queues=sorted(self._queues),
            loglevel="WARNING",
            without_heartbeat=True,
            without_mingle=True,
            without_gossip=True,
            ready_callback=None,
        )
        thread = threading.Thread(target=controller.start, name="trainops-health-embedded", daemon=True)
        thread.start()
        if not ready.wait(30):
            raise RuntimeError("embedded health worker did not start within 30 s")
        # Starting a worker marks this thread as "inside a task"; the control side here legitimately
        # waits for results, as Celery's own embedded test worker also allows.
        _set_task_join_will_block(False)
        self._controller, self._thread = controller, thread

    def _stop_locked(self) -> None:
        if self._controller is None or self._thread is None:
            return
        worker_state.should_terminate = 0
        try:
            self._thread.join(30)
        finally:
            worker_state.should_terminate = None
        self._controller, self._thread = None, None

    def stop(self) -> None:
        with self._lock:
            self._stop_locked()


app = make_app()
