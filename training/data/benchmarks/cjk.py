"""CJK-Fonts: a larger, learnable benchmark built from Debian CJK fonts (docs/benchmarks.md).

A class is a Han character from the everyday core shared by Japan, mainland China and Taiwan;
a sample is that character in one font face. Renders are black on white, cropped to the ink
and scaled to fit; the split hashes the character, so it depends on nothing else.
"""

from __future__ import annotations

import logging
import shutil
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

from training.data.benchmarks import common
from training.data.benchmarks.debian import UnpackedPackage, resolve_link
from training.data.records import DatasetError

logger = logging.getLogger(__name__)

BENCHMARK = "CJK-Fonts"
# Bump when rendering or cleaning changes, so cached outputs built the old way are rebuilt.
FORMAT_VERSION = 1


@dataclass(frozen=True)
class FontSource:
    """One face of a font file shipped by a Debian package (`face` indexes a .ttc collection)."""

    package: str
    file: str
    face: int = 0


# 32 faces from 29 Debian packages (docs/benchmarks.md). Order matters: of two
# near-identical renders the earlier font keeps its sample (AR PL UKai before cwTeX Kai).
CJK_FONTS: tuple[FontSource, ...] = (
    FontSource("fonts-noto-cjk", "NotoSansCJK-Regular.ttc"),
    FontSource("fonts-noto-cjk", "NotoSerifCJK-Regular.ttc"),
    FontSource("fonts-arphic-ukai", "ukai.ttc"),
    FontSource("fonts-arphic-uming", "uming.ttc"),
    FontSource("fonts-wqy-zenhei", "wqy-zenhei.ttc"),
    FontSource("fonts-ipafont-gothic", "ipag.ttf"),
    FontSource("fonts-ipafont-mincho", "ipam.ttf"),
    FontSource("fonts-vlgothic", "VL-Gothic-Regular.ttf"),
    FontSource("fonts-hanazono", "HanaMinA.ttf"),
    FontSource("fonts-cwtex-kai", "cwkai.ttf"),
    FontSource("fonts-cwtex-ming", "cwming.ttf"),
    FontSource("fonts-cwtex-fs", "cwfs.ttf"),
    FontSource("fonts-cwtex-heib", "cwheib.ttf"),
    FontSource("fonts-cwtex-yen", "cwyen.ttf"),
    FontSource("fonts-droid-fallback", "DroidSansFallbackFull.ttf"),
    FontSource("fonts-klee", "KleeOne-Regular.ttf"),
    FontSource("fonts-mplus", "Mplus1-Regular.otf"),
    FontSource("fonts-seto", "setofont.ttf"),
    FontSource("fonts-kiloji", "kiloji.ttf"),
    FontSource("fonts-aoyagi-kouzan-t", "AoyagiKouzanT.ttf"),
    FontSource("fonts-aoyagi-soseki", "aoyagi-soseki.ttf"),
    FontSource("fonts-kouzan-mouhitsu", "kouzan-mouhitsu.ttf"),
    FontSource("fonts-kouzan-mouhitsu", "KouzanBrushFontSousyo.ttf"),
    FontSource("fonts-horai-umefont", "ume-pmo3.ttf"),
    FontSource("fonts-horai-umefont", "ume-pgo4.ttf"),
    FontSource("fonts-sawarabi-gothic", "sawarabi-gothic-medium.ttf"),
    FontSource("fonts-sawarabi-mincho", "sawarabi-mincho-medium.ttf"),
    FontSource("fonts-motoya-l-cedar", "MTLc3m.ttf"),
    FontSource("fonts-motoya-l-maruberi", "MTLmr3m.ttf"),
    FontSource("fonts-konatu", "Konatu.ttf"),
    FontSource("fonts-smiley-sans", "SmileySans-Oblique.ttf"),
    FontSource("fonts-babelstone-han", "BabelStoneHan.ttf"),
)

# The level-1 hanzi/kanji rows of three national standards, decoded by Python's own
# codecs: (codec, lead bytes, trail bytes).
_EUC_CELLS = range(0xA1, 0xFF)
CHARACTER_SETS = (
    ("euc_jp", range(0xB0, 0xD0), _EUC_CELLS),  # JIS X 0208 level 1
    ("gb2312", range(0xB0, 0xD8), _EUC_CELLS),  # GB 2312 level 1
    ("big5", range(0xA4, 0xC7), (*range(0x40, 0x7F), *_EUC_CELLS)),  # Big5 level 1
)
UNIFIED_IDEOGRAPHS = (0x4E00, 0x9FFF)  # keep U+4E00..U+9FFF (CJK Unified Ideographs block)
# Drop near-duplicate renders between fonts that share outlines (common.thumbnail difference under
# about 3 grey levels, docs/benchmarks.md).
NEAR_DUPLICATE_MAD = 3.0
# Our addition: a class needs a second sample to be a retrieval query with a positive.
MIN_SAMPLES_PER_CLASS = 2
# Glyphs are rendered at twice the output size, then cropped and scaled down (smooth edges).
RENDER_OVERSAMPLING = 2
# A code point no font maps (last of Supplementary Private Use Area-B), so rendering it shows
# the font's .notdef glyph.
NOTDEF_PROBE = "\U0010fffd"
RENDERS_FOLDER = ".renders"

