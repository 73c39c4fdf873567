"""Image decoding to uint8 RGB tensors, and the Dataset that feeds training and evaluation.

Every image becomes 8-bit RGB the same way whichever decoder reads it: EXIF orientation applied,
transparency composited onto white (icons and product shots are drawn on white, and black behind
transparent pixels would be an artefact), grey levels repeated over three channels, 16-bit
samples scaled to 8 bits. JPEG and PNG take torchvision's fast path; everything else, and any
file torchvision rejects, goes through Pillow.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2.functional import pil_to_tensor, to_dtype

from training.data.records import DatasetError, Split

logger = logging.getLogger(__name__)

WHITE = 255
_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Pillow modes holding more than 8 bits per grey sample ("I" is how some TIFFs open).
WIDE_GREY_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})
# What Pillow raises for files that are missing, damaged, truncated or not images at all.
_PILLOW_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)

ImageTransform = Callable[[torch.Tensor], torch.Tensor]


class UnreadableImageError(DatasetError):
    """An image file that neither torchvision nor Pillow can decode."""


def decode_image_file(path: Path | str) -> torch.Tensor:
    """Decode an image file to a uint8 RGB tensor of shape (3, H, W)."""
    path = Path(path)
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as error:
        raise UnreadableImageError(f"cannot read {path}: {error}") from error
    header = data[: len(_PNG_MAGIC)].tobytes()
    # torchvision applies EXIF orientation to JPEG and PNG only (not WebP), hence these two.
    if header.startswith((_JPEG_MAGIC, _PNG_MAGIC)):
        try:
            return _decode_with_torchvision(torch.from_numpy(data), header.startswith(_PNG_MAGIC))
        except RuntimeError:
            pass  # Pillow reads more variants, and explains its failures better
    try:
        with Image.open(io.BytesIO(data.tobytes())) as image:
            return decode_pil_image(image)
    except _PILLOW_ERRORS as error:
        raise UnreadableImageError(f"cannot decode {path}: {error}") from error


def decode_pil_image(image: Image.Image) -> torch.Tensor:
    """Convert a PIL image to a uint8 RGB tensor (3, H, W) exactly as `decode_image_file` does."""
    return pil_to_tensor(to_rgb(ImageOps.exif_transpose(image)))


def _decode_with_torchvision(data: torch.Tensor, may_have_alpha: bool) -> torch.Tensor:
    # JPEG has no alpha and torchvision's JPEG decoder refuses RGB_ALPHA.
    mode = ImageReadMode.RGB_ALPHA if may_have_alpha else ImageReadMode.RGB
    image = decode_image(data, mode=mode, apply_exif_orientation=True)
    image = to_dtype(image, torch.uint8, scale=True)  # 16-bit PNGs decode to uint16
    return _composite_on_white(image) if may_have_alpha else image


# torchvision has no alpha compositing; this is Pillow's `alpha_composite` onto an opaque white
# background, (rgb * a + 255 * (255 - a)) / 255 rounded, so both decoders agree to within 1.
def _composite_on_white(rgba: torch.Tensor) -> torch.Tensor:
    rgb, alpha = rgba[:3], rgba[3:]
    if bool((alpha == WHITE).all()):
        return rgb.contiguous()
    rgb, alpha = rgb.to(torch.int32), alpha.to(torch.int32)
    blended = (rgb * alpha + WHITE * (WHITE - alpha) + WHITE // 2) // WHITE
    return blended.to(torch.uint8)


def to_rgb(image: Image.Image) -> Image.Image:
    """An image in any mode as 8-bit RGB, the way training and the service both see it:
    16-bit grey keeps its high byte, transparency is composited on white."""
    if image.mode in WIDE_GREY_MODES:
        # Pillow's own conversion clips 16-bit grey at 255 (nearly everything turns white).
        grey16 = np.asarray(image).astype(np.int64).clip(0, 65535)
        return Image.fromarray((grey16 >> 8).astype(np.uint8), mode="L").convert("RGB")
    if image.has_transparency_data:
        background = Image.new("RGBA", image.size, (WHITE, WHITE, WHITE, WHITE))
        return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def find_unreadable(split: Split) -> list[tuple[Path, str]]:
    """The files that fail a cheap Pillow header check, with the reason for each.

    This catches missing, empty, non-image and most damaged files without decoding any pixels;
    a JPEG cut short still passes and is handled when `ImageDataset` decodes it.
    """
    with ThreadPoolExecutor(max_workers=8) as pool:  # file I/O bound: threads overlap the waits
        reasons = list(pool.map(_header_problem, split.paths))
    return [(path, reason) for path, reason in zip(split.paths, reasons, strict=True) if reason]


def drop_unreadable(split: Split) -> tuple[Split, list[tuple[Path, str]]]:
    """The split without the files `find_unreadable` reports, and those files with reasons.

    Meant to run once when a dataset is loaded for training, so that a few bad files cost a
    warning instead of a crashed run.
    """
    unreadable = find_unreadable(split)
    if not unreadable:
        return split, []
    if len(unreadable) == len(split):
        path, reason = unreadable[0]
        raise DatasetError(f"none of the {len(split)} images can be read (e.g. {path}: {reason})")
    bad = {path for path, _ in unreadable}
    kept = [i for i, path in enumerate(split.paths) if path not in bad]
    path, reason = unreadable[0]
    logger.warning(
        "skipping %d of %d images that cannot be read (e.g. %s: %s)",
        len(unreadable),
        len(split),
        path,
        reason,
    )
    return split.subset(kept), unreadable


def _header_problem(path: Path) -> str | None:
    try:
        with Image.open(path) as image:
            image.verify()
    except _PILLOW_ERRORS as error:
        return f"{type(error).__name__}: {error}"
    return None


class ImageDataset(Dataset):
    """`(image, label, index)` samples of a `Split`, decoded and transformed on access.

    With `views > 1` the image is a tuple of that many independent draws of the transform (two
    augmented views of one image for self-supervised tasks such as DiVA's).

    A file that fails to decode is logged once (per process: each DataLoader worker keeps its own
    record) and replaced by the next decodable image of the same class. The same class keeps the
    label right and the P x K batch structure intact, and "next" keeps runs reproducible; the
    returned index is still the requested one so per-sample bookkeeping stays aligned.
    """

    def __init__(self, split: Split, transform: ImageTransform, views: int = 1) -> None:
        if views < 1:
            raise ValueError(f"views must be at least 1, got {views}")
        self.split = split
        self.transform = transform
        self.views = views
        self._undecodable: set[int] = set()

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | tuple[torch.Tensor, ...], int, int]:
        image = self._decode_or_substitute(index)
        if self.views == 1:
            return self.transform(image), self.split.labels[index], index
        views = tuple(self.transform(image) for _ in range(self.views))
        return views, self.split.labels[index], index

    def _decode_or_substitute(self, index: int) -> torch.Tensor:
        image = self._try_decode(index)
        if image is not None:
            return image
        label = self.split.labels[index]
        class_members = [i for i, y in enumerate(self.split.labels) if y == label]
        position = class_members.index(index)
        for candidate in class_members[position + 1 :] + class_members[:position]:
            image = self._try_decode(candidate)
            if image is not None:
                return image
        raise UnreadableImageError(
            f"no image of class {self.split.class_names[label]} can be decoded; "
            "run drop_unreadable on the split or fix the files"
        )

    def _try_decode(self, index: int) -> torch.Tensor | None:
        """The decoded image, or None (logged the first time) when the file cannot be decoded."""
        if index in self._undecodable:
            return None
        try:
            return decode_image_file(self.split.paths[index])
        except UnreadableImageError as error:
            self._undecodable.add(index)
            logger.warning("%s; using another image of its class instead", error)
            return None
