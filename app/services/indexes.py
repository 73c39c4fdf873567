"""The `faiss` index backend: each gallery's in-memory FAISS index kept equal to the database.

The database is the source of truth: `image_embeddings` holds every vector, the gallery row
holds the active index version (model, index type) and a `revision` that every committed change
to its images bumps. The FAISS snapshot on disk is a cache. An index is brought up to date by
loading the snapshot of the right version (or building it from the stored embeddings when there
is none) and then diffing its ids against the database: ids the database has and the index
lacks are added from their stored vectors, ids the index has and the database lost are removed.
This replay is what makes a SIGKILL harmless: an acknowledged upload is committed, so the diff
restores it; an unacknowledged one never committed, so the diff removes it if it got in.

Changes made in this process (uploads, deletions) are applied straight after their commit and
mark their revision as seen; a revision this process never saw (a worker's import, another API
process) leaves a gap, and the next search of that gallery diffs against the database again.
"""

from __future__ import annotations

import logging
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from app.db.models import Gallery, Image, ImageEmbedding, Model
from app.index_store import (
    GalleryIndex,
    IndexFileError,
    IndexStore,
    IndexType,
    exact_search_ms,
    recall_at,
    rerank_exact,
)
from app.services.errors import Conflict, ServiceError
from app.services.filters import SearchPage, allowed_ids
from app.services.index_backend import Hits, IndexRows, Reconciled, cannot_build

log = logging.getLogger(__name__)

# Bound on ids per `IN (...)` clause when fetching vectors.
_CHUNK = 1000


def vectors_from_rows(rows: list[bytes], dimension: int) -> np.ndarray:
    """Stored float32 bytes -> (n, dimension) array."""
    if not rows:
        return np.zeros((0, dimension), dtype=np.float32)
    return np.frombuffer(b"".join(rows), dtype=np.float32).reshape(len(rows), dimension)


def stored_vectors(session: Session, model_id: int, ids: np.ndarray, dimension: int) -> np.ndarray:
    """The stored embeddings by `model_id` of `ids` (sorted, unique), one row each in that
    order; zeros for an id deleted meanwhile."""
    out = np.zeros((len(ids), dimension), dtype=np.float32)
    for start in range(0, len(ids), _CHUNK):
        chunk = ids[start : start + _CHUNK]
        rows = session.execute(
            select(ImageEmbedding.image_id, ImageEmbedding.vector).where(
                ImageEmbedding.model_id == model_id,
                ImageEmbedding.image_id.in_([int(i) for i in chunk]),
            )
        ).all()
        if rows:
            found = np.array([row.image_id for row in rows], dtype=np.int64)
            out[np.searchsorted(ids, found)] = vectors_from_rows(
                [r.vector for r in rows], dimension
            )
    return out


def refined_search(
    session: Session,
    model_id: int,
    index_type: IndexType,
    params: dict,
    search: Callable[[np.ndarray, int], Hits],
    queries: np.ndarray,
    want: int,
) -> Hits:
    """`search(queries, n)`, with IVF-PQ's refine step: `refine_factor` x `want` candidates
    re-scored with their stored embeddings (`index_store.rerank_exact`)."""
    factor = int(params.get("refine_factor", 1)) if index_type is IndexType.ivfpq else 1
    if factor <= 1:
        return search(queries, want)
    candidates = search(queries, want * factor)
    dimension = queries.shape[1]
    return rerank_exact(
        queries, candidates, lambda ids: stored_vectors(session, model_id, ids, dimension), want
    )


# Stored vectors used as queries when a built index's recall is measured.
RECALL_SAMPLE = 100


