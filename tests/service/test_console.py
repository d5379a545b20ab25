"""The web console's pages and forms behind the same tokens as the API (the browser story is in
tests/e2e/test_console_browser.py)."""

from __future__ import annotations

import re

from fastapi.testclient import TestClient

from service.config import Settings
from tests.conftest import make_run, make_token
from tests.service.test_api_decisions import propose


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


def test_a_long_runs_curves_are_downsampled_in_the_database(admin: TestClient) -> None:
    run = make_run(admin, "opt-long")
    points = [
        {"step": s, "loss": 3.0 + (s % 7) * 0.01, "loss_scale": 2.0 ** (2 + s // 150)} for s in range(1, 2001)
    ]
    admin.post(f"/api/v1/runs/{run['id']}/metrics", json={"attempt": 1, "points": points}).raise_for_status()
    console = TestClient(admin.app)
    sign_in(console, make_token(admin, "viewer"))
    page = console.get(f"/ui/runs/{run['id']}").text
    assert "2000 stored points, averaged over 4 steps per point" in page
    assert 'aria-label="loss scale (log): 500 points, steps 1-1997"' in page  # 4 to 32,768: a log axis
