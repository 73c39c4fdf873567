"""Training and embedding throughput of a backbone on this machine (synthetic batches).

Measures full optimiser steps (forward, margin loss, backward, Adam) and inference, with and
without channels_last, so the numbers isolate the network from data loading (whose share the
trainer reports itself as `data_wait_fraction`).

    python benchmarks/throughput.py --backbone efficientnet_lite0 --sizes 112 128 --batch 64
"""

from __future__ import annotations

import argparse
import time

import torch

from training.losses import build_loss
from training.models.embedding import EmbeddingModel, ModelSpec


def images_per_second(step, batch: int, repeats: int) -> float:
    step()  # warm-up: oneDNN picks its kernels on the first call of each shape
    step()
    started = time.perf_counter()
    for _ in range(repeats):
        step()
    return batch * repeats / (time.perf_counter() - started)


def measure(backbone: str, size: int, batch: int, channels_last: bool, device: str, repeats: int):
    model = EmbeddingModel(ModelSpec(backbone=backbone), weights="none").to(device)
    loss_fn = build_loss("margin", num_classes=batch // 2, embedding_dim=128).to(device)
    optimizer = torch.optim.Adam([*model.parameters(), *loss_fn.parameters()], lr=1e-5)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model.to(memory_format=memory_format)
    images = torch.randn(batch, 3, size, size, device=device).contiguous(
        memory_format=memory_format
    )
    labels = torch.arange(batch, device=device) // 2
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda")

    def train_step() -> None:
        with autocast:
            loss = loss_fn(model(images)["embedding"].float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()

    @torch.inference_mode()
    def embed_step() -> None:
        with autocast:
            model.embed(images)
        if device == "cuda":
            torch.cuda.synchronize()

    model.train()
    train = images_per_second(train_step, batch, repeats)
    model.eval()
    embed = images_per_second(embed_step, batch, repeats)
    return train, embed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--sizes", type=int, nargs="+", default=[112, 128])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    print(
        f"| backbone | px | batch | channels_last | train img/s | embed img/s |  ({args.device},"
        f" {torch.get_num_threads()} threads, torch {torch.__version__})"
    )
    print("|---|---|---|---|---|---|")
    for size in args.sizes:
        for channels_last in (False, True):
            train, embed = measure(
                args.backbone, size, args.batch, channels_last, args.device, args.repeats
            )
            print(
                f"| {args.backbone} | {size} | {args.batch} | {channels_last} | {train:.1f} |"
                f" {embed:.1f} |",
                flush=True,
            )
        if args.device == "cuda":
            print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
