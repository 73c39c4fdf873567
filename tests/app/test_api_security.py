"""API keys, upload limits and every kind of bad input: a 4xx that names the problem, and
nothing written to the database, the index or the disk."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from anyio import to_thread
from fastapi.testclient import TestClient
from PIL import Image

from app.core.config import Settings
from app.db.models import Gallery
from app.db.session import DB_POOL_EXTRA
from app.main import create_app, describe_api_key, with_api_key
from tests.app.conftest import make_client, png

API = "/api/v1"


def setup_gallery(client: TestClient, headers: dict | None = None) -> int:
    model = client.post(f"{API}/models", data={"name": "tiny", "path": "tiny"}, headers=headers)
    assert model.status_code == 201, model.text
    gallery = client.post(
        f"{API}/galleries", json={"name": "g", "model_id": model.json()["id"]}, headers=headers
    )
    return gallery.json()["id"]


def assert_nothing_stored(client: TestClient, gallery: int) -> None:
    assert client.get(f"{API}/galleries/{gallery}/images").json()["total"] == 0
    uploads = client.app.state.settings.uploads_dir
    assert not uploads.exists() or not any(p.is_file() for p in uploads.rglob("*"))
    with client.app.state.session_factory() as session:  # type: ignore[attr-defined]
        stored = session.get(Gallery, gallery)
        assert stored is not None
        indexed = client.app.state.runtime.indexes.live_count(stored)  # type: ignore[attr-defined]
    assert indexed is None or indexed == 0


@pytest.fixture
def limited(tmp_path: Path, model_root: Path) -> Iterator[tuple[TestClient, int]]:
    with make_client(
        tmp_path,
        model_root,
        max_upload_bytes=3_000,
        max_request_bytes=20_000,
        max_files_per_request=3,
        max_image_pixels=250_000,
    ) as client:
        yield client, setup_gallery(client)


def test_api_keys_guard_writes_and_optionally_reads(tmp_path: Path, model_root: Path):
    with make_client(tmp_path, model_root, api_keys=["k1", "k2"]) as client:
        missing = client.post(f"{API}/galleries", json={"name": "g", "model_id": 1})
        assert missing.status_code == 401 and "X-API-Key" in missing.json()["detail"]
        wrong = client.post(
            f"{API}/models", data={"name": "t", "path": "tiny"}, headers={"X-API-Key": "k3"}
        )
        assert wrong.status_code == 403
        gallery = setup_gallery(client, headers={"X-API-Key": "k2"})
        assert client.get(f"{API}/galleries/{gallery}").status_code == 200  # reads are open
        assert client.delete(f"{API}/galleries/{gallery}").status_code == 401
    with make_client(tmp_path, model_root, api_keys=["k1"], open_reads=False) as client:
        assert client.get(f"{API}/galleries").status_code == 401
        assert client.get(f"{API}/galleries", headers={"X-API-Key": "k1"}).status_code == 200
        assert client.get("/healthz").status_code == 200


def test_first_start_generates_a_key(tmp_path: Path, model_root: Path):
    settings = Settings(data_dir=tmp_path / "data", model_root=model_root, seed_builtin_model=False)
    with TestClient(create_app(settings)) as client:
        key = (tmp_path / "data" / "api_key").read_text().strip()
        assert len(key) >= 32
        assert client.post(f"{API}/models", data={"name": "t", "path": "tiny"}).status_code == 401
        ok = client.post(
            f"{API}/models", data={"name": "t", "path": "tiny"}, headers={"X-API-Key": key}
        )
        assert ok.status_code == 201
    with TestClient(create_app(settings)) as client:  # the same key on the next start
        assert client.app.state.settings.api_keys == [key]


def test_a_generated_key_is_printed_once_and_an_operators_key_never(
    tmp_path: Path, model_root: Path, caplog: pytest.LogCaptureFixture
):
    settings = Settings(data_dir=tmp_path / "data", model_root=model_root, seed_builtin_model=False)
    with caplog.at_level(logging.INFO), TestClient(create_app(settings)):
        pass
    key = (tmp_path / "data" / "api_key").read_text().strip()
    assert sum(key in record.getMessage() for record in caplog.records) == 1
    caplog.clear()
    with caplog.at_level(logging.INFO), TestClient(create_app(settings)):
        pass
    assert not any(key in record.getMessage() for record in caplog.records)
    assert key not in describe_api_key(with_api_key(settings), created=None)
    assert key in describe_api_key(with_api_key(settings), created=key)
    operator = Settings(
        data_dir=tmp_path / "other", model_root=model_root, api_keys=["operator-secret"]
    )
    caplog.clear()
    with caplog.at_level(logging.INFO), TestClient(create_app(operator)):
        pass
    assert not any("operator-secret" in record.getMessage() for record in caplog.records)
    assert "operator-secret" not in describe_api_key(operator, created=None)
    assert not (tmp_path / "other" / "api_key").exists()


def test_oversized_uploads_get_413_and_store_nothing(limited):
    client, gallery = limited
    url = f"{API}/galleries/{gallery}/images"
    big = bytes(5_000)  # over the per-file limit, under the request limit
    response = client.post(
        url,
        files=[
            ("files", ("a.png", png(0, 0), "image/png")),
            ("files", ("big.png", big, "image/png")),
        ],
    )
    assert response.status_code == 413 and "per-file limit" in response.json()["detail"]
    assert_nothing_stored(client, gallery)

    huge = bytes(25_000)  # Content-Length over the request limit: refused before reading
    response = client.post(url, files=[("files", ("huge.png", huge, "image/png"))])
    assert response.status_code == 413 and "request body" in response.json()["detail"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted while streaming
        yield b'--xyz\r\nContent-Disposition: form-data; name="files"; filename="a.png"\r\n\r\n'
        for _ in range(30):
            yield bytes(1_000)

    streamed = client.post(
        url, content=chunks(), headers={"Content-Type": "multipart/form-data; boundary=xyz"}
    )
    assert streamed.status_code == 413
    assert_nothing_stored(client, gallery)

    files = [("files", (f"{i}.png", png(i, 0), "image/png")) for i in range(4)]
    too_many = client.post(url, files=files)
    assert too_many.status_code == 413 and "at most 3" in too_many.json()["detail"]
    assert_nothing_stored(client, gallery)


def encode(image: Image.Image, fmt: str) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt)
    return out.getvalue()


def test_bad_files_are_rejected_with_a_reason(limited):
    client, gallery = limited
    url = f"{API}/galleries/{gallery}/images"
    jpeg = png(0, 0, "JPEG")
    bomb = encode(Image.new("1", (600, 600)), "PNG")  # 360 k pixels > the 250 k cap, tiny file
    cases = {
        "empty": (b"", 400, "empty"),
        "text": (b"hello, world", 415, "not a recognised image"),
        "pdf": (b"%PDF-1.4\n%...", 415, "PDF"),
        "svg": (b'<svg xmlns="http://www.w3.org/2000/svg"/>', 415, "SVG"),
        "truncated": (jpeg[: len(jpeg) // 2], 400, "corrupt"),
        "bomb": (bomb, 413, "decompression bomb"),
    }
    for name, (data, status, message) in cases.items():
        response = client.post(url, files=[("files", (f"{name}.png", data, "image/png"))])
        assert response.status_code == status, (name, response.text)
        result = response.json()["results"][0]
        assert result["status"] == "rejected" and message in result["error"], name
    assert_nothing_stored(client, gallery)

    # One bad file (or bad metadata) does not reject the others.
    mixed = client.post(
        url,
        files=[
            ("files", ("a.png", png(1, 0), "image/png")),
            ("files", ("b.png", png(2, 0), "image/png")),
        ],
        data={"metadata": ['{"ok": 1}', "[1, 2]"]},
    )
    assert mixed.status_code == 207
    first, second = mixed.json()["results"]
    assert first["status"] == "created" and first["image"]["metadata"] == {"ok": 1}
    assert second["status"] == "rejected" and "JSON object" in second["error"]
    mismatch = client.post(
        url, files=[("files", ("c.png", png(3, 0), "image/png"))], data={"label": ["a", "b"]}
    )
    assert mismatch.status_code == 422 and "one per file" in mismatch.json()["detail"]


def test_bad_search_requests(limited):
    client, gallery = limited
    client.post(
        f"{API}/galleries/{gallery}/images", files=[("files", ("a.png", png(0, 0), "image/png"))]
    )
    url = f"{API}/galleries/{gallery}/search"
    query = {"image": ("q.png", png(0, 0), "image/png")}

    def detail(response, status: int) -> str:
        assert response.status_code == status, response.text
        assert isinstance(response.json()["detail"], str)
        return response.json()["detail"]

    assert "k" in detail(client.post(url, files=query, data={"k": "0"}), 422)
    assert "above the limit" in detail(
        client.post(url, files=query, data={"k": "999", "offset": "2"}), 422
    )
    assert "JSON" in detail(client.post(url, files=query, data={"metadata": "{oops"}), 422)
    assert "metadata keys" in detail(
        client.post(url, files=query, data={"metadata": '{"a b": 1}'}), 422
    )
    assert "not a recognised image" in detail(
        client.post(url, files={"image": ("q.png", b"nope")}), 415
    )
    assert "image" in detail(client.post(url, data={"k": "3"}), 422)
    assert "gallery 999 does not exist" in detail(
        client.post(f"{API}/galleries/999/search", files=query), 404
    )
    zero = client.post(f"{url}/vector", json={"vector": [0.0] * 16})
    assert "not all zero" in detail(zero, 422)
    extra = client.post(f"{url}/vector", json={"vector": [1.0] * 16, "colour": "red"})
    assert "colour" in detail(extra, 422)
    assert "image 999 does not exist" in detail(client.get(f"{API}/images/999/similar"), 404)
    no_labels = client.post(
        f"{API}/galleries/{gallery}/classify", files={"images": ("q.png", png(0, 0))}
    )
    assert "no labelled images" in detail(no_labels, 422)
    assert json.loads(client.get("/readyz").text)["status"] == "ready"


def test_values_the_database_cannot_hold_get_4xx(client: TestClient, gallery: int):
    """Ids and offsets beyond the integer columns, and NUL characters (PostgreSQL refuses them
    in text), are refused with a 4xx, on both databases, and store nothing."""
    huge = 2**63
    for url in (
        f"{API}/images/{2**31}",
        f"{API}/images/{huge}",
        f"{API}/images/{huge}/similar",
        f"{API}/galleries/{huge}",
        f"{API}/models/{huge}",
        f"{API}/jobs/{huge}",
        f"{API}/datasets/{huge}",
        f"{API}/reports/models/{huge}",
        f"{API}/galleries/{gallery}/images?offset={huge}",
        f"{API}/jobs?offset={huge}",
    ):
        response = client.get(url)
        assert response.status_code == 422 and "less than or equal" in response.text, url

    picture = ("files", ("a.png", png(0, 0), "image/png"))
    for field in ("label", "external_id"):
        rejected = client.post(
            f"{API}/galleries/{gallery}/images", files=[picture], data={field: "a\x00b"}
        )
        assert rejected.status_code == 422, rejected.text
        assert f"form field {field}: " in rejected.json()["detail"]
        assert "contains a NUL character" in rejected.json()["detail"]
    assert_nothing_stored(client, gallery)
    for response in (
        client.post(f"{API}/galleries", json={"name": "a\x00b"}),
        client.get(f"{API}/galleries/{gallery}/images", params={"label": "a\x00"}),
    ):
        assert response.status_code == 422 and "NUL character" in response.text, response.text
    assert len(client.get(f"{API}/galleries").json()) == 1


def test_nul_characters_are_refused_in_every_stored_text_on_both_databases(
    client: TestClient, gallery: int
):
    """One rule for both databases: a NUL in metadata (keys or values, at any depth), labels,
    names or filters is a 422 before anything is stored, so no row can exist that PostgreSQL
    would refuse and later metadata-filtered searches keep working."""
    picture = ("files", ("a.png", png(0, 0), "image/png"))
    for metadata in ('{"note": "a\\u0000b"}', '{"deep": {"list": ["ok", "a\\u0000"]}}'):
        rejected = client.post(
            f"{API}/galleries/{gallery}/images", files=[picture], data={"metadata": metadata}
        )
        assert rejected.status_code == 422, rejected.text
        assert "NUL character" in rejected.text
    assert_nothing_stored(client, gallery)
    stored = client.post(
        f"{API}/galleries/{gallery}/images", files=[picture], data={"metadata": '{"note": "a"}'}
    )
    assert stored.status_code == 201, stored.text
    vector = [0.25] * 16
    for body in ({"metadata": {"note": "a\x00b"}}, {"labels": ["a\x00"]}):
        query = client.post(
            f"{API}/galleries/{gallery}/search/vector", json={"vector": vector, **body}
        )
        assert query.status_code == 422 and "NUL" in query.text, query.text
    search = client.post(
        f"{API}/galleries/{gallery}/search",
        files={"image": ("q.png", png(0, 0))},
        data={"metadata": '{"note": "a"}'},
    )
    assert search.status_code == 200 and search.json()["results"], search.text


def test_integers_beyond_64_bits_and_non_finite_numbers_get_422(client: TestClient, gallery: int):
    """SQLite's integers are 64-bit: a larger one in a body or in metadata overflowed its
    driver (500); every route now answers 422 on both databases."""
    huge = 2**70
    created = client.post(f"{API}/galleries", json={"name": "big", "model_id": huge})
    assert created.status_code == 422, created.text
    picture = ("files", ("a.png", png(0, 0), "image/png"))
    for metadata in (f'{{"n": {huge}}}', f'{{"n": [-{huge}]}}', '{"n": NaN}', '{"n": Infinity}'):
        upload = client.post(
            f"{API}/galleries/{gallery}/images", files=[picture], data={"metadata": metadata}
        )
        assert upload.status_code == 422, (metadata, upload.text)
        search = client.post(
            f"{API}/galleries/{gallery}/search",
            files={"image": ("q.png", png(0, 0))},
            data={"metadata": metadata},
        )
        assert search.status_code == 422, (metadata, search.text)
    body = client.post(
        f"{API}/jobs",
        content=f'{{"type": "index", "params": {{"gallery_id": {gallery}, "model_id": {huge}}}}}',
        headers={"content-type": "application/json"},
    )
    assert body.status_code == 422 and "64-bit" in body.text, body.text
    edge = client.post(
        f"{API}/galleries/{gallery}/images",
        files=[picture],
        data={"metadata": f'{{"n": {2**63 - 1}, "m": {-(2**63)}}}'},
    )
    assert edge.status_code == 201, edge.text
    assert client.get(f"{API}/galleries/{gallery}/images").json()["total"] == 1


def test_readiness_waits_for_start_up(tmp_path: Path, model_root: Path):
    client = make_client(tmp_path, model_root)
    assert client.get("/readyz").status_code == 503  # lifespan not run: nothing loaded yet
    assert client.get("/healthz").json() == {"status": "ok"}
    with client:
        ready = client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["database"] == "ok"


def test_the_key_is_checked_before_any_of_the_body_is_read(tmp_path: Path, model_root: Path):
    """A write without a valid key is refused from its headers: the server never receives
    the body (it could be up to MAX_REQUEST_BYTES)."""
    with make_client(tmp_path, model_root, api_keys=["k1"], open_reads=False) as client:
        gallery = setup_gallery(client, headers={"X-API-Key": "k1"})

        def send_to_app(path: str, headers: list[tuple[bytes, bytes]]) -> tuple[int, int]:
            received = 0
            statuses: list[int] = []

            async def receive() -> dict:
                nonlocal received
                received += 1
                return {"type": "http.request", "body": b"x" * 65536, "more_body": True}

            async def send(message: dict) -> None:
                if message["type"] == "http.response.start":
                    statuses.append(message["status"])

            boundary = b"multipart/form-data; boundary=b"
            scope = {
                "type": "http",
                "asgi": {"version": "3.0"},
                "http_version": "1.1",
                "method": "POST",
                "scheme": "http",
                "path": path,
                "raw_path": path.encode(),
                "query_string": b"",
                "root_path": "",
                "headers": [(b"content-type", boundary), *headers],
                "client": ("127.0.0.1", 1),
                "server": ("testserver", 80),
            }
            client.portal.call(client.app, scope, receive, send)
            return statuses[0], received

        upload = f"{API}/galleries/{gallery}/images"
        assert send_to_app(upload, []) == (401, 0)
        assert send_to_app(upload, [(b"x-api-key", b"wrong")]) == (403, 0)
        # A read route with closed reads is checked the same way.
        assert send_to_app(f"{API}/galleries/{gallery}/search", []) == (401, 0)
    with make_client(tmp_path, model_root, api_keys=["k1"]) as client:
        response = client.post(
            f"{API}/galleries/{gallery}/search", files={"image": ("q.png", png(0, 0))}
        )
        assert response.status_code == 200  # open reads need no key


def test_metrics_follow_closed_reads_and_data_files_are_owner_only(
    tmp_path: Path, model_root: Path
):
    with make_client(tmp_path, model_root, api_keys=["k1"], open_reads=False) as client:
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", headers={"X-API-Key": "k1"}).status_code == 200
        gallery = setup_gallery(client, headers={"X-API-Key": "k1"})
        upload = client.post(
            f"{API}/galleries/{gallery}/images",
            files=[("files", ("a.png", png(0, 0)))],
            headers={"X-API-Key": "k1"},
        )
        assert upload.status_code == 201
    data = tmp_path / "data"
    created = [p for p in data.rglob("*")]
    assert any(p.suffix == ".png" for p in created) and any(p.name.endswith(".db") for p in created)
    loose = [f"{p} {oct(p.stat().st_mode & 0o777)}" for p in created if p.stat().st_mode & 0o077]
    assert loose == []
    with make_client(
        tmp_path, model_root, api_keys=["k1"], open_reads=False, open_metrics=True
    ) as c:
        assert c.get("/metrics").status_code == 200


def test_every_answer_says_nosniff_and_the_web_ui_has_a_content_security_policy(
    client: TestClient,
):
    api = client.get(f"{API}/galleries")
    assert api.headers["x-content-type-options"] == "nosniff"
    assert "content-security-policy" not in api.headers
    page = client.get("/ui/")
    assert page.headers["x-content-type-options"] == "nosniff"
    policy = page.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "frame-ancestors 'none'" in policy
    assert "unsafe-inline" not in policy
    assert client.get("/ui/static/js/app.js").headers["content-security-policy"] == policy


def test_a_database_pool_timeout_is_a_503_with_retry_after_not_a_500(
    tmp_path: Path, model_root: Path
):
    """The pool holds one connection per request thread (plus a few); should it still run dry,
    the request answers 503 with Retry-After once `db_pool_timeout_s` has passed."""
    with make_client(tmp_path, model_root, request_threads=3, db_pool_timeout_s=0.3) as client:
        engine = client.app.state.engine
        assert engine.pool.size() == 3
        limiter = client.portal.call(to_thread.current_default_thread_limiter)
        assert limiter.total_tokens == 3
        held = [engine.connect() for _ in range(3 + DB_POOL_EXTRA)]
        try:
            busy = client.get(f"{API}/galleries")
        finally:
            for connection in held:
                connection.close()
        assert busy.status_code == 503 and busy.headers["retry-after"].isdigit(), busy.text
        assert "busy" in busy.json()["detail"]
        assert client.get(f"{API}/galleries").status_code == 200


def test_bodies_fastapi_reads_as_json_obey_the_input_rules_and_nothing_answers_500(
    client: TestClient, gallery: int
):
    """Every JSON media type FastAPI parses (`application/*+json`, any case) is checked; a body
    nested thousands deep is refused, not a 500; a header declaring a Pillow-sized bomb is a
    413 before anything is decoded."""
    from tests.app.test_imaging import png_header_only

    vector = ",".join(["0.25"] * 16)
    for content_type in ("Application/JSON", "application/merge-patch+json"):
        body = f'{{"vector": [{vector}], "metadata": {{"a": {10**23}}}}}'
        response = client.post(
            f"{API}/galleries/{gallery}/search/vector",
            content=body,
            headers={"content-type": content_type},
        )
        assert response.status_code == 422 and "64-bit" in response.text, response.text
    deep = "[" * 5000 + "]" * 5000
    for method, url in (("GET", f"{API}/models"), ("POST", f"{API}/galleries")):
        response = client.request(
            method, url, content=deep, headers={"content-type": "application/json"}
        )
        assert response.status_code < 500, (url, response.status_code)
    bomb = png_header_only(20_000, 20_000)  # 400 M pixels: beyond Pillow's own limit
    search = client.post(f"{API}/galleries/{gallery}/search", files={"image": ("b.png", bomb)})
    assert search.status_code == 413, search.text


def test_the_key_is_checked_before_the_body_behind_a_root_path(tmp_path: Path, model_root: Path):
    """Behind a proxy mount (`uvicorn --root-path /lookalike`), paths arrive prefixed: the
    early key check still matches the route."""
    from app.api.route_guard import route_path

    assert route_path({"path": "/lookalike/api/v1/jobs", "root_path": "/lookalike"}) == (
        "/api/v1/jobs"
    )
    assert route_path({"path": "/api/v1/jobs", "root_path": ""}) == "/api/v1/jobs"
    settings = Settings(
        data_dir=tmp_path / "data", model_root=model_root, seed_builtin_model=False, api_keys=["k"]
    )
    with TestClient(create_app(settings), root_path="/lookalike") as client:
        refused = client.post("/api/v1/galleries", json={"name": "g"})
        assert refused.status_code == 401
        assert client.put("/api/v1/galleries").headers["allow"] == "GET, POST"
