"""Measure this class of machine's CPU GEMM rate and gloo all-reduce bus bandwidth, once, by hand.

    python -m health.calibrate [--gemm-size 2048] [--allreduce-mb 64] [--ranks 2]

prints the ``TRAINOPS_HEALTH_CPU_GEMM_BASELINE_GFLOPS=`` and ``TRAINOPS_HEALTH_CPU_BUSBW_BASELINE_GBPS=``
lines to put in the workers' environment of CPU-only hosts. Run it on an idle, known-good machine of
the class, with the same ``gemm_size`` and ``allreduce_mb`` the checks use: both figures depend on the
size (a small all-reduce is latency-bound). The all-reduce is the cross-host check's own code
(:func:`health.checks.fabric.join_and_allreduce`), its ranks in separate processes over TCP on
127.0.0.1, which is what a simulated fleet on one machine measures; for a figure across real hosts,
read ``fabric.allreduce`` measurements of a deep sweep of known-good hosts.
"""

from __future__ import annotations

import argparse
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from health.checks.active import cpu_gemm_gflops
from health.checks.fabric import CollectiveOutcome, CollectiveSpec, join_and_allreduce, master_port_for
from health.config import HealthConfig
from health.runner import run_call_isolated

GEMM_ENV = "TRAINOPS_HEALTH_CPU_GEMM_BASELINE_GFLOPS"
BUSBW_ENV = "TRAINOPS_HEALTH_CPU_BUSBW_BASELINE_GBPS"


@dataclass(frozen=True, kw_only=True)
class Calibration:
    gemm_size: int
    gemm_gflops: float
    allreduce_mb: float
    ranks: int
    busbw_gbps: float

    def env_lines(self) -> list[str]:
        return [f"{GEMM_ENV}={self.gemm_gflops:.4g}", f"{BUSBW_ENV}={self.busbw_gbps:.4g}"]


def gloo_busbw_gbps(
    config: HealthConfig, *, size_bytes: int, ranks: int, iterations: int = 10, join_timeout_s: float = 60.0
) -> float:
    """Bus bandwidth of one gloo all-reduce among ``ranks`` local processes (the slowest rank's view)."""
    port = master_port_for("127.0.0.1")
    group = f"calibrate-{uuid.uuid4().hex[:8]}"
    specs = [
        CollectiveSpec(
            group=group,
            master_addr="127.0.0.1",
            master_port=port,
            rank=rank,
            world_size=ranks,
            size_bytes=size_bytes,
            join_timeout_s=join_timeout_s,
            iterations=iterations,
        )
        for rank in range(ranks)
    ]
    limit_s = join_timeout_s + config.deep_check_timeout_s
    with ThreadPoolExecutor(max_workers=ranks) as pool:
        calls = list(
            pool.map(
                lambda spec: run_call_isolated(
                    join_and_allreduce, (f"calibrate-{spec.rank}", spec, config), timeout_s=limit_s
                ),
                specs,
            )
        )
    rates: list[float] = []
    for call in calls:
        if not isinstance(call.value, CollectiveOutcome) or call.value.busbw_gbps is None:
            why = call.error if call.error else (call.value.error if call.value else "no result")
            raise RuntimeError(f"calibration all-reduce failed: {why}")
        rates.append(call.value.busbw_gbps)
    return min(rates)


def calibrate(config: HealthConfig, *, ranks: int = 2) -> Calibration:
    size_bytes = int(config.allreduce_mb * 1024 * 1024)
    # Without a fault script: the shaper must not slow the machine being calibrated.
    clean = config.with_changes(fake_nvml_path=None)
    return Calibration(
        gemm_size=config.gemm_size,
        gemm_gflops=cpu_gemm_gflops(config.gemm_size),
        allreduce_mb=config.allreduce_mb,
        ranks=ranks,
        busbw_gbps=gloo_busbw_gbps(clean, size_bytes=size_bytes, ranks=ranks),
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    defaults = HealthConfig.from_env()
    parser.add_argument("--gemm-size", type=int, default=defaults.gemm_size)
    parser.add_argument("--allreduce-mb", type=float, default=defaults.allreduce_mb)
    parser.add_argument("--ranks", type=int, default=2, help="all-reduce ranks (processes), >= 2")
    opts = parser.parse_args(argv)
    if opts.ranks < 2:
        parser.error("--ranks must be at least 2")
    config = defaults.with_changes(gemm_size=opts.gemm_size, allreduce_mb=opts.allreduce_mb)
    result = calibrate(config, ranks=opts.ranks)
    print(
        f"# CPU GEMM {result.gemm_size}x{result.gemm_size} float32: {result.gemm_gflops:.4g} GFLOP/s; "
        f"gloo all-reduce of {result.allreduce_mb:g} MB over {result.ranks} ranks: "
        f"busbw {result.busbw_gbps:.4g} GB/s"
    )
    for line in result.env_lines():
        print(line)


if __name__ == "__main__":
    main()
