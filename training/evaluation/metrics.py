"""Retrieval and clustering metrics for deep metric learning, as DiVA's and PML's code compute them.

Retrieval is leave-one-out over the evaluated set (query set = reference set, self excluded; the
convention of Song et al. 2016, "Deep Metric Learning via Lifted Structured Feature Embedding"),
ranked by exact L2 distance in a faiss flat index. Clustering metrics run faiss k-means with
K = number of classes in the evaluated set (as pytorch-metric-learning's AccuracyCalculator
does). Nothing here builds an N x N matrix: kNN results are processed in blocks of queries and
pair counts come from the class/cluster contingency table.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence

import faiss
import numpy as np
import torch
from rich.table import Table
from sklearn.metrics import normalized_mutual_info_score
from sklearn.metrics.cluster import pair_confusion_matrix

DEFAULT_KS: tuple[int, ...] = (1, 2, 4, 8)

# faiss GPU k-selection handles at most this many neighbours per query
# (faiss/gpu/utils/DeviceDefs.cuh, GPU_MAX_SELECTION_K); larger k falls back to the CPU index.
_GPU_MAX_K = 2048
# Upper bound on neighbour ids held at once (~100 MB with distances), so 60k queries with
# k = 1000 (SOP Recall@1000) never materialise the full N x k result.
_MAX_RESULT_ENTRIES = 1 << 23
_KMEANS_ITERATIONS = 20  # DiVA metrics/nmi.py and PML FaissKMeans (utils/inference.py)
_METRIC_ORDER = ("nmi", "f1", "map@r", "r_precision")


def evaluate_embeddings(
    embeddings: np.ndarray,
    labels: np.ndarray,
    *,
    ks: Sequence[int] = DEFAULT_KS,
    num_clusters: int | None = None,
    seed: int = 0,
    with_clustering: bool = True,
) -> dict[str, float]:
    """All standard DML metrics on one labelled embedding set, as DiVA's and PML's code define them.

    Keys, in order: ``recall@K`` for each K, ``nmi`` and ``f1`` (only when `with_clustering`;
    k-means is the slow part on large sets), ``map@r``, ``r_precision``.
    """
    retrieval = retrieval_metrics(embeddings, labels, ks=ks)
    clustering = (
        clustering_metrics(embeddings, labels, num_clusters=num_clusters, seed=seed)
        if with_clustering
        else {}
    )
    merged = retrieval | clustering
    return {name: merged[name] for name in _ordered_metric_names(merged)}


def retrieval_metrics(
    embeddings: np.ndarray, labels: np.ndarray, *, ks: Sequence[int] = DEFAULT_KS
) -> dict[str, float]:
    """Leave-one-out Recall@K, MAP@R and R-precision, averaged over queries.

    Every sample queries all others. Queries whose label has no other sample are excluded, as
    PML's AccuracyCalculator does (utils/accuracy_calculator.py): they have no correct answer, so
    they would only pull every metric towards 0. The kNN depth is max(largest class - 1, max K),
    which makes MAP@R and R-precision exact (PML's docs/accuracy_calculation.md; PML issue #290).
    """
    points = _as_embedding_matrix(embeddings)
    codes, class_sizes = _encode_labels(labels, len(points))
    ks = _validated_ks(ks)
    num_relevant = class_sizes[codes] - 1
    query_ids = np.flatnonzero(num_relevant > 0)
    if query_ids.size == 0:
        raise ValueError("every label occurs once: no query has a correct neighbour to retrieve")
    k = min(max(int(num_relevant.max()), ks[-1]), len(points) - 1)
    hit_blocks = _neighbour_hits(
        _flat_l2_index(points, k + 1), codes, points[query_ids], codes[query_ids], k, query_ids
    )
    totals = dict.fromkeys([*(f"recall@{K}" for K in ks), "map@r", "r_precision"], 0.0)
    for block, hits in hit_blocks:
        for name, recalled in _recall_hits(hits, ks).items():
            totals[name] += float(recalled.sum())
        map_at_r, r_precision = _precision_within_r(hits, num_relevant[query_ids[block]])
        totals["map@r"] += float(map_at_r.sum())
        totals["r_precision"] += float(r_precision.sum())
    return {name: total / query_ids.size for name, total in totals.items()}


def recall_at_k_cross(
    query_emb: np.ndarray,
    query_labels: np.ndarray,
    ref_emb: np.ndarray,
    ref_labels: np.ndarray,
    ks: Sequence[int] = DEFAULT_KS,
) -> dict[str, float]:
    """Recall@K of queries against a separate gallery (no self exclusion).

    Queries whose label is absent from the gallery are excluded, mirroring the lone-query rule
    of `retrieval_metrics`.
    """
    queries = _as_embedding_matrix(query_emb, name="query_emb")
    references = _as_embedding_matrix(ref_emb, name="ref_emb")
    if queries.shape[1] != references.shape[1]:
        raise ValueError(
            f"query_emb has dimension {queries.shape[1]} but ref_emb has {references.shape[1]}"
        )
    query_labels = _as_label_vector(query_labels, len(queries), name="query_labels")
    ref_labels = _as_label_vector(ref_labels, len(references), name="ref_labels")
    ks = _validated_ks(ks)
    gallery_classes, ref_codes = np.unique(ref_labels, return_inverse=True)
    query_codes = _codes_in(gallery_classes, query_labels)
    answerable = query_codes >= 0
    if not answerable.any():
        raise ValueError("no query label occurs in the gallery: nothing can be retrieved")
    k = min(ks[-1], len(references))
    hit_blocks = _neighbour_hits(
        _flat_l2_index(references, k), ref_codes, queries[answerable], query_codes[answerable], k
    )
    totals = dict.fromkeys((f"recall@{K}" for K in ks), 0.0)
    for _, hits in hit_blocks:
        for name, recalled in _recall_hits(hits, ks).items():
            totals[name] += float(recalled.sum())
    return {name: total / int(answerable.sum()) for name, total in totals.items()}


def clustering_metrics(
    embeddings: np.ndarray,
    labels: np.ndarray,
    *,
    num_clusters: int | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """NMI and pairwise F1 of a k-means clustering against the labels (DiVA metrics/nmi.py, f1.py).

    `num_clusters` defaults to the number of classes *in the evaluated set*, not the training
    set: DiVA's choice of training classes gives SOP 11,318 clusters for 11,316 test classes.
    """
    points = _as_embedding_matrix(embeddings)
    codes, class_sizes = _encode_labels(labels, len(points))
    if num_clusters is None:
        num_clusters = len(class_sizes)
    clusters = kmeans_assignments(points, num_clusters, seed=seed)
    return {
        "nmi": float(normalized_mutual_info_score(codes, clusters)),
        "f1": pairwise_f1_score(codes, clusters),
    }


def kmeans_assignments(points: np.ndarray, num_clusters: int, *, seed: int = 0) -> np.ndarray:
    """Faiss k-means (20 iterations), then each point's nearest centroid, as DiVA and PML do."""
    if not 1 <= num_clusters <= len(points):
        raise ValueError(f"num_clusters must be in [1, {len(points)}], got {num_clusters}")
    kmeans = faiss.Kmeans(
        points.shape[1],
        num_clusters,
        niter=_KMEANS_ITERATIONS,
        seed=seed,
        gpu=_faiss_gpu_available(),
        # Only silences faiss's "too few points per centroid" warning; SOP has ~5 per class.
        min_points_per_centroid=1,
    )
    kmeans.train(points)
    _, nearest = kmeans.index.search(points, 1)
    return nearest[:, 0]


def pairwise_f1_score(labels: np.ndarray, clusters: np.ndarray) -> float:
    """Pairwise clustering F-measure: F1 of "same cluster" as a predictor of "same class".

    F1 = 2TP / (2TP + FP + FN) over unordered sample pairs (DiVA metrics/f1.py), with the pair
    counts from sklearn's contingency-based pair confusion matrix, so memory stays O(N).
    """
    pairs = pair_confusion_matrix(labels, clusters)
    true_positive = 2 * int(pairs[1, 1])
    denominator = true_positive + int(pairs[0, 1]) + int(pairs[1, 0])
    # No pair shares a class or a cluster: both partitions are all singletons and agree exactly.
    return true_positive / denominator if denominator else 1.0


def format_metrics_table(results: dict[str, dict[str, float]], title: str | None = None) -> Table:
    """A rich table with one row per run and metric columns in the fixed report order.

    Columns are the recall@K present in any run (by K), then nmi, f1, map@r, r_precision, then any
    other metric in first-seen order; a metric a run lacks shows as "-".
    """
    seen = dict.fromkeys(name for metrics in results.values() for name in metrics)
    columns = _ordered_metric_names(seen)
    table = Table(title=title)
    table.add_column("run")
    for name in columns:
        table.add_column(name, justify="right")
    for run, metrics in results.items():
        cells = (f"{metrics[name]:.4f}" if name in metrics else "-" for name in columns)
        table.add_row(run, *cells)
    return table


def _ordered_metric_names(names: Collection[str]) -> list[str]:
    """recall@K by ascending K, then the fixed metric order, then unknown names as given."""
    recalls = sorted((n for n in names if n.startswith("recall@")), key=lambda n: int(n[7:]))
    fixed = [n for n in _METRIC_ORDER if n in names]
    others = [n for n in names if n not in recalls and n not in _METRIC_ORDER]
    return [*recalls, *fixed, *others]


def _neighbour_hits(
    index: faiss.Index,
    reference_codes: np.ndarray,
    queries: np.ndarray,
    query_codes: np.ndarray,
    k: int,
    self_ids: np.ndarray | None = None,
) -> Iterator[tuple[slice, np.ndarray]]:
    """Per block of queries: its slice and a (block, k) bool matrix, does the i-th neighbour
    share the query's label.

    With `self_ids` (the queries' own rows in the index) the query itself is removed by index,
    not by distance 0, because datasets contain duplicate images whose distance is also 0.
    """
    block_size = max(1, _MAX_RESULT_ENTRIES // (k + 1))
    for start in range(0, len(queries), block_size):
        block = slice(start, start + block_size)
        if self_ids is None:
            _, found = index.search(queries[block], k)
        else:
            _, found = index.search(queries[block], k + 1)
            found = _without_self(found, self_ids[block])
        yield block, reference_codes[found] == query_codes[block, None]


def _without_self(found: np.ndarray, self_ids: np.ndarray) -> np.ndarray:
    """Drop each row's own id from k+1 neighbours, leaving k.

    When ties at distance 0 push the query out of its own k+1 list, the farthest neighbour is
    dropped instead, as PML does (utils/inference.py, return_results).
    """
    is_self = found == self_ids[:, None]
    is_self[~is_self.any(axis=1), -1] = True
    return found[~is_self].reshape(len(found), found.shape[1] - 1)


def _recall_hits(hits: np.ndarray, ks: Sequence[int]) -> dict[str, np.ndarray]:
    """Per query, whether any of the first K neighbours is correct (DML Recall@K, not IR recall)."""
    return {f"recall@{K}": np.asarray(hits[:, :K].any(axis=1)) for K in ks}


def _precision_within_r(
    hits: np.ndarray, num_relevant: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per-query MAP@R and R-precision, R = number of other samples of the query's class.

    MAP@R = (1/R) Σ_{i≤R} P@i · rel_i (Musgrave et al. 2020, "A Metric Learning Reality Check";
    PML's mean_average_precision_at_r). Written by hand because PML computes it only on several
    dense N x k torch tensors at once, while this works on one block of queries at a time.
    """
    r_max = int(num_relevant.max())
    ranks = np.arange(1, r_max + 1)
    relevant_in_top_r = hits[:, :r_max] & (ranks <= num_relevant[:, None])
    precision_at_rank = np.cumsum(relevant_in_top_r, axis=1) / ranks
    map_at_r = (precision_at_rank * relevant_in_top_r).sum(axis=1) / num_relevant
    r_precision = relevant_in_top_r.sum(axis=1) / num_relevant
    return map_at_r, r_precision


def _flat_l2_index(reference: np.ndarray, k: int) -> faiss.Index:
    """Exact L2 index over `reference`, on the GPU when possible for a k-NN search of depth k.

    L2 rather than inner product: inputs need not be normalised (the two agree when they are).
    """
    index = faiss.IndexFlatL2(reference.shape[1])
    if _faiss_gpu_available() and k <= _GPU_MAX_K:
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(reference)
    return index


def _faiss_gpu_available() -> bool:
    return torch.cuda.is_available() and faiss.get_num_gpus() > 0


def _as_embedding_matrix(embeddings: np.ndarray, name: str = "embeddings") -> np.ndarray:
    """C-contiguous float32 (what faiss accepts), rejecting shapes and values it would mis-rank."""
    points = np.ascontiguousarray(embeddings, dtype=np.float32)
    if points.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (samples, dim) array, got shape {points.shape}")
    if points.shape[0] == 0 or points.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {points.shape})")
    if not np.isfinite(points).all():
        bad_rows = np.flatnonzero(~np.isfinite(points).all(axis=1))
        raise ValueError(
            f"{name} contain NaN or inf (as float32) in {bad_rows.size} rows, "
            f"first at row {bad_rows[0]}"
        )
    return points


def _as_label_vector(labels: np.ndarray, num_samples: int, name: str = "labels") -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {labels.shape}")
    if len(labels) != num_samples:
        raise ValueError(f"{num_samples} embeddings but {len(labels)} {name}")
    return labels


def _encode_labels(labels: np.ndarray, num_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """Contiguous class codes 0..C-1 per sample and the size of each class."""
    _, codes, class_sizes = np.unique(
        _as_label_vector(labels, num_samples), return_inverse=True, return_counts=True
    )
    return codes, class_sizes


def _codes_in(classes: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Position of each label in the sorted `classes`, or -1 where it is absent."""
    positions = np.searchsorted(classes, labels).clip(max=len(classes) - 1)
    return np.where(classes[positions] == labels, positions, -1)


def _validated_ks(ks: Sequence[int]) -> list[int]:
    ks = sorted(set(ks))
    if not ks or ks[0] < 1:
        raise ValueError(f"ks must be positive neighbour counts, got {ks}")
    return ks
