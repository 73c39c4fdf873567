"""Losses and miners against hand-computed values on tiny batches (CPU, float64)."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from training.losses import (
    LOSSES,
    ContrastiveLoss,
    MarginLoss,
    NPairLoss,
    TripletLoss,
    build_loss,
    build_miner,
)
from training.losses.miners import (
    BatchHardMiner,
    DistanceWeightedMiner,
    RandomMiner,
    SemiHardMiner,
)
from training.losses.npair import one_pair_per_class

# Four unit vectors in two classes; squared distances: d01 = 0.4, d02 = 0.8, d03 = 2,
# d12 = 0.08, d13 = 0.8, d23 = 0.4.
CHAIN = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8], [0.0, 1.0]], dtype=torch.float64)
CHAIN_LABELS = torch.tensor([0, 0, 1, 1])

# Four unit vectors for the margin loss, classes [0, 1, 1, 0]; squared distances: d01 = 2,
# d02 = 4, d03 = 0.8, d12 = 2, d13 = 0.4, d23 = 3.2.
CROSS = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.6, 0.8]], dtype=torch.float64)
CROSS_LABELS = torch.tensor([0, 1, 1, 0])
EPS = 1e-8


def as_set(triplets: tuple[torch.Tensor, ...]) -> set[tuple[int, int, int]]:
    return set(zip(*(t.tolist() for t in triplets), strict=True))


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def dist(squared: float) -> float:
    """The margin loss's distance for a given squared Euclidean distance."""
    return math.sqrt(squared + EPS)


# --- triplet ---------------------------------------------------------------------------------


def test_batch_hard_miner_picks_farthest_positive_and_closest_negative() -> None:
    triplets = BatchHardMiner()(CHAIN, CHAIN_LABELS)
    assert as_set(triplets) == {(0, 1, 2), (1, 0, 2), (2, 3, 1), (3, 2, 1)}


def test_batch_hard_triplet_loss_is_mean_over_all_anchors() -> None:
    # Anchors 1 and 2 violate: sqrt(0.4) - sqrt(0.08) + 0.2; anchors 0 and 3 give 0.
    expected = 2 * (math.sqrt(0.4) - math.sqrt(0.08) + 0.2) / 4
    scaled = CHAIN * torch.tensor([[2.0], [0.5], [3.0], [1.0]], dtype=torch.float64)
    loss = TripletLoss(mining="hard")(scaled, CHAIN_LABELS)
    assert loss.item() == pytest.approx(expected, abs=1e-9)


def test_semihard_miner_keeps_only_negatives_inside_the_margin() -> None:
    # For (0,1): n=2 is semi-hard (0.894 - 0.632 = 0.262 <= 0.3), n=3 easy.
    # For (1,0): n=2 is hard (0.283 < 0.632), n=3 semi-hard. Symmetric for class 1.
    triplets = SemiHardMiner(margin=0.3)(CHAIN, CHAIN_LABELS)
    assert as_set(triplets) == {(0, 1, 2), (1, 0, 3), (2, 3, 0), (3, 2, 1)}


def test_semihard_triplet_loss_value() -> None:
    loss = TripletLoss(margin=0.3, mining="semihard")(CHAIN, CHAIN_LABELS)
    assert loss.item() == pytest.approx(0.3 - (math.sqrt(0.8) - math.sqrt(0.4)), abs=1e-9)


def test_triplet_loss_without_triplets_is_zero_and_differentiable() -> None:
    embeddings = CHAIN.clone().requires_grad_(True)
    loss = TripletLoss(margin=0.2, mining="semihard")(embeddings, CHAIN_LABELS)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(embeddings.grad, torch.zeros_like(CHAIN))


# --- contrastive -----------------------------------------------------------------------------


def test_contrastive_loss_value() -> None:
    pull = 0.5 * (0.4 + EPS)  # both same-class pairs at squared distance 0.4
    push = 0.5 * ((1 - dist(0.8)) ** 2 + 0.0 + (1 - dist(0.08)) ** 2 + (1 - dist(0.8)) ** 2) / 4
    loss = ContrastiveLoss()(CHAIN * 4.0, CHAIN_LABELS)
    assert loss.item() == pytest.approx(pull + push, abs=1e-9)


def test_contrastive_loss_margins() -> None:
    pull = 0.5 * (dist(0.4) - 0.5) ** 2
    push = 0.5 * (0.5 - dist(0.08)) ** 2 / 4  # only pair (1, 2) is closer than 0.5
    loss = ContrastiveLoss(pos_margin=0.5, neg_margin=0.5)(CHAIN, CHAIN_LABELS)
    assert loss.item() == pytest.approx(pull + push, abs=1e-9)


