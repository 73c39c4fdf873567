"""Decoding untrusted uploads into RGB images (docs/service.md, "Upload hardening").

Only the formats in `ACCEPTED_FORMATS` are ever handed to a decoder; the pixel count is checked
right after the header is parsed and before any pixel is decoded (a per-call cap, so Pillow's
global `Image.MAX_IMAGE_PIXELS` is never mutated); Pillow's `DecompressionBombWarning` is an error
in this process; truncated files are rejected (`ImageFile.LOAD_TRUNCATED_IMAGES` stays off); EXIF
orientation is applied and every mode becomes 8-bit RGB with training's own conversion
(`training.data.image_dataset.to_rgb`), so the service embeds exactly what training evaluated.
"""

from __future__ import annotations

import hashlib
import io
import os
import struct
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from training.data.image_dataset import WIDE_GREY_MODES, to_rgb

ACCEPTED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
_ACCEPTED_TEXT = "JPEG, PNG, WebP, GIF, BMP or TIFF"

# Pillow allocates image memory in blocks (16 MiB by default). glibc serves blocks below its
# 32 MiB mmap ceiling from per-thread arenas and keeps them after `free`, so every request
# thread that once decoded a large image would keep that much memory resident; blocks above
# the ceiling are mmapped and returned on `free`. Same as PILLOW_BLOCK_SIZE=64m (Pillow docs,
# "Environment variables"), which wins when set.
if "PILLOW_BLOCK_SIZE" not in os.environ:
    Image.core.set_block_size(64 * 1024**2)

# Escalate Pillow's bomb warning (images between MAX_IMAGE_PIXELS and twice that) to an error.
# Installed once at import, before any request thread exists; `open_upload` also catches both.
warnings.filterwarnings("error", category=Image.DecompressionBombWarning)

# Recognisable formats we refuse, so the 415 message can say what the file is.
_OTHER_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"%PDF", "a PDF document"),
    (b"\x00\x00\x01\x00", "an ICO icon"),
    (b"\x00\x00\x02\x00", "a CUR cursor"),
    (b"8BPS", "a Photoshop PSD file"),
    (b"\x00\x00\x00\x0cjP  ", "a JPEG 2000 image"),
    (b"\xff\x4f\xff\x51", "a JPEG 2000 codestream"),
    (b"\x76\x2f\x31\x01", "an OpenEXR image"),
    (b"PK\x03\x04", "a ZIP archive"),
    (b"\x1f\x8b", "a gzip archive"),
)
# Accepted formats' signatures: such a file that Pillow cannot identify is corrupt (400).
_ACCEPTED_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)


class ImageRejected(ValueError):
    """An upload that is not accepted. `status_code`: 400 corrupt/truncated/empty, 413 too big
    (bytes or pixels: decompression bomb), 415 not an image or an unsupported format. `str()` (and
    `.detail`) is a message for the client naming the problem and what to do."""

    def __init__(self, message: str, status_code: int) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.detail = message


class DecodeBudget:
    """A process-wide cap on the pixels being decoded at once, so concurrent requests cannot
    add up decoded images past a known amount of memory (docs/service.md, "Memory bounds").

    A decode holds its image's pixel count (at most the whole budget, so one image at the
    largest accepted size always fits) until it has been reduced to what the caller needs.
    Waiting longer than `timeout_s` gives a 503: the server is busy decoding, retry later.
    """

    def __init__(self, pixels: int, timeout_s: float = 30.0) -> None:
        if pixels < 1:
            raise ValueError("a decode budget needs at least one pixel")
        self.capacity = pixels
        self.timeout_s = timeout_s
        self._free = pixels
        self._changed = threading.Condition()

    @property
    def in_use(self) -> int:
        with self._changed:
            return self.capacity - self._free

    @contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        need = min(pixels, self.capacity)
        deadline = time.monotonic() + self.timeout_s
        with self._changed:
            while self._free < need:
                left = deadline - time.monotonic()
                if left <= 0 or not self._changed.wait(left):
                    if self._free >= need:
                        break
                    raise ImageRejected(
                        "the server is busy decoding other large images; retry in a few seconds",
                        503,
                    )
            self._free -= need
        try:
            yield
        finally:
            with self._changed:
                self._free += need
                self._changed.notify_all()


