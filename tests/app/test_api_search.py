"""End to end over HTTP: upload, search (image, id, vector, batch), filters, paging, classify,
delete, and identical results after a restart; on SQLite and PostgreSQL."""

from __future__ import annotations

import io
import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from fastapi.testclient import TestClient
from PIL import Image

from app.main import create_app
from tests.app.conftest import TINY_DIM, png

API = "/api/v1"


def upload(client: TestClient, gallery: int, items: list[tuple[int, int]]) -> list[dict]:
    """Upload pictures (class, sample) labelled c<class> with metadata; their results."""
    files = [("files", (f"{c}-{s}.png", png(c, s), "image/png")) for c, s in items]
    data = {
        "label": [f"c{c}" for c, _ in items],
        "metadata": [
            json.dumps({"sample": s, "even": s % 2 == 0, "set": "ab"[c % 2]}) for c, s in items
        ],
        "external_id": [f"ext-{c}-{s}" for c, s in items],
    }
    response = client.post(f"{API}/galleries/{gallery}/images", files=files, data=data)
    assert response.status_code == 201, response.text
    return response.json()["results"]


def search(client: TestClient, gallery: int, picture: bytes, **form) -> dict:
    response = client.post(
        f"{API}/galleries/{gallery}/search",
        files={"image": ("q.png", picture, "image/png")},
        data={k: v if isinstance(v, list) else str(v) for k, v in form.items()},
    )
    assert response.status_code == 200, response.text
    return response.json()


GRID = [(c, s) for c in range(4) for s in range(3)]


def test_upload_search_filter_page_delete_and_restart(
    client: TestClient, gallery: int, api_settings
):
    results = upload(client, gallery, GRID)
    ids = {item: r["image"]["id"] for item, r in zip(GRID, results, strict=True)}
    assert all(r["status"] == "created" for r in results)
    first = results[0]["image"]
    assert first["label"] == "c0" and first["metadata"] == {"sample": 0, "even": True, "set": "a"}
    assert first["external_id"] == "ext-0-0" and first["content_type"] == "image/png"

    # The query is one of the uploaded images: it comes back first with score ~1.
    found = search(client, gallery, png(2, 1), k=5)
    assert found["results"][0]["image_id"] == ids[(2, 1)]
    assert abs(found["results"][0]["score"] - 1.0) < 1e-4
    assert [h["score"] for h in found["results"]] == sorted(
        (h["score"] for h in found["results"]), reverse=True
    )
    assert found["model_id"] and found["index_version"] == 1 and found["took_ms"] > 0
    everything = search(client, gallery, png(2, 1), k=12)["results"]
    assert len(everything) == 12

    # Paging: offset re-searches with k + offset, so pages tile the full ranking.
    page2 = search(client, gallery, png(2, 1), k=5, offset=5)["results"]
    assert [h["image_id"] for h in page2] == [h["image_id"] for h in everything[5:10]]

    # Filters select ids before the search: k hits when k match, however far they rank.
    only_c3 = search(client, gallery, png(2, 1), k=3, label="c3")["results"]
    assert {h["label"] for h in only_c3} == {"c3"} and len(only_c3) == 3
    two_labels = search(client, gallery, png(2, 1), k=10, label=["c0", "c1"])["results"]
    assert {h["label"] for h in two_labels} == {"c0", "c1"} and len(two_labels) == 6
    even_b = search(
        client, gallery, png(2, 1), k=10, metadata=json.dumps({"even": True, "set": "b"})
    )["results"]
    assert len(even_b) == 4  # classes 1, 3 x samples 0, 2
    assert all(h["metadata"]["even"] and h["metadata"]["set"] == "b" for h in even_b)
    sample_one = search(client, gallery, png(2, 1), k=10, metadata='{"sample": 1}')["results"]
    assert sorted(h["image_id"] for h in sample_one) == sorted(ids[(c, 1)] for c in range(4))
    assert search(client, gallery, png(2, 1), k=10, metadata='{"sample": "1"}')["results"] == []
    high = search(client, gallery, png(2, 1), k=12, min_score=everything[3]["score"] - 1e-5)[
        "results"
    ]
    assert len(high) == 4

    # By stored image: itself excluded.
    similar = client.get(f"{API}/images/{ids[(2, 1)]}/similar", params={"k": 4}).json()
    assert [h["image_id"] for h in similar["results"]] == [h["image_id"] for h in everything[1:5]]

    # By raw vector: the stored embedding of an image finds it first; the dimension is checked.
    vector = np.random.default_rng(0).normal(size=TINY_DIM).tolist()
    by_vector = client.post(
        f"{API}/galleries/{gallery}/search/vector", json={"vector": vector, "k": 3}
    )
    assert by_vector.status_code == 200 and len(by_vector.json()["results"]) == 3
    wrong = client.post(f"{API}/galleries/{gallery}/search/vector", json={"vector": [1.0, 2.0]})
    assert wrong.status_code == 422 and f"{TINY_DIM} dimensions" in wrong.json()["detail"]

    # Several query images in one request.
    batch = client.post(
        f"{API}/galleries/{gallery}/search/batch",
        files=[
            ("images", ("a.png", png(0, 0), "image/png")),
            ("images", ("b.png", png(3, 2), "image/png")),
        ],
        data={"k": "2"},
    ).json()
    assert [q["results"][0]["image_id"] for q in batch["queries"]] == [ids[(0, 0)], ids[(3, 2)]]

    # Delete: gone from the listing, the search and the index.
    assert client.delete(f"{API}/images/{ids[(2, 1)]}").status_code == 204
    assert client.get(f"{API}/images/{ids[(2, 1)]}").status_code == 404
    after = search(client, gallery, png(2, 1), k=12)["results"]
    assert len(after) == 11 and ids[(2, 1)] not in {h["image_id"] for h in after}
    info = client.get(f"{API}/galleries/{gallery}").json()
    assert info["image_count"] == 11 and info["index_size"] == 11

    # Restart (new app on the same database and data directory): identical answers.
    before = [search(client, gallery, png(c, 0), k=6, label=["c1", "c2"]) for c in range(4)]
    with TestClient(create_app(api_settings)) as restarted:
        again = [search(restarted, gallery, png(c, 0), k=6, label=["c1", "c2"]) for c in range(4)]
        assert restarted.get(f"{API}/galleries/{gallery}").json()["index_size"] == 11
    strip = lambda rs: [[(h["image_id"], h["score"]) for h in r["results"]] for r in rs]  # noqa: E731
    assert strip(again) == strip(before)


