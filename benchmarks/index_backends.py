"""The two index backends through the API: search latency and upload throughput, faiss against
milvus, on the same gallery. Milvus runs as Milvus Lite twice: inside the API's process (the
embedded Milvus: `milvus`) and as its own server process reached over gRPC (`milvus-server`).

Setup per size: one app per backend, each with its own SQLite database and a 128-d model with
random weights (the vectors' content does not change a search's cost). The gallery is filled
with --size clustered unit vectors written straight to the database (embedding 100k images
would take hours here and measures the embedder, not the index), then each backend builds its
index from the stored embeddings (`reconcile`, timed). Then, interleaved query by query so both
see the same background load:

- search: POST /search/vector with k=10, flat index, --queries queries: p50 / p95 ms;
- upload: POST /images with --batch small PNGs per request, --uploads requests: images/s (the
  embedding of these 32 px images is cheap, so the index write shows); after each, a search by
  the first uploaded image (not timed) checks that the next request finds it.

    python benchmarks/index_backends.py --sizes 10000 100000 --json runs/index_backends.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np
from fastapi.testclient import TestClient
from PIL import Image as PILImage
from sqlalchemy import insert

from app.core.config import Settings
from app.db.models import Image, ImageEmbedding
from app.local import start_milvus_lite
from app.main import create_app
from training.checkpoint import save_untrained_artifact

API = "/api/v1"
DIM = 128
# faiss; Milvus Lite inside the API process (LOOKALIKE_MILVUS_URI=<file>.db, the embedded
# Milvus); Milvus Lite as its own server process over gRPC, as a deployed Milvus is reached.
BACKENDS = ("faiss", "milvus", "milvus-server")


def clustered(n: int, rng: np.random.Generator) -> np.ndarray:
    centres = rng.normal(size=(max(1, n // 100), DIM)).astype(np.float32)
    vectors = centres[rng.integers(0, len(centres), n)] + 0.3 * rng.normal(size=(n, DIM))
    vectors = vectors.astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def fill(client: TestClient, size: int, vectors: np.ndarray) -> tuple[int, float]:
    """A gallery of `size` stored embeddings; (gallery id, seconds to build its index)."""
    model = client.post(f"{API}/models", data={"name": "m", "path": "m"}).json()["id"]
    gallery = client.post(f"{API}/galleries", json={"name": "g", "model_id": model}).json()["id"]
    runtime = client.app.state.runtime  # type: ignore[attr-defined]
    with runtime.session_factory() as session:
        for start in range(0, size, 5000):
            stop = min(size, start + 5000)
            session.execute(
                insert(Image),
                [
                    {
                        "id": i + 1,
                        "gallery_id": gallery,
                        "content_hash": f"{i:064x}",
                        "file_name": f"bench/{i}.png",
                        "content_type": "image/png",
                        "width": 32,
                        "height": 32,
                        "size_bytes": 1,
                        "label": f"c{i % 100}",
                        "meta": {},
                    }
                    for i in range(start, stop)
                ],
            )
            session.execute(
                insert(ImageEmbedding),
                [
                    {"image_id": i + 1, "model_id": model, "vector": vectors[i].tobytes()}
                    for i in range(start, stop)
                ],
            )
        session.commit()
    started = time.perf_counter()
    runtime.indexes.reconcile(gallery)
    return gallery, time.perf_counter() - started


def png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    out = io.BytesIO()
    PILImage.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(out, "PNG")
    return out.getvalue()


def run(size: int, queries: int, uploads: int, batch: int, root: Path) -> dict:
    rng = np.random.default_rng(size)
    vectors = clustered(size, rng)
    probes = clustered(queries, np.random.default_rng(1))
    model_root = root / "models"
    if not (model_root / "m").exists():
        save_untrained_artifact(model_root / "m", DIM)
    results: dict = {"size": size, "loadavg_start": os.getloadavg()[0]}
    with ExitStack() as stack:
        clients, galleries = {}, {}
        for backend in BACKENDS:
            data = root / f"{backend}-{size}"
            uri = str(data / "milvus.db")
            if backend == "milvus-server":
                server, uri = start_milvus_lite(data / "milvus-server")
                stack.callback(server.kill)
            settings = Settings(
                data_dir=data,
                model_root=model_root,
                seed_builtin_model=False,
                auto_api_key=False,
                index_backend="faiss" if backend == "faiss" else "milvus",
                milvus_uri=uri,
                threads=1,
                embed_max_wait_ms=0.0,
            )
            clients[backend] = stack.enter_context(TestClient(create_app(settings)))
            galleries[backend], build_s = fill(clients[backend], size, vectors)
            results[f"{backend}_build_s"] = round(build_s, 2)
        latency = {backend: [] for backend in BACKENDS}
        for number, probe in enumerate(probes):
            order = BACKENDS if number % 2 == 0 else BACKENDS[::-1]
            for backend in order:
                started = time.perf_counter()
                response = clients[backend].post(
                    f"{API}/galleries/{galleries[backend]}/search/vector",
                    json={"vector": probe.tolist(), "k": 10},
                )
                latency[backend].append((time.perf_counter() - started) * 1000)
                assert response.status_code == 200, response.text
        upload_s = {backend: 0.0 for backend in BACKENDS}
        visible = {backend: 0 for backend in BACKENDS}
        for number in range(uploads):
            files = [
                ("files", (f"{j}.png", png(number * batch + j), "image/png")) for j in range(batch)
            ]
            order = BACKENDS if number % 2 == 0 else BACKENDS[::-1]
            for backend in order:
                started = time.perf_counter()
                response = clients[backend].post(
                    f"{API}/galleries/{galleries[backend]}/images", files=files
                )
                upload_s[backend] += time.perf_counter() - started
                assert response.status_code == 201, response.text
                # Read-your-write: the next request finds the acknowledged image (not timed).
                first = response.json()["results"][0]["image"]["id"]
                probe = clients[backend].post(
                    f"{API}/galleries/{galleries[backend]}/search",
                    files={"image": ("q.png", png(number * batch), "image/png")},
                    data={"k": 1},
                )
                assert probe.status_code == 200, probe.text
                visible[backend] += int(probe.json()["results"][0]["image_id"] == first)
        for backend in BACKENDS:
            ordered = sorted(latency[backend])
            results[f"{backend}_search_p50_ms"] = round(statistics.median(ordered), 2)
            results[f"{backend}_search_p95_ms"] = round(ordered[int(0.95 * (len(ordered) - 1))], 2)
            results[f"{backend}_upload_images_per_s"] = round(
                uploads * batch / upload_s[backend], 1
            )
            results[f"{backend}_found_by_next_request"] = f"{visible[backend]}/{uploads}"
    results["loadavg_end"] = os.getloadavg()[0]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--uploads", type=int, default=20)
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for size in args.sizes:
            row = run(size, args.queries, args.uploads, args.batch, Path(folder))
            print(json.dumps(row))
            rows.append(row)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