# Modes Pillow's `Image.reduce` takes as they are (it premultiplies alpha itself).
_REDUCIBLE_MODES = frozenset({"L", "LA", "RGB", "RGBA", "I", "CMYK"})
_SWAPS_SIDES = frozenset({5, 6, 7, 8})
# Pixels per band of `_rgb_by_bands` (whole rows, a multiple of the reduction factor).
_BAND_PIXELS = 1_000_000
# Images up to this size are converted whole (Pillow's copies of 4 MP cost tens of MB).
_WHOLE_IMAGE_PIXELS = 4_000_000
# EXIF orientation -> the transpose that undoes it (what `ImageOps.exif_transpose` applies).
_ORIENTATION_FIX = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def open_upload(
    data: bytes,
    *,
    max_pixels: int,
    max_bytes: int | None = None,
    min_side: int | None = None,
    budget: DecodeBudget | None = None,
) -> Image.Image:
    """Decode an uploaded file to a fully loaded 8-bit RGB image; raises `ImageRejected`.

    `min_side`: the shorter side the caller needs (a query for a 224 px model needs a few
    hundred pixels, not 40 M). JPEGs are then decoded at a reduced DCT scale and other formats
    box-reduced by an integer factor right after decoding, keeping both sides at least that
    long: the full-size RGB copy of a huge image is never made. `budget`: held for the image's
    pixels while it decodes (see `DecodeBudget`).

    Multi-frame files (animated GIF/WebP, multi-page TIFF) give their first frame. The returned
    image's `.format` is the detected source format (e.g. "JPEG"), for `sniff_content_type`,
    and `.info["source_size"]` the file's own (width, height) as displayed (EXIF orientation
    applied), before any reduction.
    `max_pixels` above Pillow's own `Image.MAX_IMAGE_PIXELS` (89.5 M) has no effect beyond it.
    CPU-bound: call it from a worker thread, not on the event loop.
    """
    if not data:
        raise ImageRejected("the uploaded file is empty; send the image's bytes", 400)
    if max_bytes is not None and len(data) > max_bytes:
        raise ImageRejected(
            f"the file is {len(data):,} bytes; the limit is {max_bytes:,} bytes", 413
        )
    try:
        image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise _bomb(f"{error}", max_pixels) from error
    except UnidentifiedImageError as error:
        claimed = _claimed_format(data)
        if claimed:
            raise ImageRejected(
                f"the file starts like a {claimed} image but cannot be read (corrupt header); "
                "upload a valid image",
                400,
            ) from error
        raise ImageRejected(_unidentified_message(data), 415) from error
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        # A recognised format whose header is damaged.
        raise ImageRejected(
            f"the image header is corrupt ({error}); upload a valid image", 400
        ) from error
    source_format = image.format
    with image:
        width, height = image.size
        if width * height > max_pixels:
            raise _bomb(f"{width}x{height} = {width * height:,} pixels", max_pixels)
        if width == 0 or height == 0:
            raise ImageRejected("the image has no pixels (zero width or height)", 400)
        try:
            with budget.hold(width * height) if budget else nullcontext():
                rgb, swapped = _decode(image, min_side)
                rgb.load()
        except ImageRejected:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            raise _bomb(f"{error}", max_pixels) from error
        except (
            OSError,
            SyntaxError,
            EOFError,
            IndexError,
            KeyError,
            TypeError,
            struct.error,
        ) as error:
            raise ImageRejected(
                f"the {source_format} file is truncated or corrupt ({error}); "
                "upload the complete file",
                400,
            ) from error
        except ValueError as error:  # e.g. a colour mode Pillow cannot convert to RGB
            raise ImageRejected(
                f"the {source_format} image cannot be converted to RGB ({error}); "
                "save it as 8-bit RGB JPEG or PNG",
                415,
            ) from error
    rgb.format = source_format
    rgb.info["source_size"] = (height, width) if swapped else (width, height)
    return rgb


