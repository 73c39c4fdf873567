"""Embedding a whole split once, batched, for evaluation, `lookalike embed` and indexing."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader

from training.data.image_dataset import ImageDataset
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
) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings float32 (N, d) L2-normalised, labels int64 (N,)) in split order."""
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
    try:
        for images, _, _ in loader:
            images = images.to(device, non_blocking=True).contiguous(memory_format=memory_format)
            with autocast:
                chunks.append(model.embed(images).float().cpu())
    finally:
        model.train(was_training)
    embeddings = torch.cat(chunks).numpy() if chunks else np.zeros((0, model.embedding_dim))
    return embeddings.astype(np.float32, copy=False), np.asarray(split.labels, dtype=np.int64)
