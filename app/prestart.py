"""The API container's pre-start step (docker-compose.yml runs it before uvicorn):

1. wait until the database accepts connections (PostgreSQL may still be starting),
2. `alembic upgrade head` (app.db.migrate: the only way the schema is created),
3. seed: build and register the built-in pretrained model (when SEED_BUILTIN_MODEL is on).

    python -m app.prestart [--wait SECONDS]

Every step is idempotent, and replicas starting together take turns (app.db.migrate's
startup_lock), so running it on every start of every replica is safe.
"""

from __future__ import annotations

import argparse
import logging
import time

from sqlalchemy import text

from app.core.config import Settings, get_settings
from app.db.migrate import startup_lock, upgrade
from app.db.session import make_engine, make_session_factory
from app.services.runtime import keep_files_private

log = logging.getLogger("lookalike.prestart")


def redacted(url: str) -> str:
    """The database URL without its password, for log lines."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        credentials, _, host = rest.rpartition("@")
        user = credentials.split(":", 1)[0]
        return f"{scheme}{sep}{user}:***@{host}"
    return url


def wait_for_database(settings: Settings, timeout_s: float, interval_s: float = 1.0) -> None:
    engine = make_engine(settings)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                with engine.connect() as connection:
                    connection.execute(text("SELECT 1"))
                return
            except Exception as error:  # OperationalError and driver-specific ones alike
                if time.monotonic() >= deadline:
                    raise SystemExit(
                        f"error: database {redacted(settings.database_url)} not reachable after "
                        f"{timeout_s:.0f} s: {error}"
                    ) from None
                log.info("waiting for the database: %s", str(error).splitlines()[0])
                time.sleep(interval_s)
    finally:
        engine.dispose()


def seed(settings: Settings) -> None:
    if not settings.seed_builtin_model:
        return
    from app.services.models import ensure_builtin

    engine = make_engine(settings)
    try:
        with make_session_factory(engine)() as session:
            model = ensure_builtin(session, settings)
            log.info("built-in model %r is model %d", model.name, model.id)
    finally:
        engine.dispose()


def prestart(settings: Settings, wait_s: float = 60.0) -> None:
    log.info("database: %s", redacted(settings.database_url))
    wait_for_database(settings, wait_s)
    keep_files_private()
    with startup_lock(settings):
        upgrade(settings)
        seed(settings)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Wait for the database, migrate, seed.")
    parser.add_argument("--wait", type=float, default=60.0, help="seconds to wait for the DB")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s [%(name)s] %(message)s")
    prestart(get_settings(), args.wait)
    log.info("ready")


if __name__ == "__main__":
    main()
