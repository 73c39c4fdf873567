"""Everything a service call needs, built once per process from Settings: the API's lifespan
and a Celery worker both build one (`Runtime.start`) and close it on the way out."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from app.core.config import Settings
from app.db.session import make_engine, make_session_factory
from app.embedder import EmbedderRegistry
from app.imaging import DecodeBudget
from app.index_store import set_search_threads
from app.services.index_backend import IndexBackend, make_index_backend
from training import threads
from training.evaluation.cluster_classifier import ClusterClassifier

logger = logging.getLogger(__name__)


# Files and folders this process creates (uploads, databases, indexes, logs, models) are the
# service user's alone: 0600 files, 0700 folders.
PRIVATE_UMASK = 0o077


def keep_files_private() -> None:
    """Set the process umask so that everything created from now on is owner-only."""
    os.umask(PRIVATE_UMASK)


@dataclass
class Runtime:
    settings: Settings
    engine: Engine
    session_factory: sessionmaker[Session]
    embedders: EmbedderRegistry
    indexes: IndexBackend
    decode_budget: DecodeBudget
    # Magnet cluster classifiers from model artifacts, by model id (None: the model has none).
    cluster_classifiers: dict[int, ClusterClassifier | None] = field(default_factory=dict)

    @classmethod
    def start(cls, settings: Settings, on_batch: Callable[[int], None] | None = None) -> Runtime:
        """Connect to the database and prepare (empty) index and embedder caches; the schema
        must already be at head (`app.db.migrate.upgrade`)."""
        keep_files_private()
        for directory in (settings.uploads_dir, settings.indexes_dir, settings.models_dir):
            directory.mkdir(parents=True, exist_ok=True)
        if "LOOKALIKE_TORCH_THREADS" in os.environ:
            logger.warning(
                "LOOKALIKE_TORCH_THREADS is no longer read: LOOKALIKE_THREADS sizes every "
                "compute pool (docs/service.md, Threads)"
            )
        thread_policy = settings.thread_policy()
        threads.apply(thread_policy)
        logger.info("thread policy: %s", thread_policy.describe())
        set_search_threads(settings.faiss_search_threads)
        engine = make_engine(settings)
        session_factory = make_session_factory(engine)
        embedders = EmbedderRegistry(
            device=settings.device,
            max_batch=settings.embed_batch_size,
            max_wait_ms=settings.embed_max_wait_ms,
            threads=thread_policy.threads,
            backend=settings.embed_backend,
            on_batch=on_batch,
        )
        indexes = make_index_backend(settings, session_factory)
        decode_budget = DecodeBudget(settings.decode_budget_pixels)
        return cls(settings, engine, session_factory, embedders, indexes, decode_budget)

    def close(self) -> None:
        """Persist the indexes (FAISS snapshots), stop the embedders, release connections."""
        self.indexes.close()
        self.embedders.close()
        self.engine.dispose()
