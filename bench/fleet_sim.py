"""Fleet simulator: the real control plane and the real orchestrator against simulated ranks, at fleet scale.

    PYTHONPATH=. .venv/bin/python bench/fleet_sim.py     # 1,024 hosts x 8 ranks, then 1/10/100 runs
    PYTHONPATH=. .venv/bin/python bench/fleet_sim.py --fleet-hosts 256 --runs 1 10 --json out.json
    PYTHONPATH=. .venv/bin/python bench/fleet_sim.py --from-costs out.json   # the week and table only

What is real: PostgreSQL (a database of its own, dropped at the end), the API served by uvicorn with several
worker processes on a free port, and `trainops orchestrator` as its own process, which launches every attempt
through the launcher `sim` (`SimLauncher` below, loaded by TRAINOPS_EXTRA_LAUNCHERS). What is simulated: the
ranks (`bench/sim_ranks.py`: asyncio, no torch), which follow docs/reporting-contract.md exactly (metric
batches, per-host heartbeat batches, checkpoint files on disk and their registration, exit codes), and two
outside actors: a host agent that reports a broken GPU or host to the health policy as a quick sweep would
(`service.fleet.sweep.ingest_host` with a hard fault, after the next quick sweep's delay), and a scheduler
that drains a host for unplanned maintenance (the API's cordon, as the scheduler sync records an outside
drain).

**Time.** Two parts, because a week cannot be replayed on 2 cores and the orchestrator's own costs must not be
compressed:
1. *Live phases* run the real processes on the wall clock, with every duration of the simulated trainer (step,
   save stall, validation, start-up, teardown, the host agent's delay) multiplied by `--time-scale`, and the
   run's fixed hang limits likewise (`RunConfig.hang`; the step limit calibrates itself on the run's measured
   step times). The orchestrator's loop interval, back-off and processing are not scaled: they are measured.
   Each detection splits into the evidence wait (fault -> the evidence complete: the process exit, the last
   beat plus the hang limit, the decisive metric point), a property of the trainer and the limits, converted
   back to fleet time (/ time scale), and the orchestrator's reaction (evidence -> failure recorded), taken as
   measured.
2. *The week* is a discrete-event timeline (`week_timeline`): failures drawn from the Llama 3 mix at its rate
   for this many GPUs, 2 divergences, checkpoints every `--checkpoint-min`, and per failure class the
   detection, decision and wasted-relaunch costs measured in part 1, plus the deep check before relaunching
   after a hardware failure, which the live phases turn off (`--deep-check-s`, default its 120 s deadline:
   an upper bound); start-up at scale (process launch, NCCL init, checkpoint load) is not measurable here and
   is shown for 60, 120 and 300 s. The same costs, weighted by the Llama 3 mix, give docs/goodput.md's table
   of expected ETTR per checkpoint interval (`fleet_table`). `--from-costs` prints both from a report's or a
   recorded file's per-class costs (bench/recorded/) without the live phases.

Reported: false actions (hang, divergence, straggler, cordon of a host nobody broke; goal 0), detection
latency per failure class, the reconcile pass time and the orchestrator's CPU per pass at 1, 10 and 100
concurrent runs (read from the orchestrator's own `trainops_orchestrator_loop_duration_seconds` and /proc),
API ingest and heartbeat load (requests/s, client-side p50/p99, and the API's own request histogram), and
ETTR.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.chaos import ettr as expected_ettr  # noqa: E402
from bench.ingest import DEFAULT_ADMIN_DSN, Server, _pg_url  # noqa: E402
from bench.sim_ranks import (  # noqa: E402
    EVENTS_FILE,
    EXIT_FILE,
    PARAMS_ENV,
    PROCS_PER_HOST_ENV,
    STATS_FILE,
    SimParams,
)
from service.orchestrator.launchers.base import ATTEMPT_TAG_ENV, LaunchSpec, ProcessStatus  # noqa: E402
from service.orchestrator.launchers.local import _pid_alive, _reap, _signal  # noqa: E402
from service.recovery.config import RemediationConfig  # noqa: E402
from trainer import contract  # noqa: E402

ADMIN = {
    "Authorization": "Bearer trainops-dev-admin-token"
}  # service.config.DEFAULT_BOOTSTRAP_TOKEN, dev mode
GPUS_PER_HOST = 8
DATA = ROOT / "tests" / "data"
HEALTHY_CURVE = DATA / "healthy_tiny_seed7.json"
DIVERGED_CURVE = DATA / "diverged_tiny_seed7_at60.json"
DIVERGED_ONSET = 60  # the fault step of the diverged recording (tests/data/record_curves.py)
SIM_LAUNCHER = "bench.fleet_sim:SimLauncher"

# Llama 3 (Dubey et al., 2024, Table 5): 419 unexpected interruptions in 54 days on 16,384 GPUs; 58.7%
# GPU/HBM, 17% host and other hardware, the rest software (12.9% software bugs), network (8.4% switches and
# cables), and unplanned maintenance (the remainder).
LLAMA3_INTERRUPTIONS = 419
LLAMA3_DAYS = 54
LLAMA3_GPUS = 16_384
FAILURE_MIX: dict[str, float] = {
    "gpu": 0.587,
    "host": 0.17,
    "crash": 0.129,
    "hang": 0.084,
    "maintenance": 0.03,
}
FAILURE_WORDS = {
    "gpu": "GPU/HBM fault (rank dies; host agent finds a double-bit ECC error)",
    "host": "host/other hardware (the host's ranks die; its GPUs are lost)",
    "crash": "software crash (a rank exits 1)",
    "hang": "network (ranks stuck in a collective)",
    "maintenance": "unplanned maintenance (scheduler drains the host, kills the job)",
    "diverge": "loss divergence (recorded curve)",
}
EXPECTED_OUTCOME = {"crash": {"crash"}, "hang": {"hang"}, "diverge": {"divergence"}}
HARDWARE_KINDS = ("gpu", "host", "maintenance")
# Before relaunching after a failure it classifies as hardware (these three: a GPU or host fault once the host
# agent's report cordoned the host, the scheduler's drain), the orchestrator runs deep diagnostics on the next
# attempt's hosts and the launch waits for them (`deep_check_before_relaunch`, on by default). The live phases
# turn them off (the simulated hosts have no health workers), and no bench here measures a deep sweep
# (bench/fleet_sweep.py times quick sweeps only), so the week charges their deadline: an upper bound (DCGM's
# level 2, the analogue, takes about 2 minutes a node).
DEEP_CHECK_KINDS = HARDWARE_KINDS
DEEP_CHECK_S = RemediationConfig().deep_check_deadline_s


# ---- the launcher the orchestrator loads ---------------------------------------------------------------


class SimLauncher:
    """Launcher kind `sim`: one `bench.sim_ranks` process per attempt, with the trainer's flags and
    environment.

    It follows the local launcher's ways (the attempt's tag in the environment, its own session so it outlives
    an orchestrator restart, the exit status in `exit.json` of the attempt directory), without torchrun."""

    kind = "sim"

    def __init__(self) -> None:
        self._children: dict[int, subprocess.Popen[bytes]] = {}

    def prepare(self, spec: LaunchSpec) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "tag": uuid.uuid4().hex,
            "attempt_dir": str(contract.attempt_dir(spec.run_dir, spec.attempt)),
            "world_size": len(spec.hosts) * spec.procs_per_host,
        }

    def start(self, spec: LaunchSpec, info: Mapping[str, Any]) -> dict[str, Any]:
        attempt_dir = Path(info["attempt_dir"])
        attempt_dir.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            **spec.env,
            ATTEMPT_TAG_ENV: info["tag"],
            "TRAINOPS_RUN_ID": str(spec.run_id),
            "TRAINOPS_ATTEMPT": str(spec.attempt),
            "TRAINOPS_HOSTS": ",".join(spec.hosts),
            PROCS_PER_HOST_ENV: str(spec.procs_per_host),
            PARAMS_ENV: json.dumps(dict(spec.launcher_options)),
            "PYTHONPATH": str(ROOT),
        }
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)  # the ranks are not the control plane's processes
        command = [sys.executable, "-m", "bench.sim_ranks", str(attempt_dir), "--", *spec.trainer_args]
        (attempt_dir / "command.json").write_text(json.dumps({"command": command, "hosts": list(spec.hosts)}))
        with open(attempt_dir / "output.log", "ab") as log:
            proc = subprocess.Popen(
                command,
                env=env,
                cwd=ROOT,
                start_new_session=True,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        self._children[proc.pid] = proc
        return {**info, "pid": proc.pid, "started": time.time()}

    def status(self, info: Mapping[str, Any]) -> ProcessStatus:
        exit_file = Path(info["attempt_dir"]) / EXIT_FILE
        pid = int(info.get("pid") or 0)
        if pid:
            self._wait(pid)
        if exit_file.exists():
            try:
                return ProcessStatus("exited", int(json.loads(exit_file.read_text())["exit_code"]))
            except (OSError, ValueError, KeyError):
                pass  # being written: running still
        if pid and _pid_alive(pid):
            return ProcessStatus("running")
        if exit_file.exists():
            return self.status(info)
        return ProcessStatus("lost", detail="the simulated attempt is gone and left no exit status")

    def kill(self, info: Mapping[str, Any], *, grace_s: float = 5.0) -> None:
        pid = int(info.get("pid") or 0)
        if not pid or not _pid_alive(pid):
            return
        _signal(pid, signal.SIGTERM)  # the ranks write exit.json (143) and flush their reporter
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and _pid_alive(pid):
            self._wait(pid)
            time.sleep(0.05)
        if _pid_alive(pid):
            _signal(pid, signal.SIGKILL)
        self._wait(pid)

    def _wait(self, pid: int) -> None:
        proc = self._children.get(pid)
        if proc is None:
            _reap(pid)
        elif proc.poll() is not None:
            del self._children[pid]


# ---- what a phase is ----------------------------------------------------------------------------------


@dataclass
class Fault:
    id: str
    kind: str
    run: str
    at: float
    attempt: int
    host: str | None = None
    rank: int | None = None
    at_step: int | None = None
    below: float | None = None
    health_report_at: float | None = None


@dataclass
class PhaseSpec:
    name: str
    runs: int
    hosts_per_run: int
    spares: int
    duration_s: float
    faults: list[str]  # per phase, kinds in order (fleet) or one per run (scaling)
    sequential: (
        bool  # fleet: one fault after the previous one recovered; scaling: one per run at random times
    )
    progress_steps: int = 6


@dataclass
class Options:
    time_scale: float
    step_s: float
    checkpoint_min: float
    api_workers: int
    loop_interval_s: float
    startup_s: float
    seed: int
    workdir: Path
    ranks_per_host: int = GPUS_PER_HOST
    beats_per_request: int = 0
    keep_db: bool = False
    quiet: bool = False


def sim_params(opts: Options, workdir: Path, seed: int) -> SimParams:
    return SimParams(
        faults_file=str(workdir / "faults.jsonl"),
        broken_hosts_file=str(workdir / "broken_hosts.json"),
        healthy_curve=str(HEALTHY_CURVE),
        diverged_curve=str(DIVERGED_CURVE),
        diverged_onset=DIVERGED_ONSET,
        time_scale=opts.time_scale,
        step_s=opts.step_s,
        startup_s=opts.startup_s,
        beats_per_request=opts.beats_per_request,
        seed=seed,
    )


def checkpoint_steps(opts: Options) -> int:
    return max(1, round(opts.checkpoint_min * 60 / opts.step_s))


def run_config(opts: Options, params: SimParams, hosts: int, target_steps: int) -> dict[str, Any]:
    """A run's config: RunConfig's fields with the simulator's launcher and its `sim` section. The hang limits
    the orchestrator would apply at fleet scale are scaled like the trainer's durations (the API's bounds keep
    each at >= 5 s); the step limit's multiple of the measured p99 step time scales by itself."""
    k = opts.time_scale
    return {
        "preset": "175B",
        "target_steps": target_steps,
        "checkpoint_interval": checkpoint_steps(opts),
        "launcher": SimLauncher.kind,
        "host_count": hosts,
        "procs_per_host": opts.ranks_per_host,
        "precision": "bf16",
        "max_restarts": 1000,
        "hang": {
            "step_floor_s": max(5.0, 12.0 * k),
            "startup_s": max(5.0, 180.0 * k, 2 * params.startup_s * k),
            "checkpoint_save_s": max(5.0, 600.0 * k),
            "validation_s": max(5.0, 600.0 * k),
        },
        SimLauncher.kind: asdict(params),
    }


