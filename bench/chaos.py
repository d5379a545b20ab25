"""Chaos benchmark: one training run, one fault schedule, two supervisors, side by side.

    PYTHONPATH=. .venv/bin/python bench/chaos.py [--quick] [--workdir runs/chaos] [--json results.json]

Supervisors, run one after the other in this invocation:

* **trainops**: the whole stack in this process, as `service/demo.py` assembles it (control plane on SQLite
  behind uvicorn, three registered simulated hosts with fake NVML GPUs, the embedded health beat, the
  orchestrator thread with the local torchrun launcher); the run asks for 2 hosts, so one is a spare.
* **torchrun**: plain `torchrun --max-restarts=N -m trainer.train ... --resume-from latest`, what a user
  would otherwise pick: it restarts the whole worker group from the newest checkpoint whenever a worker
  fails, and notices a hang only when the process group times out (`--pg-timeout-s`).

Both get the same trainer flags and the same faults, through `TRAINOPS_FAULTS` (faults belong to the
environment, not to the supervisor), and the faults behave like the real thing under both
(`trainer/faults.py`): the crash and the hang are transient (`once`: first time the run reaches the step),
the bad host (`host_crash`) kills every rank placed on it at or after its step on every attempt until it is
taken out of the job, and the divergence (`diverge ... unless_lr_scale_below=1.0`) recurs at its step on
every restart unless the LR scale was cut. For trainops the bad host's GPU also shows a double-bit ECC error
in fake NVML from the moment it first kills a rank, so the health sweep can find and cordon it; plain
torchrun has no notion of hosts and keeps placing ranks on it.

Measured per supervisor, all from the run directory's files and process observations, the same way for both
(trainops's own goodput from `compute_goodput` is printed too): reached target, wall time to target,
goodput, steps recomputed, per-fault detection and recovery, final validation loss and activation norm.
Definitions are in docs/benchmarks.md ("Chaos (trainops vs torchrun)").
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from service.demo import register_simulated_hosts, simulated_fleet_env, start_api_in_thread, write_fake_nvml

HOSTS = ("chaos-h1", "chaos-h2", "chaos-h3")  # trainops: 2 in use + 1 spare
BAD_HOST = "chaos-h2"  # the second host of the first placement (rank 1 runs there under both supervisors)
GPUS_PER_HOST = 2
RUN_NAME = "opt-chaos"
# PyTorch's own process-group timeouts, for the record: NCCL 10 min (torch.distributed.constants
# default_pg_nccl_timeout), gloo 30 min (default_pg_timeout); the issue quotes 480-600 s as what on-call
# saw. The bench uses a smaller value so one invocation fits in minutes; it is the same flag for both.
TORCH_DEFAULT_NCCL_TIMEOUT_S = 600


@dataclass(frozen=True, kw_only=True)
class Scenario:
    name: str
    target_steps: int
    checkpoint_interval: int
    crash_step: int
    hang_step: int
    diverge_step: int
    bad_host_step: int
    pg_timeout_s: float
    torchrun_max_restarts: int
    val_interval: int
    timeout_s: float

    def fault_specs(self) -> list[str]:
        return [
            f"crash:step={self.crash_step},rank=1,once",
            f"hang:step={self.hang_step},rank=1,once",
            f"diverge:step={self.diverge_step},factor=100,unless_lr_scale_below=1.0",
            f"host_crash:host={BAD_HOST},step={self.bad_host_step}",
        ]

    def schedule(self) -> list[tuple[int, str]]:
        """(step, fault) in training order; a failure is attributed to the latest fault at or before the
        step that was running when it struck."""
        return sorted(
            [
                (self.crash_step, "crash"),
                (self.hang_step, "hang"),
                (self.diverge_step, "divergence"),
                (self.bad_host_step, "bad host"),
            ]
        )

    def trainer_flags(self, run_dir: Path) -> list[str]:
        return [
            "--preset",
            "tiny",
            "--max-steps",
            str(self.target_steps),
            "--checkpoint-interval",
            str(self.checkpoint_interval),
            "--precision",
            "fp16",
            "--run-dir",
            str(run_dir),
            *self.shared_hyperparameter_flags(),
        ]

    def hyperparameters(self) -> dict[str, float | int]:
        # keep enough checkpoints that OPT's rollback rule has candidates before the divergence onset
        return {"keep_checkpoints": 8, "val_interval": self.val_interval, "pg_timeout_s": self.pg_timeout_s}

    def shared_hyperparameter_flags(self) -> list[str]:
        flags = []
        for key, value in self.hyperparameters().items():
            flags += ["--" + key.replace("_", "-"), str(value)]
        return flags


# Fault steps sit where the fault-free run's final-layer activation norm is flat (tiny preset, seed 1234),
# so OPT's restart rule finds a checkpoint to roll the divergence back to.
FULL = Scenario(
    name="full",
    target_steps=200,
    checkpoint_interval=10,
    crash_step=35,
    hang_step=80,
    diverge_step=140,
    bad_host_step=170,
    pg_timeout_s=60.0,
    torchrun_max_restarts=5,
    val_interval=50,
    timeout_s=900.0,
)
# The same schedule spread over 14x the steps: four failures in ~2,800 steps (~12 min of training here), so a
# failure's fixed costs (detection, a relaunch's Python/torch start-up, recomputation) weigh as they would
# between failures that are hours apart on a real fleet. Checkpoints every 25 steps.
LONG = Scenario(
    name="long",
    target_steps=2800,
    checkpoint_interval=25,
    crash_step=490,
    hang_step=1120,
    diverge_step=1960,
    bad_host_step=2380,
    pg_timeout_s=60.0,
    torchrun_max_restarts=5,
    val_interval=400,
    timeout_s=3000.0,
)
QUICK = Scenario(
    name="quick",
    target_steps=120,
    checkpoint_interval=10,
    crash_step=15,
    hang_step=40,
    diverge_step=100,
    bad_host_step=110,
    pg_timeout_s=30.0,
    torchrun_max_restarts=3,
    val_interval=40,
    timeout_s=600.0,
)


# ---- what both supervisors are measured by -----------------------------------------------------------


@dataclass
class FailureTiming:
    fault: str  # the scheduled fault it is attributed to
    classified_as: str  # what the supervisor called it ("worker failure" for torchrun)
    last_step: int | None
    detect_s: float | None  # last step progress -> the supervisor noticed (trainops) / tore the group down
    recover_s: float | None  # noticed -> the first step of the next attempt completed
    startup_s: float | None  # next attempt's processes started -> its first step completed


@dataclass
class SupervisorResult:
    supervisor: str
    reached_target: bool
    final_step: int | None
    wall_s: float  # supervisor start -> end (completion, or giving up)
    time_to_target_s: float | None
    goodput: float | None
    productive_s: float
    steps_recomputed: int
    attempts: int
    final_val_loss: float | None
    final_val_step: int | None
    final_act_norm: float | None
    failures: list[FailureTiming] = field(default_factory=list)
    lost_s: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def read_rows(run_dir: Path) -> list[dict[str, Any]]:
    """Rank 0's metric rows in the order written (a re-run step appears again, later in the file)."""
    path = run_dir / "metrics" / "rank0.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def lineage(rows: Sequence[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Per step, the row of the attempt that computed it last: the surviving history."""
    surviving: dict[int, dict[str, Any]] = {}
    for row in rows:
        surviving[int(row["step"])] = row
    return surviving


