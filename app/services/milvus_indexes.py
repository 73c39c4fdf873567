"""The `milvus` index backend: gallery vectors in a Milvus engine that every process shares.

The API holds no index state: each request finds the collection of the gallery's active
version (the version it read from the database), so a replica never searches another version
than the one the database names, whichever replica switched it. Writes:

- uploads hand their rows to Milvus inside the database transaction, before the commit
  (`write_ahead`): if Milvus fails the upload is rolled back (503), so an acknowledged upload is
  in Milvus, and a row Milvus got from an upload whose commit then failed is an extra id that
  `reconcile` deletes (searches never return it: hits are read back from the database);
- deletions reach Milvus after their commit; one that fails marks the gallery for reconcile;
- a switch builds the new collection from the stored embeddings before its commit, moves the
  alias after it (`activate`), then reconciles the writes made meanwhile.

`reconcile` (at start, every `reconcile_interval_s` for galleries with a failed write, from
`lookalike index reconcile`) makes Milvus agree with the database: the active version's
collection rebuilt when it is missing, missing ids inserted, extra ids deleted, collections of
older versions and of deleted galleries dropped.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from app.core.config import Settings
from app.db.models import Gallery, Image, ImageEmbedding, Model
from app.index_store import IndexType, exact_search_ms
from app.milvus_index import (
    MAX_TOPK,
    EngineError,
    EngineUnavailable,
    MilvusStore,
    literal,
    new_collection_name,
    parse_name,
    resolved_index,
    search_params,
)
from app.services.errors import Conflict, ServiceError
from app.services.filters import Filters, SearchPage, metadata_matches
from app.services.index_backend import Hits, IndexRows, Reconciled, cannot_build
from app.services.indexes import (
    refined_search,
    sample_recall,
    stored_ids,
    vectors_from_rows,
)

log = logging.getLogger(__name__)

_CHUNK = 1000  # ids per database read while rebuilding or reconciling
# A collection of the active version that the alias does not name is another build's (a
# concurrent switch, a replica rebuilding): dropped only once this old.
_STRAY_GRACE_S = 600.0


class _Built:
    """A collection built for a switch, not yet active."""

    def __init__(self, name: str, index_type: IndexType, params: dict[str, Any]) -> None:
        self.name = name
        self.index_type = index_type
        self.params = params


class MilvusIndexManager:
    """The Milvus backend (`IndexBackend`); see the module docstring."""

    name = "milvus"

    def __init__(self, settings: Settings, session_factory: sessionmaker[Session]) -> None:
        self.settings = settings
        self.session_factory = session_factory
        self.store = MilvusStore(
            settings.milvus_location,
            token=settings.milvus_token,
            db_name=settings.milvus_db_name,
            prefix=settings.milvus_collection_prefix,
            timeout_s=settings.milvus_timeout_s,
        )
        self.unavailable: dict[int, str] = {}
        # Galleries whose Milvus write failed after a commit: reconciled when Milvus answers.
        self.pending: set[int] = set()
        self.last_reconcile: dict[str, Any] = {}
        # gallery -> (index version, collection, index type, params): resolved collections.
        self._active: dict[int, tuple[int, str, IndexType, dict[str, Any]]] = {}
        self._locks: dict[int, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._stop = threading.Event()
        self._reconciler: threading.Thread | None = None

    def _lock(self, gallery_id: int) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(gallery_id, threading.Lock())

    def _unavailable(self, error: EngineUnavailable | EngineError) -> ServiceError:
        return ServiceError(f"the vector engine cannot serve this request: {error}", 503)

    def _cannot_build(self, gallery_id: int, error: Exception) -> ServiceError:
        return cannot_build(self.unavailable, gallery_id, error)

    # Finding the active collection.

    def _collection(self, gallery: Gallery) -> tuple[str, IndexType, dict[str, Any]]:
        """The collection of the version `gallery` names, rebuilt when it is missing."""
        cached = self._active.get(gallery.id)
        if cached is not None and cached[0] == gallery.index_version:
            return cached[1], cached[2], cached[3]
        with self._lock(gallery.id):
            cached = self._active.get(gallery.id)
            if cached is not None and cached[0] == gallery.index_version:
                return cached[1], cached[2], cached[3]
            name = self._find(gallery)
            if name is None:
                with self.session_factory() as session:
                    fresh = session.get(Gallery, gallery.id)
                    if fresh is None or fresh.index_version != gallery.index_version:
                        raise Conflict(
                            f"gallery {gallery.id} was switched or deleted during this request; "
                            "retry it"
                        )
                    log.info(
                        "gallery %d: no Milvus collection for version %d yet; building it from "
                        "the database",
                        gallery.id,
                        gallery.index_version,
                    )
                    built = self._build(
                        session, fresh, fresh.model_id, fresh.index_type, fresh.index_params
                    )
                name, kind, params = built.name, built.index_type, built.params
            else:
                kind, params = self._settings_of(gallery)
            self.store.point_alias(gallery.id, name)
            self._active[gallery.id] = (gallery.index_version, name, kind, params)
            return name, kind, params

    def _usable_collection(self, gallery: Gallery) -> tuple[str, IndexType, dict[str, Any]]:
        """`_collection`, with settings that cannot be applied reported as the FAISS backend
        does (503, the gallery listed in /readyz until its settings are fixed)."""
        try:
            return self._collection(gallery)
        except (EngineUnavailable, ServiceError):
            raise
        except (EngineError, ValueError, TypeError, KeyError) as error:
            raise self._cannot_build(gallery.id, error) from error

    def _find(self, gallery: Gallery) -> str | None:
        """The active version's collection: the alias target when it is of that version, else
        the newest collection of that version (a switch whose alias move has not happened)."""
        target = self.store.alias_target(gallery.id)
        if target is not None:
            parsed = parse_name(target, self.store.prefix)
            if parsed is not None and parsed.version == gallery.index_version:
                return target
        candidates = [
            (info.stamp, name)
            for name, info in self.store.collections().items()
            if info.gallery_id == gallery.id and info.version == gallery.index_version
        ]
        return max(candidates)[1] if candidates else None

    def _settings_of(self, gallery: Gallery) -> tuple[IndexType, dict[str, Any]]:
        with self.session_factory() as session:
            count = _stored_count(session, gallery.id, gallery.model_id)
        kind, params, _ = resolved_index(
            IndexType(gallery.index_type),
            gallery.model.embedding_dim,
            count,
            gallery.index_params or {},
        )
        return kind, params

    # Searching.

    def search(
        self, session: Session, gallery: Gallery, queries: np.ndarray, page: SearchPage
    ) -> Hits:
        if page.end == 0:
            return [[] for _ in range(len(queries))]
        self._reconcile_if_pending(gallery.id)
        filters = page.filters
        expr = _expression(filters)
        check_meta = bool(filters and filters.metadata)
        try:
            name, kind, params = self._usable_collection(gallery)
            rows = refined_search(
                session,
                gallery.model_id,
                kind,
                params,
                lambda q, n: self._search(name, kind, params, q, n, expr, filters, check_meta),
                queries,
                page.end,
            )
        except (EngineUnavailable, EngineError) as error:
            self._active.pop(gallery.id, None)
            raise self._unavailable(error) from error
        return page.cut(rows)

    def _search(
        self,
        name: str,
        kind: IndexType,
        params: dict[str, Any],
        queries: np.ndarray,
        want: int,
        expr: str,
        filters: Filters | None,
        check_meta: bool,
    ) -> list[list[tuple[int, float]]]:
        """`want` hits per query; with metadata filters the JSON types are checked here as the
        database does (Milvus compares `true == 1`), fetching more until `want` pass or the
        collection has no more."""
        limit = want
        while True:
            found = self.store.search(
                name,
                queries,
                min(limit, MAX_TOPK),
                expr=expr,
                params=search_params(kind, params, min(limit, MAX_TOPK)),
                with_meta=check_meta,
            )
            rows = [
                [
                    (image_id, score)
                    for image_id, score, meta in row
                    if not check_meta or metadata_matches(meta, filters.metadata)  # type: ignore[union-attr]
                ][:want]
                for row in found
            ]
            exhausted = all(len(row) < min(limit, MAX_TOPK) for row in found)
            if (
                not check_meta
                or all(len(r) >= want for r in rows)
                or exhausted
                or limit >= MAX_TOPK
            ):
                return rows
            limit *= 4

    def live_count(self, gallery: Gallery) -> int | None:
        """The active collection's row count, as Milvus reports it (None when it does not
        answer, or the gallery has no collection yet: the database's count stands for it)."""
        cached = self._active.get(gallery.id)
        if cached is None or cached[0] != gallery.index_version:
            try:
                name = self._find(gallery)
            except (EngineUnavailable, EngineError):
                return None
        else:
            name = cached[1]
        if name is None:
            return None
        try:
            return self.store.count(name)
        except (EngineUnavailable, EngineError):
            return None

    def estimated_exact_search_ms(self, gallery: Gallery, count: int) -> float:
        return exact_search_ms(count, gallery.model.embedding_dim)

    # Writing.

    def write_ahead(self, gallery_id: int, model_id: int, rows: IndexRows) -> None:
        with self.session_factory() as session:
            gallery = session.get(Gallery, gallery_id)
            if gallery is None:
                return
            if gallery.model_id != model_id:
                return  # switched meanwhile: the upload's own check rolls it back
            try:
                name, _, _ = self._usable_collection(gallery)
                self.store.insert(name, rows.ids, rows.vectors, rows.labels, rows.metadata)
            except (EngineUnavailable, EngineError) as error:
                self._active.pop(gallery_id, None)
                raise self._unavailable(error) from error

    def apply(
        self,
        gallery_id: int,
        model_id: int,
        revision: int,
        *,
        added: IndexRows | None = None,
        removed: np.ndarray | None = None,
    ) -> None:
        """Additions are already in Milvus (`write_ahead`); deletions go to every collection of
        the gallery (the active one, and a switch's new one being built)."""
        if removed is None or not len(removed):
            return
        try:
            for name, info in self.store.collections().items():
                if info.gallery_id == gallery_id:
                    self.store.delete(name, removed)
        except (EngineUnavailable, EngineError) as error:
            log.warning(
                "gallery %d: deletion not written to Milvus (%s); reconcile will", gallery_id, error
            )
            self.pending.add(gallery_id)

    # Switching versions.

    def build(
        self,
        session: Session,
        gallery: Gallery,
        *,
        model_id: int,
        index_type: str,
        index_params: dict,
    ) -> _Built:
        try:
            return self._build(
                session,
                gallery,
                model_id,
                index_type,
                index_params,
                version=gallery.index_version + 1,
            )
        except EngineUnavailable as error:
            raise self._unavailable(error) from error

    def _build(
        self,
        session: Session,
        gallery: Gallery,
        model_id: int,
        index_type: str,
        index_params: dict | None,
        version: int | None = None,
    ) -> _Built:
        """A new collection holding the gallery's stored embeddings by `model_id`."""
        dimension = session.get_one(Model, model_id).embedding_dim
        count = _stored_count(session, gallery.id, model_id)
        kind, params, note = resolved_index(
            IndexType(index_type), dimension, count, index_params or {}
        )
        if note:
            log.info("gallery %d: %s", gallery.id, note)
        version = gallery.index_version if version is None else version
        name = new_collection_name(self.store.prefix, gallery.id, version)
        self.store.create(name, dimension, kind, params)
        try:
            for ids, vectors, labels, metas in _stored_rows(
                session, gallery.id, model_id, dimension
            ):
                self.store.insert(name, ids, vectors, labels, metas)
            self.store.flush(name)
        except BaseException:
            self._drop_quietly(name)
            raise
        return _Built(name, kind, params)

    def activate(self, gallery: Gallery, built: _Built) -> None:
        with self._lock(gallery.id):
            self.unavailable.pop(gallery.id, None)
            try:
                self.store.point_alias(gallery.id, built.name)
            except (EngineUnavailable, EngineError) as error:
                # The commit stands; the next request finds the collection by its version.
                log.warning("gallery %d: alias not moved (%s)", gallery.id, error)
            self._active[gallery.id] = (
                gallery.index_version,
                built.name,
                built.index_type,
                built.params,
            )
        self._reconcile_or_mark(gallery.id)

    def measure_recall(
        self, session: Session, gallery: Gallery, built: _Built, model_id: int
    ) -> float | None:
        if built.index_type is IndexType.flat:
            return 1.0
        dimension = session.get_one(Model, model_id).embedding_dim
        try:
            return sample_recall(
                session,
                gallery.id,
                model_id,
                dimension,
                lambda q, n: refined_search(
                    session,
                    model_id,
                    built.index_type,
                    built.params,
                    lambda q2, n2: self._search(
                        built.name, built.index_type, built.params, q2, n2, "", None, False
                    ),
                    q,
                    n,
                ),
            )
        except EngineUnavailable as error:
            raise self._unavailable(error) from error

    def discard(self, built: _Built) -> None:
        self._drop_quietly(built.name)

    def forget(self, gallery_id: int) -> None:
        with self._lock(gallery_id):
            self._active.pop(gallery_id, None)
            self.unavailable.pop(gallery_id, None)
            try:
                self._drop_gallery(gallery_id)
            except (EngineUnavailable, EngineError) as error:
                log.warning(
                    "gallery %d: Milvus collections not dropped (%s); the next start will",
                    gallery_id,
                    error,
                )

    def _drop_gallery(self, gallery_id: int) -> None:
        self.store.drop_alias(gallery_id)
        for name, info in self.store.collections().items():
            if info.gallery_id == gallery_id:
                self.store.drop(name)

    def _drop_quietly(self, name: str) -> None:
        try:
            self.store.drop(name)
        except (EngineUnavailable, EngineError) as error:
            log.warning("collection %s not dropped (%s); the next reconcile will", name, error)

    # Reconciling with the database.

    def reconcile(self, gallery_id: int) -> Reconciled | None:
        """Make Milvus agree with the database for one gallery (EngineUnavailable when it does
        not answer)."""
        with self.session_factory() as session:
            gallery = session.get(Gallery, gallery_id)
            if gallery is None:
                with self._lock(gallery_id):
                    self._active.pop(gallery_id, None)
                    self._drop_gallery(gallery_id)
                return None
            rebuilt = self._find(gallery) is None
            self._active.pop(gallery_id, None)
            name, _, _ = self._collection(gallery)
            with self._lock(gallery_id):
                stored = stored_ids(session, gallery_id, gallery.model_id)
                present = self.store.ids(name, stored)
                missing = np.setdiff1d(stored, present)
                extra = np.setdiff1d(present, stored)
                self.store.delete(name, extra)
                dimension = gallery.model.embedding_dim
                for start in range(0, len(missing), _CHUNK):
                    chunk = missing[start : start + _CHUNK]
                    for ids, vectors, labels, metas in _stored_rows(
                        session, gallery_id, gallery.model_id, dimension, only=chunk
                    ):
                        self.store.insert(name, ids, vectors, labels, metas)
                if len(missing) >= _CHUNK:  # a bulk load: seal it so it gets indexed
                    self.store.flush(name)
                self._drop_older(gallery, name)
            self.pending.discard(gallery_id)
            self.unavailable.pop(gallery_id, None)
            # A rebuild wrote every row it found; the diff then adds what came in meanwhile.
            inserted = len(missing) + (len(present) if rebuilt else 0)
            report = Reconciled(
                gallery_id,
                len(stored),
                len(present) - len(extra) + len(missing),
                inserted,
                len(extra),
                rebuilt,
            )
        if report.inserted or report.deleted or report.rebuilt:
            log.info("gallery %d reconciled with Milvus: %s", gallery_id, report.as_dict())
        return report

    def _drop_older(self, gallery: Gallery, active: str) -> None:
        """Drop the gallery's collections of older versions, and stale ones of this version."""
        now_ms = time.time() * 1000
        for name, info in self.store.collections().items():
            if info.gallery_id != gallery.id or name == active:
                continue
            if info.version < gallery.index_version or (
                info.version == gallery.index_version
                and now_ms - info.stamp > _STRAY_GRACE_S * 1000
            ):
                self.store.drop(name)

    def _reconcile_or_mark(self, gallery_id: int) -> None:
        try:
            self.reconcile(gallery_id)
        except (EngineUnavailable, EngineError) as error:
            log.warning("gallery %d: reconcile failed (%s); retried later", gallery_id, error)
            self.pending.add(gallery_id)

    def _reconcile_if_pending(self, gallery_id: int) -> None:
        if gallery_id in self.pending:
            self._reconcile_or_mark(gallery_id)

    def load_all(self) -> int:
        """Start-up: reconcile every gallery, drop collections of deleted galleries, then keep
        reconciling galleries with failed writes in the background."""
        started = time.perf_counter()
        try:
            self.store.ping()
            # Listed before the galleries are read: a gallery another replica creates meanwhile
            # gets its collection after this list, so it is never taken for a deleted one.
            in_engine = {info.gallery_id for info in self.store.collections().values()}
        except (EngineUnavailable, EngineError) as error:
            log.error(
                "Milvus is not answering at start (%s); galleries are reconciled when it does",
                error,
            )
            in_engine = None
        with self.session_factory() as session:
            ids = list(session.scalars(select(Gallery.id).order_by(Gallery.id)))
        totals: dict[str, float] = {
            "galleries": len(ids),
            "inserted": 0,
            "deleted": 0,
            "rebuilt": 0,
        }
        if in_engine is None:
            self.pending.update(ids)
            ids = []
        for gallery_id in sorted((in_engine or set()) - set(ids)):
            try:
                self._drop_gallery(gallery_id)  # deleted while this process was not running
            except (EngineUnavailable, EngineError) as error:
                log.warning("gallery %d's collections not dropped (%s)", gallery_id, error)
        for gallery_id in ids:
            try:
                report = self.reconcile(gallery_id)
            except EngineUnavailable as error:
                log.error("gallery %d: Milvus stopped answering (%s)", gallery_id, error)
                self.pending.add(gallery_id)
                continue
            except (EngineError, ValueError, TypeError, KeyError) as error:
                self._cannot_build(gallery_id, error)  # settings this engine cannot apply
                continue
            if report is not None:
                totals["inserted"] += report.inserted
                totals["deleted"] += report.deleted
                totals["rebuilt"] += int(report.rebuilt)
        totals["seconds"] = round(time.perf_counter() - started, 3)
        self.last_reconcile = totals
        self._start_reconciler()
        return len(ids) - len(self.pending) - len(self.unavailable)

    def _start_reconciler(self) -> None:
        interval = self.settings.reconcile_interval_s
        if interval <= 0 or self._reconciler is not None:
            return

        def loop() -> None:
            while not self._stop.wait(interval):
                for gallery_id in sorted(self.pending):
                    self._reconcile_or_mark(gallery_id)

        self._reconciler = threading.Thread(target=loop, name="milvus-reconcile", daemon=True)
        self._reconciler.start()

    # Status.

    def health(self) -> dict[str, Any]:
        try:
            self.store.ping()
            engine = "ok"
        except (EngineUnavailable, EngineError) as error:
            engine = f"unreachable: {error}"
        return {
            "backend": self.name,
            "ok": engine == "ok",
            "engine": engine,
            "uri": self.store.describe(),
            "pending_reconcile": sorted(self.pending),
            "start_reconcile": self.last_reconcile,
        }

    def sizes(self) -> list[tuple[int, int, int]]:
        """Milvus reports its own sizes; this process holds no index."""
        return []

    def close(self) -> None:
        self._stop.set()
        if self._reconciler is not None:
            self._reconciler.join(timeout=5)
        self.store.close()


