"""A bounded soak of `lookalike serve` (issue 17): many clients searching and uploading at once
for minutes, then proof that nothing acknowledged was lost and that the stores agree.

Setup: `lookalike serve` (no job workers) in a subprocess on a fresh data directory, with an API
key, the built-in model and a gallery seeded with --seed-images uploads. Then --clients
keep-alive clients for --minutes: each request is an upload of a new, unique picture (with
probability --upload-share) or a search with a random query picture. Afterwards:

- every acknowledged upload (201) is present, and searching with its own bytes finds it at
  rank 1;
- image rows = stored embeddings = index entries = files on disk, for the gallery;
- the server's RSS, sampled every 5 s, from start to end (growth), its peak and its course;
- request counts by status (any 5xx is a failure), throughput, p50/p95 per kind, load average.

Not part of CI (it takes the whole machine for --minutes):

    python benchmarks/soak.py --minutes 10 --clients 16 --json runs/soak.json
"""

from __future__ import annotations

import os

CLEAN_ENVIRONMENT = dict(os.environ)

import argparse  # noqa: E402
import http.client  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from collections import Counter  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image as PILImage  # noqa: E402
from sqlalchemy import func, select  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.core.config import Settings  # noqa: E402
from app.db.models import Image, ImageEmbedding  # noqa: E402
from app.db.session import make_engine, make_session_factory  # noqa: E402
from app.services.images import THUMBNAILS_FOLDER  # noqa: E402
from benchmarks.search_latency import Server, multipart, percentiles  # noqa: E402
from tests.conftest import draw_sample  # noqa: E402

KEY = "soak-key"


def unique_picture(rng: random.Random) -> bytes:
    """A 320x240 JPEG of a test drawing with a random noise patch: unique content."""
    picture = draw_sample(rng.randrange(12), rng.randrange(1000)).resize(
        (320, 240), PILImage.Resampling.BILINEAR
    )
    patch = np.random.default_rng(rng.getrandbits(32)).integers(0, 256, (48, 48, 3), np.uint8)
    picture.paste(PILImage.fromarray(patch), (rng.randrange(272), rng.randrange(192)))
    buffer = io.BytesIO()
    picture.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


