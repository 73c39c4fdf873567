"""Crash-safe file-system steps shared by artifacts and benchmark outputs."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path


def file_digest(path: Path) -> str:
    """A file's SHA-256 (hex), read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_tree(directory: Path) -> None:
    """Flush every file directly in `directory` to disk before it is renamed into place."""
    for file in Path(directory).iterdir():
        if file.is_file():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())


def fsync_dir(directory: Path) -> None:
    """Flush a directory's entries (files created or renamed in it) to disk."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_directory(new: Path, target: Path) -> None:
    """Put the complete directory `new` at `target`, retiring what was there.

    Each rename is atomic, so a reader (or a crash) sees the old complete directory, nothing for
    an instant between the two renames, or the new complete one; never a mix.
    """
    if target.exists():
        retired = target.parent / f".{target.name}.old-{os.getpid()}"
        shutil.rmtree(retired, ignore_errors=True)
        target.rename(retired)
        new.rename(target)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        new.rename(target)


class OutputPathError(ValueError):
    """An output path that cannot be written; the CLI reports it before any work starts."""


def _blocking_file(path: Path) -> Path | None:
    """The nearest existing ancestor of `path` when it is not a directory (nothing can be
    created below a file), else None."""
    for parent in path.absolute().parents:
        if parent.exists():
            return None if parent.is_dir() else parent
    return None


def check_output_file(path: Path, option: str, *, overwrite: bool = True) -> None:
    """Raise OutputPathError unless a file can be written at `path` (`option` names it)."""
    blocking = _blocking_file(path)
    if blocking is not None:
        raise OutputPathError(f"{option} {path}: {blocking} is a file, not a folder")
    if path.is_dir():
        raise OutputPathError(f"{option} {path} is a folder; give a file name")
    if path.exists() and not overwrite:
        raise OutputPathError(
            f"{option} {path} already exists; choose another path or pass --force"
        )


def check_output_dir(path: Path, option: str, *, must_be_empty: bool = False) -> None:
    """Raise OutputPathError unless `path` is, or can be created as, a folder."""
    blocking = _blocking_file(path)
    if blocking is not None:
        raise OutputPathError(f"{option} {path}: {blocking} is a file, not a folder")
    if path.exists() and not path.is_dir():
        raise OutputPathError(f"{option} {path} is a file; give a folder")
    if must_be_empty and path.is_dir() and any(path.iterdir()):
        raise OutputPathError(
            f"{option} {path} already exists and is not empty; choose another path or pass --force"
        )
