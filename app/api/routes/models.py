"""Embedding models: list, register (upload or a path under the model root), card, delete."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, File, Form, Response, UploadFile, status

from app.api.deps import ReadAccess, SessionDep, SettingsDep, WriteAccess
from app.api.schemas import Id, ModelDetail, ModelOut, Name
from app.services import models as service
from app.services.errors import Invalid

router = APIRouter(prefix="/models", tags=["models"])

CHUNK = 1024 * 1024
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


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
        UploadFile | None,
        File(
            description="The artifact's model.safetensors; with `backbone`, the backbone's "
            "pretrained weights (.safetensors/.pth/.bin)."
        ),
    ] = None,
    backbone: Annotated[
        str | None,
        Form(
            description="Build the model on the server from a pretrained backbone: "
            "efficientnet_lite0/1/2, resnet18/50 or a timm model name.",
            max_length=200,
        ),
    ] = None,
    image_size: Annotated[
        int | None,
        Form(description="With `backbone`: the input size (default: its own).", ge=32, le=1024),
    ] = None,
) -> ModelDetail:
    """One of: `path` (a directory under LOOKALIKE_MODEL_ROOT); the two files of an artifact
    (`lookalike train` / `lookalike pretrained` write them); or a `backbone` name, optionally
    with its `weights` file, which the server turns into a model as `lookalike pretrained`
    does (a timm model without a file downloads its weights from the hub, so only on a server
    with internet). The artifact is validated by loading it, copied into the model store and
    never changed afterwards."""
    sources = [path is not None, card is not None, backbone is not None]
    if sum(sources) > 1:
        raise Invalid("send one of: a path, the card and weights files, or a backbone")
    if backbone is not None:
        suffix = Path(weights.filename or "").suffix if weights is not None else ""
        if weights is not None and suffix not in WEIGHT_SUFFIXES:
            raise Invalid(f"backbone weights must be one of {', '.join(WEIGHT_SUFFIXES)} files")
        model = service.register_pretrained(
            session,
            settings,
            name,
            backbone,
            weights=(
                (weights.filename or "", iter(lambda: weights.file.read(CHUNK), b""))
                if weights is not None
                else None
            ),
            image_size=image_size,
        )
    elif path is not None:
        model = service.register_path(session, settings, name, path)
    elif card is not None and weights is not None:
        model = service.register_upload(
            session, settings, name, card.file.read(), iter(lambda: weights.file.read(CHUNK), b"")
        )
    else:
        raise Invalid(
            "send the artifact's card.json as `card` and model.safetensors as `weights`, "
            "a `path` under the server's model root, or a `backbone`"
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
