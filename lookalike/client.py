"""A typed Python client for a lookalike server: galleries, uploads, search, jobs and models.

    from lookalike.client import Client

    with Client("http://127.0.0.1:8000", api_key="...") as client:   # or LOOKALIKE_URL/_API_KEY
        gallery = client.create_gallery("shoes")
        client.upload_folder(gallery["id"], "photos/")            # labels from folder names
        hits = client.search(gallery["id"], "query.jpg", k=5)["results"]
        job = client.wait_job(client.submit_job("index", {"gallery_id": 1, "model_id": 2})["id"])

`AsyncClient` has the same methods as coroutines (async iterators for paged lists). Both
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


def _upload_calls(
    gallery_id: int,
    images: Sequence[ImageInput],
    labels: Sequence[str | None] | None,
    metadata: Sequence[dict[str, Any] | None] | None,
    batch_size: int,
) -> Iterator[tuple[_Call, int]]:
    """One upload request per batch, and how many images are sent once it is done."""
    for start in range(0, len(images), batch_size):
        end = min(start + batch_size, len(images))
        files = [
            ("files", image_part(image, f"image-{i}"))
            for i, image in enumerate(images[start:end], start)
        ]
        data: dict[str, Any] = {}
        batch_labels = None if labels is None else labels[start:end]
        batch_metadata = None if metadata is None else metadata[start:end]
        if batch_labels is not None and any(label is not None for label in batch_labels):
            data["label"] = [label or "" for label in batch_labels]
        if batch_metadata is not None and any(m for m in batch_metadata):
            data["metadata"] = [json.dumps(m or {}) for m in batch_metadata]
        path = f"/galleries/{gallery_id}/images"
        yield _Call("POST", path, data=data, files=files, per_file_results=True), end


def _folder_upload(
    folder: str | os.PathLike[str], labels_from_folders: bool
) -> tuple[list[ImageInput], list[str | None] | None]:
    found = folder_images(folder)
    labels = [label for _, label in found] if labels_from_folders else None
    return [path for path, _ in found], labels


def _is_name(gallery: int | str) -> bool:
    return not (isinstance(gallery, int) or str(gallery).isdigit())


def _gallery_id(gallery: int | str, galleries: list[Json]) -> int:
    """A gallery's id from its id or its name (looked up in `galleries`)."""
    if not _is_name(gallery):
        return int(gallery)
    for item in galleries:
        if item["name"] == gallery:
            return int(item["id"])
    raise NotFound(404, f"no gallery is named {gallery!r}")


def _create_gallery_call(
    name: str, model_id: int | None, index_type: str, index_params: dict[str, Any] | None
) -> _Call:
    body: dict[str, Any] = {
        "name": name,
        "index_type": index_type,
        "index_params": index_params or {},
    }
    if model_id is not None:
        body["model_id"] = model_id
    return _Call("POST", "/galleries", json=body)


def _search_call(
    gallery_id: int, images: Sequence[ImageInput], form: dict[str, Any], *, batch: bool = False
) -> _Call:
    if batch:
        files = [("images", image_part(image, f"query-{i}")) for i, image in enumerate(images)]
        return _Call("POST", f"/galleries/{gallery_id}/search/batch", data=form, files=files)
    files = [("image", image_part(images[0]))]
    return _Call("POST", f"/galleries/{gallery_id}/search", data=form, files=files)


def _vector_call(gallery_id: int, vector: Sequence[float], k: int, offset: int) -> _Call:
    body = {"vector": [float(v) for v in vector], "k": k, "offset": offset}
    return _Call("POST", f"/galleries/{gallery_id}/search/vector", json=body)


def _job_call(job_type: str, params: dict[str, Any], idempotency_key: str | None) -> _Call:
    headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
    return _Call("POST", "/jobs", json={"type": job_type, "params": params}, headers=headers)


def _cluster_params(gallery_id: int, method: str, k: int | None, k_max: int) -> dict[str, Any]:
    params: dict[str, Any] = {"gallery_id": gallery_id, "method": method, "k_max": k_max}
    if k is not None:
        params["k"] = k
    return params


def _check_deadline(job: Json, deadline: float | None, timeout_s: float | None) -> None:
    if deadline is not None and time.monotonic() > deadline:
        raise TimeoutError(f"job {job['id']} is still {job['state']} after {timeout_s} s")