def goodput_from_rows(
    rows: Sequence[dict[str, Any]], wall_s: float, failures: Sequence[FailureTiming]
) -> tuple[float | None, float, int, dict[str, float]]:
    """compute_goodput's definition over the metrics file: productive = step times of the surviving lineage,
    goodput = productive / wall; lost split into recomputed steps, detection, restart downtime, other."""
    surviving = lineage(rows)
    productive = sum(float(r["step_time_s"]) for r in surviving.values())
    recomputed_s = sum(float(r["step_time_s"]) for r in rows) - productive
    lost = {
        "recomputed_steps_s": recomputed_s,
        "detection_delay_s": sum(f.detect_s or 0.0 for f in failures),
        "restart_downtime_s": sum(f.recover_s or 0.0 for f in failures),
    }
    lost["other_s"] = max(0.0, wall_s - productive - sum(lost.values()))
    goodput = productive / wall_s if wall_s > 0 else None
    return goodput, productive, len(rows) - len(surviving), {k: round(v, 1) for k, v in lost.items()}


def final_values(rows: Sequence[dict[str, Any]]) -> tuple[int | None, float | None, int | None, float | None]:
    """(final step, last validation loss, its step, final activation norm) along the surviving lineage."""
    surviving = lineage(rows)
    if not surviving:
        return None, None, None, None
    final = max(surviving)
    validated = [s for s, r in surviving.items() if r["values"].get("val_loss") is not None]
    val_step = max(validated) if validated else None
    val_loss = surviving[val_step]["values"]["val_loss"] if val_step is not None else None
    return final, val_loss, val_step, surviving[final].get("act_norm")


