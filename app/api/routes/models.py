"""Embedding models: list, register (upload or a path under the model root), card, delete."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, Response, UploadFile, status

from app.api.deps import ReadAccess, SessionDep, SettingsDep, WriteAccess
from app.api.schemas import Id, ModelDetail, ModelOut, Name
from app.services import models as service
from app.services.errors import Invalid

router = APIRouter(prefix="/models", tags=["models"])

CHUNK = 1024 * 1024


@router.get("", response_model=list[ModelOut], dependencies=[ReadAccess])
def list_models(session: SessionDep) -> list[ModelOut]:
    return [ModelOut.model_validate(m) for m in service.list_models(session)]


@router.post(
    "",
    response_model=ModelDetail,
    status_code=status.HTTP_201_CREATED,
    dependencies=[WriteAccess],
    summary="Register a model artifact",
)
def register_model(
    session: SessionDep,
    settings: SettingsDep,
    name: Annotated[Name, Form(description="A unique name for this model version.")],
    path: Annotated[
        str | None, Form(description="An artifact directory under the server's model root.")
    ] = None,
    card: Annotated[UploadFile | None, File(description="The artifact's card.json.")] = None,
    weights: Annotated[
        UploadFile | None, File(description="The artifact's model.safetensors.")
    ] = None,
) -> ModelDetail:
    """Either `path` (a directory under LOOKALIKE_MODEL_ROOT) or the two files of an artifact
    (`lookalike train` / `lookalike pretrained` write them). The artifact is validated by
    loading it, copied into the model store and never changed afterwards."""
    if path is not None and (card is not None or weights is not None):
        raise Invalid("send either a path or the card and weights files, not both")
    if path is not None:
        model = service.register_path(session, settings, name, path)
    elif card is not None and weights is not None:
        model = service.register_upload(
            session, settings, name, card.file.read(), iter(lambda: weights.file.read(CHUNK), b"")
        )
    else:
        raise Invalid(
            "send the artifact's card.json as `card` and model.safetensors as `weights`, "
            "or a `path` under the server's model root"
        )
    return ModelDetail.model_validate(model)


@router.get("/{model_id}", response_model=ModelDetail, dependencies=[ReadAccess])
def get_model(model_id: Id, session: SessionDep) -> ModelDetail:
    return ModelDetail.model_validate(service.get_model(session, model_id))


@router.delete("/{model_id}", status_code=status.HTTP_204_NO_CONTENT, dependencies=[WriteAccess])
def delete_model(model_id: Id, session: SessionDep, settings: SettingsDep) -> Response:
    """Refused (409) while a gallery uses the model, and for the built-in model."""
    service.delete_model(session, settings, model_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
