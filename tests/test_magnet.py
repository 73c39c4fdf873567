"""Magnet loss (Rippel et al. 2016), its cluster index and sampler, cluster classifier, CLI run."""

from __future__ import annotations

import json
import math
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import training.methods.magnet  # noqa: F401  (registers the method for the CLI)
from training.checkpoint import load_embedder
from training.cli import app
from training.evaluation.cluster_classifier import ClusterClassifier
from training.losses.magnet import MagnetLoss
from training.methods.magnet import (
    ClusterIndex,
    MagnetBatchSampler,
    MagnetMethod,
    _fill_small_clusters,
    _kmeans_plus_plus,
)

# Two classes x one cluster x two examples in 2-D: cluster means (1, 0) and (1, 1), every
# squared distance to the own mean is 1, so s^2 = 4 / (4 - 1) = 4/3, and every squared distance
# to the other class's mean is 2. Each example: alpha + (1 - 2) / (2 * 4/3) = alpha - 3/8.
PAIRS = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 1.0], [2.0, 1.0]], dtype=torch.float64)
PAIR_CLUSTERS = torch.tensor([7, 7, 3, 3])
PAIR_LABELS = torch.tensor([0, 0, 1, 1])


# --- loss ------------------------------------------------------------------------------------


def test_loss_matches_hand_computed_values_and_gradient() -> None:
    embeddings = PAIRS.clone().requires_grad_(True)
    losses, variance = MagnetLoss(alpha=1.0).per_example(embeddings, PAIR_CLUSTERS, PAIR_LABELS)
    assert variance.item() == pytest.approx(4 / 3)
    torch.testing.assert_close(losses, torch.full((4,), 0.625, dtype=torch.float64))
    losses.mean().backward()
    # d/da of the mean, s^2 held fixed: (1/4)(3/8)(grad sum d_own - grad sum d_other), where
    # sum d_own gives 2(a - mu_0) = (-2, 0) and sum d_other gives 2(a - mu_1) plus the pull of
    # a on mu_0 seen from c and d: (-2, -2) + (0, -2).
    expected = torch.tensor([[0, 0.375], [0, 0.375], [0, -0.375], [0, -0.375]])
    torch.testing.assert_close(embeddings.grad, expected.double())


def test_variance_is_not_squared() -> None:
    # Dividing by 2 s^4 (tf-magnet-loss, MagnetLoss-PyTorch) would give 1 - 9/32 = 0.71875
    # here, and would make the loss depend on the embeddings' scale.
    loss = MagnetLoss(alpha=1.0)
    assert loss(PAIRS, PAIR_CLUSTERS, PAIR_LABELS).item() == pytest.approx(0.625)
    assert loss(PAIRS * 10, PAIR_CLUSTERS, PAIR_LABELS).item() == pytest.approx(0.625)


def test_hinge_clamps_at_zero_with_zero_gradient() -> None:
    embeddings = PAIRS.clone().requires_grad_(True)
    losses, _ = MagnetLoss(alpha=0.25).per_example(embeddings, PAIR_CLUSTERS, PAIR_LABELS)
    assert losses.tolist() == [0.0, 0.0, 0.0, 0.0]  # 0.25 - 3/8 < 0
    losses.sum().backward()
    assert not embeddings.grad.any()
    above = MagnetLoss(alpha=0.5).per_example(PAIRS, PAIR_CLUSTERS, PAIR_LABELS)[0]
    torch.testing.assert_close(above, torch.full((4,), 0.125, dtype=torch.float64))


