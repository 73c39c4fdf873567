"""Multi-class N-pair loss (Sohn 2016) on one random positive pair per class of the batch."""

from __future__ import annotations

import torch
from pytorch_metric_learning import distances as pml_distances
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import regularizers as pml_regularizers
from torch import Tensor, nn


class NPairLoss(nn.Module):
    """mean_i log(1 + sum_{j != i} exp(f_i . f_j+ - f_i . f_i+)) + l2_weight/2 * mean ||f||^2.

    Sohn 2016 uses unnormalised embeddings and inner products, and keeps their scale in check
    with an L2 penalty on the embeddings of the N pairs; the penalty has the form of TF's
    `npairs_loss`, l2_weight/4 * (mean ||f_i||^2 + mean ||f_i+||^2). PML's `NPairsLoss` computes
    the softmax form faithfully once its distance is told not to normalise; PML would always take
    the first pair of each class, so the pairs are drawn here: two distinct random samples of
    every label that occurs at least twice (a P x K batch gives P pairs), from the global RNG or
    `generator`.
    """

    def __init__(
        self,
        *,
        # Sohn 2016's lambda as recalled (section not verified); TF npairs_loss reg_lambda default.
        l2_weight: float = 0.002,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.l2_weight = l2_weight
        self.generator = generator
        self.npairs_loss = pml_losses.NPairsLoss(
            distance=pml_distances.DotProductSimilarity(normalize_embeddings=False),
            embedding_regularizer=pml_regularizers.LpRegularizer(p=2, power=2),
            embedding_reg_weight=l2_weight / 2,  # l2_weight/4 * (2 * mean over the 2N embeddings)
        )

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        anchors, positives = one_pair_per_class(labels, self.generator)
        if len(anchors) == 0:
            return embeddings.sum() * 0.0
        # Anchors first: PML pairs each label's first sample with its other one.
        paired = torch.cat([anchors, positives])
        return self.npairs_loss(embeddings[paired], labels[paired])


def one_pair_per_class(
    labels: Tensor, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Two distinct random batch indices (anchor, positive) for every label seen twice or more."""
    shuffled = torch.randperm(len(labels), generator=generator, device=labels.device)
    order = shuffled[torch.sort(labels[shuffled], stable=True).indices]
    _, counts = torch.unique_consecutive(labels[order], return_counts=True)
    starts = (counts.cumsum(0) - counts)[counts >= 2]
    return order[starts], order[starts + 1]
