"""app.imaging: every rejected upload gets the right status, every mode the right RGB."""

from __future__ import annotations

import hashlib
import io
import struct
import threading
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from app.imaging import (
    DecodeBudget,
    ImageRejected,
    content_hash,
    open_upload,
    sniff_content_type,
    thumbnail_bytes,
)
from training.data.image_dataset import decode_pil_image

MAX_PIXELS = 40_000_000


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def noise(width: int = 48, height: int = 32, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height pixels, with (almost) no pixel data."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def rejected(data: bytes, status: int, match: str, **kwargs) -> ImageRejected:
    with pytest.raises(ImageRejected, match=match) as info:
        open_upload(data, max_pixels=kwargs.pop("max_pixels", MAX_PIXELS), **kwargs)
    assert info.value.status_code == status
    assert info.value.detail == str(info.value)
    return info.value


# Rejections.


def test_empty_upload_is_400():
    rejected(b"", 400, "empty")


def test_not_an_image_is_415():
    rejected(b"hello, this is text" * 10, 415, "not a recognised image")


@pytest.mark.parametrize(
    ("data", "what"),
    [
        (encode(noise(), "PDF"), "PDF"),
        (encode(noise(32, 32), "ICO"), "ICO"),
        (b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"/>', "SVG"),
        (b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"></svg>', "SVG"),
        (b"\x00\x00\x00\x1cftypheic\x00\x00\x00\x00", "HEIC"),
    ],
)
def test_unsupported_formats_are_415_and_named(data, what):
    error = rejected(data, 415, what)
    assert "JPEG, PNG" in str(error)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_files_are_400(fmt):
    data = encode(noise(64, 64), fmt)
    rejected(data[: len(data) // 2], 400, f"{fmt} file is truncated")


def test_corrupt_header_of_an_accepted_format_is_400():
    rejected(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, 400, "starts like a PNG image")


def test_too_many_pixels_is_413_before_decoding():
    # 2000 x 2000 claimed, cap 1000 pixels: rejected from the header alone.
    error = rejected(png_header_only(2000, 2000), 413, "4,000,000 pixels", max_pixels=1000)
    assert "at most 1,000 pixels" in str(error)


@pytest.mark.parametrize(
    "size",
    [
        (10_000, 10_000),  # 100 MP: Pillow's DecompressionBombWarning range, escalated
        (100_000, 100_000),  # 10 GP: Pillow's DecompressionBombError range
    ],
)
@pytest.mark.filterwarnings("error::PIL.Image.DecompressionBombWarning")  # as app.imaging sets
def test_decompression_bombs_are_413(size):
    rejected(png_header_only(*size), 413, "decompression bomb")


def test_oversized_bytes_are_413():
    data = encode(noise(), "PNG")
    rejected(data, 413, "limit is 100 bytes", max_bytes=100)
    assert open_upload(data, max_pixels=MAX_PIXELS, max_bytes=len(data)).size == (48, 32)


# Accepted formats and conversions.


@pytest.mark.parametrize(
    ("fmt", "mime"),
    [
        ("JPEG", "image/jpeg"),
        ("PNG", "image/png"),
        ("WEBP", "image/webp"),
        ("GIF", "image/gif"),
        ("BMP", "image/bmp"),
        ("TIFF", "image/tiff"),
    ],
)
def test_accepted_formats_decode_to_rgb_and_sniff(fmt, mime):
    data = encode(noise(), fmt)
    image = open_upload(data, max_pixels=MAX_PIXELS)
    assert image.mode == "RGB" and image.size == (48, 32)
    assert image.format == fmt
    assert sniff_content_type(image) == mime
    assert sniff_content_type(data) == mime


def test_exif_orientation_is_applied():
    # Left half red, right half blue, stored landscape with "rotate 90 CW to display" (6).
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, :20] = (255, 0, 0)
    pixels[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(Image.fromarray(pixels), "JPEG", exif=exif.tobytes(), quality=95)
    image = open_upload(data, max_pixels=MAX_PIXELS)
    assert image.size == (20, 40)  # now portrait
    array = np.asarray(image).astype(int)
    assert array[5, 10, 0] > 200 and array[5, 10, 2] < 60  # top: red
    assert array[35, 10, 2] > 200 and array[35, 10, 0] < 60  # bottom: blue


def test_rgba_and_la_are_composited_on_white():
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[0, 0, 3] = 0  # transparent -> white
    rgba[0, 1, 3] = 255  # opaque -> its colour
    rgba[0, 2, 3] = 128  # half -> blended
    image = open_upload(encode(Image.fromarray(rgba, "RGBA"), "PNG"), max_pixels=MAX_PIXELS)
    array = np.asarray(image)
    assert tuple(array[0, 0]) == (255, 255, 255)
    assert tuple(array[0, 1]) == (200, 0, 0)
    assert tuple(array[0, 2]) == (round((200 * 128 + 255 * 127) / 255), 127, 127)
    la = Image.fromarray(np.dstack([np.full((4, 4), 50, np.uint8), rgba[..., 3]]), "LA")
    array = np.asarray(open_upload(encode(la, "PNG"), max_pixels=MAX_PIXELS))
    assert tuple(array[0, 0]) == (255, 255, 255) and tuple(array[0, 1]) == (50, 50, 50)


def test_palette_with_transparency_is_composited_on_white():
    image = Image.new("P", (4, 4), 0)
    image.putpalette([10, 20, 30, 40, 50, 60] + [0] * 762)
    image.putpixel((1, 1), 1)
    data = encode(image, "PNG", transparency=0)
    array = np.asarray(open_upload(data, max_pixels=MAX_PIXELS))
    assert tuple(array[0, 0]) == (255, 255, 255)
    assert tuple(array[1, 1]) == (40, 50, 60)
    gif = encode(image, "GIF", transparency=0)
    array = np.asarray(open_upload(gif, max_pixels=MAX_PIXELS))
    assert tuple(array[0, 0]) == (255, 255, 255) and tuple(array[1, 1]) == (40, 50, 60)


def test_palette_without_transparency_keeps_colours():
    image = Image.new("P", (4, 4), 1)
    image.putpalette([10, 20, 30, 40, 50, 60] + [0] * 762)
    array = np.asarray(open_upload(encode(image, "PNG"), max_pixels=MAX_PIXELS))
    assert tuple(array[0, 0]) == (40, 50, 60)


def test_cmyk_jpeg_becomes_rgb():
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # pure red in CMYK
    image = open_upload(encode(cmyk, "JPEG", quality=100), max_pixels=MAX_PIXELS)
    r, g, b = np.asarray(image)[4, 4].astype(int)
    assert image.mode == "RGB" and r > 230 and g < 30 and b < 30


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_sixteen_bit_grey_is_scaled_not_clipped(fmt):
    values = np.array([[0, 256, 32768, 65535]], dtype=np.uint16)
    data = encode(Image.fromarray(values), fmt)
    array = np.asarray(open_upload(data, max_pixels=MAX_PIXELS))
    assert array[0, :, 0].tolist() == [0, 1, 128, 255]
    assert (array[..., 0] == array[..., 2]).all()


def test_32_bit_integer_tiff_is_scaled_like_training():
    values = np.array([[0, 4096, 65535, 70000]], dtype=np.int32)
    image = Image.fromarray(values, "I")
    array = np.asarray(open_upload(encode(image, "TIFF"), max_pixels=MAX_PIXELS))
    assert array[0, :, 1].tolist() == [0, 16, 255, 255]


@pytest.mark.parametrize("mode", ["L", "1"])
def test_grey_and_bilevel_become_three_equal_channels(mode):
    image = Image.fromarray(np.array([[0, 255]], dtype=np.uint8)).convert(mode)
    array = np.asarray(open_upload(encode(image, "PNG"), max_pixels=MAX_PIXELS))
    assert array.shape == (1, 2, 3)
    assert array[0, :, 0].tolist() == [0, 255]
    assert (array[..., 0] == array[..., 1]).all()


def test_serving_decode_equals_training_decode():
    """The embedder re-runs training's conversion on what open_upload returns: a no-op."""
    rgba = Image.fromarray(np.random.default_rng(1).integers(0, 256, (9, 7, 4), dtype=np.uint8))
    data = encode(rgba, "PNG")
    served = open_upload(data, max_pixels=MAX_PIXELS)
    trained = decode_pil_image(Image.open(io.BytesIO(data)))
    assert np.array_equal(np.asarray(served).transpose(2, 0, 1), trained.numpy())
    assert np.array_equal(decode_pil_image(served).numpy(), trained.numpy())


def test_animated_gif_gives_the_first_frame():
    frames = [Image.new("RGB", (6, 6), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    out = io.BytesIO()
    frames[0].save(out, "GIF", save_all=True, append_images=frames[1:])
    array = np.asarray(open_upload(out.getvalue(), max_pixels=MAX_PIXELS))
    assert tuple(array[0, 0]) == (255, 0, 0)


# Helpers.


def test_thumbnail_is_a_small_jpeg_keeping_the_aspect_ratio():
    data = thumbnail_bytes(noise(400, 100), size=64)
    with Image.open(io.BytesIO(data)) as thumb:
        assert thumb.format == "JPEG" and thumb.size == (64, 16)
    small = thumbnail_bytes(noise(20, 10))  # never upscaled
    assert Image.open(io.BytesIO(small)).size == (20, 10)


def test_content_hash_is_sha256_hex():
    assert content_hash(b"abc") == hashlib.sha256(b"abc").hexdigest()
    assert len(content_hash(b"")) == 64


def test_a_huge_jpeg_query_is_decoded_at_the_size_the_model_needs():
    gradient = np.linspace(0, 255, 4000, dtype=np.uint8)
    pixels = np.stack([np.tile(gradient, (3000, 1))] * 3, axis=-1)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    full = open_upload(buffer.getvalue(), max_pixels=40_000_000)
    reduced = open_upload(buffer.getvalue(), max_pixels=40_000_000, min_side=512)
    assert full.size == (4000, 3000)
    assert reduced.size == (1000, 750)  # DCT scale 1/4: both sides still >= 512
    assert reduced.format == "JPEG"
    assert reduced.info["source_size"] == full.info["source_size"] == (4000, 3000)


def _rotated_halves(width: int, height: int) -> Image.Image:
    """Left half red, right half blue."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[:, : width // 2] = (255, 0, 0)
    pixels[:, width // 2 :] = (0, 0, 255)
    return Image.fromarray(pixels)


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [("L", "PNG"), ("RGB", "PNG"), ("RGBA", "PNG"), ("P", "PNG"), ("I;16", "PNG"), ("1", "TIFF")],
)
def test_large_images_of_every_mode_are_reduced_to_the_needed_side(mode, fmt):
    """Formats without reduced decoding are box-reduced by an integer factor before any RGB
    copy exists; the result matches the full decode reduced afterwards."""
    array = np.random.default_rng(2).integers(0, 256, (600, 800, 3), dtype=np.uint8)
    source = Image.fromarray(array).convert(mode if mode != "I;16" else "L")
    if mode == "I;16":
        source = Image.fromarray(np.asarray(source).astype(np.uint16) * 257)
    data = encode(source, fmt)
    full = open_upload(data, max_pixels=MAX_PIXELS)
    reduced = open_upload(data, max_pixels=MAX_PIXELS, min_side=64)
    assert reduced.size == (89, 67)  # factor 600 // 64 = 9
    assert min(reduced.size) >= 64 and reduced.mode == "RGB"
    assert reduced.info["source_size"] == (800, 600) and reduced.format == fmt
    expected = np.asarray(full.reduce(9)).astype(int)
    assert np.abs(np.asarray(reduced).astype(int) - expected).max() <= 1


def test_reduced_images_keep_their_exif_orientation_and_transparency():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display
    data = encode(_rotated_halves(400, 200), "PNG", exif=exif.tobytes())
    image = np.asarray(open_upload(data, max_pixels=MAX_PIXELS, min_side=50)).astype(int)
    assert image.shape == (100, 50, 3)  # factor 4, now portrait
    assert open_upload(data, max_pixels=MAX_PIXELS).info["source_size"] == (200, 400)
    assert image[10, 25, 0] > 200 and image[10, 25, 2] < 60  # top: red
    assert image[90, 25, 2] > 200 and image[90, 25, 0] < 60  # bottom: blue
    rgba = np.zeros((200, 200, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[:, 100:, 3] = 255
    array = np.asarray(
        open_upload(encode(Image.fromarray(rgba), "PNG"), max_pixels=MAX_PIXELS, min_side=50)
    )
    assert tuple(array[10, 10]) == (255, 255, 255)  # transparent -> white
    assert tuple(array[10, 40]) == (200, 0, 0)


def test_the_decode_budget_bounds_pixels_decoded_at_once():
    budget = DecodeBudget(100, timeout_s=5)
    entered = threading.Event()
    release = threading.Event()

    def hold_all() -> None:
        with budget.hold(10_000):  # larger than the budget: takes all of it
            entered.set()
            release.wait(5)

    holder = threading.Thread(target=hold_all)
    holder.start()
    assert entered.wait(5)
    assert budget.in_use == 100
    waited: list[float] = []

    def small() -> None:
        started = time.monotonic()
        with budget.hold(10):
            waited.append(time.monotonic() - started)

    waiter = threading.Thread(target=small)
    waiter.start()
    time.sleep(0.2)
    assert not waited  # still waiting for room
    release.set()
    holder.join(5)
    waiter.join(5)
    assert waited and waited[0] >= 0.2
    assert budget.in_use == 0


def test_a_decode_that_cannot_get_room_in_time_is_503():
    budget = DecodeBudget(100, timeout_s=0.1)
    data = encode(noise(20, 20), "PNG")
    with budget.hold(100):
        error = rejected(data, 503, "busy decoding", budget=budget)
    assert error.status_code == 503
    assert open_upload(data, max_pixels=MAX_PIXELS, budget=budget).size == (20, 20)


@pytest.mark.parametrize("mode", ["RGBA", "P", "I;16"])
def test_a_long_thin_image_is_converted_band_by_band_to_the_same_pixels(mode):
    """A short side under twice the needed side leaves nothing to reduce: a large such image is
    still converted in bands (no full-size RGBA or 16-bit copy), with the whole image's result."""
    rng = np.random.default_rng(3)
    array = rng.integers(0, 256, (900, 5000, 4), dtype=np.uint8)
    source = Image.fromarray(array, "RGBA")
    if mode == "P":
        source = source.convert("RGB").quantize(64)
    elif mode == "I;16":
        source = Image.fromarray(array[..., 0].astype(np.uint16) * 257)
    data = encode(source, "PNG")
    whole = np.asarray(open_upload(data, max_pixels=MAX_PIXELS))
    banded = np.asarray(open_upload(data, max_pixels=MAX_PIXELS, min_side=512))
    assert banded.shape == (900, 5000, 3) and np.array_equal(banded, whole)


def test_colour_key_transparency_survives_reduction():
    grey = Image.new("L", (400, 400), 0)
    data = encode(grey, "PNG", transparency=0)
    full = open_upload(data, max_pixels=MAX_PIXELS)
    reduced = open_upload(data, max_pixels=MAX_PIXELS, min_side=50)
    assert full.getpixel((5, 5)) == reduced.getpixel((5, 5)) == (255, 255, 255)