@pytest.mark.parametrize("detach_variance", [True, False])
@pytest.mark.parametrize(
    ("embeddings", "clusters", "labels", "expected"),
    [
        # Identical embeddings: s^2 = 0 is floored, every distance is 0, so each loss is
        # alpha + log(number of impostor clusters): 1 for clusters 0 and 1, 1 + log 2 for 2.
        (
            torch.ones(6, 3),
            [0, 0, 1, 1, 2, 2],
            [0, 0, 0, 0, 1, 1],
            [1, 1, 1, 1, 1 + math.log(2), 1 + math.log(2)],
        ),
        # One cluster: no impostor, an empty denominator, loss 0.
        (torch.randn(4, 3, generator=torch.Generator().manual_seed(0)), [5] * 4, [2] * 4, [0] * 4),
        # Clusters a million units apart: exp(-d / 2s^2) underflows; the loss is 0.
        (
            torch.tensor([[0.0, 0.0], [1.0, 0.0], [1e6, 0.0], [1e6 + 1, 0.0]]),
            [0, 0, 1, 1],
            [0, 0, 1, 1],
            [0] * 4,
        ),
    ],
    ids=["identical", "one-cluster", "far-apart"],
)
def test_loss_and_gradients_stay_finite(embeddings, clusters, labels, expected, detach_variance):
    embeddings = embeddings.clone().requires_grad_(True)
    losses, _ = MagnetLoss(detach_variance=detach_variance).per_example(
        embeddings, torch.tensor(clusters), torch.tensor(labels)
    )
    torch.testing.assert_close(losses, torch.tensor(expected, dtype=torch.float32))
    losses.mean().backward()
    assert torch.isfinite(embeddings.grad).all()


def test_detaching_the_variance_changes_gradients_not_values() -> None:
    points = torch.tensor([[0.0, 0.0], [2.0, 0.5], [0.0, 1.0], [2.5, 1.0]], dtype=torch.float64)
    gradients, values = [], []
    for detach in (True, False):
        embeddings = points.clone().requires_grad_(True)
        loss = MagnetLoss(detach_variance=detach)(embeddings, PAIR_CLUSTERS, PAIR_LABELS)
        loss.backward()
        values.append(loss.item())
        gradients.append(embeddings.grad)
    assert values[0] == pytest.approx(values[1])
    assert not torch.allclose(gradients[0], gradients[1])


def test_denominator_is_every_batch_cluster_of_another_class_and_no_same_class_one() -> None:
    # 1-D, three clusters x two examples (paper eq. 5): A = {0, 2} (class 0, mean 1),
    # B = {1.5, 2.5} (class 0, mean 2), C = {2, 4} (class 1, mean 3). Own squared distances
    # 1, 1, 1/4, 1/4, 1, 1: s^2 = 4.5 / (6 - 1) = 0.9, 2 s^2 = 1.8.
    # - 2 in A: own 1, C 1; B (0 away) is its own class and stays out: alpha + 0 = 1.
    #   Were B counted, the loss would be 1 + 1/1.8 + log(e^(-1/1.8) + 1) = 2.01.
    # - 2.5 in B: own 1/4, C 1/4: 1. 0 in A and 1.5 in B: below zero, 0.
    # - 2 in C: own 1, and both A (1 away) and B (0 away) in the denominator.
    # - 4 in C: 1 + 1/1.8 + log(e^(-9/1.8) + e^(-4/1.8)) < 0, so 0.
    embeddings = torch.tensor([[0.0], [2.0], [1.5], [2.5], [2.0], [4.0]], dtype=torch.float64)
    clusters, labels = torch.tensor([0, 0, 1, 1, 2, 2]), torch.tensor([0, 0, 0, 0, 1, 1])
    losses, variance = MagnetLoss(alpha=1.0).per_example(embeddings, clusters, labels)
    assert variance.item() == pytest.approx(0.9)
    both = 1 + 1 / 1.8 + math.log(math.exp(-1 / 1.8) + 1)
    torch.testing.assert_close(losses, torch.tensor([0, 1, 0, 1, both, 0], dtype=torch.float64))


def test_a_cluster_spanning_two_classes_is_an_error() -> None:
    with pytest.raises(ValueError, match="more than one class"):
        MagnetLoss()(PAIRS, torch.tensor([0, 0, 0, 1]), PAIR_LABELS)


# --- cluster index ---------------------------------------------------------------------------


