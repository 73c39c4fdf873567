"""SIGKILL the server while images are being added: after a restart every acknowledged image is
searchable, and the database, the stored files and the index agree (nothing half-present)."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.app.conftest import make_client, png, start_api
from tests.conftest import free_port

API = "/api/v1"
ROOT = Path(__file__).resolve().parents[2]


def start_server(data_dir: Path, model_root: Path, port: int, log: Path) -> subprocess.Popen:
    env = {
        **os.environ,
        "LOOKALIKE_DATA_DIR": str(data_dir),
        "LOOKALIKE_MODEL_ROOT": str(model_root),
        "LOOKALIKE_SEED_BUILTIN_MODEL": "false",
        "LOOKALIKE_AUTO_API_KEY": "false",
        "LOOKALIKE_THREADS": "1",
        "LOOKALIKE_SNAPSHOT_EVERY": "7",  # snapshots happen during the run, not only at exit
    }
    return start_api(port, env, log)


@pytest.mark.slow
def test_sigkill_during_uploads_loses_no_acknowledged_image(tmp_path: Path, model_root: Path):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "server.log"
    server = start_server(tmp_path / "data", model_root, port, log)
    acknowledged: dict[int, tuple[int, int]] = {}
    try:
        with httpx.Client(base_url=base, timeout=30) as http:
            model = http.post(f"{API}/models", data={"name": "tiny", "path": "tiny"}).json()["id"]
            gallery = http.post(f"{API}/galleries", json={"name": "g", "model_id": model}).json()[
                "id"
            ]

        stop = threading.Event()

        def upload_loop(worker: int) -> None:
            with httpx.Client(base_url=base, timeout=30) as http:
                for sample in range(worker, 10_000, 2):
                    if stop.is_set():
                        return
                    picture = (sample % 12, sample)
                    try:
                        response = http.post(
                            f"{API}/galleries/{gallery}/images",
                            files=[("files", ("x.png", png(*picture), "image/png"))],
                        )
                    except httpx.HTTPError:
                        return  # the server died mid-request: not acknowledged
                    if response.status_code == 201:
                        acknowledged[response.json()["results"][0]["image"]["id"]] = picture

        threads = [threading.Thread(target=upload_loop, args=(w,)) for w in range(2)]
        for thread in threads:
            thread.start()
        while len(acknowledged) < 25:
            time.sleep(0.01)
        server.send_signal(signal.SIGKILL)
        server.wait()
        stop.set()
        for thread in threads:
            thread.join()
        assert len(acknowledged) >= 25

        server = start_server(tmp_path / "data", model_root, port, log)
        with httpx.Client(base_url=base, timeout=30) as http:
            info = http.get(f"{API}/galleries/{gallery}").json()
            listing = http.get(f"{API}/galleries/{gallery}/images", params={"limit": 1000}).json()
            stored = {item["id"] for item in listing["items"]}
            # Database and index agree; at most the in-flight uploads were committed unacknowledged.
            assert info["image_count"] == info["index_size"] == len(stored)
            assert set(acknowledged) <= stored and len(stored) - len(acknowledged) <= 2
            for image_id in stored:
                assert http.get(f"{API}/images/{image_id}/file").status_code == 200
            for image_id, picture in acknowledged.items():
                hits = http.post(
                    f"{API}/galleries/{gallery}/search",
                    files={"image": ("q.png", png(*picture), "image/png")},
                    data={"k": "1"},
                ).json()["results"]
                assert hits[0]["image_id"] == image_id and hits[0]["score"] > 0.9999
            every = http.post(
                f"{API}/galleries/{gallery}/search",
                files={"image": ("q.png", png(0, 0), "image/png")},
                data={"k": str(len(stored))},
            ).json()["results"]
            assert {hit["image_id"] for hit in every} == stored
    finally:
        server.kill()
        server.wait()


def test_files_of_uploads_killed_before_their_commit_are_swept_at_start(
    tmp_path: Path, model_root: Path
):
    """Files no image row names (an upload SIGKILLed between writing and committing) are
    deleted at the next start once older than the grace period, and counted in /readyz;
    stored images, their thumbnails and recent files (an upload in flight) are kept."""
    with make_client(tmp_path, model_root, orphan_grace_s=600) as client:
        settings = client.app.state.settings
        model = client.post("/api/v1/models", data={"name": "t", "path": "tiny"}).json()["id"]
        gallery = client.post("/api/v1/galleries", json={"name": "g", "model_id": model}).json()
        upload = client.post(
            f"/api/v1/galleries/{gallery['id']}/images", files=[("files", ("a.png", png(0, 0)))]
        )
        image = upload.json()["results"][0]["image"]
        assert client.get(image["thumbnail_url"]).status_code == 200
        assert client.get("/readyz").json()["orphan_files_removed"] == 0
    folder = settings.uploads_dir / str(gallery["id"])
    kept = sorted(p for p in folder.rglob("*") if p.is_file())
    assert len(kept) == 2  # the image and its thumbnail
    old = time.time() - 3600
    stale = [folder / "0123abcd.png", folder / "thumbnails" / "256" / "0123abcd.jpg"]
    stale.append(settings.uploads_dir / "999" / "feed.jpg")  # a deleted gallery's folder
    for path in stale:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
        os.utime(path, (old, old))
    for path in kept:
        os.utime(path, (old, old))
    recent = folder / "in-flight.png"
    recent.write_bytes(b"x")
    with make_client(tmp_path, model_root, orphan_grace_s=600) as client:
        assert client.get("/readyz").json()["orphan_files_removed"] == 3
        assert client.get(image["thumbnail_url"]).status_code == 200
    assert not any(path.exists() for path in stale)
    assert all(path.exists() for path in kept) and recent.exists()