def check_run_config(config: Mapping[str, Any]) -> None:
    """Everything but the launcher kind is what the API would accept (its schema knows local and slurm only;
    the bench creates the runs with crud, after this check)."""
    from service.schemas import RunConfig

    plain = {k: v for k, v in config.items() if k != SimLauncher.kind}
    RunConfig.model_validate({**plain, "launcher": "local"})


# ---- the stack: database, API, orchestrator -------------------------------------------------------------


class Stack:
    """A PostgreSQL database of its own, the API (uvicorn, several workers), `trainops orchestrator`."""

    def __init__(self, opts: Options, workdir: Path) -> None:
        self.opts, self.workdir = opts, workdir
        self.db_name = f"trainops_fleetsim_{uuid.uuid4().hex[:10]}"
        self.url = _pg_url(DEFAULT_ADMIN_DSN, self.db_name)
        self.runs_dir = workdir / "runs"
        self.prom_dir = workdir / "prometheus"
        self.api: Server | None = None
        self.orchestrator: subprocess.Popen[bytes] | None = None
        self.factory: Any = None

    def env(self) -> dict[str, str]:
        return {
            "TRAINOPS_MODE": "dev",
            "TRAINOPS_DATABASE_URL": self.url,
            "TRAINOPS_HOME": str(self.workdir / "home"),
            "TRAINOPS_ORCHESTRATOR_RUNS_DIR": str(self.runs_dir),
            "PROMETHEUS_MULTIPROC_DIR": str(self.prom_dir),
            "PYTHONPATH": str(ROOT),
        }

    def start_database(self) -> None:
        from service import migrate
        from service.db import make_engine, make_session_factory

        with psycopg.connect(DEFAULT_ADMIN_DSN, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{self.db_name}"')
        migrate.upgrade(self.url)
        self.factory = make_session_factory(make_engine(self.url))

    def start_api(self) -> Server:
        """Start the API's workers (ready once `wait_ready` returns; the orchestrator boots meanwhile)."""
        self.prom_dir.mkdir(parents=True, exist_ok=True)
        self.api = Server(self.url, self.opts.api_workers, env=self.env())
        return self.api

    def start_orchestrator(self) -> None:
        assert self.api is not None
        k = self.opts.time_scale
        env = {
            **os.environ,
            **self.env(),
            "TRAINOPS_API_URL": self.api.url,
            "TRAINOPS_EXTRA_LAUNCHERS": SIM_LAUNCHER,
            "TRAINOPS_ORCHESTRATOR_API_URL": self.api.url,
            "TRAINOPS_ORCHESTRATOR_LOOP_INTERVAL_S": str(self.opts.loop_interval_s),
            # the deep check before a relaunch runs the health checks on every host of the attempt
            # (bench/fleet_sweep.py measures sweeps); the simulated hosts have no health workers
            "TRAINOPS_ORCHESTRATOR_REMEDIATION__DEEP_CHECK_BEFORE_RELAUNCH": "false",
            # the simulated start-up is scaled: so is the wait for enough healthy hosts
            "TRAINOPS_ORCHESTRATOR_REMEDIATION__HOSTS_WAIT_S": str(max(30.0, 120.0 * k)),
        }
        env.pop("TRAINOPS_BOOTSTRAP_ADMIN_TOKEN", None)
        log = open(self.workdir / "orchestrator.log", "ab")  # noqa: SIM115 - the child's output
        self.orchestrator = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "orchestrator"], env=env, cwd=ROOT, stdout=log, stderr=log
        )

    def stop(self) -> None:
        if self.orchestrator is not None and self.orchestrator.poll() is None:
            self.orchestrator.terminate()
            try:
                self.orchestrator.wait(15)
            except subprocess.TimeoutExpired:
                self.orchestrator.kill()
                self.orchestrator.wait()
        self.kill_attempts()
        if self.api is not None:
            self.api.stop()
        if self.factory is not None:
            self.factory.kw["bind"].dispose()
        if not self.opts.keep_db:
            with psycopg.connect(DEFAULT_ADMIN_DSN, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)')

    def kill_attempts(self) -> None:
        """Every simulated attempt still alive (the orchestrator's children live in sessions of their own)."""
        for info in self.attempt_infos():
            pid = int(info.get("pid") or 0)
            if pid and _pid_alive(pid):
                _signal(pid, signal.SIGKILL)

    def attempt_infos(self) -> list[dict[str, Any]]:
        if self.factory is None:
            return []
        from service.models import Attempt

        with self.factory() as session:
            return [dict(a.launcher or {}) for a in session.query(Attempt).all()]

    def orchestrator_cpu_s(self) -> float:
        assert self.orchestrator is not None
        fields = Path(f"/proc/{self.orchestrator.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def register_hosts(factory: Any, hosts: Sequence[str]) -> None:
    from service.crud.nodes import register_node
    from service.db import transaction

    with transaction(factory) as session:
        for host in hosts:
            gpus = [
                {"index": i, "uuid": f"GPU-{host}-{i}", "model": "NVIDIA H100 80GB HBM3", "memory_mb": 81559}
                for i in range(GPUS_PER_HOST)
            ]
            register_node(session, hostname=host, gpus=gpus, author="bench/fleet-sim")


def create_runs(factory: Any, configs: Sequence[tuple[str, dict[str, Any]]]) -> dict[str, int]:
    from service.crud.runs import create_run
    from service.db import transaction

    ids = {}
    with transaction(factory) as session:
        for name, config in configs:
            check_run_config(config)
            ids[name] = create_run(
                session, name=name, owner="fleet-sim", config=config, start=True, author="bench/fleet-sim"
            ).id
    return ids


# ---- Prometheus readings (the orchestrator's and the API's own instruments) -------------------------------


@dataclass
class Histogram:
    count: float = 0.0
    total: float = 0.0
    buckets: dict[float, float] = field(default_factory=dict)  # upper bound -> cumulative count

    def minus(self, earlier: Histogram) -> Histogram:
        return Histogram(
            self.count - earlier.count,
            self.total - earlier.total,
            {b: c - earlier.buckets.get(b, 0.0) for b, c in self.buckets.items()},
        )

    def quantile(self, q: float) -> float | None:
        """Linear interpolation inside the bucket (as PromQL's histogram_quantile)."""
        if self.count <= 0:
            return None
        rank, lower, below = q * self.count, 0.0, 0.0
        for bound in sorted(self.buckets):
            cumulative = self.buckets[bound]
            if cumulative >= rank:
                if math.isinf(bound):
                    return lower
                inside = cumulative - below
                return lower + (bound - lower) * ((rank - below) / inside if inside else 1.0)
            lower, below = bound, cumulative
        return lower


def read_histograms(prom_dir: Path, name: str, *, match: Mapping[str, str] | None = None) -> Histogram:
    """Sum of a histogram's series (whose labels include `match`) over every process of the multiprocess
    directory: the numbers the API's /metrics serves, read without a scrape's database reading."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(prom_dir))
    out = Histogram()
    for family in registry.collect():
        if family.name != name:
            continue
        for sample in family.samples:
            labels = dict(sample.labels)
            if match and any(labels.get(k) != v for k, v in match.items()):
                continue
            if sample.name.endswith("_count"):
                out.count += sample.value
            elif sample.name.endswith("_sum"):
                out.total += sample.value
            elif sample.name.endswith("_bucket"):
                bound = float(labels["le"])
                out.buckets[bound] = out.buckets.get(bound, 0.0) + sample.value
    return out


LOOP_HISTOGRAM = "trainops_orchestrator_loop_duration_seconds"
HTTP_HISTOGRAM = "trainops_http_request_duration_seconds"


# ---- one phase -----------------------------------------------------------------------------------------


class Phase:
    """One live phase: its own stack, hosts, runs and faults; the readings its report is made of."""

    def __init__(self, spec: PhaseSpec, opts: Options) -> None:
        self.spec, self.opts = spec, opts
        self.workdir = opts.workdir / spec.name
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.stack = Stack(opts, self.workdir)
        self.rng = random.Random(opts.seed * 31 + spec.runs)
        self.params = sim_params(opts, self.workdir, opts.seed)
        self.hosts = [f"{spec.name}-h{i:05d}" for i in range(spec.runs * spec.hosts_per_run + spec.spares)]
        self.run_names = [f"{spec.name}-run{i:03d}" for i in range(spec.runs)]
        self.run_ids: dict[str, int] = {}
        self.faults: list[Fault] = []
        self.broken: set[str] = set()
        self.health_timers: list[threading.Timer] = []
        self.started_at = 0.0
        self.ended_at = 0.0

    def log(self, message: str) -> None:
        if not self.opts.quiet:
            print(f"[{time.strftime('%H:%M:%S')}] {self.spec.name}: {message}", flush=True)

    # -- set-up, run, tear-down

    def run(self) -> dict[str, Any]:
        try:
            self.stack.start_database()
            register_hosts(self.stack.factory, self.hosts)
            target = max(1000, round(7 * 86400 / self.opts.step_s))  # the curves stretch over a week of steps
            configs = [
                (name, run_config(self.opts, self.params, self.spec.hosts_per_run, target))
                for name in self.run_names
            ]
            api = self.stack.start_api()
            self.stack.start_orchestrator()
            api.wait_ready(timeout=180)
            self.run_ids = create_runs(self.stack.factory, configs)  # launched once the API takes reports
            self.started_at = time.time()
            loop_before = read_histograms(self.stack.prom_dir, LOOP_HISTOGRAM)
            cpu_before = self.stack.orchestrator_cpu_s()
            self.log(
                f"{self.spec.runs} run(s) x {self.spec.hosts_per_run} hosts x {self.opts.ranks_per_host} "
                "ranks launched; "
                f"faults: {', '.join(self.spec.faults) or 'none'}"
            )
            self.drive()
            self.ended_at = time.time()
            loop = read_histograms(self.stack.prom_dir, LOOP_HISTOGRAM).minus(loop_before)
            cpu = self.stack.orchestrator_cpu_s() - cpu_before
            http = {
                route: read_histograms(
                    self.stack.prom_dir, HTTP_HISTOGRAM, match={"route": f"/api/v1/runs/{{run_id}}/{route}"}
                )
                for route in ("heartbeats", "metrics", "checkpoints")
            }
            return self.report(loop, cpu, http)
        finally:
            for timer in self.health_timers:
                timer.cancel()
            self.stack.stop()

    def drive(self) -> None:
        """Inject the phase's faults when their runs are running, until the phase's time is up (a
        sequential phase ends early once its last fault's run has recovered)."""
        deadline = self.started_at + self.spec.duration_s
        pending = list(self.spec.faults)
        scaling_times = sorted(
            self.started_at + self.spec.duration_s * self.rng.uniform(0.25, 0.6) for _ in self.spec.faults
        )
        scaling_runs = self.rng.sample(self.run_names, k=min(len(self.spec.faults), len(self.run_names)))
        last_report = 0.0
        while time.time() < deadline:
            state = self.run_state()
            if self.stack.orchestrator is not None and self.stack.orchestrator.poll() is not None:
                raise RuntimeError(f"the orchestrator exited: see {self.workdir / 'orchestrator.log'}")
            if self.spec.sequential:
                if pending and self.ready_for_next(state):
                    self.inject(pending.pop(0), self.run_names[0], state)
                elif not pending and self.recovered_from_last(state):
                    self.log("the last fault's run has recovered")
                    break
            else:
                while pending and scaling_times and time.time() >= scaling_times[0] and scaling_runs:
                    run = scaling_runs[0]
                    if state.get(run, {}).get("progress", 0) < 2:
                        break  # not running yet: try again on the next tick
                    scaling_times.pop(0)
                    scaling_runs.pop(0)
                    self.inject(pending.pop(0), run, state)
            if time.time() - last_report > 30:
                last_report = time.time()
                steps = [s.get("step") or 0 for s in state.values()]
                self.log(
                    f"steps {min(steps, default=0)}..{max(steps, default=0)}; "
                    f"faults injected {len(self.faults)}"
                )
            time.sleep(0.5)

    def run_state(self) -> dict[str, dict[str, Any]]:
        """Per run: its active attempt's number and start step, its newest stored step, its LR scale."""
        import sqlalchemy as sa

        from service.models import Attempt, Checkpoint, Metric, Run

        out: dict[str, dict[str, Any]] = {}
        with self.stack.factory() as session:
            runs = session.execute(sa.select(Run.id, Run.name, Run.lr_scale)).all()
            active = {
                a.run_id: a
                for a in session.execute(sa.select(Attempt).where(Attempt.ended_at.is_(None))).scalars()
            }
            newest = dict(
                session.execute(
                    sa.select(Metric.run_id, sa.func.max(Metric.step))
                    .join(Attempt, sa.and_(Attempt.run_id == Metric.run_id, Attempt.number == Metric.attempt))
                    .where(Attempt.ended_at.is_(None))
                    .group_by(Metric.run_id)
                ).all()
            )
            checkpoints = dict(
                session.execute(
                    sa.select(Checkpoint.run_id, sa.func.count()).group_by(Checkpoint.run_id)
                ).all()
            )
            for run_id, name, lr_scale in runs:
                attempt = active.get(run_id)
                step = newest.get(run_id)
                out[name] = {
                    "attempt": attempt.number if attempt else None,
                    "hosts": list(attempt.hosts) if attempt else [],
                    "start_step": attempt.start_step if attempt else None,
                    "step": step,
                    "progress": (step - attempt.start_step) if attempt and step is not None else 0,
                    "lr_scale": lr_scale,
                    "checkpoints": checkpoints.get(run_id, 0),
                }
        return out

    def ready_for_next(self, state: dict[str, dict[str, Any]]) -> bool:
        run = state.get(self.run_names[0], {})
        if run.get("attempt") is None or run.get("step") is None:
            return False
        if not self.faults:  # the first fault once a checkpoint is catalogued to roll back to
            return run["checkpoints"] > 0 and run["step"] >= checkpoint_steps(self.opts) + 2
        return run["attempt"] > self.faults[-1].attempt and run["progress"] >= self.spec.progress_steps

    def recovered_from_last(self, state: dict[str, dict[str, Any]]) -> bool:
        run = state.get(self.run_names[0], {})
        last = self.faults[-1] if self.faults else None
        return (
            last is not None
            and run.get("attempt") is not None
            and run["attempt"] > last.attempt
            and run.get("progress", 0) >= 2
        )

    # -- faults

    def write_fault(self, record: dict[str, Any]) -> None:
        with open(self.params.faults_file, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()

    def inject(self, kind: str, run: str, state: dict[str, dict[str, Any]]) -> None:
        info = state[run]
        host = self.rng.choice(info["hosts"])
        per_host = self.opts.ranks_per_host
        rank = info["hosts"].index(host) * per_host + self.rng.randrange(per_host)
        fault = Fault(
            id=uuid.uuid4().hex[:8],
            kind=kind,
            run=run,
            at=time.time(),
            attempt=info["attempt"],
            host=host,
            rank=rank,
        )
        if kind == "diverge":
            fault.host = fault.rank = None
            fault.at_step = int(info["step"]) + 2
            fault.below = float(info["lr_scale"] or 1.0)  # recurs on every replay unless the LR is cut
        if kind in ("gpu", "host"):
            self.broken.add(host)
            Path(self.params.broken_hosts_file).write_text(json.dumps(sorted(self.broken)))
            delay = self.rng.uniform(0, 30.0) * self.opts.time_scale  # the next quick sweep (every 30 s)
            fault.health_report_at = fault.at + delay
            timer = threading.Timer(delay, self.host_agent_reports, args=(host, kind))
            timer.daemon = True
            timer.start()
            self.health_timers.append(timer)
        if kind == "maintenance":
            assert self.stack.api is not None
            response = httpx.post(
                f"{self.stack.api.url}/api/v1/nodes/{host}/cordon",
                json={"reason": "unplanned maintenance: drained by the scheduler"},
                headers=ADMIN,
                timeout=30,
            )
            response.raise_for_status()
        self.write_fault({**asdict(fault)})
        self.faults.append(fault)
        where = f"at step {fault.at_step}" if kind == "diverge" else f"on {host} (rank {rank})"
        self.log(f"injected {kind} into {run} attempt {fault.attempt} {where}")

    def host_agent_reports(self, host: str, kind: str) -> None:
        """What the host's quick sweep would store: a hard fault (service.fleet.sweep.ingest_host applies the
        cordon policy to it in the same transaction, as for a real sweep's result)."""
        from health.config import HealthConfig
        from health.results import CheckResult, CheckStatus, Level
        from service.fleet.policy import CordonRules
        from service.fleet.sweep import ingest_host

        if kind == "gpu":
            result = CheckResult(
                check="nvml.ecc",
                status=CheckStatus.failed,
                reason="GPU 3: volatile double-bit ECC errors (HBM)",
                faults=["ecc_dbe"],
                measurements={"gpu": 3, "ecc_dbe": 1},
            )
        else:
            result = CheckResult(
                check="nvml.inventory",
                status=CheckStatus.failed,
                reason="GPUs fell off the bus (host fault)",
                faults=["gpu_lost"],
            )
        try:
            ingest_host(
                self.stack.factory,
                host=host,
                level=Level.quick,
                results=[result],
                worker=f"health@{host} (simulated)",
                sweep_id=f"sim-{uuid.uuid4().hex[:8]}",
                rules=CordonRules.from_config(HealthConfig()),
                author="health/sweep",
            )
        except Exception as exc:  # the phase's report says the host was never cordoned
            self.log(f"host agent report for {host} failed: {exc!r}")

    # -- the report

    def attempts(self) -> list[dict[str, Any]]:
        from service.models import Attempt, Run

        def ts(value: dt.datetime | None) -> float | None:
            return value.timestamp() if value is not None else None

        with self.stack.factory() as session:
            rows = session.query(Attempt, Run.name).join(Run, Run.id == Attempt.run_id).all()
            out = []
            for a, run in rows:
                findings = dict(a.findings or {})
                findings.pop("beats", None)  # every rank's beat: not needed here
                out.append(
                    {
                        "run": run,
                        "number": a.number,
                        "hosts": list(a.hosts),
                        "start_step": a.start_step,
                        "last_step": a.last_step,
                        "started_at": ts(a.started_at),
                        "ended_at": ts(a.ended_at),
                        "detected_at": ts(a.detected_at),
                        "first_step_at": ts(a.first_step_at),
                        "exit_reason": a.exit_reason,
                        "exit_code": a.exit_code,
                        "findings": findings,
                        "attempt_dir": (a.launcher or {}).get("attempt_dir"),
                    }
                )
        return sorted(out, key=lambda a: (a["run"], a["number"]))

    def node_states(self) -> dict[str, dict[str, Any]]:
        from service.models import Node

        with self.stack.factory() as session:
            return {
                n.hostname: {
                    "state": n.state.value,
                    "reason": n.state_reason,
                    "at": n.state_changed_at.timestamp(),
                }
                for n in session.query(Node).all()
            }

    def report(self, loop: Histogram, cpu_s: float, http: Mapping[str, Histogram]) -> dict[str, Any]:
        attempts = self.attempts()
        nodes = self.node_states()
        by_key = {(a["run"], a["number"]): a for a in attempts}
        events = {
            (a["run"], a["number"]): read_jsonl(Path(a["attempt_dir"]) / EVENTS_FILE)
            for a in attempts
            if a["attempt_dir"]
        }
        stats = [read_json(Path(a["attempt_dir"]) / STATS_FILE) for a in attempts if a["attempt_dir"]]
        exits = {
            (a["run"], a["number"]): read_json(Path(a["attempt_dir"]) / EXIT_FILE)
            for a in attempts
            if a["attempt_dir"]
        }
        wall = self.ended_at - self.started_at
        failures = [self.judge_fault(f, by_key, events, exits, stats, nodes) for f in self.faults]
        false_actions = self.false_actions(attempts, events, nodes)
        passes = loop.count
        api = {route: api_load(route, stats, http[route], wall) for route in http}
        return {
            "phase": self.spec.name,
            "runs": self.spec.runs,
            "hosts_per_run": self.spec.hosts_per_run,
            "ranks": self.spec.runs * self.spec.hosts_per_run * self.opts.ranks_per_host,
            "hosts_registered": len(self.hosts),
            "wall_s": round(wall, 1),
            "attempts": len(attempts),
            "orchestrator": {
                "passes": int(passes),
                "pass_s_mean": loop.total / passes if passes else None,
                "pass_s_p50": loop.quantile(0.5),
                "pass_s_p99": loop.quantile(0.99),
                "cpu_s": round(cpu_s, 2),
                "cpu_s_per_pass": cpu_s / passes if passes else None,
                "pass_s_per_run": loop.total / passes / self.spec.runs if passes else None,
                "cpu_s_per_pass_per_run": cpu_s / passes / self.spec.runs if passes else None,
                "cpu_share": cpu_s / wall if wall else None,
            },
            "api": api,
            "failures": failures,
            "false_actions": false_actions,
        }

    def judge_fault(
        self,
        fault: Fault,
        by_key: Mapping[tuple[str, int], dict[str, Any]],
        events: Mapping[tuple[str, int], list[dict[str, Any]]],
        exits: Mapping[tuple[str, int], dict[str, Any] | None],
        stats: Sequence[dict[str, Any] | None],
        nodes: Mapping[str, dict[str, Any]],
    ) -> dict[str, Any]:
        """What happened to one injected fault: detected as what, how fast (evidence wait and reaction), the
        decision, relaunches wasted on a broken host, and when the run made progress again."""
        k = self.opts.time_scale
        out: dict[str, Any] = {
            "kind": fault.kind,
            "run": fault.run,
            "attempt": fault.attempt,
            "host": fault.host,
        }
        key = (fault.run, fault.attempt)
        if fault.kind == "diverge":
            # the attempt that replays the divergence: the first at or after injection that diverged
            hit = next(
                (
                    key2
                    for key2 in sorted(by_key)
                    if key2[0] == fault.run
                    and key2[1] >= fault.attempt
                    and any(
                        e.get("event") == "diverging" and e.get("at_step") == fault.at_step
                        for e in events.get(key2, [])
                    )
                ),
                None,
            )
            if hit is None:
                return {**out, "outcome": "never diverged"}
            key = hit
            fired = next(
                e for e in events[key] if e.get("event") == "diverging" and e.get("at_step") == fault.at_step
            )
            fired_at = fired["at"]
        else:
            fired = next(
                (e for e in events.get(key, []) if e.get("event") == "fault" and e.get("id") == fault.id),
                None,
            )
            if fired is None:
                return {**out, "outcome": "never fired (the attempt ended first)"}
            fired_at = fired["fired_at"]
        attempt = by_key[key]
        out["attempt"] = key[1]
        out["detected_as"] = attempt["exit_reason"]
        out["detail"] = (attempt["findings"] or {}).get("detail")
        if attempt["detected_at"] is None:
            return {**out, "outcome": "not detected by the end of the phase"}
        detected_at = attempt["detected_at"]
        evidence_at = self.evidence_at(fault, fired, attempt, stats)
        out["detect_s"] = detected_at - fired_at
        out["evidence_wait_s"] = max(0.0, evidence_at - fired_at)
        out["reaction_s"] = max(0.0, detected_at - evidence_at)
        out["fleet_detect_s"] = out["evidence_wait_s"] / k + out["reaction_s"]
        # the chain of attempts until one makes a step; attempts that died at start-up are wasted relaunches
        decisions, wasted_fleet, number, recovered = [], 0.0, key[1], None
        previous_detected = detected_at
        scaled_startup = (self.params.startup_s + self.params.teardown_s) * k
        while (nxt := by_key.get((fault.run, number + 1))) is not None:
            decisions.append(nxt["started_at"] - previous_detected)
            if nxt["first_step_at"] is not None:
                recovered = nxt
                break
            if nxt["detected_at"] is None:
                break
            exit_record = exits.get((fault.run, number + 1)) or {}
            ended = exit_record.get("ended", nxt["detected_at"])
            # a relaunch that died at start-up: its simulated start-up and teardown in fleet seconds, the rest
            # (process start and exit, the orchestrator noticing) as measured
            lifetime = ended - nxt["started_at"]
            wasted_fleet += (
                scaled_startup / k
                + max(0.0, lifetime - scaled_startup)
                + max(0.0, nxt["detected_at"] - ended)
            )
            previous_detected = nxt["detected_at"]
            number += 1
        out["decision_s"] = decisions[0] if decisions else None
        out["decisions_s"] = decisions
        out["wasted_relaunches"] = len(decisions) - (1 if recovered else 0)
        if recovered is not None:
            out["relaunched_on"] = (
                "other hosts" if fault.host and fault.host not in recovered["hosts"] else "same hosts"
            )
            out["restored_step"] = recovered["start_step"]
            if attempt["last_step"] is not None:
                out["rolled_back_steps"] = max(0, attempt["last_step"] - recovered["start_step"])
            startup_wall = recovered["first_step_at"] - recovered["started_at"]
            startup_fleet = self.params.startup_s + max(0.0, startup_wall - self.params.startup_s * k)
            out["downtime_fleet_s"] = out["fleet_detect_s"] + sum(decisions) + wasted_fleet + startup_fleet
            out["recovered"] = True
        else:
            out["recovered"] = False
        if fault.kind in HARDWARE_KINDS and fault.host:
            node = nodes.get(fault.host, {})
            out["host_state"] = node.get("state")
            out["host_out_of_service_after_s"] = (
                node["at"] - fault.at if node.get("state") != "healthy" else None
            )
        expected = EXPECTED_OUTCOME.get(fault.kind)
        out["outcome"] = "ok" if expected is None or attempt["exit_reason"] in expected else "misclassified"
        return out

    def evidence_at(
        self,
        fault: Fault,
        fired: Mapping[str, Any],
        attempt: Mapping[str, Any],
        stats: Sequence[dict[str, Any] | None],
    ) -> float:
        """When the evidence the orchestrator acts on was complete, in wall seconds; what lies between the
        fault and it is simulated time (scaled), what follows it is measured. A rank's death: after the
        simulated teardown (the process's own exit and the orchestrator noticing are measured); a drain: when
        it was recorded; a hang: the last beat plus the step limit in force, less the heartbeat interval it
        includes (the hosts' send interval is wall time: how late a beat arrives is measured, not simulated);
        a divergence: the time of the
        newest metric point delivered before the detection (its delivery is measured)."""
        findings = attempt["findings"] or {}
        if fault.kind == "hang":
            last_beat = fired.get("last_beat_at") or fired["fired_at"]
            lag = float(findings.get("heartbeat_interval_s") or 0.0)
            return float(last_beat) + float(findings.get("hang_timeout_s") or 0.0) - lag
        if fault.kind == "diverge":
            points = [
                point_at
                for s in stats
                if s and s["attempt"] == attempt["number"] and s.get("run") == fault.run
                for _step, point_at, posted_at in s.get("metric_posts", [])
                if posted_at <= attempt["detected_at"]
            ]
            return max(points, default=fired["at"])
        if fault.kind == "maintenance":
            return fault.at  # the scheduler's drain is recorded before it kills the job
        return float(fired["fired_at"]) + self.params.teardown_s * self.opts.time_scale

    def false_actions(
        self,
        attempts: Sequence[dict[str, Any]],
        events: Mapping[tuple[str, int], list[dict[str, Any]]],
        nodes: Mapping[str, dict[str, Any]],
    ) -> list[dict[str, Any]]:
        """Hangs, divergences and stragglers declared where nothing was injected, and hosts taken out of
        service that nobody broke."""
        found = []
        out_of_service = {f.host for f in self.faults if f.kind in HARDWARE_KINDS}
        for a in attempts:
            reason = a["exit_reason"]
            if reason in (None, "completed", "stopped", "superseded"):
                continue
            evs = events.get((a["run"], a["number"]), [])
            kinds = {e.get("kind") for e in evs if e.get("event") == "fault"}
            if any(e.get("event") == "diverging" for e in evs):
                kinds.add("diverge")
            if (
                any(e.get("event") == "broken_host_at_startup" for e in evs)
                or set(a["hosts"]) & out_of_service
            ):
                kinds.add("broken_host")  # placed on a host broken or drained before the health layer knew
            detail = str((a["findings"] or {}).get("detail") or "")
            if reason == "hang" and "hang" not in kinds:
                found.append({"action": "hang", "run": a["run"], "attempt": a["number"], "detail": detail})
            elif reason == "divergence" and "diverge" not in kinds:
                found.append(
                    {"action": "divergence", "run": a["run"], "attempt": a["number"], "detail": detail}
                )
            elif "straggler" in detail:
                found.append(
                    {"action": "straggler", "run": a["run"], "attempt": a["number"], "detail": detail}
                )
            elif not kinds:
                found.append(
                    {
                        "action": f"unexplained {reason}",
                        "run": a["run"],
                        "attempt": a["number"],
                        "detail": detail,
                    }
                )
        for host, node in sorted(nodes.items()):
            if node["state"] != "healthy" and host not in out_of_service:
                found.append(
                    {"action": f"{node['state']} healthy host", "host": host, "detail": node["reason"]}
                )
        return found


def api_load(
    route: str, stats: Sequence[dict[str, Any] | None], server: Histogram, wall: float
) -> dict[str, Any]:
    latencies = sorted(x for s in stats if s for x in s["endpoints"][route]["latencies_s"])
    statuses: dict[str, int] = {}
    items = 0
    for s in stats:
        if not s:
            continue
        items += s["endpoints"][route]["items"]
        for code, n in s["endpoints"][route]["statuses"].items():
            statuses[code] = statuses.get(code, 0) + n
    return {
        "requests": len(latencies),
        "requests_per_s": len(latencies) / wall if wall else None,
        "items_per_s": items / wall if wall else None,
        "client_p50_ms": pct(latencies, 0.5) * 1000 if latencies else None,
        "client_p99_ms": pct(latencies, 0.99) * 1000 if latencies else None,
        "statuses": statuses,
        "server_requests": int(server.count),
        "server_mean_ms": server.total / server.count * 1000 if server.count else None,
        "server_p50_ms": _ms(server.quantile(0.5)),
        "server_p99_ms": _ms(server.quantile(0.99)),
    }


def _ms(value: float | None) -> float | None:
    return value * 1000 if value is not None else None


def pct(values: Sequence[float], q: float) -> float:
    return values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))]


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        with contextlib.suppress(ValueError):
            out.append(json.loads(line))
    return out