def test_per_class_kmeans_gives_a_small_class_one_cluster_per_example() -> None:
    # Class 0: two pairs far apart (K_0 = 2); class 1: one image (K_1 = min(2, 1) = 1);
    # class 2: two images (K_2 = 2, one each).
    points = np.array(
        [[0, 0], [0, 0.2], [5, 5], [5, 5.2], [9, 9], [3, 0], [0, 3]], dtype=np.float32
    )
    labels = np.array([0, 0, 0, 0, 1, 2, 2])
    index = ClusterIndex(labels.tolist(), num_classes=3, clusters_per_class=2, dim=2)
    assert index.cluster_labels.tolist() == [0, 0, 1, 2, 2]
    index.fit(points, labels, iterations=20, seed=0)
    assignments = index.assignments.tolist()
    assert assignments[0] == assignments[1] != assignments[2] == assignments[3]
    assert {assignments[0], assignments[2]} == {0, 1}
    assert assignments[4] == 2 and {assignments[5], assignments[6]} == {3, 4}
    for cluster in range(5):
        members = points[np.array(assignments) == cluster]
        np.testing.assert_allclose(index.centroids[cluster], members.mean(axis=0), atol=1e-6)


def test_refit_is_warm_started_from_the_current_centroids() -> None:
    points = np.array([[0, 0], [0, 0.2], [5, 5], [5, 5.2]], dtype=np.float32)
    labels = np.array([0, 0, 0, 0])
    index = ClusterIndex(labels.tolist(), num_classes=1, clusters_per_class=2, dim=2)
    index.fit(points, labels, iterations=20, seed=0)
    cold = index.assignments.clone()
    # Same data, same seed: only the starting centroids (now swapped) differ from the cold fit.
    index.centroids.copy_(index.centroids.flip(0))
    index.fit(points, labels, iterations=20, seed=0)
    assert index.assignments.tolist() == (1 - cold).tolist()


def test_refit_without_warm_start_reseeds_with_kmeans_plus_plus() -> None:
    points = np.array([[0, 0], [0, 0.2], [5, 5], [5, 5.2]], dtype=np.float32)
    labels = np.array([0, 0, 0, 0])
    index = ClusterIndex(labels.tolist(), num_classes=1, clusters_per_class=2, dim=2)
    index.fit(points, labels, iterations=20, seed=0, warm_start=False)
    cold = index.assignments.clone()
    index.centroids.copy_(index.centroids.flip(0))  # ignored: k-means++ seeds again
    index.fit(points, labels, iterations=20, seed=0, warm_start=False)
    assert index.assignments.tolist() == cold.tolist()


@pytest.mark.parametrize(
    ("min_cluster_size", "expected"),
    [
        # Classes of 14, 10, 3 and 21 images, K = 8, D = 4: K_c = clamp(n_c // 4, 1, 8).
        (4, [3, 2, 1, 5]),
        # The former rule K_c = min(K, n_c): IconThemes-sized classes get 8 clusters each.
        (1, [8, 8, 3, 8]),
    ],
)
def test_clusters_per_class_leave_room_for_d_examples(min_cluster_size, expected) -> None:
    labels = [0] * 14 + [1] * 10 + [2] * 3 + [3] * 21
    index = ClusterIndex(
        labels, num_classes=5, clusters_per_class=8, dim=2, min_cluster_size=min_cluster_size
    )  # class 4 has no example and no cluster
    assert torch.bincount(index.cluster_labels, minlength=5).tolist() == [*expected, 0]


def test_small_clusters_take_the_nearest_examples_of_larger_ones() -> None:
    # k-means left the outlier 100 alone; with a minimum of 3 it takes 5 (nearest to 100),
    # then 4 (nearest to the new mean 52.5), and cluster 0 keeps four.
    points = np.array([0, 1, 2, 3, 4, 5, 100], dtype=np.float64)[:, None]
    centres = np.array([[2.5], [100.0]])
    moved = _fill_small_clusters(points, np.array([0, 0, 0, 0, 0, 0, 1]), centres, 3)
    assert moved.tolist() == [0, 0, 0, 0, 1, 1, 1]
    # An empty cluster grows from its k-means centre; with too few examples to fill every
    # cluster, it stops when no cluster has any to spare.
    empty = _fill_small_clusters(points[:4], np.array([0, 0, 0, 0]), np.array([[0], [9]]), 2)
    assert empty.tolist() == [0, 0, 1, 1]
    short = _fill_small_clusters(points[:3], np.array([0, 0, 1]), centres, 2)
    assert sorted(np.bincount(short).tolist()) == [1, 2]


