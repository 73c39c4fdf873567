"""Liveness, readiness and Prometheus metrics (outside /api/v1)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from app.api.deps import MetricsAccess

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is up (no dependency is checked)."""
    return {"status": "ok"}


@router.get("/readyz")
def readyz(request: Request) -> JSONResponse:
    """200 once the database and the index backend answer and every gallery index is loaded;
    503 before that."""
    state = request.app.state
    if not state.indexes_loaded:
        return JSONResponse({"status": "starting", "indexes_loaded": False}, status_code=503)
    runtime = state.runtime
    try:
        with runtime.engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        database = "ok"
    except Exception as error:  # any driver error means not ready
        database = f"unreachable: {type(error).__name__}"
    index_backend = runtime.indexes.health()
    ready = database == "ok" and index_backend["ok"]
    body = {
        "status": "ready" if ready else "not ready",
        "database": database,
        "indexes_loaded": True,
        # faiss: the indexes this process holds; milvus: whether the engine answers, and the
        # galleries whose writes failed and wait for a reconcile.
        "index_backend": index_backend,
        # Upload files without an image row (uploads killed before their commit), deleted at
        # this start.
        "orphan_files_removed": state.orphans_removed,
        # Galleries whose stored index settings cannot be applied: the service runs without
        # them, their searches answer 503 with the same reason.
        "unavailable_galleries": {str(k): v for k, v in runtime.indexes.unavailable.items()},
    }
    return JSONResponse(body, status_code=200 if ready else 503)


@router.get("/metrics", response_class=Response, dependencies=[MetricsAccess])
def metrics(request: Request) -> Response:
    return Response(
        generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST
    )
