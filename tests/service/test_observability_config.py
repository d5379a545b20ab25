"""Static checks of the observability config: promtool on the rules, dashboard JSON against its generator and
the metrics module, the history SQL on PostgreSQL, and docker-compose.yml parsed by docker-compose with every
file, image and variable it names accounted for (the Alertmanager config: test_alertmanager.py)."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import importlib.util
import json
import os
import re
import subprocess
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pytest
import sqlalchemy as sa
import yaml
from psycopg import sql

from service import migrate
from service.crud import runs as runs_crud
from service.crud import telemetry
from service.db import make_engine, make_session_factory, transaction
from service.metrics import exported_metric_names
from tests.conftest import PG_ADMIN_DSN
from trainer.contract import TRAINER_LAYER_GROUPS, TRAINER_SIGNAL_VALUES

REPO = Path(__file__).resolve().parents[2]
DASH = REPO / "dashboards"
RULES = DASH / "prometheus" / "trainops.rules.yml"
PROMETHEUS_BUILTINS = {"ALERTS", "up"}


def _load_generator():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("dashboards_generate", DASH / "generate.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _metric_names(expr: str) -> set[str]:
    # PromQL identifiers that are metric names: trainops_* plus Prometheus's own series.
    return set(re.findall(r"\btrainops_[a-z0-9_]+", expr)) | (set(re.findall(r"\b(ALERTS|up)\b", expr)))


def test_promtool_checks_and_unit_tests_every_alert() -> None:
    check = subprocess.run(["promtool", "check", "rules", str(RULES)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    tests = DASH / "prometheus" / "trainops.rules.test.yml"
    run = subprocess.run(["promtool", "test", "rules", str(tests)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    alerts = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}
    cases = yaml.safe_load(tests.read_text())["tests"]
    firing = {c["alertname"] for t in cases for c in t["alert_rule_test"] if c["exp_alerts"]}
    quiet = {c["alertname"] for t in cases for c in t["alert_rule_test"] if not c["exp_alerts"]}
    assert alerts == firing == quiet, "every alert needs a firing and a not-firing unit test"
    config = DASH / "prometheus" / "prometheus.yml"
    check = subprocess.run(["promtool", "check", "config", "--syntax-only", str(config)], capture_output=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_every_rule_has_a_runbook_and_known_metrics() -> None:
    known = exported_metric_names() | PROMETHEUS_BUILTINS
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            assert rule["labels"]["severity"] in ("page", "warning", "info"), rule["alert"]
            assert len(rule["annotations"]["runbook"]) > 80, rule["alert"]
            assert rule["annotations"]["summary"], rule["alert"]
            assert _metric_names(rule["expr"]) <= known, (rule["alert"], _metric_names(rule["expr"]) - known)


def test_dashboard_json_is_generated_and_consistent() -> None:
    generator = _load_generator()
    rendered = generator.render()
    assert sorted(rendered) == sorted(p.name for p in (DASH / "grafana").glob("*.json"))
    provisioned = yaml.safe_load((DASH / "grafana/provisioning/datasources/trainops.yml").read_text())
    uids = {d["uid"] for d in provisioned["datasources"]}
    assert uids == {"trainops-prometheus", "trainops-postgres"}
    known = exported_metric_names() | PROMETHEUS_BUILTINS
    dashboard_uids = set()
    for name, text in rendered.items():
        assert (DASH / "grafana" / name).read_text() == text, (
            f"{name} is stale: run python dashboards/generate.py"
        )
        board = json.loads(text)
        dashboard_uids.add(board["uid"])
        ids = [p["id"] for p in board["panels"]]
        assert len(ids) == len(set(ids)), f"{name}: duplicate panel ids"
        for panel in board["panels"]:
            if panel["type"] == "row":
                continue
            assert panel["datasource"]["uid"] in uids, (name, panel["title"])
            assert panel["targets"], (name, panel["title"])
            for target in panel["targets"]:
                assert target["datasource"]["uid"] == panel["datasource"]["uid"], (name, panel["title"])
                if "expr" in target:
                    used = _metric_names(target["expr"])
                    assert used and used <= known, (name, panel["title"], used - known)
        for annotation in board["annotations"]["list"]:
            assert annotation["datasource"]["uid"] in uids
            assert _metric_names(annotation["expr"]) <= known
    assert len(dashboard_uids) == len(rendered)
    loss_scale = next(p for p in json.loads(rendered["run.json"])["panels"] if p["title"] == "Loss scale")
    custom = loss_scale["fieldConfig"]["defaults"]["custom"]
    assert custom["scaleDistribution"]["type"] == "log" and custom["thresholdsStyle"]["mode"] == "line"
    steps = loss_scale["fieldConfig"]["defaults"]["thresholds"]["steps"]
    assert [s["value"] for s in steps] == [None, 1.0]
    # the per-group panels name the trainer's own layer groups
    assert generator.LAYER_GROUPS == TRAINER_LAYER_GROUPS


def _grafana_sql(sql: str, run: str, start: dt.datetime, end: dt.datetime) -> str:
    """Expand the Grafana PostgreSQL macros the history panels use, as Grafana does."""
    sql = re.sub(
        r"\$__timeGroupAlias\(([\w.]+), \$__interval\)",
        r'floor(extract(epoch from \1) / 60) * 60 AS "time"',
        sql,
    )
    sql = re.sub(
        r"\$__timeFilter\(([\w.]+)\)", rf"\1 BETWEEN '{start.isoformat()}' AND '{end.isoformat()}'", sql
    )
    sql = sql.replace("$run", run)
    assert "$" not in sql, f"a Grafana macro this test does not expand: {sql}"
    return sql


@pytest.mark.postgres
def test_history_panels_sql_runs_on_postgres(postgres_url: str) -> None:
    migrate.upgrade(postgres_url)
    engine = make_engine(postgres_url)
    factory = make_session_factory(engine)
    now = dt.datetime.now(dt.UTC)
    with transaction(factory) as session:
        run = runs_crud.create_run(
            session, name="opt-history", owner="alice", config={}, start=False, author="t"
        )
        points = [
            {
                "step": s,
                "time": (now - dt.timedelta(seconds=10 * (300 - s))).timestamp(),
                "loss": 5.0,
                "loss_scale": 1024.0,
                "act_norm": 40.0,
                "actv_norm": 38.0,
                # every signal the trainer reports (docs/reporting-contract.md), positive so each panel's
                # rows can be told from missing ones
                "values": {
                    **dict.fromkeys(TRAINER_SIGNAL_VALUES, 0.25),
                    **({"val_loss": 5.2} if s % 10 == 0 else {}),
                },
            }
            for s in range(1, 300)
        ]
        telemetry.ingest_metrics(session, run_id=run.id, attempt=1, points=points)
    board = json.loads((DASH / "grafana" / "run.json").read_text())
    sql_targets = [
        (p["title"], t["rawSql"]) for p in board["panels"] for t in p.get("targets", []) if "rawSql" in t
    ]
    # loss (nats, bits), validation perplexity, loss scale, activation norm (mean, RMS), gradient norm,
    # maximum and zero share per layer group, clip share, embedding and parameter norms, GPU memory
    assert len(sql_targets) == 2 + 1 + 1 + 2 + 3 * len(TRAINER_LAYER_GROUPS) + 1 + 2 + 1
    with engine.connect() as conn:
        for title, sql in sql_targets:
            rows = conn.execute(
                sa.text(_grafana_sql(sql, "opt-history", now - dt.timedelta(hours=6), now))
            ).all()
            # One row per minute (a step every 10 s): 299 steps downsampled, each a time and a value.
            assert 20 <= len(rows) < 299, (title, len(rows))
            assert all(len(r) == 2 and r[1] is not None and r[1] > 0 for r in rows), title
    engine.dispose()


COMPOSE_ENV = {
    "POSTGRES_PASSWORD": "pw",
    "TRAINOPS_BOOTSTRAP_ADMIN_TOKEN": "q7Vd2LxN9rTfKp4mWz8bYc3HsJ6eUa1GvR5tQn0XoEi",
    "GRAFANA_ADMIN_PASSWORD": "gpw",
    "GRAFANA_DB_PASSWORD": "grafana-reader-pw",
    "REDIS_PASSWORD": "redis-pw-Xq2",
}
READER_INIT_SCRIPT = DASH / "postgres" / "10-trainops-reader.sh"


def _compose_config(tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["docker-compose", "-f", str(REPO / "docker-compose.yml"), "config"],
        capture_output=True,
        text=True,
        env={"PATH": os.environ["PATH"], "HOME": str(tmp_path), **env},
    )


def test_compose_file_parses_and_names_only_things_that_exist(tmp_path: Path) -> None:
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), **COMPOSE_ENV}
    config = subprocess.run(
        ["docker-compose", "-f", str(REPO / "docker-compose.yml"), "config"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert config.returncode == 0, config.stderr
    resolved = yaml.safe_load(config.stdout)
    services = resolved["services"]
    wanted = {"postgres", "redis", "migrate", "api", "orchestrator", "health-worker", "health-beat"}
    assert wanted | {"prometheus", "alertmanager", "grafana"} <= set(services)
    assert "healthcheck" in services["postgres"] and "healthcheck" in services["redis"]
    for name, service in services.items():
        image = service["image"]
        assert image == "trainops:latest" or re.fullmatch(r"[\w./-]+:[\w.-]+", image), (name, image)
        assert image == "trainops:latest" or not image.endswith(":latest"), f"{name}: pin the image version"
        for volume in service.get("volumes", []):
            # docker-compose 1.x resolves bind mounts to absolute "source:target[:mode]" strings.
            source = volume["source"] if isinstance(volume, dict) else volume.split(":", 1)[0]
            if source.startswith("/"):
                assert Path(source).exists(), (name, source)
        command = service.get("command") or []
        text = " ".join(command) if isinstance(command, list) else command
        for module in re.findall(r"-m ([\w.]+)", text):
            assert importlib.util.find_spec(module) is not None, (name, module)
    assert any(s.get("build") for s in services.values()) and (REPO / "Dockerfile").exists()
    # Alertmanager loads what alertmanager-config writes from the template and the secret files
    # (tests/service/test_alertmanager.py starts a real one with it).
    writer, alertmanager = services["alertmanager-config"], services["alertmanager"]
    assert alertmanager["depends_on"]["alertmanager-config"]["condition"] == "service_completed_successfully"
    assert importlib.util.find_spec(writer["entrypoint"][-1]) is not None
    written = next(a.split("=", 1)[1] for a in writer["command"] if a.startswith("--out="))
    assert f"--config.file={written}" in alertmanager["command"]
    secrets_dir = next(a.split("=", 1)[1] for a in writer["command"] if a.startswith("--secrets-dir="))
    for service in (writer, alertmanager):
        assert any(str(v).endswith(f":{secrets_dir}:ro") for v in service["volumes"]), service["volumes"]
    for name in ("health-host-worker", "trainer"):
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["capabilities"] == ["gpu"]
    # Every variable the file reads is documented for operators, and required ones fail loudly when unset.
    raw = (REPO / "docker-compose.yml").read_text()
    docs = (REPO / "docs" / "deployment.md").read_text()
    for variable in set(re.findall(r"\$\{(\w+)", raw)) - {"HOSTNAME"}:
        assert variable in docs, f"{variable} is not documented in docs/deployment.md"
    unset = subprocess.run(
        ["docker-compose", "-f", str(REPO / "docker-compose.yml"), "config", "-q"],
        capture_output=True,
        text=True,
        env={"PATH": os.environ["PATH"], "HOME": str(tmp_path)},
    )
    assert unset.returncode != 0 and "POSTGRES_PASSWORD" in unset.stderr


def _published_host_ips(service: dict[str, Any]) -> list[str]:
    """The host address of each port a resolved compose service publishes (no address = every interface)."""
    addresses = []
    for port in service.get("ports", []):
        if isinstance(port, dict):  # docker-compose 1.x: {published, target} without an address
            addresses.append(port.get("host_ip", "0.0.0.0"))
        else:  # "[host_ip:]published:target[/proto]"
            parts = str(port).split("/", 1)[0].split(":")
            addresses.append(parts[0] if len(parts) == 3 else "0.0.0.0")
    return addresses


def test_compose_exposes_only_the_api_and_grafana_and_guards_redis_and_the_database(tmp_path: Path) -> None:
    config = _compose_config(tmp_path, COMPOSE_ENV)
    assert config.returncode == 0, config.stderr
    services = yaml.safe_load(config.stdout)["services"]
    published = {name: _published_host_ips(s) for name, s in services.items() if s.get("ports")}
    public = {name for name, addresses in published.items() if any(a != "127.0.0.1" for a in addresses)}
    # Prometheus and Alertmanager have no auth: loopback only. PostgreSQL and Redis: not published.
    assert public == {"api", "grafana"}, published
    assert published["prometheus"] == published["alertmanager"] == ["127.0.0.1"]
    assert "postgres" not in published and "redis" not in published

    # Redis asks for the password, its healthcheck sends it, and every broker URL carries it.
    redis = services["redis"]
    command = redis["command"]
    assert command[command.index("--requirepass") + 1] == COMPOSE_ENV["REDIS_PASSWORD"]
    assert redis["environment"]["REDISCLI_AUTH"] == COMPOSE_ENV["REDIS_PASSWORD"]
    assert "PONG" in " ".join(redis["healthcheck"]["test"])
    broker_urls = {
        name: s["environment"]["TRAINOPS_BROKER_URL"]
        for name, s in services.items()
        if "TRAINOPS_BROKER_URL" in s.get("environment", {})
    }
    assert {"migrate", "api", "orchestrator", "health-worker", "health-beat", "health-host-worker"} <= set(
        broker_urls
    )
    for name, url in broker_urls.items():
        parsed = urlsplit(url)
        assert (parsed.scheme, parsed.hostname, parsed.port) == ("redis", "redis", 6379), (name, url)
        assert parsed.password == COMPOSE_ENV["REDIS_PASSWORD"], (name, "broker URL without the password")

    # Grafana reads PostgreSQL as the read-only role, never as the owner, with a password of its own that
    # the postgres service's init script gives that role.
    datasources = yaml.safe_load((DASH / "grafana/provisioning/datasources/trainops.yml").read_text())
    postgres_source = next(d for d in datasources["datasources"] if d["uid"] == "trainops-postgres")
    assert postgres_source["user"] == "trainops_reader"
    assert postgres_source["secureJsonData"]["password"] == "${GRAFANA_DB_PASSWORD}"
    grafana_env = services["grafana"]["environment"]
    assert (
        grafana_env["GRAFANA_DB_PASSWORD"]
        == COMPOSE_ENV["GRAFANA_DB_PASSWORD"]
        != COMPOSE_ENV["POSTGRES_PASSWORD"]
    )
    assert "GRAFANA_DB_USER" not in grafana_env
    postgres = services["postgres"]
    assert postgres["environment"]["GRAFANA_DB_PASSWORD"] == COMPOSE_ENV["GRAFANA_DB_PASSWORD"]
    assert (
        f"{READER_INIT_SCRIPT}:/docker-entrypoint-initdb.d/{READER_INIT_SCRIPT.name}:ro"
        in postgres["volumes"]
    )

    # Each of the new secrets is required: compose refuses to start without it, naming it.
    for variable in ("REDIS_PASSWORD", "GRAFANA_DB_PASSWORD"):
        without = {k: v for k, v in COMPOSE_ENV.items() if k != variable}
        refused = _compose_config(tmp_path, without)
        assert refused.returncode != 0 and variable in refused.stderr, (variable, refused.stderr)


def test_images_default_to_prod_mode_behind_the_entrypoint() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    stages = dict(re.findall(r"^FROM \S+ AS (\S+)\n(.*?)(?=^FROM |\Z)", dockerfile, re.M | re.S))
    assert set(stages) == {"source", "control", "gpu-host"}
    # Set in the stage both images build on, and changed by neither.
    assert re.search(r"^ENV .*\bTRAINOPS_MODE=prod\b", stages["source"], re.M), "images must default to prod"
    assert dockerfile.count("TRAINOPS_MODE=") == 2  # the ENV and the comment above it
    control = stages["control"]
    assert "COPY docker/entrypoint.sh /usr/local/bin/trainops-entrypoint" in control
    assert 'ENTRYPOINT ["/usr/local/bin/trainops-entrypoint"]' in control
    # The address comes from the entrypoint (loopback in dev), never a literal every-interface bind: run the
    # image's CMD through its entrypoint with uvicorn replaced by echo, and without the entrypoint.
    assert "0.0.0.0" not in control
    (cmd_json,) = re.findall(r"^CMD (\[.*\])$", control, re.M)
    shell, dash_c, script = json.loads(cmd_json)
    assert (shell, dash_c) == ("sh", "-c") and script.startswith("exec uvicorn ")
    echo_cmd = [shell, dash_c, script.replace("exec uvicorn ", "echo ", 1)]
    entrypoint = str(REPO / "docker" / "entrypoint.sh")
    base_env = {"PATH": os.environ["PATH"]}
    prod_env = {
        **base_env,
        "TRAINOPS_BOOTSTRAP_ADMIN_TOKEN": COMPOSE_ENV["TRAINOPS_BOOTSTRAP_ADMIN_TOKEN"],
        "TRAINOPS_DATABASE_URL": "postgresql+psycopg://trainops:pw@postgres:5432/trainops",
    }
    for argv, env, address in (
        ([entrypoint, *echo_cmd], {**base_env, "TRAINOPS_MODE": "dev"}, "127.0.0.1"),
        ([entrypoint, *echo_cmd], prod_env, "0.0.0.0"),
        (echo_cmd, base_env, "127.0.0.1"),  # --entrypoint replaced: loopback
    ):
        ran = subprocess.run(argv, capture_output=True, text=True, env=env)
        assert ran.returncode == 0, ran.stderr
        assert f"--host {address} --port 8000" in ran.stdout, (argv, ran.stdout)
    compose_api = " ".join(
        yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]["api"]["command"]
    )
    assert "0.0.0.0" not in compose_api and "$$TRAINOPS_API_HOST" in compose_api


def test_reader_init_script_is_valid_shell_and_refuses_without_a_password() -> None:
    syntax = subprocess.run(["bash", "-n", str(READER_INIT_SCRIPT)], capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr
    refused = subprocess.run(
        ["bash", str(READER_INIT_SCRIPT)], capture_output=True, text=True, env={"PATH": os.environ["PATH"]}
    )
    assert refused.returncode != 0 and "GRAFANA_DB_PASSWORD" in refused.stderr


def _scram_verifier_matches(verifier: str, password: str) -> bool:
    """Whether PostgreSQL's stored SCRAM-SHA-256 verifier is the one of `password` (RFC 5802 keys)."""
    method, rest = verifier.split("$", 1)
    assert method == "SCRAM-SHA-256", verifier
    iterations_salt, keys = rest.split("$")
    iterations, salt = iterations_salt.split(":")
    stored_key, _server_key = keys.split(":")
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), base64.b64decode(salt), int(iterations))
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    return hmac.compare_digest(hashlib.sha256(client_key).digest(), base64.b64decode(stored_key))