def test_fit_gives_every_cluster_at_least_min_cluster_size_members() -> None:
    # Class 0: seven points near the origin and one outlier; K_0 = 8 // 4 = 2, and 2-means
    # would isolate the outlier. Class 1: five points, K_1 = 1.
    rng = np.random.default_rng(0)
    points = np.concatenate([rng.normal(0, 0.1, (7, 2)), [[9.0, 9.0]], rng.normal(3, 0.1, (5, 2))])
    labels = np.array([0] * 8 + [1] * 5)
    for min_cluster_size, smallest in ((4, 4), (1, 1)):
        index = ClusterIndex(
            labels.tolist(), num_classes=2, clusters_per_class=8, dim=2,
            min_cluster_size=min_cluster_size,
        )  # fmt: skip
        index.fit(points.astype(np.float32), labels, iterations=20, seed=0)
        sizes = np.bincount(index.assignments.numpy(), minlength=index.num_clusters)
        assert sizes[index.cluster_labels.numpy() == 0].min() == smallest
        for cluster in range(index.num_clusters):
            members = points[index.assignments.numpy() == cluster]
            np.testing.assert_allclose(index.centroids[cluster], members.mean(0), atol=1e-5)


def test_kmeans_plus_plus_never_seeds_two_centres_on_one_point() -> None:
    # The second seed is drawn in proportion to the squared distance to the first: a copy of
    # the first point has probability 0, so the seeds are always {0, 10}.
    points = np.array([[0.0], [0.0], [10.0]], dtype=np.float32)
    for seed in range(20):
        seeds = _kmeans_plus_plus(points, 2, np.random.default_rng(seed))
        assert sorted(seeds[:, 0].tolist()) == [0.0, 10.0]
    rng = np.random.default_rng(1)
    np.testing.assert_array_equal(
        _kmeans_plus_plus(points, 2, np.random.default_rng(1)), _kmeans_plus_plus(points, 2, rng)
    )


def test_loss_cache_counts_measured_zeros_and_weights_clusters_by_mean_loss() -> None:
    index = _line_index()  # clusters 0..3 hold examples {0,1}, {2,3}, {4,5}, {6,7}
    assert index.seed_weights.tolist() == [1, 1, 1, 1]  # uniform before any loss
    index.record_losses(torch.tensor([0, 1, 2, 3, 4, 5]), torch.tensor([0, 0, 1, 1, 2, 4.0]))
    assert index.loss_measured.tolist() == [True] * 6 + [False] * 2
    index.update_seed_weights()
    # Cluster 0's zeros are measurements (weight 0, not "unmeasured"); cluster 3 has none and
    # weighs the mean measured loss 8/6.
    torch.testing.assert_close(index.seed_weights, torch.tensor([0, 1, 3, 4 / 3]))


# --- sampler ---------------------------------------------------------------------------------


def test_seed_clusters_are_drawn_uniformly_before_any_loss() -> None:
    counts = _seed_cluster_counts(_line_index(), batches=4000)
    for cluster in range(4):
        assert counts[cluster] / 4000 == pytest.approx(1 / 4, abs=0.03)


def test_seed_cluster_frequencies_follow_the_cached_losses() -> None:
    index = _line_index()
    index.record_losses(torch.tensor([0, 1, 2, 3, 4, 5]), torch.tensor([0, 0, 1, 1, 2, 4.0]))
    index.update_seed_weights()  # weights 0, 1, 3, 4/3 (previous test)
    counts = _seed_cluster_counts(index, batches=4000)
    assert counts[0] == 0
    for cluster, probability in ((1, 3 / 16), (2, 9 / 16), (3, 4 / 16)):
        assert counts[cluster] / 4000 == pytest.approx(probability, abs=0.03)


