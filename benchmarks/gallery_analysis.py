"""Near duplicates and clusters of a gallery: what they find on IconThemes, and what they cost
on a large gallery.

1. IconThemes (--icons): the test split embedded by the built-in model (Lite0 ImageNet
   features, 224 px); clustering with k chosen by silhouette (k-means up to --k-max, and
   agglomerative) and with k = the number of classes, scored against the labels (NMI, purity).
2. --size random unit vectors (128-d, uniform on the sphere, as the issue asks: no structure)
   plus --copies near copies of some of them (cosine about 0.97-0.99), written straight to a
   gallery's database rows (as benchmarks/index_backends.py does) with a flat FAISS index;
   timed: GET /duplicates (threshold 0.95) through the API, on the flat index and again after
   switching the gallery to HNSW (--index-types), and the cluster job's work
   (reading the stored vectors, k-means with k given, and with k chosen by silhouette).

    python benchmarks/gallery_analysis.py --icons data/icons --size 100000 --json runs/ga.json
"""

from __future__ import annotations

# isort: off
import training  # noqa: F401  (first: the service's thread environment, before torch loads)

# isort: on
import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from fastapi.testclient import TestClient

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.core.config import Settings  # noqa: E402
from app.main import create_app  # noqa: E402
from app.services.clusters import cluster_vectors, gallery_vectors, label_agreement  # noqa: E402
from app.services.galleries import get_gallery  # noqa: E402
from benchmarks.index_backends import DIM, fill  # noqa: E402
from training.checkpoint import export_pretrained, save_untrained_artifact  # noqa: E402
from training.evaluation.embed import embed_split_with_artifact, load_split  # noqa: E402

API = "/api/v1"


def timed(step):
    started = time.perf_counter()
    value = step()
    return value, round(time.perf_counter() - started, 2)


def icons(data: Path, k_max: int) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="builtin-") as tmp:
        export_pretrained(Path(tmp) / "m")
        split, _ = load_split(str(data), "test")
        embeddings, labels = embed_split_with_artifact(Path(tmp) / "m", split, num_workers=2)
    names = [split.class_names[label] for label in labels]
    rows = []
    for method, k in [
        ("kmeans", None),
        ("agglomerative", None),
        ("kmeans", split.num_classes),
        ("agglomerative", split.num_classes),
    ]:
        result, seconds = timed(
            lambda m=method, k=k: cluster_vectors(embeddings, m, k, k_max=k_max)
        )
        rows.append(
            {
                "method": method,
                "k_asked": k or f"silhouette 2-{k_max}",
                "k": result.k,
                "silhouette": round(result.silhouette or 0.0, 3),
                **label_agreement(result.assignments, names),
                "seconds": seconds,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def large(size: int, copies: int, k_max: int, root: Path, index_types: list[str]) -> dict:
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(size, DIM)).astype(np.float32)
    originals = rng.choice(size - copies, copies, replace=False)
    vectors[size - copies :] = vectors[originals] + 0.12 * rng.normal(size=(copies, DIM))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    save_untrained_artifact(root / "models" / "m", DIM)
    settings = Settings(
        data_dir=root / "data",
        model_root=root / "models",
        seed_builtin_model=False,
        auto_api_key=False,
        threads=2,
    )
    result: dict = {"size": size, "copies": copies, "load_average_start": os.getloadavg()[0]}
    with TestClient(create_app(settings)) as client:
        gallery_id, result["index_build_s"] = fill(client, size, vectors)
        for index_type in index_types:
            if index_type != "flat":
                _, result[f"{index_type}_build_s"] = timed(
                    lambda t=index_type: client.patch(
                        f"{API}/galleries/{gallery_id}", json={"index_type": t}
                    ).raise_for_status()
                )
            response, result[f"duplicates_{index_type}_s"] = timed(
                lambda: client.get(
                    f"{API}/galleries/{gallery_id}/duplicates", params={"threshold": 0.95}
                ).json()
            )
            result[f"duplicate_groups_{index_type}"] = response["total_groups"]
        runtime = client.app.state.runtime  # type: ignore[attr-defined]
        with runtime.session_factory() as session:
            (ids, stored), result["read_vectors_s"] = timed(
                lambda: gallery_vectors(session, get_gallery(session, gallery_id))
            )
        _, result["kmeans_k100_s"] = timed(lambda: cluster_vectors(stored, "kmeans", 100))
        chosen, result["kmeans_silhouette_s"] = timed(
            lambda: cluster_vectors(stored, "kmeans", k_max=k_max)
        )
        result["silhouette_k"], result["silhouette"] = chosen.k, round(chosen.silhouette or 0, 3)
        result["k_candidates"] = len(chosen.k_scores)
        result["vectors_read"] = len(ids)
    result["load_average_end"] = os.getloadavg()[0]
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--icons", type=Path)
    parser.add_argument("--size", type=int, default=100_000)
    parser.add_argument("--copies", type=int, default=1_000)
    parser.add_argument("--k-max", type=int, default=300)
    parser.add_argument("--index-types", nargs="+", default=["flat", "hnsw"])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    report: dict = {}
    if args.icons:
        report["icons"] = icons(args.icons, args.k_max)
    if args.size:
        with tempfile.TemporaryDirectory(prefix="gallery-analysis-") as tmp:
            report["large"] = large(args.size, args.copies, args.k_max, Path(tmp), args.index_types)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
