"""Backbone + pooling + head: the network every method trains and the service runs.

The architecture is described by a plain dict (`ModelSpec.to_dict()`), stored in the
checkpoint card, so a model can be rebuilt from its artifact alone; the heads, by name, are in
`training.models.heads`.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from training.models.backbones import BackboneInfo, build_backbone
from training.models.heads import HEADS, EmbeddingHead


class ModelSpec(BaseModel):
    """Everything needed to rebuild the network's structure (not its weights)."""

    model_config = ConfigDict(extra="forbid")

    backbone: str = "efficientnet_lite0"
    pooling: Literal["avg", "avgmax"] = "avg"  # DiVA uses average pooling only (architectures/)
    head: str = "linear"
    embedding_dim: int = Field(128, ge=0)  # Wu et al. 2017 / DiVA per-head size
    head_options: dict[str, object] = Field(default_factory=dict)
    # timm constructor options of a non-built-in backbone (`img_size` of a ViT built for
    # another input size); empty for built-ins and in cards written before it existed.
    backbone_options: dict[str, int] = Field(default_factory=dict)
    frozen_bn: bool = False  # DiVA's R50 runs freeze BatchNorm (resnet50_frozen_normalize)


class EmbeddingModel(nn.Module):
    """Backbone -> global pooling -> head; `embed` returns L2-normalised test-time embeddings."""

    def __init__(self, spec: ModelSpec, weights: str = "imagenet") -> None:
        super().__init__()
        head = HEADS[spec.head]  # an unknown name is a ValueError listing the choices
        self.spec = spec
        self.backbone, self.info = build_backbone(spec.backbone, weights, spec.backbone_options)
        self.head: EmbeddingHead = head(
            self.info.feature_dim, spec.embedding_dim, **spec.head_options
        )
        self.embedding_dim: int = self.head.embedding_dim

    @property
    def backbone_info(self) -> BackboneInfo:
        return self.info

    def pool(self, feature_map: torch.Tensor) -> torch.Tensor:
        pooled = feature_map.mean(dim=(2, 3))
        if self.spec.pooling == "avgmax":  # GAP + GMP summed, Proxy-Anchor's trick (MLRC)
            pooled = pooled + feature_map.amax(dim=(2, 3))
        return pooled

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.pool(self.backbone(images)).float()

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.features(images)
        outputs = self.head(features)
        outputs["features"] = features
        return outputs

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Test-time embedding: the head's `embedding` output, L2-normalised, float32."""
        return F.normalize(self.forward(images)["embedding"].float(), dim=-1)

    def train(self, mode: bool = True) -> EmbeddingModel:
        super().train(mode)
        if mode and self.spec.frozen_bn:
            # Frozen BN as in DiVA: running statistics fixed, affine parameters still trained.
            for module in self.backbone.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by role, so the optimiser can give backbone and head their own lr."""
        return {
            "backbone": [p for p in self.backbone.parameters() if p.requires_grad],
            "head": [p for p in self.head.parameters() if p.requires_grad],
        }


def build_for_size(spec: ModelSpec, weights: str, image_size: int | None) -> EmbeddingModel:
    """The model of `spec`, built for `image_size` inputs when its backbone is made for one
    size (a timm ViT at another size: `backbone_options["img_size"]`, the checkpoint's position
    embeddings resampled by timm); other backbones take any size as they are. A timm backbone
    is probed with random weights first, so its weights are read once."""
    from training.models.backbones import is_builtin, takes_image_size

    if image_size and not is_builtin(spec.backbone):
        probe, info = build_backbone(spec.backbone, "none", spec.backbone_options)
        if image_size != info.image_size and takes_image_size(probe):
            options = {**spec.backbone_options, "img_size": image_size}
            spec = spec.model_copy(update={"backbone_options": options})
    return EmbeddingModel(spec, weights=weights)