def test_batches_are_the_seed_and_its_nearest_impostors_with_d_examples_each() -> None:
    # Centroids on a line; the seed (cluster 0, class 0, at 0) has its own class's cluster 1
    # nearest, then an empty cluster 5 of class 2; the nearest non-empty impostors are cluster
    # 2 (class 1, at 1) and cluster 4 (class 2, at 2.5), before cluster 3 (class 1, at 3).
    labels = [0] * 6 + [1] * 3 + [2] * 2
    index = ClusterIndex(labels, num_classes=3, clusters_per_class=2, dim=1)
    index.centroids.copy_(torch.tensor([[0.0], [0.5], [1.0], [3.0], [2.5], [0.8]]))
    # Cluster sizes: 5, 1, 2, 1, 2, 0.
    index.assignments.copy_(torch.tensor([0, 0, 0, 0, 0, 1, 2, 2, 3, 4, 4]))
    index.fitted.fill_(True)
    index.seed_weights.copy_(torch.tensor([1.0, 0, 0, 0, 0, 0]))
    sampler = MagnetBatchSampler(
        index, clusters_per_batch=3, examples_per_cluster=4, num_batches=5, seed=1
    )
    for batch in sampler:
        clusters = index.assignments[batch].tolist()
        assert clusters == [0] * 4 + [2] * 4 + [4] * 4
        assert len(set(batch[:4])) == 4  # 5 members >= D: without replacement
        assert set(batch[4:8]) <= {6, 7} and set(batch[8:]) <= {9, 10}  # with replacement


def test_sampler_is_deterministic_per_seed_and_epoch_and_resumes_mid_epoch() -> None:
    index = _line_index()

    def epoch_batches(epoch: int, seed: int = 0, start_batch: int = 0) -> list[list[int]]:
        sampler = MagnetBatchSampler(
            index, clusters_per_batch=2, examples_per_cluster=2, num_batches=6, seed=seed
        )
        sampler.set_epoch(epoch, start_batch=start_batch)
        assert len(sampler) == 6 - start_batch
        return list(sampler)

    assert epoch_batches(0) == epoch_batches(0)
    assert epoch_batches(0) != epoch_batches(1)
    assert epoch_batches(0) != epoch_batches(0, seed=1)
    assert epoch_batches(1, start_batch=4) == epoch_batches(1)[4:]


def test_filled_clusters_are_sampled_without_replacement() -> None:
    # IconThemes-like: 6 classes of 10-15 images, K = 8, D = 4: every cluster holds >= 4
    # images, so each batch draws 4 distinct images of each of its clusters.
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(6), [10, 11, 12, 13, 14, 15])
    index = ClusterIndex(
        labels.tolist(), num_classes=6, clusters_per_class=8, dim=8, min_cluster_size=4
    )
    index.fit(rng.normal(size=(len(labels), 8)).astype(np.float32), labels, iterations=20, seed=0)
    index.update_seed_weights()
    sampler = MagnetBatchSampler(
        index, clusters_per_batch=4, examples_per_cluster=4, num_batches=50, seed=0
    )
    for batch in sampler:
        clusters = index.assignments[batch].view(4, 4)
        assert (clusters == clusters[:, :1]).all() and len(set(clusters[:, 0].tolist())) == 4
        assert len(set(batch)) == 16


def _line_index() -> ClusterIndex:
    """Two classes x two clusters of two examples, centroids at 0, 1, 2, 3 on a line."""
    index = ClusterIndex([0, 0, 0, 0, 1, 1, 1, 1], num_classes=2, clusters_per_class=2, dim=1)
    index.centroids.copy_(torch.arange(4.0)[:, None])
    index.assignments.copy_(torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))
    index.fitted.fill_(True)
    return index


def _seed_cluster_counts(index: ClusterIndex, batches: int) -> Counter[int]:
    sampler = MagnetBatchSampler(
        index, clusters_per_batch=2, examples_per_cluster=2, num_batches=batches
    )
    return Counter(int(index.assignments[batch[0]]) for batch in sampler)


# --- method ----------------------------------------------------------------------------------


def _fake_context(labels: list[int], *, batch_size: int = 8, world_size: int = 1):
    classes = max(labels) + 1
    return SimpleNamespace(
        world_size=world_size,
        cfg=SimpleNamespace(batch_size=batch_size),
        train=SimpleNamespace(
            labels=labels, num_classes=classes, class_names=[f"c{i}" for i in range(classes)]
        ),
        model=SimpleNamespace(embedding_dim=2),
    )


