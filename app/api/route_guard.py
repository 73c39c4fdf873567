"""Checks made from the route table before FastAPI routes a request: the API key from the
headers, before any of the body is read, and 405 answers whose `Allow` header lists every method
of the path (Starlette's lists the first partial match's, and a literal path such as
/jobs/import would otherwise be captured by /jobs/{job_id} and answer 422)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from fastapi import FastAPI, HTTPException
from fastapi.responses import JSONResponse
from fastapi.routing import iter_route_contexts
from starlette.datastructures import Headers
from starlette.routing import compile_path
from starlette.types import ASGIApp, Receive, Scope, Send

from app.api.deps import api_key_header, check_key, require_read_key, require_write_key

Access = Literal["write", "read"]


@dataclass(frozen=True)
class RouteEntry:
    """A route as the middleware, the 405 handler and the OpenAPI document see it."""

    path: str  # the template, e.g. /api/v1/images/{image_id}
    pattern: re.Pattern[str]
    methods: frozenset[str]
    access: Access | None  # the key check its dependencies make


def route_table(app: FastAPI) -> list[RouteEntry]:
    """Every route with methods, in routing order (FastAPI's own route contexts)."""
    table = []
    for route in iter_route_contexts(app.routes):
        dependant = getattr(route, "dependant", None)
        if not route.path or not route.methods:
            continue
        calls, stack = set(), [dependant] if dependant is not None else []
        while stack:
            current = stack.pop()
            calls.add(current.call)
            stack.extend(current.dependencies)
        access: Access | None = (
            "write" if require_write_key in calls else "read" if require_read_key in calls else None
        )
        pattern, template, _ = compile_path(route.path)
        table.append(RouteEntry(template, pattern, frozenset(route.methods), access))
    return table


def route_path(scope: Scope) -> str:
    """The path the routes match: uvicorn's `--root-path` prefix (a proxy's mount point)
    removed, as Starlette's router removes it."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


def _literal_segments(template: str) -> int:
    return sum(not part.startswith("{") for part in template.split("/"))


def allowed_methods(table: list[RouteEntry], path: str) -> tuple[str | None, frozenset[str]]:
    """(the most specific template matching `path`, the methods it answers); a literal segment
    beats a parameter, as a reader of the URL would expect."""
    matching = [entry for entry in table if entry.pattern.match(path)]
    if not matching:
        return None, frozenset()
    best = max(_literal_segments(entry.path) for entry in matching)
    chosen = [entry for entry in matching if _literal_segments(entry.path) == best]
    return chosen[0].path, frozenset().union(*(entry.methods for entry in chosen))


class KeyBeforeBodyMiddleware:
    """Checks the API key of a route that needs one before any of the request body is read,
    so a client without a valid key cannot make the server receive up to MAX_REQUEST_BYTES
    first (the route's own dependency checks it again, and declares it in OpenAPI)."""

    def __init__(self, app: ASGIApp, fastapi_app: FastAPI) -> None:
        self.app = app
        self.fastapi_app = fastapi_app
        self.table: list[RouteEntry] | None = None

    def access_for(self, method: str, path: str) -> Access | None:
        if self.table is None:  # routes are all included once the first request arrives
            self.table = route_table(self.fastapi_app)
        return next(
            (e.access for e in self.table if method in e.methods and e.pattern.match(path)), None
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        settings = getattr(self.fastapi_app.state, "settings", None)
        if scope["type"] == "http" and settings is not None and settings.api_keys:
            level = self.access_for(scope["method"], route_path(scope))
            if level == "write" or (level == "read" and not settings.open_reads):
                try:
                    check_key(settings, Headers(scope=scope).get(api_key_header.model.name))
                except HTTPException as error:
                    response = JSONResponse(
                        {"detail": error.detail},
                        status_code=error.status_code,
                        headers={"Connection": "close"},
                    )
                    await response(scope, receive, send)
                    return
        await self.app(scope, receive, send)


class MethodNotAllowedMiddleware:
    """405 with every allowed method when the path exists but not for this method."""

    def __init__(self, app: ASGIApp, fastapi_app: FastAPI) -> None:
        self.app = app
        self.fastapi_app = fastapi_app
        self.table: list[RouteEntry] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            if self.table is None:
                self.table = route_table(self.fastapi_app)
            template, methods = allowed_methods(self.table, route_path(scope))
            if template is not None and scope["method"] not in methods:
                response = JSONResponse(
                    {"detail": f"{scope['method']} is not allowed on {template}"},
                    status_code=405,
                    headers={"Allow": ", ".join(sorted(methods))},
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
