"""Contrastive loss (Hadsell, Chopra and LeCun 2006) over every pair of the batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ContrastiveLoss(nn.Module):
    """1/2 [D - pos_margin]_+^2 for same-label pairs, 1/2 [neg_margin - D]_+^2 for the others.

    D is the Euclidean distance between L2-normalised embeddings (so 0 <= D <= 2). This is
    Hadsell et al. 2006, Eq. 4, with squared hinges; PML's `ContrastiveLoss` uses unsquared
    hinges, hence hand-written. A P x K batch has about B*K same-label pairs against B^2
    different-label ones, so the two terms are averaged separately (as PML and Roth et al. 2020
    do) instead of Hadsell's plain sum over pairs, which would drown the similar pairs.
    """

    def __init__(
        self,
        *,
        pos_margin: float = 0.0,  # Hadsell et al. 2006, Eq. 4: similar pairs are pulled together
        # Hadsell et al. leave m to the data; 1.0 is Roth et al. 2020's (Revisiting-DML
        # parameters.py --loss_contrastive_neg_margin) and PML's default for unit vectors.
        neg_margin: float = 1.0,
        eps: float = 1e-8,  # inside the square root, as in the margin loss
    ) -> None:
        super().__init__()
        self.pos_margin = pos_margin
        self.neg_margin = neg_margin
        self.eps = eps

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        embeddings = F.normalize(embeddings, dim=1)
        first, second = torch.triu_indices(len(labels), len(labels), 1, device=labels.device)
        distances = ((embeddings[first] - embeddings[second]).square().sum(dim=1) + self.eps).sqrt()
        same_label = labels[first] == labels[second]
        pull = 0.5 * F.relu(distances[same_label] - self.pos_margin).square()
        push = 0.5 * F.relu(self.neg_margin - distances[~same_label]).square()
        return _mean_or_zero(pull) + _mean_or_zero(push)


def _mean_or_zero(values: Tensor) -> Tensor:
    """Mean that is 0 (still attached to the graph) when there are no values."""
    return values.sum() / max(len(values), 1)
