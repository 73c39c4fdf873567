"""Magnet's kNN-on-clusters classifier (Rippel et al., ICLR 2016, arXiv 1511.05939).

A query is classified by its L nearest training-cluster centroids rather than by individual
training images, each centroid voting exp(-|r - mu|^2 / (2 s^2)) for its class, with s^2 the
running average of the training batches' variance. The model artifact of a Magnet run carries
the centroids, their classes and s^2 as extras, so the service can rebuild the classifier from
`load_embedder(path).extras` alone.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

# Names of the artifact extras (`training.checkpoint`) that hold the classifier.
CENTROIDS_KEY = "cluster_centroids"
CENTROID_LABELS_KEY = "cluster_labels"
VARIANCE_KEY = "cluster_variance"

ArrayLike = np.ndarray | torch.Tensor


class ClusterClassifier:
    """P(c | r) = sum over the L nearest centroids of class c of exp(-|r - mu|^2 / (2 s^2)),
    divided by the same sum over all L (a softmax over the L centroids, summed per class).

    Centroids, queries and s^2 must live in one space: a Magnet model's test-time (unit-length)
    embeddings. `centroid_labels` are training-class indices; the run's card lists the class
    names in that order. mbanani's `softkNC_metrics` uses the unsquared distance in the
    exponent; the paper's squared distance is used here.
    """

    def __init__(
        self,
        centroids: ArrayLike,
        centroid_labels: ArrayLike,
        variance: float | ArrayLike,
        L: int = 8,  # nearest centroids per query: CLI value of mbanani/pytorch-magnet-loss
    ) -> None:
        self.centroids = np.asarray(centroids, dtype=np.float32)
        self.centroid_labels = np.asarray(centroid_labels, dtype=np.int64)
        self.variance = float(np.asarray(variance))
        if self.centroids.ndim != 2 or len(self.centroids) == 0:
            raise ValueError(
                f"centroids must be a non-empty (C, d) array, got {self.centroids.shape}"
            )
        if self.centroid_labels.shape != (len(self.centroids),):
            raise ValueError(
                f"centroid_labels must have shape ({len(self.centroids)},), "
                f"got {self.centroid_labels.shape}"
            )
        if self.centroid_labels.min() < 0:
            raise ValueError("centroid_labels must be class indices (>= 0)")
        if not self.variance > 0:
            raise ValueError(f"variance must be positive, got {self.variance}")
        if L < 1:
            raise ValueError(f"L must be at least 1, got {L}")
        self.L = min(L, len(self.centroids))
        self.num_classes = int(self.centroid_labels.max()) + 1

    @classmethod
    def from_extras(cls, extras: Mapping[str, torch.Tensor], L: int = 8) -> ClusterClassifier:
        """Rebuild the classifier from a model artifact's extras (`Embedder.extras`)."""
        missing = [k for k in (CENTROIDS_KEY, CENTROID_LABELS_KEY, VARIANCE_KEY) if k not in extras]
        if missing:
            raise ValueError(
                f"the model artifact has no cluster classifier (missing extras: "
                f"{', '.join(missing)}); only Magnet runs save one"
            )
        return cls(extras[CENTROIDS_KEY], extras[CENTROID_LABELS_KEY], extras[VARIANCE_KEY], L=L)

    def to_extras(self) -> dict[str, torch.Tensor]:
        """The tensors `from_extras` reads back, for `Method.artifact_tensors`."""
        return {
            CENTROIDS_KEY: torch.from_numpy(self.centroids),
            CENTROID_LABELS_KEY: torch.from_numpy(self.centroid_labels),
            VARIANCE_KEY: torch.tensor(self.variance, dtype=torch.float32),
        }

    def predict(self, embeddings: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
        """(predicted class (Q,), class probabilities (Q, num_classes)) for queries (Q, d).

        Classes with no centroid among a query's L nearest get probability 0.
        """
        queries = np.asarray(embeddings, dtype=np.float64)
        if queries.ndim != 2 or queries.shape[1] != self.centroids.shape[1]:
            raise ValueError(
                f"embeddings must have shape (Q, {self.centroids.shape[1]}), got {queries.shape}"
            )
        centroids = self.centroids.astype(np.float64)
        squared_distances = np.maximum(
            (queries**2).sum(axis=1, keepdims=True)
            - 2.0 * queries @ centroids.T
            + (centroids**2).sum(axis=1)[None, :],
            0.0,
        )
        nearest = np.argpartition(squared_distances, self.L - 1, axis=1)[:, : self.L]
        logits = -np.take_along_axis(squared_distances, nearest, axis=1) / (2.0 * self.variance)
        weights = np.exp(logits - logits.max(axis=1, keepdims=True))
        weights /= weights.sum(axis=1, keepdims=True)
        scores = np.zeros((len(queries), self.num_classes), dtype=np.float64)
        rows = np.repeat(np.arange(len(queries)), self.L)
        np.add.at(scores, (rows, self.centroid_labels[nearest].ravel()), weights.ravel())
        return scores.argmax(axis=1), scores