# Drop reasons, as they appear in the manifest.
BLANK = "blank render"
NOTDEF = "not in font (.notdef)"
NEAR_DUPLICATE = "near-duplicate render"
TOO_FEW = f"class with fewer than {MIN_SAMPLES_PER_CLASS} samples"


@dataclass(frozen=True)
class LocatedFont:
    """A font face found in an unpacked package."""

    source: FontSource
    path: Path
    version: str

    @property
    def name(self) -> str:
        """The sample's file name in every class folder (font file stem)."""
        return Path(self.source.file).stem


def build_cjk(
    out: Path,
    *,
    cache_dir: Path | None = None,
    max_classes: int | None = None,
    size: int = 128,
    progress: bool = True,
    workers: int | None = None,
) -> dict:
    """Build CJK-Fonts at `out` (ImageFolder train/test + manifest.json); returns the manifest.

    `max_classes` keeps the first N classes of each split by sorted folder name. Returns at once
    when `out` already holds a complete build with the same parameters.
    """
    if size < common.THUMBNAIL_SIDE:
        raise DatasetError(
            f"--size {size} is too small; use at least {common.THUMBNAIL_SIDE} pixels"
        )
    if max_classes is not None and max_classes < 1:
        raise DatasetError(f"--max-classes {max_classes} must be at least 1")

    def assemble(staging: Path, packages: dict[str, UnpackedPackage], workers: int) -> dict:
        return assemble_cjk(
            staging,
            locate_fonts(CJK_FONTS, packages),
            select_characters(core_han_characters(), max_classes),
            size=size,
            workers=workers,
            progress=progress,
        )

    return common.build_benchmark(
        out,
        BENCHMARK,
        {"size": size, "max_classes": max_classes, "format_version": FORMAT_VERSION},
        (font.package for font in CJK_FONTS),
        assemble,
        cache_dir=cache_dir,
        progress=progress,
        workers=workers,
    )


def core_han_characters() -> list[str]:
    """The Han characters in all three level-1 sets (1,583 with Python 3.11's codecs)."""
    shared: set[str] | None = None
    for codec, leads, trails in CHARACTER_SETS:
        decoded = set(_decode_double_bytes(codec, leads, trails))
        shared = decoded if shared is None else shared & decoded
    low, high = UNIFIED_IDEOGRAPHS
    return sorted(c for c in shared or () if low <= ord(c) <= high)


def _decode_double_bytes(codec: str, leads: Iterable[int], trails: Iterable[int]) -> list[str]:
    characters = []
    for lead in leads:
        for trail in trails:
            try:
                characters.append(bytes((lead, trail)).decode(codec))
            except UnicodeDecodeError:
                continue
    return [c for c in characters if len(c) == 1]


def class_folder(character: str) -> str:
    return f"U+{ord(character):04X}"


def split_characters(characters: Sequence[str]) -> tuple[list[str], list[str]]:
    """(train, test): characters ordered by sha1 of their UTF-8; first half train."""
    order = sorted(characters, key=common.sha1_key)
    half = len(order) // 2
    return order[:half], order[half:]


def select_characters(characters: Sequence[str], max_classes: int | None) -> dict[str, list[str]]:
    """{split: characters}, each split cut to its first `max_classes` by sorted folder name."""
    selected = {}
    for split, members in zip(common.SPLITS, split_characters(characters), strict=True):
        ordered = sorted(members, key=class_folder)
        selected[split] = ordered[:max_classes] if max_classes else ordered
    return selected


def locate_fonts(
    sources: Sequence[FontSource], packages: Mapping[str, UnpackedPackage]
) -> list[LocatedFont]:
    """Find each font file in its unpacked package; absent ones are skipped with a warning."""
    located = []
    for source in sources:
        package = packages.get(source.package)
        path = None
        if package is not None:
            candidates = sorted(package.root.rglob(source.file))
            path = next((p for c in candidates if (p := resolve_link(c, package.root))), None)
        if package is None or path is None:
            logger.warning("font %s (%s) not available, skipped", source.file, source.package)
            continue
        located.append(LocatedFont(source=source, path=path, version=package.version))
    if not located:
        raise DatasetError("none of the CJK font packages is available; check the cache")
    return located


