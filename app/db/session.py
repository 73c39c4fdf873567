"""Engine and session factory built from Settings; the schema itself comes only from Alembic."""

from __future__ import annotations

from typing import Any, cast

from sqlalchemy import CursorResult, Engine, Executable, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

from app.core.config import Settings

# Connections beyond one per request thread (the lifespan, the index manager, job bookkeeping).
DB_POOL_EXTRA = 4


def make_engine(settings: Settings) -> Engine:
    """One pooled connection per request thread (`Settings.request_threads`: each runs one
    request and holds at most one session), plus a few for start-up, index loading and jobs,
    so requests never wait on the pool; should they, past `db_pool_timeout_s` the API answers
    503 (app.main), not 500."""
    url = settings.database_url
    pool = {
        "pool_size": settings.request_threads,
        "max_overflow": DB_POOL_EXTRA,
        "pool_timeout": settings.db_pool_timeout_s,
    }
    if url.startswith("sqlite"):
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url, connect_args={"check_same_thread": False, "timeout": 30}, **pool
        )

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(connection, _record) -> None:
            cursor = connection.cursor()
            # WAL lets searches read while an upload writes; foreign keys are off by default.
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    return create_engine(url, pool_pre_ping=True, **pool)


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def updated_rows(session: Session, statement: Executable) -> int:
    """Run an UPDATE or DELETE and return how many rows it matched: the atomic transitions
    (claim a job, switch an index) are conditional UPDATEs whose row count says who won."""
    return cast(CursorResult[Any], session.execute(statement)).rowcount
