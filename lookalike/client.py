"""A typed Python client for a lookalike server: galleries, uploads, search, jobs and models.

    from lookalike.client import Client

    with Client("http://127.0.0.1:8000", api_key="...") as client:   # or LOOKALIKE_URL/_API_KEY
        gallery = client.create_gallery("shoes")
        client.upload_folder(gallery["id"], "photos/")            # labels from folder names
        hits = client.search(gallery["id"], "query.jpg", k=5)["results"]
        job = client.wait_job(client.submit_job("index", {"gallery_id": 1, "model_id": 2})["id"])

`AsyncClient` has its most used methods as coroutines (an async iterator for images). Both
retry a request the server answered with 503 or 429 (busy, or a backend briefly down) after its
`Retry-After` or an exponential backoff, and raise `LookalikeError` subclasses carrying the
server's reason (`detail`) for every other error status.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import mimetypes
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

from training.data.readers import is_image_file

DEFAULT_URL = "http://127.0.0.1:8000"
API = "/api/v1"
RETRY_STATUSES = (429, 503)
TERMINAL_STATES = ("succeeded", "failed", "cancelled")

# What an image argument may be: a path, the file's bytes, or a PIL image (sent as PNG).
ImageInput = str | os.PathLike[str] | bytes | Image.Image
Json = Any


class LookalikeError(Exception):
    """An error answer of the server: `status` and the server's `detail` (its reason)."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"{status}: {detail}")
        self.status = status
        self.detail = detail


class InvalidRequest(LookalikeError):
    """400, 413, 415 or 422: the request itself is wrong (the detail says what)."""


class Unauthorized(LookalikeError):
    """401 or 403: no API key, or not a valid one."""


class NotFound(LookalikeError):
    """404: no such gallery, image, model or job."""


class Conflict(LookalikeError):
    """409: the request conflicts with the current state (a duplicate name, a finished job)."""


class Unavailable(LookalikeError):
    """503 (or 429) after every retry: the server or one of its backends is busy or down."""


class JobFailed(LookalikeError):
    """`wait_job` saw the job end failed or cancelled; `job` is its final state."""

    def __init__(self, job: dict[str, Any]) -> None:
        super().__init__(0, f"job {job['id']} {job['state']}: {job.get('error')}")
        self.job = job


def _error_for(response: httpx.Response) -> LookalikeError:
    try:
        detail = response.json().get("detail", response.text)
    except ValueError:
        detail = response.text
    detail = detail if isinstance(detail, str) else json.dumps(detail)
    status = response.status_code
    kind: type[LookalikeError] = LookalikeError
    if status in (401, 403):
        kind = Unauthorized
    elif status == 404:
        kind = NotFound
    elif status == 409:
        kind = Conflict
    elif status in RETRY_STATUSES:
        kind = Unavailable
    elif 400 <= status < 500:
        kind = InvalidRequest
    return kind(status, detail)


