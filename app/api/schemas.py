"""Request and response bodies of every route (pydantic v2). The services' own input models
(a job kind's parameters, `DatasetRequest`) live with the services that validate them."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import Path, Query
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    model_validator,
)

from app.api import input_rules
from app.db.models import Clustering, Dataset, Image
from app.index_store import IndexType
from app.services.clusters import ClusterSummary
from app.services.duplicates import DuplicateGroup
from app.services.filters import Filters, MetadataValue
from app.services.galleries import GalleryInfo
from app.services.images import UploadResult
from app.services.jobs.registry import KINDS
from app.services.search import Classification, Hit, SearchOutcome, Vote

API = "/api/v1"
METADATA_KEY = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
# Ids (positive) and list offsets are PostgreSQL `integer`s: other values get a 422 from validation
# instead of an overflow in the database driver (a 500).
MAX_INT = 2**31 - 1
Id = Annotated[int, Path(ge=1, le=MAX_INT)]
ListOffset = Annotated[int, Query(ge=0, le=MAX_INT)]


def _as_utc(value: datetime) -> datetime:
    """SQLite hands back naive datetimes: they were stored in UTC."""
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


Timestamp = Annotated[datetime, AfterValidator(_as_utc)]
Name = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]


class ModelOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    name: str
    method: str
    embedding_dim: int
    builtin: bool
    created_at: Timestamp


class ModelDetail(ModelOut):
    card: dict[str, Any] = Field(
        description="The artifact's card: architecture, preprocessing, metrics."
    )


class GalleryCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Name
    model_id: int | None = Field(
        None, ge=1, le=MAX_INT, description="Defaults to the built-in pretrained model."
    )
    index_type: IndexType = IndexType.flat
    index_params: dict[str, Any] = Field(default_factory=dict)


class GalleryUpdate(BaseModel):
    """Switch the gallery to another index type or parameters (rebuilt from the stored
    embeddings, nothing is re-embedded)."""

    model_config = ConfigDict(extra="forbid")

    index_type: IndexType | None = None
    index_params: dict[str, Any] | None = None


class GalleryOut(BaseModel):
    id: int
    name: str
    model_id: int
    index_type: str
    index_params: dict[str, Any]
    index_version: int
    image_count: int
    labelled_count: int
    index_size: int = Field(description="Vectors in the gallery's active index.")
    suggested_index_type: str | None = Field(
        description="An approximate index type, suggested once the gallery is large."
    )
    index_recall_at_10: float | None = Field(
        description="Recall@10 of the active index against exact search, measured on a sample "
        "of the gallery's own vectors when the index was built (1 for flat; null: not measured, "
        "e.g. built empty and grown by uploads)."
    )
    created_at: Timestamp

    @classmethod
    def of(cls, info: GalleryInfo) -> GalleryOut:
        g = info.gallery
        return cls(
            id=g.id,
            name=g.name,
            model_id=g.model_id,
            index_type=g.index_type,
            index_params=g.index_params,
            index_version=g.index_version,
            image_count=info.image_count,
            labelled_count=info.labelled_count,
            index_size=info.index_size,
            suggested_index_type=info.suggested_index_type,
            index_recall_at_10=info.recall_at_10,
            created_at=g.created_at,
        )


class ImageOut(BaseModel):
    id: int
    gallery_id: int
    label: str | None
    metadata: dict[str, Any]
    external_id: str | None
    content_type: str
    width: int
    height: int
    size_bytes: int
    content_hash: str
    created_at: Timestamp
    file_url: str
    thumbnail_url: str

    @classmethod
    def of(cls, image: Image) -> ImageOut:
        return cls(
            id=image.id,
            gallery_id=image.gallery_id,
            label=image.label,
            metadata=image.meta,
            external_id=image.external_id,
            content_type=image.content_type,
            width=image.width,
            height=image.height,
            size_bytes=image.size_bytes,
            content_hash=image.content_hash,
            created_at=image.created_at,
            file_url=f"{API}/images/{image.id}/file",
            thumbnail_url=f"{API}/images/{image.id}/thumbnail",
        )


class ImagePage(BaseModel):
    items: list[ImageOut]
    total: int
    offset: int
    limit: int


class UploadItem(BaseModel):
    filename: str | None
    status: Literal["created", "duplicate", "rejected"]
    status_code: int
    image: ImageOut | None = None
    error: str | None = None

    @classmethod
    def of(cls, result: UploadResult) -> UploadItem:
        kind = "rejected" if result.error else "duplicate" if result.duplicate else "created"
        return cls(
            filename=result.filename,
            status=kind,
            status_code=result.status_code,
            image=None if result.image is None else ImageOut.of(result.image),
            error=result.error,
        )


class UploadResponse(BaseModel):
    results: list[UploadItem] = Field(description="One per file, in the request's order.")
    created: int
    duplicates: int
    rejected: int

    @classmethod
    def of(cls, results: list[UploadItem]) -> UploadResponse:
        return cls(
            results=results,
            created=sum(r.status == "created" for r in results),
            duplicates=sum(r.status == "duplicate" for r in results),
            rejected=sum(r.status == "rejected" for r in results),
        )


class SearchHit(BaseModel):
    image_id: int
    score: float
    label: str | None
    metadata: dict[str, Any]
    external_id: str | None
    file_url: str

    @classmethod
    def of(cls, hit: Hit) -> SearchHit:
        return cls(
            image_id=hit.image.id,
            score=round(hit.score, 6),
            label=hit.image.label,
            metadata=hit.image.meta,
            external_id=hit.image.external_id,
            file_url=f"{API}/images/{hit.image.id}/file",
        )


class SearchResponse(BaseModel):
    results: list[SearchHit]
    model_id: int
    index_version: int
    took_ms: float

    @classmethod
    def of(cls, outcome: SearchOutcome) -> SearchResponse:
        return cls(
            results=[SearchHit.of(h) for h in outcome.hits[0]],
            model_id=outcome.model_id,
            index_version=outcome.index_version,
            took_ms=round(outcome.took_ms, 3),
        )


class QueryResults(BaseModel):
    results: list[SearchHit]


class BatchSearchResponse(BaseModel):
    queries: list[QueryResults] = Field(description="One entry per query image, in order.")
    model_id: int
    index_version: int
    took_ms: float

    @classmethod
    def of(cls, outcome: SearchOutcome) -> BatchSearchResponse:
        return cls(
            queries=[QueryResults(results=[SearchHit.of(h) for h in row]) for row in outcome.hits],
            model_id=outcome.model_id,
            index_version=outcome.index_version,
            took_ms=round(outcome.took_ms, 3),
        )


class FilterFields(BaseModel):
    labels: list[str] | None = Field(None, description="Only images with one of these labels.")
    metadata: dict[str, MetadataValue] = Field(
        default_factory=dict, description="Only images whose metadata has these key: value pairs."
    )

    @model_validator(mode="after")
    def _keys(self) -> FilterFields:
        check_metadata_keys(self.metadata)
        return self

    def filters(self) -> Filters:
        return Filters(self.labels or None, dict(self.metadata))


class VectorSearch(FilterFields):
    model_config = ConfigDict(extra="forbid")

    vector: list[float] = Field(min_length=1, description="A query embedding of the model's size.")
    k: int = Field(10, ge=1)
    offset: int = Field(0, ge=0)
    min_score: float | None = Field(None, ge=-1.0, le=1.0)


class VoteOut(BaseModel):
    label: str
    count: int
    score: float

    @classmethod
    def of(cls, vote: Vote) -> VoteOut:
        return cls(label=vote.label, count=vote.count, score=vote.score)


class Prediction(BaseModel):
    label: str | None = Field(description="The kNN vote's label (None: no labelled neighbour).")
    confidence: float
    votes: list[VoteOut]
    cluster_label: str | None = Field(
        None, description="Magnet's cluster classifier's label (Magnet models only)."
    )
    cluster_probabilities: dict[str, float] | None = None
    neighbours: list[SearchHit]


class ClassifyResponse(BaseModel):
    predictions: list[Prediction]
    model_id: int
    index_version: int
    took_ms: float

    @classmethod
    def of(cls, results: list[Classification], outcome: SearchOutcome) -> ClassifyResponse:
        return cls(
            predictions=[
                Prediction(
                    label=r.label,
                    confidence=r.confidence,
                    votes=[VoteOut.of(v) for v in r.votes],
                    cluster_label=r.cluster_label,
                    cluster_probabilities=r.cluster_probabilities,
                    neighbours=[SearchHit.of(h) for h in hits],
                )
                for r, hits in zip(results, outcome.hits, strict=True)
            ],
            model_id=outcome.model_id,
            index_version=outcome.index_version,
            took_ms=round(outcome.took_ms, 3),
        )


def check_metadata_keys(metadata: dict[str, Any]) -> None:
    bad = [key for key in metadata if not METADATA_KEY.match(key)]
    if bad:
        raise ValueError(
            f"metadata keys must be 1-64 characters of letters, digits, '_', '.', '-': {bad}"
        )


def parse_metadata(text: str | None, what: str) -> dict[str, Any]:
    """A JSON object from a form field (empty or absent: {}); ValueError names the problem."""
    if text is None or not text.strip():
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{what} is not valid JSON ({error.msg})") from None
    if not isinstance(value, dict):
        raise ValueError(f'{what} must be a JSON object, e.g. {{"colour": "red"}}')
    check_metadata_keys(value)
    input_rules.check(value, what)
    return value


def parse_metadata_filter(text: str | None) -> dict[str, MetadataValue]:
    """The `metadata` filter of a multipart search: a JSON object of scalar values."""
    value = parse_metadata(text, "the metadata filter")
    if not all(isinstance(v, MetadataValue) for v in value.values()):
        raise ValueError("metadata filter values must be strings, numbers or booleans")
    return value


# ---------------------------------------------------------------------- datasets and jobs
class DatasetOut(BaseModel):
    id: int
    name: str
    kind: str
    status: str = Field(description="ready, building (a worker builds it) or failed")
    splits: dict[str, Any] | None = Field(description="classes and images per split")
    job_id: int | None = Field(description="the job building it (icons, cjk)")
    error: str | None
    created_at: Timestamp

    @classmethod
    def of(cls, dataset: Dataset) -> DatasetOut:
        error = None
        if dataset.status == "failed":
            error = dataset.job.error if dataset.job else "its build job no longer exists"
        return cls(
            id=dataset.id,
            name=dataset.name,
            kind=dataset.kind,
            status=dataset.status,
            splits=dataset.summary,
            job_id=dataset.job_id,
            error=error,
            created_at=dataset.created_at,
        )


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: str = Field(
        description=", ".join(name for name, kind in KINDS.items() if kind.submittable)
    )
    params: dict[str, Any] = Field(
        default_factory=dict,
        description="; ".join(kind.description for kind in KINDS.values() if kind.submittable),
    )


class JobOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    type: str
    state: str = Field(description="queued, running, succeeded, failed or cancelled")
    queue: str
    params: dict[str, Any]
    progress: float = Field(description="0 to 1")
    epoch: int | None
    step: int | None
    total_steps: int | None
    metrics: dict[str, Any] | None = Field(description="The latest metrics the job reported.")
    eta: Timestamp | None = Field(description="Estimated completion time (UTC).")
    error: str | None
    result: dict[str, Any] | None = Field(
        description="What the job produced; see each type's params description."
    )
    cancel_requested: bool
    worker: str | None
    heartbeat_at: Timestamp | None
    created_at: Timestamp
    started_at: Timestamp | None
    finished_at: Timestamp | None
    celery_task_id: str | None


class JobPage(BaseModel):
    items: list[JobOut]
    total: int
    offset: int
    limit: int


class PresetOut(BaseModel):
    name: str
    method: str = Field(description="The training method the preset runs.")
    recommended: bool = Field(
        description="The best method measured on a benchmark, or the one for any other data."
    )
    description: str = Field(description="What the preset is for and where it was tuned.")


class DuplicateGroupOut(BaseModel):
    images: list[ImageOut] = Field(description="The group's images, by id.")
    max_score: float = Field(description="Cosine similarity of the group's most similar pair.")
    min_score: float = Field(description="The least similar pair that joined the group.")

    @classmethod
    def of(cls, group: DuplicateGroup) -> DuplicateGroupOut:
        images = [ImageOut.of(image) for image in group.images]
        return cls(
            images=images, max_score=round(group.max_score, 6), min_score=round(group.min_score, 6)
        )


class DuplicatesResponse(BaseModel):
    threshold: float
    total_groups: int = Field(description="Groups found; `groups` holds the largest `limit`.")
    groups: list[DuplicateGroupOut]


class ClusteringOut(BaseModel):
    """A stored clustering of a gallery (the result of a `cluster` job)."""

    model_config = ConfigDict(from_attributes=True)

    id: int
    gallery_id: int
    model_id: int
    job_id: int | None
    method: str
    k: int = Field(description="Clusters (k-means may leave some empty: they are dropped).")
    silhouette: float | None = Field(description="Mean silhouette (cosine) of the clusters.")
    k_scores: dict[str, float] = Field(
        description="Silhouette of every k tried, when k was chosen by it."
    )
    size: int = Field(description="Images clustered.")
    created_at: Timestamp


class ClusterOut(BaseModel):
    cluster: int = Field(description="Cluster number: 0 is the largest.")
    size: int
    top_label: str | None = Field(description="The most common label among its images.")
    top_label_share: float | None = Field(description="That label's share of labelled images.")
    examples: list[ImageOut] = Field(description="Its most typical images (nearest the centre).")

    @classmethod
    def of(cls, summary: ClusterSummary) -> ClusterOut:
        return cls(
            cluster=summary.cluster,
            size=summary.size,
            top_label=summary.top_label,
            top_label_share=summary.top_label_share,
            examples=[ImageOut.of(image) for image in summary.examples],
        )


class ClusteringDetail(ClusteringOut):
    total_clusters: int = Field(description="Clusters that still have images.")
    clusters: list[ClusterOut] = Field(description="The page of clusters, largest first.")

    @classmethod
    def of(
        cls, clustering: Clustering, clusters: list[ClusterSummary], total: int
    ) -> ClusteringDetail:
        return cls(
            **ClusteringOut.model_validate(clustering).model_dump(),
            total_clusters=total,
            clusters=[ClusterOut.of(summary) for summary in clusters],
        )