# --- N-pair ----------------------------------------------------------------------------------

# Samples of a class are identical, so any choice of pair gives the same loss. Class 0 has three
# samples (P x K with K = 3); class 3 has one and must not take part, not even as a negative.
NPAIR_BATCH = torch.tensor(
    [[1, 0], [0, 2], [1, 0], [1, 1], [0, 2], [5, 5], [1, 1], [1, 0]], dtype=torch.float64
)
NPAIR_LABELS = torch.tensor([0, 1, 0, 2, 1, 3, 2, 0])


def test_npair_loss_value() -> None:
    # Logits f_i . f_j+ for the pair vectors (1,0), (0,2), (1,1): [[1,0,1],[0,4,2],[1,2,2]].
    softmax_terms = [
        math.log(math.e + 1 + math.e) - 1,
        math.log(1 + math.exp(4) + math.exp(2)) - 4,
        math.log(math.e + 2 * math.exp(2)) - 2,
    ]
    squared_norms = [1, 4, 2]
    regulariser = 0.002 / 4 * (2 * sum(squared_norms) / 3)
    loss = NPairLoss()(NPAIR_BATCH, NPAIR_LABELS)
    assert loss.item() == pytest.approx(sum(softmax_terms) / 3 + regulariser, abs=1e-9)


def test_npair_regulariser_scales_with_weight_and_embedding_norm() -> None:
    plain = NPairLoss(l2_weight=0.0)(NPAIR_BATCH, NPAIR_LABELS)
    regularised = NPairLoss(l2_weight=1.0)(NPAIR_BATCH, NPAIR_LABELS)
    assert (regularised - plain).item() == pytest.approx((1 + 4 + 2) / 3 / 2, abs=1e-9)


def test_npair_draws_distinct_random_pairs_per_class() -> None:
    labels = torch.tensor([0, 1, 0, 1, 0, 2])
    generator = gen(0)
    seen = Counter()
    for _ in range(300):
        anchors, positives = one_pair_per_class(labels, generator)
        assert sorted(labels[anchors].tolist()) == [0, 1]
        assert torch.equal(labels[anchors], labels[positives])
        assert (anchors != positives).all()
        seen.update(anchors.tolist())
    assert {0, 2, 4} <= set(seen)  # every class-0 sample serves as anchor sometimes


def test_npair_without_pairs_is_zero_and_differentiable() -> None:
    embeddings = torch.ones(3, 2, requires_grad=True)
    loss = NPairLoss()(embeddings, torch.tensor([0, 1, 2]))
    loss.backward()
    assert loss.item() == 0.0
    assert embeddings.grad is not None


# --- margin ----------------------------------------------------------------------------------


def test_margin_loss_divides_by_number_of_non_zero_hinge_terms() -> None:
    # (0,3,1): both hinges 0. (1,2,3): sqrt(2) - 1.2 + 0.2 and 1.2 - sqrt(0.4) + 0.2.
    # (3,0,1): only the negative hinge 1.2 - sqrt(0.4) + 0.2. Three non-zero terms, four
    # triplets, two triplets with a non-zero term.
    triplets = (torch.tensor([0, 1, 3, 0]), torch.tensor([3, 2, 0, 3]), torch.tensor([1, 3, 1, 1]))
    hinge_sum = (dist(2.0) - 1.0) + 2 * (1.4 - dist(0.4))
    scaled = CROSS * torch.tensor([[2.0], [0.5], [3.0], [1.5]], dtype=torch.float64)
    loss = MarginLoss(num_classes=2)(scaled, CROSS_LABELS, triplets=triplets)
    assert loss.item() == pytest.approx(hinge_sum / 3, abs=1e-6)


def test_margin_loss_without_active_hinges_is_zero_and_differentiable() -> None:
    embeddings = CROSS.clone().requires_grad_(True)
    criterion = MarginLoss(num_classes=2)
    triplets = (torch.tensor([0]), torch.tensor([3]), torch.tensor([1]))
    loss = criterion(embeddings, CROSS_LABELS, triplets=triplets)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(embeddings.grad, torch.zeros_like(CROSS))
    assert torch.equal(criterion.beta.grad, torch.zeros(2))


