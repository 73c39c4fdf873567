"""Every table, imported here so that Alembic and the app see one complete metadata."""

from app.db.models.catalog import Gallery, Image, ImageEmbedding, IndexVersion, Model
from app.db.models.jobs import Dataset, Job

__all__ = ["Dataset", "Gallery", "Image", "ImageEmbedding", "IndexVersion", "Job", "Model"]
