"""Search: by uploaded image(s), by an image already stored, by raw vector; classify."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Depends, File, Form, Query, UploadFile

from app.api.deps import ReadAccess, RuntimeDep, SessionDep
from app.api.schemas import (
    BatchSearchResponse,
    ClassifyResponse,
    DuplicateGroupOut,
    DuplicatesResponse,
    Id,
    SearchResponse,
    VectorSearch,
    parse_metadata_filter,
)
from app.services import search as service
from app.services.duplicates import near_duplicates
from app.services.errors import Invalid
from app.services.filters import Filters
from app.services.search import SearchPage

router = APIRouter(tags=["search"], dependencies=[ReadAccess])

K = Annotated[int, Form(ge=1, description="Number of results.")]
Offset = Annotated[int, Form(ge=0, description="Results to skip (paging).")]
Labels = Annotated[list[str] | None, Form(description="Only images with one of these labels.")]
MetadataFilter = Annotated[
    str | None,
    Form(description='Only images whose metadata has these pairs, a JSON object: {"k": "v"}.'),
]
MinScore = Annotated[
    float | None, Form(ge=-1.0, le=1.0, description="Drop hits below this cosine similarity.")
]


def form_page(
    k: K = 10,
    offset: Offset = 0,
    label: Labels = None,
    metadata: MetadataFilter = None,
    min_score: MinScore = None,
) -> SearchPage:
    """The page of hits an image search asks for, from its form fields."""
    try:
        filters = Filters(label or None, parse_metadata_filter(metadata))
    except ValueError as error:
        raise Invalid(str(error)) from None
    return SearchPage(k, offset, filters, min_score)


FormPage = Annotated[SearchPage, Depends(form_page)]


def _read(files: list[UploadFile]) -> list[bytes]:
    return [file.file.read() for file in files]


@router.post("/galleries/{gallery_id}/search", response_model=SearchResponse)
def search(
    gallery_id: Id,
    runtime: RuntimeDep,
    session: SessionDep,
    image: Annotated[UploadFile, File(description="The query image.")],
    page: FormPage,
) -> SearchResponse:
    """The k gallery images most similar to the query image (cosine similarity, best first)."""
    outcome = service.search_images(runtime, session, gallery_id, _read([image]), page)
    return SearchResponse.of(outcome)


@router.post("/galleries/{gallery_id}/search/batch", response_model=BatchSearchResponse)
def search_batch(
    gallery_id: Id,
    runtime: RuntimeDep,
    session: SessionDep,
    images: Annotated[list[UploadFile], File(description="Several query images.")],
    page: FormPage,
) -> BatchSearchResponse:
    """Several query images in one request, embedded as one batch; results per query."""
    if len(images) > runtime.settings.max_files_per_request:
        raise Invalid(f"send at most {runtime.settings.max_files_per_request} query images")
    outcome = service.search_images(runtime, session, gallery_id, _read(images), page)
    return BatchSearchResponse.of(outcome)


@router.post("/galleries/{gallery_id}/search/vector", response_model=SearchResponse)
def search_vector(
    gallery_id: Id, body: Annotated[VectorSearch, Body()], runtime: RuntimeDep, session: SessionDep
) -> SearchResponse:
    """Search with an embedding computed elsewhere (it must have the model's dimension)."""
    page = SearchPage(body.k, body.offset, body.filters(), body.min_score)
    outcome = service.search_vector(runtime, session, gallery_id, [body.vector], page)
    return SearchResponse.of(outcome)


@router.get("/images/{image_id}/similar", response_model=SearchResponse)
def similar(
    image_id: Id,
    runtime: RuntimeDep,
    session: SessionDep,
    k: Annotated[int, Query(ge=1)] = 10,
    offset: Annotated[int, Query(ge=0)] = 0,
    label: Annotated[list[str] | None, Query()] = None,
    min_score: Annotated[float | None, Query(ge=-1.0, le=1.0)] = None,
) -> SearchResponse:
    """Images similar to one already in a gallery (itself excluded); nothing is uploaded."""
    page = SearchPage(k, offset, Filters(label or None), min_score)
    outcome = service.similar_images(runtime, session, image_id, page)
    return SearchResponse.of(outcome)


@router.get("/galleries/{gallery_id}/duplicates", response_model=DuplicatesResponse)
def duplicates(
    gallery_id: Id,
    runtime: RuntimeDep,
    session: SessionDep,
    threshold: Annotated[
        float, Query(gt=0.0, le=1.0, description="Minimum cosine similarity of a pair.")
    ] = 0.95,
    limit: Annotated[int, Query(ge=1, le=1000, description="Largest groups returned.")] = 100,
) -> DuplicatesResponse:
    """Groups of near-duplicate images (re-encoded, resized, lightly edited copies), found
    with the gallery's index: each image's nearest neighbours at or above `threshold`, joined
    into groups; the largest first. Byte-identical uploads are already stored once."""
    groups, total = near_duplicates(runtime, session, gallery_id, threshold, limit)
    return DuplicatesResponse(
        threshold=threshold,
        total_groups=total,
        groups=[DuplicateGroupOut.of(group) for group in groups],
    )


@router.post("/galleries/{gallery_id}/classify", response_model=ClassifyResponse)
def classify(
    gallery_id: Id,
    runtime: RuntimeDep,
    session: SessionDep,
    images: Annotated[list[UploadFile], File(description="One or more query images.")],
    k: K = 10,
) -> ClassifyResponse:
    """Predict each query's label by a similarity-weighted vote of its k nearest labelled
    images; Magnet models also answer with their cluster classifier (`cluster_label`)."""
    if len(images) > runtime.settings.max_files_per_request:
        raise Invalid(f"send at most {runtime.settings.max_files_per_request} query images")
    results, outcome = service.classify(runtime, session, gallery_id, _read(images), k=k)
    return ClassifyResponse.of(results, outcome)
