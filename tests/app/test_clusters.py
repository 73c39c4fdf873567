"""Clustering a gallery: the algorithms on vectors with a known answer, and the stored
clusterings through the API (the `cluster` job runs in the live server of test_client.py)."""

from __future__ import annotations

import numpy as np
import pytest

from app.services import clusters
from app.services.clusters import candidate_ks, cluster_vectors, label_agreement
from app.services.errors import Invalid

SIZES = [60, 45, 35, 25, 15]  # five blobs of different sizes, so cluster numbers are checkable


def blobs(seed: int = 0, spread: float = 0.15) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(len(SIZES), 24))
    points = np.concatenate(
        [c + spread * rng.normal(size=(n, 24)) for c, n in zip(centres, SIZES, strict=True)]
    )
    truth = np.repeat(np.arange(len(SIZES)), SIZES)
    points /= np.linalg.norm(points, axis=1, keepdims=True)
    return points.astype(np.float32), truth


@pytest.mark.parametrize("method", ["kmeans", "agglomerative"])
def test_the_silhouette_finds_k_and_clusters_are_numbered_by_size(method):
    vectors, truth = blobs()
    steps: list[tuple[int, int]] = []
    result = cluster_vectors(vectors, method, k_max=12, progress=lambda *s: steps.append(s))
    assert result.k == 5
    assert max(result.k_scores, key=lambda k: result.k_scores[k]) == 5
    ks = candidate_ks(2, 12)
    assert set(result.k_scores) == set(ks) and steps[-1] == (len(ks), len(ks))
    assert np.bincount(result.assignments).tolist() == SIZES  # 0 is the largest
    labels = [f"blob{t}" for t in truth]
    assert label_agreement(result.assignments, labels) == {"nmi": 1.0, "purity": 1.0}
    # Each member is nearer its own centre than the blobs are to each other.
    assert result.centre_scores.min() > 0.8 and result.silhouette > 0.7


def test_a_given_k_is_used_and_labels_may_be_missing():
    vectors, truth = blobs(seed=1)
    result = cluster_vectors(vectors, "kmeans", k=2)
    assert result.k == 2 and result.k_scores == {}
    partial = [None if i % 2 else f"blob{t}" for i, t in enumerate(truth)]
    agreement = label_agreement(cluster_vectors(vectors, k=5).assignments, partial)
    assert agreement == {"nmi": 1.0, "purity": 1.0}
    assert label_agreement(result.assignments, [None] * len(truth)) == {}


def test_impossible_requests_are_refused(monkeypatch):
    vectors, _ = blobs()
    with pytest.raises(Invalid, match="at least 2 images"):
        cluster_vectors(vectors[:1])
    with pytest.raises(Invalid, match="k must be between 1 and the number of images"):
        cluster_vectors(vectors[:10], k=11)
    monkeypatch.setattr(clusters, "AGGLOMERATIVE_MAX_IMAGES", 100)
    with pytest.raises(Invalid, match=r"limited to 100 images.*use kmeans"):
        cluster_vectors(vectors, "agglomerative")
    assert candidate_ks(2, 2) == [2] and candidate_ks(2, 1000)[-1] == 1000
    assert len(candidate_ks(2, 1000)) == 12
