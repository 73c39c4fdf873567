"""Search a gallery by image, by a stored image, or by raw vector; classify by neighbours.

Filters (labels, metadata equality) are applied by the index backend before ranking
(app/services/filters.py), so a filtered search still returns k hits when k exist. Paging is a
re-search with k + offset; the exact index pages deterministically.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db.models import Gallery, Image, ImageEmbedding
from app.embedder import BatchingEmbedder
from app.imaging import ImageRejected, check_request_pixels
from app.services.errors import Conflict, Invalid, ServiceError
from app.services.filters import Filters, SearchPage
from app.services.galleries import get_gallery
from app.services.images import decode_for_embedding, get_image
from app.services.indexes import vectors_from_rows
from app.services.models import cluster_classifier, embedder_for
from app.services.runtime import Runtime


@dataclass
class Hit:
    image: Image
    score: float


@dataclass
class SearchOutcome:
    hits: list[list[Hit]]  # one list per query, best first
    model_id: int
    index_version: int
    took_ms: float


@dataclass
class Vote:
    label: str
    count: int
    score: float


@dataclass
class Classification:
    label: str | None  # the kNN vote's winner (None when no labelled neighbour was found)
    confidence: float  # its share of the neighbours' summed similarity
    votes: list[Vote]
    cluster_label: str | None = None  # Magnet's cluster classifier, for Magnet models
    cluster_probabilities: dict[str, float] | None = None


def decode_queries(runtime: Runtime, files: Sequence[bytes], embedder: BatchingEmbedder) -> list:
    """Decode and preprocess query images one by one, keeping only the model's input tensors
    (a 40-megapixel query is decoded at a reduced size, within the process's decode budget,
    and never held beside the next one); a bad image rejects the request (queries have no
    partial results)."""
    try:
        check_request_pixels(list(files), runtime.settings.max_request_pixels)
    except ImageRejected as error:
        raise ServiceError(error.detail, error.status_code) from error
    prepared = []
    for number, data in enumerate(files, start=1):
        try:
            picture = decode_for_embedding(runtime, embedder, data)
        except ImageRejected as error:
            where = f"query image {number}: " if len(files) > 1 else ""
            raise ServiceError(where + error.detail, error.status_code) from error
        prepared.extend(embedder.prepare([picture]))
    return prepared


def search_images(
    runtime: Runtime,
    session: Session,
    gallery_id: int,
    files: Sequence[bytes],
    page: SearchPage,
) -> SearchOutcome:
    started = time.perf_counter()
    gallery = get_gallery(session, gallery_id)
    embedder = embedder_for(runtime, gallery.model)
    vectors = embedder.embed(decode_queries(runtime, files, embedder))
    return _search(runtime, session, gallery, vectors, page, started)


def search_vector(
    runtime: Runtime,
    session: Session,
    gallery_id: int,
    vectors: Sequence[Sequence[float]],
    page: SearchPage,
) -> SearchOutcome:
    started = time.perf_counter()
    gallery = get_gallery(session, gallery_id)
    queries = np.asarray(vectors, dtype=np.float32)
    dimension = gallery.model.embedding_dim
    if queries.ndim != 2 or queries.shape[1] != dimension:
        got = queries.shape[-1] if queries.ndim == 2 else "ragged"
        raise Invalid(
            f"the vector has dimension {got}; gallery {gallery_id}'s model "
            f"{gallery.model_id} embeds in {dimension} dimensions"
        )
    if not np.isfinite(queries).all() or not (np.linalg.norm(queries, axis=1) > 0).all():
        raise Invalid("vectors must be finite and not all zero")
    return _search(runtime, session, gallery, queries, page, started)


def similar_images(
    runtime: Runtime,
    session: Session,
    image_id: int,
    page: SearchPage,
) -> SearchOutcome:
    """Neighbours of an image already in a gallery (itself excluded), by its stored vector."""
    started = time.perf_counter()
    image = get_image(session, image_id)
    gallery = get_gallery(session, image.gallery_id)
    stored = session.scalar(
        select(ImageEmbedding.vector).where(
            ImageEmbedding.image_id == image_id, ImageEmbedding.model_id == gallery.model_id
        )
    )
    if stored is None:  # the gallery switched models after this image was read
        raise Conflict(f"image {image_id} has no embedding by the gallery's model yet; retry")
    vector = vectors_from_rows([stored], gallery.model.embedding_dim)
    # One more than the page asks for, from the first hit: the image itself is among them.
    wider = replace(page, k=page.offset + page.k + 1, offset=0)
    outcome = _search(runtime, session, gallery, vector, wider, started)
    hits = [hit for hit in outcome.hits[0] if hit.image.id != image_id]
    outcome.hits = [hits[page.offset : page.offset + page.k]]
    return outcome


def _search(
    runtime: Runtime,
    session: Session,
    gallery: Gallery,
    queries: np.ndarray,
    page: SearchPage,
    started: float,
) -> SearchOutcome:
    if page.k + page.offset > runtime.settings.max_k:
        raise Invalid(
            f"k + offset = {page.k + page.offset} is above the limit of "
            f"{runtime.settings.max_k}; narrow the search with filters or a minimum score"
        )
    found = runtime.indexes.search(session, gallery, queries, page)
    images = _images_by_id(session, {image_id for hits in found for image_id, _ in hits})
    hits = [
        [Hit(images[image_id], score) for image_id, score in row if image_id in images]
        for row in found
    ]
    took_ms = (time.perf_counter() - started) * 1000
    return SearchOutcome(hits, gallery.model_id, gallery.index_version, took_ms)


def _images_by_id(session: Session, ids: set[int]) -> dict[int, Image]:
    if not ids:
        return {}
    return {image.id: image for image in session.scalars(select(Image).where(Image.id.in_(ids)))}


def classify(
    runtime: Runtime, session: Session, gallery_id: int, files: Sequence[bytes], *, k: int
) -> tuple[list[Classification], SearchOutcome]:
    """Predict each query's label by a similarity-weighted vote of its k nearest labelled
    images, and with Magnet's cluster classifier when the gallery's model has one."""
    started = time.perf_counter()
    gallery = get_gallery(session, gallery_id)
    embedder = embedder_for(runtime, gallery.model)
    vectors = embedder.embed(decode_queries(runtime, files, embedder))
    labelled = session.scalar(
        select(Image.id).where(Image.gallery_id == gallery_id, Image.label.is_not(None)).limit(1)
    )
    if labelled is None:
        raise Invalid(f"gallery {gallery_id} has no labelled images to vote; upload some labels")
    voters = SearchPage(k, filters=Filters(labelled_only=True))
    found = runtime.indexes.search(session, gallery, vectors, voters)
    images = _images_by_id(session, {image_id for hits in found for image_id, _ in hits})
    hits = [
        [Hit(images[image_id], score) for image_id, score in row if image_id in images]
        for row in found
    ]
    results = [_vote(row) for row in hits]
    classifier = cluster_classifier(runtime, gallery.model)
    if classifier is not None:
        names = list(gallery.model.card.get("method", {}).get("class_names", []))
        predicted, probabilities = classifier.predict(vectors)
        for result, winner, row in zip(results, predicted, probabilities, strict=True):
            result.cluster_label = _class_name(names, int(winner))
            result.cluster_probabilities = {
                _class_name(names, c): round(float(p), 6) for c, p in enumerate(row) if p > 0
            }
    took_ms = (time.perf_counter() - started) * 1000
    return results, SearchOutcome(hits, gallery.model_id, gallery.index_version, took_ms)


def _class_name(names: list[str], index: int) -> str:
    return names[index] if index < len(names) else str(index)


def _vote(hits: list[Hit]) -> Classification:
    counts: dict[str, int] = defaultdict(int)
    scores: dict[str, float] = defaultdict(float)
    for hit in hits:
        assert hit.image.label is not None
        counts[hit.image.label] += 1
        scores[hit.image.label] += max(hit.score, 0.0)
    votes = sorted(
        (Vote(label, counts[label], round(scores[label], 6)) for label in counts),
        key=lambda v: (-v.score, -v.count, v.label),
    )
    if not votes:
        return Classification(None, 0.0, [])
    total = sum(v.score for v in votes)
    confidence = votes[0].score / total if total > 0 else votes[0].count / len(hits)
    return Classification(votes[0].label, round(confidence, 6), votes)
