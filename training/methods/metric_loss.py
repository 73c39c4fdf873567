"""The baselines: one metric loss on a single linear head (triplet, margin, contrastive, N-pair)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from training.losses import build_loss
from training.methods.base import Batch, Method, register_method


class MetricLossMethod(Method):
    """A loss from `training.losses` applied to the model's `embedding` output."""

    loss_name: ClassVar[str]

    def __init__(self, *, num_classes: int, embedding_dim: int, **params: Any) -> None:
        super().__init__(num_classes=num_classes, embedding_dim=embedding_dim, **params)
        self.criterion = build_loss(
            self.loss_name, num_classes=num_classes, embedding_dim=embedding_dim, **params
        )

    def training_step(self, model, batch: Batch) -> tuple[torch.Tensor, dict]:
        embeddings = model(batch.images[0])["embedding"]
        return self.criterion(embeddings.float(), batch.labels), {}

    def parameter_groups(self) -> dict[str, tuple[list[nn.Parameter], float | None]]:
        parameters = [p for p in self.criterion.parameters() if p.requires_grad]
        if not parameters:
            return {}
        return {"loss": (parameters, getattr(self.criterion, "param_lr", None))}


for _loss in ("triplet", "margin", "contrastive", "npair"):
    register_method(
        type(f"{_loss.title()}Method", (MetricLossMethod,), {"name": _loss, "loss_name": _loss})
    )
