"""IconThemes: a zero-shot retrieval benchmark built from Debian icon themes.

A class is a freedesktop icon name (`edit-find`, `weather-showers`), a sample is that icon as
drawn by one theme family. The cleaning rules and the split are described in docs/benchmarks.md,
section "IconThemes"; each step below records how many samples or classes it dropped and why.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import re
import shutil
import subprocess
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import numpy as np
from PIL import Image

from training.data.benchmarks.common import (
    SPLITS,
    THUMBNAIL_SIDE,
    build_benchmark,
    fit_on_white,
    is_near_blank,
    keep_distinct,
    move_samples,
    parallel_map,
    save_png,
    sha1_key,
    thumbnail,
)
from training.data.benchmarks.debian import (
    UnpackedPackage,
    resolve_link,
)
from training.data.records import DatasetError

logger = logging.getLogger(__name__)

BENCHMARK = "IconThemes"
# Bump when the cleaning rules change, so cached outputs built with older rules are rebuilt.
FORMAT_VERSION = 2


@dataclass(frozen=True)
class IconTheme:
    """A theme folder under /usr/share/icons of one Debian package."""

    package: str
    folder: str


@dataclass(frozen=True)
class IconFamily:
    """Themes that count as one style: each contributes at most one sample per class; earlier
    themes win when several draw the same name (Moka inherits from Faba)."""

    name: str
    themes: tuple[IconTheme, ...]


def _family(name: str, *themes: tuple[str, str]) -> IconFamily:
    return IconFamily(name, tuple(IconTheme(package, folder) for package, folder in themes))


# 25 theme families from 27 Debian packages (docs/benchmarks.md).
ICON_FAMILIES: tuple[IconFamily, ...] = (
    _family("Adwaita", ("adwaita-icon-theme", "Adwaita")),
    _family("breeze", ("breeze-icon-theme", "breeze")),
    _family("bloom", ("deepin-icon-theme", "bloom")),
    _family(
        "elementary",
        ("elementary-xfce-icon-theme", "elementary-xfce"),
        ("elementary-icon-theme", "elementary"),
    ),
    _family("Faenza", ("faenza-icon-theme", "Faenza")),
    _family("gartoon", ("gnome-icon-theme-gartoon", "gartoon")),
    _family("gnome", ("gnome-icon-theme", "gnome")),
    _family("gnome-colors", ("gnome-colors-common", "gnome-colors-common")),
    _family("mate", ("mate-icon-theme", "mate")),
    _family("Mint-Y", ("mint-y-icons", "Mint-Y")),
    _family("Moka", ("moka-icon-theme", "Moka"), ("faba-icon-theme", "Faba")),
    _family("Numix", ("numix-icon-theme", "Numix")),
    _family("Numix-Circle", ("numix-icon-theme-circle", "Numix-Circle")),
    _family("nuoveXT2", ("lxde-icon-theme", "nuoveXT2")),
    _family("Nuovo", ("gnome-icon-theme-nuovo", "Nuovo")),
    _family("Obsidian", ("obsidian-icon-theme", "Obsidian")),
    _family("oxygen", ("oxygen-icon-theme", "oxygen")),
    _family("Paper", ("paper-icon-theme", "Paper")),
    _family("Papirus", ("papirus-icon-theme", "Papirus")),
    _family("Suede", ("gnome-icon-theme-suede", "Suede")),
    _family("sugar", ("sugar-icon-theme", "sugar")),
    _family("suru", ("suru-icon-theme", "suru")),
    _family("Tango", ("tango-icon-theme", "Tango")),
    _family("Yaru", ("yaru-theme-icon", "Yaru")),
    _family("yasis", ("gnome-icon-theme-yasis", "yasis")),
)

# Forks of each other, such as Mint-Y/Moka and GNOME/MATE/Adwaita, get the looser
# near-duplicate threshold. Numix-Circle (built on Numix) and Yaru (built on Suru) are forks in
# the same sense, so they are listed too.
FORK_GROUPS: tuple[frozenset[str], ...] = (
    frozenset({"Mint-Y", "Moka"}),
    frozenset({"gnome", "mate", "Adwaita"}),
    frozenset({"Numix", "Numix-Circle"}),
    frozenset({"suru", "Yaru"}),
)
# Near-duplicate if the 32x32 grey thumbnails differ by under about 5 on average, under
# about 12 between themes that are forks of each other (docs/benchmarks.md).
NEAR_DUPLICATE_MAD = 5.0
FORK_NEAR_DUPLICATE_MAD = 12.0
# Keep classes with at least 10 samples.
MIN_SAMPLES_PER_CLASS = 10
# Two names become one class when most families that draw both use the same file for both
# (collapsed alias names); at least two families must agree so that one theme's odd
# symlink cannot merge two concepts.
MIN_ALIAS_AGREEMENT = 2

# Fetched with the themes: the fallback SVG renderer (optional).
RSVG_PACKAGE = "librsvg2-bin"
ICON_SUFFIXES = (".svg", ".svgz", ".png")
_SIZE_FOLDER = re.compile(r"^(\d+)(?:x\d+)?(?:@(\d+)x?)?$")
RENDERS_FOLDER = ".renders"
# Prefix groups come from the first token of the name: `media-playback-start` -> `media`.
_NAME_TOKEN_SEPARATOR = re.compile(r"[-_]")

# Drop reasons, as they appear in the manifest.
REUSED = "drawing reused for several names"
IDENTICAL = "byte-identical copy"
RENDER_FAILED = "render failed"
NEAR_BLANK = "near-blank render"
NEAR_DUPLICATE = "near-duplicate render"
TOO_FEW = f"class with fewer than {MIN_SAMPLES_PER_CLASS} samples"


@dataclass(frozen=True)
class Drawing:
    """The file one family uses for one icon name (symlinks followed)."""

    path: Path
    digest: str
    is_link: bool


def build_icons(
    out: Path,
    *,
    cache_dir: Path | None = None,
    size: int = 128,
    progress: bool = True,
    workers: int | None = None,
) -> dict:
    """Build IconThemes at `out` (ImageFolder train/test + manifest.json); returns the manifest.

    Returns at once when `out` already holds a complete build with the same parameters.
    """
    _check_size(size)

    def assemble(staging: Path, packages: dict[str, UnpackedPackage], workers: int) -> dict:
        return assemble_icons(
            staging,
            packages,
            families=ICON_FAMILIES,
            size=size,
            workers=workers,
            progress=progress,
            rsvg_convert=find_rsvg_convert(packages),
        )

    theme_packages = [theme.package for family in ICON_FAMILIES for theme in family.themes]
    return build_benchmark(
        out,
        BENCHMARK,
        {"size": size, "format_version": FORMAT_VERSION},
        [*theme_packages, RSVG_PACKAGE],
        assemble,
        cache_dir=cache_dir,
        progress=progress,
        workers=workers,
    )


def assemble_icons(
    target: Path,
    packages: Mapping[str, UnpackedPackage],
    *,
    families: Sequence[IconFamily],
    size: int,
    workers: int,
    progress: bool,
    rsvg_convert: str | None = None,
) -> dict:
    """Write `target/{train,test}/<icon name>/<family>.png` from unpacked theme packages.

    Returns the manifest fields that describe the content: sources, drops, classes.
    """
    dropped: Counter[str] = Counter()
    present = [family for family in families if _available_themes(family, packages)]
    if not present:
        raise DatasetError("none of the icon theme packages is available; check the cache")
    drawings = {family.name: family_drawings(family, packages, dropped) for family in present}
    alias_of = collapse_aliases(drawings)
    table = assign_classes(drawings, alias_of)
    table = drop_reused_drawings(table, dropped)
    table = drop_identical_copies(table, [family.name for family in present], dropped)
    table = drop_small_classes(table, dropped)

    renders_dir = target / RENDERS_FOLDER
    thumbs = render_table(table, renders_dir, size, workers, progress, rsvg_convert)
    table = drop_bad_renders(table, thumbs, dropped)
    table = drop_small_classes(table, dropped)
    if not table:
        raise DatasetError(
            f"no icon name is drawn by {MIN_SAMPLES_PER_CLASS} theme families; "
            "check that the icon theme packages were fetched"
        )
    train, test = split_by_prefix(sorted(table))
    for split, class_names in zip(SPLITS, (train, test), strict=True):
        for class_name in class_names:
            move_samples(renders_dir, target / split, class_name, list(table[class_name]))
    shutil.rmtree(renders_dir)

    members: defaultdict[str, list[str]] = defaultdict(list)
    for name, canonical in sorted(alias_of.items()):
        if canonical in table:
            members[canonical].append(name)
    return {
        "sources": _sources(present, packages),
        "dropped": dict(sorted(dropped.items())),
        "aliases": {name: names for name, names in sorted(members.items()) if len(names) > 1},
        "classes": {"train": train, "test": test},
    }


def family_drawings(
    family: IconFamily, packages: Mapping[str, UnpackedPackage], dropped: Counter[str]
) -> dict[str, Drawing]:
    """name -> drawing for one family; the first theme that draws a name wins."""
    drawings: dict[str, Drawing] = {}
    for theme, package in _available_themes(family, packages):
        theme_dir = package.root / "usr" / "share" / "icons" / theme.folder
        for name, (path, is_link) in scan_theme(theme_dir, package.root, dropped).items():
            if name not in drawings:
                drawings[name] = Drawing(path=path, digest=_file_digest(path), is_link=is_link)
    return drawings


def scan_theme(
    theme_dir: Path, package_root: Path, dropped: Counter[str]
) -> dict[str, tuple[Path, bool]]:
    """name -> (real file, was a symlink) of the largest drawing of each non-symbolic icon.

    Largest means a `scalable` SVG where present, otherwise the biggest pixel size.
    """
    best: dict[str, tuple[tuple[bool, int, bool], Path, bool]] = {}
    for folder, _, files in os.walk(theme_dir):
        relative_parts = Path(folder).relative_to(theme_dir).parts
        if "symbolic" in relative_parts:
            dropped["symbolic icon"] += len(files)
            continue
        folder_rank = _folder_rank(relative_parts)
        for file_name in files:
            stem, suffix = os.path.splitext(file_name)
            if suffix not in ICON_SUFFIXES:
                continue
            if stem.endswith(("-symbolic", ".symbolic")):
                dropped["symbolic icon"] += 1
                continue
            rank = (*folder_rank, suffix != ".png")
            if stem in best and best[stem][0] >= rank:
                continue
            link = Path(folder) / file_name
            real = resolve_link(link, package_root)
            if real is not None:
                best[stem] = (rank, real, link.is_symlink())
    return {name: (path, is_link) for name, (_, path, is_link) in best.items()}


def _folder_rank(parts: Sequence[str]) -> tuple[bool, int]:
    """(is scalable, pixel size) of an icon folder such as `48x48/apps` or `apps/64@2x`."""
    if "scalable" in parts:
        return True, 0
    pixels = 0
    for part in parts:
        match = _SIZE_FOLDER.match(part)
        if match:
            pixels = max(pixels, int(match.group(1)) * int(match.group(2) or 1))
    return False, pixels


def _file_digest(path: Path) -> str:
    return hashlib.sha1(path.read_bytes(), usedforsecurity=False).hexdigest()


def collapse_aliases(drawings: Mapping[str, Mapping[str, Drawing]]) -> dict[str, str]:
    """name -> class name: names most families draw with the same file become one class.

    The class is named after its most widely drawn member, preferring names that families ship
    as real files over symlinks (`edit-find` over `gtk-find`).
    """
    same: Counter[tuple[str, str]] = Counter()
    drawn_by: defaultdict[str, set[str]] = defaultdict(set)
    as_file: Counter[str] = Counter()
    for family, names in drawings.items():
        by_digest: defaultdict[str, list[str]] = defaultdict(list)
        for name, drawing in names.items():
            by_digest[drawing.digest].append(name)
            drawn_by[name].add(family)
            as_file[name] += not drawing.is_link
        for group in by_digest.values():
            same.update(itertools.combinations(sorted(group), 2))

    parent = {name: name for name in drawn_by}

    def root(name: str) -> str:
        while parent[name] != name:
            parent[name] = parent[parent[name]]
            name = parent[name]
        return name

    for (first, second), agreeing in same.items():
        both = len(drawn_by[first] & drawn_by[second])
        if agreeing >= MIN_ALIAS_AGREEMENT and 2 * agreeing > both:
            parent[root(first)] = root(second)

    groups: defaultdict[str, list[str]] = defaultdict(list)
    for name in drawn_by:
        groups[root(name)].append(name)
    alias_of: dict[str, str] = {}
    for members in groups.values():
        canonical = min(members, key=lambda n: (-len(drawn_by[n]), -as_file[n], len(n), n))
        alias_of.update(dict.fromkeys(members, canonical))
    return alias_of


def assign_classes(
    drawings: Mapping[str, Mapping[str, Drawing]], alias_of: Mapping[str, str]
) -> dict[str, dict[str, Drawing]]:
    """class -> family -> drawing; a family drawing several aliases contributes the drawing of
    the class name itself, else of its first alias in sorted order."""
    table: defaultdict[str, dict[str, Drawing]] = defaultdict(dict)
    for family, names in drawings.items():
        for name in sorted(names, key=lambda n: (n != alias_of[n], n)):
            table[alias_of[name]].setdefault(family, names[name])
    return dict(table)


def drop_reused_drawings(
    table: Mapping[str, Mapping[str, Drawing]], dropped: Counter[str]
) -> dict[str, dict[str, Drawing]]:
    """Remove a family's drawing from the classes it is used for when it serves two kept
    classes (ambiguous), and drop the classes that fall below MIN_SAMPLES_PER_CLASS.

    "Kept" depends on the drops, so this repeats until the kept set is stable: a drawing shared
    only with a name too rare to be a class (`blueman-headset`) stays.
    """
    kept_classes = {c for c, samples in table.items() if len(samples) >= MIN_SAMPLES_PER_CLASS}
    while True:
        result = _without_shared_drawings({c: table[c] for c in kept_classes})
        still_kept = {c for c, samples in result.items() if len(samples) >= MIN_SAMPLES_PER_CLASS}
        if still_kept == kept_classes:
            break
        kept_classes = still_kept
    dropped[REUSED] += sum(len(table[c]) - len(result[c]) for c in kept_classes)
    dropped[TOO_FEW] += sum(len(s) for c, s in table.items() if c not in kept_classes)
    return {c: result[c] for c in kept_classes}


def _without_shared_drawings(
    table: Mapping[str, Mapping[str, Drawing]],
) -> dict[str, dict[str, Drawing]]:
    classes_of: defaultdict[tuple[str, str], set[str]] = defaultdict(set)
    for class_name, samples in table.items():
        for family, drawing in samples.items():
            classes_of[family, drawing.digest].add(class_name)
    return {
        class_name: {f: d for f, d in samples.items() if len(classes_of[f, d.digest]) == 1}
        for class_name, samples in table.items()
    }


def drop_identical_copies(
    table: Mapping[str, Mapping[str, Drawing]],
    family_order: Sequence[str],
    dropped: Counter[str],
) -> dict[str, dict[str, Drawing]]:
    """Within a class, keep only the first family (in `family_order`) of byte-identical files."""
    rank = {family: index for index, family in enumerate(family_order)}
    result: dict[str, dict[str, Drawing]] = {}
    for class_name, samples in table.items():
        seen: set[str] = set()
        kept: dict[str, Drawing] = {}
        for family in sorted(samples, key=rank.__getitem__):
            if samples[family].digest in seen:
                dropped[IDENTICAL] += 1
                continue
            seen.add(samples[family].digest)
            kept[family] = samples[family]
        result[class_name] = kept
    return result


def drop_small_classes(
    table: Mapping[str, Mapping[str, Drawing]], dropped: Counter[str]
) -> dict[str, dict[str, Drawing]]:
    """Keep classes with at least MIN_SAMPLES_PER_CLASS samples; count the dropped samples."""
    kept = {c: dict(s) for c, s in table.items() if len(s) >= MIN_SAMPLES_PER_CLASS}
    dropped[TOO_FEW] += sum(len(s) for c, s in table.items() if c not in kept)
    return kept


@dataclass(frozen=True)
class RenderJob:
    source: Path
    destination: Path
    size: int
    rsvg_convert: str | None


def render_table(
    table: Mapping[str, Mapping[str, Drawing]],
    renders_dir: Path,
    size: int,
    workers: int,
    progress: bool,
    rsvg_convert: str | None,
) -> dict[tuple[str, str], np.ndarray | None]:
    """Render every sample to `renders_dir/<class>/<family>.png`; (class, family) -> thumbnail,
    None when the file could not be rendered."""
    keys = [(c, f) for c, samples in sorted(table.items()) for f in samples]
    jobs = [
        RenderJob(table[c][f].path, renders_dir / c / f"{f}.png", size, rsvg_convert)
        for c, f in keys
    ]
    results = parallel_map(
        render_icon_job,
        jobs,
        workers=workers,
        progress=progress,
        desc="render icons",
        total=len(jobs),
        chunksize=16,
    )
    return dict(zip(keys, results, strict=True))


def render_icon_job(job: RenderJob) -> np.ndarray | None:
    """Render one icon to its PNG; returns its thumbnail, or None if it cannot be rendered."""
    try:
        image = load_icon(job.source, job.size, job.rsvg_convert)
    except (OSError, ValueError, SyntaxError, subprocess.SubprocessError) as error:
        logger.debug("cannot render %s: %s", job.source, error)
        return None
    save_png(image, job.destination)
    return thumbnail(image)


def load_icon(path: Path, size: int, rsvg_convert: str | None = None) -> Image.Image:
    """An icon file as a size x size RGB image on white."""
    if path.suffix == ".png":
        with Image.open(path) as image:
            return fit_on_white(image, size)
    return fit_on_white(render_svg(path, size, rsvg_convert), size)


def render_svg(path: Path, size: int, rsvg_convert: str | None = None) -> Image.Image:
    """Render with cairosvg; on failure with rsvg-convert when available (it accepts some SVGs
    that cairosvg rejects, e.g. with unusual CSS)."""
    import cairosvg  # lazily: cairocffi needs the system libcairo, which CJK builds do not

    try:
        png = cairosvg.svg2png(url=str(path), output_width=size, output_height=size)
    except Exception as error:  # cairosvg raises many unrelated types on malformed SVG
        if rsvg_convert is None:
            raise ValueError(f"cairosvg failed: {error}") from error
        command = [rsvg_convert, "-w", str(size), "-h", str(size), "-a", str(path)]
        png = subprocess.run(command, capture_output=True, check=True, timeout=60).stdout
    image = Image.open(BytesIO(png))
    image.load()
    return image


def find_rsvg_convert(packages: Mapping[str, UnpackedPackage]) -> str | None:
    """`rsvg-convert` from PATH or the unpacked librsvg2-bin (it runs against the system's
    librsvg) if it runs, else None (cairosvg alone is then used)."""
    found = shutil.which("rsvg-convert")
    if found is None and RSVG_PACKAGE in packages:
        unpacked = packages[RSVG_PACKAGE].root / "usr" / "bin" / "rsvg-convert"
        found = str(unpacked) if unpacked.is_file() else None
    if found is None:
        return None
    try:
        subprocess.run([found, "--version"], capture_output=True, check=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return found


def drop_bad_renders(
    table: Mapping[str, Mapping[str, Drawing]],
    thumbs: Mapping[tuple[str, str], np.ndarray | None],
    dropped: Counter[str],
) -> dict[str, dict[str, Drawing]]:
    """Drop failed and near-blank renders, then near-duplicates within each class (the
    family listed first keeps its sample)."""
    result: dict[str, dict[str, Drawing]] = {}
    for class_name, samples in table.items():
        usable: dict[str, np.ndarray] = {}
        for family in samples:
            thumb = thumbs[class_name, family]
            if thumb is None:
                dropped[RENDER_FAILED] += 1
            elif is_near_blank(thumb):
                dropped[NEAR_BLANK] += 1
            else:
                usable[family] = thumb
        if not usable:
            continue
        families = list(usable)
        stack = np.stack(list(usable.values()))
        kept = [families[i] for i in keep_distinct(stack, near_duplicate_thresholds(families))]
        dropped[NEAR_DUPLICATE] += len(usable) - len(kept)
        result[class_name] = {family: samples[family] for family in kept}
    return result


def near_duplicate_thresholds(families: Sequence[str]) -> np.ndarray:
    """Pairwise thumbnail-difference thresholds: looser between forks of each other."""
    thresholds = np.full((len(families), len(families)), NEAR_DUPLICATE_MAD, dtype=np.float32)
    for i, first in enumerate(families):
        for j, second in enumerate(families):
            if any({first, second} <= group for group in FORK_GROUPS):
                thresholds[i, j] = FORK_NEAR_DUPLICATE_MAD
    return thresholds


def name_prefix(name: str) -> str:
    """The split group of an icon name: its first token (`media`, `weather`, `gtk`)."""
    return _NAME_TOKEN_SEPARATOR.split(name, maxsplit=1)[0]


def split_by_prefix(class_names: Sequence[str]) -> tuple[list[str], list[str]]:
    """(train, test): whole prefix groups in order of their name's sha1 go to train until half
    the classes are placed (docs/benchmarks.md); depends only on the class names."""
    groups: defaultdict[str, list[str]] = defaultdict(list)
    for name in class_names:
        groups[name_prefix(name)].append(name)
    order = sorted(groups, key=sha1_key)
    train: list[str] = []
    test: list[str] = []
    for group in order:
        (train if 2 * len(train) < len(class_names) else test).extend(groups[group])
    return sorted(train), sorted(test)


def _available_themes(
    family: IconFamily, packages: Mapping[str, UnpackedPackage]
) -> list[tuple[IconTheme, UnpackedPackage]]:
    found = []
    for theme in family.themes:
        package = packages.get(theme.package)
        if package and (package.root / "usr" / "share" / "icons" / theme.folder).is_dir():
            found.append((theme, package))
    return found


def _sources(
    families: Sequence[IconFamily], packages: Mapping[str, UnpackedPackage]
) -> list[dict[str, str]]:
    return [
        {
            "family": family.name,
            "package": package.name,
            "version": package.version,
            "theme": theme.folder,
        }
        for family in families
        for theme, package in _available_themes(family, packages)
    ]


def _check_size(size: int) -> None:
    if size < THUMBNAIL_SIDE:
        raise DatasetError(f"--size {size} is too small; use at least 32 pixels")