def attribute(schedule: Sequence[tuple[int, str]], last_step: int | None) -> str:
    running = (last_step or 0) + 1  # the step in flight when the failure struck
    before = [name for step, name in schedule if step <= running]
    return before[-1] if before else "unscheduled"


# ---- trainops ---------------------------------------------------------------------------------------


class BadHostWatcher:
    """Plants the bad host's double-bit ECC error in fake NVML the moment the trainer logs that the host
    killed a rank (the `host_crash` fault firing): the hardware shows the fault when it strikes."""

    def __init__(self, home: Path, log_path: Path) -> None:
        self.home = home
        self.log_path = log_path
        self.planted_at: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="chaos-bad-host", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _watch(self) -> None:
        needle = f"fault: host {BAD_HOST} failed".encode()
        offset = 0
        while not self._stop.wait(0.1):
            try:
                with self.log_path.open("rb") as f:
                    f.seek(offset)
                    chunk = f.read()
            except OSError:
                continue
            # only whole lines: a line being written is read again next time
            complete = chunk[: chunk.rfind(b"\n") + 1]
            offset += len(complete)
            if needle in complete:
                write_fake_nvml(
                    self.home,
                    HOSTS,
                    {BAD_HOST: [{"gpu": 1, "kind": "ecc_dbe", "count": 1}]},
                    gpus_per_host=GPUS_PER_HOST,
                )
                self.planted_at = time.time()
                return