def _artifact_call(name: str, artifact: str | os.PathLike[str]) -> _Call:
    folder = Path(artifact)
    files = [
        ("card", ("card.json", (folder / "card.json").read_bytes(), "application/json")),
        (
            "weights",
            (
                "model.safetensors",
                (folder / "model.safetensors").read_bytes(),
                "application/octet-stream",
            ),
        ),
    ]
    return _Call("POST", "/models", data={"name": name}, files=files)


def _pretrained_call(
    name: str, backbone: str, weights: str | os.PathLike[str] | None, image_size: int | None
) -> _Call:
    data: dict[str, Any] = {"name": name, "backbone": backbone}
    if image_size is not None:
        data["image_size"] = str(image_size)
    files = None
    if weights is not None:
        file = Path(weights)
        files = [("weights", (file.name, file.read_bytes(), "application/octet-stream"))]
    return _Call("POST", "/models", data=data, files=files)


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
        return _gallery_id(gallery, self.galleries() if _is_name(gallery) else [])

    def create_gallery(
        self,
        name: str,
        *,
        model_id: int | None = None,
        index_type: str = "flat",
        index_params: dict[str, Any] | None = None,
    ) -> Json:
        return self._run(_create_gallery_call(name, model_id, index_type, index_params))

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
        for call, done in _upload_calls(gallery_id, images, labels, metadata, batch_size):
            results.extend(self._run(call)["results"])
            if on_batch is not None:
                on_batch(done, len(images))
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
        paths, labels = _folder_upload(folder, labels_from_folders)
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
        return self._run(_search_call(self.gallery_id(gallery), [image], form))

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
        return self._run(_search_call(self.gallery_id(gallery), images, form, batch=True))

    def similar(self, image_id: int, *, k: int = 10, offset: int = 0) -> Json:
        """Neighbours of an image already in a gallery (itself excluded)."""
        params = {"k": k, "offset": offset}
        return self._run(_Call("GET", f"/images/{image_id}/similar", params=params))

    def search_vector(
        self, gallery: int | str, vector: Sequence[float], *, k: int = 10, offset: int = 0
    ) -> Json:
        return self._run(_vector_call(self.gallery_id(gallery), vector, k, offset))

    def duplicates(self, gallery: int | str, *, threshold: float = 0.95, limit: int = 100) -> Json:
        """Groups of near-duplicate images (docs/service.md, "Near duplicates")."""
        params = {"threshold": threshold, "limit": limit}
        return self._run(_Call("GET", f"/galleries/{self.gallery_id(gallery)}/duplicates", params))

    # --- clusters --------------------------------------------------------------------------
    def cluster(
        self,
        gallery: int | str,
        *,
        method: str = "kmeans",
        k: int | None = None,
        k_max: int = 50,
        timeout_s: float | None = None,
    ) -> Json:
        """Run a `cluster` job (k chosen by silhouette up to `k_max` unless given), wait for it
        and return the clustering with its first clusters."""
        params = _cluster_params(self.gallery_id(gallery), method, k, k_max)
        job = self.wait_job(self.submit_job("cluster", params)["id"], timeout_s=timeout_s)
        return self.clustering(job["result"]["clustering_id"])

    def clusterings(self, gallery: int | str) -> list[Json]:
        return self._run(_Call("GET", f"/galleries/{self.gallery_id(gallery)}/clusterings"))

    def clustering(
        self, clustering_id: int, *, examples: int = 8, offset: int = 0, limit: int = 50
    ) -> Json:
        params = {"examples": examples, "offset": offset, "limit": limit}
        return self._run(_Call("GET", f"/clusterings/{clustering_id}", params))

    def cluster_images(
        self, clustering_id: int, cluster: int, *, page_size: int = 200
    ) -> Iterator[Json]:
        return self._pages(f"/clusterings/{clustering_id}/clusters/{cluster}/images", {}, page_size)

    def delete_clustering(self, clustering_id: int) -> None:
        self._run(_Call("DELETE", f"/clusterings/{clustering_id}"))

    # --- jobs ------------------------------------------------------------------------------
    def submit_job(
        self, job_type: str, params: dict[str, Any], *, idempotency_key: str | None = None
    ) -> Json:
        return self._run(_job_call(job_type, params, idempotency_key))

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
            _check_deadline(job, deadline, timeout_s)
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

    def register_model(self, name: str, artifact: str | os.PathLike[str]) -> Json:
        """Upload a model artifact directory (what `lookalike train`/`pretrained` write)."""
        return self._run(_artifact_call(name, artifact))

    def register_pretrained(
        self,
        name: str,
        backbone: str,
        *,
        weights: str | os.PathLike[str] | None = None,
        image_size: int | None = None,
    ) -> Json:
        """A model the server builds from a pretrained backbone (`lookalike pretrained` there):
        a built-in (efficientnet_lite0/1/2, resnet18/50) or any timm model, with its weights
        from a local file (`weights`), else its own (a timm model's: the hub, online only)."""
        return self._run(_pretrained_call(name, backbone, weights, image_size))


