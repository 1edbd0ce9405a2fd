"""`flywheel` commands of the producers stage (registered by flywheel/cli.py). Keep top-level imports light."""

from __future__ import annotations

import typer


def register(app: typer.Typer, bench: typer.Typer) -> None:
    """Add this stage's commands to the main app and its benchmarks to `flywheel bench`."""
