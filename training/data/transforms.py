"""Train and test image transforms on uint8 CHW tensors, ending in normalised float32 tensors.

Geometry runs on uint8 (antialiased resize) before the float conversion, which keeps augmentation
cheap on CPU; the result is `(image - mean) / std` with the image scaled to [0, 1].
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torchvision.transforms import InterpolationMode, v2

# ImageNet statistics (torchvision); callers replace them with the backbone's own.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class TransformConfig(BaseModel):
    """Augmentation and preprocessing settings shared by training, evaluation and serving."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # 224 px as in the papers (DiVA, MLRC); 112-160 px is practical on a CPU.
    image_size: int = Field(224, ge=16)
    # torchvision's RandomResizedCrop default scale, used by DiVA (basic_dataset_scaffold.py).
    crop_scale: tuple[float, float] = (0.08, 1.0)
    hflip: float = Field(0.5, ge=0.0, le=1.0)
    # Resize(256) + CenterCrop(224): 224 / 256 = 0.875 (DiVA's basic_dataset_scaffold.py).
    test_crop_pct: float = Field(0.875, gt=0.0, le=1.0)
    interpolation: Literal["bilinear", "bicubic"] = "bilinear"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @model_validator(mode="after")
    def _check_ranges(self) -> TransformConfig:
        low, high = self.crop_scale
        if not 0.0 < low <= high <= 1.0:
            raise ValueError(f"crop_scale must satisfy 0 < low <= high <= 1, got {self.crop_scale}")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std must be positive, got {self.std}")
        return self

    @property
    def test_resize_size(self) -> int:
        """Shorter side before the centre crop; floor as timm's `resolve_data_config` does."""
        return math.floor(self.image_size / self.test_crop_pct)


def build_train_transform(cfg: TransformConfig) -> v2.Compose:
    """RandomResizedCrop + horizontal flip, then float conversion and normalisation."""
    return v2.Compose(
        [
            v2.RandomResizedCrop(
                cfg.image_size,
                scale=cfg.crop_scale,
                interpolation=InterpolationMode(cfg.interpolation),
                antialias=True,
            ),
            v2.RandomHorizontalFlip(cfg.hflip),
            *_to_normalized_float(cfg),
        ]
    )


def build_test_transform(cfg: TransformConfig) -> v2.Compose:
    """Resize the shorter side to image_size / test_crop_pct, then centre-crop image_size."""
    return v2.Compose(
        [
            v2.Resize(
                cfg.test_resize_size,
                interpolation=InterpolationMode(cfg.interpolation),
                antialias=True,
            ),
            v2.CenterCrop(cfg.image_size),
            *_to_normalized_float(cfg),
        ]
    )


def _to_normalized_float(cfg: TransformConfig) -> list[v2.Transform]:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=cfg.mean, std=cfg.std)]
