"""Self-describing model artifacts: `model.safetensors` + `card.json` in one directory.

The card holds everything needed to rebuild and use the embedder (architecture, embedding
dimension, preprocessing) plus what a user wants to know about it (method, data, metrics,
versions). `load_embedder` needs nothing but the artifact; the service uses exactly it.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from training.data.transforms import TransformConfig, build_test_transform
from training.fsutil import fsync_tree, replace_directory
from training.models.embedding import EmbeddingModel, ModelSpec

CARD_FILE = "card.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "lookalike-model/1"
EXTRA_PREFIX = "extra."


class CheckpointError(ValueError):
    """An artifact is missing, corrupt or of an unknown format; the message says which."""


class Preprocessing(BaseModel):
    """Test-time preprocessing the model was trained for."""

    image_size: int
    test_crop_pct: float
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def transform_config(self) -> TransformConfig:
        return TransformConfig(**self.model_dump())


class ModelCard(BaseModel):
    """The JSON card stored next to the weights."""

    model_config = ConfigDict(extra="allow")

    format: str = FORMAT
    architecture: ModelSpec
    embedding_dim: int
    preprocessing: Preprocessing
    method: dict[str, Any] = Field(default_factory=dict)
    training_data: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    # Where the backbone's starting weights came from: {"source", "sha256"} (see
    # `BackboneInfo.weights_source`); empty in cards written before it was recorded.
    backbone_weights: dict[str, str | None] = Field(default_factory=dict)
    library_versions: dict[str, str] = Field(default_factory=dict)
    created_at: str = ""


def library_versions() -> dict[str, str]:
    versions = {}
    for package in ("lookalike", "torch", "torchvision", "timm", "pytorch-metric-learning"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return versions


def save_artifact(
    directory: Path,
    model: EmbeddingModel,
    card: ModelCard,
    extra_tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write the artifact atomically: a reader sees the old complete artifact or the new one."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    card = card.model_copy(
        update={
            "created_at": card.created_at or datetime.now(UTC).isoformat(timespec="seconds"),
            "library_versions": card.library_versions or library_versions(),
        }
    )
    tensors = {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()}
    for name, tensor in (extra_tensors or {}).items():
        tensors[EXTRA_PREFIX + name] = tensor.detach().cpu().contiguous()
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        save_file(tensors, str(staging / WEIGHTS_FILE), metadata={"format": FORMAT})
        (staging / CARD_FILE).write_text(card.model_dump_json(indent=2))
        fsync_tree(staging)
        replace_directory(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def save_untrained_artifact(
    directory: Path,
    embedding_dim: int,
    *,
    image_size: int = 32,
    method: dict[str, Any] | None = None,
    extra_tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """An artifact with seeded random weights and no download (the default backbone at
    `image_size`): fast and deterministic, for tests, benchmarks and smoke checks of the
    service."""
    torch.manual_seed(0)
    model = EmbeddingModel(ModelSpec(embedding_dim=embedding_dim), weights="none").eval()
    card = _untrained_card(
        model, image_size, 1.0, "bilinear", method or {"name": "margin", "params": {}}
    )
    return save_artifact(directory, model, card, extra_tensors=extra_tensors)


def export_pretrained(
    directory: Path,
    backbone: str = "efficientnet_lite0",
    *,
    weights: str = "imagenet",
    image_size: int | None = None,
    test_crop_pct: float | None = None,
    pooling: Literal["avg", "avgmax"] = "avg",
) -> EmbeddingModel:
    """A pretrained backbone's pooled features (no head, untrained) as a model artifact at
    `directory`: `lookalike pretrained`, `POST /models` with a backbone and the service's
    built-in model. `weights` is imagenet (built-ins: shipped or cached; other timm models: the
    hub) or a file; preprocessing defaults to the backbone's own resolution and crop. The model
    is run once at `image_size` before anything is written, so an architecture that cannot take
    that size fails here. Returns the model written."""
    from training.models.backbones import BackboneError
    from training.models.embedding import build_for_size

    spec = ModelSpec(backbone=backbone, pooling=pooling, head="identity")
    model = build_for_size(spec, weights, image_size).eval()
    info = model.backbone_info
    image_size = image_size or info.image_size
    try:
        model.embed(torch.zeros(1, 3, image_size, image_size))
    except Exception as error:
        raise BackboneError(
            f"{backbone} cannot embed {image_size}x{image_size} images ({error}); "
            f"its native size is {info.image_size}"
        ) from error
    method = {"name": "pretrained", "params": {"weights": info.weights_source}}
    card = _untrained_card(
        model, image_size, test_crop_pct or info.crop_pct, info.interpolation, method
    )
    save_artifact(directory, model, card)
    return model


def weights_provenance(model: EmbeddingModel) -> dict[str, str | None]:
    """The card's record of where the backbone's starting weights came from."""
    info = model.backbone_info
    return {"source": info.weights_source, "sha256": info.weights_sha256}


def _untrained_card(
    model: EmbeddingModel,
    image_size: int,
    test_crop_pct: float,
    interpolation: str,
    method: dict[str, Any],
) -> ModelCard:
    """The card of a model that no training run made: its structure, and test-time
    preprocessing normalised with the backbone's own mean and std."""
    info = model.backbone_info
    return ModelCard(
        architecture=model.spec,
        embedding_dim=model.embedding_dim,
        preprocessing=Preprocessing(
            image_size=image_size,
            test_crop_pct=test_crop_pct,
            interpolation=interpolation,
            mean=info.mean,
            std=info.std,
        ),
        method=method,
        backbone_weights=weights_provenance(model),
    )


