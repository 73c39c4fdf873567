"""Margin loss with a learnable per-class boundary beta (Wu et al. 2017), as DiVA uses it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.losses.miners import MinerFn, Triplets
from training.losses.mining import build_miner


class MarginLoss(nn.Module):
    """l = [d(a,p) - beta_{y_a} + m]_+ + [beta_{y_a} - d(a,n) + m]_+ on unit vectors.

    The batch loss is the sum of all hinge terms divided by the number of non-zero hinge terms
    (DiVA criteria/margin.py), plus `nu` times the sum of the anchors' betas (Wu et al. 2017,
    Sec. 5).
    Hand-written because PML's `MarginLoss` has no epsilon inside the square root (it uses
    `torch.cdist`) and divides the `nu` term by the hinge count too, unlike DiVA. Note that
    DiVA's code, on torch >= 1.2 where adding two bool tensors is a logical or, counts triplets
    with a non-zero term rather than hinge terms; PML counts hinge terms, as here.

    Triplets come from `miner` unless passed to `forward`; beta is always indexed by `labels`
    at the anchor, so a caller that mines on other labels (DiVA's shared and intra tasks) still
    passes the original class labels here. `param_lr` is the learning rate beta's own
    parameter group wants.
    """

    def __init__(
        self,
        num_classes: int,
        *,
        margin: float = 0.2,  # DiVA --loss_margin_margin after Wu et al. 2017
        beta_init: float = 1.2,  # DiVA --loss_margin_beta after Wu et al. 2017
        beta_lr: float = 5e-4,  # DiVA --loss_margin_beta_lr (parameters.py)
        nu: float = 0.0,  # DiVA: no beta regularisation (criteria/margin.py)
        learn_beta: bool = True,
        eps: float = 1e-8,  # DiVA criteria/margin.py: inside each distance's square root
        miner: str | MinerFn = "distance",  # DiVA's discriminative task (batchminer/distance.py)
        miner_params: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if isinstance(miner, str):
            miner = build_miner(miner, **(miner_params or {}))
        elif miner_params:
            raise ValueError("miner_params only apply when the miner is given by name")
        self.num_classes = num_classes
        self.margin = margin
        self.nu = nu
        self.eps = eps
        self.param_lr = beta_lr
        self.miner = miner
        beta = torch.full((num_classes,), float(beta_init))
        if learn_beta:
            self.beta = nn.Parameter(beta)
        else:
            self.register_buffer("beta", beta)

    def forward(
        self, embeddings: Tensor, labels: Tensor, triplets: Triplets | None = None
    ) -> Tensor:
        """Loss over `triplets` (index tensors into the batch), mined when not given."""
        embeddings = F.normalize(embeddings, dim=1)
        anchors, positives, negatives = (
            triplets if triplets is not None else self.miner(embeddings, labels)
        )
        anchor_labels = labels[anchors]
        if anchor_labels.numel() and (
            anchor_labels.min() < 0 or anchor_labels.max() >= self.num_classes
        ):
            raise ValueError(f"anchor labels must lie in 0..{self.num_classes - 1} to index beta")
        beta = self.beta[anchor_labels]
        anchor_embeddings = embeddings[anchors]
        positive_distances = self._distance(anchor_embeddings, embeddings[positives])
        negative_distances = self._distance(anchor_embeddings, embeddings[negatives])
        positive_hinge = F.relu(positive_distances - beta + self.margin)
        negative_hinge = F.relu(beta - negative_distances + self.margin)
        active_terms = (positive_hinge > 0).sum() + (negative_hinge > 0).sum()
        hinge_loss = (positive_hinge.sum() + negative_hinge.sum()) / active_terms.clamp(min=1)
        return hinge_loss + self.nu * beta.sum()

    def _distance(self, x: Tensor, y: Tensor) -> Tensor:
        return ((x - y).square().sum(dim=1) + self.eps).sqrt()
