"""Offline benchmarks built from Debian packages: IconThemes and CJK-Fonts (docs/benchmarks.md)."""

from __future__ import annotations

from training.data.benchmarks.cjk import build_cjk
from training.data.benchmarks.icons import build_icons

__all__ = ["build_cjk", "build_icons"]
