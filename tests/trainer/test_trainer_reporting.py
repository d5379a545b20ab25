"""Rank 0's reporter: nothing lost and nothing stalled while the control plane is down; replay in order."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.trainer_helpers import free_port, start_receiver
from trainer.reporting import HttpReporter, NullReporter, make_reporter


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
        rank=0,
        host="h1",
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


def test_heartbeats_carry_rank_host_and_step(tmp_path: Path) -> None:
    server = start_receiver()
    try:
        rep = reporter(server.server_port, tmp_path)
        rep.heartbeat(41)
        wait_for(lambda: any(p.endswith("/heartbeats") for p, _, _ in server.requests))
        rep.close()
        path, auth, body = next(r for r in server.requests if r[0].endswith("/heartbeats"))
        assert (path, auth, body) == (
            "/api/v1/runs/3/heartbeats",
            "Bearer t",
            {"attempt": 1, "rank": 0, "host": "h1", "step": 41},
        )
    finally:
        server.shutdown()


def test_without_an_api_url_reporting_is_a_no_op(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.delenv("TRAINOPS_API_URL", raising=False)
    assert isinstance(
        make_reporter(rank=0, world=2, spool_dir=tmp_path, interval_s=1.0, log=print), NullReporter
    )
    monkeypatch.setenv("TRAINOPS_API_URL", "http://127.0.0.1:9")
    assert isinstance(
        make_reporter(rank=1, world=2, spool_dir=tmp_path, interval_s=1.0, log=print), NullReporter
    )
