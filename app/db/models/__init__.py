"""Every table, imported here so that Alembic and the app see one complete metadata."""

from app.db.models.catalog import (
    Clustering,
    ClusterMember,
    Gallery,
    Image,
    ImageEmbedding,
    IndexVersion,
    Model,
)
from app.db.models.jobs import Dataset, Job

__all__ = [
    "ClusterMember",
    "Clustering",
    "Dataset",
    "Gallery",
    "Image",
    "ImageEmbedding",
    "IndexVersion",
    "Job",
    "Model",
]
