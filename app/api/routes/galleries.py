"""Galleries: create (name, model, index type), list, show (counts, index), switch index, delete."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response, status

from app.api.deps import ReadAccess, RuntimeDep, SessionDep, WriteAccess
from app.api.schemas import GalleryCreate, GalleryOut, GalleryUpdate, Id
from app.services import galleries as service

router = APIRouter(prefix="/galleries", tags=["galleries"])
index_types_router = APIRouter(tags=["galleries"])


@index_types_router.get("/index-types", dependencies=[ReadAccess])
def index_types() -> list[dict[str, Any]]:
    """The index types and the parameters each reads (PATCH /galleries/{id} sets them): the
    accepted range, the default and what it trades."""
    return service.index_types()


@router.post(
    "", response_model=GalleryOut, status_code=status.HTTP_201_CREATED, dependencies=[WriteAccess]
)
def create_gallery(body: GalleryCreate, runtime: RuntimeDep, session: SessionDep) -> GalleryOut:
    gallery = service.create_gallery(
        session, body.name, body.model_id, body.index_type.value, body.index_params
    )
    return GalleryOut.of(service.gallery_info(runtime, session, gallery.id))


@router.get("", response_model=list[GalleryOut], dependencies=[ReadAccess])
def list_galleries(runtime: RuntimeDep, session: SessionDep) -> list[GalleryOut]:
    return [GalleryOut.of(info) for info in service.list_galleries(runtime, session)]


@router.get("/{gallery_id}", response_model=GalleryOut, dependencies=[ReadAccess])
def get_gallery(gallery_id: Id, runtime: RuntimeDep, session: SessionDep) -> GalleryOut:
    return GalleryOut.of(service.gallery_info(runtime, session, gallery_id))


@router.patch("/{gallery_id}", response_model=GalleryOut, dependencies=[WriteAccess])
def update_gallery(
    gallery_id: Id, body: GalleryUpdate, runtime: RuntimeDep, session: SessionDep
) -> GalleryOut:
    """Rebuild the index with another type or parameters from the stored embeddings (a new
    index version; searches keep answering from the old one until the new one is in place).
    Switching the model is a job (it embeds every image again)."""
    service.switch_index(
        runtime,
        session,
        gallery_id,
        index_type=None if body.index_type is None else body.index_type.value,
        index_params=body.index_params,
    )
    return GalleryOut.of(service.gallery_info(runtime, session, gallery_id))


@router.delete("/{gallery_id}", status_code=status.HTTP_204_NO_CONTENT, dependencies=[WriteAccess])
def delete_gallery(gallery_id: Id, runtime: RuntimeDep, session: SessionDep) -> Response:
    service.delete_gallery(runtime, session, gallery_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
