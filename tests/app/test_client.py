"""lookalike.client and the CLI's client commands against a live `lookalike serve` (the API
over HTTP plus its two local workers on the embedded SQLite broker), and the retry policy on a
mock transport."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image
from typer.testing import CliRunner

from app.cli import cli
from app.local import serve_processes
from lookalike.client import (
    AsyncClient,
    Client,
    Conflict,
    InvalidRequest,
    NotFound,
    Unauthorized,
    Unavailable,
    folder_images,
)
from tests.app.conftest import png, worker_settings
from tests.conftest import free_port

KEY = "client-test-key"
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path, int]]:
    """(URL, the dataset root, the tiny model's id) of a running `lookalike serve`."""
    root = tmp_path_factory.mktemp("serve")
    settings = worker_settings(root, api_keys=[KEY])
    with serve_processes(settings, port=free_port()) as service:
        with httpx.Client(base_url=service.url, headers={"X-API-Key": KEY}, timeout=60) as http:
            model = http.post("/api/v1/models", data={"name": "tiny", "path": "tiny"}).json()
        yield service.url, root / "datasets", model["id"]


def test_upload_folder_page_and_search_by_path_bytes_image_and_id(server) -> None:
    url, datasets, model_id = server
    folder = datasets / "tiny" / "test"
    with Client(url, KEY) as client:
        gallery = client.create_gallery("photos", model_id=model_id)
        progress: list[tuple[int, int]] = []
        results = client.upload_folder(
            "photos", folder, batch_size=7, on_batch=lambda *p: progress.append(p)
        )
        assert [r["status"] for r in results] == ["created"] * 20
        assert progress == [(7, 20), (14, 20), (20, 20)]
        listed = list(client.images(gallery["id"], page_size=6))  # four pages
        assert len(listed) == 20 and len({image["id"] for image in listed}) == 20
        assert {image["label"] for image in listed} == {f"t{i}" for i in range(4)}
        assert len(list(client.images("photos", label="t1"))) == 5

        query, label = folder_images(folder)[3]
        by_path = client.search("photos", query, k=3)["results"]
        assert by_path[0]["score"] > 0.99 and by_path[0]["label"] == label
        by_bytes = client.search(gallery["id"], query.read_bytes(), k=3)["results"]
        by_image = client.search("photos", Image.open(query), k=3)["results"]
        assert by_bytes[0]["image_id"] == by_image[0]["image_id"] == by_path[0]["image_id"]
        only = client.search("photos", query, k=20, labels=["t0"])["results"]
        assert {hit["label"] for hit in only} == {"t0"}
        batch = client.search_batch("photos", [query, png(9, 1)], k=2)
        assert len(batch["queries"]) == 2
        similar = client.similar(by_path[0]["image_id"], k=4)["results"]
        assert by_path[0]["image_id"] not in {hit["image_id"] for hit in similar}
        assert len(similar) == 4

        # A second upload of the same files: duplicates, nothing stored twice.
        again = client.upload("photos", [query], labels=[label])
        assert again[0]["status"] == "duplicate"
        assert client.gallery("photos")["image_count"] == 20
        grouped = client.duplicates("photos", threshold=0.01, limit=1)
        assert grouped["threshold"] == 0.01 and len(grouped["groups"]) == 1
        assert len(grouped["groups"][0]["images"]) == 20  # everything joins at 0.01


def test_errors_carry_the_servers_reason(server) -> None:
    url, _, model_id = server
    with Client(url, KEY, retries=0) as client:
        with pytest.raises(NotFound, match="no gallery is named 'nowhere'"):
            client.search("nowhere", png(1, 1))
        with pytest.raises(NotFound, match="gallery 999999 does not exist"):
            client.gallery(999999)
        gallery = client.create_gallery("errors", model_id=model_id)
        with pytest.raises(Conflict, match="already exists"):
            client.create_gallery("errors", model_id=model_id)
        with pytest.raises(InvalidRequest, match="dimension 3"):
            client.search_vector(gallery["id"], [0.1, 0.2, 0.3])
        rejected = client.upload(gallery["id"], [b"not an image"])
        assert rejected[0]["status"] == "rejected" and rejected[0]["error"]
    with Client(url, "wrong-key") as client, pytest.raises(Unauthorized):
        client.create_gallery("x")


def test_jobs_submit_wait_with_progress_list_and_cancel(server) -> None:
    url, _, model_id = server
    with Client(url, KEY) as client:
        gallery = client.create_gallery("to-index", model_id=model_id)
        client.upload("to-index", [png(i, 0) for i in range(5)])
        job = client.submit_job("index", {"gallery_id": gallery["id"], "model_id": model_id})
        seen: list[str] = []
        done = client.wait_job(
            job["id"], timeout_s=120, poll_s=0.2, on_progress=lambda j: seen.append(j["state"])
        )
        assert done["state"] == "succeeded" and seen[-1] == "succeeded"
        assert client.gallery(gallery["id"])["model_id"] == model_id
        assert job["id"] in {j["id"] for j in client.jobs(job_type="index", page_size=1)}
        with pytest.raises(Conflict, match="already succeeded"):
            client.cancel_job(job["id"])
        with pytest.raises(InvalidRequest, match="unknown job type 'nope'"):
            client.submit_job("nope", {})


def test_async_client_has_the_whole_api(server, tmp_path: Path) -> None:
    url, datasets, model_id = server
    public = {name for name in dir(Client) if not name.startswith("_")} - {"close"}
    assert public <= {name for name in dir(AsyncClient) if not name.startswith("_")}
    import timm
    from safetensors.torch import save_file

    weights = tmp_path / "vit.safetensors"
    save_file(timm.create_model("test_vit").state_dict(), str(weights))

    async def journey() -> dict:
        async with AsyncClient(url, KEY) as client:
            gallery = await client.create_gallery("async", model_id=model_id)
            progress: list[tuple[int, int]] = []
            uploaded = await client.upload_folder(
                "async",
                datasets / "tiny" / "test",
                batch_size=8,
                on_batch=lambda *p: progress.append(p),
            )
            images = [image async for image in client.images("async", page_size=6)]
            first = images[0]["id"]
            return {
                "uploaded": len(uploaded),
                "progress": progress,
                "images": len(images),
                "by_name": (await client.gallery("async"))["id"] == gallery["id"],
                "batch": await client.search_batch("async", [png(8, 0), png(9, 0)], k=1),
                "similar": await client.similar(first, k=2),
                "duplicates": await client.duplicates("async", threshold=0.999),
                "jobs": [job async for job in client.jobs(page_size=2)],
                "model": await client.model(model_id),
                "pretrained": await client.register_pretrained(
                    "vit", "test_vit", weights=weights, image_size=96
                ),
                "artifact": await client.register_model(
                    "tiny-again", datasets.parent / "models-in" / "tiny"
                ),
            }

    seen = asyncio.run(journey())
    assert seen["uploaded"] == seen["images"] == 20 and seen["progress"][-1] == (20, 20)
    assert seen["by_name"] and len(seen["batch"]["queries"]) == 2
    assert len(seen["similar"]["results"]) == 2 and "groups" in seen["duplicates"]
    assert seen["model"]["id"] == model_id
    assert seen["pretrained"]["card"]["backbone_weights"]["source"] == "file:vit.safetensors"
    assert seen["artifact"]["embedding_dim"] == seen["model"]["embedding_dim"]


def test_cli_upload_search_and_jobs(server, tmp_path: Path, monkeypatch) -> None:
    url, datasets, model_id = server
    monkeypatch.setenv("LOOKALIKE_API_KEY", KEY)
    runner = CliRunner()
    folder = datasets / "tiny" / "test"
    uploaded = runner.invoke(
        cli,
        ["upload", str(folder), "-g", "cli", "--create", "--model", str(model_id), "--server", url],
    )
    assert uploaded.exit_code == 0, uploaded.output
    assert "20 created, 0 duplicate, 0 rejected" in uploaded.output
    query = tmp_path / "query.png"
    query.write_bytes(png(8, 0))
    found = runner.invoke(
        cli, ["search", str(query), "-g", "cli", "-k", "3", "--json", "--server", url]
    )
    assert found.exit_code == 0, found.output
    hits = json.loads(found.output)["results"]
    assert len(hits) == 3 and hits[0]["score"] > 0.99 and hits[0]["label"] == "t0"
    text = runner.invoke(cli, ["search", str(query), "-g", "cli", "-k", "1", "--server", url])
    assert text.exit_code == 0 and "  t0  " in text.output
    listed = runner.invoke(cli, ["jobs", "list", "--json", "--server", url])
    assert listed.exit_code == 0 and isinstance(json.loads(listed.output), list)
    missing = runner.invoke(cli, ["search", str(query), "-g", "nowhere", "--server", url])
    assert missing.exit_code == 2 and "no gallery is named 'nowhere'" in missing.output


def test_busy_answers_are_retried_after_retry_after_then_reported() -> None:
    answers = iter([503, 503, 200])
    calls: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        status = next(answers, 503)
        body = [] if status == 200 else {"detail": "the index is loading"}
        return httpx.Response(status, json=body, headers={"Retry-After": "0"})

    with Client("http://lookalike.test", transport=httpx.MockTransport(handler)) as client:
        assert client.models() == []
        assert len(calls) == 3
        calls.clear()
        with pytest.raises(Unavailable, match="the index is loading") as raised:
            client.models()
    assert raised.value.status == 503 and len(calls) == client.retries + 1


def test_pil_images_and_bytes_become_multipart_parts() -> None:
    from lookalike.client import image_part

    name, data, media = image_part(Image.new("RGB", (4, 4)))
    assert (name, media) == ("image.png", "image/png")
    assert Image.open(io.BytesIO(data)).size == (4, 4)
    assert image_part(b"\xff\xd8raw", "q")[:2] == ("q", b"\xff\xd8raw")


def test_cluster_job_stores_a_clustering_the_api_pages_and_deletes(server) -> None:
    url, datasets, model_id = server
    with Client(url, KEY) as client:
        client.create_gallery("to-cluster", model_id=model_id)
        client.upload_folder("to-cluster", datasets / "tiny" / "train")  # 8 classes x 6
        chosen = client.cluster("to-cluster", k_max=12, timeout_s=120)
        assert 2 <= chosen["k"] <= 12 and chosen["size"] == 48
        assert str(chosen["k"]) in chosen["k_scores"] and chosen["silhouette"] is not None
        sizes = [c["size"] for c in chosen["clusters"]]
        assert sum(sizes) == 48 and sizes == sorted(sizes, reverse=True)
        assert chosen["total_clusters"] == chosen["k"]
        first = chosen["clusters"][0]
        assert 1 <= len(first["examples"]) <= 8 and first["top_label"].startswith("c")
        members = list(client.cluster_images(chosen["id"], 0, page_size=5))
        assert len(members) == first["size"]
        assert [m["id"] for m in members[: len(first["examples"])]] == [
            e["id"] for e in first["examples"]
        ]

        job = client.wait_job(
            client.submit_job(
                "cluster",
                {"gallery_id": client.gallery_id("to-cluster"), "method": "agglomerative", "k": 8},
            )["id"]
        )
        assert job["result"]["k"] == 8 and set(job["result"]["labels"]) == {"nmi", "purity"}
        listed = client.clusterings("to-cluster")
        assert [c["id"] for c in listed] == [job["result"]["clustering_id"], chosen["id"]]

        client.delete_image(members[0]["id"])  # a deleted image leaves its clusters
        again = client.clustering(chosen["id"], examples=0)
        assert sum(c["size"] for c in again["clusters"]) == 47
        for params, reason in [
            ({"k_min": 9, "k_max": 3}, "k_min"),
            ({"k": 0}, "greater than or equal to 1"),
            ({"method": "dbscan"}, "kmeans"),
        ]:
            with pytest.raises(InvalidRequest, match=reason):
                client.submit_job(
                    "cluster", {"gallery_id": client.gallery_id("to-cluster"), **params}
                )
        client.create_gallery("one-image", model_id=model_id)
        client.upload("one-image", [png(1, 1)])
        with pytest.raises(InvalidRequest, match="has 1 image; clustering needs at least 2"):
            client.cluster("one-image")
        client.delete_clustering(chosen["id"])
        with pytest.raises(NotFound, match="clustering"):
            client.clustering(chosen["id"])
        with pytest.raises(NotFound, match="clusters 0 to"):
            list(client.cluster_images(job["result"]["clustering_id"], 99))
