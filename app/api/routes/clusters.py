"""Clusterings of a gallery (made by `cluster` jobs, POST /jobs): list, show, page a cluster's
images, delete."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Response, status

from app.api.deps import ReadAccess, SessionDep, WriteAccess
from app.api.schemas import (
    MAX_INT,
    ClusteringDetail,
    ClusteringOut,
    Id,
    ImageOut,
    ImagePage,
    ListOffset,
)
from app.services import clusters as service
from app.services.galleries import get_gallery

router = APIRouter(tags=["clusters"])


@router.get(
    "/galleries/{gallery_id}/clusterings",
    response_model=list[ClusteringOut],
    dependencies=[ReadAccess],
)
def list_clusterings(gallery_id: Id, session: SessionDep) -> list[ClusteringOut]:
    """The gallery's clusterings, newest first."""
    get_gallery(session, gallery_id)
    return [ClusteringOut.model_validate(c) for c in service.list_clusterings(session, gallery_id)]


@router.get(
    "/clusterings/{clustering_id}", response_model=ClusteringDetail, dependencies=[ReadAccess]
)
def get_clustering(
    clustering_id: Id,
    session: SessionDep,
    examples: Annotated[
        int, Query(ge=0, le=50, description="Typical images shown per cluster.")
    ] = 8,
    offset: ListOffset = 0,
    limit: Annotated[int, Query(ge=1, le=500, description="Clusters in this page.")] = 50,
) -> ClusteringDetail:
    """A clustering with a page of its clusters, largest first: each one's size, its most
    common label and its most typical images (nearest its centre)."""
    clustering = service.get_clustering(session, clustering_id)
    clusters, total = service.cluster_summaries(
        session, clustering, examples=examples, offset=offset, limit=limit
    )
    return ClusteringDetail.of(clustering, clusters, total)


@router.get(
    "/clusterings/{clustering_id}/clusters/{cluster}/images",
    response_model=ImagePage,
    dependencies=[ReadAccess],
)
def cluster_images(
    clustering_id: Id,
    cluster: Annotated[int, Path(ge=0, le=MAX_INT)],
    session: SessionDep,
    offset: ListOffset = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> ImagePage:
    """One cluster's images, most typical first."""
    clustering = service.get_clustering(session, clustering_id)
    images, total = service.cluster_images(session, clustering, cluster, offset, limit)
    return ImagePage(
        items=[ImageOut.of(i) for i in images], total=total, offset=offset, limit=limit
    )


@router.delete(
    "/clusterings/{clustering_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    dependencies=[WriteAccess],
)
def delete_clustering(clustering_id: Id, session: SessionDep) -> Response:
    service.delete_clustering(session, clustering_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
