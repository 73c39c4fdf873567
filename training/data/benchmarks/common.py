"""Pieces both benchmark builders share: the atomic output folder, the manifest, image fitting,
grey thumbnails for near-duplicate and near-blank detection, and a small process pool."""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import platform
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from PIL import Image, features
from tqdm.auto import tqdm

from training.data.benchmarks.debian import UnpackedPackage, default_cache_dir, fetch_packages
from training.data.records import DatasetError
from training.fsutil import replace_directory

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
# Written first into every build folder: it tells a half-built output of ours (safe to replace)
# from a user's folder (never deleted).
MARKER_NAME = ".lookalike-benchmark"
SPLITS = ("train", "test")

# Renders are compared through 32x32 grey thumbnails (mean absolute grey difference).
THUMBNAIL_SIDE = 32
# Near-blank: fewer than 2% of thumbnail pixels differ from the white background by more than
# 8 grey levels. The design only says "drop near-blank renders"; these values keep a white page
# with a thin grey outline and drop a white-on-transparent icon.
INK_LEVEL = 8
NEAR_BLANK_INK_FRACTION = 0.02

T = TypeVar("T")
R = TypeVar("R")


def cached_manifest(out: Path, benchmark: str, parameters: dict[str, Any]) -> dict | None:
    """The manifest of a complete build at `out` with these parameters, else None.

    Complete means the manifest exists and every split holds the image count it records, so a
    folder someone has pruned by hand is rebuilt.
    """
    manifest = read_manifest(out)
    if manifest is None:
        return None
    if manifest.get("benchmark") != benchmark or manifest.get("parameters") != parameters:
        return None
    on_disk = split_counts(out)
    recorded = {split: manifest.get("splits", {}).get(split) for split in SPLITS}
    return manifest if on_disk == recorded else None


