"""Nodes: registration (by health workers or operators), listing, cordon and uncordon with a reason."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Request, Response, status

from service.api.deps import Limit, Offset, Operator, SessionDep, SettingsDep, Viewer
from service.api.routes.diagnostics import SWEEP_STARTED
from service.crud import nodes as nodes_crud
from service.fleet.diagnostics import HostDiagnosticsRequest, SweepResult, diagnose, health_app_for
from service.schemas import NodeCreate, NodePublic, NodeStateChange, Page
from service.statemachine import NodeState

router = APIRouter(prefix="/nodes", tags=["nodes"])
Host = Annotated[str, Path(min_length=1, max_length=255)]


@router.post(
    "",
    response_model=NodePublic,
    status_code=status.HTTP_201_CREATED,
    responses={200: {"model": NodePublic, "description": "The host was registered already: updated."}},
)
def register_node(body: NodeCreate, session: SessionDep, who: Operator, response: Response) -> NodePublic:
    node, created = nodes_crud.register_node(
        session,
        hostname=body.hostname,
        labels=body.labels,
        gpus=[g.model_dump() for g in body.gpus],
        author=who.author,
    )
    if not created:
        response.status_code = status.HTTP_200_OK
    return NodePublic.model_validate(node)


@router.get("", response_model=Page[NodePublic])
def list_nodes(
    session: SessionDep,
    _: Viewer,
    state: Annotated[list[NodeState] | None, Query()] = None,
    limit: Limit = 100,
    offset: Offset = 0,
) -> Page[NodePublic]:
    rows, total = nodes_crud.list_nodes(session, states=state or (), limit=limit, offset=offset)
    return Page(items=[NodePublic.model_validate(n) for n in rows], total=total, limit=limit, offset=offset)


@router.get("/{host}", response_model=NodePublic)
def get_node(host: Host, session: SessionDep, _: Viewer) -> NodePublic:
    return NodePublic.model_validate(nodes_crud.get_node(session, hostname=host))


@router.post("/{host}/cordon", response_model=NodePublic)
def cordon_node(host: Host, body: NodeStateChange, session: SessionDep, who: Operator) -> NodePublic:
    node = nodes_crud.cordon_node(session, hostname=host, reason=body.reason, author=who.author)
    return NodePublic.model_validate(node)


@router.post("/{host}/uncordon", response_model=NodePublic)
def uncordon_node(host: Host, body: NodeStateChange, session: SessionDep, who: Operator) -> NodePublic:
    node = nodes_crud.uncordon_node(session, hostname=host, reason=body.reason, author=who.author)
    return NodePublic.model_validate(node)


@router.post("/{host}/diagnostics", response_model=SweepResult, responses=SWEEP_STARTED)
def diagnose_node(
    host: Host,
    body: HostDiagnosticsRequest,
    request: Request,
    settings: SettingsDep,
    who: Operator,
    response: Response,
) -> SweepResult:
    """Run the health checks on one host (``wait``: the results; else 202 with the sweep's task id)."""
    result = diagnose(
        request.app.state.session_factory,
        health_app_for(request.app.state, settings),
        hosts=[host],
        level=body.level,
        checks=body.checks,
        wait=body.wait,
        deadline_s=body.deadline_s,
        author=who.author,
    )
    if not result.finished:
        response.status_code = status.HTTP_202_ACCEPTED
    return result
