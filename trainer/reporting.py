"""Reporting to the control plane (docs/reporting-contract.md), off the training thread.

Every rank sends its heartbeat (`HeartbeatSender`, from `make_heartbeat_sender`); rank 0 alone sends metrics
and checkpoints (`HttpReporter`, from `make_reporter`). Both are do-nothing (`NullHeartbeatSender`,
`NullReporter`) when `TRAINOPS_API_URL` is unset.

`HttpReporter`: the loop calls `metric()` / `checkpoint()` (non-blocking: a bounded queue; when it is full the
record goes straight to the spool file). A background thread sends a batch every `interval_s`. Whatever cannot
be delivered (control plane down, 5xx, timeout) is appended to `spool/pending.jsonl`; before any new batch the
spool is replayed in order, so no metric is lost and nothing is reordered past a failure. The server is
idempotent on (run, attempt, step) and (run, path), so a replay after a half-delivered batch is harmless. A
spool left by a previous attempt is replayed by the next one. A 4xx answer (other than 408/429) means the
server rejects the payload: it is moved to `spool/rejected.jsonl` instead of blocking the spool forever.

`HeartbeatSender`: the training loop records each beat itself (`trainer.telemetry.Heartbeat`) and offers it
here, which only keeps it as the newest; a background thread sends the newest beat every `interval_s`
(`HEARTBEAT_SEND_INTERVAL_S`), one request at a time, so the loop never waits on the network. When the loop
recorded nothing new the same beat is sent again: a hung loop's beat keeps its old `time` while its arrival
shows the control plane that the process and the path are alive. Beats are only useful live: one that
cannot be delivered is dropped, never spooled (the next send supersedes it).
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from trainer.contract import (
    HEARTBEAT_SEND_INTERVAL_S,
    HeartbeatRecord,
    Spool,
    SpoolKind,
    checkpoint_spool_record,
    heartbeat_batch,
    metrics_spool_record,
)

MAX_POINTS_PER_REQUEST = 10_000


class NullReporter:
    def metric(self, point: dict[str, Any]) -> None:
        """Reporting disabled (no TRAINOPS_API_URL)."""

    def checkpoint(self, body: dict[str, Any]) -> None:
        """Reporting disabled."""

    def close(self, timeout_s: float = 10.0) -> None:
        """Nothing to flush."""


class _Retry(Exception):
    """Delivery failed in a way that may succeed later."""


class HttpReporter:
    def __init__(
        self,
        *,
        url: str,
        token: str,
        run_id: int,
        attempt: int,
        spool_dir: Path,
        interval_s: float = 1.0,
        queue_size: int = 10_000,
        log: Callable[[str], None] = print,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.run_id, self.attempt = run_id, attempt
        self.interval_s = interval_s
        self.log = log
        self.spool = Spool(spool_dir)
        self.queue: queue.Queue[dict[str, Any]] = queue.Queue(maxsize=queue_size)
        self.client = httpx.Client(
            base_url=url.rstrip("/"),
            headers={"Authorization": f"Bearer {token}"},
            timeout=5.0,
            transport=transport,
        )
        self._stop = threading.Event()
        self._down_since: float | None = None
        self._thread = threading.Thread(target=self._run, name="trainops-reporter", daemon=True)
        self._thread.start()

    # -- called from the training loop: never blocks on the network ------------------------------------------
    def metric(self, point: dict[str, Any]) -> None:
        self._enqueue(metrics_spool_record(self.attempt, point))

    def checkpoint(self, body: dict[str, Any]) -> None:
        self._enqueue(checkpoint_spool_record(self.attempt, body))

    def _enqueue(self, record: dict[str, Any]) -> None:
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            self.spool.append([record])

    # -- background thread -----------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.flush_once()
        self.flush_once()

    def _drain(self) -> list[dict[str, Any]]:
        batch = []
        while True:
            try:
                batch.append(self.queue.get_nowait())
            except queue.Empty:
                return batch

    def flush_once(self) -> bool:
        """Replay the spool, then send what is queued; spool whatever fails. True if everything got
        through."""
        batch = self._drain()
        if self._replay_spool():
            delivered = self._deliver_all(batch)
        else:  # still down: queue behind the spool, in order
            self.spool.append(batch)
            delivered = False
        return delivered

    def _replay_spool(self) -> bool:
        pending = self.spool.read()
        if not pending:
            return True
        done = 0
        try:
            for group in _groups(pending):
                self._post(group)
                done += len(group)
        except _Retry:
            return False
        finally:
            if done:
                self.spool.drop_first(done)
        self.log(f"reporter: replayed {done} spooled records")
        return True

    def _deliver_all(self, batch: list[dict[str, Any]]) -> bool:
        if not batch:
            return True
        groups = _groups(batch)
        for i, group in enumerate(groups):
            try:
                self._post(group)
            except _Retry:
                self.spool.append([r for g in groups[i:] for r in g])
                return False
        return True

    def _post(self, group: list[dict[str, Any]]) -> None:
        if group[0]["kind"] == SpoolKind.METRICS:
            url = f"/api/v1/runs/{self.run_id}/metrics"
            body = {"attempt": group[0]["attempt"], "points": [r["point"] for r in group]}
        else:
            url = f"/api/v1/runs/{self.run_id}/checkpoints"
            body = group[0]["body"]
        try:
            response = self.client.post(url, json=body)
        except httpx.HTTPError as e:
            self._mark_down(str(e))
            raise _Retry from e
        if response.status_code >= 500 or response.status_code in (408, 429):
            self._mark_down(f"HTTP {response.status_code}")
            raise _Retry
        if response.status_code >= 400:
            self.log(
                f"reporter: {url} rejected {len(group)} records: HTTP {response.status_code} {response.text}"
            )
            self.spool.reject(group, f"HTTP {response.status_code}")
        if self._down_since is not None:
            self.log(f"reporter: control plane back after {time.time() - self._down_since:.1f}s")
            self._down_since = None

    def _mark_down(self, why: str) -> None:
        if self._down_since is None:
            self._down_since = time.time()
            self.log(f"reporter: control plane unreachable ({why}); spooling to {self.spool.path}")

    def close(self, timeout_s: float = 10.0) -> None:
        """Final flush (bounded); anything undelivered stays in the spool for the next attempt."""
        self._stop.set()
        self._thread.join(timeout_s)
        leftover = self._drain()
        self.spool.append(leftover)
        self.client.close()


def _groups(records: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Consecutive metrics of one attempt become one request (<= 10,000 points); each checkpoint is its
    own."""
    groups: list[list[dict[str, Any]]] = []
    for r in records:
        last = groups[-1] if groups else None
        if (
            last
            and r["kind"] == SpoolKind.METRICS
            and last[0]["kind"] == SpoolKind.METRICS
            and last[0]["attempt"] == r["attempt"]
            and len(last) < MAX_POINTS_PER_REQUEST
        ):
            last.append(r)
        else:
            groups.append([r])
    return groups


