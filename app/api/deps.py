"""Dependencies of the routes: the process's runtime objects, a database session per request,
and API-key checks (`dependencies=[WriteAccess]` on routes that create, change or delete;
`ReadAccess` on the others, open when Settings.open_reads). They are async because they do no
blocking I/O: a sync dependency would cost each request a threadpool round trip."""

from __future__ import annotations

import hmac
import re
from collections.abc import AsyncIterator
from typing import Annotated, Literal

from fastapi import Depends, FastAPI, HTTPException, Request, Security
from fastapi.responses import JSONResponse
from fastapi.routing import iter_route_contexts
from fastapi.security import APIKeyHeader
from sqlalchemy.orm import Session
from starlette.datastructures import Headers
from starlette.routing import compile_path
from starlette.types import ASGIApp, Receive, Scope, Send

from app.core.config import Settings
from app.embedder import EmbedderRegistry
from app.index_store import IndexStore
from app.services.runtime import Runtime


async def get_runtime(request: Request) -> Runtime:
    return request.app.state.runtime


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
SettingsDep = Annotated[Settings, Depends(get_settings)]


async def get_session(runtime: RuntimeDep) -> AsyncIterator[Session]:
    """A session per request (no connection until first used; the sync routes use it in
    their worker thread)."""
    with runtime.session_factory() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


async def get_index_store(runtime: RuntimeDep) -> IndexStore:
    return runtime.index_store


async def get_embedders(runtime: RuntimeDep) -> EmbedderRegistry:
    return runtime.embedders


IndexStoreDep = Annotated[IndexStore, Depends(get_index_store)]
EmbeddersDep = Annotated[EmbedderRegistry, Depends(get_embedders)]

api_key_header = APIKeyHeader(
    name="X-API-Key",
    auto_error=False,
    description="Required for writes when API keys are configured (and for reads unless "
    "LOOKALIKE_OPEN_READS).",
)


def _check_key(settings: Settings, key: str | None) -> None:
    if not settings.api_keys:
        return
    if key is None:
        raise HTTPException(401, "this route needs an API key: send it in the X-API-Key header")
    if not any(hmac.compare_digest(key.encode(), valid.encode()) for valid in settings.api_keys):
        raise HTTPException(403, "the X-API-Key header does not hold a valid API key")


async def require_write_key(
    settings: SettingsDep, key: Annotated[str | None, Security(api_key_header)]
) -> None:
    _check_key(settings, key)


async def require_read_key(
    settings: SettingsDep, key: Annotated[str | None, Security(api_key_header)]
) -> None:
    if not settings.open_reads:
        _check_key(settings, key)


async def require_metrics_key(
    settings: SettingsDep, key: Annotated[str | None, Security(api_key_header)]
) -> None:
    """/metrics (gallery ids, index sizes): open when OPEN_METRICS, which defaults to
    OPEN_READS, so closing reads closes the metrics too."""
    if not (settings.open_reads if settings.open_metrics is None else settings.open_metrics):
        _check_key(settings, key)


WriteAccess = Depends(require_write_key)
ReadAccess = Depends(require_read_key)
MetricsAccess = Depends(require_metrics_key)


Access = Literal["write", "read"]


def _access_table(app: FastAPI) -> list[tuple[re.Pattern[str], set[str], Access]]:
    """(path pattern, methods, key check) of every route whose dependencies check a key."""
    table = []
    for route in iter_route_contexts(app.routes):
        dependant = getattr(route, "dependant", None)
        if dependant is None or not route.path or not route.methods:
            continue
        calls, stack = set(), [dependant]
        while stack:
            current = stack.pop()
            calls.add(current.call)
            stack.extend(current.dependencies)
        level: Access | None = (
            "write" if require_write_key in calls else "read" if require_read_key in calls else None
        )
        if level is not None:
            table.append((compile_path(route.path)[0], set(route.methods), level))
    return table


class KeyBeforeBodyMiddleware:
    """Checks the API key of a route that needs one before any of the request body is read,
    so a client without a valid key cannot make the server receive up to MAX_REQUEST_BYTES
    first (the route's own dependency checks it again, and declares it in OpenAPI)."""

    def __init__(self, app: ASGIApp, fastapi_app: FastAPI) -> None:
        self.app = app
        self.fastapi_app = fastapi_app
        self.table: list[tuple[re.Pattern[str], set[str], Access]] | None = None

    def access_for(self, method: str, path: str) -> Access | None:
        if self.table is None:  # routes are all included once the first request arrives
            self.table = _access_table(self.fastapi_app)
        return next(
            (
                level
                for pattern, methods, level in self.table
                if method in methods and pattern.match(path)
            ),
            None,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        settings = getattr(self.fastapi_app.state, "settings", None)
        if scope["type"] == "http" and settings is not None and settings.api_keys:
            level = self.access_for(scope["method"], scope["path"])
            if level == "write" or (level == "read" and not settings.open_reads):
                try:
                    _check_key(settings, Headers(scope=scope).get(api_key_header.model.name))
                except HTTPException as error:
                    response = JSONResponse(
                        {"detail": error.detail},
                        status_code=error.status_code,
                        headers={"Connection": "close"},
                    )
                    await response(scope, receive, send)
                    return
        await self.app(scope, receive, send)
