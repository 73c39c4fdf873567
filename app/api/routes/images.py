"""Images: upload (one or many files, per-file results), list, show, file, thumbnail, delete."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, Query, Response, UploadFile, status
from fastapi.responses import FileResponse, JSONResponse

from app.api.deps import ReadAccess, RuntimeDep, SessionDep, WriteAccess
from app.api.schemas import (
    Id,
    ImageOut,
    ImagePage,
    ListOffset,
    UploadItem,
    UploadResponse,
    parse_metadata,
)
from app.imaging import ImageRejected, check_request_pixels
from app.services import images as service
from app.services.errors import RETRY_AFTER_S, Invalid, TooLarge

router = APIRouter(tags=["images"])


def _per_file(values: list[str] | None, count: int, field: str) -> list[str | None]:
    """A repeated form field given once per file (in the files' order), or not at all."""
    if not values:
        return [None] * count
    if len(values) != count:
        raise Invalid(
            f"{len(values)} `{field}` fields for {count} files: give one per file, in the "
            "files' order (an empty value for none), or leave it out"
        )
    return [value or None for value in values]


@router.post(
    "/galleries/{gallery_id}/images",
    response_model=UploadResponse,
    status_code=status.HTTP_201_CREATED,
    dependencies=[WriteAccess],
    responses={
        207: {"model": UploadResponse, "description": "Some files were rejected; see each result."}
    },
)
def upload_images(
    gallery_id: Id,
    runtime: RuntimeDep,
    session: SessionDep,
    files: Annotated[list[UploadFile], File(description="One or more images.")],
    label: Annotated[list[str] | None, Form(description="One label per file.")] = None,
    metadata: Annotated[list[str] | None, Form(description="One JSON object per file.")] = None,
    external_id: Annotated[list[str] | None, Form(description="Your own id, one per file.")] = None,
) -> Response:
    """Each file gets its own result: `created` (201), `duplicate` (200: the gallery already
    holds this content; the existing image is returned) or `rejected` (4xx, with the reason).
    The response is 201 when every file was stored (or was a duplicate), 207 when some were
    rejected, and the first file's error status when all were."""
    limit = runtime.settings.max_files_per_request
    if len(files) > limit:
        raise TooLarge(f"{len(files)} files in one request; send at most {limit} per request")
    uploads, errors = _uploads(files, label, metadata, external_id)
    try:
        check_request_pixels([u.data for u in uploads], runtime.settings.max_request_pixels)
    except ImageRejected as error:
        raise TooLarge(error.detail) from error
    valid = [i for i in range(len(uploads)) if i not in errors]
    outcomes = service.add_images(runtime, session, gallery_id, [uploads[i] for i in valid])
    results = [
        UploadItem(filename=u.filename, status="rejected", status_code=422, error=errors.get(i))
        for i, u in enumerate(uploads)
    ]
    for position, outcome in zip(valid, outcomes, strict=True):
        results[position] = UploadItem.of(outcome)
    body = UploadResponse.of(results)
    if not body.rejected:
        code = status.HTTP_201_CREATED
    elif body.rejected < len(results):
        code = status.HTTP_207_MULTI_STATUS
    else:
        code = next(r.status_code for r in results if r.status == "rejected")
    # Every file refused because the server is busy decoding: come back later.
    headers = {"Retry-After": str(RETRY_AFTER_S)} if code == 503 else None
    return JSONResponse(body.model_dump(mode="json"), status_code=code, headers=headers)


def _uploads(
    files: list[UploadFile],
    label: list[str] | None,
    metadata: list[str] | None,
    external_id: list[str] | None,
) -> tuple[list[service.Upload], dict[int, str]]:
    """The files with their per-file fields, and the positions whose fields are invalid."""
    labels = _per_file(label, len(files), "label")
    external_ids = _per_file(external_id, len(files), "external_id")
    metadata_texts = _per_file(metadata, len(files), "metadata")
    uploads, errors = [], {}
    for position, file in enumerate(files):
        try:
            meta = parse_metadata(metadata_texts[position], "metadata")
        except ValueError as error:
            errors[position], meta = str(error), {}
        uploads.append(
            service.Upload(
                data=b"" if position in errors else file.file.read(),
                filename=file.filename,
                label=labels[position],
                metadata=meta,
                external_id=external_ids[position],
            )
        )
    return uploads, errors


@router.get("/galleries/{gallery_id}/images", response_model=ImagePage, dependencies=[ReadAccess])
def list_images(
    gallery_id: Id,
    session: SessionDep,
    label: Annotated[str | None, Query(description="Only images with this label.")] = None,
    offset: ListOffset = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> ImagePage:
    items, total = service.list_images(session, gallery_id, label=label, offset=offset, limit=limit)
    return ImagePage(items=[ImageOut.of(i) for i in items], total=total, offset=offset, limit=limit)


@router.get("/images/{image_id}", response_model=ImageOut, dependencies=[ReadAccess])
def get_image(image_id: Id, session: SessionDep) -> ImageOut:
    return ImageOut.of(service.get_image(session, image_id))


@router.get("/images/{image_id}/file", response_class=FileResponse, dependencies=[ReadAccess])
def get_image_file(image_id: Id, runtime: RuntimeDep, session: SessionDep) -> FileResponse:
    image = service.get_image(session, image_id)
    return FileResponse(service.image_path(runtime.settings, image), media_type=image.content_type)


@router.get(
    "/images/{image_id}/thumbnail",
    response_class=Response,
    dependencies=[ReadAccess],
    responses={200: {"content": {"image/jpeg": {}}}},
)
def get_thumbnail(image_id: Id, runtime: RuntimeDep, session: SessionDep) -> Response:
    image = service.get_image(session, image_id)
    return Response(service.thumbnail(runtime, image), media_type="image/jpeg")


@router.delete(
    "/images/{image_id}", status_code=status.HTTP_204_NO_CONTENT, dependencies=[WriteAccess]
)
def delete_image(image_id: Id, runtime: RuntimeDep, session: SessionDep) -> Response:
    service.delete_image(runtime, session, image_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
