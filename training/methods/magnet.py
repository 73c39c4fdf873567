"""Magnet loss training (Rippel et al., ICLR 2016, arXiv 1511.05939).

Each class of the training set is split into up to K clusters (of at least D examples each, see
`ClusterIndex`) by k-means on the current embeddings; batches are neighbourhoods of clusters (a
seed cluster, chosen by its recent loss, plus the nearest clusters of other classes, D examples
of each) and the Magnet loss pushes every example towards its own cluster's mean and away from
the impostor clusters' means. The cluster index is rebuilt every `refresh_every_epochs` epochs
from embeddings of the whole training set (eval mode, test transform: no augmentation).

Embeddings are L2-normalised before the loss, although the paper defines Magnet on raw
representations: the loss is invariant to a global scale anyway (`MagnetLoss`), and on the unit
sphere training, the k-means index (`compute_embeddings` normalises), the saved centroids and
the service's test-time embeddings all share one space, so the artifact's cluster classifier
(Magnet's kNN-on-clusters evaluation) applies to `Embedder.embed` output as it is.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import faiss
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.data.samplers import ResumableBatchSampler
from training.evaluation.cluster_classifier import ClusterClassifier
from training.evaluation.embed import compute_embeddings
from training.losses.magnet import MagnetLoss
from training.methods.base import Batch, Method, TrainingContext, register_method

if TYPE_CHECKING:
    from training.models.embedding import EmbeddingModel

log = logging.getLogger(__name__)


class ClusterIndex(nn.Module):
    """Per-class k-means clusters of the training set, and the per-example loss cache.

    Class c of n_c examples gets K_c = clamp(n_c // min_cluster_size, 1, K) clusters, ids
    first_c .. first_c + K_c - 1 in class order. The paper's neighbourhood sampling draws D
    examples uniformly from each cluster (Rippel et al. 2016, Sec. 3, training procedure),
    which needs clusters of at least D members: with min_cluster_size = D a class is never
    split into more clusters than it can fill, and `fit` moves examples into any cluster that
    k-means left smaller than that (a class smaller than min_cluster_size keeps one cluster of
    all it has). min_cluster_size = 1 is the former rule K_c = min(K, n_c), under which
    IconThemes' ~14 images per class made K = 8 clusters of one or two images, each drawn D
    times over.
    Everything is a buffer, so `Method.state_dict()` saves and a resumed run restores it.
    `seed_weights` is the seed-cluster distribution for the current epoch (`update_seed_weights`).
    """

    # The buffers (registered in __init__), declared for type checkers.
    cluster_labels: Tensor
    centroids: Tensor
    assignments: Tensor
    example_losses: Tensor
    loss_measured: Tensor
    seed_weights: Tensor
    fitted: Tensor

    def __init__(
        self,
        labels: Sequence[int],
        *,
        num_classes: int,
        clusters_per_class: int,
        dim: int,
        min_cluster_size: int = 1,
    ) -> None:
        super().__init__()
        if clusters_per_class < 1 or min_cluster_size < 1:
            raise ValueError("clusters_per_class and min_cluster_size must be at least 1")
        class_sizes = torch.bincount(
            torch.as_tensor(labels, dtype=torch.long), minlength=num_classes
        )
        clusters_of_class = torch.where(
            class_sizes > 0,
            (class_sizes // min_cluster_size).clamp(min=1, max=clusters_per_class),
            0,
        )
        num_clusters = int(clusters_of_class.sum())
        self.num_classes = num_classes
        self.min_cluster_size = min_cluster_size
        self.register_buffer(
            "cluster_labels", torch.repeat_interleave(torch.arange(num_classes), clusters_of_class)
        )
        self.register_buffer("centroids", torch.zeros(num_clusters, dim))
        self.register_buffer("assignments", torch.full((len(labels),), -1, dtype=torch.long))
        self.register_buffer("example_losses", torch.zeros(len(labels)))
        # A separate flag, not `loss != 0`: a measured loss of 0 is a measurement
        # (pumpikano/tf-magnet-loss#6).
        self.register_buffer("loss_measured", torch.zeros(len(labels), dtype=torch.bool))
        self.register_buffer("seed_weights", torch.ones(num_clusters))
        self.register_buffer("fitted", torch.tensor(False))

    @property
    def num_clusters(self) -> int:
        return len(self.cluster_labels)

    def fit(
        self,
        embeddings: np.ndarray,
        labels: np.ndarray,
        *,
        iterations: int,
        seed: int,
        warm_start: bool = True,
    ) -> None:
        """Cluster each class with k-means and assign every example (the paper's index, Sec. 3).

        k-means starts from k-means++ seeds (the paper's and tf-magnet-loss's initialisation;
        faiss's own is uniformly drawn points), or, once fitted and with `warm_start`, from the
        current centroids, as mbanani does. Then clusters under `min_cluster_size` take
        examples from the class's other clusters (`_fill_small_clusters`) and every centroid
        is set to its members' mean.
        """
        if len(embeddings) != len(self.assignments):
            raise ValueError(f"expected {len(self.assignments)} embeddings, got {len(embeddings)}")
        points = np.ascontiguousarray(embeddings, dtype=np.float32)
        cluster_labels = self.cluster_labels.cpu().numpy()
        previous = self.centroids.cpu().numpy() if warm_start and bool(self.fitted) else None
        centroids = np.zeros((self.num_clusters, points.shape[1]), dtype=np.float32)
        assignments = np.full(len(points), -1, dtype=np.int64)
        class_members = _group(np.asarray(labels), self.num_classes)
        cluster_bounds = np.searchsorted(cluster_labels, np.arange(self.num_classes + 1))
        for label, members in enumerate(class_members):
            first, end = cluster_bounds[label], cluster_bounds[label + 1]
            if len(members) < end - first:
                raise ValueError(
                    f"class {label} has {len(members)} examples but {end - first} clusters; "
                    "the labels differ from those the index was built for"
                )
            if len(members) == 0:
                continue
            class_points = points[members]
            k = int(end - first)
            if previous is None:
                init = _kmeans_plus_plus(class_points, k, np.random.default_rng([seed, label]))
            else:
                init = previous[first:end]
            kmeans = faiss.Kmeans(
                points.shape[1],
                k,
                niter=iterations,
                seed=seed,
                min_points_per_centroid=1,  # silences faiss's warning for small classes
            )
            kmeans.train(class_points, init_centroids=init)
            _, nearest = kmeans.index.search(class_points, 1)
            local = _fill_small_clusters(
                class_points, nearest[:, 0].astype(np.int64), kmeans.centroids,
                self.min_cluster_size,
            )  # fmt: skip
            sizes = np.bincount(local, minlength=k)
            sums = np.zeros((k, points.shape[1]), dtype=np.float64)
            np.add.at(sums, local, class_points)
            centroids[first:end] = np.where(
                sizes[:, None] > 0, sums / np.maximum(sizes, 1)[:, None], kmeans.centroids
            )
            assignments[members] = first + local
        self.centroids.copy_(torch.from_numpy(centroids))
        self.assignments.copy_(torch.from_numpy(assignments))
        self.fitted.fill_(True)

    def record_losses(self, indices: Tensor, losses: Tensor) -> None:
        """Cache the latest loss of each example (tf-magnet-loss magnet_tools.py)."""
        self.example_losses[indices] = losses.detach().to(self.example_losses.dtype)
        self.loss_measured[indices] = True

    def update_seed_weights(self) -> None:
        """Seed probability of a cluster = the mean cached loss of its measured members.

        Uniform before any loss exists. Once some exist, a cluster with no measured member
        (new after a refresh, or never drawn) weighs the mean measured loss: our choice, where
        tf-magnet-loss takes the mean of an empty set (NaN) and mbanani the sum of all clusters'
        losses. Empty clusters weigh 0; if every weight is 0 the draw is uniform again.
        """
        if not bool(self.fitted):
            raise RuntimeError("the Magnet cluster index is empty; fit it first")
        assignments = self.assignments.cpu().numpy()
        losses = self.example_losses.cpu().numpy().astype(np.float64)
        measured = self.loss_measured.cpu().numpy()
        sizes = np.bincount(assignments, minlength=self.num_clusters)
        weights = np.ones(self.num_clusters)
        if measured.any():
            counts = np.bincount(assignments[measured], minlength=self.num_clusters)
            sums = np.bincount(
                assignments[measured], weights=losses[measured], minlength=self.num_clusters
            )
            prior = losses[measured].mean()
            weights = np.where(counts > 0, sums / np.maximum(counts, 1), prior)
        weights = np.where(sizes > 0, weights, 0.0)
        if weights.sum() <= 0:
            weights = (sizes > 0).astype(np.float64)
        self.seed_weights.copy_(torch.from_numpy(weights))


@dataclass(frozen=True)
class _ClusterSnapshot:
    """A CPU copy of the cluster index, taken when a sampler epoch starts."""

    centroids: np.ndarray  # (C, d)
    cluster_labels: np.ndarray  # (C,)
    seed_probabilities: np.ndarray  # (C,)
    members: list[np.ndarray]  # example indices of each cluster
    sizes: np.ndarray  # (C,) len(members)

    @classmethod
    def of(cls, index: ClusterIndex) -> _ClusterSnapshot:
        if not bool(index.fitted):
            raise RuntimeError("the Magnet cluster index is empty; fit it first")
        weights = index.seed_weights.cpu().numpy().astype(np.float64)
        members = _group(index.assignments.cpu().numpy(), index.num_clusters)
        return cls(
            centroids=index.centroids.cpu().numpy().astype(np.float64),
            cluster_labels=index.cluster_labels.cpu().numpy(),
            seed_probabilities=weights / weights.sum(),
            members=members,
            sizes=np.array([len(m) for m in members]),
        )

    def nearest_impostors(self, cluster: int, count: int) -> np.ndarray:
        """The `count` non-empty clusters of other classes nearest to `cluster`'s centroid."""
        distances = np.square(self.centroids - self.centroids[cluster]).sum(axis=1)
        candidates = np.flatnonzero(
            (self.cluster_labels != self.cluster_labels[cluster]) & (self.sizes > 0)
        )
        return candidates[np.argsort(distances[candidates], kind="stable")[:count]]


class MagnetBatchSampler(ResumableBatchSampler):
    """Neighbourhood batches (Rippel et al.): a seed cluster drawn with the index's
    `seed_weights`, its M - 1 nearest clusters of other classes, D examples of each.

    Batches list the seed cluster's D examples first, then the impostors' by distance. D
    examples are drawn uniformly without replacement, as in the paper (Sec. 3); with the
    method's default min_cluster_size = D only a class of fewer than D images has a smaller
    cluster, and it is drawn with replacement (our choice among the fallbacks of
    tf-magnet-loss#5; mbanani drops such clusters, which would leave SOP-sized classes
    unsampled). Each batch uses a generator seeded by
    (seed, epoch, batch) and the index as it is when iteration starts, so a resumed run (which
    restores the index) replays an epoch exactly, with or without DataLoader workers.
    """

    def __init__(
        self,
        index: ClusterIndex,
        *,
        clusters_per_batch: int,
        examples_per_cluster: int,
        num_batches: int,
        seed: int = 0,
    ) -> None:
        super().__init__(seed)
        self.index = index
        self.clusters_per_batch = clusters_per_batch
        self.examples_per_cluster = examples_per_cluster
        self.num_batches = num_batches

    @property
    def batches_per_rank(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[int]]:
        snapshot = _ClusterSnapshot.of(self.index)
        for number in range(self.start_batch, self.num_batches):
            yield self._draw_batch(snapshot, number)

    def _draw_batch(self, snapshot: _ClusterSnapshot, number: int) -> list[int]:
        rng = self.batch_rng(number)
        seed_cluster = rng.choice(len(snapshot.cluster_labels), p=snapshot.seed_probabilities)
        impostors = snapshot.nearest_impostors(seed_cluster, self.clusters_per_batch - 1)
        batch = [
            rng.choice(
                snapshot.members[cluster],
                size=self.examples_per_cluster,
                replace=snapshot.sizes[cluster] < self.examples_per_cluster,
            )
            for cluster in (seed_cluster, *impostors)
        ]
        return np.concatenate(batch).tolist()


@register_method
class MagnetMethod(Method):
    """Magnet loss on neighbourhood batches of per-class k-means clusters (Rippel et al. 2016).

    Deviation: the seed-cluster distribution is recomputed from the loss cache once per epoch
    (as mbanani does), not after every batch (tf-magnet-loss). DataLoader workers draw batches
    ahead of training, so per-batch updates would make batches depend on the worker count and
    break exact resume; the cache itself is written after every step. The artifact carries
    the centroids, their classes and the running batch variance for `ClusterClassifier`; the
    card lists the class names the centroid labels index.
    """

    name = "magnet"
    running_variance: Tensor  # a buffer: the loss's running estimate of the batch variance

    def __init__(
        self,
        *,
        num_classes: int,
        embedding_dim: int,
        clusters_per_batch: int = 8,  # M: tf-magnet-loss, vithursant and mbanani
        examples_per_cluster: int = 4,  # D: mbanani; tf/vithursant use 8 on MNIST
        clusters_per_class: int = 8,  # K (the most per class): tf, vithursant, mbanani
        # Fewest members per cluster (None: examples_per_cluster, so D can be drawn without
        # replacement, as the paper's sampling assumes); 1 = the former K_c = min(K, n_c).
        min_cluster_size: int | None = None,
        alpha: float = 1.0,  # tf and vithursant; the paper's value is UNVERIFIED
        detach_variance: bool = True,  # our choice for stability (mbanani#1 NaNs)
        refresh_every_epochs: int = 1,  # vithursant and mbanani
        kmeans_iterations: int = 20,  # k-means++, ~20 iterations (tf-magnet-loss)
        # Refreshes start k-means from the current centroids (mbanani); False: from fresh
        # k-means++ seeds every time (tf-magnet-loss). The paper (Sec. 3) does not say.
        kmeans_warm_start: bool = True,
        # The classifier's "running average" of the batch variance (Rippel et al.): our exponential
        # average; mbanani averages the last epoch's batches.
        variance_momentum: float = 0.9,
    ) -> None:
        if clusters_per_batch < 2:
            raise ValueError(f"clusters_per_batch must be at least 2, got {clusters_per_batch}")
        if examples_per_cluster < 2:
            raise ValueError(
                f"examples_per_cluster must be at least 2 to estimate cluster means, "
                f"got {examples_per_cluster}"
            )
        if clusters_per_class < 1 or refresh_every_epochs < 1 or kmeans_iterations < 1:
            raise ValueError(
                "clusters_per_class, refresh_every_epochs and kmeans_iterations must be >= 1"
            )
        if min_cluster_size is not None and min_cluster_size < 1:
            raise ValueError(f"min_cluster_size must be at least 1, got {min_cluster_size}")
        if not 0.0 <= variance_momentum < 1.0:
            raise ValueError(f"variance_momentum must lie in [0, 1), got {variance_momentum}")
        super().__init__(
            num_classes=num_classes,
            embedding_dim=embedding_dim,
            clusters_per_batch=clusters_per_batch,
            examples_per_cluster=examples_per_cluster,
            clusters_per_class=clusters_per_class,
            min_cluster_size=min_cluster_size,
            alpha=alpha,
            detach_variance=detach_variance,
            refresh_every_epochs=refresh_every_epochs,
            kmeans_iterations=kmeans_iterations,
            kmeans_warm_start=kmeans_warm_start,
            variance_momentum=variance_momentum,
        )
        self.clusters_per_batch = clusters_per_batch
        self.examples_per_cluster = examples_per_cluster
        self.clusters_per_class = clusters_per_class
        self.min_cluster_size = (
            examples_per_cluster if min_cluster_size is None else min_cluster_size
        )
        self.kmeans_warm_start = kmeans_warm_start
        self.refresh_every_epochs = refresh_every_epochs
        self.kmeans_iterations = kmeans_iterations
        self.variance_momentum = variance_momentum
        self.criterion = MagnetLoss(alpha=alpha, detach_variance=detach_variance)
        self.register_buffer("running_variance", torch.tensor(float("nan")))
        self.index: ClusterIndex | None = None
        self.class_names: list[str] = []

    @property
    def batch_size(self) -> int:
        return self.clusters_per_batch * self.examples_per_cluster

    def setup(self, run: TrainingContext) -> None:
        if run.world_size > 1:
            raise ValueError(
                "magnet trains in one process only: its cluster index and loss cache are not "
                "shared between ranks; run without torchrun"
            )
        if run.cfg.batch_size != self.batch_size:
            raise ValueError(
                f"magnet batches hold clusters_per_batch x examples_per_cluster = "
                f"{self.clusters_per_batch} x {self.examples_per_cluster} = {self.batch_size} "
                f"images, but batch_size is {run.cfg.batch_size}; pass --batch-size "
                f"{self.batch_size} or change --param clusters_per_batch / examples_per_cluster"
            )
        train = run.train
        self.index = ClusterIndex(
            train.labels,
            num_classes=train.num_classes,
            clusters_per_class=self.clusters_per_class,
            dim=run.model.embedding_dim,
            min_cluster_size=self.min_cluster_size,
        )
        clusters_of_class = torch.bincount(self.index.cluster_labels)
        fewest_impostors = self.index.num_clusters - int(clusters_of_class.max())
        if fewest_impostors < self.clusters_per_batch - 1:
            raise ValueError(
                f"a batch needs {self.clusters_per_batch - 1} impostor clusters of other classes "
                f"but some class has only {fewest_impostors}; lower clusters_per_batch"
            )
        self.class_names = list(train.class_names)

    def on_epoch_start(self, run: TrainingContext, epoch: int) -> None:
        if not bool(self.cluster_index.fitted) or epoch % self.refresh_every_epochs == 0:
            self.refresh(run)
        self.cluster_index.update_seed_weights()

    def refresh(self, run: TrainingContext) -> None:
        """Re-embed the training set (test transform) and re-cluster it."""
        started = time.perf_counter()
        cfg = run.cfg
        embeddings, labels = compute_embeddings(
            run.model,
            run.train,
            run.transform,
            batch_size=cfg.eval_batch_size,
            num_workers=cfg.num_workers,
            device=run.device,
            channels_last=cfg.channels_last,
        )
        self.cluster_index.fit(
            embeddings,
            labels,
            iterations=self.kmeans_iterations,
            seed=cfg.seed,
            warm_start=self.kmeans_warm_start,
        )
        log.info(
            "magnet: %d clusters refreshed in %.1fs",
            self.cluster_index.num_clusters,
            time.perf_counter() - started,
        )

    def batch_sampler(self, run: TrainingContext) -> MagnetBatchSampler:
        return MagnetBatchSampler(
            self.cluster_index,
            clusters_per_batch=self.clusters_per_batch,
            examples_per_cluster=self.examples_per_cluster,
            num_batches=run.iterations_per_epoch,
            seed=run.cfg.seed,
        )

    def training_step(self, model: EmbeddingModel, batch: Batch) -> tuple[Tensor, dict]:
        embeddings = F.normalize(model(batch.images[0])["embedding"].float(), dim=1)
        clusters = self.cluster_index.assignments[batch.indices]
        losses, variance = self.criterion.per_example(embeddings, clusters, batch.labels)
        self.cluster_index.record_losses(batch.indices, losses)
        self._update_running_variance(variance.detach())
        # `active`: the share of examples inside the hinge, i.e. with a gradient; near 0 means
        # the batches are too easy (e.g. clusters drawn from one or two images).
        active = (losses.detach() > 0).float().mean()
        return losses.mean(), {"variance": variance.detach(), "active": active}

    def _update_running_variance(self, variance: Tensor) -> None:
        average = torch.lerp(variance, self.running_variance, self.variance_momentum)
        self.running_variance.copy_(torch.where(self.running_variance.isnan(), variance, average))

    @property
    def cluster_index(self) -> ClusterIndex:
        if self.index is None:
            raise RuntimeError("the Magnet method has no cluster index before setup(run)")
        return self.index

    def classifier(self, L: int = 8) -> ClusterClassifier:
        """Magnet's kNN-on-clusters classifier of the current index and running variance."""
        return ClusterClassifier(
            self.cluster_index.centroids.cpu(),
            self.cluster_index.cluster_labels.cpu(),
            self.running_variance.cpu(),
            L=L,
        )

    def artifact_tensors(self) -> dict[str, Tensor]:
        if self.index is None or not bool(self.index.fitted) or self.running_variance.isnan():
            return {}
        return self.classifier().to_extras()

    def card(self) -> dict[str, object]:
        return {**super().card(), "class_names": self.class_names}


def _group(ids: np.ndarray, count: int) -> list[np.ndarray]:
    """Positions of each id 0 .. count - 1 in `ids` (empty arrays for absent ids)."""
    order = np.argsort(ids, kind="stable")
    bounds = np.searchsorted(ids[order], np.arange(count + 1))
    return [order[bounds[i] : bounds[i + 1]] for i in range(count)]


def _kmeans_plus_plus(points: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeds (Arthur & Vassilvitskii 2007): the first centre uniformly, each next one
    with probability proportional to the squared distance to the nearest centre so far."""
    first = int(rng.integers(len(points)))
    seeds = [first]
    nearest = np.square(points - points[first]).sum(axis=1).astype(np.float64)
    for _ in range(1, k):
        total = nearest.sum()
        chosen = (
            int(rng.choice(len(points), p=nearest / total))
            if total > 0
            else int(rng.integers(len(points)))
        )
        seeds.append(chosen)
        nearest = np.minimum(nearest, np.square(points - points[chosen]).sum(axis=1))
    return np.ascontiguousarray(points[seeds], dtype=np.float32)


def _fill_small_clusters(
    points: np.ndarray, assignment: np.ndarray, centres: np.ndarray, min_size: int
) -> np.ndarray:
    """Move examples so every cluster holds at least `min_size` (when the class has
    len(centres) * min_size examples; else as many as it can).

    While some cluster is short, the smallest one (lowest id on ties) takes, from the clusters
    above `min_size`, the example nearest its current mean (its k-means centre if empty).
    Every move lowers the total shortfall by one, so at most len(centres) * min_size moves are
    made; deterministic. Returns the new local assignment.
    """
    assignment = assignment.copy()
    sizes = np.bincount(assignment, minlength=len(centres))
    while (sizes < min_size).any():
        donors = sizes[assignment] > min_size
        if not donors.any():
            break  # fewer than k * min_size examples: nothing more to move
        short = int(np.argmin(sizes))
        own = assignment == short
        centre = points[own].mean(axis=0) if own.any() else centres[short]
        candidates = np.flatnonzero(donors)
        distances = np.square(points[candidates] - centre).sum(axis=1)
        moved = candidates[int(np.argmin(distances))]
        sizes[assignment[moved]] -= 1
        sizes[short] += 1
        assignment[moved] = short
    return assignment