class NullHeartbeatSender:
    def offer(self, record: HeartbeatRecord) -> None:
        """Reporting disabled (no TRAINOPS_API_URL)."""

    def close(self, timeout_s: float = 5.0) -> None:
        """Nothing to send."""


class HeartbeatSender:
    """Sends the newest beat the training loop offered (see the module docstring)."""

    def __init__(
        self,
        *,
        url: str,
        token: str,
        run_id: int,
        attempt: int,
        interval_s: float = HEARTBEAT_SEND_INTERVAL_S,
        log: Callable[[str], None] = print,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.path = f"/api/v1/runs/{run_id}/heartbeats"
        self.attempt = attempt
        self.interval_s = interval_s
        self.log = log
        # A request never outlasts a few intervals: meanwhile newer beats replace the one being sent.
        self.client = httpx.Client(
            base_url=url.rstrip("/"),
            headers={"Authorization": f"Bearer {token}"},
            timeout=max(1.0, min(5.0, 3 * interval_s)),
            transport=transport,
        )
        self.sent = 0
        self._newest: HeartbeatRecord | None = None  # written by the loop, read by the thread
        self._lock = threading.Lock()
        self._failing: str | None = None  # why the last send failed, logged once until one succeeds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="trainops-heartbeat", daemon=True)
        self._thread.start()

    def offer(self, record: HeartbeatRecord) -> None:
        """Called from the training loop: keeps the beat as the newest, nothing else."""
        with self._lock:
            self._newest = record

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.send_newest()
        self.send_newest()

    def send_newest(self) -> bool:
        """Send the newest beat (again, if the loop recorded none since); False when it could not be
        delivered (it is sent again, or superseded, next time)."""
        with self._lock:
            record = self._newest
        if record is None:  # the loop has not recorded its first beat yet
            return True
        try:
            response = self.client.post(self.path, json=heartbeat_batch(self.attempt, [record]))
        except httpx.HTTPError as e:
            self._failed(f"{type(e).__name__}: {e}")
            return False
        if response.status_code >= 400:
            self._failed(f"HTTP {response.status_code} {response.text[:200]}")
            return False
        if self._failing is not None:
            self.log("heartbeat: delivered again")
            self._failing = None
        self.sent += 1
        return True

    def _failed(self, why: str) -> None:
        if self._failing is None:
            self.log(f"heartbeat: not delivered ({why}); sending the newest beat every {self.interval_s}s")
        self._failing = why

    def close(self, timeout_s: float = 5.0) -> None:
        """Send the last beat (bounded) and stop. A send still hanging past `timeout_s` keeps its client
        (closing it under the thread would fail there); the daemon thread ends with the process."""
        self._stop.set()
        self._thread.join(timeout_s)
        if not self._thread.is_alive():
            self.client.close()


def make_heartbeat_sender(*, log: Callable[[str], None]) -> HeartbeatSender | NullHeartbeatSender:
    """HeartbeatSender on every rank when TRAINOPS_API_URL is set, else NullHeartbeatSender."""
    url = os.environ.get("TRAINOPS_API_URL")
    if not url:
        return NullHeartbeatSender()
    return HeartbeatSender(
        url=url,
        token=os.environ.get("TRAINOPS_TOKEN", ""),
        run_id=int(os.environ.get("TRAINOPS_RUN_ID", "0")),
        attempt=int(os.environ.get("TRAINOPS_ATTEMPT", "1")),
        log=log,
    )


def host_for_rank(rank: int, world: int) -> str:
    """Contract: with N hosts and W ranks, rank r runs on hosts[r * N // W]."""
    hosts = [h for h in os.environ.get("TRAINOPS_HOSTS", "").split(",") if h.strip()]
    if not hosts:
        return os.uname().nodename
    return hosts[rank * len(hosts) // world].strip()


def make_reporter(
    *, rank: int, spool_dir: Path, interval_s: float, log: Callable[[str], None]
) -> HttpReporter | NullReporter:
    """HttpReporter on rank 0 when TRAINOPS_API_URL is set, else NullReporter."""
    url = os.environ.get("TRAINOPS_API_URL")
    if rank != 0 or not url:
        return NullReporter()
    return HttpReporter(
        url=url,
        token=os.environ.get("TRAINOPS_TOKEN", ""),
        run_id=int(os.environ.get("TRAINOPS_RUN_ID", "0")),
        attempt=int(os.environ.get("TRAINOPS_ATTEMPT", "1")),
        spool_dir=spool_dir,
        interval_s=interval_s,
        log=log,
    )