@pytest.mark.postgres
def test_reader_init_script_gives_the_role_a_login_and_the_password() -> None:
    dsn = urlsplit(PG_ADMIN_DSN)
    # A role of its own (roles are cluster-wide): the real trainops_reader may be in use by other tests.
    role = f"trainops_reader_test_{uuid.uuid4().hex[:8]}"
    env = {
        "PATH": os.environ["PATH"],
        "PGHOST": dsn.hostname or "127.0.0.1",
        "PGPORT": str(dsn.port or 5432),
        "POSTGRES_USER": dsn.username or "postgres",
        "POSTGRES_DB": dsn.path.lstrip("/"),
        "TRAINOPS_READER_ROLE": role,
    }
    # Quotes, a semicolon, a backslash and a psql variable sigil: all must reach the role as written.
    passwords = ["it's; DROP ROLE postgres; --\\ :'x' $1", "rotated-Zx81"]
    try:
        for password in passwords:  # the second run is a re-run on an existing role: it sets the new password
            ran = subprocess.run(
                ["bash", str(READER_INIT_SCRIPT)],
                capture_output=True,
                text=True,
                env={**env, "GRAFANA_DB_PASSWORD": password},
            )
            assert ran.returncode == 0, ran.stdout + ran.stderr
            with psycopg.connect(PG_ADMIN_DSN) as conn:
                can_login, verifier = conn.execute(
                    "SELECT rolcanlogin, rolpassword FROM pg_authid WHERE rolname = %s", (role,)
                ).fetchone() or (None, None)
            assert can_login is True
            assert verifier and _scram_verifier_matches(verifier, password), password
            assert not _scram_verifier_matches(verifier, passwords[0] if password != passwords[0] else "x")
    finally:
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))