def test_duplicates_and_per_file_errors(client: TestClient, gallery: int):
    files = [
        ("files", ("a.png", png(0, 0), "image/png")),
        ("files", ("junk.png", b"not an image at all", "image/png")),
        ("files", ("again.png", png(0, 0), "image/png")),  # same content within the request
        ("files", ("b.jpg", png(1, 0, "JPEG"), "image/jpeg")),
        ("files", ("empty.png", b"", "image/png")),
    ]
    response = client.post(f"{API}/galleries/{gallery}/images", files=files)
    assert response.status_code == 207
    body = response.json()
    statuses = [(r["status"], r["status_code"]) for r in body["results"]]
    assert statuses == [
        ("created", 201),
        ("rejected", 415),
        ("duplicate", 200),
        ("created", 201),
        ("rejected", 400),
    ]
    results = body["results"]
    assert results[2]["image"]["id"] == results[0]["image"]["id"]
    assert "not a recognised image" in results[1]["error"] and "empty" in results[4]["error"]
    assert body["created"] == 2 and body["duplicates"] == 1 and body["rejected"] == 2
    # Uploading the same content later returns the stored image.
    again = client.post(
        f"{API}/galleries/{gallery}/images", files=[("files", ("x.png", png(0, 0), "image/png"))]
    ).json()["results"][0]
    assert again["status"] == "duplicate" and again["image"]["id"] == results[0]["image"]["id"]
    listing = client.get(f"{API}/galleries/{gallery}/images").json()
    assert listing["total"] == 2
    jpeg = results[3]["image"]
    assert jpeg["content_type"] == "image/jpeg"
    file = client.get(jpeg["file_url"])
    assert file.status_code == 200 and file.content == png(1, 0, "JPEG")
    thumb = client.get(jpeg["thumbnail_url"])
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"


