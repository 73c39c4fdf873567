"""Dependencies of the routes: the process's runtime objects, a database session per request,
and API-key checks (`dependencies=[WriteAccess]` on routes that create, change or delete;
`ReadAccess` on the others, open when Settings.open_reads). They are async because they do no
blocking I/O: a sync dependency would cost each request a threadpool round trip."""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, HTTPException, Request, Security
from fastapi.security import APIKeyHeader
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.services.jobs.broker import JobQueue
from app.services.runtime import Runtime


async def get_runtime(request: Request) -> Runtime:
    return request.app.state.runtime


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_job_queue(request: Request) -> JobQueue:
    return request.app.state.job_queue


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
JobQueueDep = Annotated[JobQueue, Depends(get_job_queue)]


async def get_session(runtime: RuntimeDep) -> AsyncIterator[Session]:
    """A session per request (no connection until first used; the sync routes use it in
    their worker thread)."""
    with runtime.session_factory() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


api_key_header = APIKeyHeader(
    name="X-API-Key",
    auto_error=False,
    description="Required for writes when API keys are configured (and for reads unless "
    "LOOKALIKE_OPEN_READS).",
)


def check_key(settings: Settings, key: str | None) -> None:
    if not settings.api_keys:
        return
    if key is None:
        raise HTTPException(401, "this route needs an API key: send it in the X-API-Key header")
    if not any(hmac.compare_digest(key.encode(), valid.encode()) for valid in settings.api_keys):
        raise HTTPException(403, "the X-API-Key header does not hold a valid API key")


async def require_write_key(
    settings: SettingsDep, key: Annotated[str | None, Security(api_key_header)]
) -> None:
    check_key(settings, key)


async def require_read_key(
    settings: SettingsDep, key: Annotated[str | None, Security(api_key_header)]
) -> None:
    if not settings.open_reads:
        check_key(settings, key)


async def require_metrics_key(
    settings: SettingsDep, key: Annotated[str | None, Security(api_key_header)]
) -> None:
    """/metrics (gallery ids, index sizes): open when OPEN_METRICS, which defaults to
    OPEN_READS, so closing reads closes the metrics too."""
    if not (settings.open_reads if settings.open_metrics is None else settings.open_metrics):
        check_key(settings, key)


WriteAccess = Depends(require_write_key)
ReadAccess = Depends(require_read_key)
MetricsAccess = Depends(require_metrics_key)
