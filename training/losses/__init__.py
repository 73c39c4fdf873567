"""Metric-learning losses and triplet miners, built by name from configs.

Every loss is an `nn.Module` called as `loss(embeddings, labels) -> scalar` on the raw head
output; each decides itself whether to L2-normalise. Losses with learnable parameters (the
margin loss's beta) expose `param_lr`, the learning rate their own parameter group wants.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from training.losses.contrastive import ContrastiveLoss
from training.losses.margin import MarginLoss
from training.losses.miners import TripletMiner
from training.losses.mining import MINERS, build_miner
from training.losses.npair import NPairLoss
from training.losses.triplet import TripletLoss
from training.registry import Registry

LOSSES: Registry[nn.Module] = Registry(
    "loss",
    {
        "triplet": TripletLoss,
        "margin": MarginLoss,
        "contrastive": ContrastiveLoss,
        "npair": NPairLoss,
    },
)


def build_loss(name: str, *, num_classes: int, embedding_dim: int, **params: Any) -> nn.Module:
    """A loss from `LOSSES` by name; `num_classes` and `embedding_dim` reach those that use them."""
    context = {"num_classes": num_classes, "embedding_dim": embedding_dim}
    return LOSSES.build(name, params, context)


__all__ = [
    "LOSSES",
    "MINERS",
    "ContrastiveLoss",
    "MarginLoss",
    "NPairLoss",
    "TripletLoss",
    "TripletMiner",
    "build_loss",
    "build_miner",
]
