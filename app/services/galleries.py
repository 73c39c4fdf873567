"""Galleries: a named set of images searched with one model version and one index type."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from typing import Any

from sqlalchemy import exists, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.db.models import Gallery, Image, ImageEmbedding, IndexVersion, Model
from app.db.session import updated_rows
from app.index_store import IndexType
from app.services.errors import Conflict, Invalid, NotFound, ServiceError
from app.services.models import BUILTIN_MODEL, get_model
from app.services.runtime import Runtime


@dataclass(frozen=True)
class GalleryInfo:
    gallery: Gallery
    image_count: int
    labelled_count: int
    index_size: int  # vectors in the active index (counted in the database when not loaded)
    suggested_index_type: str | None  # an approximate type once the gallery outgrows "flat"
    # Recall@10 of the active index against exact search, measured when it was built.
    recall_at_10: float | None = None


def get_gallery(session: Session, gallery_id: int) -> Gallery:
    gallery = session.get(Gallery, gallery_id)
    if gallery is None:
        raise NotFound(
            f"gallery {gallery_id} does not exist; GET /api/v1/galleries lists the galleries"
        )
    return gallery


def _index_type(value: str) -> IndexType:
    try:
        return IndexType(value)
    except ValueError:
        choices = ", ".join(t.value for t in IndexType)
        raise Invalid(f"unknown index type {value!r}; choose one of {choices}") from None


# Index parameters (`GalleryIndex.build`) and the values each accepts; a type ignores the
# others, so switching the type alone keeps the old parameters. The upper bounds keep every
# search's and build's memory bounded (an ef_search of 2^31 made the next search allocate
# ~12 GB): FAISS's guidelines use HNSW M of 4-64, efSearch and efConstruction in the hundreds,
# and nlist up to 2^16 for a billion vectors (FAISS wiki, "Guidelines to choose an index").
INDEX_PARAM_RANGES: dict[str, tuple[float, float]] = {
    "m": (1, 128),  # HNSW: links per node (at least 2); IVF-PQ: sub-quantizers
    "ef_search": (1, 4096),
    "ef_construction": (1, 4096),
    "nlist": (1, 65536),
    "nprobe": (1, 65536),
    "compact_fraction": (0, 1),  # (0, 1]: not an integer
    # IVF-PQ: candidates per wanted hit re-scored with the stored vectors (1 = no refine).
    "refine_factor": (1, 64),
}


# What each index type reads, with its default and meaning: GET /api/v1/index-types (the web
# UI's index settings form is built from it). A type ignores the other parameters.
INDEX_PARAM_HELP: dict[str, tuple[str, str]] = {
    "m": (
        "32 (HNSW); chosen from the size (IVF-PQ)",
        "HNSW: links per node; IVF-PQ: sub-quantizers",
    ),
    "ef_search": ("64", "candidates explored per search (recall vs speed)"),
    "ef_construction": ("40", "candidates explored per insertion (build time vs quality)"),
    "nlist": ("chosen from the size", "coarse clusters"),
    "nprobe": ("nlist / 4, 1 to 256", "clusters visited per search"),
    "refine_factor": ("16", "candidates re-scored exactly per wanted hit (1: none)"),
    "compact_fraction": ("0.2", "share of deleted entries that triggers a rebuild"),
}
# `m` means another thing for IVF-PQ.
IVFPQ_M_HELP = ("chosen from the size", "sub-quantizers (must divide the dimension)")
INDEX_TYPE_PARAMS: dict[IndexType, tuple[str, ...]] = {
    IndexType.flat: ("compact_fraction",),
    IndexType.hnsw: ("m", "ef_search", "ef_construction", "compact_fraction"),
    IndexType.ivfpq: ("nlist", "m", "nprobe", "refine_factor", "compact_fraction"),
}


def index_types() -> list[dict[str, Any]]:
    """Each index type's parameters with their ranges, defaults and meaning."""
    return [
        {
            "type": kind.value,
            "params": [
                {
                    "name": key,
                    "min": INDEX_PARAM_RANGES[key][0],
                    "max": INDEX_PARAM_RANGES[key][1],
                    "integer": key != "compact_fraction",
                    "default": meaning[0],
                    "description": meaning[1],
                    "expected": _expected(key),
                }
                for key in keys
                for meaning in [
                    IVFPQ_M_HELP if (kind, key) == (IndexType.ivfpq, "m") else INDEX_PARAM_HELP[key]
                ]
            ],
        }
        for kind, keys in INDEX_TYPE_PARAMS.items()
    ]


def _expected(key: str) -> str:
    low, high = INDEX_PARAM_RANGES[key]
    if key == "compact_fraction":
        return "a number in (0, 1]"
    return f"an integer from {int(low)} to {int(high)}"


