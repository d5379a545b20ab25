"""The simulated ranks of one attempt (bench/fleet_sim.py): no torch, one process, asyncio.

The fleet simulator's launcher (`bench.fleet_sim.SimLauncher`, launcher kind `sim`) starts this module where
the local launcher starts torchrun, with the same trainer flags and environment
(docs/reporting-contract.md):

    python -m bench.sim_ranks ATTEMPT_DIR -- --max-steps N --checkpoint-interval C --run-dir D [...]

What every rank does follows the reporting contract exactly; only the arithmetic is simulated:

- training is synchronous, so all ranks of the attempt step together: a step lasts `step_s` x `time_scale`
  seconds with log-normal jitter, each rank's busy time is that step minus its wait in the collective (with a
  little per-rank jitter);
- every rank records its beat (step, time, section, step_time_s, last_step_s, busy_s) in the training loop;
  one reporter task per host sends its ranks' newest beats in one batch request once per the heartbeat
  interval the orchestrator gave the attempt (`TRAINOPS_HEARTBEAT_INTERVAL_S`, as the trainer's relay);
  a hung loop records nothing, so its last beat goes stale;
- rank 0 posts the metric points (the loss and activation-norm curves of a recorded real run, stretched over
  the run's target steps, with a recorded divergence's shape when one is injected) in batches every
  `report_interval_s`, and registers each checkpoint with `trainer.checkpoint.catalog_record`;
- checkpoints are written on disk as the trainer writes them: one DCP shard and one RNG file per rank
  (`shard_bytes` each, sparse; 0 by default), `.metadata`, meta.json; every rank's files hashed by
  `trainer.checkpoint.hash_files` (the per-rank digests), `commit` (manifest, rename, marker), retention;
- sections: `startup` after the simulated load, `checkpoint_save` for the save's stall, `validation` every
  `val_interval` steps for `val_s`;
- exit codes from trainer/contract.py: 0 at the target, 42 on a non-finite loss, 1 when a rank died (torchrun
  reports a failed worker so), 143 when the attempt was terminated (SIGTERM, a scheduler's drain).

Faults come from the simulator's fault file (one JSON object a line, appended by the controller); a fault
fires in the attempt of its run that is running when it was written. Hosts listed in the broken-hosts file
kill their ranks during start-up (a dead GPU stays dead until the host is cordoned). What fired, when, and
every request's latency are written to the attempt directory (`sim_events.jsonl`, `sim_stats.json`) for
the controller's report; `exit.json` holds the exit status (the same file the local launcher's runner
writes).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import httpx

from trainer import contract
from trainer.checkpoint import (
    META,
    apply_retention,
    atomic_write_text,
    catalog_record,
    checkpoint_name,
    commit,
    hash_files,
    read_meta,
)

EXIT_RANK_DIED = 1  # torchrun's exit status when one of its workers failed
EXIT_TERMINATED = 128 + signal.SIGTERM
EXIT_FILE = "exit.json"  # service/orchestrator/runner.py writes the same file for local attempts
EVENTS_FILE = "sim_events.jsonl"
STATS_FILE = "sim_stats.json"
PARAMS_ENV = "TRAINOPS_SIM_PARAMS"
PROCS_PER_HOST_ENV = "TRAINOPS_SIM_PROCS_PER_HOST"
BUSY_HISTORY = 16
STEP_TIME_MEAN_STEPS = 5


@dataclass
class SimParams:
    """How the simulated trainer behaves; the run config's `sim` section (every duration in fleet seconds,
    multiplied by `time_scale` on the wall clock)."""

    faults_file: str
    broken_hosts_file: str
    healthy_curve: str
    diverged_curve: str
    diverged_onset: int  # the recorded step at which the diverged curve leaves the healthy one
    time_scale: float = 1.0
    step_s: float = 14.0
    step_jitter: float = 0.03  # sigma of the log-normal step-to-step jitter
    rank_jitter: float = 0.01  # per-rank busy-time jitter (relative)
    wait_fraction: float = 0.08  # share of a step a typical rank waits in collectives (not busy)
    startup_s: float = 60.0
    teardown_s: float = 5.0  # a dead rank -> the whole attempt gone (torchrun tears the group down)
    save_stall_s: float = 2.0
    val_interval: int = 40
    val_s: float = 90.0
    tokens_per_step: int = 4_194_304
    keep_checkpoints: int = 3
    shard_bytes: int = 0
    loss_noise: float = 0.004
    report_interval_s: float = 1.0  # wall seconds: the contract's transport interval is not simulated time
    max_in_flight: int = 32
    beats_per_request: int = (
        0  # 0: one request per host (its ranks' beats); N: a relay batching hosts up to N
    )
    seed: int = 0

    def wall(self, fleet_seconds: float) -> float:
        return fleet_seconds * self.time_scale


@dataclass
class EndpointStats:
    latencies_s: list[float] = field(default_factory=list)
    statuses: dict[str, int] = field(default_factory=dict)
    items: int = 0

    def record(self, latency_s: float, status: int | str, items: int) -> None:
        self.latencies_s.append(round(latency_s, 6))
        key = str(status)
        self.statuses[key] = self.statuses.get(key, 0) + 1
        self.items += items


class Curves:
    """Loss, activation norm, loss scale and LR of a recorded real run (tests/data), stretched over the
    run's target steps with their shape kept; a divergence replays the recorded diverged run's deviation
    from its healthy twin (same seed, same steps before the fault) step by step from the injected onset."""

    def __init__(self, params: SimParams, target_steps: int) -> None:
        self.healthy = json.loads(Path(params.healthy_curve).read_text())["points"]
        diverged = json.loads(Path(params.diverged_curve).read_text())["points"]
        self.diverged = {p["step"]: p for p in diverged}
        self.by_step = {p["step"]: p for p in self.healthy}
        self.onset = params.diverged_onset
        self.target = max(1, target_steps)
        self.noise = params.loss_noise
        self.seed = params.seed

    def _at(self, field_name: str, step: int) -> float:
        x = 1 + (len(self.healthy) - 1) * min(1.0, step / self.target)
        lo = math.floor(x)
        hi = min(lo + 1, len(self.healthy))
        a, b = self.healthy[lo - 1][field_name], self.healthy[hi - 1][field_name]
        return float(a + (b - a) * (x - lo))

    def point(self, step: int, *, diverged_since: int | None, lr_scale: float) -> dict[str, float]:
        # the same step gives the same numbers in every attempt (a real trainer's data order is fixed)
        rng = random.Random(self.seed * 1_000_003 + step)
        loss = self._at("loss", step) * (1 + rng.gauss(0, self.noise))
        act_norm = self._at("act_norm", step) * (1 + rng.gauss(0, self.noise))
        grad_norm = self._at("grad_norm", step)
        loss_scale = self._at("loss_scale", step)
        if diverged_since is not None and step > diverged_since:
            k = step - diverged_since
            rec = min(self.onset + k, max(self.diverged))
            div, twin = self.diverged[rec], self.by_step.get(rec) or self.healthy[-1]
            loss *= _ratio(div["loss"], twin["loss"])
            act_norm *= _ratio(div["act_norm"], twin["act_norm"])
            grad_norm *= _ratio(div["grad_norm"], twin["grad_norm"])
            loss_scale = float(div["loss_scale"]) if div.get("loss_scale") is not None else math.nan
        lr = self._at("lr", step) * lr_scale
        return {
            "loss": loss,
            "act_norm": act_norm,
            "grad_norm": grad_norm,
            "loss_scale": loss_scale,
            "lr": lr,
        }


def _ratio(a: float | None, b: float | None) -> float:
    if a is None or b is None or not math.isfinite(a) or b == 0:
        return math.nan
    return a / b


class Reporter:
    """Transport to the control plane: one batch request per host for its ranks' newest beats, rank 0's
    metric points and checkpoint registrations; never blocks the training loop."""

    def __init__(self, *, url: str, token: str, run_id: int, attempt: int, params: SimParams) -> None:
        self.client = httpx.AsyncClient(
            base_url=url.rstrip("/"),
            headers={"Authorization": f"Bearer {token}"},
            timeout=30.0,
            limits=httpx.Limits(max_connections=params.max_in_flight),
        )
        self.run_id, self.attempt, self.params = run_id, attempt, params
        self.newest: dict[str, dict[int, dict[str, Any]]] = {}
        self.dirty: set[str] = set()
        self.last_sent: dict[str, float] = {}
        self.points: list[dict[str, Any]] = []
        self.checkpoints: list[dict[str, Any]] = []
        self.stats = {
            "heartbeats": EndpointStats(),
            "metrics": EndpointStats(),
            "checkpoints": EndpointStats(),
        }
        self.metric_posts: list[tuple[int, float, float]] = []  # (newest step delivered, its time, posted)
        self.limit = asyncio.Semaphore(params.max_in_flight)
        self.heartbeat_interval_s = contract.heartbeat_interval_from_env(os.environ)

    def beat(self, host: str, beat: dict[str, Any]) -> None:
        self.newest.setdefault(host, {})[beat["rank"]] = beat
        self.dirty.add(host)

    async def _post(self, kind: str, url: str, body: dict[str, Any], items: int) -> int | None:
        async with self.limit:
            started = time.perf_counter()
            try:
                response = await self.client.post(url, json=body)
            except httpx.HTTPError as exc:
                self.stats[kind].record(time.perf_counter() - started, type(exc).__name__, 0)
                return None
            self.stats[kind].record(time.perf_counter() - started, response.status_code, items)
            return response.status_code

    def _batches(self, hosts: list[str]) -> list[tuple[str, list[dict[str, Any]]]]:
        """One request per host, or (a relay, `beats_per_request`) whole hosts packed up to that many beats
        (at most contract.MAX_BEATS_PER_BATCH)."""
        limit = min(self.params.beats_per_request, contract.MAX_BEATS_PER_BATCH)
        if limit <= 0:
            return [(h, list(self.newest[h].values())) for h in hosts]
        batches: list[tuple[str, list[dict[str, Any]]]] = []
        for host in hosts:
            beats = list(self.newest[host].values())
            if batches and len(batches[-1][1]) + len(beats) <= limit:
                batches[-1][1].extend(beats)
            else:
                batches.append((host, beats))
        return batches

    async def _send_beats(self, host: str, beats: list[dict[str, Any]]) -> None:
        await self._post(
            "heartbeats",
            f"/api/v1/runs/{self.run_id}/heartbeats",
            {"attempt": self.attempt, "beats": beats},
            len(beats),
        )

    async def flush(self) -> None:
        # as the trainer's relay: a host sends its ranks' newest beats once per interval, the one the
        # orchestrator gave the attempt (contract.HEARTBEAT_INTERVAL_ENV), new or not (the contract:
        # `received_at` shows the path alive, `time` the loop); its first beats go at once
        now = time.monotonic()
        due = {
            h
            for h in self.dirty | set(self.last_sent)
            if h not in self.last_sent or now - self.last_sent[h] >= self.heartbeat_interval_s
        }
        hosts, self.dirty = due, self.dirty - due
        for host in hosts:
            self.last_sent[host] = now
        sends = [self._send_beats(h, beats) for h, beats in self._batches(sorted(hosts))]
        points, self.points = self.points, []
        if points:
            status = await self._post(
                "metrics",
                f"/api/v1/runs/{self.run_id}/metrics",
                {"attempt": self.attempt, "points": points},
                len(points),
            )
            if status is None or status >= 500:
                self.points = points + self.points  # the reporter's spool: retried, in order
            else:
                self.metric_posts.append((points[-1]["step"], points[-1]["time"], time.time()))
        for body in self.checkpoints[:]:
            status = await self._post("checkpoints", f"/api/v1/runs/{self.run_id}/checkpoints", body, 1)
            if status is not None and status < 500:
                self.checkpoints.remove(body)
        await asyncio.gather(*sends)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            started = time.monotonic()
            await self.flush()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    stop.wait(), max(0.0, self.params.report_interval_s - (time.monotonic() - started))
                )

    async def close(self, run_dir: Path) -> None:
        # bounded well inside a launcher's kill grace (5 s), after which the process is SIGKILLed
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.flush(), 3.0)
        leftover = [contract.metrics_spool_record(self.attempt, p) for p in self.points]
        leftover += [contract.checkpoint_spool_record(self.attempt, b) for b in self.checkpoints]
        if leftover:  # the orchestrator drains an ended attempt's spool (service/orchestrator/spool.py)
            contract.Spool(contract.spool_dir(run_dir)).append(leftover)
        await self.client.aclose()


class Attempt:
    """All ranks of one attempt, stepping together."""

    def __init__(self, args: argparse.Namespace, params: SimParams, attempt_dir: Path) -> None:
        self.args, self.params, self.dir = args, params, attempt_dir
        self.run_dir = Path(args.run_dir)
        self.run_name = self.run_dir.name
        self.run_id = int(os.environ.get("TRAINOPS_RUN_ID", "0"))
        self.attempt = int(os.environ.get("TRAINOPS_ATTEMPT", "1"))
        self.hosts = [h for h in os.environ.get("TRAINOPS_HOSTS", "").split(",") if h]
        per_host = int(os.environ.get(PROCS_PER_HOST_ENV, "1"))
        self.world = len(self.hosts) * per_host
        self.host_of = [self.hosts[r * len(self.hosts) // self.world] for r in range(self.world)]
        self.pid_base = os.getpid() * 100
        self.started = time.time()
        self.rng = random.Random(params.seed * 7919 + self.attempt * 104_729 + self.run_id)
        self.lr_scale = float(args.lr_scale) if args.lr_scale is not None else 1.0
        self.curves = Curves(params, args.max_steps)
        self.busy: list[list[tuple[int, float]]] = [[] for _ in range(self.world)]
        self.last_step_s: float | None = None
        self.step = 0
        self.tokens = 0
        self.divergences: dict[int, float] = {}  # injected onset step -> the LR scale that avoids it
        self.diverging_logged: set[int] = set()
        self.faults_offset = 0
        self.fired: dict[str, Any] | None = None
        self.last_beat_at: float | None = None
        self.fault_event = asyncio.Event()
        self.pending_commit: asyncio.Task[None] | None = None
        url = os.environ.get("TRAINOPS_API_URL", "")
        self.reporter = Reporter(
            url=url,
            token=os.environ.get("TRAINOPS_TOKEN", ""),
            run_id=self.run_id,
            attempt=self.attempt,
            params=params,
        )

    # ---- faults ----------------------------------------------------------------------------------------

    def event(self, record: dict[str, Any]) -> None:
        with (self.dir / EVENTS_FILE).open("a") as f:
            f.write(json.dumps(record) + "\n")

    def poll_faults(self) -> None:
        path = Path(self.params.faults_file)
        if not path.exists():
            return
        with path.open() as f:
            f.seek(self.faults_offset)
            lines = f.readlines()
            self.faults_offset = f.tell()
        for line in lines:
            if not line.endswith("\n"):
                self.faults_offset -= len(line.encode())  # half-written: read again next time
                break
            fault = json.loads(line)
            if fault.get("run") != self.run_name:
                continue
            if fault["kind"] == "diverge":
                self.divergences[int(fault["at_step"])] = float(fault.get("below") or 1.0)
                continue
            if fault["at"] < self.started or self.fired is not None:
                continue  # written before this attempt started: an earlier attempt's
            self.fired = {
                **fault,
                "fired_at": time.time(),
                "step": self.step,
                "attempt": self.attempt,
                "last_beat_at": self.last_beat_at,
            }
            self.event({"event": "fault", **self.fired})
            self.fault_event.set()

    async def watch_faults(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.poll_faults()
            await asyncio.sleep(0.2)

    def broken_hosts(self) -> set[str]:
        try:
            return set(json.loads(Path(self.params.broken_hosts_file).read_text()))
        except (OSError, ValueError):
            return set()

    # ---- beats, metrics, checkpoints ---------------------------------------------------------------------

    def record_beats(self, section: contract.Section) -> None:
        now = time.time()
        self.last_beat_at = now
        for rank in range(self.world):
            history = self.busy[rank]
            recent = [b for _, b in history[-STEP_TIME_MEAN_STEPS:]]
            beat = contract.heartbeat_record(
                step=self.step,
                time=now,
                section=section,
                step_time_s=(sum(recent) / len(recent)) if recent and self.world > 1 else None,
                last_step_s=self.last_step_s,
                busy=history if self.world > 1 else [],
                host=self.host_of[rank],
                pid=self.pid_base + rank,
                rank=rank,
            )
            self.reporter.beat(self.host_of[rank], dict(beat))

    def diverged_since(self) -> int | None:
        """The onset of an injected divergence this step replays: it recurs on every attempt that passes its
        step unless the LR was cut below the scale in force when it was injected."""
        onsets = [s for s, below in self.divergences.items() if self.step > s and self.lr_scale >= below]
        if not onsets:
            return None
        onset = max(onsets)
        if onset not in self.diverging_logged:
            self.diverging_logged.add(onset)
            self.event({"event": "diverging", "at_step": onset, "step": self.step, "at": time.time()})
        return onset

    def metric_point(self, step_time: float, values: dict[str, float]) -> dict[str, Any]:
        diverged = self.diverged_since()
        curve = self.curves.point(self.step, diverged_since=diverged, lr_scale=self.lr_scale)
        tokens_per_s = self.params.tokens_per_step / (step_time / self.params.time_scale)
        point = {
            "step": self.step,
            "time": time.time(),
            "tokens": self.tokens,
            "loss": curve["loss"],
            "grad_norm": curve["grad_norm"],
            "loss_scale": curve["loss_scale"],
            "act_norm": curve["act_norm"],
            "lr": curve["lr"],
            "clip": float(self.args.clip) if self.args.clip is not None else 1.0,
            "tokens_per_s": tokens_per_s,
            "tflops_per_gpu": None,
            "step_time_s": step_time,
            "values": values,
        }
        return point

    def checkpoint_meta(self, point: dict[str, Any]) -> dict[str, Any]:
        return {
            "step": self.step,
            "tokens": self.tokens,
            "data_position": self.step,
            "attempt": self.attempt,
            "time": time.time(),
            "loss": point["loss"],
            "act_norm": point["act_norm"],
            "loss_scale": point["loss_scale"],
            "lr": point["lr"],
            "clip": point["clip"],
            "loss_window": [],
            "act_norm_window": [],
            "world_size": self.world,
            "preset": self.args.preset,
            "precision": self.args.precision,
            "simulated": True,
        }

    def write_checkpoint(self, step: int, meta: dict[str, Any]) -> None:
        """What the trainer's Checkpointer leaves on disk, with empty (or sparse) shards: each rank's shard
        and RNG file, hashed by the rank that wrote them, then rank 0's manifest, rename and marker."""
        root = contract.checkpoints_dir(self.run_dir)
        tmp = root / f".tmp_{checkpoint_name(step)}"
        tmp.mkdir(parents=True, exist_ok=True)
        for rank in range(self.world):
            with (tmp / f"__{rank}_0.distcp").open("wb") as f:
                if self.params.shard_bytes:
                    f.truncate(self.params.shard_bytes)
            (tmp / f"rng_rank{rank}.pt").write_bytes(b"rng")
        (tmp / ".metadata").write_bytes(b"dcp-metadata")
        (tmp / META).write_text(json.dumps(meta, indent=1, sort_keys=True))
        # each rank hashes the files it wrote (trainer.checkpoint.rank_files names them: shard and RNG file);
        # named directly here, since one process playing every rank would list the directory once per rank
        reported = {
            rank: hash_files(tmp, [tmp / f"__{rank}_0.distcp", tmp / f"rng_rank{rank}.pt"])
            for rank in range(self.world)
        }
        final = root / checkpoint_name(step)
        checksum = commit(tmp, final, reported=reported, world_size=self.world)
        self.reporter.checkpoints.append(catalog_record(final, step, read_meta(final), checksum))
        apply_retention(root, self.params.keep_checkpoints)

    # ---- the loop --------------------------------------------------------------------------------------

    async def sleep_or_fault(self, seconds: float) -> bool:
        """Sleep; True when a fault fired meanwhile."""
        if self.fired is not None:
            return True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.fault_event.wait(), max(0.0, seconds))
        return self.fired is not None

    async def fault_outcome(self) -> int:
        """What the fired fault does to the attempt: its exit status, or never returns (a hang)."""
        assert self.fired is not None
        kind = self.fired["kind"]
        if kind == "hang":
            await asyncio.Event().wait()  # stuck in a collective until killed
        await asyncio.sleep(self.params.wall(self.params.teardown_s))
        return EXIT_TERMINATED if kind == "maintenance" else EXIT_RANK_DIED

    async def train(self) -> int:
        p = self.params
        start_step = 0
        if self.args.resume_from:
            meta = read_meta(self.args.resume_from)
            start_step, self.tokens = int(meta["step"]), int(meta["tokens"])
        self.step = start_step
        if await self.sleep_or_fault(p.wall(p.startup_s)):
            return await self.fault_outcome()
        if broken := sorted(set(self.hosts) & self.broken_hosts()):
            self.event({"event": "broken_host_at_startup", "hosts": broken, "at": time.time()})
            await asyncio.sleep(p.wall(p.teardown_s))
            return EXIT_RANK_DIED
        self.record_beats(contract.Section.STARTUP)
        while self.step < self.args.max_steps:
            planned = p.wall(p.step_s) * math.exp(self.rng.gauss(0, p.step_jitter))
            started = time.monotonic()
            if await self.sleep_or_fault(planned):
                return await self.fault_outcome()
            step_time = time.monotonic() - started  # as a trainer measures it: a loaded host's lag included
            self.step += 1
            self.tokens += p.tokens_per_step
            self.last_step_s = step_time
            for rank in range(self.world):
                busy = step_time * (1 - p.wait_fraction) * (1 + self.rng.gauss(0, p.rank_jitter))
                self.busy[rank] = [*self.busy[rank][-(BUSY_HISTORY - 1) :], (self.step, busy)]
            values: dict[str, float] = {"overflow": 0.0}
            if p.val_interval and self.step % p.val_interval == 0:
                self.record_beats(contract.Section.VALIDATION)
                if await self.sleep_or_fault(p.wall(p.val_s)):
                    return await self.fault_outcome()
                values["val_loss"] = self.curves.point(self.step, diverged_since=None, lr_scale=1.0)["loss"]
            point = self.metric_point(step_time, values)
            self.reporter.points.append(contract.json_safe_point(point))
            self.record_beats(contract.Section.STEP)
            if not math.isfinite(point["loss"]):
                return contract.EXIT_DIVERGED
            interval = int(self.args.checkpoint_interval or 0)
            if (interval and self.step % interval == 0) or self.step == self.args.max_steps:
                self.record_beats(contract.Section.CHECKPOINT_SAVE)
                if self.pending_commit is not None:
                    await self.pending_commit  # one save in flight, as the trainer's Checkpointer
                if await self.sleep_or_fault(p.wall(p.save_stall_s)):
                    return await self.fault_outcome()
                meta = self.checkpoint_meta(point)
                self.pending_commit = asyncio.create_task(
                    asyncio.to_thread(self.write_checkpoint, self.step, meta)
                )
                self.record_beats(contract.Section.STEP)
        if self.pending_commit is not None:
            await self.pending_commit
        return contract.EXIT_OK

    def write_stats(self) -> None:
        stats = {
            "run": self.run_name,
            "attempt": self.attempt,
            "started": self.started,
            "world_size": self.world,
            "hosts": len(self.hosts),
            "final_step": self.step,
            "endpoints": {k: asdict(v) for k, v in self.reporter.stats.items()},
            "metric_posts": self.reporter.metric_posts,
        }
        (self.dir / STATS_FILE).write_text(json.dumps(stats))


