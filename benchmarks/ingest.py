"""Import and index jobs against the raw batched throughput of the same model and backend.

`lookalike serve` (its defaults: thread policy, ONNX Runtime, local workers) ingests a folder
of images twice per round: an **import** job into a new gallery (read, decode, hash, store,
embed, commit) and an **index** job that re-embeds that gallery with a second
copy of the model (read, decode, embed, then the switch). Interleaved with them, the **raw**
loop does the work every ingest must do, in this process, on one thread, in batches of 32:
decode, preprocess, ONNX Runtime forward. A job's rate counts from its start to its end as
the job record has them; a warm-up import loads the model in the worker first.

    python benchmarks/ingest.py --data data/icons --rounds 3 --json runs/ingest.json
"""

from __future__ import annotations

import os

CLEAN_ENVIRONMENT = dict(os.environ)  # the server starts from the user's environment

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from datetime import datetime  # noqa: E402
from pathlib import Path  # noqa: E402

import httpx  # noqa: E402
from PIL import Image as PILImage  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.search_latency import Server  # noqa: E402
from tests.conftest import draw_sample  # noqa: E402
from training.cli import pretrained  # noqa: E402
from training.export import load_inference_embedder  # noqa: E402
from training.threads import ThreadPolicy, apply  # noqa: E402

BATCH = 32
MAX_PIXELS = 40_000_000  # the service's default decompression-bomb cap


def image_folder(target: Path, data: Path | None, count: int) -> list[Path]:
    """IconThemes test images (class folders), or photo-sized JPEG drawings."""
    if data is not None:
        shutil.copytree(data / "test", target)  # all of them: the import job takes the folder
        return sorted(p for p in target.rglob("*") if p.is_file())
    for i in range(count):
        folder = target / f"class-{i % 12}"
        folder.mkdir(parents=True, exist_ok=True)
        picture = draw_sample(i % 12, i).resize((320, 240), PILImage.Resampling.BILINEAR)
        picture.save(folder / f"{i}.jpg", "JPEG", quality=90)
    return sorted(target.rglob("*.jpg"))


def raw_rate(artifact: Path, files: list[Path]) -> float:
    """Images/s of decode + preprocess + forward, batches of BATCH, one thread."""
    from app.imaging import open_upload

    embedder = load_inference_embedder(artifact, threads=1)
    started = time.perf_counter()
    for start in range(0, len(files), BATCH):
        pictures = [
            open_upload(f.read_bytes(), max_pixels=MAX_PIXELS) for f in files[start : start + BATCH]
        ]
        embedder.embed(pictures, batch_size=BATCH)
    return len(files) / (time.perf_counter() - started)


def run_job(client: httpx.Client, kind: str, params: dict) -> tuple[float, dict]:
    """Submit a job, wait for it; (seconds from its start to its end, its record)."""
    job = client.post("/api/v1/jobs", json={"type": kind, "params": params})
    job.raise_for_status()
    job_id = job.json()["id"]
    while True:
        record = client.get(f"/api/v1/jobs/{job_id}").json()
        if record["state"] in ("succeeded", "failed", "cancelled"):
            break
        time.sleep(0.5)
    if record["state"] != "succeeded":
        raise SystemExit(f"{kind} job {job_id} {record['state']}: {record['error']}")
    seconds = (
        datetime.fromisoformat(record["finished_at"]) - datetime.fromisoformat(record["started_at"])
    ).total_seconds()
    return seconds, record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="an IconThemes build (data/icons)")
    parser.add_argument("--images", type=int, default=1024, help="drawings, without --data")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    apply(ThreadPolicy.resolve(threads=1))
    rounds = []
    with tempfile.TemporaryDirectory(prefix="ingest-") as tmp:
        root = Path(tmp)
        files = image_folder(root / "datasets" / "images", args.data, args.images)
        artifact = root / "second-model"
        pretrained(artifact)
        env = {
            **CLEAN_ENVIRONMENT,
            "LOOKALIKE_DATA_DIR": str(root / "data"),
            "LOOKALIKE_DATASET_ROOT": str(root / "datasets"),
            "LOOKALIKE_AUTO_API_KEY": "false",
        }
        server = Server("lookalike", [sys.executable, "-m", "app.cli", "serve"], env, "/")
        try:
            server.settle()
            client = httpx.Client(base_url=f"http://127.0.0.1:{server.port}", timeout=60)
            second = client.post(
                "/api/v1/models",
                data={"name": "second"},
                files={
                    "card": ("card.json", (artifact / "card.json").read_bytes()),
                    "weights": ("model.safetensors", (artifact / "model.safetensors").read_bytes()),
                },
            )
            second.raise_for_status()
            warm = client.post("/api/v1/galleries", json={"name": "warm-up", "model_id": 1})
            warm_up = {"gallery_id": warm.json()["id"], "folder": "images/" + files[0].parent.name}
            run_job(client, "import", warm_up)
            params = {"gallery_id": warm_up["gallery_id"], "model_id": second.json()["id"]}
            run_job(client, "index", params)  # the second model loaded in the worker too
            for number in range(args.rounds):
                load = [round(os.getloadavg()[0], 2)]
                raw = raw_rate(artifact, files)
                gallery = client.post(
                    "/api/v1/galleries", json={"name": f"round-{number}", "model_id": 1}
                ).json()["id"]
                seconds, record = run_job(
                    client, "import", {"gallery_id": gallery, "folder": "images"}
                )
                imported = record["result"]["added"] / seconds
                load.append(round(os.getloadavg()[0], 2))
                params = {"gallery_id": gallery, "model_id": second.json()["id"]}
                seconds, record = run_job(client, "index", params)
                indexed = record["result"]["embedded"] / seconds
                load.append(round(os.getloadavg()[0], 2))
                rounds.append(
                    {
                        "raw_images_per_s": round(raw, 2),
                        "import_images_per_s": round(imported, 2),
                        "index_images_per_s": round(indexed, 2),
                        "load_average": load,
                    }
                )
                print(json.dumps({"round": number, **rounds[-1]}), flush=True)
        finally:
            server.stop()
    summary = {}
    for job in ("import", "index"):
        ratios = [r[f"{job}_images_per_s"] / r["raw_images_per_s"] for r in rounds]
        summary[job] = {
            "images_per_s": statistics.median(r[f"{job}_images_per_s"] for r in rounds),
            "vs_raw": round(statistics.median(ratios), 2),
            "vs_raw_min_max": [round(min(ratios), 2), round(max(ratios), 2)],
        }
    raw = statistics.median(r["raw_images_per_s"] for r in rounds)
    loads = [x for r in rounds for x in r["load_average"]]
    print(f"\n{len(files)} images, {args.rounds} rounds, load {min(loads)}-{max(loads)}")
    print(f"raw (1 thread, batches of {BATCH}): {raw:.1f} images/s")
    for job, row in summary.items():
        low, high = row["vs_raw_min_max"]
        rate, ratio = row["images_per_s"], row["vs_raw"]
        print(f"{job} job: {rate:.1f} images/s, {ratio:.2f}x raw ({low}-{high})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"rounds": rounds, "summary": summary}, indent=2))


if __name__ == "__main__":
    main()