def _embeddings_as_images(images: torch.Tensor) -> dict[str, torch.Tensor]:
    """A stand-in model whose "images" are already the embeddings."""
    return {"embedding": images}


def test_training_step_caches_each_example_loss_and_the_running_variance() -> None:
    labels = [0, 0, 0, 0, 1, 1, 1, 1]
    method = MagnetMethod(
        num_classes=2, embedding_dim=2, clusters_per_batch=2, examples_per_cluster=2,
        clusters_per_class=1, variance_momentum=0.5,
    )  # fmt: skip
    method.setup(_fake_context(labels, batch_size=4))
    method.index.assignments.copy_(torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]))
    method.index.fitted.fill_(True)
    indices = torch.tensor([1, 2, 5, 6])
    # Step 1: class 0 at (1, 0), (0, 1), class 1 at (-1, 0), (0, -1) (scaled: the method
    # L2-normalises). Own squared distances 0.5, s^2 = 2/3, impostor distances 2.5: each loss
    # is 1 + (0.5 - 2.5) * 3/4 < 0, so 0 -- and still a measurement.
    far = torch.tensor([[3.0, 0.0], [0.0, 2.0], [-1.0, 0.0], [0.0, -5.0]])
    batch = SimpleNamespace(images=[far], labels=torch.tensor([0, 0, 1, 1]), indices=indices)
    loss, logs = method.training_step(_embeddings_as_images, batch)
    assert loss.item() == 0.0 and logs["variance"].item() == pytest.approx(2 / 3)
    assert logs["active"].item() == 0.0
    assert method.index.loss_measured.tolist() == [False, True, True, False] * 2
    assert method.running_variance.item() == pytest.approx(2 / 3)  # the first value as is
    # Step 2: class 1 moves to (.8, .6), (.6, .8): s^2 = 1.04 / 3, and every loss is
    # 1 + (0.5 - 0.58) / (2 s^2) = 1 + (0.02 - 0.1) / (2 s^2) = 1 - 3/26.
    near = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.8, 0.6], [0.6, 0.8]])
    batch.images = [near * 2]
    loss, logs = method.training_step(_embeddings_as_images, batch)
    assert loss.item() == pytest.approx(23 / 26) and logs["active"].item() == 1.0
    assert method.index.example_losses.tolist() == pytest.approx([0, *[23 / 26] * 2, 0] * 2)
    assert method.running_variance.item() == pytest.approx((2 / 3 + 1.04 / 3) / 2)


@pytest.mark.parametrize(("params", "clusters"), [({}, 3 * 3), ({"min_cluster_size": 1}, 3 * 8)])
def test_method_sizes_clusters_for_d_examples_by_default(params, clusters) -> None:
    method = MagnetMethod(num_classes=3, embedding_dim=2, clusters_per_batch=2, **params)
    method.setup(_fake_context([c for c in range(3) for _ in range(14)]))
    assert method.cluster_index.num_clusters == clusters  # 14 // 4 = 3 or min(8, 14) = 8


def test_method_state_restores_the_cluster_index() -> None:
    labels = [0, 0, 0, 1, 1, 1]
    method = MagnetMethod(num_classes=2, embedding_dim=2, clusters_per_batch=2)
    method.setup(_fake_context(labels))
    method.index.fit(np.random.default_rng(0).normal(size=(6, 2)), np.array(labels),
                     iterations=5, seed=0)  # fmt: skip
    method.index.record_losses(torch.tensor([4]), torch.tensor([0.0]))
    restored = MagnetMethod(num_classes=2, embedding_dim=2, clusters_per_batch=2)
    restored.setup(_fake_context(labels))
    restored.load_state_dict(method.state_dict())
    for name, tensor in method.state_dict().items():
        torch.testing.assert_close(restored.state_dict()[name], tensor, rtol=0, atol=0,
                                   equal_nan=True, msg=name)  # fmt: skip
    assert bool(restored.index.fitted) and restored.index.loss_measured[4]