@pytest.mark.parametrize("nu", [0.0, 0.1])
def test_margin_beta_gradient_reaches_only_anchor_classes(nu: float) -> None:
    # (1,2,0): positive hinge sqrt(2) - beta_1 + 0.2 active; (3,0,1): negative hinge
    # beta_0 - sqrt(0.4) + 0.2 active. Two active terms; nu adds nu * (beta_1 + beta_0).
    criterion = MarginLoss(num_classes=3, nu=nu)
    triplets = (torch.tensor([1, 3]), torch.tensor([2, 0]), torch.tensor([0, 1]))
    loss = criterion(CROSS, CROSS_LABELS, triplets=triplets)
    loss.backward()
    expected = ((dist(2.0) - 1.0) + (1.4 - dist(0.4))) / 2 + nu * 2.4
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert criterion.beta.grad.tolist() == pytest.approx([0.5 + nu, -0.5 + nu, 0.0])


def test_margin_loss_mines_with_its_miner() -> None:
    embeddings = torch.randn(12, 8, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(4).repeat_interleave(3)
    criterion = MarginLoss(num_classes=4, miner=DistanceWeightedMiner(generator=gen(5)))
    reference = DistanceWeightedMiner(generator=gen(5))(embeddings, labels)
    expected = MarginLoss(num_classes=4)(embeddings, labels, triplets=reference)
    assert criterion(embeddings, labels).item() == pytest.approx(expected.item(), abs=1e-7)
    by_name = MarginLoss(num_classes=4, miner="batch_hard")(embeddings, labels)
    hard = BatchHardMiner()(embeddings, labels)
    assert by_name.item() == pytest.approx(
        MarginLoss(num_classes=4)(embeddings, labels, triplets=hard).item(), abs=1e-7
    )


def test_margin_beta_is_a_buffer_when_not_learned() -> None:
    criterion = MarginLoss(num_classes=3, learn_beta=False)
    assert list(criterion.parameters()) == []
    assert criterion.beta.tolist() == pytest.approx([1.2, 1.2, 1.2])


def test_margin_loss_rejects_labels_outside_beta_table() -> None:
    triplets = (torch.tensor([1]), torch.tensor([2]), torch.tensor([0]))
    with pytest.raises(ValueError, match=r"0\.\.0"):
        MarginLoss(num_classes=1)(CROSS, CROSS_LABELS, triplets=triplets)


# --- distance-weighted and random miners -----------------------------------------------------


def sphere_batch(distances: list[float], dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Anchor and positive at e_1; one singleton-class negative per chord distance."""
    angles = [2 * math.asin(d / 2) for d in distances]
    points = torch.zeros(2 + len(distances), dim, dtype=torch.float64)
    points[:2, 0] = 1.0
    for row, angle in enumerate(angles, start=2):
        points[row, 0], points[row, 1] = math.cos(angle), math.sin(angle)
    return points, torch.tensor([0, 0, *range(1, len(distances) + 1)])


def formula_probabilities(distances: list[float], dim: int, lower_cutoff: float) -> list[float]:
    """q(d)^-1 normalised, written out from Wu et al. 2017 (as in DiVA's batchminer/distance.py)."""
    weights = []
    for d in distances:
        d = max(d, lower_cutoff)
        weights.append(math.exp((2 - dim) * math.log(d) - (dim - 3) / 2 * math.log(1 - d * d / 4)))
    return [w / sum(weights) for w in weights]


def negative_frequencies(miner, embeddings, labels, draws: int) -> list[float]:
    counts = Counter()
    for _ in range(draws):
        anchors, _, negatives = miner(embeddings, labels)
        counts[negatives[anchors == 0].item()] += 1
    return [counts[i] / draws for i in range(2, len(labels))]


@pytest.mark.parametrize(("dim", "lower_cutoff"), [(3, 0.5), (6, 0.5), (6, 0.1)])
def test_distance_miner_frequencies_match_formula(dim: int, lower_cutoff: float) -> None:
    distances = [0.2, 0.4, 1.0, 1.6]
    embeddings, labels = sphere_batch(distances, dim)
    miner = DistanceWeightedMiner(lower_cutoff=lower_cutoff, generator=gen(0))
    observed = negative_frequencies(miner, embeddings, labels, draws=3000)
    assert observed == pytest.approx(formula_probabilities(distances, dim, lower_cutoff), abs=0.03)
    if lower_cutoff == 0.5:  # 0.2 and 0.4 are both clamped to 0.5, so equally likely
        assert observed[0] == pytest.approx(observed[1], abs=0.04)


def test_distance_miner_uses_the_embedding_dimension() -> None:
    # The points span a plane; padded to D = 6 they must be weighted with D = 6, not 2 or 3.
    distances = [0.2, 0.4, 1.0, 1.6]
    embeddings, labels = sphere_batch(distances, dim=6)
    miner = DistanceWeightedMiner(generator=gen(1))
    observed = negative_frequencies(miner, embeddings, labels, draws=2000)
    assert observed == pytest.approx(formula_probabilities(distances, 6, 0.5), abs=0.03)
    for wrong_dim in (2, 3):
        wrong = formula_probabilities(distances, wrong_dim, 0.5)
        assert max(abs(o - w) for o, w in zip(observed, wrong, strict=True)) > 0.1


def test_distance_miner_upper_cutoff_excludes_far_negatives() -> None:
    embeddings, labels = sphere_batch([0.6, 1.0, 1.6], dim=4)
    miner = DistanceWeightedMiner(upper_cutoff=1.2, generator=gen(0))
    observed = negative_frequencies(miner, embeddings, labels, draws=500)
    assert observed[2] == 0.0 and observed[0] > 0 and observed[1] > 0
    anchors, _, _ = DistanceWeightedMiner(upper_cutoff=0.55)(embeddings, labels)
    assert anchors.numel() == 0  # no negative left within the cutoff


@pytest.mark.parametrize("name", ["distance", "random"])
def test_per_anchor_miners_respect_labels(name: str) -> None:
    labels = torch.tensor([0, 1, 1, 2, 2, 2, 3, 3, 3, 3])
    embeddings = torch.randn(10, 16, generator=gen(3))
    miner = build_miner(name, generator=gen(4))
    for _ in range(200):
        anchors, positives, negatives = miner(embeddings, labels)
        assert anchors.tolist() == list(range(1, 10))  # the singleton class 0 is never an anchor
        assert torch.equal(labels[anchors], labels[positives])
        assert (anchors != positives).all()
        assert (labels[anchors] != labels[negatives]).all()


def test_random_miner_negatives_are_uniform() -> None:
    embeddings, labels = sphere_batch([0.2, 0.4, 1.0, 1.6], dim=6)
    observed = negative_frequencies(RandomMiner(generator=gen(0)), embeddings, labels, 2000)
    assert observed == pytest.approx([0.25] * 4, abs=0.04)


def test_miners_are_reproducible_from_the_global_seed() -> None:
    embeddings = torch.randn(12, 8, generator=gen(0))
    labels = torch.arange(6).repeat_interleave(2)
    miner = DistanceWeightedMiner()
    torch.manual_seed(7)
    first = miner(embeddings, labels)
    torch.manual_seed(7)
    second = miner(embeddings, labels)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


# --- registries ------------------------------------------------------------------------------


def test_build_loss_passes_context_and_params() -> None:
    margin = build_loss("margin", num_classes=5, embedding_dim=8, margin=0.1)
    assert isinstance(margin, MarginLoss) and margin.beta.shape == (5,) and margin.margin == 0.1
    assert margin.param_lr == 5e-4
    triplet = build_loss("triplet", num_classes=5, embedding_dim=8, mining="hard")
    assert isinstance(triplet.miner, BatchHardMiner)
    assert sorted(LOSSES) == ["contrastive", "margin", "npair", "triplet"]


def test_build_loss_rejects_unknown_names_and_parameters() -> None:
    with pytest.raises(ValueError, match="contrastive, margin, npair, triplet"):
        build_loss("arcface", num_classes=5, embedding_dim=8)
    with pytest.raises(ValueError, match=r"marginn.*accepted: .*beta_init"):
        build_loss("margin", num_classes=5, embedding_dim=8, marginn=0.1)
    with pytest.raises(ValueError, match="semihard"):
        build_loss("triplet", num_classes=5, embedding_dim=8, mining="soft")


def test_build_miner_rejects_unknown_names_and_parameters() -> None:
    known = "batch_hard, distance, intra_random, random, random_distance, semihard, shared_neg"
    with pytest.raises(ValueError, match=known):
        build_miner("hardest")
    with pytest.raises(ValueError, match=r"cutoff.*accepted: lower_cutoff, upper_cutoff"):
        build_miner("distance", cutoff=0.5)
    with pytest.raises(ValueError, match="lower_cutoff"):
        MarginLoss(num_classes=2, miner="distance", miner_params={"cutoff": 0.5})
