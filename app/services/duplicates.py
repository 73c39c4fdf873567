"""Near-duplicate images of a gallery: groups whose members are at least `threshold` cosine-
similar to one another through a chain of pairs (the same photo re-encoded, resized, lightly
edited). Found with the gallery's own index, as clip-retrieval and Immich do: each image's few
nearest neighbours above the threshold, joined into groups, never all pairs compared."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db.models import Image
from app.services.errors import Invalid
from app.services.filters import SearchPage
from app.services.galleries import get_gallery
from app.services.indexes import stored_ids, stored_vectors
from app.services.runtime import Runtime

# Neighbours read per image: a group larger than this still forms, through members it shares.
NEIGHBOURS = 8
QUERY_BATCH = 256  # images searched together


@dataclass
class DuplicateGroup:
    images: list[Image]  # by id
    max_score: float  # the most similar pair in the group
    min_score: float  # the least similar pair that joined it (>= the threshold)


def near_duplicates(
    runtime: Runtime, session: Session, gallery_id: int, threshold: float, limit: int
) -> tuple[list[DuplicateGroup], int]:
    """The `limit` largest groups (then by their first image's id) and how many there are."""
    if not 0.0 < threshold <= 1.0:
        raise Invalid(f"threshold must be in (0, 1], got {threshold}")
    gallery = get_gallery(session, gallery_id)
    ids = stored_ids(session, gallery_id, gallery.model_id)
    parent: dict[int, int] = {}

    def root(image_id: int) -> int:
        while parent.setdefault(image_id, image_id) != image_id:
            parent[image_id] = parent[parent[image_id]]  # path halving
            image_id = parent[image_id]
        return image_id

    pairs: list[tuple[int, int, float]] = []
    page = SearchPage(k=NEIGHBOURS + 1, min_score=threshold)  # +1: the image finds itself
    dimension = gallery.model.embedding_dim
    for start in range(0, len(ids), QUERY_BATCH):
        chunk = ids[start : start + QUERY_BATCH]
        vectors = stored_vectors(session, gallery.model_id, chunk, dimension)
        for image_id, hits in zip(
            chunk.tolist(), runtime.indexes.search(session, gallery, vectors, page), strict=True
        ):
            for other, score in hits:
                if other != image_id:
                    parent[root(other)] = root(image_id)
                    pairs.append((image_id, other, score))
    members: dict[int, list[int]] = {}
    for image_id in parent:
        members.setdefault(root(image_id), []).append(image_id)
    scores: dict[int, list[float]] = {}
    for image_id, _, score in pairs:
        scores.setdefault(root(image_id), []).append(score)
    ranked = sorted(
        (sorted(group) for group in members.values() if len(group) > 1),
        key=lambda group: (-len(group), group[0]),
    )
    chosen = ranked[:limit]
    wanted = [image_id for group in chosen for image_id in group]
    rows = {image.id: image for image in session.scalars(select(Image).where(Image.id.in_(wanted)))}
    groups = []
    for group in chosen:
        images = [rows[image_id] for image_id in group if image_id in rows]  # deleted meanwhile
        if len(images) > 1:
            found = scores[root(group[0])]
            groups.append(DuplicateGroup(images, max(found), min(found)))
    return groups, len(ranked)