# ---- the week: a discrete-event timeline with the measured costs -----------------------------------------


@dataclass(frozen=True)
class ClassCost:
    """Per failure class, in fleet seconds: detection (evidence wait + reaction), the decisions until the
    relaunch that trains, and the start-ups those relaunches cost (1 + wasted relaunches)."""

    detect_s: float
    decision_s: float
    launches: float
    measured: int  # how many live failures these numbers come from


def class_costs(failures: Sequence[dict[str, Any]]) -> dict[str, ClassCost]:
    """Medians per class over the live failures that were detected; a class whose runs did not relaunch
    within the phase (e.g. needs attention) takes the median decision of the others."""
    detected = [f for f in failures if "fleet_detect_s" in f]
    decided = [sum(f["decisions_s"]) for f in detected if f.get("decisions_s")]
    fallback = statistics.median(decided) if decided else 0.0
    out = {}
    for kind in FAILURE_WORDS:
        seen = [f for f in detected if f["kind"] == kind]
        if not seen:
            continue
        own = [sum(f["decisions_s"]) for f in seen if f.get("decisions_s")]
        out[kind] = ClassCost(
            detect_s=statistics.median(f["fleet_detect_s"] for f in seen),
            decision_s=statistics.median(own) if own else fallback,
            launches=statistics.median(1 + (f.get("wasted_relaunches") or 0) for f in seen),
            measured=len(seen),
        )
    return out


