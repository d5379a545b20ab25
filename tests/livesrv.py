"""A real control plane process (``trainops up``) on a free loopback port, for end-to-end tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LiveServer:
    def __init__(
        self,
        home: Path,
        *,
        database_url: str | None = None,
        port: int | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.home = home
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "TRAINOPS_HOME": str(home),
            "TRAINOPS_API_PORT": str(self.port),
            "TRAINOPS_API_URL": self.url,
            **(env or {}),
        }
        if database_url:
            self.env["TRAINOPS_DATABASE_URL"] = database_url
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 120.0) -> LiveServer:
        # A deadline, not a measurement: a control plane that starts in 3 s idle took over 30 s in a CI run
        # with a load of 11, and its tests failed before they began.
        log = open(self.home / "api.log", "ab")  # noqa: SIM115 - owned by the child process
        # The API alone: tests that need the orchestrator or the health beat run their own.
        command = [sys.executable, "-m", "service.cli", "up", "--no-orchestrator", "--quick-interval", "0"]
        self.proc = subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"control plane exited: {(self.home / 'api.log').read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError("control plane did not become ready")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [sys.executable, "-m", "service.cli", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"trainops {' '.join(args)} failed: {result.stdout}{result.stderr}")
        return result
