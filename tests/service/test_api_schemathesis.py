"""Schemathesis against the live API on PostgreSQL, with an admin token: every phase it offers (examples,
coverage, fuzzing, stateful), checking that no request gets a 5xx and that every response's status, content
type and body are the ones the OpenAPI document declares. Zero failures allowed.

The run is bounded (``MAX_EXAMPLES`` per operation, a fixed seed so a failure reproduces) to take about a
minute on a 2-core machine. Run it by hand with more examples or another seed::

    TRAINOPS_SCHEMATHESIS_EXAMPLES=200 TRAINOPS_SCHEMATHESIS_SEED=7 \\
        .venv/bin/python -m pytest -q tests/service/test_api_schemathesis.py

This module is also the ``SCHEMATHESIS_HOOKS`` module of the ``st run`` it starts (the hook below).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import schemathesis

from service.config import DEFAULT_BOOTSTRAP_TOKEN
from tests.livesrv import LiveServer

pytestmark = pytest.mark.postgres

REPO_ROOT = Path(__file__).resolve().parents[2]
MAX_EXAMPLES = int(os.environ.get("TRAINOPS_SCHEMATHESIS_EXAMPLES", "12"))
SEED = int(os.environ.get("TRAINOPS_SCHEMATHESIS_SEED", "1"))
CHECKS = "not_a_server_error,status_code_conformance,response_schema_conformance,content_type_conformance"
PHASES = "examples,coverage,fuzzing,stateful"
# The longest a diagnostics request is left to wait for its health checks (see the hook).
DIAGNOSTICS_DEADLINE_S = 1.0


@schemathesis.hook
def before_call(context: Any, case: Any, kwargs: dict[str, Any]) -> None:
    """Health checks run for up to the request's ``deadline_s`` (up to an hour, by design) when it waits
    for them (``wait``, the default of ``POST /nodes/{host}/diagnostics``): a generated deadline of minutes
    would read as schemathesis's request timeout, not as a defect. Only a valid, waiting request's deadline
    is shortened (a 202 with the task id when the checks run over it), so everything else is sent as
    generated."""
    if not case.operation.path.endswith(("/diagnostics", "/diagnostics/sweep")) or case.method != "POST":
        return
    body = case.body
    if not isinstance(body, dict):
        return
    deadline = body.get("deadline_s")
    is_number = isinstance(deadline, int | float) and not isinstance(deadline, bool)
    if deadline is None or (is_number and deadline > DIAGNOSTICS_DEADLINE_S):
        body["deadline_s"] = DIAGNOSTICS_DEADLINE_S


def test_the_live_api_conforms_to_its_openapi_document(postgres_url: str, tmp_path: Path) -> None:
    server = LiveServer(tmp_path, database_url=postgres_url).start(timeout=60)
    try:
        env = {
            **os.environ,
            "SCHEMATHESIS_HOOKS": "tests.service.test_api_schemathesis",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
        }
        command = [
            str(Path(sys.executable).with_name("st")),
            "run",
            f"{server.url}/openapi.json",
            "--checks", CHECKS,
            "--phases", PHASES,
            "--max-examples", str(MAX_EXAMPLES),
            "--seed", str(SEED),
            "--workers", "2",
            # The bootstrap admin token: a token stored in the database would soon be revoked by a generated
            # POST /tokens/{token_id}/revoke, leaving every later request a 401.
            "--header", f"Authorization: Bearer {DEFAULT_BOOTSTRAP_TOKEN}",
            "--request-timeout", "30",
            "--report", "junit",
            "--report-junit-path", str(tmp_path / "schemathesis-junit.xml"),
        ]  # fmt: skip
        result = subprocess.run(
            # in tmp_path: its response cache (.schemathesis/) must not replay another run's answers
            command,
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
    finally:
        server.stop()
    report = result.stdout[-20_000:] + result.stderr[-4_000:]
    assert result.returncode == 0, report
    # every operation was reached with the admin token, none answered only 401/403
    assert "Authentication failed" not in report, report
    selected = re.search(r"Selected: (\d+)/(\d+)", report)
    tested = re.search(r"Tested: (\d+)", report)
    assert selected and tested and selected[1] == selected[2] == tested[1], report  # every operation ran
