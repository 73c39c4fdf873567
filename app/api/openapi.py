"""The OpenAPI document as the service behaves (docs/service.md, "Errors"): every 4xx/5xx
answer has one body, `{"detail": "<what is wrong and what to do>"}`, declared on each
operation with the statuses it can give; the API key is declared only where this server's
configuration requires it. `tests/app/test_api_fuzz.py` holds the service to it."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from app.api.route_guard import route_table
from app.core.config import Settings

ERROR_SCHEMA = {
    "title": "Error",
    "type": "object",
    "required": ["detail"],
    "properties": {
        "detail": {"type": "string", "description": "What is wrong and what to do about it."}
    },
}
ERROR_DESCRIPTIONS = {
    400: "The request is malformed: a body that does not parse, a corrupt or truncated image.",
    401: "This route needs an API key: send it in the X-API-Key header.",
    403: "The X-API-Key header does not hold a valid API key.",
    404: "No such resource (gallery, image, model, job, dataset, report).",
    409: "The request conflicts with the current state (e.g. a model in use, a job running).",
    413: "Too large: the body, a file, or an image's pixel count (decompression bomb).",
    415: "Not an image, or a format that is not accepted.",
    422: "A value is invalid; the detail names the field and the rule.",
    503: "Busy or not ready (database, broker, decoding, an index that cannot load); retry "
    "after the Retry-After header's seconds.",
}
KEY_SCHEME = "APIKeyHeader"
ERROR_REF = {"$ref": "#/components/schemas/Error"}


def install_openapi(app: FastAPI, settings: Settings) -> None:
    """Replace FastAPI's document builder with one that declares the real error answers."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                summary=app.summary,
                routes=app.routes,
            )
            document_errors(schema, app, settings)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def document_errors(schema: dict[str, Any], app: FastAPI, settings: Settings) -> None:
    access = {
        (entry.path, method.lower()): entry.access
        for entry in route_table(app)
        for method in entry.methods
    }
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components.pop("HTTPValidationError", None)
    components.pop("ValidationError", None)
    components["Error"] = ERROR_SCHEMA
    for path, operations in schema.get("paths", {}).items():
        for method, operation in operations.items():
            level = access.get((path, method))
            needs_key = bool(settings.api_keys or settings.auto_api_key) and (
                level == "write" or (level == "read" and not settings.open_reads)
            )
            if path == "/metrics":
                open_metrics = (
                    settings.open_reads if settings.open_metrics is None else settings.open_metrics
                )
                needs_key = bool(settings.api_keys or settings.auto_api_key) and not open_metrics
            if needs_key:
                operation["security"] = [{KEY_SCHEME: []}]
            else:
                operation.pop("security", None)
            for code in _error_codes(path, method, operation, level, needs_key):
                operation["responses"][str(code)] = {
                    "description": ERROR_DESCRIPTIONS[code],
                    "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/Error"}}
                    },
                }


# Query parameters that name a resource (GET /reports/compare?models=1&models=2&dataset_id=3).
RESOURCE_QUERIES = {"models", "dataset_id"}


def _error_codes(
    path: str, method: str, operation: dict[str, Any], level: str | None, needs_key: bool
) -> set[int]:
    """The error statuses an operation can answer, from what it is."""
    codes: set[int] = set()
    if needs_key:
        codes |= {401, 403}
    if not path.startswith("/api/"):
        return codes | ({503} if path == "/readyz" else set())
    codes |= {422, 503}
    body = operation.get("requestBody", {}).get("content", {})
    parameters = operation.get("parameters", [])
    names_a_resource = any(
        p.get("in") == "path" or (p.get("in") == "query" and p["name"] in RESOURCE_QUERIES)
        for p in parameters
    )
    if body or names_a_resource:
        codes.add(404)  # the resource in the path, the query or the body does not exist
    if body:
        codes |= {400, 413}  # a body that does not parse; one over the size limits
    if "multipart/form-data" in body:
        codes.add(415)
    if level == "write":
        codes.add(409)
    if path.endswith("/thumbnail"):
        codes |= {400, 415}  # a stored file that no longer decodes
    return codes
