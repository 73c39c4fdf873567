"""Search latency and throughput of the service as shipped, against the raw floor and a naive peer.

Setup: the built-in model (EfficientNet-Lite0 ImageNet features, 224 px, 1280-d, registered as
`lookalike serve` registers it, with its ONNX export) and a gallery of --gallery-size vectors
(synthetic: a search's cost does not depend on what the vectors hold). Queries are 320x240
JPEG photos-sized drawings, so decoding costs what it does in practice.

Contenders, measured in every round, in an order that rotates from round to round, so that
all see the same background load:

- **floor**: the same work in this process, no web layer: decode, preprocess, forward on the
  service's backend (ONNX Runtime) with one thread, exact FAISS search. At batch 1 (p50/p95)
  and batched (blocks of --batch: images/s, the ceiling for throughput).
- **lookalike**: `lookalike serve` in a subprocess with its defaults (thread policy, backend,
  micro-batching, local workers), from a clean environment: what users run.
- **variants** (--variant): `lookalike serve` again with other settings (e.g. the service
  before the thread policy and ONNX Runtime: `LOOKALIKE_THREAD_POLICY=off`,
  `LOOKALIKE_EMBED_BACKEND=torch`).
- **naive** (--peer): `benchmarks/naive_server.py`, a plain FastAPI handler (PIL decode, torch
  at batch 1, exact FAISS, no batching, default threads).

For each server: p50/p95 of sequential requests at 1 client, then requests/s with 1, 4 and 16
keep-alive clients for --seconds each, and for lookalike the mean micro-batch it formed (from
its /metrics). Ratios are to the floor of the same round: latency to its batch-1 p50,
throughput to its batched images/s. The load average is recorded per round. --hog N runs N
busy processes alongside, as on a shared host.

    python benchmarks/search_latency.py --peer --rounds 3 --json runs/search_latency.json
    python benchmarks/search_latency.py --peer --rounds 3 --hog 2 --json runs/search_hog.json
"""

from __future__ import annotations

import os

# The servers start from the environment the user had, before importing `app` set the thread
# policy's variables in this process.
CLEAN_ENVIRONMENT = dict(os.environ)

# isort: off
import training  # noqa: E402, F401  (the floor runs under the service's thread environment)

# isort: on

import argparse  # noqa: E402
import http.client  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import faiss  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image as PILImage  # noqa: E402
from sqlalchemy import insert  # noqa: E402

from app.core.config import Settings  # noqa: E402
from app.db.migrate import upgrade  # noqa: E402
from app.db.models import Image, ImageEmbedding  # noqa: E402
from app.db.session import make_engine, make_session_factory  # noqa: E402
from app.imaging import open_upload  # noqa: E402
from app.services import galleries, models  # noqa: E402
from training.export import load_inference_embedder  # noqa: E402
from training.threads import ThreadPolicy, apply  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.conftest import draw_sample  # noqa: E402  (the test pictures, upscaled)

K = 10
CLIENTS = (1, 4, 16)