def restart_s(kind: str, cost: ClassCost, *, startup_s: float, deep_check_s: float) -> float:
    """A failure's time from recorded to training again: its decisions, the deep check when its class gets
    one, and one start-up per launch."""
    deep = deep_check_s if kind in DEEP_CHECK_KINDS else 0.0
    return cost.decision_s + deep + cost.launches * startup_s


def week_timeline(
    costs: Mapping[str, ClassCost],
    *,
    gpus: int,
    startup_s: float,
    checkpoint_s: float,
    save_stall_s: float,
    val_every_s: float,
    val_s: float,
    divergences: int,
    divergence_rollback_s: float,
    deep_check_s: float = DEEP_CHECK_S,
    days: float = 7.0,
    seed: int = 0,
    events: Sequence[tuple[float, str]] | None = None,
) -> dict[str, Any]:
    """ETTR of one simulated week: productive training time / wall time.

    Failures arrive as a Poisson process at the Llama 3 rate scaled to `gpus` (419 in 54 days on 16,384),
    their class drawn from its mix; `divergences` more at uniformly random times. A failure loses the progress
    since the last checkpoint, plus the class's measured detection and decisions, `deep_check_s` for the
    classes the orchestrator deep-checks hosts after (DEEP_CHECK_KINDS), and one start-up per launch; a
    divergence loses `divergence_rollback_s` instead (its restore point lies before its onset; measured
    live). A failure that arrives while the run is down (another host dies during the relaunch's start-up)
    loses no progress, but the restart in progress: the run stays down until the new failure's own
    detection, decisions, deep check and start-ups are over, counted from its arrival (or until the restart
    in progress would have ended, when that is later). A divergence drawn while the run is down happens when
    it trains again. Checkpoints stall the loop `save_stall_s` every `checkpoint_s` of progress, validation
    `val_s` every `val_every_s`. A class without a live measurement is charged the worst measured class's
    costs (and listed). `events` ((fleet second, class), divergences included) replays a given week instead
    of drawing one."""
    rng = random.Random(seed)
    wall_end = days * 86400
    rate = LLAMA3_INTERRUPTIONS / (LLAMA3_DAYS * 86400) * gpus / LLAMA3_GPUS
    kinds, weights = zip(*FAILURE_MIX.items(), strict=True)
    worst = max(costs.values(), key=lambda c: c.detect_s + c.decision_s) if costs else ClassCost(0, 0, 1, 0)
    if events is None:
        drawn: list[tuple[float, str]] = []
        t = 0.0
        while (t := t + rng.expovariate(rate)) < wall_end:
            drawn.append((t, rng.choices(kinds, weights)[0]))
        drawn += [(rng.uniform(0, wall_end), "diverge") for _ in range(divergences)]
        events = drawn
    events = sorted(events)
    overhead = 1 + save_stall_s / checkpoint_s + (val_s / val_every_s if val_every_s else 0.0)
    productive = lost_recompute = lost_detect = lost_restart = lost_deep = lost_during_restart = 0.0
    now, since_checkpoint = 0.0, 0.0
    counts: dict[str, int] = {}
    during_restart = 0
    charged_worst: set[str] = set()
    for drawn_at, kind in events:
        cost = costs.get(kind)
        if cost is None:
            cost, _ = worst, charged_worst.add(kind)
        deep = deep_check_s if kind in DEEP_CHECK_KINDS else 0.0
        down_s = cost.detect_s + restart_s(kind, cost, startup_s=startup_s, deep_check_s=deep_check_s)
        counts[kind] = counts.get(kind, 0) + 1
        at = max(drawn_at, now) if kind == "diverge" else drawn_at
        if at < now:
            ends = max(now, at + down_s)
            lost_during_restart += ends - now
            now = ends
            during_restart += 1
            continue
        progress = (at - now) / overhead
        productive += progress
        since_checkpoint = (since_checkpoint + progress) % checkpoint_s
        lost = divergence_rollback_s if kind == "diverge" else since_checkpoint
        productive -= min(lost, productive)
        lost_recompute += lost
        lost_detect += cost.detect_s
        lost_deep += deep
        lost_restart += down_s - cost.detect_s - deep
        now = at + down_s
        since_checkpoint = 0.0
    if now < wall_end:
        productive += (wall_end - now) / overhead
    return {
        "ettr": productive / wall_end,
        "failures": counts,
        "failures_during_restart": during_restart,
        "deep_check_s": deep_check_s,
        "lost_h": {
            "recompute": lost_recompute / 3600,
            "detection": lost_detect / 3600,
            "restart": lost_restart / 3600,
            "deep_check": lost_deep / 3600,
            "failure_during_restart": lost_during_restart / 3600,
            "checkpoint_and_validation": (
                wall_end
                - productive
                - lost_recompute
                - lost_detect
                - lost_restart
                - lost_deep
                - lost_during_restart
            )
            / 3600,
        },
        "charged_worst_class": sorted(charged_worst),
    }


