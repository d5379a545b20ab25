"""Rank 0's reporter: nothing lost and nothing stalled while the control plane is down; replay in order.
Every rank's heartbeat sender: the newest beat the loop recorded, re-sent, never blocking the loop."""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from service.schemas import HeartbeatBatch
from tests.trainer_helpers import free_port, start_receiver
from trainer.contract import HEARTBEAT_INTERVAL_ENV, Section
from trainer.reporting import (
    HeartbeatSender,
    HttpReporter,
    NullHeartbeatSender,
    NullReporter,
    make_heartbeat_sender,
    make_reporter,
)
from trainer.telemetry import Heartbeat


def wait_for(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "condition not reached"
        time.sleep(0.02)


def reporter(port: int, spool: Path, attempt: int = 1) -> HttpReporter:
    return HttpReporter(
        url=f"http://127.0.0.1:{port}",
        token="t",
        run_id=3,
        attempt=attempt,
        spool_dir=spool,
        interval_s=0.05,
        log=lambda _: None,
    )


def spooled(spool: Path) -> list[dict[str, Any]]:
    path = spool / "pending.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def delivered_steps(server: Any) -> list[int]:
    return [
        p["step"] for path, _, body in server.requests if path.endswith("/metrics") for p in body["points"]
    ]


def test_metrics_spool_while_the_control_plane_is_down_and_replay_in_order(tmp_path: Path) -> None:
    port = free_port()  # nothing listens here yet: connections are refused
    rep = reporter(port, tmp_path)
    for step in range(1, 31):
        rep.metric({"step": step, "loss": 5.0 - step / 100})
        if step == 20:
            rep.checkpoint({"step": 20, "path": "/ckpt/step_00000020", "state": "committed"})
    wait_for(lambda: len(spooled(tmp_path)) == 31)
    assert [r.get("point", {}).get("step") for r in spooled(tmp_path)][19:22] == [20, None, 21]

    server = start_receiver(port)  # the control plane comes back on the same address
    try:
        for step in range(31, 41):
            rep.metric({"step": step})
        wait_for(lambda: len(delivered_steps(server)) == 40)
        rep.close()
        assert delivered_steps(server) == list(range(1, 41))
        kinds = [path.rsplit("/", 1)[1] for path, _, _ in server.requests if not path.endswith("heartbeats")]
        assert kinds.index("checkpoints") > 0 and kinds[-1] == "metrics"
        ckpt = next(body for path, _, body in server.requests if path.endswith("/checkpoints"))
        assert ckpt == {"attempt": 1, "step": 20, "path": "/ckpt/step_00000020", "state": "committed"}
        assert spooled(tmp_path) == []
    finally:
        server.shutdown()


def test_the_next_attempt_replays_what_a_previous_one_could_not_send(tmp_path: Path) -> None:
    port = free_port()
    first = reporter(port, tmp_path, attempt=1)
    for step in range(1, 6):
        first.metric({"step": step})
    first.close(timeout_s=2)  # dies with the control plane still down
    assert [r["point"]["step"] for r in spooled(tmp_path)] == [1, 2, 3, 4, 5]

    server = start_receiver(port)
    try:
        second = reporter(port, tmp_path, attempt=2)
        second.metric({"step": 6})
        wait_for(lambda: len(delivered_steps(server)) == 6)
        second.close()
        attempts = [body["attempt"] for path, _, body in server.requests if path.endswith("/metrics")]
        assert delivered_steps(server) == [1, 2, 3, 4, 5, 6] and attempts[0] == 1 and attempts[-1] == 2
    finally:
        server.shutdown()


def test_a_rejected_payload_is_set_aside_instead_of_blocking_the_spool(tmp_path: Path) -> None:
    server = start_receiver(status=422)
    try:
        rep = reporter(server.server_port, tmp_path)
        rep.metric({"step": 1})
        wait_for(lambda: (tmp_path / "rejected.jsonl").exists())
        rep.close()
        assert json.loads((tmp_path / "rejected.jsonl").read_text())["reason"] == "HTTP 422"
        assert spooled(tmp_path) == []
    finally:
        server.shutdown()


def beat_sender(
    port: int, *, attempt: int = 1, log: Callable[[str], None] = print, **relay: Any
) -> HeartbeatSender:
    url = f"http://127.0.0.1:{port}"
    return HeartbeatSender(url=url, token="t", run_id=3, attempt=attempt, interval_s=0.05, log=log, **relay)


def bodies(server: Any) -> list[dict[str, Any]]:
    return [body for path, _, body in list(server.requests) if path == "/api/v1/runs/3/heartbeats"]


def beats_received(server: Any) -> list[dict[str, Any]]:
    """Every beat that arrived, in order; each request is a valid batch as the control plane reads it."""
    return [beat for body in bodies(server) for beat in HeartbeatBatch.model_validate(body).beats]


def test_the_sender_transports_the_newest_beat_the_loop_recorded(tmp_path: Path) -> None:
    server = start_receiver()
    try:
        sender = beat_sender(server.server_port, attempt=2)
        loop_beat = Heartbeat(sender, rank=1, host="h1")
        for step in range(1, 201):  # a loop much faster than the sender: only the newest beat goes out
            loop_beat.beat(step, step_time_s=0.01, last_step_s=0.01, busy=[(step, 0.01)])
        loop_beat.beat(200, section=Section.CHECKPOINT_SAVE)
        wait_for(lambda: any(b["section"] == "checkpoint_save" for b in beats_received(server)))
        sender.close()
        beats = beats_received(server)
        assert len(beats) < 200 and beats[-1]["step"] == 200 and beats[-1]["section"] == "checkpoint_save"
        assert {(b["rank"], b["host"], b["pid"]) for b in beats} == {(1, "h1", os.getpid())}
        assert {auth for _, auth, _ in server.requests} == {"Bearer t"}
        assert {body["attempt"] for _, _, body in server.requests} == {2}
    finally:
        server.shutdown()


def test_a_stuck_loop_leaves_its_beat_stale_while_the_sender_keeps_re_sending_it(tmp_path: Path) -> None:
    server = start_receiver()
    try:
        sender = beat_sender(server.server_port)
        Heartbeat(sender, rank=0, host="h1").beat(7)  # then the loop records nothing more
        wait_for(lambda: len(beats_received(server)) >= 4)
        sender.close()
        beats = beats_received(server)
        assert {(b["step"], b["time"]) for b in beats} == {(7, beats[0]["time"])}  # the same beat, re-sent
    finally:
        server.shutdown()


def test_a_hosts_ranks_send_their_beats_in_one_request_through_local_rank_0(tmp_path: Path) -> None:
    server = start_receiver()
    relay = f"test-{uuid.uuid4().hex}"
    try:
        # a peer that starts before its relay posts its own beats; once the relay is up, it hands them over
        early = beat_sender(server.server_port, relay=relay, local_rank=3)
        Heartbeat(early, rank=3, host="h1").beat(5)
        wait_for(lambda: any(b["rank"] == 3 for b in beats_received(server)))
        senders = {0: beat_sender(server.server_port, relay=relay, local_rank=0), 3: early}
        senders |= {r: beat_sender(server.server_port, relay=relay, local_rank=r) for r in (1, 2)}
        assert senders[0].relaying and not any(senders[r].relaying for r in (1, 2, 3))
        loops = {r: Heartbeat(sender, rank=r, host="h1") for r, sender in senders.items()}
        for step in (6, 7):
            for loop in loops.values():
                loop.beat(step)
        wait_for(lambda: any(len(HeartbeatBatch.model_validate(b).beats) == 4 for b in bodies(server)))
        for rank in (1, 2, 3, 0):  # the peers first: once the relay is gone, a peer posts its own beat
            senders[rank].close()
        batches = [HeartbeatBatch.model_validate(b).beats for b in bodies(server)]
        whole = [batch for batch in batches if len(batch) == 4]
        assert [b["rank"] for b in whole[-1]] == [0, 1, 2, 3] and {b["step"] for b in whole[-1]} == {7}
        # after the relay was up, the peers made no request of their own
        first_whole = batches.index(whole[0])
        assert all(len(batch) == 4 or batch[0]["rank"] == 0 for batch in batches[first_whole:])
        assert senders[1].sent == senders[2].sent == 0 and senders[3].sent >= 1  # `early`, before the relay
    finally:
        server.shutdown()


def test_recording_a_beat_never_waits_for_an_unresponsive_control_plane(tmp_path: Path) -> None:
    # A listening socket that never answers: every send hangs until its timeout.
    with socket.create_server(("127.0.0.1", 0)) as silent:
        logged: list[str] = []
        sender = beat_sender(silent.getsockname()[1], log=logged.append)
        loop_beat = Heartbeat(sender, rank=0, host="h1")
        loop_beat.beat(1)
        time.sleep(0.2)  # a send is in flight now
        started = time.perf_counter()
        for step in range(2, 1002):
            loop_beat.beat(step)
        assert time.perf_counter() - started < 0.5  # 1,000 beats recorded while one send hangs
        wait_for(lambda: bool(logged), timeout=10)
        sender.close(timeout_s=0.1)
    assert sender.sent == 0 and len(logged) == 1 and "not delivered" in logged[0]


def test_without_an_api_url_reporting_is_a_no_op(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.delenv("TRAINOPS_API_URL", raising=False)
    assert isinstance(make_reporter(rank=0, spool_dir=tmp_path, interval_s=1.0, log=print), NullReporter)
    assert isinstance(make_heartbeat_sender(log=print), NullHeartbeatSender)
    monkeypatch.setenv("TRAINOPS_API_URL", "http://127.0.0.1:9")
    assert isinstance(make_reporter(rank=1, spool_dir=tmp_path, interval_s=1.0, log=print), NullReporter)


def test_ranks_beat_at_the_interval_the_orchestrator_gave_their_attempt(monkeypatch: Any) -> None:
    monkeypatch.setenv("TRAINOPS_API_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("TRAINOPS_RUN_ID", "1")
    monkeypatch.setenv("TRAINOPS_ATTEMPT", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    monkeypatch.setenv(HEARTBEAT_INTERVAL_ENV, "20.48")  # a 1,024-host pool at 50 requests/s
    sender = make_heartbeat_sender(log=print)
    try:
        assert isinstance(sender, HeartbeatSender) and sender.interval_s == 20.48
    finally:
        sender.close(timeout_s=0.1)
    monkeypatch.setenv(HEARTBEAT_INTERVAL_ENV, "0")
    with pytest.raises(ValueError, match="not a positive number"):
        make_heartbeat_sender(log=print)
