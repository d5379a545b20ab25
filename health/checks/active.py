"""Deep, active checks with torch: GEMM, memory pattern, all-reduce bandwidth, disk (DCGM level 2-3).

torch is imported inside each check: the worker process itself never loads it, so the isolated check
process stays cheap to fork and a hung CUDA call dies with it. On a host without torch (the agent
installed with the health extra only) the torch checks report ``skipped`` with the reason.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from health.checks.context import CheckContext
from health.results import CheckResult, CheckStatus, Fault


def busbw_allreduce(size_bytes: float, seconds: float, ranks: int) -> float:
    """nccl-tests' bus bandwidth of an all-reduce (bytes/s): algbw * 2(n-1)/n, comparable across n."""
    if ranks < 2 or seconds <= 0:
        raise ValueError("bus bandwidth needs at least 2 ranks and a positive time")
    return (size_bytes / seconds) * 2 * (ranks - 1) / ranks


def _expected_for(model: str, table: dict[str, float] | Any) -> float | None:
    return next((value for fragment, value in table.items() if fragment in model), None)


TORCH_ABSENT = "torch is not installed on this host; the torch checks need the trainops[trainer] extra"


def needs_torch(name: str) -> Callable[[Callable[[CheckContext], CheckResult]], Callable[..., CheckResult]]:
    """The check reports ``skipped`` with the reason where torch is not installed (a host agent installed
    with the health extra only): a missing tool is not a finding about the host's GPUs."""

    def wrap(check: Callable[[CheckContext], CheckResult]) -> Callable[..., CheckResult]:
        @functools.wraps(check)
        def run(ctx: CheckContext) -> CheckResult:
            try:
                import torch  # noqa: F401  (only whether it imports)
            except ImportError:
                return CheckResult(check=name, status=CheckStatus.skipped, reason=TORCH_ABSENT)
            return check(ctx)

        return run

    return wrap


@needs_torch("torch.gemm")
def check_gemm(ctx: CheckContext) -> CheckResult:
    import torch

    name = "torch.gemm"
    n = ctx.config.gemm_size
    slowdown = ctx.shaper().gemm_slowdown
    measured: dict[str, Any] = {"size": n}
    if torch.cuda.is_available():
        rates: dict[str, float] = {}
        problems: list[str] = []
        for index in range(torch.cuda.device_count()):
            device = torch.device("cuda", index)
            a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
            b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
            torch.matmul(a, b)
            torch.cuda.synchronize(device)
            iterations = 20
            start = time.perf_counter()
            for _ in range(iterations):
                torch.matmul(a, b)
            torch.cuda.synchronize(device)
            elapsed = (time.perf_counter() - start) * slowdown
            tflops = 2 * n**3 * iterations / elapsed / 1e12
            rates[str(index)] = tflops
            model = torch.cuda.get_device_name(index)
            expected = _expected_for(model, ctx.config.expected_tflops)
            if expected is not None and tflops < expected * ctx.config.min_gemm_ratio:
                problems.append(
                    f"GPU {index} ({model}) {tflops:.0f} TFLOP/s"
                    f" < {ctx.config.min_gemm_ratio:.0%} of {expected:.0f}"
                )
        measured["tflops"] = rates
        if problems:
            return CheckResult(
                check=name,
                status=CheckStatus.degraded,
                reason="; ".join(problems),
                faults=[Fault.gemm_slow],
                measurements=measured,
            )
        return CheckResult(check=name, status=CheckStatus.passed, measurements=measured)

    baseline = ctx.config.cpu_gemm_baseline_gflops
    if baseline is None:
        return CheckResult(
            check=name,
            status=CheckStatus.skipped,
            reason="CPU host without a calibrated GEMM baseline "
            "(set TRAINOPS_HEALTH_CPU_GEMM_BASELINE_GFLOPS, "
            "see health.calibrate)",
        )
    gflops = cpu_gemm_gflops(n) / slowdown
    measured.update(gflops=gflops, baseline_gflops=baseline, ratio=gflops / baseline)
    if gflops < baseline * ctx.config.min_gemm_ratio:
        return CheckResult(
            check=name,
            status=CheckStatus.degraded,
            reason=f"CPU GEMM {gflops:.1f} GFLOP/s"
            f" < {ctx.config.min_gemm_ratio:.0%} of the calibrated {baseline:.1f}",
            faults=[Fault.gemm_slow],
            measurements=measured,
        )
    return CheckResult(check=name, status=CheckStatus.passed, measurements=measured)


def cpu_gemm_gflops(n: int, iterations: int = 5) -> float:
    """Best-of-``iterations`` float32 GEMM rate on the CPU (best, so a noisy neighbour does not flag us)."""
    import torch

    a = torch.randn(n, n)
    b = torch.randn(n, n)
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(iterations):
        start = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


PATTERNS = (0x00, 0xFF, 0xAA, 0x55)


