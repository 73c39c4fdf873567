"""`lookalike data ...`: build the offline benchmarks from Debian packages."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

from training.data.benchmarks.cjk import build_cjk
from training.data.benchmarks.icons import build_icons
from training.data.records import DatasetError

app = typer.Typer(
    help="Build the offline benchmarks (IconThemes, CJK-Fonts) from Debian packages; no root.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

OutArgument = Annotated[
    Path, typer.Argument(help="Output folder (ImageFolder train/ and test/ + manifest.json).")
]
CacheOption = Annotated[
    Path | None,
    typer.Option(
        "--cache",
        help="Package cache (.deb files and their unpacked contents); "
        "default $LOOKALIKE_CACHE_DIR/debian or ~/.cache/lookalike/debian.",
    ),
]
# The reference builds (docs/benchmarks.md) are 128x128 RGB PNG.
SizeOption = Annotated[int, typer.Option("--size", min=32, help="Image side in pixels.")]


@app.command("build-icons")
def build_icons_command(
    out: OutArgument, cache: CacheOption = None, size: SizeOption = 128
) -> None:
    """IconThemes: icon names drawn by 25 icon-theme families (zero-shot retrieval)."""
    _run(lambda: build_icons(out, cache_dir=cache, size=size), out)


@app.command("build-cjk")
def build_cjk_command(
    out: OutArgument,
    max_classes: Annotated[
        int | None,
        typer.Option(
            "--max-classes", min=1, help="Keep the first N classes of each split by folder name."
        ),
    ] = None,
    size: SizeOption = 128,
    cache: CacheOption = None,
) -> None:
    """CJK-Fonts: 1,583 everyday Han characters rendered in 32 font faces."""
    _run(lambda: build_cjk(out, cache_dir=cache, max_classes=max_classes, size=size), out)


def _run(build: Callable[[], dict], out: Path) -> None:
    """Run a build with progress messages; user-facing failures end in one line on stderr."""
    try:
        with _progress_messages():
            manifest = build()
    except (DatasetError, OSError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(1) from None
    summary = ", ".join(
        f"{split} {counts['classes']} classes / {counts['images']} images"
        for split, counts in manifest["splits"].items()
    )
    typer.echo(f"{manifest['benchmark']} at {out}: {summary}")


@contextmanager
def _progress_messages() -> Iterator[None]:
    """Show the builders' INFO messages ("cached", skipped packages) on stderr for one build,
    unless the application has set up logging itself."""
    package_logger = logging.getLogger("training.data.benchmarks")
    if package_logger.handlers or logging.getLogger().handlers:
        yield
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    previous_level = package_logger.level
    package_logger.addHandler(handler)
    package_logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        package_logger.removeHandler(handler)
        package_logger.setLevel(previous_level)