def _check_index_params(kind: IndexType, params: dict[str, Any], dimension: int) -> None:
    """Refuse parameters the index build would fail on later (at the first search), or whose
    memory is unbounded."""
    for key, value in params.items():
        if key not in INDEX_PARAM_RANGES:
            known = ", ".join(INDEX_PARAM_RANGES)
            raise Invalid(f"unknown index parameter {key!r}; the parameters are {known}")
        low, high = INDEX_PARAM_RANGES[key]
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if key == "compact_fraction":
            valid = number and low < value <= high
        else:
            valid = number and low <= value <= high and value == int(value)  # inf, nan: False
        if not valid:
            raise Invalid(f"index parameter {key} must be {_expected(key)}, got {value!r}")
    if kind is IndexType.hnsw and params.get("m") == 1:
        raise Invalid("HNSW parameter m must be at least 2 (links per node)")
    if kind is IndexType.ivfpq and "m" in params and dimension % int(params["m"]):
        raise Invalid(
            f"IVF-PQ parameter m={params['m']} must divide the model's dimension {dimension}"
        )


def create_gallery(
    session: Session,
    name: str,
    model_id: int | None = None,
    index_type: str = IndexType.flat.value,
    index_params: dict[str, Any] | None = None,
) -> Gallery:
    """A new, empty gallery; `model_id` None means the built-in pretrained model."""
    if model_id is None:
        model_id = session.scalar(select(Model.id).where(Model.name == BUILTIN_MODEL))
        if model_id is None:
            raise NotFound("give a model_id: the built-in model is not installed on this server")
    dimension = get_model(session, model_id).embedding_dim
    kind = _index_type(index_type)
    _check_index_params(kind, index_params or {}, dimension)
    gallery = Gallery(
        name=name,
        model_id=model_id,
        index_type=kind.value,
        index_params=index_params or {},
        index_version=1,
        revision=0,
    )
    session.add(gallery)
    try:
        session.flush()
    except IntegrityError:
        session.rollback()
        raise Conflict(f"a gallery named {name!r} already exists; choose another name") from None
    session.add(
        IndexVersion(
            gallery_id=gallery.id,
            version=1,
            model_id=model_id,
            index_type=kind.value,
            index_params=gallery.index_params,
            size=0,
        )
    )
    session.commit()
    return gallery


def list_galleries(runtime: Runtime, session: Session) -> list[GalleryInfo]:
    galleries = session.scalars(select(Gallery).order_by(Gallery.id)).all()
    counts = dict(
        session.execute(select(Image.gallery_id, func.count()).group_by(Image.gallery_id)).all()
    )
    labelled = dict(
        session.execute(
            select(Image.gallery_id, func.count())
            .where(Image.label.is_not(None))
            .group_by(Image.gallery_id)
        ).all()
    )
    vectors = dict(
        session.execute(
            select(Image.gallery_id, func.count())
            .join(ImageEmbedding, ImageEmbedding.image_id == Image.id)
            .join(Gallery, Gallery.id == Image.gallery_id)
            .where(ImageEmbedding.model_id == Gallery.model_id)
            .group_by(Image.gallery_id)
        ).all()
    )
    recalls = dict(
        session.execute(
            select(IndexVersion.gallery_id, IndexVersion.recall_at_10)
            .join(Gallery, Gallery.id == IndexVersion.gallery_id)
            .where(IndexVersion.version == Gallery.index_version)
        ).all()
    )
    return [
        _info(
            runtime,
            g,
            counts.get(g.id, 0),
            labelled.get(g.id, 0),
            vectors.get(g.id, 0),
            recalls.get(g.id),
        )
        for g in galleries
    ]


def gallery_info(runtime: Runtime, session: Session, gallery_id: int) -> GalleryInfo:
    gallery = get_gallery(session, gallery_id)
    count = session.scalar(select(func.count()).where(Image.gallery_id == gallery_id)) or 0
    labelled = (
        session.scalar(
            select(func.count()).where(Image.gallery_id == gallery_id, Image.label.is_not(None))
        )
        or 0
    )
    vectors = session.scalar(
        select(func.count())
        .select_from(ImageEmbedding)
        .join(Image, Image.id == ImageEmbedding.image_id)
        .where(Image.gallery_id == gallery_id, ImageEmbedding.model_id == gallery.model_id)
    )
    recall = session.scalar(
        select(IndexVersion.recall_at_10).where(
            IndexVersion.gallery_id == gallery_id, IndexVersion.version == gallery.index_version
        )
    )
    return _info(runtime, gallery, count, labelled, vectors or 0, recall)