class Client:
    """One keep-alive connection (reopened when the server closes it)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)

    def request(self, method: str, path: str, body: tuple[bytes, str] | None = None):
        headers = {"X-API-Key": KEY}
        if body is not None:
            headers["Content-Type"] = body[1]
        for attempt in range(2):
            try:
                self.connection.request(method, path, body[0] if body else None, headers)
                response = self.connection.getresponse()
                return response.status, response.read()
            except (ConnectionError, http.client.RemoteDisconnected, http.client.BadStatusLine):
                self.connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
                if attempt:
                    raise
        raise AssertionError("unreachable")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--upload-share", type=float, default=0.2)
    parser.add_argument("--seed-images", type=int, default=200)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        data_dir = Path(tmp) / "data"
        env = {
            **CLEAN_ENVIRONMENT,
            "LOOKALIKE_DATA_DIR": str(data_dir),
            "LOOKALIKE_API_KEYS": f'["{KEY}"]',
        }
        command = [sys.executable, "-m", "app.cli", "serve", "--no-workers"]
        server = Server("lookalike", command, env, "")
        try:
            result = soak(server, data_dir, args)
        finally:
            server.stop()
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    if result["failures"]:
        raise SystemExit("soak failed: " + "; ".join(result["failures"]))


def soak(server: Server, data_dir: Path, args: argparse.Namespace) -> dict:
    setup = Client(server.port)
    status, body = setup.request("GET", "/api/v1/models")
    builtin = next(m for m in json.loads(body) if m["builtin"])
    gallery_body = json.dumps({"name": "soak", "model_id": builtin["id"]}).encode()
    status, body = setup.request("POST", "/api/v1/galleries", (gallery_body, "application/json"))
    assert status == 201, body
    gallery = json.loads(body)["id"]
    rng = random.Random(0)
    acknowledged: dict[int, bytes] = {}
    lock = threading.Lock()
    for _ in range(args.seed_images):
        data = unique_picture(rng)
        status, body = setup.request(
            "POST", f"/api/v1/galleries/{gallery}/images", multipart(data, {}, "files")
        )
        assert status == 201, body
        acknowledged[json.loads(body)["results"][0]["image"]["id"]] = data
    queries = [unique_picture(rng) for _ in range(64)]
    server.settle()

    statuses: Counter[str] = Counter()
    latencies: dict[str, list[float]] = {"search": [], "upload": []}
    rss: list[float] = [rss_mb(server.process.pid)]
    stop = threading.Event()
    deadline = time.monotonic() + args.minutes * 60
    load_before = os.getloadavg()

    def client_loop(number: int) -> None:
        client, local = Client(server.port), random.Random(number + 1)
        while time.monotonic() < deadline and not stop.is_set():
            upload = local.random() < args.upload_share
            if upload:
                data = unique_picture(local)
                body = multipart(data, {"external_id": uuid.uuid4().hex}, "files")
                path = f"/api/v1/galleries/{gallery}/images"
            else:
                body = multipart(local.choice(queries), {"k": "10"})
                path = f"/api/v1/galleries/{gallery}/search"
            started = time.perf_counter()
            status, payload = client.request("POST", path, body)
            elapsed = time.perf_counter() - started
            kind = "upload" if upload else "search"
            with lock:
                statuses[f"{kind} {status}"] += 1
                latencies[kind].append(elapsed)
                if upload and status == 201:
                    acknowledged[json.loads(payload)["results"][0]["image"]["id"]] = data

    def sample_rss() -> None:
        while not stop.wait(5.0):
            rss.append(rss_mb(server.process.pid))

    sampler = threading.Thread(target=sample_rss, daemon=True)
    sampler.start()
    started = time.monotonic()
    with ThreadPoolExecutor(args.clients) as pool:
        for future in [pool.submit(client_loop, n) for n in range(args.clients)]:
            future.result()
    elapsed = time.monotonic() - started
    stop.set()
    rss.append(rss_mb(server.process.pid))
    load_after = os.getloadavg()

    failures: list[str] = []
    server_errors = sum(n for key, n in statuses.items() if key.split()[1].startswith("5"))
    if server_errors:
        failures.append(f"{server_errors} answers were 5xx")

    def found_at_rank_1(item: tuple[int, bytes]) -> str | None:
        image_id, data = item
        client = Client(server.port)
        status, _ = client.request("GET", f"/api/v1/images/{image_id}")
        if status != 200:
            return f"image {image_id}: GET answered {status}"
        status, body = client.request(
            "POST", f"/api/v1/galleries/{gallery}/search", multipart(data, {"k": "1"})
        )
        hits = json.loads(body)["results"] if status == 200 else []
        if not hits or hits[0]["image_id"] != image_id:
            return f"image {image_id}: not the first hit of its own search ({status}, {hits})"
        return None

    with ThreadPoolExecutor(4) as pool:
        missing = [m for m in pool.map(found_at_rank_1, acknowledged.items()) if m]
    failures += missing[:10]
    if len(missing) > 10:
        failures.append(f"... and {len(missing) - 10} more")

    status, body = setup.request("GET", f"/api/v1/galleries/{gallery}")
    info = json.loads(body)
    engine = make_engine(Settings(data_dir=data_dir))
    with make_session_factory(engine)() as session:
        rows = session.scalar(select(func.count()).where(Image.gallery_id == gallery))
        embeddings = session.scalar(
            select(func.count())
            .select_from(ImageEmbedding)
            .join(Image, Image.id == ImageEmbedding.image_id)
            .where(Image.gallery_id == gallery, ImageEmbedding.model_id == builtin["id"])
        )
    engine.dispose()
    folder = data_dir / "images" / str(gallery)
    files = sum(1 for p in folder.rglob("*") if p.is_file() and THUMBNAILS_FOLDER not in p.parts)
    counts = {
        "acknowledged": len(acknowledged),
        "rows": rows,
        "embeddings": embeddings,
        "index_entries": info["index_size"],
        "files": files,
    }
    if len({rows, embeddings, info["index_size"], files, len(acknowledged)}) != 1:
        failures.append(f"the stores disagree: {counts}")
    requests = sum(statuses.values())
    return {
        "minutes": args.minutes,
        "clients": args.clients,
        "upload_share": args.upload_share,
        "requests": requests,
        "requests_per_s": round(requests / elapsed, 1),
        "statuses": dict(sorted(statuses.items())),
        **{kind: percentiles(times) for kind, times in latencies.items() if times},
        "counts": counts,
        "rss_mb": {
            "start": round(rss[0], 1),
            "end": round(rss[-1], 1),
            "peak": round(max(rss), 1),
            "growth": round(rss[-1] - rss[0], 1),
            "every_30_s": [round(value, 1) for value in rss[::6]],
        },
        "load_average": {"before": load_before, "after": load_after},
        "failures": failures,
    }


if __name__ == "__main__":
    main()