def sample_recall(
    session: Session,
    gallery_id: int,
    model_id: int,
    dimension: int,
    search: Callable[[np.ndarray, int], Hits],
    k: int = 10,
) -> float | None:
    """Recall@k of `search` against exact search, on up to `RECALL_SAMPLE` of the gallery's own
    stored vectors as queries (the exact neighbours are computed over every stored embedding,
    read in chunks); None for an empty gallery."""
    ids = stored_ids(session, gallery_id, model_id)
    if not len(ids):
        return None
    rng = np.random.default_rng(0)
    sample = np.sort(rng.choice(ids, min(RECALL_SAMPLE, len(ids)), replace=False))
    queries = stored_vectors(session, model_id, sample, dimension)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True).clip(min=1e-12)
    best_ids = np.zeros((len(queries), 0), dtype=np.int64)
    best_scores = np.zeros((len(queries), 0), dtype=np.float32)
    for start in range(0, len(ids), 10 * _CHUNK):
        chunk = ids[start : start + 10 * _CHUNK]
        vectors = stored_vectors(session, model_id, chunk, dimension)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True).clip(min=1e-12)
        scores = np.concatenate([best_scores, queries @ vectors.T], axis=1)
        candidates = np.concatenate(
            [best_ids, np.broadcast_to(chunk, (len(queries), len(chunk)))], axis=1
        )
        top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        best_ids = np.take_along_axis(candidates, top, axis=1)
        best_scores = np.take_along_axis(scores, top, axis=1)
    exact = [
        [(int(i), float(s)) for i, s in zip(row_ids, row_scores, strict=True)]
        for row_ids, row_scores in zip(best_ids, best_scores, strict=True)
    ]
    return round(recall_at(exact, search(queries, k), k), 4)


def stored_ids(session: Session, gallery_id: int, model_id: int) -> np.ndarray:
    """The ids (sorted) of the gallery's images that have an embedding by `model_id`."""
    return np.unique(
        np.asarray(
            session.scalars(
                select(ImageEmbedding.image_id)
                .join(Image, Image.id == ImageEmbedding.image_id)
                .where(Image.gallery_id == gallery_id, ImageEmbedding.model_id == model_id)
            ).all(),
            dtype=np.int64,
        )
    )


def _meta(model_id: int, index_version: int) -> dict[str, int]:
    """What a snapshot records about itself; a snapshot of another version is rebuilt."""
    return {"model_id": model_id, "index_version": index_version}


@dataclass
class _Loaded:
    """What an in-memory index reflects: its version and every revision up to `revision`."""

    model_id: int
    index_version: int
    revision: int
    later: set[int] = field(default_factory=set)  # seen revisions above `revision`
    unsaved: int = 0  # changes since the last snapshot

    def mark(self, revision: int) -> None:
        if revision > self.revision:
            self.later.add(revision)
        while self.revision + 1 in self.later:
            self.revision += 1
            self.later.discard(self.revision)


