"""Triplet loss with in-batch semi-hard (FaceNet) or batch-hard (Hermans et al.) mining."""

from __future__ import annotations

from typing import Literal

from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import reducers as pml_reducers
from torch import Tensor, nn

from training.losses.miners import BatchHardMiner, SemiHardMiner, TripletMiner


class TripletLoss(nn.Module):
    """mean over mined triplets of [d(a,p) - d(a,n) + margin]_+, Euclidean on unit vectors.

    `mining="semihard"` uses every semi-hard triplet (Schroff et al. 2015, Sec. 3.2);
    `mining="hard"` one batch-hard triplet per anchor (Hermans et al. 2017, Sec. 2). PML's
    `TripletMarginLoss` computes the hinge faithfully; its default reducer averages over non-zero
    triplets only, so the plain mean of both papers is set explicitly.
    """

    def __init__(
        self,
        *,
        margin: float = 0.2,  # Schroff et al. 2015, Sec. 4
        mining: Literal["semihard", "hard"] = "semihard",
    ) -> None:
        super().__init__()
        miner: TripletMiner
        if mining == "semihard":
            miner = SemiHardMiner(margin=margin)
        elif mining == "hard":
            miner = BatchHardMiner()
        else:
            raise ValueError(f"unknown mining {mining!r}; choose 'semihard' or 'hard'")
        self.margin = margin
        self.mining = mining
        self.miner = miner
        self.triplet_loss = pml_losses.TripletMarginLoss(
            margin=margin, reducer=pml_reducers.MeanReducer()
        )

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        return self.triplet_loss(embeddings, labels, indices_tuple=self.miner(embeddings, labels))