def image_part(image: ImageInput, name: str = "image") -> tuple[str, bytes, str]:
    """A multipart file part (filename, bytes, media type) for any `ImageInput`."""
    if isinstance(image, Image.Image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return f"{name}.png", buffer.getvalue(), "image/png"
    if isinstance(image, bytes):
        return name, image, "application/octet-stream"  # the server reads the content
    path = Path(image)
    media = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return path.name, path.read_bytes(), media


def folder_images(folder: str | os.PathLike[str]) -> list[tuple[Path, str | None]]:
    """The image files under `folder`, sorted, each with its label: the name of the folder
    holding it, or None for files at the top level. The same files as the server's folder
    import takes (`is_image_file`: image extensions, hidden files skipped)."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder")
    found = []
    for path in sorted(root.rglob("*")):
        if path.is_file() and is_image_file(path):
            found.append((path, path.parent.name if path.parent != root else None))
    return found


@dataclass
class _Call:
    """One request, built the same way for both clients."""

    method: str
    path: str
    params: dict[str, Any] | None = None
    json: Json = None
    data: dict[str, Any] | None = None
    files: list[tuple[str, tuple[str, bytes, str]]] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    # Uploads: a 4xx whose body still lists each file's result (all of them were rejected)
    # is an answer, not an error.
    per_file_results: bool = False


def _search_form(
    k: int, offset: int, labels: Sequence[str] | None, metadata: dict[str, Any] | None,
    min_score: float | None,
) -> dict[str, Any]:  # fmt: skip
    form: dict[str, Any] = {"k": str(k), "offset": str(offset)}
    if labels:
        form["label"] = list(labels)
    if metadata:
        form["metadata"] = json.dumps(metadata)
    if min_score is not None:
        form["min_score"] = str(min_score)
    return form


def _upload_call(
    gallery_id: int,
    images: Sequence[ImageInput],
    labels: Sequence[str | None] | None,
    metadata: Sequence[dict[str, Any] | None] | None,
) -> _Call:
    files = [("files", image_part(image, f"image-{i}")) for i, image in enumerate(images)]
    data: dict[str, Any] = {}
    if labels is not None and any(label is not None for label in labels):
        data["label"] = [label or "" for label in labels]
    if metadata is not None and any(m for m in metadata):
        data["metadata"] = [json.dumps(m or {}) for m in metadata]
    path = f"/galleries/{gallery_id}/images"
    return _Call("POST", path, data=data, files=files, per_file_results=True)


def _ended(job: dict[str, Any]) -> bool:
    """Whether the job has ended; raises `JobFailed` when it ended failed or cancelled."""
    if job["state"] not in TERMINAL_STATES:
        return False
    if job["state"] != "succeeded":
        raise JobFailed(job)
    return True


def _next_offset(page: dict[str, Any], offset: int) -> int | None:
    """The offset of the page after `page` (read at `offset`) of a paged list; None at the end."""
    offset += len(page["items"])
    return None if not page["items"] or offset >= page["total"] else offset


def _wait_s(response: httpx.Response | None, attempt: int, backoff_s: float) -> float:
    """Retry-After when the server gave one (at most 30 s), else exponential backoff."""
    header = response.headers.get("Retry-After") if response is not None else None
    if header is not None and header.isdigit():
        return min(float(header), 30.0)
    return backoff_s * 2**attempt


class _Base:
    def __init__(
        self, url: str | None, api_key: str | None, retries: int, backoff_s: float
    ) -> None:
        self.url = (url or os.environ.get("LOOKALIKE_URL") or DEFAULT_URL).rstrip("/")
        self.api_key = api_key if api_key is not None else os.environ.get("LOOKALIKE_API_KEY")
        self.retries = retries
        self.backoff_s = backoff_s

    def _headers(self) -> dict[str, str]:
        return {"X-API-Key": self.api_key} if self.api_key else {}

    @staticmethod
    def _parse(response: httpx.Response, call: _Call) -> Json:
        if response.status_code >= 400:
            if call.per_file_results and response.status_code < 500:
                with contextlib.suppress(ValueError):
                    body = response.json()
                    if isinstance(body, dict) and "results" in body:
                        return body
            raise _error_for(response)
        if response.headers.get("content-type", "").startswith("application/json"):
            return response.json()
        return response.text

    def _retry_delay(
        self, call: _Call, response: httpx.Response | None, attempt: int
    ) -> float | None:
        """None when `response` is the answer (not busy, or no retry left); else how long to
        wait before attempt `attempt + 1`. `response` None: the connection failed, which only
        a GET may retry (a POST may have been carried out)."""
        if response is None:
            if attempt == self.retries or call.method != "GET":
                return None
        elif response.status_code not in RETRY_STATUSES or attempt == self.retries:
            return None
        return _wait_s(response, attempt, self.backoff_s)

    def _request_args(self, call: _Call) -> dict[str, Any]:
        return {
            "params": call.params,
            "json": call.json,
            "data": call.data,
            "files": call.files,
            "headers": call.headers,
        }


class Client(_Base):
    """The synchronous client; `url` and `api_key` default to LOOKALIKE_URL and
    LOOKALIKE_API_KEY (then http://127.0.0.1:8000 and no key)."""

    def __init__(
        self,
        url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 120.0,
        retries: int = 4,
        backoff_s: float = 0.5,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        super().__init__(url, api_key, retries, backoff_s)
        self.http = httpx.Client(
            base_url=self.url + API, headers=self._headers(), timeout=timeout, transport=transport
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def _run(self, call: _Call) -> Json:
        attempt = 0
        while True:
            try:
                response = self.http.request(call.method, call.path, **self._request_args(call))
            except httpx.TransportError:
                if (delay := self._retry_delay(call, None, attempt)) is None:
                    raise
            else:
                if (delay := self._retry_delay(call, response, attempt)) is None:
                    return self._parse(response, call)
            time.sleep(delay)
            attempt += 1

    def _pages(self, path: str, params: dict[str, Any], page_size: int) -> Iterator[Json]:
        offset: int | None = 0
        while offset is not None:
            page = self._run(_Call("GET", path, {**params, "offset": offset, "limit": page_size}))
            yield from page["items"]
            offset = _next_offset(page, offset)

    # --- galleries -------------------------------------------------------------------------
    def galleries(self) -> list[Json]:
        return self._run(_Call("GET", "/galleries"))

    def gallery(self, gallery: int | str) -> Json:
        """A gallery by id, or by name."""
        return self._run(_Call("GET", f"/galleries/{self.gallery_id(gallery)}"))

    def gallery_id(self, gallery: int | str) -> int:
        if isinstance(gallery, int) or str(gallery).isdigit():
            return int(gallery)
        for item in self.galleries():
            if item["name"] == gallery:
                return int(item["id"])
        raise NotFound(404, f"no gallery is named {gallery!r}")

    def create_gallery(
        self,
        name: str,
        *,
        model_id: int | None = None,
        index_type: str = "flat",
        index_params: dict[str, Any] | None = None,
    ) -> Json:
        body: dict[str, Any] = {
            "name": name,
            "index_type": index_type,
            "index_params": index_params or {},
        }
        if model_id is not None:
            body["model_id"] = model_id
        return self._run(_Call("POST", "/galleries", json=body))

    def delete_gallery(self, gallery: int | str) -> None:
        self._run(_Call("DELETE", f"/galleries/{self.gallery_id(gallery)}"))

    # --- images ----------------------------------------------------------------------------
    def upload(
        self,
        gallery: int | str,
        images: Sequence[ImageInput],
        *,
        labels: Sequence[str | None] | None = None,
        metadata: Sequence[dict[str, Any] | None] | None = None,
        batch_size: int = 32,
        on_batch: Callable[[int, int], None] | None = None,
    ) -> list[Json]:
        """Upload in batches of `batch_size`; each file's result (`created`, `duplicate` or
        `rejected` with the reason). `on_batch(done, total)` after each batch."""
        gallery_id = self.gallery_id(gallery)
        results: list[Json] = []
        for start in range(0, len(images), batch_size):
            end = start + batch_size
            call = _upload_call(
                gallery_id,
                images[start:end],
                None if labels is None else labels[start:end],
                None if metadata is None else metadata[start:end],
            )
            results.extend(self._run(call)["results"])
            if on_batch is not None:
                on_batch(min(end, len(images)), len(images))
        return results

    def upload_folder(
        self,
        gallery: int | str,
        folder: str | os.PathLike[str],
        *,
        labels_from_folders: bool = True,
        batch_size: int = 32,
        on_batch: Callable[[int, int], None] | None = None,
    ) -> list[Json]:
        """Every image under `folder`, labelled by the folder that holds it."""
        found = folder_images(folder)
        labels = [label for _, label in found] if labels_from_folders else None
        paths: list[ImageInput] = [path for path, _ in found]
        return self.upload(gallery, paths, labels=labels, batch_size=batch_size, on_batch=on_batch)

    def images(
        self, gallery: int | str, *, label: str | None = None, page_size: int = 200
    ) -> Iterator[Json]:
        params = {"label": label} if label is not None else {}
        path = f"/galleries/{self.gallery_id(gallery)}/images"
        return self._pages(path, params, page_size)

    def delete_image(self, image_id: int) -> None:
        self._run(_Call("DELETE", f"/images/{image_id}"))

    # --- search ----------------------------------------------------------------------------
    def search(
        self,
        gallery: int | str,
        image: ImageInput,
        *,
        k: int = 10,
        offset: int = 0,
        labels: Sequence[str] | None = None,
        metadata: dict[str, Any] | None = None,
        min_score: float | None = None,
    ) -> Json:
        form = _search_form(k, offset, labels, metadata, min_score)
        path = f"/galleries/{self.gallery_id(gallery)}/search"
        return self._run(_Call("POST", path, data=form, files=[("image", image_part(image))]))

    def search_batch(
        self,
        gallery: int | str,
        images: Sequence[ImageInput],
        *,
        k: int = 10,
        offset: int = 0,
        labels: Sequence[str] | None = None,
        metadata: dict[str, Any] | None = None,
        min_score: float | None = None,
    ) -> Json:
        form = _search_form(k, offset, labels, metadata, min_score)
        files = [("images", image_part(image, f"query-{i}")) for i, image in enumerate(images)]
        path = f"/galleries/{self.gallery_id(gallery)}/search/batch"
        return self._run(_Call("POST", path, data=form, files=files))

    def similar(self, image_id: int, *, k: int = 10, offset: int = 0) -> Json:
        """Neighbours of an image already in a gallery (itself excluded)."""
        params = {"k": k, "offset": offset}
        return self._run(_Call("GET", f"/images/{image_id}/similar", params=params))

    def search_vector(
        self, gallery: int | str, vector: Sequence[float], *, k: int = 10, offset: int = 0
    ) -> Json:
        body = {"vector": [float(v) for v in vector], "k": k, "offset": offset}
        path = f"/galleries/{self.gallery_id(gallery)}/search/vector"
        return self._run(_Call("POST", path, json=body))

    def duplicates(self, gallery: int | str, *, threshold: float = 0.95, limit: int = 100) -> Json:
        """Groups of near-duplicate images (docs/service.md, "Near duplicates")."""
        params = {"threshold": threshold, "limit": limit}
        return self._run(_Call("GET", f"/galleries/{self.gallery_id(gallery)}/duplicates", params))

    # --- jobs ------------------------------------------------------------------------------
    def submit_job(
        self, job_type: str, params: dict[str, Any], *, idempotency_key: str | None = None
    ) -> Json:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        body = {"type": job_type, "params": params}
        return self._run(_Call("POST", "/jobs", json=body, headers=headers))

    def job(self, job_id: int) -> Json:
        return self._run(_Call("GET", f"/jobs/{job_id}"))

    def jobs(
        self, *, job_type: str | None = None, state: str | None = None, page_size: int = 100
    ) -> Iterator[Json]:
        params = {k: v for k, v in (("type", job_type), ("state", state)) if v is not None}
        return self._pages("/jobs", params, page_size)

    def cancel_job(self, job_id: int) -> Json:
        return self._run(_Call("POST", f"/jobs/{job_id}/cancel"))

    def job_log(self, job_id: int, lines: int = 200) -> str:
        return self._run(_Call("GET", f"/jobs/{job_id}/logs", params={"lines": lines}))

    def wait_job(
        self,
        job_id: int,
        *,
        timeout_s: float | None = None,
        poll_s: float = 1.0,
        on_progress: Callable[[Json], None] | None = None,
    ) -> Json:
        """Poll until the job ends; its final state. Raises `JobFailed` when it failed or was
        cancelled, TimeoutError after `timeout_s`."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            job = self.job(job_id)
            if on_progress is not None:
                on_progress(job)
            if _ended(job):
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} is still {job['state']} after {timeout_s} s")
            time.sleep(poll_s)

    # --- datasets and models ---------------------------------------------------------------
    def datasets(self) -> list[Json]:
        return self._run(_Call("GET", "/datasets"))

    def register_dataset(self, name: str, kind: str = "imagefolder", **fields: Any) -> Json:
        """A folder under the server's dataset root (`path=`), or a benchmark the server
        builds (`kind="icons"` or `"cjk"`); see docs/jobs.md, "Datasets"."""
        return self._run(_Call("POST", "/datasets", json={"name": name, "kind": kind, **fields}))

    def models(self) -> list[Json]:
        return self._run(_Call("GET", "/models"))

    def model(self, model_id: int) -> Json:
        return self._run(_Call("GET", f"/models/{model_id}"))


class AsyncClient(_Base):
    """For asyncio code: the most used part of `Client`'s API (galleries, upload, search,
    images, jobs, models) as coroutines, with the same retries and errors."""

    def __init__(
        self,
        url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 120.0,
        retries: int = 4,
        backoff_s: float = 0.5,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(url, api_key, retries, backoff_s)
        self.http = httpx.AsyncClient(
            base_url=self.url + API, headers=self._headers(), timeout=timeout, transport=transport
        )

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.http.aclose()

    async def _run(self, call: _Call) -> Json:
        attempt = 0
        while True:
            try:
                response = await self.http.request(
                    call.method, call.path, **self._request_args(call)
                )
            except httpx.TransportError:
                if (delay := self._retry_delay(call, None, attempt)) is None:
                    raise
            else:
                if (delay := self._retry_delay(call, response, attempt)) is None:
                    return self._parse(response, call)
            await asyncio.sleep(delay)
            attempt += 1

    async def galleries(self) -> list[Json]:
        return await self._run(_Call("GET", "/galleries"))

    async def create_gallery(self, name: str, *, model_id: int | None = None) -> Json:
        body: dict[str, Any] = {"name": name}
        if model_id is not None:
            body["model_id"] = model_id
        return await self._run(_Call("POST", "/galleries", json=body))

    async def upload(
        self,
        gallery_id: int,
        images: Sequence[ImageInput],
        *,
        labels: Sequence[str | None] | None = None,
        batch_size: int = 32,
    ) -> list[Json]:
        results: list[Json] = []
        for start in range(0, len(images), batch_size):
            batch_labels = None if labels is None else labels[start : start + batch_size]
            call = _upload_call(gallery_id, images[start : start + batch_size], batch_labels, None)
            results.extend((await self._run(call))["results"])
        return results

    async def search(
        self,
        gallery_id: int,
        image: ImageInput,
        *,
        k: int = 10,
        offset: int = 0,
        labels: Sequence[str] | None = None,
        metadata: dict[str, Any] | None = None,
        min_score: float | None = None,
    ) -> Json:
        form = _search_form(k, offset, labels, metadata, min_score)
        files = [("image", image_part(image))]
        return await self._run(
            _Call("POST", f"/galleries/{gallery_id}/search", data=form, files=files)
        )

    async def images(self, gallery_id: int, *, page_size: int = 200) -> AsyncIterator[Json]:
        offset: int | None = 0
        while offset is not None:
            params = {"offset": offset, "limit": page_size}
            page = await self._run(_Call("GET", f"/galleries/{gallery_id}/images", params))
            for item in page["items"]:
                yield item
            offset = _next_offset(page, offset)

    async def submit_job(self, job_type: str, params: dict[str, Any]) -> Json:
        return await self._run(_Call("POST", "/jobs", json={"type": job_type, "params": params}))

    async def job(self, job_id: int) -> Json:
        return await self._run(_Call("GET", f"/jobs/{job_id}"))

    async def wait_job(self, job_id: int, *, poll_s: float = 1.0) -> Json:
        while True:
            job = await self.job(job_id)
            if _ended(job):
                return job
            await asyncio.sleep(poll_s)

    async def models(self) -> list[Json]:
        return await self._run(_Call("GET", "/models"))


__all__ = [
    "AsyncClient",
    "Client",
    "Conflict",
    "ImageInput",
    "InvalidRequest",
    "JobFailed",
    "LookalikeError",
    "NotFound",
    "Unauthorized",
    "Unavailable",
    "folder_images",
    "image_part",
]
