"""Memory bounds (docs/service.md, "Memory bounds"): no request, and no mix of concurrent
requests, can make the API decode more than its decode budget at once."""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from tests.app.conftest import make_client, png

API = "/api/v1"
# The bound docs/service.md states for the default decode budget (40 M pixels): decoding costs
# at most about 6 bytes per budgeted pixel (a 40 MP 16-bit or RGBA PNG: 160 MB decoded plus
# the conversion), plus the request bodies and the model's input tensors.
PEAK_RSS_BOUND_MB = 400
HUGE = (7000, 5700)  # 39.9 M pixels: just under the default max_image_pixels


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise LookupError(field)


def _reset_peak_rss() -> bool:
    """Set this process's peak RSS (VmHWM) to its current RSS (Linux `clear_refs`, value 5)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _huge_png(mode: str) -> bytes:
    """A 40-megapixel PNG that compresses to a few tens of kilobytes."""
    out = io.BytesIO()
    Image.new(mode, HUGE).save(out, "PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def huge_pngs() -> dict[str, bytes]:
    return {mode: _huge_png(mode) for mode in ("L", "RGBA", "P")}


def test_the_worst_concurrent_requests_stay_within_the_documented_peak_rss(
    tmp_path: Path, model_root: Path, huge_pngs: dict[str, bytes]
):
    """Unauthenticated batch searches of 40 MP PNGs (about 50 KB each) and first views of a
    40 MP image's thumbnail, all at once: decoding is reduced and shares one budget, so the
    process's peak RSS grows by less than the documented bound (it grew by gigabytes before)."""
    with make_client(tmp_path, model_root, embed_max_wait_ms=1.0, threads=1) as client:
        settings = client.app.state.settings
        model = client.post(f"{API}/models", data={"name": "tiny", "path": "tiny"}).json()["id"]
        gallery = client.post(f"{API}/galleries", json={"name": "g", "model_id": model}).json()
        small = client.post(
            f"{API}/galleries/{gallery['id']}/images", files=[("files", ("s.png", png(0, 0)))]
        )
        assert small.status_code == 201, small.text
        stored = []
        for mode in ("RGBA", "L"):
            upload = client.post(
                f"{API}/galleries/{gallery['id']}/images",
                files=[("files", (f"{mode}.png", huge_pngs[mode]))],
            )
            assert upload.status_code == 201, upload.text
            image = upload.json()["results"][0]["image"]
            assert (image["width"], image["height"]) == HUGE  # the file's size, not the decode's
            stored.append(image)
        if not _reset_peak_rss():
            pytest.skip("this kernel does not let a process reset its peak RSS")
        before_kib = _status_kib("VmRSS")

        def batch_search(_: int):
            files = [("images", (f"{m}.png", huge_pngs[m])) for m in ("L", "RGBA", "P", "RGBA")]
            return client.post(f"{API}/galleries/{gallery['id']}/search/batch", files=files)

        def first_thumbnail_view(index: int):
            return client.get(stored[index % 2]["thumbnail_url"])

        with ThreadPoolExecutor(8) as pool:
            searches = [pool.submit(batch_search, i) for i in range(4)]
            thumbnails = [pool.submit(first_thumbnail_view, i) for i in range(4)]
            responses = [f.result() for f in searches + thumbnails]
        grown_mb = (_status_kib("VmHWM") - before_kib) / 1024
        assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
        assert all(len(r.json()["queries"]) == 4 for r in responses[:4])
        for response in responses[4:]:
            thumb = Image.open(io.BytesIO(response.content))
            assert thumb.format == "JPEG" and max(thumb.size) == settings.thumbnail_size
        print(f"peak RSS grew by {grown_mb:.0f} MB")
        assert grown_mb < PEAK_RSS_BOUND_MB, f"peak RSS grew by {grown_mb:.0f} MB"


def test_thumbnails_are_made_once_and_deleted_with_their_image(client: TestClient, gallery: int):
    upload = client.post(
        f"{API}/galleries/{gallery}/images", files=[("files", ("a.png", png(1, 0)))]
    )
    image = upload.json()["results"][0]["image"]
    first = client.get(image["thumbnail_url"])
    assert first.status_code == 200 and first.headers["content-type"] == "image/jpeg"
    settings = client.app.state.settings
    cached = list((settings.uploads_dir / str(gallery)).rglob("*.jpg"))
    assert len(cached) == 1
    stamp = cached[0].stat().st_mtime_ns
    again = client.get(image["thumbnail_url"])
    assert again.content == first.content and cached[0].stat().st_mtime_ns == stamp
    assert client.delete(f"{API}/images/{image['id']}").status_code == 204
    assert not cached[0].exists()
    assert client.get(image["thumbnail_url"]).status_code == 404


def test_a_request_declaring_more_pixels_than_the_per_request_cap_is_413_before_decoding(
    tmp_path: Path, model_root: Path
):
    """Headers are read first: three 40 MP images (over a 100 M pixel cap) are refused as a
    whole, in searches and uploads, without decoding any of them."""
    from tests.app.test_imaging import png_header_only

    headers_only = png_header_only(*HUGE)  # declares 40 MP, holds almost no pixel data
    with make_client(tmp_path, model_root, max_request_pixels=100_000_000) as client:
        model = client.post(f"{API}/models", data={"name": "tiny", "path": "tiny"}).json()["id"]
        gallery = client.post(f"{API}/galleries", json={"name": "g", "model_id": model}).json()
        files = [("images", (f"{i}.png", headers_only)) for i in range(3)]
        search = client.post(f"{API}/galleries/{gallery['id']}/search/batch", files=files)
        assert search.status_code == 413 and "pixels in total" in search.json()["detail"]
        uploads = [("files", (f"{i}.png", headers_only)) for i in range(3)]
        upload = client.post(f"{API}/galleries/{gallery['id']}/images", files=uploads)
        assert upload.status_code == 413 and "pixels in total" in upload.json()["detail"]
        assert client.get(f"{API}/galleries/{gallery['id']}").json()["image_count"] == 0
