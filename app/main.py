"""The FastAPI application: `create_app(settings)`; `uvicorn --factory app.main:create_app`
serves the one configured by the environment.

Start-up (lifespan): migrate the schema to head, seed the built-in model, then bring every
gallery's index up to date (snapshot + replay from the database); /readyz answers 200 only
after that. Shutdown snapshots indexes with unsaved changes.
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from anyio import to_thread
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError

from app.api.limits import Limits, UploadLimitMiddleware
from app.api.metrics import Metrics, MetricsMiddleware
from app.api.router import api_router
from app.api.routes import health
from app.core.config import Settings, get_settings
from app.db.migrate import upgrade
from app.services.errors import ServiceError
from app.services.models import ensure_builtin
from app.services.runtime import Runtime
from app.web import install_web

log = logging.getLogger("lookalike")

# Seconds a client told to retry (503) should wait.
RETRY_AFTER_S = 5


def with_api_key(settings: Settings) -> Settings:
    """With no keys configured and AUTO_API_KEY on, use (and on first start create and print)
    the key stored in DATA_DIR/api_key."""
    if settings.api_keys or not settings.auto_api_key:
        return settings
    path = settings.data_dir / "api_key"
    if path.is_file():
        key = path.read_text().strip()
    else:
        key = secrets.token_urlsafe(32)
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as out:
            out.write(key + "\n")
        log.warning("generated an API key for writes (stored in %s): %s", path, key)
    return settings.model_copy(update={"api_keys": [key]})


def _start(app: FastAPI, settings: Settings) -> None:
    upgrade(settings)
    settings = with_api_key(settings)
    runtime = Runtime.start(settings, on_batch=app.state.metrics.observe_batch)
    if settings.seed_builtin_model:
        with runtime.session_factory() as session:
            ensure_builtin(session, settings)
    runtime.index_store.remove_stale_temp_files()
    app.state.runtime = runtime
    app.state.settings = runtime.settings
    app.state.engine = runtime.engine
    app.state.session_factory = runtime.session_factory
    app.state.index_store = runtime.index_store
    app.state.embedders = runtime.embedders
    app.state.metrics.watch(runtime.index_store)
    count = runtime.indexes.load_all()
    app.state.indexes_loaded = True
    log.info("ready: %d gallery indexes loaded", count)


async def _service_error(_: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, ServiceError)
    # 503: busy or temporarily unavailable; clients should come back, not give up.
    headers = {"Retry-After": str(RETRY_AFTER_S)} if error.status_code == 503 else None
    return JSONResponse({"detail": error.message}, status_code=error.status_code, headers=headers)


async def _data_error(_: Request, error: Exception) -> JSONResponse:
    """A value the database refuses (PostgreSQL: a NUL character in a text, a number out of
    range): the request's session rolls its transaction back, so nothing was stored."""
    assert isinstance(error, DataError)
    reason = str(error.orig).strip().splitlines()[0] if error.orig else "invalid value"
    return JSONResponse(
        {"detail": f"the database refused a value of this request: {reason}"}, status_code=422
    )


async def _validation_error(_: Request, error: Exception) -> JSONResponse:
    """FastAPI's validation errors as one readable sentence per problem."""
    assert isinstance(error, RequestValidationError)
    problems = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"] if part != "body") or "body"
        problems.append(f"{where}: {item['msg']}")
    return JSONResponse({"detail": "; ".join(problems)}, status_code=422)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await to_thread.run_sync(_start, app, settings)
        try:
            yield
        finally:
            await to_thread.run_sync(app.state.runtime.close)

    app = FastAPI(
        title="lookalike",
        summary="Image similarity search: galleries, FAISS indexes and models over REST.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.metrics = Metrics()
    app.state.indexes_loaded = False
    app.add_middleware(
        UploadLimitMiddleware,
        default=Limits(settings.max_upload_bytes, settings.max_request_bytes),
        by_prefix={
            "/api/v1/models": Limits(settings.max_model_bytes, settings.max_model_bytes),
            "/api/v1/jobs/import": Limits(settings.max_archive_bytes, settings.max_archive_bytes),
        },
    )
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(DataError, _data_error)
    app.include_router(api_router)
    app.include_router(health.router)
    install_web(app)  # the web interface at /ui/ (issue 7, app/web)
    return app
