"""An on-call engineer drives a real control plane from the `trainops` CLI."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.cli import ExitCode
from service.config import DEFAULT_BOOTSTRAP_TOKEN
from tests.livesrv import LiveServer

ADMIN = {"Authorization": f"Bearer {DEFAULT_BOOTSTRAP_TOKEN}"}


@pytest.fixture
def server(tmp_path: Path) -> Iterator[LiveServer]:
    srv = LiveServer(tmp_path).start()
    try:
        yield srv
    finally:
        srv.stop()


def test_cli_session_against_a_live_control_plane(server: LiveServer) -> None:
    # `trainops up` created the embedded SQLite database under TRAINOPS_HOME and serves the docs
    assert (server.home / "trainops.db").exists()
    assert httpx.get(f"{server.url}/docs").status_code == 200
    httpx.post(f"{server.url}/api/v1/nodes", json={"hostname": "gpu-007"}, headers=ADMIN).raise_for_status()
    httpx.post(
        f"{server.url}/api/v1/runs",
        json={"name": "opt-demo", "owner": "alice", "config": {"target_steps": 10}},
        headers=ADMIN,
    ).raise_for_status()

    out = server.cli("tokens", "create", "--name", "oncall", "--role", "operator").stdout
    secret = out.strip().splitlines()[-1]
    assert secret.startswith("tops_")
    server.env["TRAINOPS_TOKEN"] = secret

    assert "opt-demo" in server.cli("runs", "list").stdout
    shown = json.loads(server.cli("runs", "show", "1", "--json").stdout)
    assert shown["run"]["name"] == "opt-demo" and shown["attempts"] == []

    out = server.cli("nodes", "cordon", "gpu-007", "--reason", "XID 79 fell off the bus").stdout
    assert "cordoned" in out
    assert "cordoned" in server.cli("nodes", "list").stdout
    log = json.loads(server.cli("logbook", "--host", "gpu-007", "--json").stdout)
    assert any("XID 79" in e["message"] and e["author"] == "user:oncall" for e in log["items"])
    server.cli("logbook", "--note", "RMA filed for gpu-007", "--host", "gpu-007")
    assert "RMA filed" in server.cli("logbook", "--kind", "note").stdout
    server.cli("nodes", "uncordon", "gpu-007", "--reason", "GPU replaced")
    out = server.cli("runs", "restart", "1", "--reason", "spike", "--lr-scale", "0.5", "--clip", "0.3").stdout
    assert "requested" in out


def test_cli_errors_are_one_line_without_traceback(server: LiveServer, tmp_path: Path) -> None:
    r = server.cli("nodes", "cordon", "ghost", "--reason", "x", check=False)
    assert r.returncode == ExitCode.not_found
    assert "HTTP 404" in r.stderr and "ghost" in r.stderr and "Traceback" not in r.stderr + r.stdout

    r = server.cli("nodes", "cordon", "ghost", check=False)  # --reason is required
    assert r.returncode == 2 and "Traceback" not in r.stderr

    server.env["TRAINOPS_TOKEN"] = "tops_wrong"
    r = server.cli("runs", "list", check=False)
    assert r.returncode == ExitCode.forbidden and "HTTP 401" in r.stderr

    server.env["TRAINOPS_API_URL"] = "http://127.0.0.1:9"
    r = server.cli("runs", "list", check=False)
    assert (
        r.returncode == ExitCode.unreachable
        and "cannot reach the control plane" in r.stderr
        and "Traceback" not in r.stderr
    )

    server.env["TRAINOPS_MODE"] = "prod"
    r = server.cli("runs", "list", check=False)
    assert r.returncode == 2 and "BOOTSTRAP_ADMIN_TOKEN" in r.stderr and "Traceback" not in r.stderr


def test_data_with_markup_characters_is_printed_as_written(server: LiveServer) -> None:
    # Owners, notes, reasons and host names are user data: `[/]` or `[bold]` in them is text, not Rich markup
    # (before, `[/]` crashed `runs list` and `logbook` with a MarkupError traceback).
    owner, note, reason = "team[/]ml", "loss [bold]spiked[/] at [/] step 40", "fan [red] stuck [/]"
    httpx.post(f"{server.url}/api/v1/nodes", json={"hostname": "gpu-9"}, headers=ADMIN).raise_for_status()
    httpx.post(
        f"{server.url}/api/v1/runs",
        json={"name": "opt-x", "owner": owner, "config": {"target_steps": 10}},
        headers=ADMIN,
    ).raise_for_status()

    out = server.cli("runs", "list", check=False)
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    assert owner in out.stdout and "opt-x" in out.stdout
    shown = server.cli("runs", "show", "1", check=False)
    assert shown.returncode == 0 and owner in shown.stdout, shown.stderr

    server.cli("logbook", "--note", note, "--run", "1")
    server.cli("nodes", "cordon", "gpu-9", "--reason", reason)
    log = server.cli("logbook", check=False)
    assert log.returncode == 0 and "Traceback" not in log.stderr, log.stderr
    flat = " ".join(log.stdout.split())  # the table wraps long cells
    assert "[bold]spiked[/]" in flat
    nodes = server.cli("nodes", "list", check=False)
    assert nodes.returncode == 0 and "[red]" in nodes.stdout, nodes.stderr

    r = server.cli("nodes", "cordon", "ghost[/]", "--reason", "x", check=False)
    assert r.returncode == ExitCode.not_found and "ghost[/]" in r.stderr and "Traceback" not in r.stderr