@pytest.mark.parametrize(
    ("trainer", "message"),
    [
        (_fake_context([0, 0, 1, 1], batch_size=8, world_size=2), "one process"),
        (_fake_context([0, 0, 1, 1], batch_size=12), "pass --batch-size 32"),
        (_fake_context([0, 0, 0, 0], batch_size=32), "needs 7 impostor clusters"),
    ],
)
def test_setup_rejects_what_magnet_cannot_train(trainer, message) -> None:
    with pytest.raises(ValueError, match=message):
        MagnetMethod(num_classes=1, embedding_dim=2).setup(trainer)


# --- cluster classifier ----------------------------------------------------------------------


def test_cluster_classifier_scores_the_l_nearest_centroids() -> None:
    # Class 0 at (0, 0) and (0, 2), class 1 at (3, 0); 2 s^2 = 1. The query (0, 1) is at
    # squared distances 1, 1 and 10.
    centroids = np.array([[0.0, 0.0], [0.0, 2.0], [3.0, 0.0]])
    classifier = ClusterClassifier(centroids, [0, 0, 1], variance=0.5, L=3)
    labels, scores = classifier.predict(np.array([[0.0, 1.0], [3.0, 0.5]]))
    vote = 2 * math.exp(-1) + math.exp(-10)
    np.testing.assert_allclose(scores[0], [2 * math.exp(-1) / vote, math.exp(-10) / vote])
    assert labels.tolist() == [0, 1]
    # With L = 2 the class-1 centroid is not among the query's nearest and gets nothing.
    _, nearest_two = ClusterClassifier(centroids, [0, 0, 1], 0.5, L=2).predict([[0.0, 1.0]])
    assert nearest_two.tolist() == [[1.0, 0.0]]


def test_cluster_classifier_round_trips_through_extras() -> None:
    classifier = ClusterClassifier(np.eye(3, 2), [1, 0, 1], 0.25, L=2)
    rebuilt = ClusterClassifier.from_extras(classifier.to_extras(), L=2)
    query = np.array([[0.9, 0.2], [0.1, 0.8]])
    np.testing.assert_array_equal(rebuilt.predict(query)[1], classifier.predict(query)[1])
    with pytest.raises(ValueError, match="only Magnet runs"):
        ClusterClassifier.from_extras({})


# --- end to end ------------------------------------------------------------------------------


def test_magnet_cli_run_gives_a_checkpoint_with_a_cluster_classifier(tiny_dataset, tmp_path):
    out = tmp_path / "magnet"
    runner = CliRunner()
    trained = runner.invoke(app, [str(a) for a in (
        "train", "--data", tiny_dataset, "--method", "magnet", "--iterations", 2, "--out", out,
        "--image-size", 32, "--batch-size", 8, "--workers", 0, "--embedding-dim", 16,
        "--weights", "none", "--set", "eval_batch_size=32",
        "--param", "clusters_per_batch=4", "--param", "examples_per_cluster=2",
        "--param", "clusters_per_class=2",
    )])  # fmt: skip
    assert trained.exit_code == 0, trained.output
    card = json.loads((out / "best" / "card.json").read_text())
    assert card["method"]["name"] == "magnet"
    assert card["method"]["params"]["clusters_per_class"] == 2
    class_names = card["method"]["class_names"]  # 2 of the 8 classes went to validation
    assert len(class_names) == 6 and set(class_names) < {f"train_{i}" for i in range(8)}

    evaluated = runner.invoke(
        app, ["evaluate", "--model", str(out / "best"), "--data", str(tiny_dataset),
              "--workers", "0"],
    )  # fmt: skip
    assert evaluated.exit_code == 0, evaluated.output

    embedder = load_embedder(out / "best")
    classifier = ClusterClassifier.from_extras(embedder.extras)
    # 6 classes x 6 images, K = 2 clusters each.
    assert classifier.centroid_labels.tolist() == [c for c in range(6) for _ in range(2)]
    assert classifier.centroids.shape == (12, 16) and classifier.variance > 0
    query = embedder.embed(torch.rand(3, 3, 32, 32))
    labels, scores = classifier.predict(query)
    assert labels.shape == (3,) and scores.shape == (3, 6)
    np.testing.assert_allclose(scores.sum(axis=1), 1.0, rtol=1e-6)