def mix_costs(costs: Mapping[str, ClassCost], *, deep_check_s: float = DEEP_CHECK_S) -> dict[str, float]:
    """Expected costs of one interruption drawn from the Llama 3 mix (divergences left out: they are rare
    and their cost is a deliberate rollback): detection, decisions, deep check and launches, each weighted by
    its class's share; a class without a measurement is charged the worst measured class, as in the week."""
    worst = max(costs.values(), key=lambda c: c.detect_s + c.decision_s)
    total = sum(FAILURE_MIX.values())
    out = {"detect_s": 0.0, "decision_s": 0.0, "deep_check_s": 0.0, "launches": 0.0}
    for kind, share in FAILURE_MIX.items():
        cost, w = costs.get(kind, worst), share / total
        out["detect_s"] += w * cost.detect_s
        out["decision_s"] += w * cost.decision_s
        out["deep_check_s"] += w * (deep_check_s if kind in DEEP_CHECK_KINDS else 0.0)
        out["launches"] += w * cost.launches
    return out


def fleet_table(
    costs: Mapping[str, ClassCost],
    *,
    deep_check_s: float = DEEP_CHECK_S,
    gpus: int = LLAMA3_GPUS,
    save_stall_s: float = SimParams.save_stall_s,
    checkpoint_min: Sequence[float] = (2, 3, 5, 10, 30),
    startups_s: Sequence[float] = (60, 120, 300),
) -> dict[str, Any]:
    """docs/goodput.md's fleet table from measured per-class costs: expected ETTR
    (1 - s / C) x (1 - (D + R + launches x L + C / 2) / M) (`bench.chaos.ettr`) with D, R (decisions plus
    deep check) and launches the Llama 3 mix's weighted means of `costs` (`mix_costs`), M the Llama 3 mean
    time between interruptions for `gpus`, per checkpoint interval C and start-up L."""
    mix = mix_costs(costs, deep_check_s=deep_check_s)
    mtbf_s = LLAMA3_DAYS * 86400 / LLAMA3_INTERRUPTIONS * LLAMA3_GPUS / gpus
    rows = {
        f"{minutes:g}": {
            f"{startup:g}": expected_ettr(
                mtbf_s=mtbf_s,
                detect_s=mix["detect_s"],
                supervisor_s=mix["decision_s"] + mix["deep_check_s"],
                startup_s=mix["launches"] * startup,
                checkpoint_interval_s=60 * minutes,
                checkpoint_stall_s=save_stall_s,
            )
            for startup in startups_s
        }
        for minutes in checkpoint_min
    }
    return {"gpus": gpus, "mtbf_s": mtbf_s, "save_stall_s": save_stall_s, **mix, "ettr": rows}


