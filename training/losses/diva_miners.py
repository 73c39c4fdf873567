"""DiVA's triplet miners for its class-shared and intra-class tasks (its batchminer/ folder).

All three ignore what the true labels mean beyond equality, which is the point: the shared task
learns features that cut across classes, the intra-class task features that vary within one.
`training.losses.mining.MINERS` names them `random_distance`, `shared_neg_distance` and
`intra_random`, as DiVA's code does.
"""

from __future__ import annotations

import torch
from torch import Tensor

from training.losses.miners import DistanceWeightedMiner, TripletMiner, Triplets


class RandomPermutedDistanceMiner(DistanceWeightedMiner):
    """Distance-weighted sampling on randomly permuted batch labels (DiVA `random_distance`).

    After the permutation a "positive" is a random image that shares the anchor's *permuted*
    label, so it usually comes from another true class; the negative is distance-weighted
    against the permuted labels. DiVA's default class-shared task (`--diva_sharing random`).
    """

    def mine(self, embeddings: Tensor, labels: Tensor) -> Triplets:
        return super().mine(embeddings, self.permute(labels))

    def permute(self, labels: Tensor) -> Tensor:
        """The labels in a uniformly random order (one draw from the miner's generator)."""
        order = torch.randperm(len(labels), generator=self.generator, device=labels.device)
        return labels[order]


class SharedNegativeDistanceMiner(DistanceWeightedMiner):
    """The "Sharing Matters" triplets (DiVA `shared_neg_distance`, `--diva_sharing standard`).

    For every anchor the negative is distance-weighted among the other classes, and the positive
    is a uniformly random sample of a third class, neither the anchor's nor the negative's, so
    the loss pulls together images of different classes. Batches with fewer than three classes
    yield no triplets.
    """

    def mine(self, embeddings: Tensor, labels: Tensor) -> Triplets:
        same_label = labels[:, None] == labels[None, :]
        weights = self.negative_weights(embeddings, ~same_label)
        usable = (weights > 0).any(dim=1) & (labels.unique().numel() >= 3)
        anchors = usable.nonzero().squeeze(1)
        negatives = self._draw(weights[anchors])
        third_class = (labels[None, :] != labels[anchors, None]) & (
            labels[None, :] != labels[negatives, None]
        )
        positives = self._draw(third_class.to(weights.dtype))
        return anchors, positives, negatives


class IntraClassRandomMiner(TripletMiner):
    """B triplets whose anchor, positive and negative all come from one class (`intra_random`).

    Per triplet a class of the batch is drawn uniformly, then a, p and n are drawn uniformly
    *with* replacement from its in-batch samples, so degenerate triplets (a = p, even a = p = n)
    are common with 2 samples per class; the margin loss then spreads intra-class structure.
    """

    def __init__(self, *, generator: torch.Generator | None = None) -> None:
        self.generator = generator

    def mine(self, embeddings: Tensor, labels: Tensor) -> Triplets:
        classes = labels.unique()
        picks = torch.randint(
            len(classes), (len(labels),), generator=self.generator, device=labels.device
        )
        members = (labels[None, :] == classes[picks, None]).to(embeddings.dtype)
        drawn = torch.multinomial(members, 3, replacement=True, generator=self.generator)
        anchors, positives, negatives = drawn.unbind(dim=1)
        return anchors, positives, negatives
