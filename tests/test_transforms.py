"""Transforms, image decoding (alpha, palette, grey, 16-bit, EXIF, damaged files), ImageDataset."""

from __future__ import annotations

import logging
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from training.data.image_dataset import (
    ImageDataset,
    UnreadableImageError,
    decode_image_file,
    decode_pil_image,
    drop_unreadable,
    find_unreadable,
)
from training.data.records import DatasetError, Split
from training.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TransformConfig,
    build_test_transform,
    build_train_transform,
)

# torchvision 0.29 deprecates its image decoders in favour of TorchCodec, which is not installed.
pytestmark = pytest.mark.filterwarnings(
    "ignore:The image decoding and encoding capabilities of TorchVision:DeprecationWarning"
)

UNIT_NORM = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}


def pixels(image: torch.Tensor) -> list[list[int]]:
    """(3, H, W) -> [[r, g, b], ...] in row-major order."""
    return image.permute(1, 2, 0).reshape(-1, 3).tolist()


def decode_both_ways(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    with Image.open(path) as image:
        return decode_image_file(path), decode_pil_image(image)


def assert_close(a: torch.Tensor, b: torch.Tensor, tolerance: int = 1) -> None:
    assert a.shape == b.shape
    assert (a.to(torch.int32) - b.to(torch.int32)).abs().max() <= tolerance


def write_png16_rgb(path: Path, array: np.ndarray) -> None:
    """A 16-bit RGB PNG by hand: Pillow cannot save one, torchvision encodes only uint8."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    height, width, _ = array.shape
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in array)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def write_noise(path: Path, seed: int = 0, size: tuple[int, int] = (40, 30)) -> Path:
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(array).save(path)
    return path


# TransformConfig and transforms ---------------------------------------------------------------


def test_config_defaults_follow_the_papers():
    cfg = TransformConfig()
    assert (cfg.image_size, cfg.crop_scale, cfg.hflip) == (224, (0.08, 1.0), 0.5)
    assert cfg.test_resize_size == 256
    assert TransformConfig(image_size=160).test_resize_size == 182  # floor(160 / 0.875)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"crop_scale": (0.5, 0.2)}, "crop_scale must satisfy 0 < low <= high <= 1"),
        ({"std": (0.5, 0.0, 0.5)}, "std must be positive"),
        ({"interpolation": "nearest"}, "bilinear"),
        ({"hflip": 1.5}, "less than or equal to 1"),
        ({"img_size": 128}, "Extra inputs are not permitted"),
    ],
)
def test_config_rejects_bad_values(kwargs: dict, message: str):
    with pytest.raises(ValidationError, match=message):
        TransformConfig(**kwargs)


def test_test_transform_normalises_a_constant_image():
    transform = build_test_transform(TransformConfig(image_size=32))
    image = torch.full((3, 50, 70), 128, dtype=torch.uint8)

    out = transform(image)

    assert out.shape == (3, 32, 32)
    assert out.dtype == torch.float32
    for channel, (mean, std) in enumerate(zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)):
        expected = (128 / 255 - mean) / std
        assert torch.allclose(out[channel], torch.full((32, 32), expected), atol=1e-5)


def test_test_transform_resizes_the_shorter_side_then_crops_the_centre():
    # 64 x 128, left half black: resize to floor(56 / 0.875) = 64 keeps it; the centre 56 columns
    # are 36..91, of which 36..63 are black.
    image = torch.zeros((3, 64, 128), dtype=torch.uint8)
    image[:, :, 64:] = 255
    transform = build_test_transform(TransformConfig(image_size=56, **UNIT_NORM))

    out = transform(image)

    assert out.shape == (3, 56, 56)
    assert torch.equal(out[:, :, :28], torch.zeros(3, 56, 28))
    assert torch.equal(out[:, :, 28:], torch.ones(3, 56, 28))


def test_test_transform_is_deterministic():
    image = torch.randint(0, 256, (3, 90, 70), dtype=torch.uint8)
    transform = build_test_transform(TransformConfig(image_size=48, interpolation="bicubic"))
    assert torch.equal(transform(image), transform(image))


def test_train_transform_with_full_crop_and_certain_flip_mirrors_the_image():
    image = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    cfg = TransformConfig(image_size=32, crop_scale=(1.0, 1.0), hflip=1.0, **UNIT_NORM)

    out = build_train_transform(cfg)(image)

    assert torch.allclose(out, image.flip(-1).float() / 255)


def test_train_transform_augments_randomly_to_the_configured_size():
    image = torch.randint(0, 256, (3, 120, 90), dtype=torch.uint8)
    transform = build_train_transform(TransformConfig(image_size=48, **UNIT_NORM))
    torch.manual_seed(0)
    first, second = transform(image), transform(image)
    assert first.shape == second.shape == (3, 48, 48)
    assert first.dtype == torch.float32
    assert not torch.equal(first, second)
    assert first.min() >= 0.0 and first.max() <= 1.0


# Decoding -------------------------------------------------------------------------------------


def test_rgba_png_is_composited_on_white(tmp_path: Path):
    image = Image.new("RGBA", (3, 1))
    image.putdata([(255, 0, 0, 0), (0, 0, 255, 255), (0, 0, 0, 128)])
    image.save(tmp_path / "a.png")

    fast, via_pil = decode_both_ways(tmp_path / "a.png")

    assert fast.dtype == torch.uint8
    assert pixels(fast) == [[255, 255, 255], [0, 0, 255], [127, 127, 127]]
    assert_close(fast, via_pil)


def test_grey_with_alpha_is_composited_on_white(tmp_path: Path):
    image = Image.new("LA", (2, 1))
    image.putdata([(100, 0), (100, 255)])
    image.save(tmp_path / "la.png")
    fast, via_pil = decode_both_ways(tmp_path / "la.png")
    assert pixels(fast) == pixels(via_pil) == [[255, 255, 255], [100, 100, 100]]


@pytest.mark.parametrize("suffix", [".png", ".gif"])
def test_palette_transparency_becomes_white(tmp_path: Path, suffix: str):
    image = Image.new("P", (2, 1))
    image.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    image.putdata([0, 1])
    image.save(tmp_path / f"p{suffix}", transparency=0)
    fast, via_pil = decode_both_ways(tmp_path / f"p{suffix}")
    assert pixels(fast) == pixels(via_pil) == [[255, 255, 255], [10, 200, 30]]


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".bmp", ".tiff"])
def test_grey_images_become_three_equal_channels(tmp_path: Path, suffix: str):
    Image.new("L", (4, 2), 100).save(tmp_path / f"g{suffix}")
    fast, via_pil = decode_both_ways(tmp_path / f"g{suffix}")
    assert fast.shape == (3, 2, 4)
    assert_close(fast, torch.full((3, 2, 4), 100, dtype=torch.uint8))
    assert torch.equal(fast, via_pil)


def test_16_bit_grey_png_is_scaled_not_clipped(tmp_path: Path):
    grey16 = np.array([[0, 256, 40000, 65535]], dtype=np.uint16)
    Image.fromarray(grey16).save(tmp_path / "g16.png")
    fast, via_pil = decode_both_ways(tmp_path / "g16.png")
    assert pixels(fast) == pixels(via_pil) == [[v] * 3 for v in (0, 1, 156, 255)]


def test_16_bit_rgb_png_is_scaled(tmp_path: Path):
    rgb16 = np.array([[[65535, 0, 40000], [256, 512, 1000]]], dtype=np.uint16)
    write_png16_rgb(tmp_path / "rgb16.png", rgb16)
    fast, via_pil = decode_both_ways(tmp_path / "rgb16.png")
    assert pixels(fast) == [[255, 0, 156], [1, 2, 3]]
    assert_close(fast, via_pil)


@pytest.mark.parametrize("suffix", [".jpg", ".png", ".webp"])
def test_exif_orientation_is_applied(tmp_path: Path, suffix: str):
    # 4 wide x 2 high, red left and blue right; orientation 6 = rotate 90 degrees clockwise to
    # display, giving 2 wide x 4 high with red on top.
    array = np.zeros((2, 4, 3), dtype=np.uint8)
    array[:, :2] = (255, 0, 0)
    array[:, 2:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(array).save(tmp_path / f"rot{suffix}", exif=exif, quality=95)

    fast, via_pil = decode_both_ways(tmp_path / f"rot{suffix}")

    assert fast.shape == (3, 4, 2)
    assert_close(fast[:, 0, 0], torch.tensor([255, 0, 0], dtype=torch.uint8), tolerance=8)
    assert_close(fast[:, 3, 0], torch.tensor([0, 0, 255], dtype=torch.uint8), tolerance=8)
    assert_close(fast, via_pil, tolerance=2)


def test_truncated_jpeg_cannot_be_decoded(tmp_path: Path):
    data = write_noise(tmp_path / "whole.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(UnreadableImageError, match=r"cannot decode .*cut.jpg: image file is trunc"):
        decode_image_file(tmp_path / "cut.jpg")


def test_missing_file_cannot_be_read(tmp_path: Path):
    with pytest.raises(UnreadableImageError, match=r"cannot read .*gone.png"):
        decode_image_file(tmp_path / "gone.png")


# Unreadable files -----------------------------------------------------------------------------


def write_class_folder_with_bad_files(root: Path) -> Split:
    good = [write_noise(root / f"good{i}.png", seed=i) for i in range(3)]
    (root / "text.jpg").write_text("this is not an image")
    (root / "empty.png").write_bytes(b"")
    png = write_noise(root / "whole.png", seed=9).read_bytes()
    (root / "cut.png").write_bytes(png[: len(png) // 2])
    bad = [root / "text.jpg", root / "empty.png", root / "cut.png"]
    return Split.from_named([(p, "a") for p in good[:2]] + [(p, "b") for p in [good[2], *bad]])


def test_find_unreadable_reports_non_images_empty_and_truncated_png(tmp_path: Path):
    split = write_class_folder_with_bad_files(tmp_path)
    reported = find_unreadable(split)
    assert [path.name for path, _ in reported] == ["text.jpg", "empty.png", "cut.png"]
    assert "cannot identify image file" in reported[0][1]


def test_drop_unreadable_skips_bad_files_with_a_warning(tmp_path: Path, caplog):
    split = write_class_folder_with_bad_files(tmp_path)
    with caplog.at_level(logging.WARNING, logger="training.data.image_dataset"):
        kept, dropped = drop_unreadable(split)
    assert [p.name for p in kept.paths] == ["good0.png", "good1.png", "good2.png"]
    assert kept.labels == [0, 0, 1]
    assert len(dropped) == 3
    assert "skipping 3 of 6 images that cannot be read" in caplog.text


def test_drop_unreadable_when_nothing_can_be_read(tmp_path: Path):
    (tmp_path / "x.jpg").write_text("no")
    with pytest.raises(DatasetError, match=r"none of the 1 images can be read \(e.g. .*x.jpg"):
        drop_unreadable(Split.from_named([(tmp_path / "x.jpg", "a")]))


# ImageDataset ---------------------------------------------------------------------------------


def test_dataset_returns_transformed_image_label_and_index(tmp_path: Path):
    paths = [write_noise(tmp_path / f"{i}.png", seed=i) for i in range(4)]
    split = Split.from_named([(p, "ab"[i // 2]) for i, p in enumerate(paths)])
    dataset = ImageDataset(split, build_test_transform(TransformConfig(image_size=24)))

    image, label, index = dataset[3]

    assert len(dataset) == 4
    assert (image.shape, image.dtype, label, index) == ((3, 24, 24), torch.float32, 1, 3)
    expected = build_test_transform(TransformConfig(image_size=24))(decode_image_file(paths[3]))
    assert torch.equal(image, expected)


def test_dataset_with_two_views_returns_independent_augmentations(tmp_path: Path):
    split = Split.from_named([(write_noise(tmp_path / "a.png"), "a")])
    dataset = ImageDataset(split, build_train_transform(TransformConfig(image_size=24)), views=2)
    torch.manual_seed(0)
    views, label, index = dataset[0]
    assert isinstance(views, tuple) and len(views) == 2
    assert views[0].shape == views[1].shape == (3, 24, 24)
    assert not torch.equal(views[0], views[1])
    assert (label, index) == (0, 0)


def test_dataset_substitutes_an_undecodable_file_by_the_next_of_its_class(tmp_path: Path, caplog):
    data = write_noise(tmp_path / "whole.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])  # passes the header check
    other_class = write_noise(tmp_path / "other.png", seed=1)
    same_class = write_noise(tmp_path / "same.png", seed=2)
    split = Split.from_named([(other_class, "x"), (tmp_path / "cut.jpg", "y"), (same_class, "y")])
    dataset = ImageDataset(split, build_test_transform(TransformConfig(image_size=16)))
    expected = dataset[2][0]

    with caplog.at_level(logging.WARNING, logger="training.data.image_dataset"):
        first, label, index = dataset[1]
        second, _, _ = dataset[1]

    assert torch.equal(first, expected) and torch.equal(second, expected)
    assert (label, index) == (1, 1)
    assert caplog.text.count("cut.jpg") == 1


def test_dataset_fails_when_no_image_of_the_class_decodes(tmp_path: Path):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    split = Split.from_named([(tmp_path / "bad.png", "lonely")])
    dataset = ImageDataset(split, build_test_transform(TransformConfig(image_size=16)))
    with pytest.raises(UnreadableImageError, match="no image of class lonely can be decoded"):
        dataset[0]


def test_dataset_needs_at_least_one_view():
    with pytest.raises(ValueError, match="views must be at least 1, got 0"):
        ImageDataset(Split([], [], []), build_test_transform(TransformConfig()), views=0)