def run_trainops(scenario: Scenario, workdir: Path) -> tuple[SupervisorResult, dict[str, Any]]:
    home = workdir / "trainops"
    shutil.rmtree(home, ignore_errors=True)
    (home / "diskcheck").mkdir(parents=True)
    os.environ.update(simulated_fleet_env(home, gpus_per_host=GPUS_PER_HOST))
    write_fake_nvml(home, HOSTS, {}, gpus_per_host=GPUS_PER_HOST)

    import sqlalchemy as sa

    from service import migrate
    from service.config import Settings
    from service.crud.runs import create_run
    from service.db import engine_from_settings, make_session_factory, transaction
    from service.models import Attempt, LogEntry, Node, Run
    from service.orchestrator.loop import Orchestrator
    from service.orchestrator.runtime import (
        available_launchers,
        build_health_gateway,
        start_embedded_beat,
        start_in_thread,
    )
    from service.paging import make_pager
    from service.readmodels.goodput import compute_goodput
    from service.recovery.config import load_orchestrator_config
    from service.schemas import RunConfig

    settings = Settings(home=home, api_port=_free_port())
    migrate.upgrade(settings.resolved_database_url)
    factory = make_session_factory(engine_from_settings(settings))
    server = start_api_in_thread(settings, factory)
    register_simulated_hosts(factory, HOSTS, gpus_per_host=GPUS_PER_HOST, author="user:chaos")
    with transaction(factory) as session:
        config = RunConfig(
            preset="tiny",
            target_steps=scenario.target_steps,
            checkpoint_interval=scenario.checkpoint_interval,
            host_count=2,
            precision="fp16",
            hyperparameters=scenario.hyperparameters(),
        )
        run_id = create_run(
            session,
            name=RUN_NAME,
            owner="chaos",
            config=config.model_dump(mode="json"),
            start=True,
            author="user:chaos",
        ).id

    cfg = load_orchestrator_config(settings, loop_interval_s=0.5)
    run_dir = Path(cfg.runs_dir).resolve() / RUN_NAME
    run_dir.mkdir(parents=True, exist_ok=True)
    watcher = BadHostWatcher(home, run_dir / "trainer.log")
    watcher.start()
    stop_beat = threading.Event()
    start_embedded_beat(settings, factory, interval_s=3.0, stop=stop_beat)
    orchestrator = Orchestrator(
        factory,
        cfg,
        launchers=available_launchers(settings),
        health=build_health_gateway(settings, factory),
        pager=make_pager(settings),
        # the faults are the environment's, identical to what torchrun's workers get
        trainer_env={
            "TRAINOPS_API_URL": cfg.api_url or "",
            "TRAINOPS_FAULTS": ";".join(scenario.fault_specs()),
        },
    )
    started = time.time()
    start_in_thread(orchestrator)
    phase = "pending"
    while time.time() - started < scenario.timeout_s:
        with transaction(factory) as session:
            run = session.get(Run, run_id)
            assert run is not None
            phase = run.phase.value
        if phase in ("completed", "needs_attention", "failed", "stopped"):
            break
        time.sleep(0.5)
    ended = time.time()
    orchestrator.stop()
    stop_beat.set()
    watcher.stop()

    rows = read_rows(run_dir)
    first_row_of: dict[int, dict[str, Any]] = {}
    for row in rows:
        first_row_of.setdefault(int(row["attempt"]), row)
    schedule = scenario.schedule()
    with transaction(factory) as session:
        official = compute_goodput(session, run_id=run_id).as_dict()
        attempts = list(
            session.scalars(sa.select(Attempt).where(Attempt.run_id == run_id).order_by(Attempt.number))
        )
        failures: list[FailureTiming] = []
        for a, nxt in zip(attempts, [*attempts[1:], None], strict=True):
            outcome = a.exit_reason or "running"
            if outcome in ("completed", "running", "stopped"):
                continue
            detected = a.detected_at.timestamp() if a.detected_at else None
            progress = a.last_progress_at.timestamp() if a.last_progress_at else None
            fault = attribute(schedule, a.last_step)
            onset = (a.findings or {}).get("onset_step")
            if fault == "divergence":
                # A diverging run keeps making steps, so "last progress" says nothing: time the detection
                # from the end of the first step trained at the blown-up LR.
                first_bad = next(
                    (r for r in rows if r["attempt"] == a.number and r["step"] == scenario.diverge_step), None
                )
                progress = first_bad["time"] if first_bad else progress
            first_new = first_row_of.get(nxt.number) if nxt is not None else None
            failures.append(
                FailureTiming(
                    fault=fault,
                    classified_as=outcome
                    + (f", onset step {onset}, noticed after step {a.last_step}" if onset else ""),
                    last_step=a.last_step,
                    detect_s=_diff(detected, progress),
                    recover_s=_diff(first_new["time"] if first_new else None, detected),
                    startup_s=_diff(
                        first_new["time"] if first_new else None,
                        nxt.started_at.timestamp() if nxt is not None else None,
                    ),
                )
            )
        cordoned = session.scalar(sa.select(Node).where(Node.hostname == BAD_HOST))
        cordon_note = (
            f"{BAD_HOST} is {cordoned.state.value}"
            + (
                f", {cordoned.state_changed_at.timestamp() - watcher.planted_at:.1f} s after it first "
                "killed a rank (its ECC error appeared then)"
                if watcher.planted_at is not None
                else ""
            )
            + f": {cordoned.state_reason}"
            if cordoned is not None
            else ""
        )
        hosts_by_attempt = [f"{a.number}:{','.join(a.hosts)}" for a in attempts]
        decisions = [
            e.message
            for e in session.scalars(
                sa.select(LogEntry).where(LogEntry.run_id == run_id).order_by(LogEntry.id)
            )
            if e.message.startswith("attempt ")
        ]
    server.should_exit = True

    final, val_loss, val_step, act_norm = final_values(rows)
    surviving = lineage(rows)
    reached = phase == "completed" and final == scenario.target_steps
    _, productive_files, recomputed_files, lost_files = goodput_from_rows(rows, official["wall_s"], failures)
    result = SupervisorResult(
        supervisor="trainops",
        reached_target=reached,
        final_step=final,
        wall_s=round(ended - started, 1),
        time_to_target_s=round(surviving[scenario.target_steps]["time"] - started, 1) if reached else None,
        goodput=official["goodput"],
        productive_s=official["productive_s"],
        steps_recomputed=official["steps_recomputed"],
        attempts=official["attempts"],
        final_val_loss=val_loss,
        final_val_step=val_step,
        final_act_norm=act_norm,
        failures=failures,
        lost_s=official["lost"],
        notes=[
            f"run phase: {phase}",
            f"hosts per attempt: {' '.join(hosts_by_attempt)}",
            cordon_note,
            f"metrics-file cross-check: productive {productive_files:.1f} s, "
            f"{recomputed_files} steps recomputed",
            *decisions,
        ],
    )
    return result, {"compute_goodput": official, "files_lost_s": lost_files}


