"""Crash-safe file-system steps shared by artifacts and benchmark outputs."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def fsync_tree(directory: Path) -> None:
    """Flush every file directly in `directory` to disk before it is renamed into place."""
    for file in Path(directory).iterdir():
        if file.is_file():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())


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
