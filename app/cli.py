"""`lookalike`: the training commands (training.cli) plus the service commands (serve, worker,
demo). `training` stays importable and usable without the service."""

from __future__ import annotations

from training.cli import app as cli


def main() -> None:
    cli()
