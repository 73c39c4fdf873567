"""Flat vs HNSW search latency on this CPU (`app.index_store.FLAT_SECONDS_PER_FLOAT`).

    .venv/bin/python benchmarks/index_latency.py [--sizes 100000 1000000] [--dim 128]

Builds `app.index_store.GalleryIndex` indexes of clustered synthetic unit vectors (real
embeddings are clustered; uniform noise is HNSW's worst case) and times single queries (the API's
case) and a batch of 32, k=10, through the full GalleryIndex path (normalisation, lock, params),
plus HNSW recall@10 against the exact answer.
"""

from __future__ import annotations

import argparse
import time

import faiss
import numpy as np

from app.index_store import GalleryIndex, IndexType


def clustered(n: int, dim: int, rng: np.random.Generator, centres: np.ndarray) -> np.ndarray:
    labels = rng.integers(0, len(centres), n)
    x = centres[labels] + 0.35 * rng.standard_normal((n, dim), dtype=np.float32)
    faiss.normalize_L2(x)
    return x


def time_queries(index: GalleryIndex, queries: np.ndarray, k: int = 10) -> dict[str, float]:
    single = []
    for q in queries:
        start = time.perf_counter()
        index.search(q[None], k)
        single.append((time.perf_counter() - start) * 1000)
    start = time.perf_counter()
    for i in range(0, len(queries), 32):
        index.search(queries[i : i + 32], k)
    batch_ms = (time.perf_counter() - start) * 1000 / len(queries)
    return {
        "p50_ms": float(np.median(single)),
        "p95_ms": float(np.percentile(single, 95)),
        "batched_ms_per_query": batch_ms,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--threads", type=int, default=0, help="faiss OpenMP threads; 0 = all")
    parser.add_argument("--kinds", nargs="+", default=["flat", "hnsw"], choices=["flat", "hnsw"])
    args = parser.parse_args()
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    print(f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} OpenMP threads")
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((2000, args.dim)).astype(np.float32)
    for n in args.sizes:
        vectors = clustered(n, args.dim, rng, centres)
        ids = np.arange(n, dtype=np.int64)
        queries = clustered(args.queries, args.dim, rng, centres)
        results = {}
        for kind in map(IndexType, args.kinds):
            start = time.perf_counter()
            index = GalleryIndex.build(args.dim, kind, ids, vectors)
            build_s = time.perf_counter() - start
            results[kind] = (index, time_queries(index, queries))
            print(f"n={n:>9,} {kind.value:5s} build {build_s:7.1f} s  {results[kind][1]}")
        if len(results) < 2:
            continue
        exact = results[IndexType.flat][0].search(queries, 10)
        approx = results[IndexType.hnsw][0].search(queries, 10)
        recall = np.mean(
            [
                len({i for i, _ in a} & {i for i, _ in e}) / 10
                for a, e in zip(approx, exact, strict=True)
            ]
        )
        print(f"n={n:>9,} hnsw recall@10 (efSearch 64) = {recall:.3f}", flush=True)
        del results


if __name__ == "__main__":
    main()
