"""What the services need from a vector index, and the two engines that provide it.

`faiss` (the default, app/services/indexes.py): every API process holds each gallery's index in
its own memory, replayed from the database. `milvus` (app/services/milvus_indexes.py): the
vectors live in a Milvus engine (Milvus Lite in a local file, or a Milvus standalone/cluster
server) that every API replica and worker shares, so the API holds no index state.

In both, the database is the source of truth (`image_embeddings`): `reconcile` makes the engine
agree with it (missing ids inserted, extra ids deleted, the active version rebuilt when it is
missing), which is what makes a crash between a commit and an engine write, or a lost engine
volume, harmless. docs/service.md, "Index backends", has the mapping and the guarantees.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from sqlalchemy.orm import Session, sessionmaker

from app.db.models import Gallery
from app.services.errors import ServiceError

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from app.core.config import Settings
    from app.services.filters import SearchPage


@dataclass
class IndexRows:
    """Images to index: ids, their vectors (one row each), and what filters read."""

    ids: np.ndarray
    vectors: np.ndarray
    labels: list[str | None]
    metadata: list[dict[str, Any] | None]


@dataclass
class Reconciled:
    """What one reconcile of a gallery found and fixed."""

    gallery_id: int
    stored: int  # embeddings of the active model in the database
    indexed: int  # vectors in the engine afterwards
    inserted: int = 0
    deleted: int = 0
    rebuilt: bool = False  # the active version was missing (or another) and was rebuilt

    def as_dict(self) -> dict[str, Any]:
        return {
            "gallery_id": self.gallery_id,
            "stored": self.stored,
            "indexed": self.indexed,
            "inserted": self.inserted,
            "deleted": self.deleted,
            "rebuilt": self.rebuilt,
        }


Hits = list[list[tuple[int, float]]]  # per query: (image id, cosine score), best first


def cannot_build(unavailable: dict[int, str], gallery_id: int, error: Exception) -> ServiceError:
    """A gallery whose stored index settings the engine cannot apply (written by an older
    version, or by hand): recorded in `unavailable` (for /readyz) and answered with 503 and
    the way out, the same in both backends."""
    reason = f"{type(error).__name__}: {error}".splitlines()[0][:300]
    unavailable[gallery_id] = reason
    log.error("gallery %d's index cannot be built: %s", gallery_id, reason)
    return ServiceError(
        f"gallery {gallery_id}'s index cannot be built from its stored settings ({reason}); "
        "PATCH the gallery's index_type or index_params to fix it",
        503,
    )


class IndexBackend(Protocol):
    """The operations the services use; both engines implement all of them."""

    name: str
    # Galleries whose index cannot be served, and why (their searches answer 503).
    unavailable: dict[int, str]

    def load_all(self) -> int:
        """Start-up: bring every gallery's index in line with the database; how many serve."""
        ...

    def search(
        self, session: Session, gallery: Gallery, queries: np.ndarray, page: SearchPage
    ) -> Hits:
        """The `page` of hits of each query (`SearchPage`: k, offset, filters, min_score)."""
        ...

    def live_count(self, gallery: Gallery) -> int | None:
        """Vectors the gallery's active index holds, when this process knows it cheaply."""
        ...

    def estimated_exact_search_ms(self, gallery: Gallery, count: int) -> float:
        """What one exact search over `count` of the gallery's vectors costs."""
        ...

    def write_ahead(self, gallery_id: int, model_id: int, rows: IndexRows) -> None:
        """Inside an upload's transaction, before its commit: an engine shared by every process
        stores the rows now (an error rolls the upload back); a per-process index waits for
        `apply`."""
        ...

    def apply(
        self,
        gallery_id: int,
        model_id: int,
        revision: int,
        *,
        added: IndexRows | None = None,
        removed: np.ndarray | None = None,
    ) -> None:
        """After a commit (revision `revision`): make the change visible to searches."""
        ...

    def build(
        self,
        session: Session,
        gallery: Gallery,
        *,
        model_id: int,
        index_type: str,
        index_params: dict[str, Any],
    ) -> Any:
        """A new index version from the stored embeddings, not yet active (`activate` makes it
        the gallery's, `discard` throws it away). ValueError/RuntimeError: the settings cannot
        be applied to this data."""
        ...

    def activate(self, gallery: Gallery, built: Any) -> None:
        """After the switch committed: make `built` the gallery's active index atomically."""
        ...

    def measure_recall(
        self, session: Session, gallery: Gallery, built: Any, model_id: int
    ) -> float | None:
        """Recall@10 of `built` against exact search on a sample of the gallery's vectors
        (1.0 for an exact index; None when it is empty)."""
        ...

    def discard(self, built: Any) -> None:
        """Throw away a built index whose switch did not commit."""
        ...

    def forget(self, gallery_id: int) -> None:
        """The gallery was deleted: drop its index everywhere."""
        ...

    def reconcile(self, gallery_id: int) -> Reconciled | None:
        """Make the gallery's engine state agree with the database (None: no such gallery)."""
        ...

    def health(self) -> dict[str, Any]:
        """For /readyz: `ok` is False when the engine cannot serve."""
        ...

    def sizes(self) -> list[tuple[int, int, int]]:
        """(gallery, model, live vectors) of the indexes this process holds (metrics)."""
        ...

    def close(self) -> None:
        """Shut down: persist what must be, release connections."""
        ...


def make_index_backend(settings: Settings, session_factory: sessionmaker[Session]) -> IndexBackend:
    """The backend `settings.index_backend` names."""
    if settings.index_backend == "milvus":
        from app.services.milvus_indexes import MilvusIndexManager  # pymilvus is an extra

        return MilvusIndexManager(settings, session_factory)
    from app.index_store import IndexStore
    from app.services.indexes import IndexManager

    return IndexManager(IndexStore(settings.indexes_dir), session_factory, settings.snapshot_every)
