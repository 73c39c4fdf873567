"""Embedding a whole split once, batched, for evaluation, `lookalike embed` and indexing."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from training.data.image_dataset import ImageDataset, drop_unreadable
from training.data.readers import load_dataset
from training.data.records import Split
from training.data.transforms import TransformConfig, build_test_transform
from training.models.embedding import EmbeddingModel


@torch.inference_mode()
def compute_embeddings(
    model: EmbeddingModel,
    split: Split,
    transform: TransformConfig,
    *,
    batch_size: int = 128,
    num_workers: int = 2,
    device: torch.device | str = "cpu",
    channels_last: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings float32 (N, d) L2-normalised, labels int64 (N,)) in split order.

    `progress(done, total)` hears how many images are embedded, before the first batch and
    after each, so a long pass can show how far it is."""
    device = torch.device(device)
    loader = DataLoader(
        ImageDataset(split, build_test_transform(transform)),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        generator=torch.Generator(),  # leave the global RNG (miners, resume) untouched
    )
    was_training = model.training
    model.eval()
    chunks = []
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    report = progress or (lambda done, total: None)
    done = 0
    report(done, len(split))
    try:
        for images, _, _ in loader:
            images = images.to(device, non_blocking=True).contiguous(memory_format=memory_format)
            with autocast:
                chunks.append(model.embed(images).float().cpu())
            done += len(images)
            report(done, len(split))
    finally:
        model.train(was_training)
    embeddings = torch.cat(chunks).numpy() if chunks else np.zeros((0, model.embedding_dim))
    return embeddings.astype(np.float32, copy=False), np.asarray(split.labels, dtype=np.int64)


def load_split(
    spec: str, split: str, max_classes: int | None = None
) -> tuple[Split, list[tuple[Path, str]]]:
    """The split that evaluation embeds, the same for `lookalike evaluate`/`embed`, the service's
    evaluate jobs and its reports: `split` ("train" or "test") of the dataset `spec`, its first
    `max_classes` classes, and the unreadable images dropped (returned: callers report them)."""
    if split not in ("train", "test"):
        raise ValueError(f"the split must be train or test, got {split!r}")
    chosen = getattr(load_dataset(spec), split)
    if max_classes:
        chosen = chosen.select_classes(chosen.class_names[:max_classes])
    return drop_unreadable(chosen)


def embed_split_with_artifact(
    model_dir: Path,
    split: Split,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 128,
    num_workers: int = 2,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """`compute_embeddings` with a saved model artifact and the preprocessing its card records:
    how `lookalike evaluate`/`embed`, the service's evaluate and train jobs and its reports embed
    a split, so they all measure a model the same way."""
    from training.checkpoint import load_model

    model, card, _ = load_model(model_dir)
    device = torch.device(device)
    return compute_embeddings(
        model.to(device),
        split,
        card.preprocessing.transform_config(),
        batch_size=batch_size,
        num_workers=num_workers,
        device=device,
        progress=progress,
    )
