"""Approval gates: the orchestrator's proposals that wait for a human, and the operator's answer."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from sqlalchemy.orm import Session

from service.api.deps import MAX_ID, EntityId, Limit, Offset, Operator, SessionDep, Viewer
from service.crud import decisions as decisions_crud
from service.crud.tokens import Principal
from service.schemas import DecisionApprove, DecisionPublic, DecisionReject, Page
from service.statemachine import DecisionStatus

router = APIRouter(prefix="/decisions", tags=["decisions"])


@router.get("", response_model=Page[DecisionPublic])
def list_decisions(
    session: SessionDep,
    _: Viewer,
    run_id: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None,
    status: DecisionStatus | None = None,
    limit: Limit = 50,
    offset: Offset = 0,
) -> Page[DecisionPublic]:
    """Newest first; `status=pending` lists what waits for a human."""
    rows, total = decisions_crud.list_decisions(
        session, run_id=run_id, status=status, limit=limit, offset=offset
    )
    return Page(
        items=[DecisionPublic.model_validate(d) for d in rows], total=total, limit=limit, offset=offset
    )


@router.get("/{decision_id}", response_model=DecisionPublic)
def get_decision(decision_id: EntityId, session: SessionDep, _: Viewer) -> DecisionPublic:
    return DecisionPublic.model_validate(decisions_crud.get_decision(session, decision_id=decision_id))


@router.post("/{decision_id}/approve", response_model=DecisionPublic)
def approve_decision(
    decision_id: EntityId, body: DecisionApprove, session: SessionDep, who: Operator
) -> DecisionPublic:
    """Carry the proposal out (with the operator's overrides, if given) on the orchestrator's next pass."""
    return _answer(session, decision_id, DecisionStatus.approved, body, who)


@router.post("/{decision_id}/reject", response_model=DecisionPublic)
def reject_decision(
    decision_id: EntityId, body: DecisionReject, session: SessionDep, who: Operator
) -> DecisionPublic:
    """Do not carry the proposal out: restart with the operator's overrides instead, or hold the run."""
    return _answer(session, decision_id, DecisionStatus.rejected, body, who)


def _answer(
    session: Session,
    decision_id: int,
    verdict: DecisionStatus,
    body: DecisionApprove | DecisionReject,
    who: Principal,
) -> DecisionPublic:
    decision = decisions_crud.answer_decision(
        session,
        decision_id=decision_id,
        verdict=verdict,
        author=who.author,
        reason=body.reason,
        overrides=body.overrides.model_dump(exclude_none=True) if body.overrides else None,
    )
    return DecisionPublic.model_validate(decision)
