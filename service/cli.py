"""The `trainops` command line: serves the control plane and talks to it over its REST API."""

from __future__ import annotations

import datetime as dt
import enum
import json
import re
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import httpx
import typer

from service.config import Settings, get_settings
from service.console import (
    DataTable,
    console,
    err_console,
    esc,
    iso_time,
    print_goodput,
    print_logbook,
    print_restart_preview,
)

if TYPE_CHECKING:  # the CLI imports the orchestrator lazily (its clients need no orchestrator code)
    from sqlalchemy.orm import Session, sessionmaker

    from service.orchestrator.loop import Orchestrator


class ExitCode(enum.IntEnum):
    """The CLI's exit statuses (docs/cli.md): 0, 1 and 2 as click uses them, the codes from BSD's sysexits.h
    for the API's answers, 124 for a timeout as timeout(1) has it, and 3 for a run that ended badly."""

    ok = 0
    error = 1  # anything else: a 400, a 500, a failed migration
    usage = 2  # a bad option or argument (click's own), a bad local configuration
    run_not_completed = 3  # `runs follow` / `--wait`: the run failed, needs attention or was stopped
    validation = 65  # EX_DATAERR: a run file or a request the schema refuses (client-side or HTTP 422)
    not_found = 66  # EX_NOINPUT: HTTP 404, what was named does not exist
    unreachable = 69  # EX_UNAVAILABLE: no answer from the control plane (refused, DNS, timeout)
    conflict = 75  # EX_TEMPFAIL: HTTP 409, the state does not allow it now
    forbidden = 77  # EX_NOPERM: HTTP 401 or 403, a missing, wrong, expired or too weak token
    timeout = 124  # `--wait` / `runs follow --timeout`: the state was not reached in time
    interrupted = 130  # Ctrl-C (128 + SIGINT, as shells report it)


EXIT_CODES_HELP = "Exit codes: " + ", ".join(f"{c.value} {c.name.replace('_', ' ')}" for c in ExitCode) + "."

HTTP_EXIT_CODES = {
    401: ExitCode.forbidden,
    403: ExitCode.forbidden,
    404: ExitCode.not_found,
    409: ExitCode.conflict,
    422: ExitCode.validation,
}

