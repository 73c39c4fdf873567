"""HTTP search latency and throughput of the service against the raw cost of the same work.

For each gallery size: a gallery of synthetic unit vectors (inserted straight into the database,
so building it costs no embedding), then, interleaved query by query and block by block so that
both sides see the same background load:

- raw, in this process, no web layer: decode a JPEG + forward pass + exact FAISS search, one
  query at a time (p50/p95), and batched (blocks of --batch queries: images/s);
- HTTP against `uvicorn --factory app.main:create_app` in a subprocess: POST .../search one
  request at a time (p50/p95), and from --concurrency clients at once (requests/s). Clients are
  keep-alive `http.client` connections sending pre-encoded multipart bodies: a lean client, so
  the figure is the service's cost and not a Python HTTP library's (httpx adds about 1 ms of
  its own per request here, which a curl or Go client would not).

The model is EfficientNet-Lite0 at 224 px with a 128-d linear head (a trained DML model's
shape; random weights: the cost is what matters). Both sides use --threads torch threads
(default 1: on a small, shared machine more threads oversubscribe the cores and every
measurement gets slower and noisier).

    python benchmarks/search_latency.py --sizes 1000 100000 --json runs/search_latency.json
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image as PILImage
from sqlalchemy import insert

from app.core.config import Settings
from app.db.migrate import upgrade
from app.db.models import Image, ImageEmbedding
from app.db.session import make_engine, make_session_factory
from app.imaging import open_upload
from app.services import galleries, models
from app.services.indexes import build_index
from training.checkpoint import ModelCard, Preprocessing, load_embedder, save_artifact
from training.models.embedding import EmbeddingModel, ModelSpec

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.conftest import draw_sample  # noqa: E402  (the test pictures, upscaled)

K = 10


def write_model(directory: Path, dim: int) -> Path:
    model = EmbeddingModel(ModelSpec(embedding_dim=dim), weights="none").eval()
    info = model.backbone_info
    card = ModelCard(
        architecture=model.spec,
        embedding_dim=dim,
        preprocessing=Preprocessing(
            image_size=224,
            test_crop_pct=0.875,
            interpolation=info.interpolation,
            mean=info.mean,
            std=info.std,
        ),
        method={"name": "benchmark", "params": {}},
    )
    return save_artifact(directory, model, card)


def prepare(data_dir: Path, size: int, dim: int, threads: int) -> tuple[Settings, int]:
    """Database at head, the model registered, a gallery of `size` synthetic vectors."""
    write_model(data_dir / "model-root" / "bench", dim)
    settings = Settings(
        data_dir=data_dir / "data",
        model_root=data_dir / "model-root",
        seed_builtin_model=False,
        auto_api_key=False,
        torch_threads=threads,
    )
    upgrade(settings)
    engine = make_engine(settings)
    with make_session_factory(engine)() as session:
        model = models.register_path(session, settings, "bench", "bench")
        gallery = galleries.create_gallery(session, "bench", model.id)
        rng = np.random.default_rng(0)
        for start in range(0, size, 5000):
            count = min(5000, size - start)
            vectors = rng.normal(size=(count, dim)).astype(np.float32)
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            rows = [
                {
                    "id": start + i + 1,
                    "gallery_id": gallery.id,
                    "content_hash": f"{start + i:064x}",
                    "file_name": f"synthetic/{start + i}.jpg",
                    "content_type": "image/jpeg",
                    "width": 1,
                    "height": 1,
                    "size_bytes": 0,
                    "label": f"class-{(start + i) % 100}",
                    "meta": {},
                }
                for i in range(count)
            ]
            session.execute(insert(Image), rows)
            session.execute(
                insert(ImageEmbedding),
                [
                    {"image_id": row["id"], "model_id": model.id, "vector": v.tobytes()}
                    for row, v in zip(rows, vectors, strict=True)
                ],
            )
        session.commit()
    engine.dispose()
    return settings, gallery.id


def query_images(count: int) -> list[bytes]:
    """JPEG photos-sized queries (320x240), so decoding costs what it does in practice."""
    out = []
    for i in range(count):
        buffer = io.BytesIO()
        picture = draw_sample(i % 12, i).resize((320, 240), PILImage.Resampling.BILINEAR)
        picture.save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def multipart(data: bytes, fields: dict[str, str]) -> tuple[bytes, str]:
    """A multipart/form-data body with one file part named "image", and its content type."""
    boundary = "lookalike-benchmark-boundary"
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        for name, value in fields.items()
    ]
    parts.append(
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="q.jpg"\r\n'
        "Content-Type: image/jpeg\r\n\r\n".encode()
        + data
        + b"\r\n"
    )
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def percentiles(seconds: list[float]) -> dict[str, float]:
    ms = sorted(s * 1000 for s in seconds)
    return {
        "p50_ms": round(statistics.median(ms), 2),
        "p95_ms": round(ms[min(len(ms) - 1, int(0.95 * len(ms)))], 2),
    }


class Raw:
    """The same work without the web layer: decode, forward pass, exact FAISS search."""

    def __init__(self, settings: Settings, gallery_id: int, threads: int) -> None:
        torch.set_num_threads(threads)
        engine = make_engine(settings)
        with make_session_factory(engine)() as session:
            gallery = galleries.get_gallery(session, gallery_id)
            self.index = build_index(session, gallery)
            self.embedder = load_embedder(models.artifact_dir(settings, gallery.model))
        engine.dispose()
        self.max_pixels = settings.max_image_pixels

    def search(self, datas: list[bytes]) -> float:
        started = time.perf_counter()
        pictures = [open_upload(d, max_pixels=self.max_pixels) for d in datas]
        self.index.search(self.embedder.embed(pictures), K)
        return time.perf_counter() - started


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(settings: Settings, port: int) -> subprocess.Popen:
    env = {
        **os.environ,
        "LOOKALIKE_DATA_DIR": str(settings.data_dir),
        "LOOKALIKE_MODEL_ROOT": str(settings.model_root),
        "LOOKALIKE_SEED_BUILTIN_MODEL": "false",
        "LOOKALIKE_AUTO_API_KEY": "false",
        "LOOKALIKE_TORCH_THREADS": str(settings.torch_threads),
    }
    command = [sys.executable, "-m", "uvicorn", "--factory", "app.main:create_app"]
    command += ["--port", str(port), "--log-level", "warning", "--no-access-log"]
    process = subprocess.Popen(command, cwd=ROOT, env=env)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        try:
            connection.request("GET", "/readyz")
            if connection.getresponse().status == 200:
                return process
        except OSError:
            time.sleep(0.5)
        finally:
            connection.close()
    process.kill()
    raise SystemExit("the server did not become ready")


def measure(
    settings: Settings,
    gallery_id: int,
    queries: list[bytes],
    *,
    threads: int,
    batch: int,
    concurrency: int,
    rounds: int,
) -> dict:
    """Raw and HTTP measurements interleaved (query by query, block by block), so both see the
    same background load on a shared machine."""
    port = free_port()
    server = serve(settings, port)
    raw = Raw(settings, gallery_id, threads)
    path = f"/api/v1/galleries/{gallery_id}/search"
    bodies = {data: multipart(data, {"k": str(K)}) for data in queries}
    local = threading.local()

    server_ms: list[float] = []  # the service's own `took_ms`: no transport, no web layer

    def post(data: bytes) -> float:
        if not hasattr(local, "connection"):
            local.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        body, content_type = bodies[data]
        started = time.perf_counter()
        local.connection.request("POST", path, body, {"Content-Type": content_type})
        response = local.connection.getresponse()
        payload = response.read()
        elapsed = time.perf_counter() - started
        if response.status != 200:
            raise RuntimeError(f"search failed ({response.status}): {payload[:200]!r}")
        server_ms.append(json.loads(payload)["took_ms"])
        return elapsed

    try:
        for data in queries[:5]:  # warm-up: oneDNN picks its kernels per input shape
            raw.search([data])
            post(data)
        raw.search(queries[:batch])
        raw_single, http_single = [], []
        server_ms.clear()
        for data in queries:
            raw_single.append(raw.search([data]))
            http_single.append(post(data))
        service_p50 = statistics.median(server_ms)
        raw_rates, http_rates, loaded = [], [], []
        blocks = [queries[i : i + batch] for i in range(0, len(queries) - batch + 1, batch)]
        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(post, queries[:concurrency]))  # every client connected
            for _ in range(rounds):
                seconds = sum(raw.search(block) for block in blocks)
                raw_rates.append(len(blocks) * batch / seconds)
                started = time.perf_counter()
                loaded += pool.map(post, queries)
                http_rates.append(len(queries) / (time.perf_counter() - started))
        return {
            "raw": {
                **percentiles(raw_single),
                "batched_images_per_s": round(statistics.median(raw_rates), 2),
            },
            "http": {
                **percentiles(http_single),
                "service_p50_ms": round(service_p50, 2),
                "concurrent_p50_ms": percentiles(loaded)["p50_ms"],
                "throughput_per_s": round(statistics.median(http_rates), 2),
            },
        }
    finally:
        server.terminate()
        server.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 100_000])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--queries", type=int, default=64, help="distinct query images")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3, help="throughput blocks per side")
    parser.add_argument("--batch", type=int, default=16, help="raw batched query size")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads on both sides; more than the idle cores oversubscribes the CPU",
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    queries = query_images(args.queries)
    results = []
    for size in args.sizes:
        with tempfile.TemporaryDirectory(prefix="search-latency-") as tmp:
            settings, gallery_id = prepare(Path(tmp), size, args.dim, args.threads)
            measured = measure(
                settings,
                gallery_id,
                queries,
                threads=args.threads,
                batch=args.batch,
                concurrency=args.concurrency,
                rounds=args.rounds,
            )
        raw, http = measured["raw"], measured["http"]
        row = {
            "gallery_size": size,
            "raw": raw,
            "http": http,
            "p50_overhead": round(http["p50_ms"] / raw["p50_ms"] - 1, 3),
            "throughput_vs_raw_batched": round(
                http["throughput_per_s"] / raw["batched_images_per_s"], 3
            ),
        }
        results.append(row)
        print(json.dumps(row), flush=True)
    report = {
        "machine": {"cpus": os.cpu_count(), "threads": args.threads, "torch": torch.__version__},
        "model": f"efficientnet_lite0 224px, {args.dim}-d head",
        "k": K,
        "concurrency": args.concurrency,
        "results": results,
    }
    print(
        "| gallery | raw p50 / p95 (ms) | HTTP p50 / p95 (ms) | in-service p50 (ms) | "
        "p50 overhead | raw batched (img/s) | HTTP x16 (req/s) | ratio |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for row in results:
        raw, http = row["raw"], row["http"]
        print(
            f"| {row['gallery_size']:,} | {raw['p50_ms']} / {raw['p95_ms']} | {http['p50_ms']} / "
            f"{http['p95_ms']} | {http['service_p50_ms']} | {row['p50_overhead']:+.1%} | "
            f"{raw['batched_images_per_s']} | "
            f"{http['throughput_per_s']} | {row['throughput_vs_raw_batched']:.0%} |"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
