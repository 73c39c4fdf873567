"""Shared fixtures: small image datasets the tests write themselves."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

SHAPES = ("ellipse", "rectangle", "triangle", "cross", "ring", "bar")


def draw_sample(class_index: int, sample_index: int, size: int = 40) -> Image.Image:
    """A picture whose class is a (shape, colour) pair and whose sample varies position/scale,
    so a tiny network can learn the classes."""
    rng = np.random.default_rng(class_index * 1000 + sample_index)
    background = tuple(int(v) for v in rng.integers(200, 256, size=3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    colour = tuple(
        int(v)
        for v in np.array(
            [(class_index * 67) % 256, (class_index * 131) % 256, (class_index * 29 + 90) % 256]
        )
    )
    shape = SHAPES[class_index % len(SHAPES)]
    margin = int(rng.integers(2, size // 4))
    box = [margin, margin, size - margin - int(rng.integers(0, 4)), size - margin]
    if shape == "ellipse":
        draw.ellipse(box, fill=colour)
    elif shape == "rectangle":
        draw.rectangle(box, fill=colour)
    elif shape == "triangle":
        draw.polygon(
            [(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) // 2, box[1])], fill=colour
        )
    elif shape == "cross":
        draw.line([box[0], box[1], box[2], box[3]], fill=colour, width=5)
        draw.line([box[0], box[3], box[2], box[1]], fill=colour, width=5)
    elif shape == "ring":
        draw.ellipse(box, outline=colour, width=5)
    else:
        draw.rectangle([box[0], size // 2 - 4, box[2], size // 2 + 4], fill=colour)
    return image


def write_image_folder(root: Path, classes: list[str], per_class: int, offset: int = 0) -> Path:
    for number, name in enumerate(classes):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for sample in range(per_class):
            draw_sample(number + offset, sample).save(folder / f"{sample:03d}.png")
    return root


@pytest.fixture
def tiny_dataset(tmp_path: Path) -> Path:
    """An ImageFolder dataset with train/ (8 classes) and test/ (4 other classes)."""
    root = tmp_path / "tiny"
    write_image_folder(root / "train", [f"train_{i}" for i in range(8)], per_class=6)
    write_image_folder(root / "test", [f"test_{i}" for i in range(4)], per_class=5, offset=8)
    return root


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now, for a server a test starts."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