def test_listing_pages_and_filters_by_label(client: TestClient, gallery: int):
    upload(client, gallery, GRID)
    page = client.get(f"{API}/galleries/{gallery}/images", params={"offset": 2, "limit": 4}).json()
    assert page["total"] == 12 and len(page["items"]) == 4
    c1 = client.get(f"{API}/galleries/{gallery}/images", params={"label": "c1"}).json()
    assert c1["total"] == 3 and {i["label"] for i in c1["items"]} == {"c1"}


def test_classify_by_knn_vote(client: TestClient, gallery: int):
    upload(client, gallery, GRID)
    response = client.post(
        f"{API}/galleries/{gallery}/classify",
        files=[("images", ("q.png", png(3, 1), "image/png"))],
        data={"k": "1"},
    )
    assert response.status_code == 200, response.text
    prediction = response.json()["predictions"][0]
    assert prediction["label"] == "c3" and prediction["confidence"] == 1.0
    assert prediction["cluster_label"] is None  # not a Magnet model


def test_concurrent_searches_share_forward_passes(api_settings, gallery: int, client: TestClient):
    """Micro-batching across requests, seen through /metrics."""
    upload(client, gallery, GRID[:3])
    settings = api_settings.model_copy(update={"embed_max_wait_ms": 50.0})
    with TestClient(create_app(settings)) as batched, ThreadPoolExecutor(8) as pool:
        statuses = list(
            pool.map(
                lambda i: (
                    batched.post(
                        f"{API}/galleries/{gallery}/search",
                        files={"image": ("q.png", png(i % 4, 10 + i), "image/png")},
                    ).status_code
                ),
                range(16),
            )
        )
        metrics = batched.get("/metrics").text
    assert statuses == [200] * 16
    counts = {
        line.split()[0]: float(line.split()[1])
        for line in metrics.splitlines()
        if line.startswith("lookalike_embedding_batch_size_")
    }
    assert counts["lookalike_embedding_batch_size_sum"] == 16
    assert counts["lookalike_embedding_batch_size_count"] < 16  # some requests shared a pass
    assert 'method="POST",route="/api/v1/galleries/{gallery_id}/search",status="200"' in metrics


def test_near_duplicates_are_grouped_with_the_gallery_index(client: TestClient, gallery: int):
    """Copies of three pictures saved with other encoder settings (the same pixels, other
    bytes, so stored apart) come back as three pairs; the other pictures stay out of every
    group; a low threshold joins more; the limit holds."""
    results = upload(client, gallery, GRID)
    ids = {item: r["image"]["id"] for item, r in zip(GRID, results, strict=True)}
    copies = [(0, 0), (1, 2), (3, 1)]

    def resaved(c: int, s: int) -> bytes:
        out = io.BytesIO()
        Image.open(io.BytesIO(png(c, s))).save(out, "PNG", compress_level=0)
        return out.getvalue()

    files = [("files", (f"{c}-{s}-copy.png", resaved(c, s), "image/png")) for c, s in copies]
    response = client.post(f"{API}/galleries/{gallery}/images", files=files)
    assert response.status_code == 201, response.text
    assert [r["status"] for r in response.json()["results"]] == ["created"] * 3
    copy_ids = [r["image"]["id"] for r in response.json()["results"]]

    def groups(**params) -> dict:
        response = client.get(f"{API}/galleries/{gallery}/duplicates", params=params)
        assert response.status_code == 200, response.text
        return response.json()

    found = groups(threshold=0.9999)
    pairs = {frozenset(image["id"] for image in group["images"]) for group in found["groups"]}
    expected = {frozenset((ids[item], copy)) for item, copy in zip(copies, copy_ids, strict=True)}
    assert pairs == expected and found["total_groups"] == 3
    for group in found["groups"]:
        assert 0.9999 <= group["min_score"] <= group["max_score"] <= 1.0 + 1e-6
    assert len(groups(threshold=0.9999, limit=2)["groups"]) == 2
    loose = groups(threshold=0.01)  # everything joins one group through its neighbours
    assert loose["total_groups"] == 1 and len(loose["groups"][0]["images"]) == len(GRID) + 3
    assert client.get(f"{API}/galleries/{gallery}/duplicates?threshold=0").status_code == 422
    assert client.get(f"{API}/galleries/999999/duplicates").status_code == 404