def prepare(root: Path, size: int) -> tuple[Settings, int, Path, Path]:
    """The database at head with the built-in model and a gallery of `size` vectors; returns
    the settings, the gallery id, the model's artifact and the vectors (.npy, for the peer)."""
    settings = Settings(data_dir=root / "data", auto_api_key=False)
    upgrade(settings)
    engine = make_engine(settings)
    with make_session_factory(engine)() as session:
        model = models.ensure_builtin(session, settings)
        gallery = galleries.create_gallery(session, "bench", model.id)
        rng = np.random.default_rng(0)
        vectors = rng.normal(size=(size, model.embedding_dim)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        rows = [
            {
                "id": i + 1,
                "gallery_id": gallery.id,
                "content_hash": f"{i:064x}",
                "file_name": f"synthetic/{i}.jpg",
                "content_type": "image/jpeg",
                "width": 1,
                "height": 1,
                "size_bytes": 0,
                "label": f"class-{i % 100}",
                "meta": {},
            }
            for i in range(size)
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
        artifact = models.artifact_dir(settings, model)
        gallery_id = gallery.id
    engine.dispose()
    np.save(root / "vectors.npy", vectors)
    return settings, gallery_id, artifact, root / "vectors.npy"


def query_images(count: int) -> list[bytes]:
    out = []
    for i in range(count):
        buffer = io.BytesIO()
        picture = draw_sample(i % 12, i).resize((320, 240), PILImage.Resampling.BILINEAR)
        picture.save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def multipart(data: bytes, fields: dict[str, str], file_field: str = "image") -> tuple[bytes, str]:
    """A multipart body: the text `fields`, then `data` as the JPEG file `file_field`."""
    boundary = "lookalike-benchmark-boundary"
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        for name, value in fields.items()
    ]
    parts.append(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{file_field}"; filename="q.jpg"\r\n'
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


class Floor:
    """Decode + preprocess + forward (the service's backend, one thread) + exact FAISS."""

    def __init__(self, artifact: Path, vectors: np.ndarray, max_pixels: int) -> None:
        self.embedder = load_inference_embedder(artifact, threads=1)
        self.index = faiss.IndexFlatIP(vectors.shape[1])
        self.index.add(vectors)
        self.max_pixels = max_pixels

    def search(self, datas: list[bytes]) -> None:
        pictures = [open_upload(d, max_pixels=self.max_pixels) for d in datas]
        self.index.search(self.embedder.embed(pictures, batch_size=len(pictures)), K)

    def measure(self, queries: list[bytes], batch: int, seconds: float) -> dict:
        latencies = []
        for data in queries:
            started = time.perf_counter()
            self.search([data])
            latencies.append(time.perf_counter() - started)
        done, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            for begin in range(0, len(queries) - batch + 1, batch):
                self.search(queries[begin : begin + batch])
                done += batch
        return {
            **percentiles(latencies),
            "batched_images_per_s": round(done / (time.perf_counter() - started), 2),
        }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server subprocess answering POST `path` (multipart: image, k)."""

    def __init__(self, name: str, command: list[str], env: dict[str, str], path: str) -> None:
        self.name = name
        self.port = free_port()
        self.path = path
        self.process = subprocess.Popen(
            [*command, "--port", str(self.port)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self.local = threading.local()
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"{name} exited: {self.process.stderr.read().decode()[-2000:]}")
            try:
                if self.get("/readyz")[0] == 200:
                    return
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise SystemExit(f"{name} did not become ready")

    def settle(self, idle_share: float = 0.1, timeout: float = 180.0) -> None:
        """Wait until the server's processes are idle: `lookalike serve` answers before its
        workers have finished starting, and their start-up would load the first round."""
        deadline = time.monotonic() + timeout
        quiet = 0
        while quiet < 2 and time.monotonic() < deadline:
            before = tree_cpu_seconds(self.process.pid)
            time.sleep(1.0)
            quiet = quiet + 1 if tree_cpu_seconds(self.process.pid) - before < idle_share else 0

    def get(self, path: str) -> tuple[int, bytes]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        try:
            connection.request("GET", path)
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def post(self, body: tuple[bytes, str]) -> float:
        """Seconds for one search on this thread's keep-alive connection (reopened when the
        server closed it: uvicorn drops connections idle for 5 s, as between contenders)."""
        for attempt in range(2):
            if getattr(self.local, "port", None) != self.port or attempt:
                self.local.connection = http.client.HTTPConnection(
                    "127.0.0.1", self.port, timeout=120
                )
                self.local.port = self.port
            started = time.perf_counter()
            try:
                self.local.connection.request("POST", self.path, body[0], {"Content-Type": body[1]})
                response = self.local.connection.getresponse()
                payload = response.read()
            except (ConnectionError, http.client.RemoteDisconnected):
                if attempt:
                    raise
                continue
            if response.status != 200:
                raise RuntimeError(f"{self.name}: failed ({response.status}): {payload[:200]!r}")
            return time.perf_counter() - started
        raise AssertionError("unreachable")

    def batch_counts(self) -> tuple[float, float] | None:
        """(images, forward passes) so far, from lookalike's /metrics; None for other servers."""
        status, text = self.get("/metrics")
        if status != 200:
            return None
        values = {}
        for line in text.decode().splitlines():
            for key in (
                "lookalike_embedding_batch_size_sum",
                "lookalike_embedding_batch_size_count",
            ):
                if line.startswith(key + " "):
                    values[key] = float(line.split()[1])
        if len(values) != 2:
            return None
        return (
            values["lookalike_embedding_batch_size_sum"],
            values["lookalike_embedding_batch_size_count"],
        )

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def tree_cpu_seconds(root: int) -> float:
    """CPU seconds used so far by a process and all its descendants (Linux /proc)."""
    parents, ticks = {}, {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid = int(stat.parent.name)
        parents[pid], ticks[pid] = int(fields[1]), int(fields[11]) + int(fields[12])
    tree, grew = {root}, True
    while grew:
        children = {pid for pid, parent in parents.items() if parent in tree} - tree
        tree |= children
        grew = bool(children)
    return sum(ticks.get(pid, 0) for pid in tree) / os.sysconf("SC_CLK_TCK")


def closed_loop(post: Callable[[], float], clients: int, seconds: float) -> float:
    """Requests/s with `clients` threads posting back to back for `seconds`."""
    stop = time.perf_counter() + seconds
    counts = [0] * clients
    errors: list[BaseException] = []

    def client(slot: int) -> None:
        try:
            while time.perf_counter() < stop:
                post()
                counts[slot] += 1
        except BaseException as error:  # reported after the run
            errors.append(error)

    started = time.perf_counter()
    workers = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    if errors:
        raise errors[0]
    return sum(counts) / (time.perf_counter() - started)


def measure_server(server: Server, bodies: list[tuple[bytes, str]], seconds: float) -> dict:
    for body in bodies[:4]:  # warm-up
        server.post(body)
    latencies = [server.post(body) for body in bodies]
    result: dict = {**percentiles(latencies)}
    cursor = iter(range(10**9))

    def post() -> float:
        return server.post(bodies[next(cursor) % len(bodies)])

    for clients in CLIENTS:
        before = server.batch_counts()
        result[f"req_per_s_{clients}"] = round(closed_loop(post, clients, seconds), 2)
        after = server.batch_counts()
        if before and after and after[1] > before[1]:
            result[f"mean_batch_{clients}"] = round(
                (after[0] - before[0]) / (after[1] - before[1]), 2
            )
    return result


def start_hogs(count: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]


def summarise(rounds: list[dict], names: list[str]) -> dict:
    """Medians over rounds, each contender as ratios to the same round's floor."""
    summary = {}
    for name in names:
        row: dict = {}
        keys = ["p50_ms", "p95_ms", *(f"req_per_s_{c}" for c in CLIENTS)]
        keys += [f"mean_batch_{c}" for c in CLIENTS if f"mean_batch_{c}" in rounds[0][name]]
        for key in keys:
            values = [r[name][key] for r in rounds]
            row[key] = round(statistics.median(values), 2)
        latency_ratios = [r[name]["p50_ms"] / r["floor"]["p50_ms"] for r in rounds]
        row["p50_vs_floor"] = round(statistics.median(latency_ratios), 2)
        for clients in CLIENTS:
            ratios = [
                r[name][f"req_per_s_{clients}"] / r["floor"]["batched_images_per_s"] for r in rounds
            ]
            row[f"req_per_s_{clients}_vs_floor"] = round(statistics.median(ratios), 2)
            row[f"req_per_s_{clients}_vs_floor_min_max"] = [
                round(min(ratios), 2),
                round(max(ratios), 2),
            ]
        summary[name] = row
    floor = [r["floor"] for r in rounds]
    summary["floor"] = {
        "p50_ms": round(statistics.median(f["p50_ms"] for f in floor), 2),
        "p95_ms": round(statistics.median(f["p95_ms"] for f in floor), 2),
        "batched_images_per_s": round(
            statistics.median(f["batched_images_per_s"] for f in floor), 2
        ),
    }
    return summary


def print_table(summary: dict, names: list[str], rounds: list[dict], batch: int) -> None:
    loads = [load for r in rounds for load in r["load_average"]]
    floor = summary["floor"]
    print(
        f"\n{len(rounds)} rounds, load average {min(loads):.1f}-{max(loads):.1f}; floor: p50 "
        f"{floor['p50_ms']} ms, batched (x{batch}) {floor['batched_images_per_s']} images/s\n"
    )
    print(
        "| contender | p50 / p95 at 1 client (ms) | p50 vs floor | "
        + " | ".join(f"req/s at {c} (vs floor, min-max)" for c in CLIENTS)
        + " |"
    )
    print("|---|---|---|" + "---|" * len(CLIENTS))
    for name in names:
        row = summary[name]
        cells = []
        for c in CLIENTS:
            low, high = row[f"req_per_s_{c}_vs_floor_min_max"]
            batch_note = f", batch {row[f'mean_batch_{c}']}" if f"mean_batch_{c}" in row else ""
            cells.append(
                f"{row[f'req_per_s_{c}']} ({row[f'req_per_s_{c}_vs_floor']:.2f}x, "
                f"{low:.2f}-{high:.2f}{batch_note})"
            )
        print(
            f"| {name} | {row['p50_ms']} / {row['p95_ms']} | {row['p50_vs_floor']:.2f}x | "
            + " | ".join(cells)
            + " |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gallery-size", type=int, default=2028)
    parser.add_argument("--queries", type=int, default=32, help="distinct query images")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=6.0, help="per throughput level")
    parser.add_argument("--batch", type=int, default=16, help="the floor's batched size")
    parser.add_argument("--peer", action="store_true", help="also measure the naive server")
    parser.add_argument(
        "--workers",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run `lookalike serve` with its local workers (the default command)",
    )
    parser.add_argument("--hog", type=int, default=0, help="busy processes alongside")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME:VAR=VALUE[,VAR=VALUE]",
        help="another `lookalike serve` with these environment variables, e.g. "
        "before:LOOKALIKE_THREAD_POLICY=off,LOOKALIKE_EMBED_BACKEND=torch",
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.queries < args.batch:
        parser.error(f"--queries must be at least --batch ({args.batch})")
    apply(ThreadPolicy.resolve(threads=1))  # the floor: one thread

    queries = query_images(args.queries)
    bodies = [multipart(data, {"k": str(K)}) for data in queries]
    hogs = start_hogs(args.hog)
    servers: list[Server] = []
    rounds: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="search-latency-") as tmp:
        try:
            settings, gallery_id, artifact, vectors_path = prepare(Path(tmp), args.gallery_size)
            floor = Floor(artifact, np.load(vectors_path), settings.max_image_pixels)
            env = {
                **CLEAN_ENVIRONMENT,
                "LOOKALIKE_DATA_DIR": str(settings.data_dir),
                "LOOKALIKE_AUTO_API_KEY": "false",
            }
            serve = [sys.executable, "-m", "app.cli", "serve"]
            if not args.workers:
                serve.append("--no-workers")
            path = f"/api/v1/galleries/{gallery_id}/search"
            servers.append(Server("lookalike", serve, env, path))
            for variant in args.variant:
                name, _, assignments = variant.partition(":")
                overrides = dict(item.split("=", 1) for item in assignments.split(",") if item)
                servers.append(Server(name, serve, {**env, **overrides}, path))
            if args.peer:
                naive = [sys.executable, "benchmarks/naive_server.py", "--model", str(artifact)]
                naive += ["--vectors", str(vectors_path)]
                servers.append(Server("naive", naive, dict(CLEAN_ENVIRONMENT), "/search"))
            for server in servers:
                server.settle()
            for number in range(args.rounds):
                contenders: list[str | Server] = ["floor", *servers]
                shift = number % len(contenders)
                contenders = contenders[shift:] + contenders[:shift]
                measured: dict = {"load_average": []}
                for contender in contenders:
                    measured["load_average"].append(round(os.getloadavg()[0], 2))
                    if isinstance(contender, Server):
                        measured[contender.name] = measure_server(contender, bodies, args.seconds)
                    else:
                        measured["floor"] = floor.measure(queries, args.batch, args.seconds)
                rounds.append(measured)
                print(json.dumps({"round": number, **measured}), flush=True)
        finally:
            for server in servers:
                server.stop()
            for hog in hogs:
                hog.kill()
    names = [s.name for s in servers]
    summary = summarise(rounds, names)
    print_table(summary, names, rounds, args.batch)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        report = {
            "machine": {"cpus": os.cpu_count(), "hogs": args.hog},
            "gallery_size": args.gallery_size,
            "workers": args.workers,
            "rounds": rounds,
            "summary": summary,
        }
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