class AsyncClient(_Base):
    """For asyncio code: `Client`'s API as coroutines (paged lists as async iterators), with
    the same retries and errors."""

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

    async def _pages(
        self, path: str, params: dict[str, Any], page_size: int
    ) -> AsyncIterator[Json]:
        offset: int | None = 0
        while offset is not None:
            call = _Call("GET", path, {**params, "offset": offset, "limit": page_size})
            page = await self._run(call)
            for item in page["items"]:
                yield item
            offset = _next_offset(page, offset)

    # --- galleries -------------------------------------------------------------------------
    async def galleries(self) -> list[Json]:
        return await self._run(_Call("GET", "/galleries"))

    async def gallery(self, gallery: int | str) -> Json:
        return await self._run(_Call("GET", f"/galleries/{await self.gallery_id(gallery)}"))

    async def gallery_id(self, gallery: int | str) -> int:
        return _gallery_id(gallery, await self.galleries() if _is_name(gallery) else [])

    async def create_gallery(
        self,
        name: str,
        *,
        model_id: int | None = None,
        index_type: str = "flat",
        index_params: dict[str, Any] | None = None,
    ) -> Json:
        return await self._run(_create_gallery_call(name, model_id, index_type, index_params))

    async def delete_gallery(self, gallery: int | str) -> None:
        await self._run(_Call("DELETE", f"/galleries/{await self.gallery_id(gallery)}"))

    # --- images ----------------------------------------------------------------------------
    async def upload(
        self,
        gallery: int | str,
        images: Sequence[ImageInput],
        *,
        labels: Sequence[str | None] | None = None,
        metadata: Sequence[dict[str, Any] | None] | None = None,
        batch_size: int = 32,
        on_batch: Callable[[int, int], None] | None = None,
    ) -> list[Json]:
        gallery_id = await self.gallery_id(gallery)
        results: list[Json] = []
        for call, done in _upload_calls(gallery_id, images, labels, metadata, batch_size):
            results.extend((await self._run(call))["results"])
            if on_batch is not None:
                on_batch(done, len(images))
        return results

    async def upload_folder(
        self,
        gallery: int | str,
        folder: str | os.PathLike[str],
        *,
        labels_from_folders: bool = True,
        batch_size: int = 32,
        on_batch: Callable[[int, int], None] | None = None,
    ) -> list[Json]:
        paths, labels = _folder_upload(folder, labels_from_folders)
        return await self.upload(
            gallery, paths, labels=labels, batch_size=batch_size, on_batch=on_batch
        )

    async def images(
        self, gallery: int | str, *, label: str | None = None, page_size: int = 200
    ) -> AsyncIterator[Json]:
        params = {"label": label} if label is not None else {}
        path = f"/galleries/{await self.gallery_id(gallery)}/images"
        async for item in self._pages(path, params, page_size):
            yield item

    async def delete_image(self, image_id: int) -> None:
        await self._run(_Call("DELETE", f"/images/{image_id}"))

    # --- search ----------------------------------------------------------------------------
    async def search(
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
        return await self._run(_search_call(await self.gallery_id(gallery), [image], form))

    async def search_batch(
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
        call = _search_call(await self.gallery_id(gallery), images, form, batch=True)
        return await self._run(call)

    async def similar(self, image_id: int, *, k: int = 10, offset: int = 0) -> Json:
        params = {"k": k, "offset": offset}
        return await self._run(_Call("GET", f"/images/{image_id}/similar", params=params))

    async def search_vector(
        self, gallery: int | str, vector: Sequence[float], *, k: int = 10, offset: int = 0
    ) -> Json:
        return await self._run(_vector_call(await self.gallery_id(gallery), vector, k, offset))

    async def duplicates(
        self, gallery: int | str, *, threshold: float = 0.95, limit: int = 100
    ) -> Json:
        params = {"threshold": threshold, "limit": limit}
        path = f"/galleries/{await self.gallery_id(gallery)}/duplicates"
        return await self._run(_Call("GET", path, params))

    # --- clusters --------------------------------------------------------------------------
    async def cluster(
        self,
        gallery: int | str,
        *,
        method: str = "kmeans",
        k: int | None = None,
        k_max: int = 50,
        timeout_s: float | None = None,
    ) -> Json:
        params = _cluster_params(await self.gallery_id(gallery), method, k, k_max)
        submitted = await self.submit_job("cluster", params)
        job = await self.wait_job(submitted["id"], timeout_s=timeout_s)
        return await self.clustering(job["result"]["clustering_id"])

    async def clusterings(self, gallery: int | str) -> list[Json]:
        path = f"/galleries/{await self.gallery_id(gallery)}/clusterings"
        return await self._run(_Call("GET", path))

    async def clustering(
        self, clustering_id: int, *, examples: int = 8, offset: int = 0, limit: int = 50
    ) -> Json:
        params = {"examples": examples, "offset": offset, "limit": limit}
        return await self._run(_Call("GET", f"/clusterings/{clustering_id}", params))

    async def cluster_images(
        self, clustering_id: int, cluster: int, *, page_size: int = 200
    ) -> AsyncIterator[Json]:
        path = f"/clusterings/{clustering_id}/clusters/{cluster}/images"
        async for item in self._pages(path, {}, page_size):
            yield item

    async def delete_clustering(self, clustering_id: int) -> None:
        await self._run(_Call("DELETE", f"/clusterings/{clustering_id}"))

    # --- jobs ------------------------------------------------------------------------------
    async def submit_job(
        self, job_type: str, params: dict[str, Any], *, idempotency_key: str | None = None
    ) -> Json:
        return await self._run(_job_call(job_type, params, idempotency_key))

    async def job(self, job_id: int) -> Json:
        return await self._run(_Call("GET", f"/jobs/{job_id}"))

    async def jobs(
        self, *, job_type: str | None = None, state: str | None = None, page_size: int = 100
    ) -> AsyncIterator[Json]:
        params = {k: v for k, v in (("type", job_type), ("state", state)) if v is not None}
        async for item in self._pages("/jobs", params, page_size):
            yield item

    async def cancel_job(self, job_id: int) -> Json:
        return await self._run(_Call("POST", f"/jobs/{job_id}/cancel"))

    async def job_log(self, job_id: int, lines: int = 200) -> str:
        return await self._run(_Call("GET", f"/jobs/{job_id}/logs", params={"lines": lines}))

    async def wait_job(
        self,
        job_id: int,
        *,
        timeout_s: float | None = None,
        poll_s: float = 1.0,
        on_progress: Callable[[Json], None] | None = None,
    ) -> Json:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            job = await self.job(job_id)
            if on_progress is not None:
                on_progress(job)
            if _ended(job):
                return job
            _check_deadline(job, deadline, timeout_s)
            await asyncio.sleep(poll_s)

    # --- datasets and models ---------------------------------------------------------------
    async def datasets(self) -> list[Json]:
        return await self._run(_Call("GET", "/datasets"))

    async def register_dataset(self, name: str, kind: str = "imagefolder", **fields: Any) -> Json:
        body = {"name": name, "kind": kind, **fields}
        return await self._run(_Call("POST", "/datasets", json=body))

    async def models(self) -> list[Json]:
        return await self._run(_Call("GET", "/models"))

    async def model(self, model_id: int) -> Json:
        return await self._run(_Call("GET", f"/models/{model_id}"))

    async def register_model(self, name: str, artifact: str | os.PathLike[str]) -> Json:
        return await self._run(_artifact_call(name, artifact))

    async def register_pretrained(
        self,
        name: str,
        backbone: str,
        *,
        weights: str | os.PathLike[str] | None = None,
        image_size: int | None = None,
    ) -> Json:
        return await self._run(_pretrained_call(name, backbone, weights, image_size))


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
