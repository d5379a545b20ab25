"""The console's pages and forms (thin: read a view or call the same crud as the API, render a template)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qsl, urlencode

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from pydantic import ValidationError

from service.api.deps import EntityId, RunId, SessionDep, SettingsDep
from service.crud import decisions as decisions_crud
from service.crud.logbook import write_log
from service.crud.runs import get_run
from service.crud.tokens import TokenRefusal
from service.errors import ServiceError
from service.recovery.config import load_orchestrator_config
from service.schemas import DecisionOverrides
from service.statemachine import DecisionStatus, LogKind, Severity
from service.ui import views
from service.ui.auth import (
    COOKIE,
    COOKIE_PATH,
    ConsoleUser,
    Forbidden,
    NotSignedIn,
    check_origin,
    check_post,
    console_user,
    principal_for,
)

HERE = Path(__file__).parent
templates = Jinja2Templates(directory=HERE / "templates")
templates.env.globals["evidence_text"] = views.evidence_text
templates.env.globals["levers_text"] = views.levers_text
router = APIRouter(prefix="/ui", include_in_schema=False)
static = StaticFiles(directory=HERE / "static")
MAX_FORM_BYTES = 16 * 1024
LEVERS = ("lr_scale", "lr", "clip", "skip_batches")


async def form_fields(request: Request) -> dict[str, str]:
    """A urlencoded form (the console's only kind): small, one value per field."""
    body = await request.body()
    if len(body) > MAX_FORM_BYTES:
        raise Forbidden("the form is too large")
    return dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))


Form = Annotated[dict[str, str], Depends(form_fields)]


def signed_in(request: Request, session: SessionDep, settings: SettingsDep) -> ConsoleUser:
    return console_user(request, session, settings)


User = Annotated[ConsoleUser, Depends(signed_in)]


def to_login(reason: str, back: str = "/ui") -> RedirectResponse:
    return RedirectResponse(f"/ui/login?{urlencode({'why': reason, 'next': back})}", status_code=303)


def safe_next(target: str | None) -> str:
    """Only a path of the console itself (never another site: an open redirect)."""
    return target if target and target.startswith("/ui") and not target.startswith("//") else "/ui"


@router.get("/login", response_class=HTMLResponse)
def login_form(request: Request, why: str | None = None, next: str | None = None) -> Response:
    return templates.TemplateResponse(request, "login.html", {"why": why, "next": safe_next(next)})


@router.post("/login")
def login(request: Request, form: Form, session: SessionDep, settings: SettingsDep) -> Response:
    check_origin(request, opaque_ok=False)  # no session yet, so no CSRF token: the origin is the check
    token = form.get("token", "").strip()
    found = principal_for(session, settings, token) if token else TokenRefusal("no token given")
    if isinstance(found, TokenRefusal):
        context = {"why": f"not signed in: {found.reason}", "next": safe_next(form.get("next"))}
        return templates.TemplateResponse(request, "login.html", context, status_code=401)
    response = RedirectResponse(safe_next(form.get("next")), status_code=303)
    response.set_cookie(
        COOKIE,
        token,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        path=COOKIE_PATH,
        max_age=12 * 3600,
    )
    return response


@router.post("/logout")
def logout(request: Request, user: User, form: Form) -> Response:
    check_post(request, user, form, operator=False)
    response = RedirectResponse("/ui/login?why=signed+out", status_code=303)
    response.delete_cookie(COOKIE, path=COOKIE_PATH)
    return response


@router.get("", response_class=HTMLResponse)
def fleet(request: Request, user: User, session: SessionDep) -> Response:
    page = views.fleet_page(session)
    return templates.TemplateResponse(request, "fleet.html", {"user": user, "page": page})


@router.get("/runs/{run_id}", response_class=HTMLResponse)
def run(
    request: Request,
    run_id: RunId,
    user: User,
    session: SessionDep,
    settings: SettingsDep,
    kind: Annotated[list[LogKind] | None, Query()] = None,
    severity: Severity | None = None,
    part: str | None = None,
) -> Response:
    page = views.run_page(
        session,
        run_id=run_id,
        cfg=load_orchestrator_config(settings),
        kinds=kind or (),
        min_severity=severity,
    )
    template = "run_live.html" if part == "live" else "run.html"  # htmx refreshes the live part alone
    return templates.TemplateResponse(request, template, {"user": user, "page": page})


@router.post("/runs/{run_id}/notes")
def add_note(request: Request, run_id: RunId, user: User, form: Form, session: SessionDep) -> Response:
    check_post(request, user, form, operator=True)
    text = form.get("note", "").strip()
    if not text or len(text) > 2000:
        raise Forbidden("a note has 1 to 2,000 characters")
    get_run(session, run_id=run_id)
    write_log(session, kind=LogKind.note, author=user.principal.author, run_id=run_id, message=text)
    return RedirectResponse(f"/ui/runs/{run_id}#logbook", status_code=303)


def _overrides(form: dict[str, str]) -> dict[str, Any] | None:
    raw = {k: form[k] for k in LEVERS if form.get(k, "").strip()}
    if form.get("reset_loss_scale"):
        raw["reset_loss_scale"] = "true"
    if not raw:
        return None
    try:
        return DecisionOverrides.model_validate(raw).model_dump(exclude_none=True)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise Forbidden(f"your levers are not valid: {problems}") from None


@router.post("/decisions/{decision_id}/{verdict}")
def answer(
    request: Request,
    decision_id: EntityId,
    verdict: str,
    user: User,
    form: Form,
    session: SessionDep,
) -> Response:
    check_post(request, user, form, operator=True)
    if verdict not in ("approve", "reject"):
        raise Forbidden("unknown answer")
    reason = form.get("reason", "").strip() or None
    if verdict == "reject" and not reason:
        raise Forbidden("a rejection says why")
    overrides = _overrides(form)
    action = decisions_crud.decision_action(decisions_crud.get_decision(session, decision_id=decision_id))
    if overrides and action != decisions_crud.RELAUNCH:
        raise Forbidden(f"levers apply to a relaunch; this decision is about {action}")
    decision = decisions_crud.answer_decision(
        session,
        decision_id=decision_id,
        verdict=DecisionStatus.approved if verdict == "approve" else DecisionStatus.rejected,
        author=user.principal.author,
        reason=reason,
        overrides=overrides,
    )
    return RedirectResponse(f"/ui/runs/{decision.run_id}#decisions", status_code=303)


def install(app: Any) -> None:
    """Mount the console on the app: its routes, its static files, and its error pages."""
    app.include_router(router)
    app.mount("/ui/static", static, name="ui-static")

    @app.exception_handler(NotSignedIn)
    async def _not_signed_in(request: Request, exc: NotSignedIn) -> Response:
        return to_login(exc.reason, back=request.url.path)

    @app.exception_handler(Forbidden)
    async def _forbidden(request: Request, exc: Forbidden) -> Response:
        return HTMLResponse(templates.get_template("error.html").render(message=str(exc)), status_code=403)

    original = app.exception_handlers.get(ServiceError)

    async def _service_error(request: Request, exc: ServiceError) -> Response:
        if request.url.path.startswith("/ui") and not request.url.path.startswith("/ui/static"):
            status = getattr(exc, "status_code", 400)
            page = templates.get_template("error.html").render(message=str(exc))
            return HTMLResponse(page, status_code=status)
        assert original is not None
        return await original(request, exc)

    if original is not None:
        app.add_exception_handler(ServiceError, _service_error)
