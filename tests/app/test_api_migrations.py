"""The schema comes only from Alembic: an empty database goes to head (matching the models)
and back to base, on SQLite and on PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from app.core.config import Settings
from app.db.base import Base
from app.db.migrate import downgrade, upgrade
from app.db.session import make_engine

CATALOG = {"models", "galleries", "images", "image_embeddings", "index_versions"}


def _diff_touches_catalog(diff) -> bool:
    """Whether one autogenerate difference concerns a catalog table."""
    if isinstance(diff, list):
        return any(_diff_touches_catalog(d) for d in diff)
    for item in diff[1:]:
        table = getattr(item, "table", None)
        name = getattr(item, "name", None) if table is None else table.name
        if name in CATALOG or (isinstance(item, str) and item in CATALOG):
            return True
    return False


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_empty_database_to_head_and_back(database: str, tmp_path: Path, request):
    url = "" if database == "sqlite" else request.getfixturevalue("postgres_schema")
    settings = Settings(data_dir=tmp_path, database_url=url)
    engine = make_engine(settings)
    try:
        assert set(inspect(engine).get_table_names()) == set()
        upgrade(settings)
        tables = set(inspect(engine).get_table_names())
        assert tables >= CATALOG and "alembic_version" in tables
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            differences = [
                d for d in compare_metadata(context, Base.metadata) if _diff_touches_catalog(d)
            ]
        assert differences == []
        downgrade(settings)
        assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
        upgrade(settings)  # and up again: downgrade left nothing behind that blocks it
        assert set(inspect(engine).get_table_names()) >= CATALOG
    finally:
        engine.dispose()