@needs_torch("torch.memory_pattern")
def check_memory_pattern(ctx: CheckContext) -> CheckResult:
    import torch

    name = "torch.memory_pattern"
    devices = (
        [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available()
        else [torch.device("cpu")]
    )
    flip = ctx.shaper().memory_bitflip
    elements = ctx.config.memory_test_mb * 1024 * 1024 // 4
    bad: dict[str, int] = {}
    for device in devices:
        buffer = torch.empty(elements, dtype=torch.int32, device=device)
        mismatches = 0
        for byte in PATTERNS:
            word = int.from_bytes(bytes([byte]) * 4, "little", signed=True)
            buffer.fill_(word)
            if flip:
                buffer[elements // 2] ^= 1
            mismatches += int((buffer != word).sum().item())
        # Address-in-address pattern: catches address-line faults that constant patterns cannot.
        torch.arange(elements, dtype=torch.int32, device=device, out=buffer)
        mismatches += int((buffer != torch.arange(elements, dtype=torch.int32, device=device)).sum().item())
        if mismatches:
            bad[str(device)] = mismatches
        del buffer
    measured = {
        "devices": [str(d) for d in devices],
        "mb_per_device": ctx.config.memory_test_mb,
        "mismatches": bad,
    }
    if bad:
        return CheckResult(
            check=name,
            status=CheckStatus.failed,
            reason="memory pattern mismatches: " + ", ".join(f"{d}: {n}" for d, n in bad.items()),
            faults=[Fault.memory_pattern],
            measurements=measured,
        )
    return CheckResult(check=name, status=CheckStatus.passed, measurements=measured)


@needs_torch("torch.allreduce_local")
def check_allreduce_local(ctx: CheckContext) -> CheckResult:
    """All-reduce across this node's devices: NCCL over its GPUs, or gloo between two CPU ranks."""
    import torch

    name = "torch.allreduce_local"
    size_bytes = int(ctx.config.allreduce_mb * 1024 * 1024)
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        if count < 2:
            return CheckResult(
                check=name, status=CheckStatus.skipped, reason="a single GPU has no intra-node fabric"
            )
        from torch.cuda import nccl

        tensors = [
            torch.ones(size_bytes // 2, dtype=torch.bfloat16, device=f"cuda:{i}") for i in range(count)
        ]
        nccl.all_reduce(tensors)
        torch.cuda.synchronize()
        iterations = 10
        start = time.perf_counter()
        for _ in range(iterations):
            nccl.all_reduce(tensors)
        torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / iterations
        busbw = busbw_allreduce(size_bytes, seconds, count) / 1e9
        expected = _expected_for(torch.cuda.get_device_name(0), ctx.config.expected_busbw_gbps)
        backend, ranks = "nccl", count
    else:
        ranks = 2
        seconds = gloo_allreduce_seconds(size_bytes, ranks, link_delay_s=ctx.shaper().link_delay_s)
        busbw = busbw_allreduce(size_bytes, seconds, ranks) / 1e9
        expected = ctx.config.cpu_busbw_baseline_gbps
        backend = "gloo"
    measured = {
        "backend": backend,
        "ranks": ranks,
        "bytes": size_bytes,
        "busbw_gbps": busbw,
        "expected_gbps": expected,
    }
    if expected is not None and busbw < expected * ctx.config.min_busbw_ratio:
        return CheckResult(
            check=name,
            status=CheckStatus.degraded,
            reason=f"{backend} all-reduce busbw {busbw:.2f} GB/s"
            f" < {ctx.config.min_busbw_ratio:.0%} of {expected:.2f} GB/s",
            faults=[Fault.busbw_low],
            measurements=measured,
        )
    return CheckResult(check=name, status=CheckStatus.passed, measurements=measured)


def gloo_allreduce_seconds(
    size_bytes: int, ranks: int, *, link_delay_s: float = 0.0, iterations: int = 5
) -> float:
    """Mean seconds of one gloo all-reduce among ``ranks`` in-process ranks (threads, one group each)."""
    import torch
    import torch.distributed as dist

    store = dist.HashStore()
    times: list[float] = []
    errors: list[BaseException] = []

    def rank_main(rank: int) -> None:
        try:
            group = dist.ProcessGroupGloo(dist.PrefixStore("local", store), rank, ranks)
            tensor = torch.ones(size_bytes // 4, dtype=torch.float32)
            group.allreduce([tensor]).wait()
            start = time.perf_counter()
            for _ in range(iterations):
                group.allreduce([tensor]).wait()
                if link_delay_s:
                    time.sleep(link_delay_s)
            if rank == 0:
                times.append((time.perf_counter() - start) / iterations)
        except BaseException as error:  # surfaced to the caller below
            errors.append(error)

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(ranks)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return times[0]


def check_disk_throughput(ctx: CheckContext) -> CheckResult:
    name = "host.disk_throughput"
    directory = ctx.config.checkpoint_dir
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f".trainops-health-{ctx.host}-{os.getpid()}.bin"
    block = os.urandom(4 * 1024 * 1024)
    blocks = max(1, ctx.config.disk_test_mb // 4)
    try:
        start = time.perf_counter()
        with open(path, "wb") as file:
            for _ in range(blocks):
                file.write(block)
            file.flush()
            os.fsync(file.fileno())  # a checkpoint is only safe once on disk
        write_s = time.perf_counter() - start
        fd = os.open(path, os.O_RDONLY)
        try:
            # Drop our pages from the cache so the read measures the device, not memory.
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            start = time.perf_counter()
            while os.read(fd, 4 * 1024 * 1024):
                pass
            read_s = time.perf_counter() - start
        finally:
            os.close(fd)
    finally:
        path.unlink(missing_ok=True)
    total_mb = blocks * 4
    measured = {
        "path": str(directory),
        "mb": total_mb,
        "write_mb_s": total_mb / write_s,
        "read_mb_s": total_mb / read_s,
    }
    if measured["write_mb_s"] < ctx.config.min_disk_write_mb_s:
        return CheckResult(
            check=name,
            status=CheckStatus.degraded,
            reason=f"checkpoint directory writes at {measured['write_mb_s']:.0f} MB/s"
            f" < {ctx.config.min_disk_write_mb_s:.0f}",
            faults=[Fault.disk_slow],
            measurements=measured,
        )
    return CheckResult(check=name, status=CheckStatus.passed, measurements=measured)
