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

import json
import os
import queue
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from trainer.contract import (
    HEARTBEAT_SEND_INTERVAL_S,
    MAX_BEATS_PER_BATCH,
    HeartbeatRecord,
    Spool,
    SpoolKind,
    checkpoint_spool_record,
    heartbeat_batch,
    heartbeat_interval_from_env,
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


def control_plane_client(
    url: str, token: str, *, timeout_s: float, transport: httpx.BaseTransport | None
) -> httpx.Client:
    return httpx.Client(
        base_url=url.rstrip("/"),
        # no token, no header: "Bearer " alone is not a valid header value, and the 401 says what is wrong
        headers={"Authorization": f"Bearer {token}"} if token else {},
        timeout=timeout_s,
        transport=transport,
    )


def _attempt_from_env() -> dict[str, Any]:
    """Where and as whom this process reports: the launcher's environment (docs/reporting-contract.md)."""
    return {
        "url": os.environ["TRAINOPS_API_URL"],
        "token": os.environ.get("TRAINOPS_TOKEN", ""),
        "run_id": int(os.environ.get("TRAINOPS_RUN_ID", "0")),
        "attempt": int(os.environ.get("TRAINOPS_ATTEMPT", "1")),
    }


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
        self.client = control_plane_client(url, token, timeout_s=5.0, transport=transport)
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
    """Sends the newest beat the training loop offered (see the module docstring).

    With `relay` (a name shared by the ranks of one torchrun agent, i.e. one host) the host's ranks send one
    request together: local rank 0 binds a Unix datagram socket under that name and, every interval, posts
    its own newest beat with the newest beat each of its peers handed it; the peers hand theirs over the
    socket (never blocking: a datagram that cannot go is posted directly instead, as before the relay is
    up). A host of 8 ranks makes one request per interval, not 8."""

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
        relay: str | None = None,
        local_rank: int = 0,
    ) -> None:
        self.path = f"/api/v1/runs/{run_id}/heartbeats"
        self.attempt = attempt
        self.interval_s = interval_s
        self.log = log
        # A request never outlasts a few intervals: meanwhile newer beats replace the one being sent.
        timeout_s = max(1.0, min(5.0, 3 * interval_s))
        self.client = control_plane_client(url, token, timeout_s=timeout_s, transport=transport)
        self.sent = 0  # requests delivered
        self._newest: HeartbeatRecord | None = None  # written by the loop, read by the thread
        self._peers: dict[int, HeartbeatRecord] = {}  # the relay's: each peer's newest beat
        self._lock = threading.Lock()
        self._failing: str | None = None  # why the last send failed, logged once until one succeeds
        self._relay_address = f"\0trainops-beats-{relay}" if relay else None
        self._socket: socket.socket | None = None
        self.relaying = False  # this process posts its host's beats
        if self._relay_address is not None:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._socket.setblocking(False)
            if local_rank == 0:
                try:
                    self._socket.bind(self._relay_address)
                    self.relaying = True
                except OSError as e:  # the name is taken: every rank of this host posts its own
                    self.log(f"heartbeat: no relay for this host ({e}); every rank posts its own beats")
                    self._socket.close()
                    self._socket = None
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
        """Send the newest beat (again, if the loop recorded none since), with the peers' when relaying;
        False when it could not be delivered (it is sent again, or superseded, next time)."""
        with self._lock:
            record = self._newest
        if self.relaying:
            self._take_peer_beats()
            newest = dict(self._peers)
            if record is not None:
                newest[record["rank"]] = record
            beats = [newest[rank] for rank in sorted(newest)]
            chunks = [beats[i : i + MAX_BEATS_PER_BATCH] for i in range(0, len(beats), MAX_BEATS_PER_BATCH)]
            return all([self._post(chunk) for chunk in chunks])  # every chunk is sent, whatever the others
        if record is None:  # the loop has not recorded its first beat yet
            return True
        if self._socket is not None and self._hand_to_relay(record):
            return True
        return self._post([record])

    def _hand_to_relay(self, record: HeartbeatRecord) -> bool:
        assert self._socket is not None and self._relay_address is not None
        try:
            self._socket.sendto(json.dumps(record).encode(), self._relay_address)
        except OSError:  # no relay (yet), or its queue is full: post this one directly
            return False
        return True

    def _take_peer_beats(self) -> None:
        """Every datagram waiting: the newest beat per peer rank (a malformed one is dropped)."""
        assert self._socket is not None
        while True:
            try:
                datagram = self._socket.recv(65536)
            except (BlockingIOError, InterruptedError):
                return
            try:
                beat = json.loads(datagram)
                rank = beat["rank"]
                newer = rank not in self._peers or beat["time"] >= self._peers[rank]["time"]
            except (ValueError, TypeError, KeyError):
                continue
            if newer:
                self._peers[rank] = beat

    def _post(self, beats: list[HeartbeatRecord]) -> bool:
        if not beats:
            return True
        try:
            response = self.client.post(self.path, json=heartbeat_batch(self.attempt, beats))
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
            if self._socket is not None:
                self._socket.close()


def make_heartbeat_sender(*, log: Callable[[str], None]) -> HeartbeatSender | NullHeartbeatSender:
    """HeartbeatSender on every rank when TRAINOPS_API_URL is set, else NullHeartbeatSender. The ranks of one
    torchrun agent (one host: the workers share the agent as their parent process) relay through their
    local rank 0."""
    if not os.environ.get("TRAINOPS_API_URL"):
        return NullHeartbeatSender()
    where = _attempt_from_env()
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    relay = f"{os.getppid()}-{where['run_id']}-{where['attempt']}" if local_world > 1 else None
    return HeartbeatSender(
        **where,
        interval_s=heartbeat_interval_from_env(os.environ),
        log=log,
        relay=relay,
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
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
        **_attempt_from_env(),
        spool_dir=spool_dir,
        interval_s=interval_s,
        log=log,
    )