def render_fleet_table(table: Mapping[str, Any]) -> str:
    startups = list(next(iter(table["ettr"].values())))
    lines = [
        f"Expected ETTR, Llama 3 mix on {table['gpus']:,} GPUs (MTBF {table['mtbf_s'] / 3600:.2f} h): "
        f"detection {table['detect_s']:.1f} s, decisions {table['decision_s']:.1f} s, deep check "
        f"{table['deep_check_s']:.1f} s, {table['launches']:.2f} launches per interruption; "
        f"checkpoint stall {table['save_stall_s']:g} s",
        "| checkpoint interval C | " + " | ".join(f"L = {s} s" for s in startups) + " |",
        "|---|" + "---:|" * len(startups),
    ]
    for minutes, row in table["ettr"].items():
        lines.append(f"| {minutes} min | " + " | ".join(f"{100 * v:.1f} %" for v in row.values()) + " |")
    return "\n".join(lines)


# ---- the whole bench -----------------------------------------------------------------------------------


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    with contextlib.ExitStack() as stack:
        workdir = (
            Path(args.workdir) if args.workdir else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        )
        opts = Options(
            time_scale=args.time_scale,
            step_s=args.step_s,
            checkpoint_min=args.checkpoint_min,
            api_workers=args.api_workers,
            loop_interval_s=args.loop_interval_s,
            startup_s=args.startup_s,
            seed=args.seed,
            workdir=workdir,
            ranks_per_host=args.ranks_per_host,
            beats_per_request=args.beats_per_request,
            keep_db=args.keep_db,
            quiet=args.quiet,
        )
        phases = []
        if args.fleet_hosts:
            faults = args.fleet_faults.split(",") if args.fleet_faults else []
            phases.append(
                PhaseSpec(
                    name="fleet",
                    runs=1,
                    hosts_per_run=args.fleet_hosts,
                    spares=max(4, args.fleet_hosts // 64),
                    duration_s=args.fleet_max_s,
                    faults=faults,
                    sequential=True,
                    progress_steps=args.progress_steps,
                )
            )
        rng = random.Random(args.seed)
        for runs in args.runs:
            kinds = rng.choices(
                list(FAILURE_MIX), list(FAILURE_MIX.values()), k=math.ceil(runs * args.faults_per_run)
            )
            phases.append(
                PhaseSpec(
                    name=f"runs{runs}",
                    runs=runs,
                    hosts_per_run=args.run_hosts,
                    spares=max(2, runs * args.run_hosts // 10),
                    duration_s=args.phase_s,
                    faults=kinds,
                    sequential=False,
                )
            )
        results = [Phase(spec, opts).run() for spec in phases]
        return summarize(results, opts, args)


def summarize(results: Sequence[dict[str, Any]], opts: Options, args: argparse.Namespace) -> dict[str, Any]:
    failures = [f for r in results for f in r["failures"]]
    costs = class_costs(failures)
    detection: dict[str, Any] = {}
    for kind in FAILURE_WORDS:
        seen = [f for f in failures if f["kind"] == kind and "detect_s" in f]
        if seen:
            detection[kind] = {
                "n": len(seen),
                "detected_as": sorted({str(f["detected_as"]) for f in seen}),
                "wall_detect_s_median": statistics.median(f["detect_s"] for f in seen),
                "reaction_s_median": statistics.median(f["reaction_s"] for f in seen),
                "reaction_s_max": max(f["reaction_s"] for f in seen),
                "fleet_detect_s_median": statistics.median(f["fleet_detect_s"] for f in seen),
                "decision_s_median": statistics.median(
                    f["decision_s"] for f in seen if f.get("decision_s") is not None
                )
                if any(f.get("decision_s") is not None for f in seen)
                else None,
                "wasted_relaunches": [f.get("wasted_relaunches") for f in seen],
            }
    scaling = {}
    for r in results:
        if r["phase"].startswith("runs"):
            scaling[str(r["runs"])] = {
                "pass_s_mean": r["orchestrator"]["pass_s_mean"],
                "pass_s_per_run": r["orchestrator"]["pass_s_per_run"],
                "cpu_s_per_pass": r["orchestrator"]["cpu_s_per_pass"],
                "cpu_s_per_pass_per_run": r["orchestrator"]["cpu_s_per_pass_per_run"],
            }
    if len(scaling) >= 2:
        keys = sorted(scaling, key=int)
        base, top = scaling[keys[0]], scaling[keys[-1]]
        if base["pass_s_per_run"] and top["pass_s_per_run"]:
            scaling["per_run_pass_ratio"] = top["pass_s_per_run"] / base["pass_s_per_run"]
        if base["cpu_s_per_pass_per_run"] and top["cpu_s_per_pass_per_run"]:
            scaling["per_run_cpu_ratio"] = top["cpu_s_per_pass_per_run"] / base["cpu_s_per_pass_per_run"]
    gpus = (args.fleet_hosts or args.run_hosts) * opts.ranks_per_host
    # a divergence loses the steps from its restore point (before the onset, OPT's rule) to its detection:
    # measured in the live phase; without a measurement, half a checkpoint interval plus its detection
    rolled_back = [
        f["rolled_back_steps"] for f in failures if f["kind"] == "diverge" and "rolled_back_steps" in f
    ]
    rollback = (
        statistics.median(rolled_back) * opts.step_s
        if rolled_back
        else checkpoint_steps(opts) * opts.step_s / 2 + costs.get("diverge", ClassCost(0, 0, 1, 0)).detect_s
    )
    false_actions = [fa for r in results for fa in r["false_actions"]]
    return {
        "command": " ".join(sys.argv),
        "time_scale": opts.time_scale,
        "step_s": opts.step_s,
        "checkpoint_min": opts.checkpoint_min,
        "week_checkpoint_min": args.week_checkpoint_min,
        "api_workers": opts.api_workers,
        "beats_per_request": opts.beats_per_request or "one host's",
        "phases": list(results),
        "false_actions": false_actions,
        "false_actions_total": len(false_actions),
        "detection": detection,
        "class_costs": {k: asdict(v) for k, v in costs.items()},
        "scaling": scaling,
        **week_report(costs, gpus=gpus, divergence_rollback_s=rollback, args=args),
    }


def week_report(
    costs: Mapping[str, ClassCost], *, gpus: int, divergence_rollback_s: float, args: argparse.Namespace
) -> dict[str, Any]:
    """What the measured per-class costs mean for a fleet: the simulated week at 60, 120 and 300 s of
    start-up, and docs/goodput.md's table of expected ETTR per checkpoint interval."""
    ettr = {
        f"L={startup:g}s": week_timeline(
            costs,
            gpus=gpus,
            startup_s=startup,
            checkpoint_s=args.week_checkpoint_min * 60,
            save_stall_s=SimParams.save_stall_s,
            val_every_s=0.0,  # validation is the recipe's choice, not a cost of failures (docs/goodput.md)
            val_s=0.0,
            divergences=2,
            divergence_rollback_s=divergence_rollback_s,
            deep_check_s=args.deep_check_s,
            seed=args.seed,
        )
        for startup in (60.0, 120.0, 300.0)
    }
    return {
        "ettr_week": {"gpus": gpus, "divergence_rollback_s": divergence_rollback_s, **ettr},
        "fleet_table": fleet_table(costs, deep_check_s=args.deep_check_s),
    }


def from_costs(args: argparse.Namespace) -> dict[str, Any]:
    """The week and the fleet table again from recorded per-class costs, without the live phases: a report
    written by `--json`, or a file with the same `class_costs` and `ettr_week` (gpus, divergence_rollback_s)
    sections (bench/recorded/)."""
    recorded = json.loads(Path(args.from_costs).read_text())
    costs = {kind: ClassCost(**cost) for kind, cost in recorded["class_costs"].items()}
    week = recorded["ettr_week"]
    return {
        "from_costs": args.from_costs,
        "week_checkpoint_min": args.week_checkpoint_min,
        "class_costs": recorded["class_costs"],
        **week_report(
            costs, gpus=week["gpus"], divergence_rollback_s=week["divergence_rollback_s"], args=args
        ),
    }


def render(report: Mapping[str, Any]) -> str:
    lines = [
        f"fleet simulator: time scale {report['time_scale']:g} (step {report['step_s']:g} s fleet), "
        f"checkpoints every {report['checkpoint_min']:g} min, API workers {report['api_workers']}, "
        f"beats per heartbeat request: {report['beats_per_request']}",
        "",
        f"{'phase':<8} {'runs':>4} {'ranks':>6} {'wall s':>7} {'passes':>6} {'pass mean':>9} {'p50':>7}"
        f" {'p99':>7}"
        f" {'cpu/pass':>8} {'pass/run':>8} {'cpu/pass/run':>12}",
    ]

    def f(x: float | None, spec: str = ".3f") -> str:
        return "-" if x is None else format(x, spec)

    for r in report["phases"]:
        o = r["orchestrator"]
        lines.append(
            f"{r['phase']:<8} {r['runs']:>4} {r['ranks']:>6} {r['wall_s']:>7.0f} {o['passes']:>6} "
            f"{f(o['pass_s_mean']):>9} {f(o['pass_s_p50']):>7} {f(o['pass_s_p99']):>7} "
            f"{f(o['cpu_s_per_pass']):>8} "
            f"{f(o['pass_s_per_run'], '.4f'):>8} {f(o['cpu_s_per_pass_per_run'], '.4f'):>12}"
        )
    scaling = report["scaling"]
    if "per_run_pass_ratio" in scaling:
        lines.append(
            f"per-run pass time, most runs / fewest: {scaling['per_run_pass_ratio']:.2f}x; "
            f"per-run CPU per pass: {scaling.get('per_run_cpu_ratio', float('nan')):.2f}x (flat = 1)"
        )
    lines += ["", "API load (client side; server histogram)"]
    for r in report["phases"]:
        for route, a in r["api"].items():
            if not a["requests"]:
                continue
            lines.append(
                f"  {r['phase']:<8} {route:<11} {a['requests_per_s']:>7.1f} req/s "
                f"{a['items_per_s']:>8.1f} items/s "
                f"p50 {f(a['client_p50_ms'], '.1f')} ms p99 {f(a['client_p99_ms'], '.1f')} ms; "
                f"server p50 {f(a['server_p50_ms'], '.1f')} p99 {f(a['server_p99_ms'], '.1f')} ms; "
                f"{a['statuses']}"
            )
    lines += [
        "",
        "detection per failure class (wall: measured; fleet: evidence wait / time scale + reaction)",
    ]
    for kind, d in report["detection"].items():
        lines.append(
            f"  {kind:<12} n={d['n']} as {','.join(d['detected_as'])}: "
            f"wall {d['wall_detect_s_median']:.1f} s, "
            f"reaction {d['reaction_s_median']:.2f} s (max {d['reaction_s_max']:.2f}), "
            f"fleet {d['fleet_detect_s_median']:.1f} s; "
            f"decision {f(d['decision_s_median'], '.1f')} s; wasted relaunches {d['wasted_relaunches']}"
        )
    lines += [
        "",
        f"false actions: {report['false_actions_total']}",
        *(f"  {fa}" for fa in report["false_actions"]),
    ]
    return "\n".join([*lines, "", render_week(report)])


def render_week(report: Mapping[str, Any]) -> str:
    week = report["ettr_week"]
    deep = next(v["deep_check_s"] for k, v in week.items() if k.startswith("L="))
    lines = [
        f"ETTR of a simulated week on {week['gpus']} GPUs (Llama 3 failure rate and mix, 2 divergences, "
        f"checkpoints every {report['week_checkpoint_min']:g} min, deep check before relaunching after "
        f"{'/'.join(DEEP_CHECK_KINDS)} faults charged {deep:g} s):",
    ]
    for key, value in week.items():
        if key.startswith("L="):
            lines.append(
                f"  start-up {key[2:]:>5}: ETTR {value['ettr'] * 100:.2f}%  failures {value['failures']}  "
                f"lost h {json.dumps({k: round(v, 2) for k, v in value['lost_h'].items()})}"
                + (
                    f"  (worst measured class charged for {value['charged_worst_class']})"
                    if value["charged_worst_class"]
                    else ""
                )
                + f"  ({value['failures_during_restart']} during a restart)"
            )
    return "\n".join([*lines, "", render_fleet_table(report["fleet_table"])])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--fleet-hosts", type=int, default=1024, help="hosts of the one big run (0: none)")
    parser.add_argument(
        "--fleet-faults",
        default="crash,gpu,hang,diverge,host,maintenance,diverge",
        help="the big run's faults, one after the other (gpu, host, crash, hang, maintenance, diverge)",
    )
    parser.add_argument(
        "--fleet-max-s", type=float, default=900.0, help="wall-time cap of the big run's phase"
    )
    parser.add_argument(
        "--progress-steps", type=int, default=6, help="steps between recovery and the next fault"
    )
    parser.add_argument("--ranks-per-host", type=int, default=GPUS_PER_HOST)
    parser.add_argument(
        "--beats-per-request",
        type=int,
        default=0,
        help="0: each host sends its ranks' beats (the default); N: a relay packs hosts up to N beats",
    )
    parser.add_argument(
        "--runs", type=int, nargs="*", default=[1, 10, 100], help="concurrent smaller runs, per phase"
    )
    parser.add_argument("--run-hosts", type=int, default=4, help="hosts per smaller run")
    parser.add_argument(
        "--faults-per-run", type=float, default=0.5, help="faults per smaller run (Llama 3 mix)"
    )
    parser.add_argument("--phase-s", type=float, default=150.0, help="wall time of each smaller-runs phase")
    parser.add_argument(
        "--time-scale", type=float, default=0.25, help="wall seconds per fleet second of the trainer"
    )
    parser.add_argument("--step-s", type=float, default=14.0, help="fleet step time (s)")
    parser.add_argument(
        "--startup-s", type=float, default=60.0, help="simulated start-up per attempt (fleet s)"
    )
    parser.add_argument(
        "--checkpoint-min", type=float, default=10.0, help="fleet minutes between checkpoints"
    )
    parser.add_argument(
        "--week-checkpoint-min",
        type=float,
        default=10.0,
        help="fleet minutes between checkpoints in the week",
    )
    parser.add_argument(
        "--deep-check-s",
        type=float,
        default=DEEP_CHECK_S,
        help="what the week charges for the deep check before relaunching after a hardware failure "
        "(default: its deadline, an upper bound; the live phases run without it)",
    )
    parser.add_argument(
        "--from-costs",
        help="no live phases: the week and the fleet table from the class costs of a report (--json) or "
        "of a recorded file (bench/recorded/)",
    )
    parser.add_argument("--api-workers", type=int, default=3)
    parser.add_argument("--loop-interval-s", type=float, default=1.0, help="the orchestrator's loop interval")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workdir", help="keep the phases' files here (default: a temporary directory)")
    parser.add_argument("--keep-db", action="store_true", help="do not drop the phases' databases")
    parser.add_argument("--json", help="also write the report as JSON to this file")
    parser.add_argument("--quiet", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    # a SIGTERM unwinds like Ctrl-C: every phase's finally stops its processes and drops its database
    signal.signal(signal.SIGTERM, lambda _signum, _frame: sys.exit(128 + signal.SIGTERM))
    if args.from_costs:
        report = from_costs(args)
        print(render_week(report), flush=True)
    else:
        report = run_bench(args)
        print(render(report), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))
    return report


if __name__ == "__main__":
    main()