def read_manifest(out: Path) -> dict | None:
    """The parsed manifest at `out`, or None when absent or unreadable."""
    try:
        return json.loads((out / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    """Write `manifest.json` atomically (it is the 'complete' flag of a build)."""
    partial = folder / f".{MANIFEST_NAME}.partial"
    partial.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", "utf-8")
    partial.replace(folder / MANIFEST_NAME)


def split_counts(out: Path) -> dict[str, dict[str, int] | None]:
    """{split: {"classes": C, "images": N}} of an ImageFolder tree (None for a missing split)."""
    counts: dict[str, dict[str, int] | None] = {}
    for split in SPLITS:
        split_dir = out / split
        if not split_dir.is_dir():
            counts[split] = None
            continue
        classes = [entry for entry in os.scandir(split_dir) if entry.is_dir()]
        images = sum(
            1 for folder in classes for f in os.scandir(folder.path) if f.name.endswith(".png")
        )
        counts[split] = {"classes": len(classes), "images": images}
    return counts


@contextmanager
def staged_output(out: Path) -> Iterator[Path]:
    """Yield an empty sibling build folder that replaces `out` only if the block succeeds.

    The caller writes the manifest last, inside the block. On any error (or Ctrl-C) the build
    folder is removed; a killed run leaves only a hidden `.OUT.partial-PID` sibling that the
    next run deletes. Refuses to replace an existing `out` that is not a benchmark output.
    """
    out = out.expanduser().absolute()
    ensure_replaceable(out)
    _remove_stale_siblings(out)
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    try:
        staging.mkdir(parents=True)
        (staging / MARKER_NAME).touch()
    except OSError as error:
        raise DatasetError(f"cannot write to {out.parent}: {error.strerror}") from error
    try:
        yield staging
        replace_directory(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def ensure_replaceable(out: Path) -> None:
    """Raise unless `out` is absent, empty, or a (possibly incomplete) benchmark output, in a
    folder this process can write to; checked before any slow download."""
    if out.exists() and not out.is_dir():
        raise DatasetError(f"{out} is a file; choose a folder path for the benchmark")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER_NAME).exists():
        raise DatasetError(
            f"{out} exists and is not a lookalike benchmark output; remove it or choose another"
            " path"
        )
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DatasetError(f"cannot create {out.parent}: {error.strerror}") from error
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise DatasetError(f"cannot write to {out.parent}; choose another output folder")


def _remove_stale_siblings(out: Path) -> None:
    """Delete build folders left by killed runs (their process no longer exists)."""
    if not out.parent.is_dir():
        return
    for sibling in out.parent.glob(f".{out.name}.*-*"):
        kind, _, pid = sibling.name.rpartition("-")
        ours = kind.endswith((".partial", ".old")) and (sibling / MARKER_NAME).exists()
        if ours and pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(sibling, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sha1_key(text: str) -> bytes:
    """A stable, platform-independent sort key (Python's hash() is salted per process)."""
    return hashlib.sha1(text.encode("utf-8"), usedforsecurity=False).digest()


def build_benchmark(
    out: Path,
    benchmark: str,
    parameters: dict[str, Any],
    packages: Iterable[str],
    assemble: Callable[[Path, dict[str, UnpackedPackage], int], dict[str, Any]],
    *,
    cache_dir: Path | None,
    progress: bool,
    workers: int | None,
) -> dict[str, Any]:
    """The build every benchmark shares; returns its manifest. A complete build at `out` with
    the same `parameters` is returned as it is; otherwise the Debian `packages` are fetched,
    `assemble(staging, unpacked packages, workers)` writes the ImageFolder and returns the
    manifest fields that describe its content, and the folder replaces `out` only once it is
    complete (a crash or Ctrl-C leaves the old `out` untouched)."""
    out = Path(out).expanduser().absolute()
    cached = cached_manifest(out, benchmark, parameters)
    if cached is not None:
        logger.info("%s at %s is complete (cached)", benchmark, out)
        return cached
    ensure_replaceable(out)
    started = time.perf_counter()
    workers = workers or default_workers()
    fetched = fetch_packages(
        list(dict.fromkeys(packages)),
        cache_dir or default_cache_dir(),
        workers=workers,
        progress=progress,
    )
    with staged_output(out) as staging:
        content = assemble(staging, fetched.packages, workers)
        manifest = benchmark_manifest(
            benchmark,
            parameters,
            staging,
            content,
            missing_packages=fetched.missing,
            started=started,
        )
        write_manifest(staging, manifest)
    return manifest


def benchmark_manifest(
    benchmark: str,
    parameters: dict[str, Any],
    folder: Path,
    content: dict[str, Any],
    *,
    missing_packages: list[str],
    started: float,
) -> dict[str, Any]:
    """The manifest of a finished build in `folder`: what, how, how many, from what, how long."""
    return {
        "benchmark": benchmark,
        "parameters": parameters,
        "splits": split_counts(folder),
        **content,
        "missing_packages": missing_packages,
        "build_seconds": round(time.perf_counter() - started, 1),
        "library_versions": library_versions(),
    }


def move_samples(renders_dir: Path, split_dir: Path, class_folder: str, stems: list[str]) -> None:
    """Move the kept renders of one class from the scratch folder into its split."""
    destination = split_dir / class_folder
    destination.mkdir(parents=True)
    for stem in stems:
        (renders_dir / class_folder / f"{stem}.png").replace(destination / f"{stem}.png")


def library_versions() -> dict[str, str]:
    """Versions of what decides the pixels, recorded in the manifest for reproducibility."""
    versions = {"python": platform.python_version()}
    for package in ("pillow", "numpy", "cairosvg"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    freetype = features.version("freetype2")
    if freetype:
        versions["freetype"] = freetype
    return versions


def fit_on_white(image: Image.Image, size: int) -> Image.Image:
    """`image` flattened onto white, scaled (aspect kept) to fit and centred in size x size."""
    rgba = image.convert("RGBA")
    flat = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    flat.alpha_composite(rgba)
    scale = size / max(flat.size)
    resized = (max(1, round(flat.width * scale)), max(1, round(flat.height * scale)))
    if resized != flat.size:
        flat = flat.resize(resized, Image.Resampling.LANCZOS)
    canvas = Image.new("RGB", (size, size), (255, 255, 255))
    canvas.paste(flat.convert("RGB"), ((size - flat.width) // 2, (size - flat.height) // 2))
    return canvas


def save_png(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.convert("RGB").save(path, format="PNG")


def thumbnail(image: Image.Image) -> np.ndarray:
    """32x32 grey thumbnail (uint8, area-averaged) used for all similarity checks."""
    grey = image.convert("L").resize((THUMBNAIL_SIDE, THUMBNAIL_SIDE), Image.Resampling.BOX)
    return np.asarray(grey, dtype=np.uint8)


def is_near_blank(thumb: np.ndarray) -> bool:
    ink = np.abs(255 - thumb.astype(np.int16)) > INK_LEVEL
    return float(ink.mean()) < NEAR_BLANK_INK_FRACTION


def mean_abs_differences(thumbs: np.ndarray) -> np.ndarray:
    """Pairwise mean absolute grey difference of an (n, 32, 32) stack: an (n, n) matrix."""
    flat = thumbs.reshape(len(thumbs), -1).astype(np.float32)
    return np.abs(flat[:, None, :] - flat[None, :, :]).mean(axis=2)


def keep_distinct(thumbs: np.ndarray, thresholds: np.ndarray) -> list[int]:
    """Indices to keep, in order: each sample is dropped when it differs from an earlier kept one
    by less than `thresholds[i, j]` (so the first of a near-duplicate pair wins)."""
    differences = mean_abs_differences(thumbs)
    kept: list[int] = []
    for index in range(len(thumbs)):
        if all(differences[index, k] >= thresholds[index, k] for k in kept):
            kept.append(index)
    return kept


def parallel_map(
    function: Callable[[T], R],
    items: Iterable[T],
    *,
    workers: int,
    progress: bool,
    desc: str,
    total: int | None = None,
    chunksize: int = 1,
) -> Iterator[R]:
    """`map` over a spawn-context process pool (inline when workers <= 1), with a progress bar.

    Spawn rather than fork: the caller may already hold threads (torch, a web server).
    """
    bar = tqdm(total=total, desc=desc, disable=not progress)
    try:
        if workers <= 1:
            for item in items:
                yield function(item)
                bar.update()
            return
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            for result in pool.map(function, items, chunksize=chunksize):
                yield result
                bar.update()
    finally:
        bar.close()


def default_workers() -> int:
    return max(1, os.cpu_count() or 1)