def _expression(filters: Filters | None) -> str:
    """The Milvus filter expression of `filters` (metadata types are checked afterwards)."""
    if not filters:
        return ""
    terms = []
    if filters.labels:
        terms.append(f"label in [{', '.join(literal(label) for label in filters.labels)}]")
    if filters.labelled_only:
        terms.append("label is not null")
    for key, value in filters.metadata.items():
        terms.append(f"meta[{literal(key)}] == {literal(value)}")
    return " and ".join(terms)


def _stored_count(session: Session, gallery_id: int, model_id: int) -> int:
    """How many embeddings by `model_id` the gallery stores (one COUNT, no ids fetched)."""
    return (
        session.scalar(
            select(func.count())
            .select_from(ImageEmbedding)
            .join(Image, Image.id == ImageEmbedding.image_id)
            .where(Image.gallery_id == gallery_id, ImageEmbedding.model_id == model_id)
        )
        or 0
    )


def _stored_rows(
    session: Session,
    gallery_id: int,
    model_id: int,
    dimension: int,
    only: np.ndarray | None = None,
):
    """The stored rows (ids, vectors, labels, metadata) in chunks of `_CHUNK`, by id."""
    ids = stored_ids(session, gallery_id, model_id) if only is None else only
    for start in range(0, len(ids), _CHUNK):
        chunk = [int(i) for i in ids[start : start + _CHUNK]]
        rows = session.execute(
            select(ImageEmbedding.image_id, ImageEmbedding.vector, Image.label, Image.meta)
            .join(Image, Image.id == ImageEmbedding.image_id)
            .where(ImageEmbedding.model_id == model_id, ImageEmbedding.image_id.in_(chunk))
            .order_by(ImageEmbedding.image_id)
        ).all()
        if rows:
            yield (
                np.array([row.image_id for row in rows], dtype=np.int64),
                vectors_from_rows([row.vector for row in rows], dimension),
                [row.label for row in rows],
                [row.meta for row in rows],
            )