def read_card(directory: Path) -> ModelCard:
    directory = Path(directory)
    card_path = directory / CARD_FILE
    if not directory.is_dir() or not card_path.is_file():
        raise CheckpointError(f"{directory} is not a lookalike model (no {CARD_FILE} in it)")
    try:
        card = ModelCard.model_validate(json.loads(card_path.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError, ValidationError) as error:
        first = str(error).splitlines()[0]
        raise CheckpointError(f"{card_path} is corrupt or of another format: {first}") from error
    if card.format != FORMAT:
        raise CheckpointError(f"{card_path} has format {card.format!r}, expected {FORMAT!r}")
    return card


def load_model(directory: Path) -> tuple[EmbeddingModel, ModelCard, dict[str, torch.Tensor]]:
    """Rebuild the network from the artifact alone; returns (model in eval mode, card, extras)."""
    directory = Path(directory)
    card = read_card(directory)
    try:
        tensors = load_file(str(directory / WEIGHTS_FILE))
    except (SafetensorError, FileNotFoundError, OSError) as error:
        raise CheckpointError(
            f"{directory / WEIGHTS_FILE} is missing or corrupt: {error}"
        ) from error
    extras = {k[len(EXTRA_PREFIX) :]: v for k, v in tensors.items() if k.startswith(EXTRA_PREFIX)}
    state = {k: v for k, v in tensors.items() if not k.startswith(EXTRA_PREFIX)}
    model = EmbeddingModel(card.architecture, weights="none")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise CheckpointError(f"{directory} weights do not fit its card: {error}") from error
    return model.eval(), card, extras


class Embedder:
    """Turns images into L2-normalised float32 embeddings exactly as the model was evaluated."""

    def __init__(
        self,
        model: EmbeddingModel,
        card: ModelCard,
        extras: dict[str, torch.Tensor] | None = None,
        device: str | torch.device = "cpu",
        forward: Callable[[torch.Tensor], np.ndarray] | None = None,
        backend: str = "torch",
        backend_reason: str = "",
    ) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval().to(memory_format=torch.channels_last)
        self.card = card
        self.extras = extras or {}
        self.transform = build_test_transform(card.preprocessing.transform_config())
        # Another runtime's forward pass (`training.export.load_inference_embedder`), or torch.
        self._forward = forward or self._torch_forward
        self.backend = backend
        self.backend_reason = backend_reason

    @property
    def dimension(self) -> int:
        return self.card.embedding_dim

    def preprocess(self, image: Image.Image | torch.Tensor) -> torch.Tensor:
        """PIL image or uint8 CHW tensor -> normalised float tensor at the model's resolution."""
        from training.data.image_dataset import decode_pil_image

        tensor = decode_pil_image(image) if isinstance(image, Image.Image) else image
        return self.transform(tensor)

    @torch.inference_mode()
    def embed(
        self, images: Sequence[Image.Image | torch.Tensor] | torch.Tensor, batch_size: int = 64
    ) -> np.ndarray:
        """Embeddings (N, dim) for PIL images, raw uint8 tensors, or an already
        preprocessed float batch (N, 3, H, W)."""
        if isinstance(images, torch.Tensor) and images.is_floating_point():
            batches = [images[i : i + batch_size] for i in range(0, len(images), batch_size)]
        else:
            prepared = [self.preprocess(image) for image in images]
            batches = [
                torch.stack(prepared[i : i + batch_size])
                for i in range(0, len(prepared), batch_size)
            ]
        if not batches:
            return np.zeros((0, self.dimension), dtype=np.float32)
        return np.concatenate([self._forward(batch) for batch in batches]).astype(
            np.float32, copy=False
        )

    @torch.inference_mode()
    def _torch_forward(self, batch: torch.Tensor) -> np.ndarray:
        batch = batch.to(self.device).contiguous(memory_format=torch.channels_last)
        return self.model.embed(batch).cpu().numpy()


def load_embedder(directory: Path, device: str | torch.device = "cpu") -> Embedder:
    """The service's entry point: an `Embedder` built from a model artifact alone."""
    model, card, extras = load_model(directory)
    return Embedder(model, card, extras, device=device)
