"""Host side of the cross-host fabric checks: join a rendezvous and time an all-reduce with the other hosts.

The control side (:mod:`service.fleet.fabric`) picks a master address and port and sends every host of a group
its rank and the world size on the host's own queue; each host's worker runs :func:`join_and_allreduce`
in a killable child process. The join has a deadline (the store's timeout): a host that never joins
makes the others report ``joined=False`` instead of hanging, and the control side turns that into a
finding. torch is imported in the child only, as for the other active checks.
"""

from __future__ import annotations

import datetime as dt
import random
import socket
import time
from dataclasses import asdict, dataclass
from typing import Any

from health.checks.active import _expected_for, busbw_allreduce
from health.config import HealthConfig
from health.shaping import LoadShaper

_LOOPBACK = {"127.0.0.1", "localhost", "::1"}


@dataclass(frozen=True, kw_only=True)
class CollectiveSpec:
    """One host's part in one group all-reduce, as the control side sends it."""

    group: str
    """Unique id of this group (a sweep phase or one pair of a bisection round)."""
    master_addr: str
    master_port: int
    rank: int
    world_size: int
    size_bytes: int
    join_timeout_s: float
    iterations: int = 5

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(kw_only=True)
class CollectiveOutcome:
    """What one rank saw: whether the group formed, and how long one all-reduce took."""

    host: str
    group: str
    rank: int
    world_size: int
    joined: bool
    backend: str
    seconds: float | None = None
    """Mean seconds of one all-reduce as this rank timed it; None when the group did not form or run."""
    busbw_gbps: float | None = None
    expected_gbps: float | None = None
    """This host's expected bus bandwidth (GPU model table or the CPU baseline); None = not calibrated."""
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CollectiveOutcome:
        return cls(**data)


def expected_fabric_gbps(config: HealthConfig, gpu_model: str | None) -> float | None:
    if gpu_model is not None:
        return _expected_for(gpu_model, config.expected_fabric_busbw_gbps)
    return config.cpu_busbw_baseline_gbps


def master_port_for(addr: str) -> int:
    """A free port when the master is this machine (simulated fleets); otherwise one from the torch
    rendezvous range, where a clash shows as a failed join and is retested by the bisection."""
    if addr in _LOOPBACK:
        with socket.socket() as probe:
            probe.bind((addr, 0))
            return int(probe.getsockname()[1])
    return random.randint(29500, 30499)


def join_and_allreduce(host: str, spec: CollectiveSpec, config: HealthConfig) -> CollectiveOutcome:
    """Join the group through a TCPStore at the master, then time ``spec.iterations`` all-reduces.

    Runs in the check child process (killed by the worker if it overruns). One rank per host: on a GPU
    host NCCL on its first GPU (that GPU's NIC is the link under test), on a CPU host gloo.
    """
    import torch
    import torch.distributed as dist

    shaper = LoadShaper.for_host(config, host)
    gpu = torch.cuda.is_available()
    backend = "nccl" if gpu else "gloo"
    outcome = CollectiveOutcome(
        host=host,
        group=spec.group,
        rank=spec.rank,
        world_size=spec.world_size,
        joined=False,
        backend=backend,
        expected_gbps=expected_fabric_gbps(config, torch.cuda.get_device_name(0) if gpu else None),
    )
    if shaper.link_down:
        # A planted broken link: this host never reaches the group, exactly as if its NIC were down.
        outcome.error = "link down (planted by the load shaper): did not join"
        return outcome
    timeout = dt.timedelta(seconds=spec.join_timeout_s)
    try:
        store = dist.TCPStore(
            spec.master_addr, spec.master_port, spec.world_size, spec.rank == 0, timeout=timeout
        )
        dist.init_process_group(
            backend,
            store=dist.PrefixStore(spec.group, store),
            rank=spec.rank,
            world_size=spec.world_size,
            timeout=timeout,
        )
    except Exception as error:  # the group did not form by the deadline: the caller's finding
        outcome.error = f"could not join {spec.master_addr}:{spec.master_port}: {_first_line(error)}"
        return outcome
    outcome.joined = True
    try:
        device = torch.device("cuda", 0) if gpu else torch.device("cpu")
        dtype = torch.bfloat16 if gpu else torch.float32
        tensor = torch.ones(spec.size_bytes // dtype.itemsize, dtype=dtype, device=device)
        dist.all_reduce(tensor)  # warm-up: connection set-up is not bandwidth
        if gpu:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(spec.iterations):
            if shaper.link_delay_s:
                time.sleep(shaper.link_delay_s)  # this host's sends leave late: every round trip waits
            dist.all_reduce(tensor)
        if gpu:
            torch.cuda.synchronize(device)
        outcome.seconds = (time.perf_counter() - start) / spec.iterations
        outcome.busbw_gbps = busbw_allreduce(spec.size_bytes, outcome.seconds, spec.world_size) / 1e9
    except Exception as error:  # a peer vanished mid-collective: reported, judged by the control side
        outcome.error = f"all-reduce failed: {_first_line(error)}"
    finally:
        dist.destroy_process_group()
    return outcome


def _first_line(error: BaseException) -> str:
    """torch's distributed errors carry a C++ backtrace; the first line says what happened."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200] if text else ''}"