app = typer.Typer(
    help=f"trainops: operations for long, large training runs. {EXIT_CODES_HELP}",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
runs_app = typer.Typer(help="Inspect and steer runs.", no_args_is_help=True)
diagnostics_app = typer.Typer(help="Health checks the agents recorded; fleet sweeps.", no_args_is_help=True)
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
app.add_typer(diagnostics_app, name="diagnostics")

UrlOpt = Annotated[str | None, typer.Option("--url", envvar="TRAINOPS_API_URL", help="Control plane URL.")]
TokenOpt = Annotated[str | None, typer.Option("--token", envvar="TRAINOPS_TOKEN", help="Bearer token.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the API's JSON answer instead of text.")]
WaitOpt = Annotated[
    bool, typer.Option("--wait", help="Return once the run reaches the state (see --timeout).")
]
TimeoutOpt = Annotated[
    float,
    typer.Option("--timeout", min=0.1, help=f"Seconds --wait waits (exit {ExitCode.timeout.value} after)."),
]


def fail(message: str, code: int = ExitCode.error) -> NoReturn:
    # soft_wrap: one line whatever the width, so a field path or a URL can be searched for and copied
    err_console.print(f"[bold red]error:[/] {esc(message)}", soft_wrap=True)
    raise typer.Exit(int(code))


def validation_lines(errors: list[dict[str, Any]], *, drop_prefix: str | None = None) -> str:
    """Pydantic's (or FastAPI's) errors as ``field.path: message`` joined by ``; ``; ``drop_prefix`` is the
    ``body`` FastAPI puts in front of a request body's fields."""
    lines = []
    for error in errors:
        loc = [str(p) for p in error.get("loc", [])]
        if drop_prefix is not None and loc[:1] == [drop_prefix]:
            loc = loc[1:]
        lines.append(f"{'.'.join(loc) or '(document)'}: {error.get('msg')}")
    return "; ".join(lines)


# The CLI says it uses the bootstrap admin token once per process, on stderr (never on stdout, which --json
# keeps for the answer).
_admin_fallback_announced = False


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
        if bootstrap:
            secret = settings.bootstrap_admin_token.get_secret_value()
        elif secret is None and settings.mode == "dev":
            # Dev mode only (prod never falls back: no token is a 401). Said, not silent: an operator who
            # meant to act as themselves learns the logbook will name the bootstrap admin.
            global _admin_fallback_announced
            if not _admin_fallback_announced:
                _admin_fallback_announced = True
                err_console.print(
                    "[yellow]note:[/] no --token or TRAINOPS_TOKEN; dev mode: using the bootstrap admin "
                    "token (TRAINOPS_BOOTSTRAP_ADMIN_TOKEN)",
                    soft_wrap=True,
                )
            secret = settings.bootstrap_admin_token.get_secret_value()
        self.headers = {"Authorization": f"Bearer {secret}"} if secret else {}

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            r = httpx.request(method, f"{self.base}/api/v1{path}", headers=self.headers, timeout=30, **kwargs)
        except httpx.HTTPError as exc:
            fail(
                f"cannot reach the control plane at {self.base}: {exc}. Is `trainops up` running?",
                ExitCode.unreachable,
            )
        if r.status_code >= 400:
            try:
                body = r.json()
                detail = body.get("detail", r.text) if isinstance(body, dict) else r.text
            except ValueError:
                detail = r.text
            if isinstance(detail, list):  # FastAPI validation errors, rendered as the CLI's own
                detail = validation_lines(detail, drop_prefix="body")
            fail(
                f"{method} {path} -> HTTP {r.status_code}: {detail}",
                HTTP_EXIT_CODES.get(r.status_code, ExitCode.error),
            )
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


def print_json(data: Any) -> None:
    """JSON on stdout, written as is (Rich would wrap long strings at the terminal's width)."""
    sys.stdout.write(json.dumps(data, default=str, indent=2) + "\n")
    sys.stdout.flush()


def _emit(data: Any, as_json: bool, table: DataTable | None = None) -> None:
    if as_json or table is None:
        print_json(data)
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


def _report_revision(url: str, revision: str, as_json: bool) -> None:
    database = url.split("@")[-1]  # never the password
    if as_json:
        print_json({"database": database, "revision": revision})
    else:
        console.print(f"database at {database} is at revision {revision}")


@db_app.command("upgrade")
def db_upgrade(
    revision: Annotated[str, typer.Argument(help="Target revision.")] = "head", as_json: JsonOpt = False
) -> None:
    """Apply the schema migrations to the configured database."""
    from service import migrate

    url = _settings().resolved_database_url
    try:
        migrate.upgrade(url, revision)
    except Exception as exc:  # any driver or alembic error becomes one clear line
        fail(f"migration failed: {type(exc).__name__}: {exc}")
    _report_revision(url, revision, as_json)


@db_app.command("downgrade")
def db_downgrade(
    revision: Annotated[str, typer.Argument(help="Target revision, e.g. base.")], as_json: JsonOpt = False
) -> None:
    """Roll the schema back to a revision."""
    from service import migrate

    url = _settings().resolved_database_url
    try:
        migrate.downgrade(url, revision)
    except Exception as exc:
        fail(f"migration failed: {type(exc).__name__}: {exc}")
    _report_revision(url, revision, as_json)


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
    table = DataTable("id", "name", "owner", "phase", "desired", "restarts", "created").keep_whole("created")
    for r in page["items"]:
        table.add_row(
            str(r["id"]),
            r["name"],
            r["owner"],
            r["phase"],
            r["desired_state"],
            str(r["restart_count"]),
            iso_time(r["created_at"]),
        )
    table.caption = f"{len(page['items'])} of {page['total']}"
    _emit(page, as_json, table)


def load_document(path: Path) -> Any:
    """A YAML or JSON file (JSON is YAML; a .json file is read as JSON for its exact error messages)."""
    import yaml

    try:
        text = path.read_text()
    except OSError as exc:
        fail(f"cannot read {path}: {exc.strerror or exc}", ExitCode.usage)
    try:
        if path.suffix.lower() == ".json":
            return json.loads(text)
        return yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:  # json.JSONDecodeError is a ValueError
        kind = "JSON" if path.suffix.lower() == ".json" else "YAML or JSON"
        fail(f"{path} is not {kind}: {' '.join(str(exc).split())}", ExitCode.validation)


def validate_run(body: dict[str, Any], source: str) -> None:
    """Check a run against the API's own schema (service/schemas.py RunCreate) before sending it, so a bad
    field is named here; the server validates again and its 422 reads the same."""
    from pydantic import ValidationError

    from service.schemas import RunCreate

    try:
        RunCreate.model_validate(body)
    except ValidationError as exc:
        fail(f"{source} is not a valid run: {validation_lines(exc.errors())}", ExitCode.validation)


@runs_app.command("create")
def runs_create(
    name: Annotated[str | None, typer.Argument(help="The run's name (default: the file's `name`).")] = None,
    run_file: Annotated[
        Path | None,
        typer.Option(
            "--file",
            "-f",
            help="YAML or JSON file of the whole run: name, owner, config (preset, target_steps...), start.",
        ),
    ] = None,
    config_file: Annotated[
        Path | None,
        typer.Option("--config", help="YAML or JSON file of the run's config alone (then NAME is needed)."),
    ] = None,
    owner: Annotated[
        str | None, typer.Option(help="Who the run belongs to (default: the file's `owner`, else $USER).")
    ] = None,
    start: Annotated[
        bool | None,
        typer.Option(
            "--start/--no-start", help="Ask the orchestrator to run it (default: the file's, else yes)."
        ),
    ] = None,
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Create a run from a file (and, by default, ask the orchestrator to start it). The file is checked
    against the API's schema first: an error names the field, e.g. `config.hang.step_floor_s`."""
    import os

    if (run_file is None) == (config_file is None):
        fail(
            "give the run as -f FILE (the whole run) or --config FILE (its config, with NAME)", ExitCode.usage
        )
    if run_file is not None:
        document = load_document(run_file)
        if not isinstance(document, dict):
            fail(f"{run_file} must hold a mapping (name, owner, config, start)", ExitCode.validation)
        body: dict[str, Any] = dict(document)
        source = str(run_file)
    else:
        assert config_file is not None
        body = {"config": load_document(config_file)}
        source = str(config_file)
        if name is None:
            fail("--config needs the run's NAME", ExitCode.usage)
    if name is not None:
        body["name"] = name
    if owner is not None:
        body["owner"] = owner
    body.setdefault("owner", os.environ.get("USER") or "unknown")
    if start is not None:
        body["start"] = start
    body.setdefault("start", True)
    validate_run(body, source)
    run = ApiClient(url, token).request("POST", "/runs", json=body)
    if as_json:
        print_json(run)
        return
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


def _latest_attempt(client: ApiClient, run_id: int) -> dict[str, Any] | None:
    """The run's newest attempt (the list is oldest first: its last page of one)."""
    total = client.request("GET", f"/runs/{run_id}/attempts", params={"limit": 1})["total"]
    if total == 0:
        return None
    page = client.request("GET", f"/runs/{run_id}/attempts", params={"limit": 1, "offset": total - 1})
    return page["items"][0] if page["items"] else None


# Phases a run stays in until someone acts (failed, needs attention) or for good (completed, stopped).
BAD_ENDS = ("failed", "needs_attention")


def wait_for(
    client: ApiClient,
    run_id: int,
    *,
    goal: str,
    reached: Any,
    timeout_s: float,
    poll_s: float = 0.5,
) -> dict[str, Any]:
    """Poll the run until ``reached(run, attempt)``; progress (each phase change) on stderr. Exits
    ExitCode.timeout after ``timeout_s``, ExitCode.run_not_completed if it fails or needs attention first,
    130 on Ctrl-C."""
    deadline = time.monotonic() + timeout_s
    last_seen = None
    # A run asked to start or restart from failed / needs_attention sits there until the orchestrator acts:
    # only a return to one of those phases, after leaving, is the run failing again.
    left_bad_end = False
    err_console.print(f"waiting up to {timeout_s:g} s for run {run_id} to be {goal}")
    try:
        while True:
            run = client.request("GET", f"/runs/{run_id}")
            attempt = _latest_attempt(client, run_id)
            seen = (run["phase"], attempt["number"] if attempt else None)
            if seen != last_seen:
                last_seen = seen
                on = f" (attempt {seen[1]})" if seen[1] is not None else ""
                reason = f": {run['phase_reason']}" if run.get("phase_reason") else ""
                err_console.print(f"  {iso_time(dt.datetime.now(dt.UTC))}  {run['phase']}{on}{esc(reason)}")
            if reached(run, attempt):
                return run
            if run["phase"] not in BAD_ENDS:
                left_bad_end = True
            elif left_bad_end and goal != "stopped":
                fail(
                    f"run {run_id} is {run['phase']}, not {goal}: {run['phase_reason']}",
                    ExitCode.run_not_completed,
                )
            if time.monotonic() >= deadline:
                fail(
                    f"run {run_id} is still {run['phase']} after {timeout_s:g} s, not {goal}",
                    ExitCode.timeout,
                )
            time.sleep(poll_s)
    except KeyboardInterrupt:
        err_console.print("stopped waiting (what was asked of the run stands)")
        raise typer.Exit(ExitCode.interrupted) from None


def _done(run: dict[str, Any], as_json: bool, text: str) -> None:
    if as_json:
        print_json(run)
    else:
        console.print(text)


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
    wait: WaitOpt = False,
    timeout: TimeoutOpt = 600.0,
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Restart a run with overrides (the OPT team's levers); with --wait, until a new attempt runs."""
    body = {
        "reason": reason,
        "from_checkpoint_id": from_checkpoint,
        "lr_scale": lr_scale,
        "lr": lr,
        "clip": clip,
        "reset_loss_scale": reset_loss_scale,
        "skip_batches": skip_batches,
    }
    client = ApiClient(url, token)
    before = _latest_attempt(client, run_id) if wait else None
    old = before["number"] if before else 0
    run = client.request(
        "POST", f"/runs/{run_id}/restart", json={k: v for k, v in body.items() if v is not None}
    )
    if wait:
        run = wait_for(
            client,
            run_id,
            goal=f"running a new attempt (after {old})",
            reached=lambda r, a: r["phase"] == "running" and a is not None and a["number"] > old,
            timeout_s=timeout,
        )
    _done(
        run, as_json, f"restart of {esc(run['name'])} {'done' if wait else 'requested'}: phase {run['phase']}"
    )


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
    wait: WaitOpt = False,
    timeout: TimeoutOpt = 600.0,
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Ask a run to stop; with --wait, until it has (stopped, or it completed or failed first)."""
    client = ApiClient(url, token)
    run = client.request("POST", f"/runs/{run_id}/stop", json={"reason": reason})
    if wait:
        run = wait_for(
            client,
            run_id,
            goal="stopped",
            reached=lambda r, a: r["phase"] in ("stopped", "completed", "failed"),
            timeout_s=timeout,
        )
    _done(run, as_json, f"{esc(run['name'])}: desired state {run['desired_state']}, phase {run['phase']}")


@runs_app.command("start")
def runs_start(
    run_id: int,
    wait: WaitOpt = False,
    timeout: TimeoutOpt = 600.0,
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Ask a run to start; with --wait, until it runs (exit 3 if it fails or needs attention first)."""
    client = ApiClient(url, token)
    run = client.request("POST", f"/runs/{run_id}/start")
    if wait:
        run = wait_for(
            client, run_id, goal="running", reached=lambda r, a: r["phase"] == "running", timeout_s=timeout
        )
    _done(run, as_json, f"{esc(run['name'])}: desired state {run['desired_state']}, phase {run['phase']}")


FOLLOW_ROWS = 20  # steps the live table keeps on screen


def _number(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


@runs_app.command("follow")
def runs_follow(
    run_id: int,
    interval: Annotated[float, typer.Option(min=0.1, help="Seconds between polls.")] = 2.0,
    timeout: Annotated[
        float | None,
        typer.Option(min=0.1, help=f"Give up after this many seconds (exit {ExitCode.timeout.value})."),
    ] = None,
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Follow a run live: step, loss, loss scale, activation norm and phase of each new step, until the run
    ends. Exit 0 when it completes, 3 when it fails, needs attention or is stopped. --json: one JSON object
    per line (each point, then the final run). A table on a terminal, plain lines otherwise."""
    from rich.live import Live

    client = ApiClient(url, token)
    run = client.request("GET", f"/runs/{run_id}")
    rows: list[tuple[str, ...]] = []
    cursor: tuple[int, int] | None = None  # (attempt, last step seen)
    live_table = console.is_terminal and not as_json
    deadline = None if timeout is None else time.monotonic() + timeout

    def table() -> DataTable:
        t = DataTable("attempt", "step", "loss", "loss scale", "act norm", "phase")
        for row in rows[-FOLLOW_ROWS:]:
            t.add_row(*row)
        reason = f" ({run['phase_reason']})" if run.get("phase_reason") else ""
        t.caption = f"run {run_id} {run['name']}: {run['phase']}{reason}"
        return t

    def poll() -> None:
        nonlocal run, cursor
        run = client.request("GET", f"/runs/{run_id}")
        attempt = _latest_attempt(client, run_id)
        if attempt is None:
            return
        if cursor is None or cursor[0] != attempt["number"]:
            cursor = (attempt["number"], attempt["start_step"] - 1)
        params = {"attempt": cursor[0], "start_step": max(cursor[1] + 1, 0), "max_points": 10_000}
        series = client.request("GET", f"/runs/{run_id}/metrics", params=params)
        for p in series["points"]:
            cursor = (cursor[0], max(cursor[1], p["step"]))
            if as_json:
                sys.stdout.write(json.dumps({"type": "point", "phase": run["phase"], **p}) + "\n")
                continue
            row = (
                str(p["attempt"]),
                str(p["step"]),
                _number(p["loss"], ".4f"),
                _number(p["loss_scale"], "g"),
                _number(p["act_norm"], ".2f"),
                run["phase"],
            )
            rows.append(row)
            if not live_table:
                console.print("  ".join(row), highlight=False)
        sys.stdout.flush()

    def ended() -> bool:
        return run["phase"] in ("completed", "stopped", *BAD_ENDS)

    try:
        if live_table:
            with Live(table(), console=console, refresh_per_second=4) as live:
                while True:
                    poll()
                    live.update(table())
                    if ended() or (deadline is not None and time.monotonic() >= deadline):
                        break
                    time.sleep(interval)
        else:
            while True:
                poll()
                if ended() or (deadline is not None and time.monotonic() >= deadline):
                    break
                time.sleep(interval)
    except KeyboardInterrupt:
        err_console.print("stopped following (the run goes on)")
        raise typer.Exit(ExitCode.interrupted) from None
    if as_json:
        sys.stdout.write(json.dumps({"type": "run", **run}) + "\n")
    else:
        reason = f": {run['phase_reason']}" if run.get("phase_reason") else ""
        err_console.print(f"run {run_id} is {run['phase']}{esc(reason)}")
    if not ended():
        fail(f"run {run_id} still {run['phase']} after {timeout or 0:g} s", ExitCode.timeout)
    if run["phase"] != "completed":
        raise typer.Exit(ExitCode.run_not_completed)


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
    as_json: JsonOpt = False,
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
    _done(node, as_json, f"{esc(node['hostname'])}: {node['state']}, {len(node['gpus'])} GPU(s)")


@nodes_app.command("cordon")
def nodes_cordon(
    host: str,
    reason: Annotated[str, typer.Option(help="Required; goes to the logbook.")],
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Take a host out of service."""
    node = ApiClient(url, token).request("POST", f"/nodes/{host}/cordon", json={"reason": reason})
    _done(node, as_json, f"{esc(node['hostname'])}: {node['state']} ({esc(node['state_reason'])})")


@nodes_app.command("uncordon")
def nodes_uncordon(
    host: str,
    reason: Annotated[str, typer.Option(help="Required; goes to the logbook.")],
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Return a host to service."""
    node = ApiClient(url, token).request("POST", f"/nodes/{host}/uncordon", json={"reason": reason})
    _done(node, as_json, f"{esc(node['hostname'])}: {node['state']} ({esc(node['state_reason'])})")


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
        _done(entry, as_json, f"note {entry['id']} posted at {iso_time(entry['time'])}")
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
    as_json: JsonOpt = False,
) -> None:
    """Create a token; its secret is printed once (on stdout, alone on its last line; --json: in `token`)."""
    body: dict[str, Any] = {"name": name, "role": role}
    if run_id is not None:
        body["run_id"] = run_id
    if expires_in is not None:
        body["expires_at"] = (dt.datetime.now(dt.UTC) + parse_duration(expires_in)).isoformat()
    created = ApiClient(url, token, bootstrap=bootstrap).request("POST", "/tokens", json=body)
    if as_json:
        print_json(created)
        return
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
            iso_time(t["created_at"]),
            iso_time(t["expires_at"]) if t.get("expires_at") else "never",
            iso_time(t["revoked_at"]) if t["revoked_at"] else "",
        )
    _emit(tokens, as_json, table)


@tokens_app.command("revoke")
def tokens_revoke(
    token_id: int, url: UrlOpt = None, token: TokenOpt = None, as_json: JsonOpt = False
) -> None:
    """Revoke a token now: it stops authenticating at once (401)."""
    revoked = ApiClient(url, token).request("POST", f"/tokens/{token_id}/revoke")
    _done(
        revoked,
        as_json,
        f"token {revoked['id']} ({esc(revoked['name'])}) revoked at {iso_time(revoked['revoked_at'])}",
    )


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
    table = DataTable("id", "run", "status", "gates", "proposed", "expires", "answer", "proposal", "evidence")
    for d in decisions:
        proposal = d["proposal"]
        what = (
            f"retire {', '.join(proposal.get('hosts') or ())}"
            if proposal.get("action") == "retire_hosts"
            else f"from step {proposal.get('checkpoint_step')}"
        )
        table.add_row(
            str(d["id"]),
            str(d["run_id"]),
            d["status"],
            ", ".join(d["gates"]),
            iso_time(d["created_at"]),
            f"{iso_time(d['expires_at'])} ({d['on_timeout']})",
            f"{d['decided_by'] or ''} {d['decision_reason'] or ''}".strip(),
            f"{what}; {d['reason']}",
            _evidence_brief(d.get("evidence") or {}),
        )
    _emit(decisions, as_json, table)


def _evidence_brief(evidence: dict[str, Any], width: int = 100) -> str:
    """A decision's evidence in a table cell: its facts as `key=value`, nested ones counted, cut at `width`
    (`--json` and the API have all of it)."""
    parts = []
    for key, value in evidence.items():
        if isinstance(value, list) and all(isinstance(v, str | int | float) for v in value):
            if not value:
                continue
            value = "; ".join(map(str, value))
        elif isinstance(value, list | dict):
            value = f"{len(value)} item(s)"
        parts.append(f"{key}={value}")
    text = ", ".join(parts)
    return text if len(text) <= width else text[: width - 3] + "..."


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


# ---- diagnostics ----------------------------------------------------------------------------------


@diagnostics_app.command("list")
def diagnostics_list(
    host: Annotated[str | None, typer.Option(help="Only this host's.")] = None,
    kind: Annotated[
        str | None, typer.Option(help="Only this check (e.g. nvml.ecc, fabric.allreduce).")
    ] = None,
    status: Annotated[
        list[str] | None,
        typer.Option(help="pending, passed, failed, degraded, skipped, timeout or error (repeatable)."),
    ] = None,
    sweep: Annotated[str | None, typer.Option("--sweep", help="Only this sweep's results (its id).")] = None,
    limit: Annotated[int, typer.Option(min=1, max=MAX_PAGE_SIZE)] = 100,
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Recorded health-check results, newest first."""
    params: dict[str, Any] = {"status": status or [], "limit": limit}
    params.update({k: v for k, v in {"host": host, "kind": kind, "sweep_id": sweep}.items() if v is not None})
    page = ApiClient(url, token).request("GET", "/diagnostics", params=params)
    table = DataTable("id", "host", "check", "level", "status", "started", "reason").keep_whole("started")
    for d in page["items"]:
        table.add_row(
            str(d["id"]),
            d["hostname"],
            d["kind"],
            d["level"],
            d["status"],
            iso_time(d["started_at"]),
            d["reason"] or "",
        )
    table.caption = f"{len(page['items'])} of {page['total']}"
    _emit(page, as_json, table)


@diagnostics_app.command("sweep")
def diagnostics_sweep(
    host: Annotated[
        list[str] | None,
        typer.Option("--host", help="Host to sweep (repeatable); default: every registered one."),
    ] = None,
    level: Annotated[str, typer.Option(help="quick or deep.")] = "quick",
    check: Annotated[list[str] | None, typer.Option("--check", help="Only this check (repeatable).")] = None,
    wait: Annotated[
        bool,
        typer.Option("--wait", help="Wait for the results (up to --deadline) instead of only starting it."),
    ] = False,
    deadline: Annotated[float | None, typer.Option(min=0.1, help="Seconds the hosts have to answer.")] = None,
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Run a health sweep over the fleet (the health agents' checks); hosts that fail are cordoned."""
    body: dict[str, Any] = {"level": level, "wait": wait}
    if host:
        body["hosts"] = host
    if check:
        body["checks"] = check
    if deadline is not None:
        body["deadline_s"] = deadline
    result = ApiClient(url, token).request("POST", "/diagnostics/sweep", json=body)
    if as_json:
        print_json(result)
        return
    if not result["finished"]:
        console.print(
            f"{result['level']} sweep started (task {result['task_id']}); results: trainops diagnostics list"
        )
        return
    console.print(
        f"{result['level']} sweep {result['sweep_id']}: {result['hosts']} host(s), "
        f"{result['results_ingested']} result(s)"
        + (f", no answer from {', '.join(result['missed_deadline'])}" if result["missed_deadline"] else "")
    )
    table = DataTable("host", "verdict", "was", "now", "reason")
    for o in result["outcomes"]:
        table.add_row(o["host"], o["verdict"], o["previous_state"], o["state"], o["reason"])
    if result["outcomes"]:
        console.print(table)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(ExitCode.interrupted)


if __name__ == "__main__":
    main()
