"""`cluster`: group a gallery's images by their embeddings, k-means or agglomerative, with k
given or chosen by silhouette (the `cpu` queue); the result is stored as a clustering that
GET /api/v1/clusterings/{id} shows (app/services/clusters.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import Field, model_validator
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.db.models import Image
from app.services.clusters import AGGLOMERATIVE_MAX_IMAGES, ClusterMethod
from app.services.errors import Invalid
from app.services.galleries import get_gallery
from app.services.jobs.base import CPU_QUEUE, JobKind, JobParams, RowId, must_exist

if TYPE_CHECKING:
    from app.services.jobs.lifecycle import JobRun

TYPE = "cluster"
# What POST /jobs documents for this kind (the OpenAPI description of `params`).
DESCRIPTION = (
    "cluster: gallery_id, method (kmeans|agglomerative), k (omit: chosen by silhouette between "
    "k_min and k_max), seed (result: clustering_id, k, silhouette, label agreement)"
)
MAX_K = 10_000


class ClusterParams(JobParams):
    gallery_id: RowId
    method: ClusterMethod = "kmeans"
    k: int | None = Field(None, ge=1, le=MAX_K, description="omit: chosen by silhouette")
    k_min: int = Field(2, ge=2, le=MAX_K)
    k_max: int = Field(50, ge=2, le=MAX_K)
    seed: int = Field(0, ge=0, le=2**31 - 1)

    @model_validator(mode="after")
    def _range(self) -> ClusterParams:
        if self.k_min > self.k_max:
            raise ValueError(f"k_min ({self.k_min}) is above k_max ({self.k_max})")
        return self


def validate(session: Session, settings: Settings, params: ClusterParams) -> None:
    must_exist(get_gallery, session, params.gallery_id)
    count = session.scalar(select(func.count()).where(Image.gallery_id == params.gallery_id)) or 0
    if count < 2:
        raise Invalid(
            f"gallery {params.gallery_id} has {count} image{'' if count == 1 else 's'}; "
            "clustering needs at least 2"
        )
    if params.method == "agglomerative" and count > AGGLOMERATIVE_MAX_IMAGES:
        raise Invalid(
            f"agglomerative clustering is limited to {AGGLOMERATIVE_MAX_IMAGES} images (gallery "
            f"{params.gallery_id} has {count}); use kmeans"
        )


def body(run: JobRun) -> dict[str, Any]:
    from app.services.clusters import (
        cluster_vectors,
        gallery_vectors,
        label_agreement,
        save_clustering,
    )

    params = ClusterParams.model_validate(run.job.params)

    def progress(done: int, total: int) -> None:
        run.report(progress=0.1 + 0.8 * done / total, step=done, total_steps=total)
        run.check()

    with run.session() as session:
        gallery = get_gallery(session, params.gallery_id)
        ids, vectors = gallery_vectors(session, gallery)
        run.report(progress=0.1, force=True)
        result = cluster_vectors(
            vectors,
            params.method,
            params.k,
            k_min=params.k_min,
            k_max=params.k_max,
            seed=params.seed,
            progress=progress,
        )
        run.check()
        clustering = save_clustering(session, gallery, ids, result, params.method, run.id)
        labels = dict(
            session.execute(select(Image.id, Image.label).where(Image.id.in_(ids.tolist()))).all()
        )
        agreement = label_agreement(result.assignments, [labels.get(i) for i in ids.tolist()])
        return {
            "clustering_id": clustering.id,
            "gallery_id": gallery.id,
            "model_id": gallery.model_id,
            "method": params.method,
            "k": result.k,
            "silhouette": clustering.silhouette,
            "k_scores": clustering.k_scores,
            "images": len(ids),
            "labels": agreement,
        }


KIND = JobKind(TYPE, CPU_QUEUE, ClusterParams, body, DESCRIPTION, validate)