class IndexManager:
    """The FAISS backend (`IndexBackend`): indexes in this process's memory, snapshots on disk."""

    name = "faiss"

    def __init__(
        self, store: IndexStore, session_factory: sessionmaker[Session], snapshot_every: int
    ) -> None:
        self.store = store
        self.session_factory = session_factory
        self.snapshot_every = snapshot_every
        self._loaded: dict[int, _Loaded] = {}
        # Galleries whose stored index settings could not be applied, and why (the service
        # starts without them; their searches answer 503 with the reason).
        self.unavailable: dict[int, str] = {}
        self._locks: dict[int, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    def _lock(self, gallery_id: int) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(gallery_id, threading.Lock())

    def is_current(self, gallery: Gallery) -> bool:
        loaded = self._loaded.get(gallery.id)
        return (
            loaded is not None
            and loaded.model_id == gallery.model_id
            and loaded.index_version == gallery.index_version
            and loaded.revision >= gallery.revision
        )

    def index_for(self, gallery: Gallery) -> GalleryIndex:
        """The gallery's index, loaded, built or replayed first when it is not current."""
        if not self.is_current(gallery):
            try:
                self.refresh(gallery.id)
            except ServiceError:
                raise
            except Exception as error:  # a stored setting FAISS refuses, a build out of memory
                raise self._unavailable(gallery.id, error) from error
        index = self.store.get(gallery.id, gallery.model_id)
        if index is None:
            raise Conflict(
                f"gallery {gallery.id} was switched to another model or deleted during this "
                "request; retry it"
            )
        return index

    def load_all(self) -> int:
        """Bring every gallery's index up to date (start-up); returns how many."""
        self.store.remove_stale_temp_files()
        with self.session_factory() as session:
            ids = session.scalars(select(Gallery.id).order_by(Gallery.id)).all()
        for gallery_id in ids:
            with self._lock(gallery_id):
                try:
                    self._refresh(gallery_id)
                except Exception as error:  # one bad gallery must not keep the service down
                    self._unavailable(gallery_id, error)
        return len(ids) - len(self.unavailable)

    def _unavailable(self, gallery_id: int, error: Exception) -> ServiceError:
        return cannot_build(self.unavailable, gallery_id, error)

    def _refresh(self, gallery_id: int) -> Reconciled | None:
        """Under the gallery's lock: load or build the active version, then replay the diff."""
        self.unavailable.pop(gallery_id, None)  # tried again: it may have been fixed
        rebuilt = False
        with self.session_factory() as session:
            gallery = session.get(Gallery, gallery_id)
            if gallery is None:
                self._forget(gallery_id)
                return None
            revision = gallery.revision  # read before the diff: later changes leave a gap
            loaded = self._loaded.get(gallery_id)
            index = self.store.get(gallery.id, gallery.model_id)
            if (
                loaded is None
                or index is None
                or (loaded.model_id, loaded.index_version)
                != (gallery.model_id, gallery.index_version)
            ):
                if loaded is not None and loaded.model_id != gallery.model_id:
                    self.store.drop(gallery_id, loaded.model_id)
                index, rebuilt = self._load_or_build(session, gallery)
                loaded = _Loaded(gallery.model_id, gallery.index_version, revision)
                self._loaded[gallery_id] = loaded
            stored, added, removed = self._replay(session, gallery, index)
            loaded.revision = max(loaded.revision, revision)
            loaded.unsaved += added + removed
            if added or removed:
                log.info("gallery %d: replayed %d added, %d removed", gallery_id, added, removed)
        self._maybe_snapshot(gallery_id)
        return Reconciled(gallery_id, stored, len(index), added, removed, rebuilt)

    def _load_or_build(self, session: Session, gallery: Gallery) -> tuple[GalleryIndex, bool]:
        """The active version's index from its snapshot, else built (True)."""
        try:
            meta = self.store.load(gallery.id, gallery.model_id)
        except IndexFileError as error:  # the database has everything: rebuild
            log.warning("gallery %d: unreadable snapshot, rebuilding: %s", gallery.id, error)
            meta = None
        if meta is not None and meta.get("index_version") == gallery.index_version:
            index = self.store.get(gallery.id, gallery.model_id)
            assert index is not None
            return index, False
        index = build_index(session, gallery)
        self.store.put(gallery.id, gallery.model_id, index)
        self.store.save(
            gallery.id, gallery.model_id, _meta(gallery.model_id, gallery.index_version)
        )
        return index, True

    def _replay(
        self, session: Session, gallery: Gallery, index: GalleryIndex
    ) -> tuple[int, int, int]:
        """(stored, added, removed): the index made equal to the stored embeddings."""
        stored = np.asarray(
            session.scalars(
                select(ImageEmbedding.image_id)
                .join(Image, Image.id == ImageEmbedding.image_id)
                .where(Image.gallery_id == gallery.id, ImageEmbedding.model_id == gallery.model_id)
            ).all(),
            dtype=np.int64,
        )
        present = index.ids()
        missing = np.setdiff1d(stored, present)
        extra = np.setdiff1d(present, stored)
        if len(extra):
            index.remove(extra)
        for start in range(0, len(missing), _CHUNK):
            chunk = missing[start : start + _CHUNK].tolist()
            rows = session.execute(
                select(ImageEmbedding.image_id, ImageEmbedding.vector).where(
                    ImageEmbedding.model_id == gallery.model_id,
                    ImageEmbedding.image_id.in_(chunk),
                )
            ).all()
            ids = np.array([row.image_id for row in rows], dtype=np.int64)
            index.add(ids, vectors_from_rows([row.vector for row in rows], index.dimension))
        return len(stored), len(missing), len(extra)

    def apply(
        self,
        gallery_id: int,
        model_id: int,
        revision: int,
        *,
        added: IndexRows | None = None,
        removed: np.ndarray | None = None,
    ) -> None:
        """Apply a change this process just committed as `revision` to the loaded index (if
        any); ids already present (a concurrent replay saw the commit) are skipped."""
        with self._lock(gallery_id):
            loaded = self._loaded.get(gallery_id)
            index = self.store.get(gallery_id, model_id)
            if loaded is None or loaded.model_id != model_id or index is None:
                return  # not loaded here: the first search loads it from the database
            changes = 0
            if added is not None and len(added.ids):
                ids, vectors = added.ids, added.vectors
                new = ~np.isin(ids, index.ids())
                if new.any():
                    index.add(ids[new], vectors[new])
                    changes += int(new.sum())
            if removed is not None and len(removed):
                present = removed[np.isin(removed, index.ids())]
                if len(present):
                    index.remove(present)
                    changes += len(present)
            loaded.mark(revision)
            loaded.unsaved += changes
        self._maybe_snapshot(gallery_id)

    def refresh(self, gallery_id: int) -> None:
        """Bring the gallery's index to the database's state now: after a switch to another
        version this builds it from the stored embeddings and writes its snapshot."""
        with self._lock(gallery_id):
            self._refresh(gallery_id)

    def reconcile(self, gallery_id: int) -> Reconciled | None:
        """Replay the database into the gallery's index and rewrite its snapshot."""
        with self._lock(gallery_id):
            report = self._refresh(gallery_id)
            if report is not None:
                self._snapshot(gallery_id)
        return report

    def search(
        self, session: Session, gallery: Gallery, queries: np.ndarray, page: SearchPage
    ) -> Hits:
        allowed = allowed_ids(session, gallery.id, page.filters) if page.filters else None
        index = self.index_for(gallery)
        if index.index_type is not IndexType.ivfpq:
            return index.search(
                queries, page.k, offset=page.offset, allowed_ids=allowed, min_score=page.min_score
            )
        rows = refined_search(
            session,
            gallery.model_id,
            index.index_type,
            index.params,
            lambda q, n: index.search(q, n, allowed_ids=allowed),
            queries,
            page.end,
        )
        return page.cut(rows)

    def live_count(self, gallery: Gallery) -> int | None:
        index = self.store.get(gallery.id, gallery.model_id)
        return len(index) if index is not None and self.is_current(gallery) else None

    def estimated_exact_search_ms(self, gallery: Gallery, count: int) -> float:
        """Measured on the gallery's own searches once it is large enough, else estimated."""
        index = self.store.get(gallery.id, gallery.model_id)
        if index is not None:
            return index.estimated_exact_search_ms(count)
        return exact_search_ms(count, gallery.model.embedding_dim)

    def write_ahead(self, gallery_id: int, model_id: int, rows: IndexRows) -> None:
        """Nothing before the commit: this process's index takes the rows in `apply`, other
        processes replay them from the database."""

    def build(
        self,
        session: Session,
        gallery: Gallery,
        *,
        model_id: int,
        index_type: str,
        index_params: dict,
    ) -> GalleryIndex:
        return build_index(
            session, gallery, model_id=model_id, index_type=index_type, index_params=index_params
        )

    def measure_recall(
        self, session: Session, gallery: Gallery, built: GalleryIndex, model_id: int
    ) -> float | None:
        if built.index_type is IndexType.flat:
            return 1.0
        return sample_recall(
            session,
            gallery.id,
            model_id,
            built.dimension,
            lambda q, n: refined_search(
                session, model_id, built.index_type, built.params, built.search, q, n
            ),
        )

    def discard(self, built: GalleryIndex) -> None:
        """A built index lives only in memory: nothing to clean up."""

    def health(self) -> dict:
        return {"backend": self.name, "ok": True, "indexes": len(self._loaded)}

    def sizes(self) -> list[tuple[int, int, int]]:
        sizes = []
        for gallery_id, model_id in self.store.keys():  # noqa: SIM118 (not a dict)
            index = self.store.get(gallery_id, model_id)
            if index is not None:
                sizes.append((gallery_id, model_id, len(index)))
        return sizes

    def close(self) -> None:
        self.save_dirty()

    def activate(self, gallery: Gallery, index: GalleryIndex) -> None:
        """Install `index`, built for the gallery's newly committed version (`switch_index`),
        write its snapshot, then replay what changed while it was built."""
        with self._lock(gallery.id):
            self.unavailable.pop(gallery.id, None)
            loaded = self._loaded.get(gallery.id)
            if loaded is not None and loaded.model_id != gallery.model_id:
                self.store.drop(gallery.id, loaded.model_id)
            self.store.put(gallery.id, gallery.model_id, index)
            self.store.save(
                gallery.id, gallery.model_id, _meta(gallery.model_id, gallery.index_version)
            )
            self._loaded[gallery.id] = _Loaded(gallery.model_id, gallery.index_version, 0)
            self._refresh(gallery.id)

    def forget(self, gallery_id: int) -> None:
        """Drop a deleted gallery's index from memory and disk."""
        with self._lock(gallery_id):
            self._forget(gallery_id)

    def _forget(self, gallery_id: int) -> None:
        loaded = self._loaded.pop(gallery_id, None)
        if loaded is not None:
            self.store.drop(gallery_id, loaded.model_id)
        # Snapshots of every model the gallery ever used live in one folder.
        shutil.rmtree(self.store.path_for(gallery_id, 0).parent, ignore_errors=True)

    def _maybe_snapshot(self, gallery_id: int) -> None:
        loaded = self._loaded.get(gallery_id)
        if loaded is not None and loaded.unsaved >= self.snapshot_every:
            self._snapshot(gallery_id)

    def _snapshot(self, gallery_id: int) -> None:
        loaded = self._loaded.get(gallery_id)
        if loaded is None or self.store.get(gallery_id, loaded.model_id) is None:
            return
        loaded.unsaved = 0
        self.store.save(gallery_id, loaded.model_id, _meta(loaded.model_id, loaded.index_version))

    def save_dirty(self) -> None:
        """Snapshot every index with changes since its last snapshot (shutdown)."""
        for gallery_id, loaded in list(self._loaded.items()):
            if loaded.unsaved:
                self._snapshot(gallery_id)


def build_index(
    session: Session,
    gallery: Gallery,
    *,
    model_id: int | None = None,
    index_type: str | None = None,
    index_params: dict | None = None,
) -> GalleryIndex:
    """A new index of the gallery's stored embeddings (by default its active model and type)."""
    model_id = gallery.model_id if model_id is None else model_id
    rows = session.execute(
        select(ImageEmbedding.image_id, ImageEmbedding.vector)
        .join(Image, Image.id == ImageEmbedding.image_id)
        .where(Image.gallery_id == gallery.id, ImageEmbedding.model_id == model_id)
        .order_by(ImageEmbedding.image_id)
    ).all()
    dimension = session.get_one(Model, model_id).embedding_dim
    return GalleryIndex.build(
        dimension,
        IndexType(index_type or gallery.index_type),
        np.array([row.image_id for row in rows], dtype=np.int64),
        vectors_from_rows([row.vector for row in rows], dimension),
        index_params if index_params is not None else gallery.index_params,
    )