def _decode(image: Image.Image, min_side: int | None) -> tuple[Image.Image, bool]:
    """Load, reduce towards `min_side` and convert to RGB band by band (no full-size copy but
    the loaded image and the RGB result), orient; also whether the orientation swapped width
    and height. Small images take Pillow's whole-image path (the same result, less work)."""
    if min_side is not None and image.format == "JPEG":
        image.draft("RGB", (min_side, min_side))
    image.load()
    factor = max(1, min(image.size) // min_side) if min_side else 1
    orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    swapped = orientation in _SWAPS_SIDES
    if factor == 1 and image.width * image.height <= _WHOLE_IMAGE_PIXELS:
        return to_rgb(ImageOps.exif_transpose(image)), swapped
    rgb = _rgb_by_bands(image, factor)
    if orientation in _ORIENTATION_FIX:
        rgb = rgb.transpose(_ORIENTATION_FIX[orientation])
    return rgb, swapped


def _rgb_by_bands(image: Image.Image, factor: int) -> Image.Image:
    """`to_rgb(image)` box-reduced by `factor`, one band of rows at a time, so that neither a
    conversion nor `reduce`'s premultiplied copy of an RGBA image exists at full size (a band's
    height is a multiple of `factor`, so every box is the one a whole-image `reduce` averages;
    `to_rgb` works pixel by pixel, so converting bands gives the whole image's result)."""
    if image.mode in WIDE_GREY_MODES:
        working_mode = "I"  # 16-bit grey: `to_rgb` keeps its high byte
    elif image.has_transparency_data:
        working_mode = "RGBA"  # colour-key (tRNS) transparency too
    elif image.mode in _REDUCIBLE_MODES:
        working_mode = image.mode
    else:
        working_mode = "RGB"
    width, height = image.size
    band = factor * max(1, _BAND_PIXELS // (width * factor))
    result = Image.new("RGB", (-(-width // factor), -(-height // factor)))
    for top in range(0, height, band):
        piece = image.crop((0, top, width, min(top + band, height)))
        if factor > 1:
            piece = (piece if piece.mode == working_mode else piece.convert(working_mode)).reduce(
                factor
            )
        result.paste(to_rgb(piece), (0, top // factor))
    return result


def declared_pixels(data: bytes) -> int:
    """The pixel count an upload's header declares, read without decoding (0 when it is not
    an accepted image: decoding it then says why)."""
    try:
        with Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS) as image:
            width, height = image.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return max_pixels_beyond_pillow()
    except (OSError, SyntaxError, ValueError, EOFError):
        return 0
    return width * height


def max_pixels_beyond_pillow() -> int:
    """A pixel count above any cap: what a header beyond Pillow's own bomb limit declares."""
    return 2 * int(Image.MAX_IMAGE_PIXELS or 0) + 1


def check_request_pixels(files: list[bytes], max_request_pixels: int) -> None:
    """413 when a request's images declare more pixels in total than the server decodes for
    one request (each file's own limit is `open_upload`'s `max_pixels`)."""
    total = sum(declared_pixels(data) for data in files)
    if total > max_request_pixels:
        raise ImageRejected(
            f"the images of this request hold {total:,} pixels in total; at most "
            f"{max_request_pixels:,} are decoded for one request: send fewer or smaller images",
            413,
        )


def _bomb(what: str, max_pixels: int) -> ImageRejected:
    return ImageRejected(
        f"the image is too large ({what}); at most {max_pixels:,} pixels are accepted "
        "(possible decompression bomb): downscale it and upload again",
        413,
    )


def _claimed_format(data: bytes) -> str | None:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    for signature, name in _ACCEPTED_SIGNATURES:
        if data.startswith(signature):
            return name
    return None


def _unidentified_message(data: bytes) -> str:
    head = data[:512]
    stripped = head.lstrip()
    for signature, name in _OTHER_SIGNATURES:
        if head.startswith(signature):
            return f"the file is {name}, which is not accepted; upload a {_ACCEPTED_TEXT} image"
    if stripped.startswith(b"<") and (b"<svg" in head.lower() or stripped.startswith(b"<?xml")):
        return (
            "the file is an SVG/XML document; vector images are not accepted: "
            f"rasterise it to PNG and upload a {_ACCEPTED_TEXT} image"
        )
    if head[4:8] == b"ftyp":
        brand = head[8:12].decode("ascii", "replace")
        return (
            f"the file is an ISO media file (brand {brand!r}, e.g. HEIC/AVIF), which is not "
            f"accepted; convert it and upload a {_ACCEPTED_TEXT} image"
        )
    return f"the file is not a recognised image; upload a {_ACCEPTED_TEXT} image"


def sniff_content_type(image: Image.Image | bytes) -> str:
    """MIME type of the decoded format (never from the client's Content-Type or filename).

    Takes an image from `open_upload` (or any opened Pillow image) or the raw bytes."""
    if isinstance(image, bytes | bytearray | memoryview):
        try:
            with Image.open(io.BytesIO(bytes(image)), formats=ACCEPTED_FORMATS) as opened:
                source_format = opened.format
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning) as error:
            raise ImageRejected(_unidentified_message(bytes(image)), 415) from error
    else:
        source_format = image.format
    if not source_format:
        raise ValueError("the image carries no source format; pass one from open_upload")
    return Image.MIME.get(source_format.upper(), f"image/{source_format.lower()}")


def thumbnail_bytes(image: Image.Image, size: int = 256) -> bytes:
    """A JPEG thumbnail (quality 85) whose longer side is at most `size` pixels."""
    thumb = image.convert("RGB") if image.mode != "RGB" else image.copy()
    thumb.thumbnail((size, size), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    thumb.save(out, "JPEG", quality=85, optimize=True)
    return out.getvalue()


def content_hash(data: bytes) -> str:
    """sha256 hex digest of the uploaded bytes (duplicate detection, storage names)."""
    return hashlib.sha256(data).hexdigest()