def _info(
    runtime: Runtime,
    gallery: Gallery,
    count: int,
    labelled: int,
    vectors: int,
    recall: float | None = None,
) -> GalleryInfo:
    """`vectors`: the gallery's stored embeddings by its active model, what its index holds once
    loaded and current; the loaded index's own size when it is current (a gallery created or
    changed since start-up is loaded by its next search)."""
    live = runtime.indexes.live_count(gallery)
    if live is not None:
        vectors = live
    suggestion = None
    if gallery.index_type == IndexType.flat:
        # By what an exact search costs (size x dimension, measured once the index is searched),
        # not by a count: 200k 128-d vectors cost what 20k 1280-d ones do.
        cost_ms = runtime.indexes.estimated_exact_search_ms(gallery, count)
        if cost_ms > runtime.settings.exact_search_budget_ms:
            suggestion = IndexType.hnsw.value
    if gallery.index_type == IndexType.flat:
        recall = 1.0  # exact by construction
    return GalleryInfo(gallery, count, labelled, vectors, suggestion, recall)


def delete_gallery(runtime: Runtime, session: Session, gallery_id: int) -> None:
    gallery = get_gallery(session, gallery_id)
    session.delete(gallery)
    session.commit()
    runtime.indexes.forget(gallery_id)
    shutil.rmtree(runtime.settings.uploads_dir / str(gallery_id), ignore_errors=True)


def missing_embeddings(session: Session, gallery_id: int, model_id: int) -> list[int]:
    """Ids of the gallery's images that have no embedding by `model_id` yet."""
    has_embedding = exists().where(
        ImageEmbedding.image_id == Image.id, ImageEmbedding.model_id == model_id
    )
    return list(
        session.scalars(
            select(Image.id)
            .where(Image.gallery_id == gallery_id, ~has_embedding)
            .order_by(Image.id)
        )
    )


def _must_have_embeddings(session: Session, gallery_id: int, model_id: int) -> None:
    missing = missing_embeddings(session, gallery_id, model_id)
    if missing:
        session.rollback()
        raise Conflict(
            f"{len(missing)} images of gallery {gallery_id} have no embedding by model "
            f"{model_id} yet; embed them first"
        )


def switch_index(
    runtime: Runtime,
    session: Session,
    gallery_id: int,
    *,
    model_id: int | None = None,
    index_type: str | None = None,
    index_params: dict[str, Any] | None = None,
) -> Gallery:
    """Make a new index version the gallery's active one: another model (every image must
    already have an embedding by it: `images.embed_missing`), another index type or other
    parameters. The index is built from the stored embeddings (nothing is re-embedded) by the
    index backend and made active after the commit (FAISS: its snapshot, which other processes
    load when they see the new version; Milvus: a collection alias moved to it).

    Raises Conflict when images still lack embeddings by the new model (uploads that arrived
    meanwhile): embed those and call again."""
    gallery = get_gallery(session, gallery_id)
    target = get_model(session, gallery.model_id if model_id is None else model_id)
    target_model = target.id
    kind = _index_type(index_type or gallery.index_type)
    params = gallery.index_params if index_params is None else index_params
    _check_index_params(kind, params, target.embedding_dim)
    _must_have_embeddings(session, gallery_id, target_model)  # before the build; again below
    # Built before anything is written: settings that cannot be applied (within the documented
    # ranges, e.g. more IVF lists than the data can train) fail here and nothing is committed.
    # Outside the gallery lock, so uploads go on meanwhile; activation replays them.
    try:
        built = runtime.indexes.build(
            session, gallery, model_id=target_model, index_type=kind.value, index_params=params
        )
    except ServiceError:
        session.rollback()
        raise
    except (RuntimeError, ValueError) as error:
        session.rollback()
        raise Invalid(
            f"a {kind.value} index with {params} cannot be built for gallery {gallery_id}: "
            f"{error}; nothing was changed"
        ) from error
    try:
        recall = runtime.indexes.measure_recall(session, gallery, built, target_model)
        version = gallery.index_version + 1
        # The guarded update is the transaction's first write: it locks the gallery row against
        # concurrent uploads (which check the model in the same way) until the commit.
        switched = updated_rows(
            session,
            update(Gallery)
            .where(Gallery.id == gallery_id, Gallery.index_version == gallery.index_version)
            .values(
                model_id=target_model,
                index_type=kind.value,
                index_params=params,
                index_version=version,
                revision=Gallery.revision + 1,
            ),
        )
        if not switched:
            session.rollback()
            raise Conflict(f"gallery {gallery_id} was switched concurrently; retry")
        _must_have_embeddings(session, gallery_id, target_model)
        size = session.scalar(
            select(func.count())
            .select_from(ImageEmbedding)
            .join(Image, Image.id == ImageEmbedding.image_id)
            .where(Image.gallery_id == gallery_id, ImageEmbedding.model_id == target_model)
        )
        session.add(
            IndexVersion(
                gallery_id=gallery_id,
                version=version,
                model_id=target_model,
                index_type=kind.value,
                index_params=params,
                size=size or 0,
                recall_at_10=recall,
            )
        )
        session.commit()
    except BaseException:
        runtime.indexes.discard(built)  # the switch did not happen: drop what was built
        raise
    session.refresh(gallery)
    runtime.indexes.activate(gallery, built)
    return gallery