def _diff(a: float | None, b: float | None) -> float | None:
    return round(a - b, 2) if a is not None and b is not None else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---- plain torchrun ---------------------------------------------------------------------------------


class WorkerWatcher:
    """Polls torchrun's child processes (its workers) every 0.1 s: when each worker group started and when
    the last of its processes was gone (torchrun noticed the failure and tore the group down)."""

    def __init__(self, parent_pid: int) -> None:
        self.parent_pid = parent_pid
        self.seen: dict[int, list[float]] = {}  # pid -> [first seen, last seen]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="chaos-workers", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _children(self) -> list[int]:
        found = []
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/stat") as f:
                    after_name = f.read().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(after_name[1]) == self.parent_pid and after_name[0] != "Z":
                found.append(int(entry.name))
        return found

    def _watch(self) -> None:
        while not self._stop.is_set():
            now = time.time()
            for pid in self._children():
                self.seen.setdefault(pid, [now, now])[1] = now
            self._stop.wait(0.1)

    def groups(self) -> list[tuple[float, float]]:
        """(started, torn down) per worker group: a group's processes all start before any of them ends."""
        spans = sorted(self.seen.values())
        groups: list[list[float]] = []
        for first, last in spans:
            if groups and first <= groups[-1][1]:
                groups[-1][1] = max(groups[-1][1], last)
            else:
                groups.append([first, last])
        return [(a, b) for a, b in groups]


