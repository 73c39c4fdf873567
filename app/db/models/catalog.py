"""The catalog: embedding models, galleries, their images, stored embeddings and index versions.

The database is the source of truth. Every image's embedding is stored (one row per image and
model), so an index can be rebuilt, switched to another index type, or replayed after a crash
without embedding anything again; the FAISS files are a cache of these rows.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from app.db.base import Base


def utcnow() -> datetime:
    return datetime.now(UTC)


class Model(Base):
    """A registered, immutable model version: an artifact copied under Settings.models_dir."""

    __tablename__ = "models"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    # Directory name under Settings.models_dir; never a client-supplied path.
    artifact: Mapped[str] = mapped_column(String(200), unique=True)
    method: Mapped[str] = mapped_column(String(64))
    embedding_dim: Mapped[int] = mapped_column(Integer)
    card: Mapped[dict[str, Any]] = mapped_column(JSON)
    builtin: Mapped[bool] = mapped_column(default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Gallery(Base):
    """A searchable collection of images embedded by one model version."""

    __tablename__ = "galleries"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="RESTRICT"))
    index_type: Mapped[str] = mapped_column(String(16), default="flat")
    index_params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # Bumped whenever the index is replaced (other model or index type); see IndexVersion.
    index_version: Mapped[int] = mapped_column(Integer, default=1)
    # Bumped by every committed change to the gallery's images, so a process can tell whether
    # its in-memory index has seen everything (changes made by a worker included).
    revision: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    model: Mapped[Model] = relationship(lazy="joined")


class Image(Base):
    """An uploaded image, stored under a server-generated name below Settings.uploads_dir."""

    __tablename__ = "images"
    __table_args__ = (
        UniqueConstraint("gallery_id", "content_hash"),
        Index("ix_images_gallery_id_label", "gallery_id", "label"),
        Index("ix_images_gallery_id_external_id", "gallery_id", "external_id"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    gallery_id: Mapped[int] = mapped_column(ForeignKey("galleries.id", ondelete="CASCADE"))
    content_hash: Mapped[str] = mapped_column(String(64))
    file_name: Mapped[str] = mapped_column(String(100), unique=True)
    content_type: Mapped[str] = mapped_column(String(50))
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    size_bytes: Mapped[int] = mapped_column(Integer)
    label: Mapped[str | None] = mapped_column(String(200))
    # `metadata` is reserved on declarative classes; the column keeps the public name.
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", JSON, default=dict)
    external_id: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ImageEmbedding(Base):
    """One image's embedding by one model version, as little-endian float32 bytes."""

    __tablename__ = "image_embeddings"
    __table_args__ = (UniqueConstraint("image_id", "model_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"))
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), index=True)
    vector: Mapped[bytes] = mapped_column(LargeBinary)


class IndexVersion(Base):
    """History of a gallery's indexes: version N was built with this model, type and params."""

    __tablename__ = "index_versions"
    __table_args__ = (UniqueConstraint("gallery_id", "version"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    gallery_id: Mapped[int] = mapped_column(ForeignKey("galleries.id", ondelete="CASCADE"))
    version: Mapped[int] = mapped_column(Integer)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"))
    index_type: Mapped[str] = mapped_column(String(16))
    index_params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    size: Mapped[int] = mapped_column(Integer, default=0)
    # Recall@10 of this index against exact search, measured on a sample of its own vectors
    # when it was built (1.0 for flat; None: built empty, or before this was measured).
    recall_at_10: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Clustering(Base):
    """A `cluster` job's grouping of a gallery's images by their embeddings (one model)."""

    __tablename__ = "clusterings"

    id: Mapped[int] = mapped_column(primary_key=True)
    gallery_id: Mapped[int] = mapped_column(
        ForeignKey("galleries.id", ondelete="CASCADE"), index=True
    )
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"))
    job_id: Mapped[int | None] = mapped_column(Integer)
    method: Mapped[str] = mapped_column(String(32))
    k: Mapped[int] = mapped_column(Integer)
    # Mean silhouette (cosine) of the chosen k, and of every k tried when k was chosen by it.
    silhouette: Mapped[float | None] = mapped_column(Float)
    k_scores: Mapped[dict[str, float]] = mapped_column(JSON, default=dict)
    size: Mapped[int] = mapped_column(Integer)  # images clustered
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ClusterMember(Base):
    """One image's cluster in a clustering, and its cosine to the cluster's centre (members
    closest to the centre are the cluster's most typical pictures)."""

    __tablename__ = "cluster_members"
    __table_args__ = (Index("ix_cluster_members_cluster", "clustering_id", "cluster"),)

    clustering_id: Mapped[int] = mapped_column(
        ForeignKey("clusterings.id", ondelete="CASCADE"), primary_key=True
    )
    image_id: Mapped[int] = mapped_column(
        ForeignKey("images.id", ondelete="CASCADE"), primary_key=True, index=True
    )
    cluster: Mapped[int] = mapped_column(Integer)
    centre_score: Mapped[float] = mapped_column(Float)
