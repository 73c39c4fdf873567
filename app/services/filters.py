"""Search filters (labels, metadata equality) and their meaning in the database.

Both index backends apply the same filter: FAISS searches only the ids the database selects
(`allowed_ids`), Milvus evaluates an expression over the label and metadata it stores beside
each vector, then checks the JSON types the way `metadata_matches` does here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sqlalchemy import ColumnElement, and_, cast, func, select
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Session

from app.db.models import Image

MetadataValue = str | int | float | bool


@dataclass
class Filters:
    """Which images may be returned: any of `labels` (when given), every metadata key equal to
    its value, and only labelled images when `labelled_only` (the kNN classifier's voters)."""

    labels: list[str] | None = None
    metadata: dict[str, MetadataValue] = field(default_factory=dict)
    labelled_only: bool = False

    def __bool__(self) -> bool:
        return bool(self.labels) or bool(self.metadata) or self.labelled_only


def allowed_ids(session: Session, gallery_id: int, filters: Filters) -> np.ndarray:
    """The ids of the gallery's images that pass `filters`."""
    query = select(Image.id).where(Image.gallery_id == gallery_id)
    if filters.labels:
        query = query.where(Image.label.in_(filters.labels))
    if filters.labelled_only:
        query = query.where(Image.label.is_not(None))
    dialect = session.get_bind().dialect.name
    for key, value in filters.metadata.items():
        query = query.where(_metadata_equals(dialect, key, value))
    return np.asarray(session.scalars(query).all(), dtype=np.int64)


def _metadata_equals(dialect: str, key: str, value: MetadataValue) -> ColumnElement[bool]:
    """metadata[key] == value with JSON types respected (1 is not "1", true is not 1)."""
    if dialect == "postgresql":
        return cast(Image.meta, JSONB).contains({key: value})
    path = f'$."{key}"'  # keys are restricted to [A-Za-z0-9_.-] by the API schema
    kind = func.json_type(Image.meta, path)
    extracted = func.json_extract(Image.meta, path)
    if isinstance(value, bool):
        return kind == ("true" if value else "false")
    if isinstance(value, int | float):
        return and_(kind.in_(("integer", "real")), extracted == value)
    return and_(kind == "text", extracted == value)


def metadata_matches(metadata: dict[str, Any] | None, wanted: dict[str, MetadataValue]) -> bool:
    """The same equality as the database filter, in Python: JSON types respected (a boolean
    equals only a boolean, a number only a number, 1 equals 1.0)."""
    metadata = metadata or {}
    for key, value in wanted.items():
        if key not in metadata:
            return False
        stored = metadata[key]
        if isinstance(value, bool) or isinstance(stored, bool):
            if not (isinstance(value, bool) and isinstance(stored, bool) and value == stored):
                return False
        elif isinstance(value, int | float):
            if not (isinstance(stored, int | float) and stored == value):
                return False
        elif not (isinstance(stored, str) and stored == value):
            return False
    return True


@dataclass(frozen=True)
class SearchPage:
    """Which hits a search answers with: up to `k` per query after skipping `offset`, only
    images that pass `filters`, none below the cosine similarity `min_score`."""

    k: int = 10
    offset: int = 0
    filters: Filters | None = None
    min_score: float | None = None

    def __post_init__(self) -> None:
        if self.k < 0 or self.offset < 0:
            raise ValueError(f"k and offset must be >= 0, got k={self.k}, offset={self.offset}")

    @property
    def end(self) -> int:
        """How many ranked hits per query the page needs from the index."""
        return self.offset + self.k

    def cut(self, ranked: list[list[tuple[int, float]]]) -> list[list[tuple[int, float]]]:
        """Each query's hits (id, score), ranked from the first, reduced to this page."""
        return [
            [
                (i, s)
                for i, s in row[self.offset : self.end]
                if self.min_score is None or s >= self.min_score
            ]
            for row in ranked
        ]