def run_torchrun(scenario: Scenario, workdir: Path) -> tuple[SupervisorResult, dict[str, Any]]:
    run_dir = (workdir / "torchrun" / RUN_NAME).resolve()
    shutil.rmtree(run_dir.parent, ignore_errors=True)
    run_dir.mkdir(parents=True)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",  # the `torchrun` console script's module
        "--nnodes",
        "1",
        "--nproc-per-node",
        "2",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"127.0.0.1:{_free_port()}",
        "--max-restarts",
        str(scenario.torchrun_max_restarts),
        "-m",
        "trainer.train",
        *scenario.trainer_flags(run_dir),
        "--resume-from",
        "latest",
    ]
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("TRAINOPS_")},
        "TRAINOPS_HOSTS": ",".join(HOSTS[:2]),  # the same placement as trainops's first attempt
        "TRAINOPS_FAULTS": ";".join(scenario.fault_specs()),
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
        "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
    }
    (run_dir.parent / "command.json").write_text(json.dumps(command))
    started = time.time()
    with (run_dir.parent / "torchrun.log").open("wb") as out:
        proc = subprocess.Popen(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        watcher = WorkerWatcher(proc.pid)
        watcher.start()
        try:
            code = proc.wait(timeout=scenario.timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            code = proc.wait()
    ended = time.time()
    watcher.stop()

    rows = read_rows(run_dir)
    groups = watcher.groups()
    schedule = scenario.schedule()

    def rows_in(group: tuple[float, float]) -> list[dict[str, Any]]:
        return [r for r in rows if group[0] <= r["time"] <= group[1] + 0.5]

    failures: list[FailureTiming] = []
    for i, group in enumerate(groups):
        mine = rows_in(group)
        is_last = i == len(groups) - 1
        if is_last and code == 0:
            break
        nxt = groups[i + 1] if not is_last else None
        next_rows = rows_in(nxt) if nxt is not None else []
        last_row = mine[-1] if mine else None
        failures.append(
            FailureTiming(
                fault=attribute(schedule, last_row["step"] if last_row else None),
                classified_as="worker failure" + ("" if nxt is not None else f" (gave up, exit {code})"),
                last_step=last_row["step"] if last_row else None,
                detect_s=_diff(group[1], last_row["time"] if last_row else None),
                recover_s=_diff(next_rows[0]["time"] if next_rows else None, group[1]),
                startup_s=_diff(next_rows[0]["time"] if next_rows else None, nxt[0] if nxt else None),
            )
        )
    wall = ended - started
    goodput, productive, recomputed, lost = goodput_from_rows(rows, wall, failures)
    final, val_loss, val_step, act_norm = final_values(rows)
    surviving = lineage(rows)
    reached = code == 0 and final == scenario.target_steps
    result = SupervisorResult(
        supervisor="torchrun",
        reached_target=reached,
        final_step=final,
        wall_s=round(wall, 1),
        time_to_target_s=round(surviving[scenario.target_steps]["time"] - started, 1) if reached else None,
        goodput=round(goodput, 4) if goodput is not None else None,
        productive_s=round(productive, 1),
        steps_recomputed=recomputed,
        attempts=len(groups),
        final_val_loss=val_loss,
        final_val_step=val_step,
        final_act_norm=act_norm,
        failures=failures,
        lost_s=lost,
        notes=[
            f"torchrun exit code {code}; --max-restarts {scenario.torchrun_max_restarts}; "
            f"--pg-timeout-s {scenario.pg_timeout_s:g} (PyTorch's default: NCCL "
            f"{TORCH_DEFAULT_NCCL_TIMEOUT_S} s, gloo 1800 s)",
        ],
    )
    return result, {"command": command}


# ---- report -----------------------------------------------------------------------------------------


def _fmt(value: float | None, spec: str = ".1f", suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def per_fault(result: SupervisorResult, fault: str) -> str:
    hits = [f for f in result.failures if f.fault == fault]
    if not hits:
        return "not noticed" if fault == "divergence" else "-"
    parts = []
    for f in hits:
        recover = _fmt(f.recover_s, ".1f", " s") if f.recover_s is not None else "none"
        parts.append(f"{_fmt(f.detect_s, '.1f', ' s')} / {recover}")
    return "; ".join(parts)


def _ratio_lines(scenario: Scenario, a: SupervisorResult, b: SupervisorResult) -> list[str]:
    lines = ["", "Ratios (trainops vs torchrun):"]
    if a.goodput and b.goodput:
        caveat = "" if b.reached_target else " (torchrun's is over a run that gave up before the target)"
        lines.append(f"  goodput {a.goodput / b.goodput:.2f}x{caveat}")
    if a.time_to_target_s and b.time_to_target_s:
        lines.append(f"  wall time to target {b.time_to_target_s / a.time_to_target_s:.2f}x faster")
    elif a.time_to_target_s:
        lines.append("  wall time to target: torchrun did not reach it")
    for _, fault in scenario.schedule():
        da = _median([f.detect_s for f in a.failures if f.fault == fault])
        db = _median([f.detect_s for f in b.failures if f.fault == fault])
        if da is not None and db is not None:
            lines.append(
                f"  {fault} detection: torchrun {db:.1f} s, trainops {da:.1f} s ({db / max(da, 0.05):.1f}x)"
            )
    return lines


def render(scenario: Scenario, results: Sequence[SupervisorResult]) -> str:
    def row(label: str, cells: Sequence[str]) -> str:
        return f"| {label:<44} | " + " | ".join(f"{c:>26}" for c in cells) + " |"

    lines = [
        f"Chaos scenario '{scenario.name}': tiny preset, 2 ranks, target step {scenario.target_steps}, "
        f"checkpoint every {scenario.checkpoint_interval}; faults: {', '.join(scenario.fault_specs())}",
        "",
        row("", [r.supervisor for r in results]),
        "|" + "-" * 46 + "|" + "|".join("-" * 27 + ":" for _ in results) + "|",
        row(
            "reached target",
            ["yes" if r.reached_target else f"no (stopped at step {r.final_step})" for r in results],
        ),
        row("wall time to target", [_fmt(r.time_to_target_s, ".0f", " s") for r in results]),
        row("supervisor wall time", [_fmt(r.wall_s, ".0f", " s") for r in results]),
        row(
            "goodput (productive / wall)", [_fmt(r.goodput and 100 * r.goodput, ".1f", " %") for r in results]
        ),
        row("productive step time", [_fmt(r.productive_s, ".1f", " s") for r in results]),
        row("steps recomputed", [str(r.steps_recomputed) for r in results]),
        row("attempts (worker groups)", [str(r.attempts) for r in results]),
    ]
    for _, fault in scenario.schedule():
        lines.append(row(f"{fault}: detect / recover", [per_fault(r, fault) for r in results]))
    lines += [
        row(
            "startup per restart (median)",
            [_fmt(_median([f.startup_s for f in r.failures]), ".1f", " s") for r in results],
        ),
        row(
            "final validation loss (step)",
            [f"{_fmt(r.final_val_loss, '.3f')} ({r.final_val_step})" for r in results],
        ),
        row("final-layer activation norm", [_fmt(r.final_act_norm, ".1f") for r in results]),
    ]
    if len(results) > 1:  # with --only-trainops there is no baseline to compare against
        lines += _ratio_lines(scenario, results[0], results[-1])
    for r in results:
        lines += ["", f"{r.supervisor}: lost time {r.lost_s}"]
        lines += [f"  {n}" for n in r.notes if n]
        for f in r.failures:
            lines.append(
                f"  failure at step {f.last_step} -> {f.fault} (classified: {f.classified_as}): detect "
                f"{_fmt(f.detect_s, '.1f', ' s')}, recover {_fmt(f.recover_s, '.1f', ' s')}, "
                f"of which start-up {_fmt(f.startup_s, '.1f', ' s')}"
            )
    lines += [
        "",
        "detect = last step progress -> failure noticed (trainops: detected_at; torchrun: failed worker "
        "group gone); recover = noticed -> first step of the next attempt completed; start-up = next "
        "attempt's processes started -> its first step completed (Python/torch import, rendezvous, model "
        "build, checkpoint load, one step).",
    ]
    return "\n".join(lines)


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


# ---- the fleet-scale extrapolation from this run's 2-rank costs ------------------------------------------
# docs/goodput.md's table takes the fleet simulator's costs at 8,192 ranks instead (bench/fleet_sim.py
# `fleet_table`, which uses `ettr` below).

# Llama 3 (Dubey et al., 2024): 419 unexpected interruptions in a 54-day snapshot of 16,384 H100s.
FLEET_MTBF_S = 54 * 24 * 3600 / 419  # one failure every ~3.1 h
# Assumption: an async save blocks the loop only for the device-to-host copy of each GPU's shard.
FLEET_CHECKPOINT_STALL_S = 2.0


def ettr(
    *,
    mtbf_s: float,
    detect_s: float,
    supervisor_s: float,
    startup_s: float,
    checkpoint_interval_s: float,
    checkpoint_stall_s: float,
) -> float:
    """Expected effective-training-time ratio: each failure costs detection, the supervisor's own time
    (back-off, kill, relaunch), the new attempt's start-up and, on average, half a checkpoint interval of
    recomputed work; every checkpoint costs its loop stall."""
    per_failure_s = detect_s + supervisor_s + startup_s + checkpoint_interval_s / 2
    return (1 - checkpoint_stall_s / checkpoint_interval_s) * (1 - per_failure_s / mtbf_s)


def fleet_table(trainops: SupervisorResult) -> str:
    """ETTR on a Llama-3-like fleet from this run's measured detection and supervisor time (divergences
    left out: rarer, and their cost is a deliberate rollback) and assumed start-up at real scale."""
    hardware = [f for f in trainops.failures if f.fault != "divergence"]
    detect = max((f.detect_s or 0.0) for f in hardware) if hardware else 15.0
    supervisor = max(
        ((f.recover_s or 0.0) - (f.startup_s or 0.0) for f in hardware if f.recover_s is not None),
        default=0.0,
    )
    lines = [
        "Fleet extrapolation from this run's costs (docs/goodput.md's table: bench/fleet_sim.py): "
        f"MTBF {FLEET_MTBF_S / 3600:.2f} h, detection {detect:.1f} s "
        f"and supervisor time {supervisor:.1f} s per failure (worst measured above, divergence excluded), "
        f"checkpoint stall {FLEET_CHECKPOINT_STALL_S:g} s",
        "| checkpoint interval | start-up 60 s | start-up 120 s | start-up 300 s |",
        "|---|---:|---:|---:|",
    ]
    for minutes in (2, 3, 5, 10, 30):
        cells = [
            ettr(
                mtbf_s=FLEET_MTBF_S,
                detect_s=detect,
                supervisor_s=supervisor,
                startup_s=startup,
                checkpoint_interval_s=60 * minutes,
                checkpoint_stall_s=FLEET_CHECKPOINT_STALL_S,
            )
            for startup in (60, 120, 300)
        ]
        lines.append(f"| {minutes} min | " + " | ".join(f"{100 * c:.1f} %" for c in cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter smoke run (120 steps, 30 s PG timeout)")
    parser.add_argument(
        "--long", action="store_true", help="the same faults over 2,800 steps (goodput at scale)"
    )
    parser.add_argument(
        "--only-trainops",
        action="store_true",
        help="skip the torchrun baseline (it cannot pass the bad host anyway)",
    )
    parser.add_argument("--workdir", default="runs/chaos", help="run directories and logs (removed first)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    scenario = QUICK if args.quick else LONG if args.long else FULL
    workdir = Path(args.workdir).resolve()
    print(
        f"chaos bench ({scenario.name}): trainops first, then plain torchrun; files under {workdir}",
        flush=True,
    )
    trainops, trainops_extra = run_trainops(scenario, workdir)
    results = [trainops]
    baseline_extra: dict[str, Any] = {}
    if not args.only_trainops:
        print(f"trainops done in {trainops.wall_s:.0f} s; now plain torchrun", flush=True)
        baseline, baseline_extra = run_torchrun(scenario, workdir)
        results.append(baseline)
    print(render(scenario, results))
    print()
    print(fleet_table(trainops))
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "scenario": asdict(scenario),
                    "results": [asdict(r) for r in results],
                    "trainops": trainops_extra,
                    "torchrun": baseline_extra,
                },
                indent=1,
            )
        )
    return 0 if trainops.reached_target else 1


if __name__ == "__main__":
    sys.exit(main())
