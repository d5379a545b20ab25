"""API tokens (admin only). The secret is returned once, at creation."""

from __future__ import annotations

from fastapi import APIRouter, status

from service.api.deps import Admin, EntityId, SessionDep
from service.api.responses import NAMED_IN_REQUEST_NOT_FOUND
from service.crud import tokens as tokens_crud
from service.schemas import TokenCreate, TokenCreated, TokenPublic

router = APIRouter(prefix="/tokens", tags=["tokens"])


@router.post(
    "",
    response_model=TokenCreated,
    status_code=status.HTTP_201_CREATED,
    responses=NAMED_IN_REQUEST_NOT_FOUND,  # a trainer token for a run that does not exist
)
def create_token(body: TokenCreate, session: SessionDep, _: Admin) -> TokenCreated:
    token, secret = tokens_crud.create_token(
        session, name=body.name, role=body.role, run_id=body.run_id, expires_at=body.expires_at
    )
    return TokenCreated.model_validate({**TokenPublic.model_validate(token).model_dump(), "token": secret})


@router.get("", response_model=list[TokenPublic])
def list_tokens(session: SessionDep, _: Admin) -> list[TokenPublic]:
    return [TokenPublic.model_validate(t) for t in tokens_crud.list_tokens(session)]


@router.post("/{token_id}/revoke", response_model=TokenPublic)
def revoke_token(token_id: EntityId, session: SessionDep, _: Admin) -> TokenPublic:
    return TokenPublic.model_validate(tokens_crud.revoke_token(session, token_id=token_id))