def parse_trainer_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench.sim_ranks")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--max-steps", type=int, required=True)
    parser.add_argument("--checkpoint-interval", type=int, default=0)
    parser.add_argument("--precision", default="fp16")
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--resume-from")
    parser.add_argument("--lr-scale", type=float)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--clip", type=float)
    parser.add_argument("--reset-loss-scale", action="store_true")
    parser.add_argument("--skip-batches", type=int, default=0)
    parser.add_argument("--fault", action="append", default=[])
    args, _recipe = parser.parse_known_args(argv)  # the run's hyperparameters change nothing simulated
    return args


async def amain(attempt_dir: Path, trainer_argv: list[str]) -> NoReturn:
    params = SimParams(**json.loads(os.environ[PARAMS_ENV]))
    attempt = Attempt(parse_trainer_args(trainer_argv), params, attempt_dir)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    training = asyncio.create_task(attempt.train())
    terminated = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, terminated.set)
    background = [
        asyncio.create_task(attempt.reporter.run(stop)),
        asyncio.create_task(attempt.watch_faults(stop)),
    ]
    waiter = asyncio.create_task(terminated.wait())
    done, _ = await asyncio.wait({training, waiter}, return_when=asyncio.FIRST_COMPLETED)
    if training in done:
        code = training.result()
    else:
        training.cancel()
        code = EXIT_TERMINATED
    waiter.cancel()
    stop.set()
    await asyncio.gather(*background, return_exceptions=True)
    await attempt.reporter.close(attempt.run_dir)
    attempt.write_stats()
    exit_now(attempt_dir, code)


def exit_now(attempt_dir: Path, code: int) -> NoReturn:
    """Record the exit status and end the process at once: a checkpoint still being written in its thread
    is abandoned (a dying trainer does not finish its save; the directory stays torn and uncommitted)."""
    atomic_write_text(attempt_dir / EXIT_FILE, json.dumps({"exit_code": code, "ended": time.time()}))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: list[str]) -> int:
    if "--" not in argv or argv.index("--") != 1:
        print("usage: python -m bench.sim_ranks ATTEMPT_DIR -- TRAINER_ARGS...", file=sys.stderr)
        return contract.EXIT_CONFIG
    attempt_dir = Path(argv[0])
    attempt_dir.mkdir(parents=True, exist_ok=True)
    asyncio.run(amain(attempt_dir, argv[2:]))
    raise AssertionError("amain ends the process")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
