"""Upload size limits enforced while the body streams in (docs/service.md, "Upload hardening").

Starlette has no file-size cap: it spools every part to a temporary file. This middleware
answers 413 before the route runs when Content-Length is over the request limit, and otherwise
counts the bytes as they arrive: the whole body against the request limit, and each multipart
part (parsed alongside with python-multipart, only to count) against the per-file limit. The
413 is raised from `receive` before the oversized chunk reaches the form parser, so nothing of
a rejected request is written anywhere (the route never runs).
"""

from __future__ import annotations

from dataclasses import dataclass

from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send


@dataclass(frozen=True)
class Limits:
    per_file: int
    per_request: int


def _mib(size: int) -> str:
    return f"{size / 1024**2:.1f} MiB" if size >= 1024**2 else f"{size:,} bytes"


class _PartCounter:
    """Feeds the body to a counting-only multipart parser; raises 413 on an oversized part."""

    def __init__(self, boundary: bytes, limit: int) -> None:
        self.limit = limit
        self.size = 0
        self.parser = MultipartParser(
            boundary,
            {"on_part_begin": self._begin, "on_part_data": self._data},
        )

    def _begin(self) -> None:
        self.size = 0

    def _data(self, data: bytes, start: int, end: int) -> None:
        self.size += end - start
        if self.size > self.limit:
            raise HTTPException(
                413,
                f"a file in this request is over the per-file limit of {_mib(self.limit)}; "
                "nothing was stored: send smaller files",
            )

    def feed(self, chunk: bytes) -> None:
        self.parser.write(chunk)


class UploadLimitMiddleware:
    """`default` limits, or those of the longest matching path prefix in `by_prefix` (model
    uploads and import archives are single big files)."""

    def __init__(self, app: ASGIApp, default: Limits, by_prefix: dict[str, Limits]) -> None:
        self.app = app
        self.default = default
        self.by_prefix = sorted(by_prefix.items(), key=lambda item: -len(item[0]))

    def limits_for(self, path: str) -> Limits:
        return next(
            (lim for prefix, lim in self.by_prefix if path.startswith(prefix)), self.default
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limits = self.limits_for(scope["path"])
        headers = Headers(scope=scope)
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limits.per_request:
            response = JSONResponse(
                {
                    "detail": f"the request body is {_mib(int(declared))}, over the limit of "
                    f"{_mib(limits.per_request)}; send fewer or smaller files per request"
                },
                status_code=413,
                headers={"Connection": "close"},
            )
            await response(scope, receive, send)
            return
        counter = None
        content_type, options = parse_options_header(headers.get("content-type", ""))
        if content_type == b"multipart/form-data" and b"boundary" in options:
            counter = _PartCounter(options[b"boundary"], limits.per_file)
        received = 0

        async def counted_receive() -> Message:
            nonlocal received, counter
            message = await receive()
            if message["type"] == "http.request":
                chunk = message.get("body", b"")
                received += len(chunk)
                if received > limits.per_request:
                    raise HTTPException(
                        413,
                        f"the request body is over the limit of {_mib(limits.per_request)}; "
                        "nothing was stored: send fewer or smaller files per request",
                    )
                if counter is not None:
                    try:
                        counter.feed(chunk)
                    except HTTPException:
                        raise
                    except Exception:  # malformed multipart: the form parser reports it
                        counter = None
            return message

        await self.app(scope, counted_receive, send)