def assemble_cjk(
    target: Path,
    fonts: Sequence[LocatedFont],
    characters: Mapping[str, Sequence[str]],
    *,
    size: int,
    workers: int,
    progress: bool,
) -> dict:
    """Write `target/{train,test}/U+XXXX/<font>.png` for the given characters per split.

    Returns the manifest fields that describe the content: sources, drops, characters.
    """
    everything = [c for split in common.SPLITS for c in characters[split]]
    renders_dir = target / RENDERS_FOLDER
    jobs = [FontJob(font, everything, renders_dir, size) for font in fonts]
    results = common.parallel_map(
        render_font_job, jobs, workers=workers, progress=progress, desc="render fonts"
    )
    dropped: Counter[str] = Counter()
    thumbs: dict[str, dict[str, np.ndarray]] = {c: {} for c in everything}
    for font, rendered in zip(fonts, results, strict=True):
        for character, outcome in zip(everything, rendered, strict=True):
            if isinstance(outcome, str):
                dropped[outcome] += 1
            else:
                thumbs[character][font.name] = outcome

    font_order = [font.name for font in fonts]
    kept_per_split: dict[str, list[str]] = {}
    samples_per_font: Counter[str] = Counter()
    for split in common.SPLITS:
        kept_per_split[split] = []
        for character in characters[split]:
            kept = distinct_samples(thumbs[character], font_order)
            dropped[NEAR_DUPLICATE] += len(thumbs[character]) - len(kept)
            if len(kept) < MIN_SAMPLES_PER_CLASS:
                dropped[TOO_FEW] += len(kept)
                continue
            common.move_samples(renders_dir, target / split, class_folder(character), kept)
            samples_per_font.update(kept)
            kept_per_split[split].append(character)
    if not any(kept_per_split.values()):
        raise DatasetError("no character renders in two different fonts; check the font packages")
    shutil.rmtree(renders_dir)

    return {
        "sources": [_describe(font) for font in fonts],
        "dropped": dict(sorted(dropped.items())),
        "samples_per_font": {name: samples_per_font[name] for name in font_order},
        "characters": {
            split: {class_folder(c): c for c in kept_per_split[split]} for split in common.SPLITS
        },
    }


def distinct_samples(thumbs: Mapping[str, np.ndarray], font_order: Sequence[str]) -> list[str]:
    """The fonts whose render of one character is not a near-duplicate of an earlier font's."""
    fonts = [name for name in font_order if name in thumbs]
    if not fonts:
        return []
    stack = np.stack([thumbs[name] for name in fonts])
    thresholds = np.full((len(fonts), len(fonts)), NEAR_DUPLICATE_MAD, dtype=np.float32)
    return [fonts[i] for i in common.keep_distinct(stack, thresholds)]


@dataclass(frozen=True)
class FontJob:
    font: LocatedFont
    characters: list[str]
    renders_dir: Path
    size: int


def render_font_job(job: FontJob) -> list[np.ndarray | str]:
    """Render every character in one font to `renders_dir/U+XXXX/<font>.png`.

    Per character: its common.thumbnail, or the reason it has no sample in this font.
    """
    font = load_font(job.font, job.size)
    notdef = render_glyph(font, NOTDEF_PROBE)
    outcomes: list[np.ndarray | str] = []
    for character in job.characters:
        glyph = render_glyph(font, character)
        if glyph is None:
            outcomes.append(BLANK)
        elif notdef is not None and same_bitmap(glyph, notdef):
            outcomes.append(NOTDEF)
        else:
            image = common.fit_on_white(ImageOps.invert(glyph), job.size)
            common.save_png(
                image, job.renders_dir / class_folder(character) / f"{job.font.name}.png"
            )
            outcomes.append(common.thumbnail(image))
    return outcomes


def load_font(font: LocatedFont, size: int) -> ImageFont.FreeTypeFont:
    # BASIC layout: one character needs no shaping, and it skips raqm's per-call cost.
    return ImageFont.truetype(
        str(font.path),
        size=size * RENDER_OVERSAMPLING,
        index=font.source.face,
        layout_engine=ImageFont.Layout.BASIC,
    )


def render_glyph(font: ImageFont.FreeTypeFont, character: str) -> Image.Image | None:
    """The character's ink, cropped, as white-on-black 'L' image; None when nothing is drawn."""
    left, top, right, bottom = font.getbbox(character)
    if right <= left or bottom <= top:
        return None
    canvas = Image.new("L", (int(right - left), int(bottom - top)), 0)
    ImageDraw.Draw(canvas).text((-left, -top), character, font=font, fill=255)
    ink = canvas.getbbox()
    return canvas.crop(ink) if ink else None


def same_bitmap(first: Image.Image, second: Image.Image) -> bool:
    return first.size == second.size and first.tobytes() == second.tobytes()


def _describe(font: LocatedFont) -> dict[str, object]:
    family, style = load_font(font, common.THUMBNAIL_SIDE).getname()
    return {
        "package": font.source.package,
        "version": font.version,
        "file": font.source.file,
        "face": font.source.face,
        "font": f"{family} {style}".strip(),
    }
