"""Run Alembic programmatically (the only way the schema is created)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import text

from app.core.config import Settings
from app.db.session import make_engine

ALEMBIC_DIR = Path(__file__).resolve().parents[2] / "alembic"


def alembic_config(settings: Settings) -> Config:
    config = Config()
    config.set_main_option("script_location", str(ALEMBIC_DIR))
    config.attributes["settings"] = settings
    return config


# pg_advisory_lock's key for start-up steps ("look"): any 64-bit number no other client uses.
STARTUP_LOCK_KEY = 0x6C6F6F6B


@contextmanager
def startup_lock(settings: Settings) -> Iterator[None]:
    """Held while one process migrates and seeds, so replicas that start together (several API
    containers each running app.prestart) take turns instead of racing to create the same
    tables and the same built-in model: the later ones find the work done. A PostgreSQL
    session-level advisory lock, released when its connection closes, also if the process
    dies; SQLite has one writer at a time and a single host, so it needs none."""
    engine = make_engine(settings)
    try:
        if engine.dialect.name != "postgresql":
            yield
            return
        with engine.connect() as connection:
            connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": STARTUP_LOCK_KEY})
            connection.commit()
            try:
                yield
            finally:
                connection.execute(
                    text("SELECT pg_advisory_unlock(:key)"), {"key": STARTUP_LOCK_KEY}
                )
                connection.commit()
    finally:
        engine.dispose()


def upgrade(settings: Settings, revision: str = "head") -> None:
    command.upgrade(alembic_config(settings), revision)


def downgrade(settings: Settings, revision: str = "base") -> None:
    command.downgrade(alembic_config(settings), revision)
