"""The `trainops` command line: serves the control plane and talks to it over its REST API."""

from __future__ import annotations

import datetime as dt
import json
import re
import sys
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import httpx
import typer

from service.config import Settings, get_settings
from service.console import (
    DataTable,
    console,
    err_console,
    esc,
    print_goodput,
    print_logbook,
    print_restart_preview,
)

if TYPE_CHECKING:  # the CLI imports the orchestrator lazily (its clients need no orchestrator code)
    from sqlalchemy.orm import Session, sessionmaker

    from service.orchestrator.loop import Orchestrator

app = typer.Typer(
    help="trainops: operations for long, large training runs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
runs_app = typer.Typer(help="Inspect and steer runs.", no_args_is_help=True)
nodes_app = typer.Typer(help="Inspect, cordon and uncordon hosts.", no_args_is_help=True)
tokens_app = typer.Typer(help="Manage API tokens (admin).", no_args_is_help=True)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
decisions_app = typer.Typer(
    help="The orchestrator's proposals that wait for a human (a run's approval gates).", no_args_is_help=True
)
app.add_typer(runs_app, name="runs")
app.add_typer(nodes_app, name="nodes")
app.add_typer(tokens_app, name="tokens")
app.add_typer(db_app, name="db")
app.add_typer(decisions_app, name="decisions")

UrlOpt = Annotated[str | None, typer.Option("--url", envvar="TRAINOPS_API_URL", help="Control plane URL.")]
TokenOpt = Annotated[str | None, typer.Option("--token", envvar="TRAINOPS_TOKEN", help="Bearer token.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print raw JSON.")]


def fail(message: str, code: int = 1) -> NoReturn:
    err_console.print(f"[bold red]error:[/] {esc(message)}")
    raise typer.Exit(code)


def _settings() -> Settings:
    try:
        return get_settings()
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        fail(f"invalid configuration: {exc}", 2)


class ApiClient:
    """A thin client of the REST API that turns every failure into a one-line CLI error."""

    def __init__(self, url: str | None, token: str | None, *, bootstrap: bool = False) -> None:
        """`bootstrap`: authenticate with TRAINOPS_BOOTSTRAP_ADMIN_TOKEN (how the first token is made in
        prod mode, where the CLI never falls back to it by itself)."""
        settings = _settings()
        self.base = (url or settings.resolved_api_url).rstrip("/")
        secret = token or (settings.token.get_secret_value() if settings.token else None)
        if bootstrap or (secret is None and settings.mode == "dev"):
            secret = settings.bootstrap_admin_token.get_secret_value()
        self.headers = {"Authorization": f"Bearer {secret}"} if secret else {}

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            r = httpx.request(method, f"{self.base}/api/v1{path}", headers=self.headers, timeout=30, **kwargs)
        except httpx.HTTPError as exc:
            fail(f"cannot reach the control plane at {self.base}: {exc}. Is `trainops up` running?")
        if r.status_code >= 400:
            try:
                detail = r.json().get("detail", r.text)
            except ValueError:
                detail = r.text
            if isinstance(detail, list):  # FastAPI validation errors
                detail = "; ".join(
                    f"{'.'.join(str(p) for p in d.get('loc', []))}: {d.get('msg')}" for d in detail
                )
            fail(f"{method} {path} -> HTTP {r.status_code}: {detail}")
        return r.json() if r.content else None


# The API's largest page (service/api/deps.py Limit): fewest round trips when every item is wanted.
MAX_PAGE_SIZE = 500


def _all_pages(client: ApiClient, path: str, **params: Any) -> list[Any]:
    """Every item of a paged list route (Page: items, total, limit, offset), fetched a page at a time."""
    items: list[Any] = []
    while True:
        page = client.request("GET", path, params={**params, "limit": MAX_PAGE_SIZE, "offset": len(items)})
        items.extend(page["items"])
        if not page["items"] or len(items) >= page["total"]:
            return items


def _emit(data: Any, as_json: bool, table: DataTable | None = None) -> None:
    if as_json or table is None:
        console.print_json(json.dumps(data, default=str))
    else:
        console.print(table)


# ---- serving ---------------------------------------------------------------------------------------


@app.command()
def up(
    host: Annotated[str | None, typer.Option(help="Bind address.")] = None,
    port: Annotated[int | None, typer.Option(help="Port.")] = None,
    migrate_first: Annotated[
        bool, typer.Option("--migrate/--no-migrate", help="Upgrade the schema first.")
    ] = True,
    orchestrate: Annotated[
        bool,
        typer.Option("--orchestrator/--no-orchestrator", help="Run the orchestrator loop in this process."),
    ] = True,
    quick_interval: Annotated[
        float,
        typer.Option(
            help="Seconds between embedded quick health sweeps (0 = none; with a broker, Celery beat "
            "does this)."
        ),
    ] = 30.0,
) -> None:
    """Serve the control plane (embedded defaults: SQLite under ./.trainops, no Redis), with the
    orchestrator and, without a broker, the health worker and its beat in the same process."""
    import threading

    import uvicorn

    from service import migrate
    from service.db import engine_from_settings, make_session_factory
    from service.main import create_app
    from service.orchestrator.runtime import start_embedded_beat, start_in_thread

    settings = _settings()
    if migrate_first:
        migrate.upgrade(settings.resolved_database_url)
    bind_host, bind_port = host or settings.api_host, port or settings.api_port
    factory = make_session_factory(engine_from_settings(settings))
    stop = threading.Event()
    orch = None
    if orchestrate:
        orch = _build_or_refuse(settings, factory)
        start_in_thread(orch)
    if settings.broker_url is None and quick_interval > 0:
        start_embedded_beat(settings, factory, interval_s=quick_interval, stop=stop)
    console.print(
        f"trainops control plane on http://{bind_host}:{bind_port}  (docs: /docs, "
        f"database: {settings.resolved_database_url.split('@')[-1]}"
        f"{', orchestrator on' if orchestrate else ''})"
    )
    try:
        uvicorn.run(
            create_app(settings, session_factory=factory), host=bind_host, port=bind_port, log_level="warning"
        )
    finally:
        stop.set()
        if orch is not None:
            orch.stop()


@app.command()
def orchestrator(
    once: Annotated[bool, typer.Option(help="Run one reconcile pass and exit.")] = False,
) -> None:
    """Run the orchestrator's reconcile loop against the configured database. On PostgreSQL several may
    run: one leads, the others stand by and take over when it dies (docs/orchestrator.md, Failover)."""
    from service.db import engine_from_settings, make_session_factory

    settings = _settings()
    factory = make_session_factory(engine_from_settings(settings))
    orch = _build_or_refuse(settings, factory)
    if once:
        if not orch.leads():
            console.print(f"another orchestrator leads ({orch.leader_description()}); this one did nothing")
            return
        done = orch.reconcile_once()
        orch.step_down()
        console.print(f"reconciled {len(done)} run(s)")
        return
    console.print(
        f"orchestrator reconciling every {orch.cfg.loop_interval_s:g} s while it leads; standing by "
        f"otherwise (Ctrl-C to stop)"
    )
    orch.run_forever()


def _build_or_refuse(settings: Settings, factory: sessionmaker[Session]) -> Orchestrator:
    """The orchestrator, or exit 1 with the reason it may not run (a second one on a SQLite database)."""
    from service.orchestrator.leadership import LeadershipRefused
    from service.orchestrator.runtime import build_orchestrator

    try:
        return build_orchestrator(settings, factory)
    except LeadershipRefused as refused:
        fail(f"orchestrator not started: {refused}")


@app.command()
def demo(
    exit_when_done: Annotated[
        bool, typer.Option("--exit", help="Exit when the run ends instead of serving on.")
    ] = False,
    port: Annotated[int | None, typer.Option(help="API port (default: TRAINOPS_API_PORT or 8000).")] = None,
) -> None:
    """The main job on embedded defaults: a small OPT run survives a killed rank, a GPU fault, a hang and a
    loss divergence by itself, live in the terminal, with the logbook and goodput at the end."""
    from pathlib import Path

    from service.demo import run_demo

    settings = _settings()
    code = run_demo(
        home=Path(settings.home).resolve() / "demo",
        port=port or settings.api_port,
        exit_when_done=exit_when_done,
    )
    raise typer.Exit(code)


@db_app.command("upgrade")
def db_upgrade(revision: Annotated[str, typer.Argument(help="Target revision.")] = "head") -> None:
    """Apply the schema migrations to the configured database."""
    from service import migrate

    url = _settings().resolved_database_url
    try:
        migrate.upgrade(url, revision)
    except Exception as exc:  # any driver or alembic error becomes one clear line
        fail(f"migration failed: {type(exc).__name__}: {exc}")
    console.print(f"database at {url.split('@')[-1]} is at revision {revision}")


@db_app.command("downgrade")
def db_downgrade(revision: Annotated[str, typer.Argument(help="Target revision, e.g. base.")]) -> None:
    """Roll the schema back to a revision."""
    from service import migrate

    url = _settings().resolved_database_url
    try:
        migrate.downgrade(url, revision)
    except Exception as exc:
        fail(f"migration failed: {type(exc).__name__}: {exc}")
    console.print(f"database at {url.split('@')[-1]} is at revision {revision}")


# ---- runs ------------------------------------------------------------------------------------------


@runs_app.command("list")
def runs_list(
    url: UrlOpt = None,
    token: TokenOpt = None,
    phase: Annotated[list[str] | None, typer.Option()] = None,
    limit: int = 50,
    as_json: JsonOpt = False,
) -> None:
    """List runs, newest first."""
    page = ApiClient(url, token).request("GET", "/runs", params={"phase": phase or [], "limit": limit})
    table = DataTable("id", "name", "owner", "phase", "desired", "restarts", "created")
    for r in page["items"]:
        table.add_row(
            str(r["id"]),
            r["name"],
            r["owner"],
            r["phase"],
            r["desired_state"],
            str(r["restart_count"]),
            r["created_at"][:19],
        )
    table.caption = f"{len(page['items'])} of {page['total']}"
    _emit(page, as_json, table)


@runs_app.command("create")
def runs_create(
    name: str,
    config_file: Annotated[
        typer.FileText,
        typer.Option("--config", help="JSON file of the run's config (preset, target_steps, ...)."),
    ],
    owner: Annotated[str, typer.Option(envvar="USER", help="Who the run belongs to.")] = "unknown",
    start: Annotated[bool, typer.Option("--start/--no-start", help="Ask the orchestrator to run it.")] = True,
    url: UrlOpt = None,
    token: TokenOpt = None,
) -> None:
    """Create a run (and, by default, ask the orchestrator to start it)."""
    try:
        config = json.load(config_file)
    except ValueError as exc:
        fail(f"{config_file.name} is not JSON: {exc}", 2)
    body = {"name": name, "owner": owner, "config": config, "start": start}
    run = ApiClient(url, token).request("POST", "/runs", json=body)
    console.print(
        f"run {run['id']} ({esc(run['name'])}): phase {run['phase']}, desired {run['desired_state']}"
    )


@runs_app.command("show")
def runs_show(run_id: int, url: UrlOpt = None, token: TokenOpt = None, as_json: JsonOpt = False) -> None:
    """Show one run with its attempts."""
    client = ApiClient(url, token)
    run = client.request("GET", f"/runs/{run_id}")
    attempts = _all_pages(client, f"/runs/{run_id}/attempts")
    if as_json:
        _emit({"run": run, "attempts": attempts}, True)
        return
    console.print(
        f"[bold]{esc(run['name'])}[/] (id {run['id']}, owner {esc(run['owner'])}): "
        f"phase [bold]{run['phase']}[/], desired {run['desired_state']}"
    )
    if run["phase_reason"]:
        console.print(f"  reason: {esc(run['phase_reason'])}")
    console.print(
        f"  overrides: lr_scale={run['lr_scale']} lr={run['lr_override']} clip={run['clip_override']}"
    )
    table = DataTable(
        "attempt", "hosts", "from ckpt", "start step", "last step", "exit", "code", "steps lost"
    )
    for a in attempts:
        table.add_row(
            str(a["number"]),
            ",".join(a["hosts"]),
            str(a["restored_from_checkpoint_id"] or "-"),
            str(a["start_step"]),
            str(a["last_step"] or "-"),
            a["exit_reason"] or "running",
            str(a["exit_code"] if a["exit_code"] is not None else "-"),
            str(a["steps_lost"] or 0),
        )
    console.print(table)


@runs_app.command("goodput")
def runs_goodput(run_id: int, url: UrlOpt = None, token: TokenOpt = None, as_json: JsonOpt = False) -> None:
    """Productive time over wall time, where the rest went, and MTTD/MTTR per failure class."""
    g = ApiClient(url, token).request("GET", f"/runs/{run_id}/goodput")
    if as_json:
        _emit(g, True)
        return
    print_goodput(g)


@runs_app.command("restart")
def runs_restart(
    run_id: int,
    reason: Annotated[str, typer.Option(help="Why; goes to the logbook.")],
    from_checkpoint: Annotated[int | None, typer.Option(help="Checkpoint id to restore.")] = None,
    lr_scale: Annotated[float | None, typer.Option()] = None,
    lr: Annotated[float | None, typer.Option()] = None,
    clip: Annotated[float | None, typer.Option()] = None,
    reset_loss_scale: Annotated[bool, typer.Option()] = False,
    skip_batches: Annotated[int, typer.Option()] = 0,
    url: UrlOpt = None,
    token: TokenOpt = None,
) -> None:
    """Restart a run with overrides (the OPT team's levers)."""
    body = {
        "reason": reason,
        "from_checkpoint_id": from_checkpoint,
        "lr_scale": lr_scale,
        "lr": lr,
        "clip": clip,
        "reset_loss_scale": reset_loss_scale,
        "skip_batches": skip_batches,
    }
    run = ApiClient(url, token).request(
        "POST", f"/runs/{run_id}/restart", json={k: v for k, v in body.items() if v is not None}
    )
    console.print(f"restart of {esc(run['name'])} requested")


@runs_app.command("restart-preview")
def runs_restart_preview(
    run_id: int,
    failure: Annotated[
        str, typer.Option(help="The failure to restart after: divergence, hardware or hang.")
    ] = "divergence",
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """What the orchestrator would restore now after FAILURE, and why (changes nothing)."""
    if failure not in ("divergence", "hardware", "hang"):
        fail(f"--failure must be divergence, hardware or hang, not {failure!r}", 2)
    p = ApiClient(url, token).request("GET", f"/runs/{run_id}/restart-preview", params={"failure": failure})
    if as_json:
        _emit(p, True)
        return
    print_restart_preview(p)


@runs_app.command("stop")
def runs_stop(
    run_id: int,
    reason: Annotated[str, typer.Option()] = "stopped by operator",
    url: UrlOpt = None,
    token: TokenOpt = None,
) -> None:
    """Ask a run to stop."""
    run = ApiClient(url, token).request("POST", f"/runs/{run_id}/stop", json={"reason": reason})
    console.print(f"{esc(run['name'])}: desired state {run['desired_state']}, phase {run['phase']}")


@runs_app.command("start")
def runs_start(run_id: int, url: UrlOpt = None, token: TokenOpt = None) -> None:
    """Ask a run to start."""
    run = ApiClient(url, token).request("POST", f"/runs/{run_id}/start")
    console.print(f"{esc(run['name'])}: desired state {run['desired_state']}, phase {run['phase']}")


# ---- nodes -----------------------------------------------------------------------------------------


@nodes_app.command("list")
def nodes_list(
    url: UrlOpt = None,
    token: TokenOpt = None,
    state: Annotated[list[str] | None, typer.Option()] = None,
    limit: int = 500,
    as_json: JsonOpt = False,
) -> None:
    """List hosts with their state and GPU count."""
    page = ApiClient(url, token).request("GET", "/nodes", params={"state": state or [], "limit": limit})
    table = DataTable("host", "state", "gpus", "failures", "blame", "reason")
    for n in page["items"]:
        table.add_row(
            n["hostname"],
            n["state"],
            str(len(n["gpus"])),
            str(n["failure_count"]),
            str(n["blame_count"]),
            n["state_reason"] or "",
        )
    table.caption = f"{len(page['items'])} of {page['total']}"
    _emit(page, as_json, table)


def local_gpu_inventory(host: str) -> list[dict[str, Any]]:
    """This machine's GPUs as NVML reports them (with TRAINOPS_FAKE_NVML naming a fake-NVML script, the
    simulated GPUs of `host` in it)."""
    from health.config import HealthConfig
    from health.nvml import load_pynvml, open_nvml

    try:
        # The NVML bindings are the health extra's, not the control plane's: a clear error without them.
        pynvml = load_pynvml()
    except ImportError as exc:
        fail(str(exc))
    nvml = open_nvml(HealthConfig.from_env(), host)
    try:
        nvml.nvmlInit()
    except pynvml.NVMLError as exc:
        fail(f"cannot read this host's GPUs through NVML ({type(exc).__name__}: {exc})")
    try:
        gpus = []
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            name, uuid = nvml.nvmlDeviceGetName(handle), nvml.nvmlDeviceGetUUID(handle)
            gpus.append(
                {
                    "index": index,
                    "uuid": uuid.decode() if isinstance(uuid, bytes) else uuid,
                    "model": name.decode() if isinstance(name, bytes) else name,
                    "memory_mb": int(nvml.nvmlDeviceGetMemoryInfo(handle).total) // 2**20,
                }
            )
        return gpus
    finally:
        nvml.nvmlShutdown()


@nodes_app.command("register")
def nodes_register(
    host: str,
    label: Annotated[list[str] | None, typer.Option(help="KEY=VALUE, repeatable (rack, zone, ...).")] = None,
    gpus_from_nvml: Annotated[
        bool,
        typer.Option(
            "--gpus-from-nvml",
            help="Declare the GPUs NVML reports on this machine (run it on the host itself).",
        ),
    ] = False,
    url: UrlOpt = None,
    token: TokenOpt = None,
) -> None:
    """Register a host (or refresh its labels and GPU inventory); the orchestrator schedules registered
    healthy hosts only."""
    labels: dict[str, str] = {}
    for item in label or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            fail(f"--label takes KEY=VALUE, not {item!r}", 2)
        labels[key] = value
    body: dict[str, Any] = {"hostname": host, "labels": labels}
    if gpus_from_nvml:
        body["gpus"] = local_gpu_inventory(host)
    node = ApiClient(url, token).request("POST", "/nodes", json=body)
    console.print(f"{esc(node['hostname'])}: {node['state']}, {len(node['gpus'])} GPU(s)")


@nodes_app.command("cordon")
def nodes_cordon(
    host: str,
    reason: Annotated[str, typer.Option(help="Required; goes to the logbook.")],
    url: UrlOpt = None,
    token: TokenOpt = None,
) -> None:
    """Take a host out of service."""
    node = ApiClient(url, token).request("POST", f"/nodes/{host}/cordon", json={"reason": reason})
    console.print(f"{esc(node['hostname'])}: {node['state']} ({esc(node['state_reason'])})")


@nodes_app.command("uncordon")
def nodes_uncordon(
    host: str,
    reason: Annotated[str, typer.Option(help="Required; goes to the logbook.")],
    url: UrlOpt = None,
    token: TokenOpt = None,
) -> None:
    """Return a host to service."""
    node = ApiClient(url, token).request("POST", f"/nodes/{host}/uncordon", json={"reason": reason})
    console.print(f"{esc(node['hostname'])}: {node['state']} ({esc(node['state_reason'])})")


# ---- logbook and tokens ----------------------------------------------------------------------------


@app.command()
def logbook(
    url: UrlOpt = None,
    token: TokenOpt = None,
    run_id: Annotated[int | None, typer.Option("--run")] = None,
    host: Annotated[str | None, typer.Option()] = None,
    kind: Annotated[list[str] | None, typer.Option()] = None,
    limit: int = 100,
    note: Annotated[str | None, typer.Option(help="Post this note instead of listing.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Read the logbook (oldest first), or post a note."""
    client = ApiClient(url, token)
    if note is not None:
        entry = client.request("POST", "/logbook", json={"message": note, "run_id": run_id, "hostname": host})
        console.print(f"note {entry['id']} posted")
        return
    params: dict[str, Any] = {"limit": limit, "kind": kind or []}
    if run_id is not None:
        params["run_id"] = run_id
    if host is not None:
        params["host"] = host
    page = client.request("GET", "/logbook", params=params)
    print_logbook(page["items"]) if not as_json else _emit(page, True)


DURATION_UNITS_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> dt.timedelta:
    """``90s``, ``15m``, ``12h``, ``30d``, ``2w`` (a bare number is seconds) as a positive timedelta."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text.lower())
    if match is None or float(match.group(1)) <= 0:
        raise typer.BadParameter(f"{text!r} is not a positive duration like 90s, 15m, 12h, 30d or 2w")
    return dt.timedelta(seconds=float(match.group(1)) * DURATION_UNITS_S[match.group(2) or "s"])


@tokens_app.command("create")
def tokens_create(
    name: Annotated[str, typer.Option(help="Who or what will use it.")],
    role: Annotated[str, typer.Option(help="viewer, operator, admin or trainer.")],
    run_id: Annotated[int | None, typer.Option("--run", help="Run a trainer token may feed.")] = None,
    expires_in: Annotated[
        str | None,
        typer.Option(
            "--expires-in",
            help="Lifetime, e.g. 12h, 30d or 2w (from now, by this machine's clock); default: never expires.",
        ),
    ] = None,
    bootstrap: Annotated[
        bool,
        typer.Option(
            "--bootstrap",
            help="Authenticate with TRAINOPS_BOOTSTRAP_ADMIN_TOKEN (the first token in prod mode).",
        ),
    ] = False,
    url: UrlOpt = None,
    token: TokenOpt = None,
) -> None:
    """Create a token; its secret is printed once (on stdout, alone on its last line)."""
    body: dict[str, Any] = {"name": name, "role": role}
    if run_id is not None:
        body["run_id"] = run_id
    if expires_in is not None:
        body["expires_at"] = (dt.datetime.now(dt.UTC) + parse_duration(expires_in)).isoformat()
    created = ApiClient(url, token, bootstrap=bootstrap).request("POST", "/tokens", json=body)
    expiry = f", expires {created['expires_at']}" if created.get("expires_at") else ""
    console.print(f"token {created['id']} ({created['role']}{esc(expiry)}) for {esc(created['name'])}:")
    print(created["token"])


@tokens_app.command("list")
def tokens_list(url: UrlOpt = None, token: TokenOpt = None, as_json: JsonOpt = False) -> None:
    """List tokens (never their secrets): role, run, attempt, created, expires, revoked."""
    tokens = ApiClient(url, token).request("GET", "/tokens")
    table = DataTable("id", "name", "role", "run", "attempt", "created", "expires", "revoked")
    for t in tokens:
        table.add_row(
            str(t["id"]),
            t["name"],
            t["role"],
            str(t["run_id"] or ""),
            str(t.get("attempt_id") or ""),
            t["created_at"],
            t.get("expires_at") or "never",
            t["revoked_at"] or "",
        )
    _emit(tokens, as_json, table)


@tokens_app.command("revoke")
def tokens_revoke(token_id: int, url: UrlOpt = None, token: TokenOpt = None) -> None:
    """Revoke a token now: it stops authenticating at once (401)."""
    revoked = ApiClient(url, token).request("POST", f"/tokens/{token_id}/revoke")
    console.print(f"token {revoked['id']} ({esc(revoked['name'])}) revoked at {revoked['revoked_at']}")


# ---- approval gates -------------------------------------------------------------------------------


@decisions_app.command("list")
def decisions_list(
    status: Annotated[
        str | None, typer.Option(help="pending, approved, rejected, timed_out, superseded")
    ] = None,
    run: Annotated[int | None, typer.Option("--run", help="Only this run's.")] = None,
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Proposals, newest first: what the orchestrator wants to do, why, and what was made of it."""
    params = {k: v for k, v in {"status": status, "run_id": run}.items() if v is not None}
    decisions = _all_pages(ApiClient(url, token), "/decisions", **params)
    table = DataTable("id", "run", "status", "gates", "proposed", "expires", "answer", "proposal")
    for d in decisions:
        proposal = d["proposal"]
        table.add_row(
            str(d["id"]),
            str(d["run_id"]),
            d["status"],
            ", ".join(d["gates"]),
            d["created_at"],
            f"{d['expires_at']} ({d['on_timeout']})",
            f"{d['decided_by'] or ''} {d['decision_reason'] or ''}".strip(),
            f"from step {proposal.get('checkpoint_step')}; {d['reason']}",
        )
    _emit(decisions, as_json, table)


def _decision_overrides(
    lr_scale: float | None,
    lr: float | None,
    clip: float | None,
    reset_loss_scale: bool | None,
    skip: int | None,
) -> dict[str, Any] | None:
    levers = {
        "lr_scale": lr_scale,
        "lr": lr,
        "clip": clip,
        "reset_loss_scale": reset_loss_scale,
        "skip_batches": skip,
    }
    chosen = {k: v for k, v in levers.items() if v is not None}
    return chosen or None


LrScaleOpt = Annotated[float | None, typer.Option(help="Your LR scale instead of the proposal's.")]
LrOpt = Annotated[float | None, typer.Option(help="Your absolute peak LR.")]
ClipOpt = Annotated[float | None, typer.Option(help="Your gradient clipping.")]
ResetOpt = Annotated[bool | None, typer.Option("--reset-loss-scale/--keep-loss-scale")]
SkipOpt = Annotated[int | None, typer.Option(help="Batches to skip after the restore.")]


@decisions_app.command("approve")
def decisions_approve(
    decision_id: int,
    reason: Annotated[str | None, typer.Option(help="Why; goes to the logbook.")] = None,
    lr_scale: LrScaleOpt = None,
    lr: LrOpt = None,
    clip: ClipOpt = None,
    reset_loss_scale: ResetOpt = None,
    skip_batches: SkipOpt = None,
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Carry the proposal out (optionally with your own levers) on the orchestrator's next pass."""
    body: dict[str, Any] = {"reason": reason} if reason else {}
    if levers := _decision_overrides(lr_scale, lr, clip, reset_loss_scale, skip_batches):
        body["overrides"] = levers
    decision = ApiClient(url, token).request("POST", f"/decisions/{decision_id}/approve", json=body)
    if as_json:
        _emit(decision, True)
        return
    console.print(f"decision {decision['id']} approved; the orchestrator carries it out on its next pass")


@decisions_app.command("reject")
def decisions_reject(
    decision_id: int,
    reason: Annotated[str, typer.Option(help="Why; goes to the logbook.")],
    lr_scale: LrScaleOpt = None,
    lr: LrOpt = None,
    clip: ClipOpt = None,
    reset_loss_scale: ResetOpt = None,
    skip_batches: SkipOpt = None,
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Do not carry the proposal out: restart with your levers instead, or (without any) hold the run."""
    body: dict[str, Any] = {"reason": reason}
    if levers := _decision_overrides(lr_scale, lr, clip, reset_loss_scale, skip_batches):
        body["overrides"] = levers
    decision = ApiClient(url, token).request("POST", f"/decisions/{decision_id}/reject", json=body)
    if as_json:
        _emit(decision, True)
        return
    then = "restarts with your levers" if levers else "holds the run (needs attention)"
    console.print(f"decision {decision['id']} rejected; the orchestrator {then}")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
