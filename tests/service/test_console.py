"""The web console's pages and forms behind the same tokens as the API (the browser story is in
tests/e2e/test_console_browser.py)."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterator
from typing import Any

import sqlalchemy as sa
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from service.config import Settings
from service.crud.decisions import propose_decision
from service.crud.logbook import write_log
from service.crud.telemetry import ingest_metrics
from service.db import make_engine, make_session_factory, transaction
from service.models import Attempt, Checkpoint, Diagnostic, Node
from service.statemachine import DiagnosticStatus, LogKind, NodeState, Severity
from tests.conftest import make_run, make_token
from tests.service.test_api_decisions import propose
from tests.service.test_checkpoint_catalog import record_of, save_checkpoint


def sign_in(client: TestClient, headers: dict[str, str], next_page: str = "/ui") -> None:
    token = headers["Authorization"].removeprefix("Bearer ")
    r = client.post("/ui/login", data={"token": token, "next": next_page}, follow_redirects=False)
    assert r.status_code == 303, r.text


def csrf_of(page: str) -> str:
    found = re.search(r'name="csrf" value="([0-9a-f]+)"', page)
    assert found
    return found.group(1)


def test_a_stranger_is_sent_to_sign_in_and_back_never_elsewhere(admin: TestClient) -> None:
    run = make_run(admin, "opt-console")
    console = TestClient(admin.app)
    r = console.get(f"/ui/runs/{run['id']}", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"].startswith("/ui/login?")
    assert console.post("/ui/login", data={"token": "tops_wrong"}).status_code == 401
    operator = make_token(admin, "operator", name="oncall")
    sign_in(console, operator, next_page="//evil.example/phish")
    r = console.get("/ui")
    assert r.status_code == 200 and "opt-console" in r.text and "user:oncall (operator)" in r.text
    token = operator["Authorization"].removeprefix("Bearer ")
    r = console.post(
        "/ui/login", data={"token": token, "next": "https://evil.example/"}, follow_redirects=False
    )
    assert r.headers["location"] == "/ui"  # only the console's own pages
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/ui" in cookie
    trainer = make_token(admin, "trainer", run_id=run["id"])
    stranger = TestClient(admin.app)
    sign_in(stranger, trainer)
    assert stranger.get("/ui", follow_redirects=False).status_code == 303  # trainer tokens are not users


def test_forms_need_the_sessions_csrf_token_the_console_origin_and_an_operator(
    admin: TestClient, settings: Settings
) -> None:
    run = make_run(admin, "opt-gated", approvals={"require": ["lr_cut"]})
    decision_id = propose(settings, run["id"])
    viewer_client, operator_client = TestClient(admin.app), TestClient(admin.app)
    sign_in(viewer_client, make_token(admin, "viewer"))
    sign_in(operator_client, make_token(admin, "operator", name="oncall"))

    seen = viewer_client.get(f"/ui/runs/{run['id']}").text
    assert "decision 1" in seen and f'id="approve-{decision_id}"' not in seen  # viewers read only
    r = viewer_client.post(f"/ui/decisions/{decision_id}/approve", data={"csrf": csrf_of(seen)})
    assert r.status_code == 403 and "needs the operator role" in r.text

    page = operator_client.get(f"/ui/runs/{run['id']}").text
    assert f'id="approve-{decision_id}"' in page
    csrf = csrf_of(page)
    assert operator_client.post(f"/ui/runs/{run['id']}/notes", data={"note": "x"}).status_code == 403
    assert csrf != csrf_of(seen)  # bound to the session's token
    forged = operator_client.post(
        f"/ui/runs/{run['id']}/notes",
        data={"note": "x", "csrf": csrf},
        headers={"Origin": "https://evil.example"},
    )
    assert forged.status_code == 403 and "another origin" in forged.text
    r = operator_client.post(
        f"/ui/runs/{run['id']}/notes", data={"note": "<script>alert(1)</script>", "csrf": csrf}
    )
    assert (
        r.status_code == 200
        and "&lt;script&gt;alert(1)&lt;/script&gt;" in r.text
        and "<script>alert" not in r.text
    )
    bad = operator_client.post(
        f"/ui/decisions/{decision_id}/reject", data={"csrf": csrf, "reason": "no", "lr_scale": "-3"}
    )
    assert bad.status_code == 403 and "lr_scale" in bad.text
    r = operator_client.post(
        f"/ui/decisions/{decision_id}/reject",
        data={"csrf": csrf, "reason": "too aggressive", "lr_scale": "0.8"},
    )
    assert r.status_code == 200 and "answered by user:oncall: too aggressive" in r.text
    again = operator_client.post(f"/ui/decisions/{decision_id}/approve", data={"csrf": csrf})
    assert again.status_code == 409 and "already rejected by user:oncall" in again.text
    filtered = operator_client.get(f"/ui/runs/{run['id']}", params={"kind": "note"}).text
    logbook = filtered.split('id="logbook"')[1]
    assert "alert(1)" in logbook and "awaits approval" not in logbook


def test_a_long_runs_curves_are_downsampled_in_the_database_and_keep_their_spikes(admin: TestClient) -> None:
    """2,000 steps in 500 points: a one-step loss spike and a grad-norm spike averaged over four steps read
    as a quarter of their height; each bucket keeps its maximum, the top of the chart."""
    run = make_run(admin, "opt-long")
    points = [
        {
            "step": s,
            "loss": 50.0 if s == 1001 else 3.0 + (s % 7) * 0.01,
            "grad_norm": 80.0 if s == 1502 else 1.0,
            "loss_scale": 2.0 ** (2 + s // 150),
        }
        for s in range(1, 2001)
    ]
    admin.post(f"/api/v1/runs/{run['id']}/metrics", json={"attempt": 1, "points": points}).raise_for_status()
    console = TestClient(admin.app)
    sign_in(console, make_token(admin, "viewer"))
    page = console.get(f"/ui/runs/{run['id']}").text
    assert "2000 stored points, averaged over 4 steps per point" in page
    assert 'aria-label="loss scale (log): 500 points, steps 1-1997"' in page  # 4 to 32,768: a log axis
    loss, grad_norm = svg_of(page, "loss:"), svg_of(page, "gradient norm:")
    assert '<text x="2" y="38">50</text>' in loss and '<text x="2" y="38">80</text>' in grad_norm
    assert '<polygon class="band kept"' in loss


T0 = dt.datetime(2026, 11, 30, 8, 0, tzinfo=dt.UTC)


def db(settings: Settings) -> Iterator[Session]:
    engine = make_engine(settings.resolved_database_url)
    try:
        with transaction(make_session_factory(engine)) as session:
            yield session
    finally:
        engine.dispose()


def seed_rollback(admin: TestClient, settings: Settings) -> dict[str, Any]:
    """A run that diverged at step 1001 of attempt 1 (on h1, h2) and was rolled back to step 1000: attempt
    2 (h1, h3) recomputes from there at a lower loss; attempt 1 had already saved step 1100 on its
    diverged branch. Its hosts: h2 a cordoned lemon with a failed ECC diagnostic, h3 suspect."""
    run = make_run(admin, "opt-rollback")
    ckpts = settings.home / "runs" / "opt-rollback" / "checkpoints"
    for step, attempt in ((500, 1), (1000, 1), (1100, 1), (1500, 2)):
        body = record_of(save_checkpoint(ckpts, step, attempt=attempt))
        admin.post(f"/api/v1/runs/{run['id']}/checkpoints", json=body).raise_for_status()
    verdicts = {
        500: ("healthy", "loss scale 65536, act norm bounded"),
        1100: ("unhealthy", "act norm runaway"),
    }
    for session in db(settings):
        for c in session.scalars(sa.select(Checkpoint).where(Checkpoint.run_id == run["id"])):
            c.verdict, c.healthy_reason = verdicts.get(c.step, ("pending", None))
        session.add_all(
            [
                Attempt(
                    run_id=run["id"],
                    number=1,
                    hosts=["h1", "h2"],
                    start_step=0,
                    last_step=1200,
                    started_at=T0,
                    last_progress_at=T0 + dt.timedelta(minutes=30),
                    detected_at=T0 + dt.timedelta(minutes=30, seconds=12),
                    ended_at=T0 + dt.timedelta(minutes=31),
                    exit_reason="divergence",
                    steps_lost=200,
                ),
                Attempt(
                    run_id=run["id"],
                    number=2,
                    hosts=["h1", "h3"],
                    start_step=1000,
                    last_step=2000,
                    started_at=T0 + dt.timedelta(minutes=32),
                    first_step_at=T0 + dt.timedelta(minutes=30, seconds=12 + 95),
                ),
            ]
        )
        session.add_all([Node(hostname="h1"), Node(hostname="h3", state=NodeState.suspect)])
        lemon = Node(
            hostname="h2",
            state=NodeState.cordoned,
            state_reason="double-bit ECC",
            failure_count=3,
            blame_count=2,
        )
        session.add(lemon)
        session.flush()
        session.add(
            Diagnostic(
                node_id=lemon.id,
                kind="gpu_ecc",
                status=DiagnosticStatus.failed,
                reason="double-bit ECC errors on GPU 3",
            )
        )
        write_log(
            session,
            kind=LogKind.failure,
            author="system:orchestrator",
            run_id=run["id"],
            severity=Severity.error,
            message="attempt 1 diverged",
            evidence={"onset_step": 1001, "signal": "loss_spike"},
        )
        # attempt 1: loss 2.0 up to the onset, 9.0 on the diverged branch; attempt 2: 1.5 throughout
        ingest_metrics(
            session,
            run_id=run["id"],
            attempt=1,
            points=[{"step": s, "loss": 2.0 if s <= 1000 else 9.0, "act_norm": 10.0} for s in range(1, 1201)],
        )
        ingest_metrics(
            session,
            run_id=run["id"],
            attempt=2,
            points=[{"step": s, "loss": 1.5, "act_norm": 10.0} for s in range(1001, 2001)],
        )
    return run


def svg_of(page: str, title: str) -> str:
    return next(s.split("</svg>")[0] for s in page.split("<svg")[1:] if f'aria-label="{title}' in s)


def heights(chart: str, css: str) -> set[str]:
    """The y coordinates of the line whose classes are `css` (a flat line has one)."""
    found = re.search(rf'<polyline class="line {css}"[^>]* points="([^"]+)"', chart)
    assert found, css
    return {p.split(",")[1] for p in found.group(1).split()}


def test_after_a_rollback_each_attempt_is_its_own_line_never_averaged_with_another(
    admin: TestClient, settings: Settings
) -> None:
    """The diverged branch (attempt 1 past step 1000) and its recomputation (attempt 2) overlap on steps
    1001-1200: one line through both zig-zagged, and a bucket over both averaged the divergence into the
    recovery. Each attempt is its own line, bucketed alone; the rolled-back steps are drawn apart."""
    run = seed_rollback(admin, settings)
    console = TestClient(admin.app)
    sign_in(console, make_token(admin, "viewer"))
    page = console.get(f"/ui/runs/{run['id']}").text
    assert "2200 stored points, averaged over 4 steps per point" in page
    loss = svg_of(page, "loss:")
    assert "attempts 1, 2, 1 rolled back" in loss
    assert len(heights(loss, "kept attempt-2")) == 1  # 1.5 throughout: nothing of attempt 1 mixed in
    assert len(heights(loss, "abandoned attempt-1")) == 1  # 9.0 on the whole diverged branch
    assert heights(loss, "abandoned attempt-1") != heights(loss, "kept attempt-2")
    branch = re.search(r'<polyline class="line abandoned attempt-1"[^>]*><title>([^<]+)', loss)
    assert branch and branch.group(1) == "attempt 1 (rolled back past)"


def test_a_run_page_tells_the_story_of_a_rollback_and_the_fleet_page_its_hosts(
    admin: TestClient, settings: Settings
) -> None:
    run = seed_rollback(admin, settings)
    console = TestClient(admin.app)
    sign_in(console, make_token(admin, "viewer"))
    page = console.get(f"/ui/runs/{run['id']}").text
    attempts = section(page, "attempts")
    assert re.search(
        r"<td>1</td><td>h1, h2</td>.*?<td>divergence</td>\s*"
        r"<td[^>]*>12\.0 s</td>\s*<td>95\.0 s</td>\s*<td>200</td>",
        attempts,
        re.S,
    )
    assert re.search(r"<td>2</td><td>h1, h3</td>\s*<td>1000</td>.*?running", attempts, re.S)

    checkpoints = section(page, "checkpoints")
    rows = {
        int(step): css.split()
        for css, step in re.findall(r'<tr id="checkpoint-\d+" class="([^"]*)"><td>(\d+)</td>', checkpoints)
    }
    assert "abandoned" in rows[1100]  # attempt 2 restarted from step 1000
    assert not any("abandoned" in rows[s] for s in (500, 1000, 1500))
    assert "abandoned: attempt 2 rolled back past it" in checkpoints
    assert "<td>unhealthy</td><td>act norm runaway</td>" in checkpoints and "<td>healthy</td>" in checkpoints
    preview = admin.get(f"/api/v1/runs/{run['id']}/restart-preview", params={"failure": "divergence"}).json()
    assert (
        f"Restore choice, if attempt 2 diverged now: <strong>step {preview['checkpoint']['step']}</strong>"
        in checkpoints
    )
    assert "chosen" in rows[preview["checkpoint"]["step"]]

    logbook = section(page, "logbook")
    assert "attempt 1 diverged" in logbook and "onset_step=1001, signal=loss_spike" in logbook

    # attempt 2 then loses a host: the choice is the orchestrator's for a hardware failure, not a divergence's
    for session in db(settings):
        second = session.scalar(sa.select(Attempt).where(Attempt.run_id == run["id"], Attempt.number == 2))
        second.ended_at, second.exit_reason = T0 + dt.timedelta(hours=1), "hardware"
    hardware = admin.get(f"/api/v1/runs/{run['id']}/restart-preview", params={"failure": "hardware"}).json()
    checkpoints = section(console.get(f"/ui/runs/{run['id']}").text, "checkpoints")
    assert hardware["checkpoint"]["step"] == 1500
    assert "Restore choice, restart after attempt 2&#39;s hardware: <strong>step 1500</strong>" in checkpoints

    fleet = console.get("/ui").text
    hosts = section(fleet, "fleet")
    assert "Fleet: 3 hosts" in hosts
    assert "healthy 1</span>" in hosts and "suspect 1</span>" in hosts and "cordoned 1</span>" in hosts
    lemons = hosts.split("<h3>Lemons")[1].split("<h3>")[0]
    assert "<td>h2</td><td>cordoned</td><td>3</td><td>2</td>" in lemons and "h1" not in lemons
    diagnostics = hosts.split("<h3>Recent diagnostics")[1]
    assert "<td>h2</td><td>gpu_ecc</td>" in diagnostics and "double-bit ECC errors on GPU 3" in diagnostics


def section(page: str, name: str) -> str:
    return page.split(f'<section id="{name}"')[1].split("</section>")[0]


def test_each_decision_shows_its_action_and_its_forms_offer_the_levers_the_api_takes(
    admin: TestClient, settings: Settings
) -> None:
    """A retirement names the hosts it retires (it read "restore step None, levers None"); a relaunch's
    approve and reject forms carry every lever the API accepts, and what the operator types is what the
    orchestrator gets."""
    run = make_run(admin, "opt-levers", approvals={"require": ["lr_cut", "node_retirement"]})
    relaunch = propose(settings, run["id"])
    for session in db(settings):
        retirement = propose_decision(
            session,
            run_id=run["id"],
            gates=["node_retirement"],
            reason="h2 and h5 failed three times this week",
            proposal={"action": "retire_hosts", "hosts": ["h2", "h5"]},
            evidence={"lemon_scores": {"h2": 3.2, "h5": 2.9}},
            timeout_s=600,
            on_timeout="hold",
            author="system:orchestrator",
        ).id
    console = TestClient(admin.app)
    sign_in(console, make_token(admin, "operator", name="oncall"))
    page = console.get(f"/ui/runs/{run['id']}").text
    retire = page.split(f'id="decision-{retirement}"')[1].split('<div class="decision')[0]
    assert "proposal: retire hosts h2, h5 (approve retires them; reject leaves them cordoned" in retire
    assert "None" not in retire.split("evidence:")[0]
    assert 'name="lr"' not in retire  # no levers on a retirement
    gated = page.split(f'id="decision-{relaunch}"')[1].split("</section>")[0]
    assert "proposal: relaunch after a failure from checkpoint step 40, levers lr_scale=0.5" in gated
    for form in (f'id="approve-{relaunch}"', f'id="reject-{relaunch}"'):
        fields = set(re.findall(r'name="([a-z_]+)"', gated.split(form)[1].split("</form>")[0]))
        assert fields == {"csrf", "reason", "lr_scale", "lr", "clip", "skip_batches", "reset_loss_scale"}
    csrf = csrf_of(page)

    levers = {"lr": "0.0002", "skip_batches": "120", "reset_loss_scale": "true", "clip": "", "lr_scale": ""}
    r = console.post(f"/ui/decisions/{retirement}/reject", data={"csrf": csrf, "reason": "x", **levers})
    assert r.status_code == 403 and "levers apply to a relaunch" in r.text
    r = console.post(
        f"/ui/decisions/{relaunch}/reject", data={"csrf": csrf, "reason": "skip the bad shard", **levers}
    )
    assert r.status_code == 200
    answered = admin.get(f"/api/v1/decisions/{relaunch}").json()
    assert answered["status"] == "rejected"
    assert answered["operator_overrides"] == {"lr": 0.0002, "skip_batches": 120, "reset_loss_scale": True}
    assert "levers lr=0.0002, reset_loss_scale=True, skip_batches=120" in r.text

    r = console.post(f"/ui/decisions/{retirement}/approve", data={"csrf": csrf, "reason": "lemons"})
    assert (
        r.status_code == 200 and admin.get(f"/api/v1/decisions/{retirement}").json()["status"] == "approved"
    )


def test_sign_in_from_another_site_is_refused(admin: TestClient) -> None:
    """Login CSRF: another site's page must not sign a browser in under the attacker's token (whatever the
    victim then writes goes into the attacker's session)."""
    token = make_token(admin, "viewer")["Authorization"].removeprefix("Bearer ")
    console = TestClient(admin.app)
    for headers in (
        {"Origin": "https://evil.example"},
        {"Referer": "https://evil.example/page"},
        {"Origin": "null"},
        {"Sec-Fetch-Site": "cross-site"},
    ):
        r = console.post("/ui/login", data={"token": token}, headers=headers, follow_redirects=False)
        assert r.status_code == 403 and "set-cookie" not in r.headers, headers
    ours = console.post(
        "/ui/login", data={"token": token}, headers={"Origin": "http://testserver"}, follow_redirects=False
    )
    assert ours.status_code == 303 and "trainops_console=" in ours.headers["set-cookie"]
