"""Triplet miners: which (anchor, positive, negative) triplets of a batch a loss sees.

A miner is any callable `miner(embeddings, labels) -> (anchors, positives, negatives)` returning
three equally long index tensors into the batch. The labels a miner receives need not be the true
classes (DiVA's class-shared task mines on randomly permuted labels), so miners only ever compare
labels for equality. Sampling miners draw from torch's global RNG (seeded by the trainer) unless
given their own `generator`, which must live on the embeddings' device.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.nn.functional as F
from pytorch_metric_learning import miners as pml_miners
from torch import Tensor

Triplets = tuple[Tensor, Tensor, Tensor]
MinerFn = Callable[[Tensor, Tensor], Triplets]
T = TypeVar("T")


class TripletMiner(ABC):
    """Base class: mines on L2-normalised, detached float32 embeddings (never builds a graph)."""

    def __call__(self, embeddings: Tensor, labels: Tensor) -> Triplets:
        # Full precision even under bf16 autocast: distance weights exponentiate ~D * log d.
        with torch.no_grad(), torch.autocast(embeddings.device.type, enabled=False):
            return self.mine(F.normalize(embeddings.detach().float(), dim=1), labels)

    @abstractmethod
    def mine(self, embeddings: Tensor, labels: Tensor) -> Triplets:
        """Triplet indices for unit-norm `embeddings` (B x D) and integer `labels` (B,)."""


class PerAnchorMiner(TripletMiner):
    """One triplet per usable anchor, as in the DiVA/Revisiting-DML batch miners.

    An anchor is usable when its label occurs at least twice in the batch and some negative has
    non-zero weight. Its positive is a uniformly random other sample of its label; its negative is
    drawn with probability proportional to `negative_weights`.
    """

    def __init__(self, *, generator: torch.Generator | None = None) -> None:
        self.generator = generator

    @abstractmethod
    def negative_weights(self, embeddings: Tensor, negative_mask: Tensor) -> Tensor:
        """Unnormalised B x B sampling weights of each negative per anchor, zero off the mask."""

    def mine(self, embeddings: Tensor, labels: Tensor) -> Triplets:
        same_label = labels[:, None] == labels[None, :]
        not_self = ~torch.eye(len(labels), dtype=torch.bool, device=labels.device)
        positive_mask = same_label & not_self
        weights = self.negative_weights(embeddings, ~same_label)
        usable = positive_mask.any(dim=1) & (weights > 0).any(dim=1)
        anchors = usable.nonzero().squeeze(1)
        positives = self._draw(positive_mask[anchors].to(weights.dtype))
        negatives = self._draw(weights[anchors])
        return anchors, positives, negatives

    def _draw(self, row_weights: Tensor) -> Tensor:
        """One column index per row, with probability proportional to the row's weights."""
        return torch.multinomial(row_weights, 1, generator=self.generator).squeeze(1)


class RandomMiner(PerAnchorMiner):
    """Uniformly random positive and negative per anchor (DiVA/Revisiting-DML `random`)."""

    def negative_weights(self, embeddings: Tensor, negative_mask: Tensor) -> Tensor:
        return negative_mask.to(embeddings.dtype)


class DistanceWeightedMiner(PerAnchorMiner):
    """Distance-weighted negative sampling (Wu et al. 2017, Sec. 4) as DiVA's `distance` miner.

    A negative at distance d is drawn with probability proportional to q(d)^-1, the inverse density
    of pairwise distances between uniform points on the unit sphere in D dimensions:
    log q(d)^-1 = (2 - D) log d - ((D - 3) / 2) log(1 - d^2 / 4), D = the embedding dimension.

    Hand-written because PML's `DistanceWeightedMiner` is not faithful to DiVA: it always applies
    the 1.4 upper cutoff, draws as many triplets per anchor as its class has samples instead of
    one, and zeroes non-finite weights instead of keeping them.
    """

    def __init__(
        self,
        *,
        lower_cutoff: float = 0.5,  # DiVA --miner_distance_lower_cutoff (parameters.py)
        # Wu et al.'s code uses 1.4; DiVA leaves it off because it hurt (batchminer/distance.py).
        upper_cutoff: float | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(generator=generator)
        self.lower_cutoff = lower_cutoff
        self.upper_cutoff = upper_cutoff

    def negative_weights(self, embeddings: Tensor, negative_mask: Tensor) -> Tensor:
        dim = embeddings.shape[1]
        squared = (2.0 - 2.0 * embeddings @ embeddings.T).clamp(min=0.0)
        distances = squared.sqrt().clamp(min=self.lower_cutoff)
        # Antipodal points (d = 2) make the log -inf; the tiny clamp keeps them the likeliest
        # pick, as the formula says, instead of turning the row into NaN.
        one_minus = (1.0 - distances.square() / 4.0).clamp(min=torch.finfo(distances.dtype).tiny)
        log_weights = (2.0 - dim) * distances.log() - ((dim - 3.0) / 2.0) * one_minus.log()
        allowed = negative_mask
        if self.upper_cutoff is not None:
            allowed = allowed & (distances <= self.upper_cutoff)
        log_weights = log_weights.masked_fill(~allowed, -math.inf)
        row_max = log_weights.amax(dim=1, keepdim=True)
        row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
        return (log_weights - row_max).exp()  # max-log subtracted for stability, as in DiVA


class SemiHardMiner(TripletMiner):
    """Every semi-hard triplet: d(a,p) < d(a,n) <= d(a,p) + margin (Schroff et al. 2015, Sec. 3.2).

    FaceNet keeps all anchor-positive pairs and picks negatives that are farther than the positive
    but inside the margin; PML's `TripletMarginMiner("semihard")` returns exactly those. Distances
    are Euclidean, not FaceNet's squared ones (Hermans et al. 2017 found squared ones less stable).
    """

    def __init__(self, *, margin: float = 0.2) -> None:  # Schroff et al. 2015, Sec. 4
        self.margin = margin
        self._miner = pml_miners.TripletMarginMiner(margin=margin, type_of_triplets="semihard")

    def mine(self, embeddings: Tensor, labels: Tensor) -> Triplets:
        return self._miner(embeddings, labels)


class BatchHardMiner(TripletMiner):
    """Per anchor the farthest positive and the closest negative (Hermans et al. 2017, Sec. 2).

    PML's `BatchHardMiner` does exactly this, for every anchor with a positive and a negative.
    """

    def __init__(self) -> None:
        self._miner = pml_miners.BatchHardMiner()

    def mine(self, embeddings: Tensor, labels: Tensor) -> Triplets:
        return self._miner(embeddings, labels)
