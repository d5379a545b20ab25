"""The shipped Alertmanager config, rendered by service/alertmanager_config.py and loaded by a real
Alertmanager (Debian's prometheus-alertmanager, installed by .ci/prepare-machine): it starts with any subset
of receivers configured, secrets stay in their files, and a cordoned node inhibits its hardware pages."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from service.alertmanager_config import ConfigError, render, write_config
from tests.livesrv import free_port

REPO = Path(__file__).resolve().parents[2]
TEMPLATE = REPO / "dashboards" / "alertmanager" / "alertmanager.yml.tmpl"
SECRETS = {
    "pagerduty_routing_key": "pd-key-7f3a|&/",
    "slack_webhook_url": "https://hooks.slack.com/services/T0/B0/secret-slack-part",
    "oncall_webhook_url": "http://127.0.0.1:9/hook?token=secret-oncall-part",
}
ALERTMANAGER = shutil.which("alertmanager") or shutil.which("prometheus-alertmanager")


def _secrets_dir(tmp_path: Path, names: tuple[str, ...]) -> Path:
    directory = tmp_path / "secrets"
    directory.mkdir(exist_ok=True)
    for name in names:
        (directory / name).write_text(SECRETS[name] + "\n")
    return directory


def _integrations(config: dict[str, Any]) -> set[str]:
    return {
        f"{r['name']}/{k.removesuffix('_configs')}" for r in config["receivers"] for k in r if k != "name"
    }


def _alertmanager_version() -> tuple[int, ...]:
    assert ALERTMANAGER, "Alertmanager is not installed (make machine installs prometheus-alertmanager)"
    out = subprocess.run([ALERTMANAGER, "--version"], capture_output=True, text=True)
    found = re.search(r"version (\d+)\.(\d+)", out.stdout + out.stderr)
    assert found, out.stdout + out.stderr
    return tuple(int(g) for g in found.groups())


def _loadable_here(config: Path) -> Path:
    """The rendered config for the Alertmanager on this machine. Debian bookworm ships 0.25, whose webhook
    has no `url_file` (added in 0.26; docker-compose.yml pins 0.27): there only, the webhook gets its URL
    inline, read from the same secret file. Everything else is loaded as written."""
    if _alertmanager_version() >= (0, 26):
        return config
    data = yaml.safe_load(config.read_text())
    for receiver in data["receivers"]:
        for hook in receiver.get("webhook_configs", []):
            hook["url"] = Path(hook.pop("url_file")).read_text().strip()
    adapted = config.with_name("alertmanager-0.25.yml")
    adapted.write_text(yaml.safe_dump(data))
    return adapted


@contextmanager
def _running_alertmanager(config: Path, tmp_path: Path) -> Iterator[str]:
    port = free_port()
    log = tmp_path / f"alertmanager-{port}.log"
    with open(log, "wb") as out:
        assert ALERTMANAGER
        proc = subprocess.Popen(
            [
                ALERTMANAGER,
                f"--config.file={_loadable_here(config)}",
                f"--storage.path={tmp_path / f'am-data-{port}'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--cluster.listen-address=",  # no gossip: no fixed port 9094
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, f"alertmanager exited: {log.read_text()[-2000:]}"
            try:
                if httpx.get(f"{url}/-/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"alertmanager not ready: {log.read_text()[-2000:]}"
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.mark.parametrize(
    "configured",
    [(), ("slack_webhook_url",), tuple(SECRETS)],
    ids=["no-receiver", "slack-only", "all-receivers"],
)
def test_alertmanager_starts_with_any_subset_of_receivers(
    tmp_path: Path, configured: tuple[str, ...]
) -> None:
    secrets = _secrets_dir(tmp_path, configured)
    out = tmp_path / "alertmanager.yml"
    rendered = write_config(TEMPLATE, secrets, out)
    written = yaml.safe_load(out.read_text())
    # Every receiver the routes name stays; only integrations whose secret is there remain in it.
    assert [r["name"] for r in written["receivers"]] == ["page", "slack", "webhook"]
    expected = {
        (): set(),
        ("slack_webhook_url",): {"page/slack", "slack/slack"},
        tuple(SECRETS): {
            "page/pagerduty",
            "page/slack",
            "page/webhook",
            "slack/slack",
            "slack/webhook",
            "webhook/webhook",
        },
    }[configured]
    assert _integrations(written) == expected == set(rendered.kept)
    text = out.read_text()
    assert not any(value in text for value in SECRETS.values()), "a secret was written into the config"
    for receiver in written["receivers"]:
        for key, entries in receiver.items():
            for entry in entries if key != "name" else []:
                files = [v for k, v in entry.items() if k.endswith("_file")]
                assert files and all(Path(f).parent == secrets.resolve() for f in files), (key, entry)
    check = subprocess.run(
        ["amtool", "check-config", str(_loadable_here(out))], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr
    with _running_alertmanager(out, tmp_path) as url:
        status = httpx.get(f"{url}/api/v2/status", timeout=5).json()
        loaded = yaml.safe_load(status["config"]["original"])
        assert _integrations(loaded) == expected


def test_an_empty_secret_is_left_out_and_a_bad_url_is_refused_by_name(tmp_path: Path) -> None:
    secrets = _secrets_dir(tmp_path, ("pagerduty_routing_key",))
    (secrets / "slack_webhook_url").write_text("  \n")
    rendered = render(yaml.safe_load(TEMPLATE.read_text()), secrets)
    assert set(rendered.kept) == {"page/pagerduty"}
    assert "page/slack (slack_webhook_url is empty)" in rendered.left_out
    assert "webhook/webhook (no oncall_webhook_url)" in rendered.left_out

    (secrets / "oncall_webhook_url").write_text("hooks.example.com/no-scheme")
    with pytest.raises(ConfigError, match="oncall_webhook_url must hold an http"):
        render(yaml.safe_load(TEMPLATE.read_text()), secrets)
    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "service.alertmanager_config",
            f"--template={TEMPLATE}",
            f"--secrets-dir={secrets}",
            f"--out={tmp_path / 'out.yml'}",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert cli.returncode == 2 and "must hold an http(s) URL" in cli.stderr and "Traceback" not in cli.stderr
    assert not (tmp_path / "out.yml").exists()


def _post_alerts(url: str, alerts: list[dict[str, str]]) -> None:
    body = [{"labels": labels, "annotations": {"summary": labels["alertname"]}} for labels in alerts]
    assert httpx.post(f"{url}/api/v2/alerts", json=body, timeout=5).status_code == 200


def _states(url: str) -> dict[tuple[str, str], tuple[str, list[str]]]:
    """(alertname, node or run) -> (state, fingerprints of the alerts inhibiting it)."""
    alerts = httpx.get(f"{url}/api/v2/alerts", timeout=5).json()
    return {
        (a["labels"]["alertname"], a["labels"].get("node") or a["labels"].get("run", "")): (
            a["status"]["state"],
            a["status"]["inhibitedBy"],
        )
        for a in alerts
    }


def test_a_cordoned_node_inhibits_its_own_hardware_pages_only(tmp_path: Path) -> None:
    out = tmp_path / "alertmanager.yml"
    write_config(TEMPLATE, _secrets_dir(tmp_path, ()), out)
    for severity, receiver in (("page", "page"), ("warning", "slack"), ("info", "webhook")):
        routed = subprocess.run(
            ["amtool", "config", "routes", "test", f"--config.file={out}", f"severity={severity}"],
            capture_output=True,
            text=True,
        )
        assert routed.stdout.strip() == receiver, (severity, routed.stdout, routed.stderr)
    with _running_alertmanager(out, tmp_path) as url:
        _post_alerts(
            url,
            [
                {"alertname": "GPUEccDoubleBitError", "node": "node-2", "gpu": "1", "severity": "page"},
                {
                    "alertname": "GPUXidError",
                    "node": "node-2",
                    "gpu": "1",
                    "reason": "xid_48",
                    "severity": "page",
                },
                {"alertname": "GPUEccDoubleBitError", "node": "node-3", "gpu": "0", "severity": "page"},
            ],
        )
        # Before the cordon: every hardware alert pages.
        assert {s for s, _ in _states(url).values()} == {"active"}
        _post_alerts(
            url, [{"alertname": "NodeCordoned", "node": "node-2", "state": "cordoned", "severity": "warning"}]
        )
        states = _states(url)
        # node-2 is cordoned: its hardware pages are inhibited by the cordon, which itself still notifies.
        assert states[("GPUEccDoubleBitError", "node-2")][0] == "suppressed"
        assert states[("GPUXidError", "node-2")][0] == "suppressed"
        assert states[("GPUEccDoubleBitError", "node-2")][1] == states[("GPUXidError", "node-2")][1] != []
        assert states[("NodeCordoned", "node-2")] == ("active", [])
        # node-3 is not cordoned: its page goes out.
        assert states[("GPUEccDoubleBitError", "node-3")] == ("active", [])

        # The API down inhibits the run alerts it blinds, not the API's own page.
        _post_alerts(
            url,
            [
                {"alertname": "ControlPlaneDown", "severity": "page"},
                {"alertname": "RunStalled", "run": "opt-1", "severity": "page"},
            ],
        )
        states = _states(url)
        assert states[("RunStalled", "opt-1")][0] == "suppressed"
        assert states[("ControlPlaneDown", "")] == ("active", [])
