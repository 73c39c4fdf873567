"""Keeps each gallery's in-memory FAISS index equal to what the database says.

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
from dataclasses import dataclass, field

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from app.db.models import Gallery, Image, ImageEmbedding, Model
from app.index_store import GalleryIndex, IndexFileError, IndexStore, IndexType
from app.services.errors import Conflict, ServiceError

log = logging.getLogger(__name__)

# Bound on ids per `IN (...)` clause when fetching vectors.
_CHUNK = 1000


def vectors_from_rows(rows: list[bytes], dimension: int) -> np.ndarray:
    """Stored float32 bytes -> (n, dimension) array."""
    if not rows:
        return np.zeros((0, dimension), dtype=np.float32)
    return np.frombuffer(b"".join(rows), dtype=np.float32).reshape(len(rows), dimension)


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
        reason = f"{type(error).__name__}: {error}".splitlines()[0][:300]
        self.unavailable[gallery_id] = reason
        log.error("gallery %d's index cannot be built: %s", gallery_id, reason)
        return ServiceError(
            f"gallery {gallery_id}'s index cannot be built from its stored settings ({reason}); "
            "PATCH the gallery's index_type or index_params to fix it",
            503,
        )

    def loaded_count(self) -> int:
        return len(self._loaded)

    def _refresh(self, gallery_id: int) -> None:
        """Under the gallery's lock: load or build the active version, then replay the diff."""
        self.unavailable.pop(gallery_id, None)  # tried again: it may have been fixed
        with self.session_factory() as session:
            gallery = session.get(Gallery, gallery_id)
            if gallery is None:
                self._forget(gallery_id)
                return
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
                index = self._load_or_build(session, gallery)
                loaded = _Loaded(gallery.model_id, gallery.index_version, revision)
                self._loaded[gallery_id] = loaded
            added, removed = self._replay(session, gallery, index)
            loaded.revision = max(loaded.revision, revision)
            loaded.unsaved += added + removed
            if added or removed:
                log.info("gallery %d: replayed %d added, %d removed", gallery_id, added, removed)
        self._maybe_snapshot(gallery_id)

    def _load_or_build(self, session: Session, gallery: Gallery) -> GalleryIndex:
        try:
            meta = self.store.load(gallery.id, gallery.model_id)
        except IndexFileError as error:  # the database has everything: rebuild
            log.warning("gallery %d: unreadable snapshot, rebuilding: %s", gallery.id, error)
            meta = None
        if meta is not None and meta.get("index_version") == gallery.index_version:
            index = self.store.get(gallery.id, gallery.model_id)
            assert index is not None
            return index
        index = build_index(session, gallery)
        self.store.put(gallery.id, gallery.model_id, index)
        self.store.save(
            gallery.id, gallery.model_id, _meta(gallery.model_id, gallery.index_version)
        )
        return index

    def _replay(self, session: Session, gallery: Gallery, index: GalleryIndex) -> tuple[int, int]:
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
        return len(missing), len(extra)

    def apply(
        self,
        gallery_id: int,
        model_id: int,
        revision: int,
        *,
        added: tuple[np.ndarray, np.ndarray] | None = None,
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
            if added is not None and len(added[0]):
                ids, vectors = added
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
