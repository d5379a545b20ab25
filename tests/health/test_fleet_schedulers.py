"""Scheduler adapters built from settings, the one sync of node states over every adapter, and the
control worker's sweeps mirroring their cordons.

The Kubernetes adapter is the real one (``kubernetes`` client, ``CoreV1Api``) talking HTTP to a tiny API
server started on a free port here: it answers the calls the adapter makes (GET a node, GET the node list,
PATCH a node with a JSON merge patch), records what it was sent, and can be told to stall its answers.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from sqlalchemy.orm import Session, sessionmaker

from health.celery_app import make_app
from health.config import HealthConfig
from service import migrate
from service.config import Settings, get_settings
from service.crud.logbook import list_logbook
from service.crud.nodes import cordon_node, get_node, register_node, uncordon_node
from service.db import make_engine, make_session_factory, transaction
from service.fleet import tasks
from service.fleet.gateway import SweepHealthGateway
from service.fleet.scheduler import TAINT_KEY, KubernetesAdapter, SchedulerNodes, SlurmAdapter
from service.fleet.schedulers import build_scheduler_adapters
from service.fleet.sync import sync_schedulers

TOKEN = "sa-token-for-tests"


def _merge(target: dict[str, Any], patch: dict[str, Any]) -> None:
    """RFC 7386 JSON merge patch: objects merge, null deletes, anything else (lists too) replaces."""
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = value


class FakeApiServer:
    """The three Kubernetes API calls the adapter makes, over real HTTP on 127.0.0.1:<free port>."""

    def __init__(self, names: Sequence[str]) -> None:
        self.nodes: dict[str, dict[str, Any]] = {
            n: {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {"name": n, "annotations": {}},
                "spec": {},
            }
            for n in names
        }
        self.requests: list[dict[str, Any]] = []
        # While stalled, every request waits this long (or until close) before it is answered: an API
        # server that accepts connections but does not answer in time.
        self.stall_s = 0.0
        self._closing = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _reply(self, code: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _record(self, body: Any = None) -> None:
                if server.stall_s:
                    server._closing.wait(server.stall_s)
                server.requests.append(
                    {
                        "method": self.command,
                        "path": self.path.split("?")[0],
                        "authorization": self.headers.get("Authorization"),
                        "content_type": self.headers.get("Content-Type"),
                        "body": body,
                    }
                )

            def _node(self) -> dict[str, Any] | None:
                name = self.path.split("?")[0].removeprefix("/api/v1/nodes/")
                node = server.nodes.get(name)
                if node is None:
                    self._reply(
                        404, {"kind": "Status", "status": "Failure", "reason": "NotFound", "code": 404}
                    )
                return node

            def do_GET(self) -> None:
                self._record()
                if self.path.split("?")[0] == "/api/v1/nodes":
                    items = list(server.nodes.values())
                    self._reply(200, {"apiVersion": "v1", "kind": "NodeList", "metadata": {}, "items": items})
                elif (node := self._node()) is not None:
                    self._reply(200, node)

            def do_PATCH(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                self._record(body)
                if (node := self._node()) is not None:
                    _merge(node, body)
                    self._reply(200, node)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._closing.set()
        self._httpd.shutdown()
        self._httpd.server_close()

    def patches(self) -> list[dict[str, Any]]:
        return [r for r in self.requests if r["method"] == "PATCH"]


@pytest.fixture
def api_server() -> Iterator[FakeApiServer]:
    server = FakeApiServer(["gpu-1", "gpu-2", "gpu-3"])
    yield server
    server.close()


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    return path


def _kubernetes_settings(url: str, token_file: Path) -> Settings:
    return Settings(scheduler="pool,kubernetes", kubernetes_api_url=url, kubernetes_token_file=token_file)


def _fleet(url: str, *hosts: str) -> sessionmaker[Session]:
    migrate.upgrade(url)
    factory = make_session_factory(make_engine(url))
    with transaction(factory) as session:
        for host in hosts:
            register_node(session, hostname=host, author="user:test")
    return factory


def _node(factory: sessionmaker[Session], host: str) -> tuple[str, str | None]:
    with transaction(factory) as session:
        node = get_node(session, hostname=host)
        return node.state.value, node.state_reason


# ---- settings -> adapters ----------------------------------------------------------------------------


def test_the_scheduler_setting_builds_the_kubernetes_adapter(
    monkeypatch: pytest.MonkeyPatch, api_server: FakeApiServer, token_file: Path
) -> None:
    monkeypatch.setenv("TRAINOPS_SCHEDULER", "pool, kubernetes")
    monkeypatch.setenv("TRAINOPS_KUBERNETES_API_URL", api_server.url)
    monkeypatch.setenv("TRAINOPS_KUBERNETES_TOKEN_FILE", str(token_file))
    settings = Settings()
    assert settings.scheduler == ("pool", "kubernetes")
    adapters = build_scheduler_adapters(settings)
    assert [type(a) for a in adapters] == [KubernetesAdapter]
    assert adapters[0].external_states().outside == {}
    assert api_server.requests[-1]["path"] == "/api/v1/nodes"
    assert api_server.requests[-1]["authorization"] == f"Bearer {TOKEN}"


def test_the_orchestrator_builds_its_gateway_from_the_setting(
    monkeypatch: pytest.MonkeyPatch, api_server: FakeApiServer, token_file: Path, sqlite_url: str
) -> None:
    """`trainops orchestrator` with TRAINOPS_SCHEDULER=kubernetes mirrors its cordons to the API server and
    syncs the drains made there; with Slurm too, both take the same gateway and the same sync."""
    from service.orchestrator.runtime import build_health_gateway

    monkeypatch.setenv("TRAINOPS_SCHEDULER", "kubernetes")
    monkeypatch.setenv("TRAINOPS_KUBERNETES_API_URL", api_server.url)
    monkeypatch.setenv("TRAINOPS_KUBERNETES_TOKEN_FILE", str(token_file))
    factory = _fleet(sqlite_url, "k1")
    gateway = build_health_gateway(Settings(), factory)
    assert type(gateway) is SweepHealthGateway
    assert [a.name for a in gateway.adapters] == ["kubernetes"]
    gateway.sync_external()
    assert any(r["path"] == "/api/v1/nodes" for r in api_server.requests)
    with_slurm = build_health_gateway(Settings(slurm_enabled=True), factory)
    assert type(with_slurm) is SweepHealthGateway
    assert [a.name for a in with_slurm.adapters] == ["slurm", "kubernetes"]


def test_the_default_is_the_own_pool_only_and_slurm_enabled_implies_slurm() -> None:
    assert Settings().scheduler == ("pool",)
    assert build_scheduler_adapters(Settings()) == []
    settings = Settings(slurm_enabled=True)
    assert settings.scheduler == ("pool", "slurm")
    assert [a.name for a in build_scheduler_adapters(settings)] == ["slurm"]


def test_in_cluster_defaults_come_from_the_pod_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, token_file: Path
) -> None:
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    ca = tmp_path / "ca.crt"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    settings = Settings(scheduler="kubernetes", kubernetes_token_file=token_file, kubernetes_ca_file=ca)
    assert settings.resolved_kubernetes_api_url == "https://10.96.0.1:443"
    assert str(Settings().kubernetes_token_file) == "/var/run/secrets/kubernetes.io/serviceaccount/token"
    assert str(Settings().kubernetes_ca_file) == "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"TRAINOPS_SCHEDULER": "nomad"}, "expected a comma-separated list of pool, slurm, kubernetes"),
        ({"TRAINOPS_SCHEDULER": "slurm"}, "TRAINOPS_SLURM_ENABLED is false"),
        ({"TRAINOPS_SCHEDULER": "kubernetes"}, "set TRAINOPS_KUBERNETES_API_URL"),
        (
            {"TRAINOPS_SCHEDULER": "kubernetes", "TRAINOPS_KUBERNETES_API_URL": "ftp://k8s"},
            "is not an http\\(s\\) URL",
        ),
        (
            {"TRAINOPS_SCHEDULER": "kubernetes", "TRAINOPS_KUBERNETES_API_URL": "http://127.0.0.1:1"},
            "TRAINOPS_KUBERNETES_TOKEN_FILE=/nonexistent/token does not exist",
        ),
        (
            {
                "TRAINOPS_SCHEDULER": "kubernetes",
                "TRAINOPS_KUBERNETES_API_URL": "https://k8s.example:6443",
                "TRAINOPS_KUBERNETES_TOKEN_FILE": "<token>",
            },
            "TRAINOPS_KUBERNETES_CA_FILE=/nonexistent/ca.crt does not exist",
        ),
    ],
)
def test_a_bad_scheduler_setting_fails_at_construction_with_the_fix(
    monkeypatch: pytest.MonkeyPatch, token_file: Path, env: dict[str, str], message: str
) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("TRAINOPS_KUBERNETES_TOKEN_FILE", "/nonexistent/token")
    monkeypatch.setenv("TRAINOPS_KUBERNETES_CA_FILE", "/nonexistent/ca.crt")
    for key, value in env.items():
        monkeypatch.setenv(key, str(token_file) if value == "<token>" else value)
    with pytest.raises(ValidationError, match=message):
        Settings()


# ---- a cordon through the gateway reaches the API server ---------------------------------------------


def test_a_cordon_through_the_gateway_patches_the_node_like_kubectl_cordon(
    sqlite_url: str, api_server: FakeApiServer, token_file: Path
) -> None:
    factory = _fleet(sqlite_url, "gpu-1", "gpu-2")
    api_server.nodes["gpu-1"]["spec"]["taints"] = [
        {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}
    ]
    adapters = build_scheduler_adapters(_kubernetes_settings(api_server.url, token_file))
    gateway = SweepHealthGateway(factory, adapters=adapters)
    gateway.cordon(["gpu-1"], reason="XID 79 (GPU has fallen off the bus)", evidence={"xid": 79}, run_id=None)

    assert _node(factory, "gpu-1")[0] == "cordoned"
    [patch] = api_server.patches()
    assert patch["path"] == "/api/v1/nodes/gpu-1"
    assert patch["authorization"] == f"Bearer {TOKEN}"
    assert "merge-patch+json" in patch["content_type"]
    # what `kubectl cordon gpu-1` sends ({"spec": {"unschedulable": true}}), plus our taint and reason
    assert patch["body"]["spec"]["unschedulable"] is True
    node = api_server.nodes["gpu-1"]
    assert node["spec"]["unschedulable"] is True
    assert [t["key"] for t in node["spec"]["taints"]] == ["nvidia.com/gpu", TAINT_KEY]
    assert "XID 79" in node["metadata"]["annotations"]["trainops.io/cordon-reason"]
    assert "unschedulable" not in api_server.nodes["gpu-2"]["spec"]  # nothing else touched


def test_an_unreachable_api_server_is_logged_and_the_cordon_still_happens(
    sqlite_url: str, token_file: Path
) -> None:
    server = FakeApiServer([])
    url = server.url
    server.close()  # nothing listens there any more
    factory = _fleet(sqlite_url, "gpu-1")
    gateway = SweepHealthGateway(
        factory, adapters=build_scheduler_adapters(_kubernetes_settings(url, token_file))
    )
    gateway.cordon(["gpu-1"], reason="XID 79", evidence={}, run_id=None)
    assert _node(factory, "gpu-1")[0] == "cordoned"
    with transaction(factory) as session:
        entries, _ = list_logbook(session, node_id=get_node(session, hostname="gpu-1").id)
        failure = next(e for e in entries if e.message.startswith("kubernetes could not cordon gpu-1"))
        assert failure.evidence["adapter"] == "kubernetes"


# ---- outside drains -> cordons, one sync for every adapter --------------------------------------------


def test_a_node_cordoned_by_an_admin_in_kubernetes_is_cordoned_and_released_by_the_sync(
    sqlite_url: str, api_server: FakeApiServer, token_file: Path
) -> None:
    factory = _fleet(sqlite_url, "gpu-1", "gpu-2", "gpu-3")
    gateway = SweepHealthGateway(
        factory, adapters=build_scheduler_adapters(_kubernetes_settings(api_server.url, token_file))
    )
    gateway.cordon(["gpu-1"], reason="XID 79", evidence={}, run_id=None)  # ours: tainted, not external
    api_server.nodes["gpu-2"]["spec"]["unschedulable"] = True  # `kubectl cordon gpu-2`

    report = gateway.sync_external()
    assert report.cordoned == ["kubernetes:gpu-2"] and report.errors == []
    state, reason = _node(factory, "gpu-2")
    assert state == "cordoned"
    assert reason == "kubernetes: gpu-2 is drained outside trainops: cordoned outside trainops"
    with transaction(factory) as session:
        entries, _ = list_logbook(session, node_id=get_node(session, hostname="gpu-2").id)
        assert entries[-1].author == "system:orchestrator/kubernetes"
        assert entries[-1].evidence["adapter"] == "kubernetes"
        assert entries[-1].evidence["external_reason"] == "cordoned outside trainops"
    assert _node(factory, "gpu-3")[0] == "healthy"
    assert gateway.sync_external().cordoned == []  # level-triggered: nothing new

    del api_server.nodes["gpu-2"]["spec"]["unschedulable"]  # `kubectl uncordon gpu-2`
    report = gateway.sync_external()
    assert report.released == ["kubernetes:gpu-2"]
    assert _node(factory, "gpu-2")[0] == "healthy"
    assert _node(factory, "gpu-1")[0] == "cordoned"  # trainops' own cordon is never lifted by the sync


def test_a_cordon_whose_mirroring_failed_reaches_kubernetes_on_the_next_sync_and_an_uncordon_releases_it(
    sqlite_url: str, api_server: FakeApiServer, token_file: Path
) -> None:
    """The sync works both ways: trainops' out-of-service nodes are cordoned in the scheduler (a cordon made
    while the API server was away), and a node back in service is released there (an operator's uncordon
    does not call the adapters itself)."""
    factory = _fleet(sqlite_url, "gpu-1", "gpu-2")
    with transaction(factory) as session:  # a sweep's cordon whose mirroring failed: not in Kubernetes
        cordon_node(session, hostname="gpu-1", reason="XID 79", author="health/beat")
    gateway = SweepHealthGateway(
        factory, adapters=build_scheduler_adapters(_kubernetes_settings(api_server.url, token_file))
    )
    report = gateway.sync_external()
    assert report.mirrored == ["kubernetes:gpu-1"] and report.cordoned == []
    node = api_server.nodes["gpu-1"]
    assert node["spec"]["unschedulable"] is True and node["spec"]["taints"][0]["key"] == TAINT_KEY
    assert "unschedulable" not in api_server.nodes["gpu-2"]["spec"]
    assert gateway.sync_external().mirrored == []  # level-triggered: held now, nothing to do

    with transaction(factory) as session:
        uncordon_node(session, hostname="gpu-1", reason="GPU swapped", author="user:ops")
    report = gateway.sync_external()
    assert report.resumed == ["kubernetes:gpu-1"]
    assert node["spec"]["unschedulable"] is False and node["spec"]["taints"] == []
    with transaction(factory) as session:
        entries, _ = list_logbook(session, node_id=get_node(session, hostname="gpu-1").id)
        assert entries[-1].message == "node gpu-1: released in kubernetes (back in service in trainops)"


# ---- a Kubernetes API server that does not answer in time ----------------------------------------------


def test_a_kubernetes_call_that_times_out_is_logged_and_never_fatal(
    sqlite_url: str, api_server: FakeApiServer, token_file: Path
) -> None:
    """Every Kubernetes call is bounded by TRAINOPS_KUBERNETES_TIMEOUT_S: a stalled API server is a scheduler
    failure like a down one; the cordon still happens and the sync makes and lifts nothing on a guess."""
    factory = _fleet(sqlite_url, "gpu-1", "gpu-2")
    settings = Settings(
        scheduler="kubernetes",
        kubernetes_api_url=api_server.url,
        kubernetes_token_file=token_file,
        kubernetes_timeout_s=0.2,
    )
    gateway = SweepHealthGateway(factory, adapters=build_scheduler_adapters(settings))
    api_server.stall_s = 30.0  # answers only after 30 s: without a timeout the calls would succeed then

    gateway.cordon(["gpu-1"], reason="XID 79", evidence={}, run_id=None)
    assert _node(factory, "gpu-1")[0] == "cordoned"
    report = gateway.sync_external()
    assert [e.split(":")[0] for e in report.errors] == ["kubernetes"] and "timed out" in report.errors[0]
    assert report.cordoned == report.released == report.mirrored == []
    assert api_server.patches() == []
    with transaction(factory) as session:
        entries, _ = list_logbook(session, limit=1000)
        cordon_failure = next(e for e in entries if e.message.startswith("kubernetes could not cordon gpu-1"))
        assert cordon_failure.kind.value == "failure" and "timed out" in cordon_failure.evidence["error"]
        listing_failure = next(e for e in entries if e.message.startswith("kubernetes could not list"))
        assert listing_failure.evidence["action"] == "external_states"

    api_server.stall_s = 0.0  # the API server answers again: the next pass mirrors the cordon
    assert gateway.sync_external().mirrored == ["kubernetes:gpu-1"]
    assert api_server.nodes["gpu-1"]["spec"]["unschedulable"] is True


def test_the_timeout_setting_must_be_positive() -> None:
    assert Settings().kubernetes_timeout_s == 10.0
    with pytest.raises(ValidationError, match="kubernetes_timeout_s"):
        Settings(kubernetes_timeout_s=0)


# ---- Slurm's drains and outages take the same sync ----------------------------------------------------


def _sinfo_json(*nodes: tuple[str, list[str], str]) -> str:
    return json.dumps({"nodes": [{"name": n, "state": states, "reason": r} for n, states, r in nodes]})


class _Slurm:
    """Slurm's commands for the adapter: ``sinfo --json`` answers ``nodes``; ``scontrol`` is recorded, or
    refused for the node names in ``refuse``."""

    def __init__(self, *nodes: tuple[str, list[str], str], refuse: Sequence[str] = ()) -> None:
        self.nodes = list(nodes)
        self.refuse = set(refuse)
        self.scontrol: list[list[str]] = []

    def __call__(self, argv: Sequence[str]) -> str:
        if argv[0] == "sinfo":
            return _sinfo_json(*self.nodes)
        if argv[2].removeprefix("NodeName=") in self.refuse:
            raise RuntimeError("scontrol: error: Invalid node name specified")
        self.scontrol.append(list(argv))
        return ""


class _Down:
    name = "kubernetes"

    def cordon(self, host: str, reason: str) -> None: ...

    def uncordon(self, host: str, reason: str) -> None: ...

    def external_states(self) -> SchedulerNodes:
        raise ConnectionError("Kubernetes API unreachable")


def test_slurm_drains_take_the_same_sync_and_a_failing_adapter_stops_neither(sqlite_url: str) -> None:
    factory = _fleet(sqlite_url, "node001", "node002", "node003")
    with transaction(factory) as session:
        cordon_node(session, hostname="node003", reason="operator: bad fan", author="user:ops")
    slurm = _Slurm(
        ("node001", ["IDLE", "DRAIN"], "trainops: hard fault"),
        ("node002", ["IDLE", "DRAIN"], "bad DIMM, ticket 4411"),
        ("node003", ["IDLE", "DRAIN"], "fan"),
        ("node009", ["IDLE", "DRAIN"], "x"),
    )

    report = sync_schedulers(factory, [_Down(), SlurmAdapter(run=slurm)], author="system:fleet")
    assert report.errors == ["kubernetes: Kubernetes API unreachable"]
    assert report.cordoned == ["slurm:node002"]  # node001 is our drain, node003 already out, node009 unknown
    assert _node(factory, "node002") == (
        "cordoned",
        "slurm: node002 is drained outside trainops: bad DIMM, ticket 4411",
    )
    # node001 is in service in trainops but still drained by us in Slurm: released there
    assert report.resumed == ["slurm:node001"]
    assert slurm.scontrol == [["scontrol", "update", "NodeName=node001", "State=RESUME"]]
    assert _node(factory, "node001")[0] == "healthy"
    with transaction(factory) as session:
        entries, _ = list_logbook(session)
        failure = next(e for e in entries if e.message.startswith("kubernetes could not list"))
        assert failure.kind.value == "failure" and failure.author == "system:fleet/kubernetes"
        assert failure.evidence == {
            "adapter": "kubernetes",
            "action": "external_states",
            "error": "Kubernetes API unreachable",
        }

    slurm.nodes = [("node002", ["IDLE"], ""), ("node003", ["IDLE", "DRAIN"], "fan")]  # node002 resumed
    report = sync_schedulers(factory, [SlurmAdapter(run=slurm)])
    assert report.released == ["slurm:node002"]
    assert _node(factory, "node002")[0] == "healthy"
    assert _node(factory, "node003") == ("cordoned", "operator: bad fan")  # not ours to lift


def test_a_node_slurm_has_down_is_cordoned_with_slurms_reason_and_released_when_it_is_back(
    sqlite_url: str,
) -> None:
    factory = _fleet(sqlite_url, "n1", "n2", "n3", "n4")
    slurm = _Slurm(
        ("n1", ["IDLE"], ""),
        ("n2", ["DOWN", "NOT_RESPONDING"], "Not responding"),  # DOWN*: slurmd stopped answering
        ("n3", ["FAIL"], "PSU alarm"),
        ("n4", ["DOWN"], "pulled the plug"),
    )
    gateway = SweepHealthGateway(factory, author="system:orchestrator", adapters=[SlurmAdapter(run=slurm)])
    report = gateway.sync_external()
    assert report.cordoned == ["slurm:n2", "slurm:n3", "slurm:n4"] and report.errors == []
    assert _node(factory, "n2") == ("cordoned", "slurm: n2 is down: Not responding")
    assert _node(factory, "n3") == ("cordoned", "slurm: n3 is down: PSU alarm")
    assert _node(factory, "n1")[0] == "healthy"
    assert slurm.scontrol == []  # an outage is Slurm's: trainops neither drains nor resumes it
    with transaction(factory) as session:
        entries, _ = list_logbook(session, node_id=get_node(session, hostname="n4").id)
        assert entries[-1].author == "system:orchestrator/slurm"
        assert entries[-1].evidence["external_reason"] == "pulled the plug"
        assert entries[-1].evidence["slurm_states"] == ["DOWN"]

    slurm.nodes = [("n2", ["IDLE"], ""), ("n3", ["FAIL"], "PSU alarm"), ("n4", ["IDLE"], "")]  # back
    report = gateway.sync_external()
    assert report.released == ["slurm:n2", "slurm:n4"] and report.cordoned == []
    assert _node(factory, "n2")[0] == _node(factory, "n4")[0] == "healthy"
    assert _node(factory, "n3")[0] == "cordoned"
    assert slurm.scontrol == []


def test_the_sync_logs_a_failing_scontrol_and_goes_on_to_the_next_node(sqlite_url: str) -> None:
    factory = _fleet(sqlite_url, "gpu-41", "gpu-42")
    with transaction(factory) as session:
        for host in ("gpu-41", "gpu-42"):
            cordon_node(session, hostname=host, reason="XID 79", author="user:test")
    slurm = _Slurm(("gpu-41", ["IDLE"], ""), ("gpu-42", ["IDLE"], ""), refuse=["gpu-41"])

    report = sync_schedulers(factory, [SlurmAdapter(run=slurm)], author="system:orchestrator")
    assert report.mirrored == ["slurm:gpu-42"]
    assert [argv[2] for argv in slurm.scontrol] == ["NodeName=gpu-42"]
    assert report.errors == ["slurm: gpu-41: scontrol: error: Invalid node name specified"]
    with transaction(factory) as session:
        node = get_node(session, hostname="gpu-41")
        entries, _ = list_logbook(session, node_id=node.id)
        assert entries[-1].message.startswith("slurm could not cordon gpu-41")
        assert entries[-1].evidence == {
            "adapter": "slurm",
            "state": "cordoned",
            "error": "scontrol: error: Invalid node name specified",
        }


# ---- the control worker's sweeps mirror their cordons --------------------------------------------------


@pytest.fixture
def control_settings(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[dict[str, str]], None]]:
    """Set the control worker's environment; its settings and scheduler adapters are built once per
    process, so they are rebuilt here, and again afterwards for the next test."""

    def use(env: dict[str, str]) -> None:
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        get_settings.cache_clear()
        tasks.control_scheduler_adapters.cache_clear()

    yield use
    get_settings.cache_clear()
    tasks.control_scheduler_adapters.cache_clear()


def test_a_cordon_by_beats_sweep_is_mirrored_to_kubernetes(
    sqlite_url: str,
    tmp_path: Path,
    api_server: FakeApiServer,
    token_file: Path,
    control_settings: Callable[[dict[str, str]], None],
) -> None:
    control_settings(
        {
            "TRAINOPS_SCHEDULER": "pool,kubernetes",
            "TRAINOPS_KUBERNETES_API_URL": api_server.url,
            "TRAINOPS_KUBERNETES_TOKEN_FILE": str(token_file),
        }
    )
    factory = _fleet(sqlite_url, "gpu-1", "gpu-2")
    faults = tmp_path / "faults.json"
    faults.write_text(
        json.dumps({"default_gpus": 8, "hosts": {"gpu-1": {"faults": [{"gpu": 3, "kind": "ecc_dbe"}]}}})
    )
    app = make_app(
        HealthConfig(
            fake_nvml_path=faults,
            checkpoint_dir=tmp_path / "ckpt",
            min_free_disk_gb=0.001,
            quick_check_timeout_s=10.0,
            disk_test_mb=2,
            min_disk_write_mb_s=1.0,
        )
    )
    assert app.embedded_worker is not None
    app.session_factory = factory
    try:
        summary = app.tasks[tasks.QUICK_SWEEP_TASK].apply().get()  # what Celery beat schedules
    finally:
        app.embedded_worker.stop()
    assert summary["changed"] == {"gpu-1": "healthy->cordoned"}
    [patch] = api_server.patches()
    assert patch["path"] == "/api/v1/nodes/gpu-1" and patch["body"]["spec"]["unschedulable"] is True
    assert "double-bit" in api_server.nodes["gpu-1"]["metadata"]["annotations"]["trainops.io/cordon-reason"]


def test_the_embedded_beat_mirrors_its_cordons_like_the_control_workers(
    sqlite_url: str, api_server: FakeApiServer, token_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `trainops up` without Redis runs the beat in-process: its sweeps get the same scheduler adapters
    import service.orchestrator.runtime as runtime

    swept = threading.Event()
    seen: dict[str, Any] = {}

    def recording_sweep(factory: Any, **kwargs: Any) -> None:
        seen.update(kwargs)
        swept.set()

    monkeypatch.setattr(runtime, "run_sweep", recording_sweep)
    stop = threading.Event()
    settings = _kubernetes_settings(api_server.url, token_file)
    thread = runtime.start_embedded_beat(settings, _fleet(sqlite_url, "gpu-1"), interval_s=0.05, stop=stop)
    try:
        assert swept.wait(10)
    finally:
        stop.set()
        thread.join(5)
    assert seen["level"] == "quick" and [a.name for a in seen["adapters"]] == ["kubernetes"]
