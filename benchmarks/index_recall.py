"""Recall@10 against exact search, and query time, of each index type through `GalleryIndex`.

Two kinds of --dim-dimensional unit vectors: `random` (Gaussian, normalised: no structure, the
hardest case for IVF and PQ) and `clustered` (100 points per centre, like learned embeddings of
classes), --queries held-out queries drawn the same way. For IVF-PQ every --nprobe (as a
fraction of nlist) is measured with every --refine factor (the refine step: candidates
re-scored with their exact vectors, as the service does with the stored embeddings; 1 = none).

    python benchmarks/index_recall.py --sizes 10000 100000 --json runs/index_recall.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from app.index_store import GalleryIndex, IndexType, recall_at, rerank_exact

K = 10


def unit(n: int, dim: int, rng: np.random.Generator, kind: str, centres: int) -> np.ndarray:
    vectors = rng.normal(size=(n, dim)).astype(np.float32)
    if kind == "clustered":
        means = np.random.default_rng(12345).normal(size=(centres, dim)).astype(np.float32)
        vectors = means[rng.integers(0, centres, n)] + 0.5 * vectors
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def exact_top(vectors: np.ndarray, queries: np.ndarray) -> list[list[tuple[int, float]]]:
    scores = queries @ vectors.T
    top = np.argsort(-scores, axis=1)[:, :K]
    return [[(int(j) + 1, float(scores[q, j])) for j in row] for q, row in enumerate(top)]


def timed_search(index: GalleryIndex, queries: np.ndarray, want: int) -> tuple[list, float]:
    rows, times = [], []
    for query in queries:
        started = time.perf_counter()
        rows.append(index.search(query[None, :], want)[0])
        times.append(time.perf_counter() - started)
    return rows, float(np.median(times) * 1000)


def measure(
    size: int, dim: int, queries: int, kind_of_data: str, nprobes: list[float], refines: list[int]
) -> list[dict]:
    rng = np.random.default_rng(size)
    vectors = unit(size, dim, rng, kind_of_data, max(1, size // 100))
    probes = unit(queries, dim, np.random.default_rng(1), kind_of_data, max(1, size // 100))
    ids = np.arange(1, size + 1, dtype=np.int64)
    truth = exact_top(vectors, probes)

    def vectors_of(wanted: np.ndarray) -> np.ndarray:
        return vectors[wanted - 1]

    rows = []
    for kind in (IndexType.flat, IndexType.hnsw, IndexType.ivfpq):
        started = time.perf_counter()
        index = GalleryIndex.build(dim, kind, ids, vectors)
        build_s = time.perf_counter() - started
        settings = [(None, 1)]
        if kind is IndexType.ivfpq:
            nlist = index.params["nlist"]
            settings = [(max(1, round(f * nlist)), r) for f in nprobes for r in refines]
        for nprobe, refine in settings:
            if nprobe is not None:
                index.params["nprobe"] = nprobe
            found, p50 = timed_search(index, probes, K * refine)
            started = time.perf_counter()
            if refine > 1:
                found = rerank_exact(probes, found, vectors_of, K)
            refine_ms = (time.perf_counter() - started) * 1000 / queries
            row = {
                "data": kind_of_data,
                "size": size,
                "dim": dim,
                "index": kind.value,
                "refine_factor": refine,
                "params": {k: v for k, v in index.params.items() if k != "compact_fraction"},
                "recall_at_10": round(recall_at(truth, found, K), 3),
                "search_p50_ms": round(p50, 3),
                "refine_ms_per_query": round(refine_ms, 3),
                "build_s": round(build_s, 1),
                "loadavg": round(os.getloadavg()[0], 2),
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--data", nargs="+", default=["random", "clustered"])
    parser.add_argument("--nprobe", type=float, nargs="+", default=[1 / 16, 1 / 4])
    parser.add_argument("--refine", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = [
        row
        for data in args.data
        for size in args.sizes
        for row in measure(size, args.dim, args.queries, data, args.nprobe, args.refine)
    ]
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
