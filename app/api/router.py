"""Every /api/v1 route."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from app.api.input_rules import check_request_values
from app.api.routes import (
    clusters,
    datasets,
    galleries,
    images,
    jobs,
    models,
    presets,
    reports,
    search,
)

api_router = APIRouter(prefix="/api/v1", dependencies=[Depends(check_request_values)])
api_router.include_router(models.router)
api_router.include_router(galleries.router)
api_router.include_router(galleries.index_types_router)
api_router.include_router(images.router)
api_router.include_router(search.router)
api_router.include_router(clusters.router)
api_router.include_router(jobs.router)
api_router.include_router(datasets.router)
api_router.include_router(presets.router)
api_router.include_router(reports.router)
